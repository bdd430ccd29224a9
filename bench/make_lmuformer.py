#!/usr/bin/env python3
"""Random-weight LMUFormer checkpoints in the reference configuration (src/gsc.yml: dim 256,
128 mel channels, 1 block, 35 classes, mlp_ratio 4) for `tideway bench`, both variants:

    .venv/bin/python bench/make_lmuformer.py   # -> bench/models/{lmuformer,slmuformer}-gsc-random

The modules are those of tools/gen_lmu_fixtures.py (the reference rebuilt with scipy and
spikingjelly); the checkpoint is the state dict as safetensors (fft_H left out).
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from gen_lmu_fixtures import FRAMES, THETA, LmuFormer, perturb  # noqa: E402

for name, variant in [("lmuformer-gsc-random", "lmu_rnn_conv1d"), ("slmuformer-gsc-random", "slmu_rnn_ms_conv1d")]:
    cfg = {"variant": variant, "dim": 256, "in_channels": 128, "num_classes": 35, "depths": 1, "mlp_ratio": 4}
    torch.manual_seed(0)
    model = LmuFormer(cfg).eval()
    perturb(model, 0, variant.startswith("slmu"))
    out = ROOT / "bench" / "models" / name
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "lmuformer", "theta": THETA, "seq_len": FRAMES, "lif_tau": 2.0, "lif_threshold": 1.0, **cfg}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("fft_H")}
    save_file(state, out / "model.safetensors")
    print(out, sum(v.numel() for v in state.values()), "values")
