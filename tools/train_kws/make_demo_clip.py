#!/usr/bin/env python3
"""The bundled demo clip, models/kws/demo.wav: a few seconds of speech synthesised like the
training data but with a held-out voice, keywords among other words, with background noise.
models/kws/demo.json lists the keywords it contains, in order.

    .venv/bin/python tools/train_kws/make_demo_clip.py
"""

import json
import random
import sys
import wave
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
import dataset  # noqa: E402

# (word, is it a keyword); words are spoken one by one with pauses, as commands are. The other
# words are from the training set's "unknown" list.
SCRIPT = [("marvin", False), ("go", True), ("forward", False), ("left", True), ("table", False),
          ("stop", True), ("water", False), ("yes", True), ("window", False), ("off", True)]
# A voice variant held out of training (tools/train_kws/dataset.py splits by variant).
VOICE = "en-gb+m6"


def main():
    rng = random.Random(5)
    _, held_out = dataset.split_variants()
    assert VOICE.split("+")[1] in held_out, "the demo voice must be held out of training"
    voice = VOICE
    pieces = [np.zeros(4000, dtype=np.float32)]
    for word, _ in SCRIPT:
        pieces.append(dataset.speak(word, voice, 150, 50) * 0.8)
        pieces.append(np.zeros(rng.randint(6000, 10000), dtype=np.float32))
    clip = np.concatenate(pieces)
    clip += np.random.default_rng(5).normal(0, 0.003, len(clip)).astype(np.float32)
    out = ROOT / "models" / "kws"
    out.mkdir(parents=True, exist_ok=True)
    pcm = np.clip(np.round(clip * 32768), -32768, 32767).astype("<i2")
    with wave.open(str(out / "demo.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    keywords = [w for w, k in SCRIPT if k]
    (out / "demo.json").write_text(json.dumps({"voice": voice, "text": " ".join(w for w, _ in SCRIPT),
                                               "keywords": keywords}, indent=1) + "\n")
    print(f"{out / 'demo.wav'}: {len(clip) / 16000:.2f} s, voice {voice}, keywords {keywords}")


if __name__ == "__main__":
    main()
