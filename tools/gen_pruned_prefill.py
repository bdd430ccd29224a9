"""Writes tests/fixtures/prune/pruned_prefill.safetensors: pruned prefills of Mamba language
models computed by HF transformers (MambaForCausalLM, its CPU path), and of a GLA by
flash-linear-attention (GLAForCausalLM through Triton's interpreter, its `fused_recurrent`
kernels), with the numpy Zero-TPrune oracle of tools/gen_zero_tprune.py, for the test of
Tideway's pruned prefill (`Model::prefill_pruned`, ../shared/SPEC-MODELS.md section 6.3).

For each case, HF runs the model block by block. After each pruning layer L, the oracle builds
layer L's token graphs from what HF's mixer computed on its input (a hook records x_proj's
output: delta-rank, B and C; Delta = softplus(dt_proj(...)) as HF computes it; A = -exp(A_log)),
in float64, per channel c and window [s, e) of the layer's tokens:
    alpha_ij = sum_n C_i[n] exp(A[c,n] (cum_i - cum_j)) Delta_j[c] B_j[n],  j <= i,
    cum_i = sum_{k=s..i} Delta_k[c];
heads = consecutive equal groups of channels, each the mean of |alpha|; keys = B_j. For GLA,
per head h (from the hooked q_proj, k_proj and gk_proj outputs; gk = logsigmoid(.) / 16):
    A_ij = dk^-0.5 sum_c q_ic k_jc exp(G_ic - G_jc),  j <= i,  G = cumsum of gk from s;
heads = consecutive equal groups of the model's heads, each the mean of |A|; keys = k_j. The oracle
prunes each window (causal form; protected: the sequence's first token and its `recent` last;
keep ceil(keep * n) but never fewer than the protected; drop_similar floor(similar * n) at most
n - keep; iterations min(paper's count for the layer, 5)), and HF's later blocks run on the
survivors' rows only. Recorded: the input ids, the kept positions, the survivors after each
pruning layer, the logits of the kept positions, and a session going on from the pruned
prefill (`continue_greedy`): its greedy tokens and the logits after each fed one. The metadata
holds each case's model directory and the `--prune` setting Tideway parses.

    .venv/bin/python tools/gen_pruned_prefill.py
"""

import math
import os
import pathlib
import sys

os.environ["TRITON_INTERPRET"] = "1"
import triton.runtime.autotuner as autotuner  # noqa: E402

autotuner.Autotuner._bench = lambda self, *args, **kwargs: [1.0, 1.0, 1.0]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file
from fla.models import GLAForCausalLM  # noqa: E402
from transformers import AutoTokenizer, MambaForCausalLM

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gen_zero_tprune import zero_tprune  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "prune" / "pruned_prefill.safetensors"

TEXT = (
    "ROMEO: But, soft! what light through yonder window breaks? It is the east, and Juliet is "
    "the sun. Arise, fair sun, and kill the envious moon, who is already sick and pale with "
    "grief, that thou her maid art far more fair than she: be not her maid, since she is "
    "envious; her vestal livery is but sick and green and none but fools do wear it; cast it "
    "off. It is my lady, O, it is my love! O, that she knew she were! She speaks yet she says "
    "nothing: what of that? Her eye discourses; I will answer it."
)

# (model directory under the repository, ids, setting)
CASES = [
    (
        "tests/fixtures/mamba/hf_k4_sharded",
        "random:70",
        dict(layers=[0], keep=0.5, window=24, recent=5, heads=4, similar=0.1),
    ),
    (
        "models/shakespeare-mamba",
        "text:200",
        dict(layers=[2, 5], keep=0.6, window=64, recent=8, heads=4, similar=0.1),
    ),
    (
        "models/shakespeare-gla",
        "text:200",
        dict(layers=[1, 3], keep=0.5, window=48, recent=8, heads=2, similar=0.1),
    ),
]


# Greedy tokens a session generates after its pruned prompt (the served path).
CONTINUE = 4


def default_iterations(layer, layers):
    if layer < 3:
        return 30
    if layer + 3 >= layers:
        return 1
    return 5


def spec(setting):
    return (
        f"layers={'+'.join(map(str, setting['layers']))},keep={setting['keep']},"
        f"window={setting['window']},recent={setting['recent']},heads={setting['heads']},"
        f"similar={setting['similar']},policy=zero_tprune"
    )


