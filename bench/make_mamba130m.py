#!/usr/bin/env python3
"""Writes a mamba-130m-shaped checkpoint with random weights in the HF transformers layout
(hidden 768, 24 layers, vocab 50280, state 16, expand 2, conv 4, dt rank 48), for benchmarks;
`--shape` picks another of the published Mamba shapes (state-spaces/mamba-*-hf), for figures
at sizes the kernels were not tuned at.

    .venv/bin/python bench/make_mamba130m.py [OUT_DIR] [--shape 130m|370m|790m|1.4b|2.8b]
    # default OUT_DIR: bench/models/mamba-SHAPE-random
"""

import argparse
from pathlib import Path

import torch
from transformers import MambaConfig, MambaForCausalLM

# (hidden, layers) of state-spaces/mamba-*-hf; each has vocab 50280, state 16, expand 2,
# conv 4 and dt rank ceil(hidden / 16).
SHAPES = {
    "130m": (768, 24),
    "370m": (1024, 48),
    "790m": (1536, 48),
    "1.4b": (2048, 48),
    "2.8b": (2560, 64),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--shape", choices=SHAPES, default="130m")
    args = parser.parse_args()
    out = args.out or Path(__file__).parent / "models" / f"mamba-{args.shape}-random"
    hidden, layers = SHAPES[args.shape]
    torch.manual_seed(0)
    config = MambaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        vocab_size=50280,
        state_size=16,
        expand=2,
        conv_kernel=4,
        time_step_rank=-(-hidden // 16),
        use_bias=False,
        use_conv_bias=True,
        tie_word_embeddings=True,
    )
    model = MambaForCausalLM(config)
    model.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({params / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
