#!/usr/bin/env python3
"""Writes a mamba-130m-shaped checkpoint with random weights in the HF transformers layout
(hidden 768, 24 layers, vocab 50280, state 16, expand 2, conv 4, dt rank 48), for benchmarks.

    .venv/bin/python bench/make_mamba130m.py [OUT_DIR]    # default bench/models/mamba-130m-random
"""

import sys
from pathlib import Path

import torch
from transformers import MambaConfig, MambaForCausalLM


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "models" / "mamba-130m-random"
    torch.manual_seed(0)
    config = MambaConfig(
        hidden_size=768,
        num_hidden_layers=24,
        vocab_size=50280,
        state_size=16,
        expand=2,
        conv_kernel=4,
        time_step_rank=48,
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
