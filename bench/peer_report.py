"""What the Python peers of `tideway bench` (bench/hf_mamba_bench.py, bench/fla_cpu_bench.py)
share: the median timer and the report they print, in `tideway bench`'s terms (decode rows,
one prefill row, peak RSS), as a table or as JSON for bench/cpu_decode.sh."""

import json
import resource
import statistics
import time

import torch


def start(args):
    """Sets torch's threads; returns the empty report and the random generator every peer
    seeds alike (its prompts, then the prefill's tokens)."""
    torch.set_num_threads(args.threads)
    report = {"model": args.model, "threads": args.threads, "torch": torch.__version__, "decode": []}
    return report, torch.Generator().manual_seed(0)


def timed(fn, repeats):
    """Median seconds of `repeats` calls of `fn` (on a GPU, up to the end of its queued work)."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_row(report, batch, per_step, as_json):
    row = {"batch": batch, "tokens_per_s": batch / per_step, "step_ms": 1e3 * per_step}
    report["decode"].append(row)
    if not as_json:
        print(f"decode batch {batch:>3}: {row['tokens_per_s']:9.1f} tokens/s ({row['step_ms']:.1f} ms/step)", flush=True)


def prefill_row(report, tokens, seconds, as_json):
    report["prefill"] = {"tokens": tokens, "tokens_per_s": tokens / seconds, "seconds": seconds}
    if not as_json:
        print(f"prefill {tokens} tokens: {tokens / seconds:.1f} tokens/s ({seconds:.2f} s)")


def finish(report, as_json):
    """Adds the peak RSS (and, on a GPU, the peak of torch's device allocations) and prints
    the report."""
    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if torch.cuda.is_initialized():
        report["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(f"peak memory (RSS): {report['peak_rss_bytes'] / 2**20:.1f} MiB")
        if "peak_device_bytes" in report:
            print(f"peak device memory (torch's allocations): {report['peak_device_bytes'] / 2**20:.1f} MiB")
