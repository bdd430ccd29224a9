#!/usr/bin/env python3
"""Writes the Mamba oracle fixtures under tests/fixtures/mamba/ from HF transformers.

Each fixture is a directory holding a small random checkpoint in a public layout (HF
transformers' `MambaForCausalLM`, or the original state-spaces layout) and `expected.safetensors`
with the input ids and the logits that HF transformers computes for them on CPU. Every
parameter is perturbed after init so that nothing sits at a convenient default (norm weights of
1, D of 1, A_log of log(1..N)).

    python3 -m venv .venv && .venv/bin/pip install -r tools/requirements.txt
    .venv/bin/python tools/gen_mamba_fixtures.py

Rerunning rewrites the same files (fixed seeds, deterministic CPU kernels).
"""

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import MambaConfig, MambaForCausalLM

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "mamba"


def perturb(model: MambaForCausalLM, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("A_log"):
                p.copy_((p.float() + 0.3 * noise).to(p.dtype))
            elif name.endswith(".D") or "norm" in name:
                p.copy_((p.float() + 0.25 * noise).to(p.dtype))
            elif name.endswith("dt_proj.bias"):
                p.copy_((p.float() + 0.5 * noise).to(p.dtype))
            else:
                scale = max(float(p.float().std()), 0.02) if p.numel() > 1 else 0.1
                p.copy_((p.float() + 0.5 * scale * noise).to(p.dtype))


def hf_logits(model: MambaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids[None, :], use_cache=False)
    return out.logits[0].float().contiguous()


def write_expected(path: Path, ids: torch.Tensor, tensors: dict) -> None:
    save_file({"input_ids": ids.to(torch.int64).contiguous(), **tensors}, str(path / "expected.safetensors"))


def hf_fixture(name, cfg, seq_len, seed, dtype=torch.float32, shard=None):
    torch.manual_seed(seed)
    config = MambaConfig(**cfg)
    model = MambaForCausalLM(config).eval()
    perturb(model, seed + 1)
    if dtype != torch.float32:
        model = model.to(dtype)
    out = ROOT / name
    shutil.rmtree(out, ignore_errors=True)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, **kwargs)
    g = torch.Generator().manual_seed(seed + 2)
    ids = torch.randint(0, config.vocab_size, (seq_len,), generator=g)
    tensors = {"logits": hf_logits(model, ids)}
    if dtype != torch.float32:
        # The same (rounded) weights computed in f32: what an exact f32 engine must give.
        tensors["logits_f32_compute"] = hf_logits(model.float(), ids)
    write_expected(out, ids, tensors)
    print(f"{name}: {sorted(p.name for p in out.iterdir())}")


def original_layout_fixture(name, seed):
    """The state-spaces/mamba layout: `backbone.embedding`, minimal config with `ssm_cfg`,
    unpadded vocab with `pad_vocab_size_multiple`, and both `lm_head.weight` and the embedding
    stored (the original pickles store both names of the tied tensor)."""
    d_model, n_layer, vocab, multiple = 36, 2, 53, 8
    ssm_cfg = {"d_state": 7, "d_conv": 4, "expand": 2}
    padded = math.ceil(vocab / multiple) * multiple
    torch.manual_seed(seed)
    config = MambaConfig(
        hidden_size=d_model,
        num_hidden_layers=n_layer,
        vocab_size=padded,
        state_size=ssm_cfg["d_state"],
        conv_kernel=ssm_cfg["d_conv"],
        expand=ssm_cfg["expand"],
        time_step_rank=math.ceil(d_model / 16),
        use_bias=False,
        use_conv_bias=True,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
    )
    model = MambaForCausalLM(config).eval()
    perturb(model, seed + 1)
    out = ROOT / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace("backbone.embeddings.", "backbone.embedding.")
        state[key] = value.detach().clone().contiguous()
    state["lm_head.weight"] = state["backbone.embedding.weight"].clone()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(
        json.dumps(
            {
                "d_model": d_model,
                "n_layer": n_layer,
                "vocab_size": vocab,
                "ssm_cfg": ssm_cfg,
                "rms_norm": True,
                "residual_in_fp32": True,
                "fused_add_norm": True,
                "pad_vocab_size_multiple": multiple,
            },
            indent=2,
        )
    )
    g = torch.Generator().manual_seed(seed + 2)
    ids = torch.randint(0, vocab, (21,), generator=g)
    write_expected(out, ids, {"logits": hf_logits(model, ids)})
    print(f"{name}: {sorted(p.name for p in out.iterdir())}")


def main() -> None:
    torch.set_num_threads(1)
    ROOT.mkdir(parents=True, exist_ok=True)
    # Odd sizes; time_step_rank 7 does not divide hidden 37; conv kernel 3; tied head.
    hf_fixture(
        "hf_odd_tied",
        dict(hidden_size=37, num_hidden_layers=2, vocab_size=61, state_size=5, conv_kernel=3,
             expand=2, time_step_rank=7, use_bias=False, use_conv_bias=True,
             tie_word_embeddings=True),
        seq_len=23, seed=10)
    # Biases on in_proj/out_proj, conv kernel 2, expand 3, untied head, three layers.
    hf_fixture(
        "hf_bias_untied_k2",
        dict(hidden_size=40, num_hidden_layers=3, vocab_size=50, state_size=8, conv_kernel=2,
             expand=3, time_step_rank=6, use_bias=True, use_conv_bias=True,
             tie_word_embeddings=False),
        seq_len=19, seed=20)
    # Conv kernel 4 without conv bias, state 16 as released models have, "auto" dt rank,
    # saved as shards with model.safetensors.index.json.
    hf_fixture(
        "hf_k4_sharded",
        dict(hidden_size=48, num_hidden_layers=2, vocab_size=64, state_size=16, conv_kernel=4,
             expand=2, time_step_rank="auto", use_bias=False, use_conv_bias=False,
             tie_word_embeddings=True),
        seq_len=40, seed=30, shard="40KB")
    # bf16 weights, computed by HF in bf16 (and in f32 for the strict check).
    hf_fixture(
        "hf_bf16",
        dict(hidden_size=32, num_hidden_layers=2, vocab_size=48, state_size=6, conv_kernel=4,
             expand=2, time_step_rank=5, use_bias=False, use_conv_bias=True,
             tie_word_embeddings=True),
        seq_len=20, seed=40, dtype=torch.bfloat16)
    original_layout_fixture("ssm_original", seed=50)


if __name__ == "__main__":
    main()
