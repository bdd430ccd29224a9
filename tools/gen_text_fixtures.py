#!/usr/bin/env python3
"""Writes the text tokenizer fixtures under tests/fixtures/text/ with the Python `tokenizers`
package (the reference for the Rust crate of the same name):

- two tokenizers trained on a few KB of text with unicode, emoji and whitespace runs: a
  byte-level BPE (GPT-2 style pre-tokenizer and decoder) and a WordPiece with BERT's
  normaliser (lowercase, accents stripped) and pre-tokenizer;
- cases.json: texts and, per tokenizer, the ids `encode(text, add_special_tokens=False)` gives
  and the text `decode(ids)` gives back;
- mamba_bpe/: a tiny HF transformers Mamba whose vocabulary is the BPE tokenizer's, with its
  tokenizer.json beside it and HF's logits for the ids of one text (`tideway run --text`).

    .venv/bin/pip install -r tools/requirements.txt
    .venv/bin/python tools/gen_text_fixtures.py
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import MambaConfig, MambaForCausalLM

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "text"

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Streams of sensor data arrive every ten milliseconds.",
    "Linear-time sequence models keep a constant-size state per stream: Mamba, GLA, DeltaNet, LMUFormer.",
    "Grüße aus Zürich! Ça va? Señor Muñoz llegó mañana. Ελληνικά κείμενα και русский текст тоже.",
    "日本語のテキストも少し。中文文本也有一些。한국어 문장도 있습니다.",
    "Emoji: 🚀🔥 👩‍💻 🇨🇭 ✔️ — and   runs   of\tspaces,\ttabs\n\nand newlines.",
    "Numbers 3.14159, 2,718, 1e-4, 0x1F600; code: fn main() { println!(\"hi\"); }",
    "don't can't won't it's we're they'll I'd you've — contractions everywhere.",
] * 12

CASES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing   ",
    "Grüße aus Zürich! Ça va? naïve café",
    "日本語と中文と한국어",
    "Emoji 🚀🔥👩‍💻🇨🇭 mixed with text",
    "tabs\tand\nnewlines\n\n\nand   runs    of     spaces",
    "don't stop; it's 3.14159 or 1e-4",
    "unseenwordsxyzzy qwertyuiop",
    "",
]


def bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def wordpiece():
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[PAD]"])
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def main():
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    tokenizers = {"bpe": bpe(), "wordpiece": wordpiece()}
    cases = []
    for text in CASES:
        entry = {"text": text}
        for name, tok in tokenizers.items():
            ids = tok.encode(text, add_special_tokens=False).ids
            entry[name] = {"ids": ids, "decoded": tok.decode(ids)}
        cases.append(entry)
    for name, tok in tokenizers.items():
        tok.save(str(ROOT / f"{name}.tokenizer.json"))
        print(f"{name}: vocabulary {tok.get_vocab_size()}")
    (ROOT / "cases.json").write_text(json.dumps(cases, ensure_ascii=False, indent=1) + "\n")

    # A tiny Mamba over the BPE vocabulary, with HF's logits for one text.
    torch.manual_seed(11)
    vocab = tokenizers["bpe"].get_vocab_size()
    config = MambaConfig(vocab_size=vocab, hidden_size=24, state_size=8, num_hidden_layers=2,
                         conv_kernel=4, expand=2, time_step_rank=4, tie_word_embeddings=True)
    model = MambaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    out = ROOT / "mamba_bpe"
    model.save_pretrained(out)
    tokenizers["bpe"].save(str(out / "tokenizer.json"))
    text = "Streams of sensor data: Grüße 🚀 don't stop!"
    ids = tokenizers["bpe"].encode(text, add_special_tokens=False).ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    save_file({"input_ids": torch.tensor(ids, dtype=torch.int64), "logits": logits.contiguous()},
              ROOT / "mamba_bpe.expected.safetensors")
    (ROOT / "mamba_bpe.text.txt").write_text(text)
    print(f"mamba_bpe: {len(ids)} tokens")


if __name__ == "__main__":
    main()
