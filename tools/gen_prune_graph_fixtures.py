"""Writes tests/fixtures/prune/mamba_hidden_attention.safetensors: what HF transformers' Mamba
mixer (its CPU path, `MambaMixer.slow_forward`) computes inside one layer, for the test of
Tideway's Mamba graph provider (../shared/SPEC-MODELS.md section 6.3: "hidden attention").

For each fixture checkpoint below, HF runs the fixture's own input ids; hooks record layer L's
mixer input (`in_proj`'s input, [T, d_model]) and its token-mixing output gated by silu(z)
(`out_proj`'s input, [T, d_inner]). The provider's matrices alpha (per channel) must satisfy
(sum_j alpha_ij x'_j + D x'_i) * silu(z_i) = out_proj's input, with x' the conv's output.
It also records DeciMamba's token score (Ben-Kish et al., ICLR 2025: the norm over channels of
Delta_t = softplus(dt_proj(...)), computed as HF's mixer computes it from `x_proj`'s output, which
a hook records), the baseline the adapted pruner is measured against.

Also tests/fixtures/prune/fla_head_attention.safetensors: for GLA, RetNet, DeltaNet, Gated
DeltaNet and linear-attention fixtures of flash-linear-attention (its model classes through Triton's interpreter,
`fused_recurrent` kernels), layer L's attention input (`q_proj`'s input) and its heads' output
before the norm and gate (the input of `g_norm_swish_gate`, `g_norm`, `o_norm` or `norm`,
[T, H * dv]): Tideway's per-head matrices times the values must give it.

    .venv/bin/python tools/gen_prune_graph_fixtures.py
"""

import os
import pathlib

os.environ["TRITON_INTERPRET"] = "1"
import triton.runtime.autotuner as autotuner  # noqa: E402

autotuner.Autotuner._bench = lambda self, *args, **kwargs: [1.0, 1.0, 1.0]

import torch  # noqa: E402
from safetensors.torch import load_file, save_file
from fla.models import (  # noqa: E402
    DeltaNetForCausalLM, GatedDeltaNetForCausalLM, GLAForCausalLM, LinearAttentionForCausalLM, RetNetForCausalLM,
)
from transformers import MambaForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "prune" / "mamba_hidden_attention.safetensors"

# (fixture directory under tests/fixtures, layer)
CASES = [("mamba/hf_k4_sharded", 1), ("mamba/hf_bias_untied_k2", 0)]
GLA_OUT = FIXTURES / "prune" / "fla_head_attention.safetensors"
GLA_CASES = [
    ("fla/gla_basic", 1, GLAForCausalLM),
    ("fla/gla_kv_heads_relu_clamp", 0, GLAForCausalLM),
    ("fla/gla_conv_no_gate", 1, GLAForCausalLM),
    ("fla/retnet_basic", 1, RetNetForCausalLM),
    ("fla/delta_net_basic", 1, DeltaNetForCausalLM),
    ("fla/delta_net_elu_noconv_nobeta", 0, DeltaNetForCausalLM),
    ("fla/delta_net_relu_sum_gate_negeig", 1, DeltaNetForCausalLM),
    ("fla/gated_deltanet_basic", 1, GatedDeltaNetForCausalLM),
    ("fla/gated_deltanet_gva_nogate_negeig", 0, GatedDeltaNetForCausalLM),
    ("fla/linear_attn_dpfp_normqk_kv", 1, LinearAttentionForCausalLM),
    ("fla/linear_attn_elu_normalized", 0, LinearAttentionForCausalLM),
    ("fla/linear_attn_hadamard", 1, LinearAttentionForCausalLM),
    ("fla/linear_attn_hedgehog_normalized", 1, LinearAttentionForCausalLM),
    ("fla/linear_attn_t2r", 0, LinearAttentionForCausalLM),
]


def gla_cases():
    tensors, metadata = {}, {}
    for c, (fixture, layer, model_class) in enumerate(GLA_CASES):
        directory = FIXTURES / fixture
        model = model_class.from_pretrained(directory, torch_dtype=torch.float32).eval()
        for block in model.model.layers:
            block.attn.mode = "fused_recurrent"
        ids = load_file(str(directory / "expected.safetensors"))["input_ids"]
        attn = model.model.layers[layer].attn
        norm = next(getattr(attn, n) for n in ("g_norm_swish_gate", "g_norm", "o_norm", "norm") if hasattr(attn, n))
        seen = {}
        hooks = [
            attn.q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("attn_in", i[0])),
            norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("heads_out", args[0])),
        ]
        with torch.no_grad():
            model(input_ids=ids[None, :], use_cache=False)
        for h in hooks:
            h.remove()
        name = f"case{c}"
        t = ids.numel()
        tensors[f"{name}.attn_in"] = seen["attn_in"][0].float().contiguous()
        tensors[f"{name}.heads_out"] = seen["heads_out"][0].reshape(t, -1).float().contiguous()
        metadata[name] = f"{fixture}:{layer}"
        print(f"{name}: {fixture} layer {layer}, {t} tokens")
    save_file(tensors, str(GLA_OUT), metadata=metadata)
    print(f"wrote {GLA_OUT}")


def main():
    tensors, metadata = {}, {}
    for c, (fixture, layer) in enumerate(CASES):
        directory = FIXTURES / fixture
        model = MambaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
        ids = load_file(str(directory / "expected.safetensors"))["input_ids"]
        mixer = model.backbone.layers[layer].mixer
        seen = {}
        hooks = [
            mixer.in_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("mixer_in", i[0])),
            mixer.out_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("out_proj_in", i[0])),
            mixer.x_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("x_proj_out", o)),
        ]
        with torch.no_grad():
            model(input_ids=ids[None, :], use_cache=False)
        for h in hooks:
            h.remove()
        name = f"case{c}"
        tensors[f"{name}.mixer_in"] = seen["mixer_in"][0].float().contiguous()
        tensors[f"{name}.out_proj_in"] = seen["out_proj_in"][0].float().contiguous()
        # As MambaMixer.forward: time_step = dt_proj.weight @ time_step; softplus(+ dt_proj.bias).
        time_step = seen["x_proj_out"][0, :, : mixer.time_step_rank].double()
        dt = time_step @ mixer.dt_proj.weight.double().T + mixer.dt_proj.bias.double()
        delta = torch.nn.functional.softplus(dt)
        tensors[f"{name}.decimamba_score"] = delta.norm(dim=-1).contiguous()
        metadata[name] = f"{fixture}:{layer}"
        print(f"{name}: {fixture} layer {layer}, {ids.numel()} tokens")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=metadata)
    print(f"wrote {OUT}")
    gla_cases()


if __name__ == "__main__":
    main()
