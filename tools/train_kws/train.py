#!/usr/bin/env python3
"""Trains Tideway's default model: a spiking LMUFormer keyword spotter (12 classes: yes, no,
up, down, left, right, on, off, stop, go, unknown, silence) on clips synthesised with espeak-ng
(tools/train_kws/dataset.py), on CPU, from the reference modules used for the fixtures
(tools/gen_lmu_fixtures.py: spikingjelly LIF neurons, scipy ZOH). Features: Kaldi fbank by
kaldi-native-fbank, 80 mel bins, normalised as the LMUFormer front end.

    .venv/bin/pip install -r tools/requirements.txt kaldi-native-fbank
    .venv/bin/python tools/train_kws/train.py            # ~20 min on 2 cores

Writes models/kws/ (config.json with the audio front end, model.safetensors, MODEL_CARD.md)
and target/kws-heldout/ (the voice-disjoint test clips as WAV files with their labels and the
PyTorch predictions, for `cargo run --release -p tideway-operators --example kws_eval`).
"""

import json
import os
import sys
import time
import wave
from pathlib import Path

import numpy as np
import torch
import kaldi_native_fbank as knf
from safetensors.torch import save_file
from spikingjelly.clock_driven import functional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tools"))
import dataset  # noqa: E402
from gen_lmu_fixtures import FRAMES, THETA, LmuFormer  # noqa: E402

MEL = 80
NORM_MEAN, NORM_STD = -6.845978, 5.5654526
CONFIG = {"variant": "slmu_rnn_ms_conv1d", "dim": 64, "in_channels": MEL, "num_classes": len(dataset.CLASSES),
          "depths": 1, "mlp_ratio": 2}
FRONTEND = {"kind": "kaldi_fbank", "sample_rate": 16000, "num_mel_bins": MEL, "frame_length_ms": 25.0,
            "frame_shift_ms": 10.0, "window": "hanning", "htk_compat": True, "use_energy": False,
            "dither": 0.0, "remove_mean": True, "norm_mean": NORM_MEAN, "norm_std": NORM_STD}
BUDGET_S = 25 * 60
EPOCHS = 24


def fbank(clip):
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = "hanning"
    opts.mel_opts.num_bins = MEL
    opts.use_energy = False
    opts.htk_compat = True
    online = knf.OnlineFbank(opts)
    online.accept_waveform(16000, (clip - clip.mean()).tolist())
    online.input_finished()
    feats = np.array([online.get_frame(i) for i in range(online.num_frames_ready)], dtype=np.float32)
    return (feats - NORM_MEAN) / (2 * NORM_STD)


def features(x):
    return torch.from_numpy(np.stack([fbank(c) for c in x]))


def evaluate(model, x, y, batch=256):
    model.eval()
    correct, preds = 0, []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            functional.reset_net(model)
            _, pooled = model(x[i:i + batch])
            p = pooled.argmax(dim=1)
            preds.append(p)
            correct += int((p == y[i:i + batch]).sum())
    return correct / len(x), torch.cat(preds)


