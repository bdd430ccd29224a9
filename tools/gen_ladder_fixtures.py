#!/usr/bin/env python3
"""Writes the Ladder Residual oracle fixtures under tests/fixtures/ladder/.

Each fixture is a reference model (fla's GLAForCausalLM; HF transformers' MambaForCausalLM)
with small random weights, saved in its public layout with `ladder_layers` added to
config.json, and expected.safetensors holding the input ids and the logits of a *ladder*
forward built from the reference model's own modules, with the residual adds rewired as
shared/SPEC-MODELS.md section 5.1 states (gpt_ladder_TP.py / modeling_llama_ladder.py):

    r = embed(ids); pending = 0
    for each sub-block j (attention then MLP per layer; Mamba: its mixer):
        standard layer:  r = r + pending;  out = f_j(norm_j(r))
        ladder layer:    out = f_j(norm_j(r));  r = r + pending   (reads r without pending)
        pending = out
    logits = lm_head(norm_f(r + pending))

For a partly laddered model this is the HF hybrid form: the first ladder layer's attention
reads the previous standard layer's post-attention stream. Mamba blocks have one sub-block, so
each mixer output reaches the stream one block later.

    .venv/bin/python tools/gen_ladder_fixtures.py
"""

import json
import os
import shutil
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
import triton.runtime.autotuner as autotuner  # noqa: E402

autotuner.Autotuner._bench = lambda self, *args, **kwargs: [1.0, 1.0, 1.0]

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from fla.models import GLAConfig, GLAForCausalLM  # noqa: E402
from transformers import MambaConfig, MambaForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ladder"


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or name.endswith(".D"):
                p.copy_(p + 0.3 * noise)
            else:
                scale = max(float(p.std()), 0.05) if p.numel() > 1 else 0.1
                p.add_(0.5 * scale * noise)


def ladder_forward(embed, sub_blocks, ladder, norm_f, lm_head):
    """sub_blocks: (layer index, norm, f) in order; ladder: per layer."""
    r = embed
    pending = torch.zeros_like(r)
    for layer, norm, f in sub_blocks:
        if ladder[layer]:
            out = f(norm(r))
            r = r + pending
        else:
            r = r + pending
            out = f(norm(r))
        pending = out
    return lm_head(norm_f(r + pending))


def save(model, name, ladder_layers, ladder, ids, logits, plain):
    out = ROOT / name
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["ladder_layers"] = ladder_layers
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in ["generation_config.json"]:
        (out / extra).unlink(missing_ok=True)
    save_file({"input_ids": ids.to(torch.int64), "logits": logits.float().contiguous()},
              str(out / "expected.safetensors"))
    diff = float((logits - plain).norm() / plain.norm())
    print(f"{name}: ladder layers {ladder}, ladder vs standard logits differ by {diff:.3f} (relative)")


def gla_fixture():
    torch.manual_seed(700)
    config = GLAConfig(hidden_size=32, num_heads=4, expand_k=0.5, expand_v=1, num_hidden_layers=3,
                       hidden_ratio=2, vocab_size=61, fuse_cross_entropy=False, fuse_norm=False,
                       attn_mode="fused_recurrent")
    model = GLAForCausalLM(config).eval()
    perturb(model, 701)
    g = torch.Generator().manual_seed(702)
    ids = torch.randint(0, config.vocab_size, (70,), generator=g)
    ladder = [False, True, True]  # ladder_layers 2: the last two layers
    with torch.no_grad():
        body = model.model
        x = body.embeddings(ids[None, :])
        subs = []
        for i, layer in enumerate(body.layers):
            subs.append((i, layer.attn_norm, lambda h, a=layer.attn: a(hidden_states=h)[0]))
            subs.append((i, layer.mlp_norm, layer.mlp))
        logits = ladder_forward(x, subs, ladder, body.norm, model.lm_head)[0]
        plain = model(input_ids=ids[None, :]).logits[0]
    save(model, "gla_ladder_last2", 2, ladder, ids, logits, plain)


def mamba_fixture():
    torch.manual_seed(800)
    config = MambaConfig(vocab_size=57, hidden_size=32, state_size=6, num_hidden_layers=3, expand=2,
                         conv_kernel=4, time_step_rank=5, use_bias=False, tie_word_embeddings=True)
    model = MambaForCausalLM(config).eval()
    perturb(model, 801)
    g = torch.Generator().manual_seed(802)
    ids = torch.randint(0, config.vocab_size, (70,), generator=g)
    ladder = [True, True, True]  # ladder_layers [0, 1, 2]: every layer
    with torch.no_grad():
        body = model.backbone
        x = body.embeddings(ids[None, :])
        subs = [(i, layer.norm, layer.mixer) for i, layer in enumerate(body.layers)]
        logits = ladder_forward(x, subs, ladder, body.norm_f, model.lm_head)[0]
        plain = model(input_ids=ids[None, :], use_cache=False).logits[0]
    save(model, "mamba_ladder_all", [0, 1, 2], ladder, ids, logits, plain)


if __name__ == "__main__":
    gla_fixture()
    mamba_fixture()
