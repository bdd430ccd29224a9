#!/usr/bin/env python3
"""HF transformers on CPU, measured the way `tideway bench` measures: decode tokens/s at
batch 1, 8 and 32 (after a short prompt), prefill tokens/s for 512 tokens, peak memory.

    .venv/bin/python bench/hf_mamba_bench.py MODEL_DIR [--threads 2] [--json]

Decode time is taken from `generate` with a fixed number of new tokens: the time for N new
tokens minus the time for 1 (which is the prompt's prefill plus one step), over N - 1.
"""

import argparse
import json
import resource
import statistics
import time

import torch
from transformers import MambaForCausalLM


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=17)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model = MambaForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    report = {"model": args.model, "threads": args.threads, "torch": torch.__version__, "decode": []}

    with torch.inference_mode():
        for batch in [int(b) for b in args.batches.split(",")]:
            prompt = torch.randint(0, vocab, (batch, 12), generator=g)

            def gen(n):
                model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0, eos_token_id=None)

            gen(2)
            t_one = timed(lambda: gen(1), 2)
            t_many = timed(lambda: gen(args.new_tokens), 2)
            per_step = (t_many - t_one) / (args.new_tokens - 1)
            row = {"batch": batch, "tokens_per_s": batch / per_step, "step_ms": 1e3 * per_step}
            report["decode"].append(row)
            if not args.json:
                print(f"decode batch {batch:>3}: {row['tokens_per_s']:9.1f} tokens/s ({row['step_ms']:.1f} ms/step)", flush=True)

        ids = torch.randint(0, vocab, (1, args.prefill_tokens), generator=g)
        model(ids[:, :32], use_cache=False)
        t = timed(lambda: model(ids, use_cache=False), 3)
        report["prefill"] = {"tokens": args.prefill_tokens, "tokens_per_s": args.prefill_tokens / t, "seconds": t}
        if not args.json:
            print(f"prefill {args.prefill_tokens} tokens: {args.prefill_tokens / t:.1f} tokens/s ({t:.2f} s)")

    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"peak memory (RSS): {report['peak_rss_bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
