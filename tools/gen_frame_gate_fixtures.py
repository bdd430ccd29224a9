"""Writes tests/fixtures/prune/frame_gate.safetensors: LMUFormers run by the PyTorch reference
modules of tools/gen_lmu_fixtures.py (spikingjelly's LIF neurons, the LMU memory by FFT) with
frames skipped as ../shared/SPEC-MODELS.md section 6.3 (last paragraph) says, for the test of
Tideway's frame gate (`operators/src/models/lmuformer/gate.rs`).

The gate, written here from the section and `operators/src/prune/frames.rs`'s stated rule, in
float64: an input frame is skipped when its mean is below `quiet_below`, or when its cosine
with the last kept frame is at least `similarity` (the first frame that is not quiet is kept).
A skipped frame still goes through the patch embedding; for the blocks and the head it is a
frame of no input: a forward pre-hook multiplies the input of every LIF neuron after the
embedding by the keep mask (the membrane then decays: H = V + (0 - V) / tau), and in the
non-spiking variant a hook zeroes W_u's output (u = relu(0) = 0), so the LMU memory advances as
m_t = A m_{t-1}. Recorded per case: the input (a fixture's input with runs of near-repeated
frames and of quiet frames written into it), the keep mask, the per-frame outputs (rows of
skipped frames are not meaningful), and the pooled scores (the mean over kept frames).

    .venv/bin/python tools/gen_frame_gate_fixtures.py
"""

import json
import pathlib
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gen_lmu_fixtures as ref  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "prune" / "frame_gate.safetensors"

# (LMU fixture, similarity, quiet floor)
CASES = [
    ("lmu/slmu_d40_c24_depth2_prefixed", 0.97, -1.5),
    ("lmu/lmu_d48_c20_depth2_prefixed", 0.97, -1.5),
]


def gate_mask(frames, similarity, quiet_below):
    keep, last, margin = [], None, float("inf")
    for f in frames.astype(np.float64):
        mean = f.mean()
        margin = min(margin, abs(mean - quiet_below))
        if mean < quiet_below:
            keep.append(False)
            continue
        if last is not None:
            norms = np.linalg.norm(f) * np.linalg.norm(last)
            cos = 0.0 if norms == 0 else float(f @ last / norms)
            margin = min(margin, abs(cos - similarity))
            if cos >= similarity:
                keep.append(False)
                continue
        last = f
        keep.append(True)
    return np.array(keep), margin


def gated_input(features, rng):
    """The fixture's input with runs of near-repeated frames and of quiet frames."""
    x = features.clone()
    n, c = x.shape
    for start, length in [(10, 12), (50, 6), (90, 20)]:
        for t in range(start + 1, min(start + length, n)):
            x[t] = x[start] + 0.01 * torch.from_numpy(rng.standard_normal(c)).float()
    for start, length in [(30, 8), (75, 5), (118, 10)]:
        x[start : min(start + length, n)] = -3.0 + 0.3 * torch.from_numpy(rng.standard_normal((min(length, n - start), c))).float()
    return x


def load_reference(directory):
    cfg = json.loads((directory / "checkpoint" / "config.json").read_text())
    model = ref.LmuFormer({k: cfg[k] for k in ("variant", "dim", "in_channels", "num_classes", "depths", "mlp_ratio")}).eval()
    state = {k.removeprefix("module."): v for k, v in load_file(directory / "checkpoint" / "model.safetensors").items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    # Only derived buffers may be absent (the module builds them as the checkpoint would).
    assert all(k.endswith(("lmu.A", "lmu.B", "lmu.H", "lmu.fft_H")) for k in missing), missing
    return model


def run_gated(model, x, mask):
    keep = torch.from_numpy(mask.astype(np.float32))
    hooks = []
    after_embed = [(n, m) for n, m in ref.lif_nodes(model) if not n.startswith("patch_embed.")]
    for _, node in after_embed:  # input [N, C, B]
        hooks.append(node.register_forward_pre_hook(lambda m, args: (args[0] * keep[:, None, None],)))
    if not model.spiking:
        for blk in model.block:  # W_u's output [B, N, 1]
            hooks.append(blk.attn.lmu.W_u.register_forward_hook(lambda m, i, out: out * keep[None, :, None]))
    y, _, _, margin = ref.run(model, x)
    for h in hooks:
        h.remove()
    pooled = y[torch.from_numpy(mask)].mean(dim=0)
    return y, pooled, margin


def main():
    rng = np.random.default_rng(6)
    tensors, metadata = {}, {}
    for k, (fixture, similarity, quiet_below) in enumerate(CASES):
        directory = FIXTURES / fixture
        model = load_reference(directory)
        x = gated_input(load_file(directory / "input.safetensors")["input"], rng)
        mask, gate_margin = gate_mask(x.numpy(), similarity, quiet_below)
        y, pooled, lif_margin = run_gated(model, x, mask)
        assert gate_margin > 1e-4, f"{fixture}: a frame lies {gate_margin:.1e} from the gate's threshold"
        if model.spiking:
            assert lif_margin > ref.MARGIN, f"{fixture}: a membrane lies {lif_margin:.1e} from its threshold"
        name = f"case{k}"
        tensors[f"{name}.input"] = x.contiguous()
        tensors[f"{name}.keep"] = torch.from_numpy(mask.astype(np.int64))
        tensors[f"{name}.output"] = y.contiguous()
        tensors[f"{name}.pooled"] = pooled.contiguous()
        metadata[name] = f"{fixture}|{similarity}|{quiet_below}"
        print(f"{name}: {fixture}, kept {int(mask.sum())} of {len(mask)} frames, "
              f"gate margin {gate_margin:.1e}, LIF margin {lif_margin:.1e}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=metadata)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