def write_wav(path, clip):
    pcm = np.clip(np.round(clip * 32768), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    started = time.time()
    train_variants, test_variants = dataset.split_variants()
    x_train, y_train = dataset.build(train_variants, 1, seed=1)
    x_test, y_test = dataset.build(test_variants, 1, seed=2)
    print(f"data: {len(x_train)} train clips ({len(train_variants)} variants x {len(dataset.ACCENTS)} accents), "
          f"{len(x_test)} held-out clips ({len(test_variants)} other variants), {time.time() - started:.0f} s", flush=True)
    f_train, f_test = features(x_train), features(x_test)
    assert f_train.shape[1] == FRAMES, f_train.shape
    y_train_t, y_test_t = torch.from_numpy(y_train), torch.from_numpy(y_test)
    print(f"features: {tuple(f_train.shape)}, {time.time() - started:.0f} s", flush=True)

    model = LmuFormer(CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    epochs, batch = EPOCHS, 64
    steps = epochs * ((len(f_train) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(f_train))
        total = 0.0
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            functional.reset_net(model)
            _, pooled = model(f_train[idx])
            loss = loss_fn(pooled, y_train_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        acc, _ = evaluate(model, f_test, y_test_t)
        elapsed = time.time() - started
        print(f"epoch {epoch + 1}: loss {total / len(f_train):.3f}, held-out accuracy {100 * acc:.2f}%, {elapsed:.0f} s", flush=True)
        if elapsed > BUDGET_S:
            print("time budget reached", flush=True)
            break
    acc, preds = evaluate(model, f_test, y_test_t)

    out = Path(os.environ.get("KWS_OUT", ROOT / "models" / "kws"))
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "lmuformer", "theta": THETA, "seq_len": FRAMES, "lif_tau": 2.0, "lif_threshold": 1.0,
              **CONFIG, "frontend": FRONTEND, "labels": dataset.CLASSES}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("fft_H")}
    save_file(state, out / "model.safetensors")
    size = (out / "model.safetensors").stat().st_size
    heldout = Path(os.environ.get("KWS_HELDOUT", ROOT / "target" / "kws-heldout"))
    heldout.mkdir(parents=True, exist_ok=True)
    items = []
    for i, (clip, label, pred) in enumerate(zip(x_test, y_test, preds.tolist())):
        name = f"{i:05d}.wav"
        write_wav(heldout / name, clip)
        items.append({"file": name, "label": int(label), "torch_prediction": int(pred)})
    (heldout / "labels.json").write_text(json.dumps({"classes": dataset.CLASSES, "torch_accuracy": acc,
                                                       "clips": items}) + "\n")
    minutes = (time.time() - started) / 60
    card = f"""# kws: Tideway's default model

A spiking LMUFormer (`slmu_rnn_ms_conv1d`, dim {CONFIG['dim']}, 1 block, mlp_ratio {CONFIG['mlp_ratio']},
{CONFIG['in_channels']} mel bins) that spots 10 keywords ({', '.join(dataset.KEYWORDS)}) and tells
other words ("_unknown_") and silence apart: 12 classes.

- Data: {len(x_train)} training clips synthesised with espeak-ng: {len(dataset.ACCENTS)} English accents x
  {len(train_variants)} voice variants, random speed (110-210 wpm) and pitch (20-80), the word at a
  random offset of a 1.3 s clip, gain 0.3-1.0, Gaussian noise (sigma 0.0005-0.02). Unknown words:
  {len(dataset.UNKNOWN)} others. Held out: {len(x_test)} clips from {len(test_variants)} voice variants
  that never appear in training ({', '.join(test_variants)}).
- Front end: Kaldi fbank, 25 ms / 10 ms, hanning, {MEL} mel bins, normalised as the LMUFormer's
  (the `frontend` block of config.json), computed by kaldi-native-fbank for training.
- Training: `.venv/bin/python tools/train_kws/train.py` (PyTorch {torch.__version__} on CPU, 2 threads,
  AdamW, one-cycle lr 3e-3, batch {batch}, label smoothing 0.05, {minutes:.1f} minutes).
- Held-out accuracy (PyTorch, voice-disjoint): **{100 * acc:.2f}%** on the 12 classes.
- Through Tideway's Rust pipeline (WAV -> features -> model):
  `cargo run --release -p tideway-operators --example kws_eval` (see BENCHMARKS.md).
- Size: {size / 1024:.0f} KiB of f32 weights ({sum(v.numel() for v in state.values())} values).
- Not trained on human speech: it knows espeak-ng's voices. Expect it to work on synthetic speech
  and to be a demonstration, not a production keyword spotter.
"""
    (out / "MODEL_CARD.md").write_text(card)
    print(f"held-out accuracy {100 * acc:.2f}%, wrote {out} ({size / 1024:.0f} KiB) in {minutes:.1f} min", flush=True)


if __name__ == "__main__":
    main()
