"""Keyword-spotting clips synthesised with espeak-ng (no download): 10 keywords, "unknown"
words and silence, across espeak-ng's English accents x voice variants, speeds and pitches,
with noise and gain, 16 kHz, 1.3 s (128 fbank frames, the LMUFormer's clip length); half of
the spoken clips also hold a neighbouring non-keyword word, as windows over running speech do. The split
is by voice: variants of the held-out list never appear in training.
"""

import io
import random
import subprocess
import wave
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

KEYWORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
CLASSES = KEYWORDS + ["_unknown_", "_silence_"]
UNKNOWN = ["cat", "house", "seven", "bird", "happy", "tree", "wow", "learn", "follow", "forward",
           "visual", "dog", "bed", "three", "zero", "marvin", "sheila", "table", "water", "green",
           "morning", "number", "people", "little", "under", "over", "open", "begin", "yellow", "window"]
ACCENTS = ["en-gb", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
RATE = 16000
CLIP = 20800  # 1.3 s: 1 + (20800 - 400) / 160 = 128 frames


def variants():
    root = Path("/usr/lib/x86_64-linux-gnu/espeak-ng-data/voices/!v")
    names = sorted(p.name for p in root.iterdir() if p.is_file())
    return names


def split_variants(seed=0):
    names = variants()
    rng = random.Random(seed)
    rng.shuffle(names)
    held = max(4, len(names) // 5)
    return sorted(names[held:]), sorted(names[:held])


def speak(text, voice, speed, pitch):
    """espeak-ng to mono float32 at 16 kHz."""
    out = subprocess.run(["espeak-ng", "--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch), text],
                         check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(out)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    if rate != RATE:
        g = np.gcd(rate, RATE)
        pcm = resample_poly(pcm, RATE // g, rate // g).astype(np.float32)
    # Trim espeak's leading/trailing silence.
    loud = np.nonzero(np.abs(pcm) > 0.01)[0]
    return pcm[loud[0]:loud[-1] + 1] if len(loud) else pcm


def place(word, rng, length=CLIP, context=None):
    """The word at a random offset in a clip of background noise, with random gain; with a
    `context` word (another, non-keyword word), before or after it, as a sliding window over
    running speech sees its neighbours."""
    clip = np.zeros(length, dtype=np.float32)
    if word is not None:
        word = word[:length] * rng.uniform(0.3, 1.0)
        start = rng.randint(0, length - len(word))
        clip[start:start + len(word)] = word
        if context is not None:
            context = context * rng.uniform(0.3, 1.0)
            gap = rng.randint(1600, 6400)
            if rng.random() < 0.5:
                end = start - gap
                if end > 0:
                    piece = context[max(0, len(context) - end):]
                    clip[end - len(piece):end] += piece
            else:
                begin = start + len(word) + gap
                if begin < length:
                    piece = context[:length - begin]
                    clip[begin:begin + len(piece)] += piece
    noise = rng.choice([0.0005, 0.002, 0.005, 0.01, 0.02])
    clip += np.random.default_rng(rng.randint(0, 1 << 30)).normal(0, noise, length).astype(np.float32)
    return np.clip(clip, -1, 1)


def make_clip(job):
    label, text, voice, speed, pitch, seed = job
    rng = random.Random(seed)
    word = None if text is None else speak(text, voice, speed, pitch)
    context = None
    if text is not None and rng.random() < 0.5:
        context = speak(rng.choice([u for u in UNKNOWN if u != text]), voice, speed, pitch)
    return place(word, rng, context=context), CLASSES.index(label)


def jobs(variant_names, per_voice, seed):
    rng = random.Random(seed)
    out = []
    for accent in ACCENTS:
        for variant in variant_names:
            voice = f"{accent}+{variant}"
            for _ in range(per_voice):
                speed, pitch = rng.randint(110, 210), rng.randint(20, 80)
                for kw in KEYWORDS:
                    out.append((kw, kw, voice, speed, pitch, rng.randint(0, 1 << 30)))
                out.append(("_unknown_", rng.choice(UNKNOWN), voice, speed, pitch, rng.randint(0, 1 << 30)))
                out.append(("_silence_", None, voice, speed, pitch, rng.randint(0, 1 << 30)))
    return out


def build(variant_names, per_voice, seed, processes=2):
    with Pool(processes) as pool:
        clips = pool.map(make_clip, jobs(variant_names, per_voice, seed), chunksize=32)
    x = np.stack([c for c, _ in clips])
    y = np.array([l for _, l in clips], dtype=np.int64)
    return x, y
