#!/usr/bin/env python3
"""The keyword spotter's held-out clips with frame pruning, in PyTorch (issue 19): rebuilds the
1920 voice-disjoint clips as tools/train_kws/train.py does (dataset.build of the held-out
variants, seed 2; espeak-ng synthesises them), runs the trained model (models/kws) on them
through the reference modules (tools/gen_lmu_fixtures.py) with the frame gate of
../shared/SPEC-MODELS.md section 6.3 at each setting of a sweep, and writes target/kws-heldout/:
the clips as WAV files, labels.json (label and ungated PyTorch prediction per clip, as
train.py writes it) and gate.json (per setting: accuracy, frames kept, and per clip the
prediction and the keep mask), for `cargo run --release -p tideway-operators --example
kws_eval -- --gate-sweep`.

The gate (as operators/src/prune/frames.rs states it, here in float64 on the kaldi-native-fbank
features the model was trained on): a frame whose mean is below the quiet floor, or whose
cosine with the last kept frame is at least the similarity, is skipped; the first frame that
is not quiet is kept. A skipped frame goes through the patch embedding; after it, every LIF
neuron's input is multiplied by the keep mask (its membrane decays, and the LMU's u is 0), and
the clip's scores are the mean of the head's output over the kept frames.

With `--tideway-features`, the same sweep on the features Tideway's own front end computed
for the clips (`kws_eval --dump-features` writes them): gate_tideway.json, which compares the
policy alone, without the two front ends' differences.

    .venv/bin/pip install -r tools/requirements.txt kaldi-native-fbank   # and espeak-ng (apt)
    .venv/bin/python tools/train_kws/heldout_gate.py
    cargo run --release -p tideway-operators --example kws_eval -- --dump-features
    .venv/bin/python tools/train_kws/heldout_gate.py --tideway-features
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from spikingjelly.clock_driven import functional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tools"))
import dataset  # noqa: E402
import gen_lmu_fixtures as ref  # noqa: E402
from train import CONFIG, features, write_wav  # noqa: E402

# (similarity, quiet floor) settings of the sweep; None: off.
SWEEP = [
    (0.99, None), (0.98, None), (0.97, None), (0.96, None), (0.95, None), (0.93, None),
    (0.90, None), (0.85, None), (0.99, -0.3), (0.98, -0.3), (0.97, -0.3), (0.98, -0.2),
    (0.97, -0.2),
]


def gate_masks(feats, similarity, quiet_below):
    """Keep masks [clips, frames] of the gate over float64 features [clips, frames, mel]."""
    feats = feats.astype(np.float64)
    masks = np.zeros(feats.shape[:2], dtype=bool)
    for c, clip in enumerate(feats):
        last = None
        for t, f in enumerate(clip):
            if quiet_below is not None and f.mean() < quiet_below:
                continue
            if last is not None:
                norms = np.linalg.norm(f) * np.linalg.norm(last)
                cos = 0.0 if norms == 0 else float(f @ last / norms)
                if cos >= similarity:
                    continue
            last = f
            masks[c, t] = True
    return masks


def gated_predictions(model, feats, masks, batch=128):
    preds = []
    nodes = [m for n, m in ref.lif_nodes(model) if not n.startswith("patch_embed.")]
    for i in range(0, len(feats), batch):
        keep = torch.from_numpy(masks[i:i + batch].astype(np.float32))  # [B, N]
        gate = keep.T[:, None, :]  # LIF input [N, C, B]
        hooks = [node.register_forward_pre_hook(lambda m, args: (args[0] * gate,)) for node in nodes]
        functional.reset_net(model)
        with torch.no_grad():
            y, _ = model(feats[i:i + batch])
        for h in hooks:
            h.remove()
        pooled = (y * keep[:, :, None]).sum(dim=1) / keep.sum(dim=1, keepdim=True).clamp(min=1)
        preds.append(pooled.argmax(dim=1))
    return torch.cat(preds)


def load_model():
    model = ref.LmuFormer(CONFIG).eval()
    state = load_file(ROOT / "models" / "kws" / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("fft_H") for k in missing), (missing, unexpected)
    return model


def sweep(model, feats, labels):
    settings = []
    for similarity, quiet in SWEEP:
        masks = gate_masks(feats.numpy(), similarity, quiet)
        preds = gated_predictions(model, feats, masks)
        acc = float((preds == labels).float().mean())
        kept = float(masks.mean())
        print(f"similarity {similarity}, quiet {quiet}: accuracy {100 * acc:.2f}%, frames kept {100 * kept:.1f}%", flush=True)
        settings.append({
            "similarity": similarity, "quiet_below": quiet, "torch_accuracy": acc, "kept_fraction": kept,
            "clips": [{"prediction": int(p), "mask": "".join("1" if k else "0" for k in m)}
                      for p, m in zip(preds.tolist(), masks)],
        })
    return {"settings": settings}


def on_tideway_features(out):
    labels = json.loads((out / "labels.json").read_text())
    y = torch.tensor([c["label"] for c in labels["clips"]])
    feats = load_file(out / "tideway_features.safetensors")["features"]
    print(f"Tideway's features {tuple(feats.shape)}", flush=True)
    (out / "gate_tideway.json").write_text(json.dumps(sweep(load_model(), feats, y)) + "\n")
    print(f"wrote {out / 'gate_tideway.json'}")


def main():
    torch.set_num_threads(2)
    out = Path(os.environ.get("KWS_HELDOUT", ROOT / "target" / "kws-heldout"))
    if "--tideway-features" in sys.argv:
        on_tideway_features(out)
        return
    started = time.time()
    _, test_variants = dataset.split_variants()
    x_test, y_test = dataset.build(test_variants, 1, seed=2)
    feats = features(x_test)
    print(f"{len(x_test)} held-out clips, features {tuple(feats.shape)}, {time.time() - started:.0f} s", flush=True)
    model = load_model()
    labels = torch.from_numpy(y_test)
    everything = np.ones(feats.shape[:2], dtype=bool)
    plain = gated_predictions(model, feats, everything)
    plain_acc = float((plain == labels).float().mean())
    print(f"no pruning: accuracy {100 * plain_acc:.2f}%", flush=True)
    means = feats.numpy().mean(axis=2)
    print("frame means, percentiles 5/25/50/75/95:", np.percentile(means, [5, 25, 50, 75, 95]).round(3).tolist())

    out.mkdir(parents=True, exist_ok=True)
    items = []
    for i, (clip, label, pred) in enumerate(zip(x_test, y_test, plain.tolist())):
        name = f"{i:05d}.wav"
        write_wav(out / name, clip)
        items.append({"file": name, "label": int(label), "torch_prediction": int(pred)})
    (out / "labels.json").write_text(json.dumps({"classes": dataset.CLASSES, "torch_accuracy": plain_acc,
                                                 "clips": items}) + "\n")
    (out / "gate.json").write_text(json.dumps(sweep(model, feats, labels)) + "\n")
    print(f"wrote {out}, {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