def window_graphs(delta, b, c, a, window, heads):
    """Head graphs [heads, n, n] (float64) of the tokens `window` from Delta [T, E], B, C [T, N]
    and A [E, N]."""
    s, e = window
    d, bb, cc = delta[s:e], b[s:e], c[s:e]
    n, channels = d.shape
    per = channels // heads
    cum = np.cumsum(d, axis=0)  # [n, E]
    graphs = np.zeros((heads, n, n))
    mask = np.tril(np.ones((n, n), dtype=bool))
    for ch in range(channels):
        diff = cum[:, None, ch] - cum[None, :, ch]  # [i, j]
        diff = np.where(mask, diff, 0.0)
        # sum over the state index: C_i[n] exp(A[c,n] diff_ij) Delta_j B_j[n]
        decay = np.exp(a[ch][None, None, :] * diff[:, :, None])  # [i, j, N]
        alpha = np.einsum("in,ijn,jn->ij", cc, decay, bb) * d[None, :, ch]
        alpha = np.where(mask, alpha, 0.0)
        graphs[ch // per] += np.abs(alpha) / per
    return graphs


def gla_window_graphs(q, k, gk, window, heads):
    """Head graphs [heads, n, n] (float64) of the tokens `window` from q, k, gk [T, H, dk]."""
    s, e = window
    q, k, gk = q[s:e], k[s:e], gk[s:e]
    n, model_heads, dk = q.shape
    per = model_heads // heads
    cum = np.cumsum(gk, axis=0)  # [n, H, dk]
    mask = np.tril(np.ones((n, n), dtype=bool))
    graphs = np.zeros((heads, n, n))
    for h in range(model_heads):
        diff = cum[:, None, h, :] - cum[None, :, h, :]  # [i, j, dk]
        diff = np.where(mask[:, :, None], diff, 0.0)
        a = dk ** -0.5 * np.einsum("ic,jc,ijc->ij", q[:, h], k[:, h], np.exp(diff))
        graphs[h // per] += np.abs(np.where(mask, a, 0.0)) / per
    return graphs


def prune_layer(layer, layers, tokens, graphs_of, keys, setting):
    recent_from = max(0, tokens - setting["recent"])
    kept = []
    for start in range(0, tokens, setting["window"]):
        end = min(start + setting["window"], tokens)
        n = end - start
        protected = [i - start for i in range(start, end) if i == 0 or i >= recent_from]
        keep = max(math.ceil(setting["keep"] * n), len(protected))
        if keep >= n:
            kept += list(range(start, end))
            continue
        graphs = graphs_of((start, end))
        cfg = dict(
            causal=True,
            iterations=min(default_iterations(layer, layers), 5),
            keep=keep,
            drop_similar=min(int(setting["similar"] * n), n - keep),
            protected=protected,
            vhf=(0.01, 0.7),
        )
        result = zero_tprune(graphs, keys[start:end], cfg)
        kept += [i + start for i in result["kept"]]
    return kept


def ids_for(model_dir, what, vocab):
    kind, count = what.split(":")
    count = int(count)
    if kind == "random":
        rng = np.random.default_rng(19)
        return torch.tensor(rng.integers(0, vocab, size=count), dtype=torch.long)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(TEXT)["input_ids"]
    assert len(ids) >= count, f"the text has {len(ids)} tokens"
    return torch.tensor(ids[:count], dtype=torch.long)


def continue_greedy(ids, logits, locals_, embed, blocks, run_block, head, steps=CONTINUE):
    """A session that goes on from the pruned prefill: each layer's recurrence has seen the
    rows that reached it (every token up to the first pruning layer, the survivors after), and
    each new token reaches every layer. So the reference reruns the prompt and the new tokens
    block by block, keeping at each pruning layer the prompt's survivors there and every new
    token. Greedy: each new token is the argmax of the logits before it. Returns the `steps`
    tokens chosen and the logits after feeding each of the first `steps - 1`."""
    greedy = [int(logits[-1].argmax())]
    continued = []
    for _ in range(steps - 1):
        fed = torch.cat([ids, torch.tensor(greedy, dtype=torch.long)])
        extra = len(greedy)
        h = embed(fed[None, :])
        for i, block in enumerate(blocks):
            h = run_block(block, h)
            if i in locals_:
                prompt_rows = h.shape[1] - extra
                index = np.concatenate([locals_[i], np.arange(prompt_rows, prompt_rows + extra)])
                h = h[:, index]
        row = head(h)[0, -1]
        continued.append(row)
        greedy.append(int(row.argmax()))
    return greedy, torch.stack(continued)


def run_case(model_dir, what, setting):
    model = MambaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    ids = ids_for(model_dir, what, model.config.vocab_size)
    layers = len(model.backbone.layers)
    kept = np.arange(len(ids))
    survivors = []
    locals_ = {}
    with torch.no_grad():
        h = model.backbone.embeddings(ids[None, :])
        for i, block in enumerate(model.backbone.layers):
            mixer = block.mixer
            seen = {}
            hook = mixer.x_proj.register_forward_hook(lambda m, inp, out: seen.__setitem__("dbc", out))
            h = block(h)
            hook.remove()
            if i not in setting["layers"]:
                continue
            dbc = seen["dbc"][0].double()
            r, n = mixer.time_step_rank, mixer.ssm_state_size
            dt = dbc[:, :r] @ mixer.dt_proj.weight.double().T + mixer.dt_proj.bias.double()
            delta = torch.nn.functional.softplus(dt).numpy()
            b = dbc[:, r : r + n].numpy()
            c = dbc[:, r + n : r + 2 * n].numpy()
            a = -torch.exp(mixer.A_log.double()).numpy()  # [E, N]
            local = prune_layer(
                i, layers, len(kept),
                lambda w: window_graphs(delta, b, c, a, w, setting["heads"]), b, setting,
            )
            h = h[:, local]
            kept = kept[local]
            survivors.append(len(kept))
            locals_[i] = local
        logits = model.lm_head(model.backbone.norm_f(h))[0]
        greedy, continued = continue_greedy(
            ids, logits, locals_,
            model.backbone.embeddings, model.backbone.layers, lambda block, h: block(h),
            lambda h: model.lm_head(model.backbone.norm_f(h)),
        )
    return ids, kept, survivors, logits, greedy, continued


def run_gla_case(model_dir, what, setting):
    model = GLAForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    for block in model.model.layers:
        block.attn.mode = "fused_recurrent"  # Triton's interpreter cannot run fla's chunk kernels
    ids = ids_for(model_dir, what, model.config.vocab_size)
    layers = len(model.model.layers)
    kept = np.arange(len(ids))
    survivors = []
    locals_ = {}
    with torch.no_grad():
        h = model.model.embeddings(ids[None, :])
        for i, block in enumerate(model.model.layers):
            attn = block.attn
            seen = {}
            hooks = [
                attn.q_proj.register_forward_hook(lambda m, inp, out: seen.__setitem__("q", out)),
                attn.k_proj.register_forward_hook(lambda m, inp, out: seen.__setitem__("k", out)),
                attn.gk_proj.register_forward_hook(lambda m, inp, out: seen.__setitem__("gk", out)),
            ]
            h = block(h)[0]
            for hook in hooks:
                hook.remove()
            if i not in setting["layers"]:
                continue
            heads, dk = attn.num_heads, attn.head_k_dim
            t = h.shape[1]
            q = seen["q"][0].double().reshape(t, heads, dk).numpy()
            k = seen["k"][0].double().reshape(t, heads, dk).numpy()
            gk = (torch.nn.functional.logsigmoid(seen["gk"][0].double()) / attn.gate_logit_normalizer)
            gk = gk.reshape(t, heads, dk).numpy()
            keys = k.reshape(t, heads * dk)
            local = prune_layer(
                i, layers, len(kept), lambda w: gla_window_graphs(q, k, gk, w, setting["heads"]), keys, setting,
            )
            h = h[:, local]
            kept = kept[local]
            survivors.append(len(kept))
            locals_[i] = local
        logits = model.lm_head(model.model.norm(h))[0]
        greedy, continued = continue_greedy(
            ids, logits, locals_,
            model.model.embeddings, model.model.layers, lambda block, h: block(h)[0],
            lambda h: model.lm_head(model.model.norm(h)),
        )
    return ids, kept, survivors, logits, greedy, continued


def main():
    tensors, metadata = {}, {}
    for k, (model_dir, what, setting) in enumerate(CASES):
        run = run_gla_case if "gla" in model_dir else run_case
        ids, kept, survivors, logits, greedy, continued = run(ROOT / model_dir, what, setting)
        name = f"case{k}"
        tensors[f"{name}.ids"] = ids.contiguous()
        tensors[f"{name}.kept"] = torch.tensor(kept, dtype=torch.long)
        tensors[f"{name}.survivors"] = torch.tensor(survivors, dtype=torch.long)
        tensors[f"{name}.logits"] = logits.float().contiguous()
        tensors[f"{name}.greedy"] = torch.tensor(greedy, dtype=torch.long)
        tensors[f"{name}.continued_logits"] = continued.float().contiguous()
        metadata[name] = f"{model_dir}|{spec(setting)}"
        print(f"{name}: {model_dir}, {len(ids)} tokens, {spec(setting)}: survivors {survivors}, greedy {greedy}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=metadata)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
