"""A prompt to its first token through HF transformers' generate, the peer of `tideway
generate`'s prompt (BENCHMARKS.md, "After: a prompt's last row of logits alone").

    .venv/bin/python bench/hf_prompt.py MODEL_DIR TOKENS

The prompt is TOKENS ids (i * 7 + 3) % 50000, as the Tideway side's `--tokens`; 2 threads, f32,
after a 16-token warm-up. Prints the seconds and the first generated token.
"""
import sys
import time

import torch
from transformers import MambaForCausalLM

torch.set_num_threads(2)
n = int(sys.argv[2])
model = MambaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.tensor([[(i * 7 + 3) % 50000 for i in range(n)]])
with torch.inference_mode():
    model.generate(ids[:, :16], max_new_tokens=1, do_sample=False)
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=1, do_sample=False)
    print(f"{time.perf_counter() - start:.3f} {out[0, -1].item()}")
