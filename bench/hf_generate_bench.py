#!/usr/bin/env python3
"""HF transformers' `generate` on CPU, measured as `tideway bench generate` measures the server:
B generations at once (a batch of B prompts of PROMPT random ids, greedy, no end token), NEW new
tokens each; prints tokens/s of all of them together for each B.

    .venv/bin/python bench/hf_generate_bench.py MODEL_DIR [--batches 1,8,32] [--new 128] [--prompt 16] [--threads 2]
"""

import argparse
import json
import statistics
import time

import torch
from transformers import GenerationConfig, MambaForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = MambaForCausalLM.from_pretrained(args.model).eval()
    vocab = model.config.vocab_size
    config = GenerationConfig(max_new_tokens=args.new, min_new_tokens=0, do_sample=False, eos_token_id=None,
                              pad_token_id=0, use_cache=True)
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        times = []
        for r in range(args.rounds):
            g = torch.Generator().manual_seed(r)
            prompts = torch.randint(0, vocab, (b, args.prompt), generator=g)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(prompts, generation_config=config)
            times.append(time.perf_counter() - t0)
            assert out.shape[1] == args.prompt + args.new
        t = statistics.median(times)
        rows.append({"concurrency": b, "tokens_per_s": b * args.new / t, "seconds": t})
        print(f"HF generate, batch {b}: {b * args.new / t:.1f} tokens/s ({t:.2f} s)", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
