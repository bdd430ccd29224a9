#!/usr/bin/env python3
"""Writes the greedy-generation reference outputs under tests/fixtures/generation/: for each model
(the trained models under models/ and random fixtures under tests/fixtures/), a prompt and the
200 tokens that the reference implementation makes greedily: HF transformers'
MambaForCausalLM.generate for Mamba; for GLA, flash-linear-attention's GLAForCausalLM stepped with
its own Cache one token at a time (its kernels under the Triton interpreter on CPU, attn_mode
fused_recurrent: the same math as its chunk kernels, which fail in the interpreter;
shared/SPEC-MODELS.md section 8). fla 0.6.0's own `generate` under transformers 5.24 does not
carry its cache from step to step (transformers warns "past_key_values/cache_params are
deprecated"): on gla_basic its third token already differs from what fla's forward makes on the
same prefix, so the loop is written out here (the same greedy loop `generate` runs). No end
token stops them (eos_token_id None): Tideway's side runs with --ignore-eos.

Every case is checked against the reference's forward over the whole sequence: teacher-forced
on prompt + tokens, its argmax at each step must be the token made (a tie excepted).

For the trained models it also writes NAME.logits.safetensors: 300 tokens of held-out text
(input_ids) and the reference's logits for them in one forward (logits), so that a test can check
that Tideway loads the committed checkpoints as the reference does.

For every step the file records the gap between the two largest logits and the logits' scale
(the largest magnitude): a comparison may stop early only at a step whose gap is below 1e-4 of
the scale (two tokens tied within float error), and must say so.

    .venv/bin/pip install -r tools/requirements.txt flash-linear-attention==0.6.0
    .venv/bin/python tools/gen_generation_fixtures.py [NAME ...]     (default: every case)
"""

import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
import triton.runtime.autotuner as autotuner  # noqa: E402

autotuner.Autotuner._bench = lambda self, *args, **kwargs: [1.0, 1.0, 1.0]

import torch  # noqa: E402
from transformers import AutoConfig, GenerationConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "generation"
NEW_TOKENS = 200

# (fixture name, model directory relative to the repository, family, prompt: text or ids)
CASES = [
    ("shakespeare_mamba", "models/shakespeare-mamba", "mamba", "ROMEO:\nBut soft, what light"),
    ("shakespeare_gla", "models/shakespeare-gla", "gla", "ROMEO:\nBut soft, what light"),
    ("mamba_odd_tied", "tests/fixtures/mamba/hf_odd_tied", "mamba", 7),
    ("mamba_bias_untied_k2", "tests/fixtures/mamba/hf_bias_untied_k2", "mamba", 11),
    ("gla_basic", "tests/fixtures/fla/gla_basic", "gla", 13),
    ("gla_conv_no_gate", "tests/fixtures/fla/gla_conv_no_gate", "gla", 17),
]


def load(family: str, path: Path):
    if family == "mamba":
        from transformers import MambaForCausalLM
        return MambaForCausalLM.from_pretrained(path)
    from fla.models import GLAForCausalLM  # noqa: F401  (registers the fla classes)
    config = AutoConfig.from_pretrained(path)
    config.attn_mode = "fused_recurrent"
    return GLAForCausalLM.from_pretrained(path, config=config)


def hf_generate(model, ids):
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=0, do_sample=False, num_beams=1,
                              eos_token_id=None, pad_token_id=0, use_cache=True)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), generation_config=config, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), [step[0].float() for step in out.logits]


def cached_loop(model, ids):
    """Greedy: the prompt in one forward, then one token at a time with the model's Cache."""
    tokens, rows = [], []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        for _ in range(NEW_TOKENS):
            row = out.logits[0, -1].float()
            rows.append(row)
            tokens.append(int(row.argmax()))
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values,
                        use_cache=True)
    return tokens, rows


def prompt_ids(prompt, path: Path, vocab: int) -> list[int]:
    if isinstance(prompt, str):
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(path / "tokenizer.json")).encode(prompt).ids
    g = torch.Generator().manual_seed(prompt)
    return torch.randint(0, vocab, (20,), generator=g).tolist()


def write_logits(name: str, model, path: Path):
    """Held-out text (the validation plays) through one forward of the reference."""
    import sys as _sys
    _sys.path.insert(0, str(ROOT / "tools" / "train_lm"))
    import corpus
    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    _, valid, _ = corpus.load(ROOT / "target" / "corpus")
    ids = Tokenizer.from_file(str(path / "tokenizer.json")).encode(valid[:4000]).ids[:300]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    save_file({"input_ids": torch.tensor(ids, dtype=torch.int64), "logits": logits.contiguous()},
              OUT / f"{name}.logits.safetensors")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, rel, family, prompt in CASES:
        if sys.argv[1:] and name not in sys.argv[1:]:
            continue
        path = ROOT / rel
        model = load(family, path).eval()
        ids = prompt_ids(prompt, path, model.config.vocab_size)
        tokens, rows = (hf_generate if family == "mamba" else cached_loop)(model, ids)
        gaps, scales = [], []
        for row in rows:
            top2 = torch.topk(row, 2).values
            gaps.append(float(top2[0] - top2[1]))
            scales.append(float(row.abs().max()))
        with torch.no_grad():
            whole = model(input_ids=torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1].float()
        for i, (t, row) in enumerate(zip(tokens, whole)):
            assert int(row.argmax()) == t or gaps[i] < 1e-4 * scales[i], (name, i, "forward disagrees")
        assert len(tokens) == NEW_TOKENS, (name, len(tokens))
        record = {"model": rel, "family": family, "prompt_ids": ids, "tokens": tokens, "top2_gap": gaps,
                  "logit_scale": scales, "reference": "transformers MambaForCausalLM.generate" if family == "mamba"
                  else "fla GLAForCausalLM forward with its Cache, one token a step (fused_recurrent, "
                       "Triton interpreter)"}
        if isinstance(prompt, str):
            record["prompt"] = prompt
            write_logits(name, model, path)
        (OUT / f"{name}.json").write_text(json.dumps(record) + "\n")
        small = min(g / s for g, s in zip(gaps, scales))
        print(f"{name}: {len(ids)} prompt ids, {len(tokens)} tokens, smallest gap/scale {small:.2e}", flush=True)


if __name__ == "__main__":
    main()
