#!/usr/bin/env python3
"""HF transformers, measured the way `tideway bench` measures: decode tokens/s at batch 1, 8
and 32 (after a short prompt), prefill tokens/s for 512 tokens, peak memory.

    .venv/bin/python bench/hf_mamba_bench.py MODEL_DIR [--threads 2] [--json]
    python3 bench/hf_mamba_bench.py MODEL_DIR --device cuda --dtype bf16    # on a GPU

On a GPU, plain transformers runs Mamba's reference path (its fused path needs the
`mamba-ssm` and `causal-conv1d` packages): what a user of transformers alone gets.

Decode time is taken from `generate` with a fixed number of new tokens: the time for N new
tokens minus the time for 1 (which is the prompt's prefill plus one step), over N - 1.
"""

import argparse

import torch
from transformers import MambaForCausalLM

from peer_report import decode_row, finish, prefill_row, start, timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=17)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    report, g = start(args)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = MambaForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    report.update(device=args.device, dtype=args.dtype)
    vocab = model.config.vocab_size

    with torch.inference_mode():
        for batch in [int(b) for b in args.batches.split(",")]:
            prompt = torch.randint(0, vocab, (batch, 12), generator=g).to(args.device)

            def gen(n):
                model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0, eos_token_id=None)

            gen(2)
            t_one = timed(lambda: gen(1), 2)
            t_many = timed(lambda: gen(args.new_tokens), 2)
            decode_row(report, batch, (t_many - t_one) / (args.new_tokens - 1), args.json)

        ids = torch.randint(0, vocab, (1, args.prefill_tokens), generator=g).to(args.device)
        model(ids[:, :32], use_cache=False)
        prefill_row(report, args.prefill_tokens, timed(lambda: model(ids, use_cache=False), 3), args.json)
    finish(report, args.json)


if __name__ == "__main__":
    main()
