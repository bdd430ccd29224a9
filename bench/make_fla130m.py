#!/usr/bin/env python3
"""Writes ~130M-parameter GLA and DeltaNet checkpoints with random weights, as fla saves them
(hidden 768, 12 layers, vocab 32000, untied head, MLP ratio 4), for benchmarks.

    .venv/bin/python bench/make_fla130m.py        # -> bench/models/{gla,delta_net}-130m-random
"""

import os
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from fla.models import DeltaNetConfig, DeltaNetForCausalLM, GLAConfig, GLAForCausalLM  # noqa: E402

OUT = Path(__file__).parent / "models"
COMMON = dict(hidden_size=768, num_hidden_layers=12, vocab_size=32000, hidden_ratio=4, fuse_cross_entropy=False)


def main():
    torch.manual_seed(0)
    for name, config, model_class in [
        ("gla-130m-random", GLAConfig(num_heads=4, expand_k=0.5, expand_v=1, **COMMON), GLAForCausalLM),
        ("delta_net-130m-random", DeltaNetConfig(num_heads=12, expand_k=1, expand_v=1, **COMMON), DeltaNetForCausalLM),
    ]:
        model = model_class(config)
        model.save_pretrained(OUT / name)
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
