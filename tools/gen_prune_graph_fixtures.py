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

    .venv/bin/python tools/gen_prune_graph_fixtures.py
"""

import pathlib

import torch
from safetensors.torch import load_file, save_file
from transformers import MambaForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "prune" / "mamba_hidden_attention.safetensors"

# (fixture directory under tests/fixtures, layer)
CASES = [("mamba/hf_k4_sharded", 1), ("mamba/hf_bias_untied_k2", 0)]


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


if __name__ == "__main__":
    main()
