#!/usr/bin/env python3
"""Writes the LMUFormer oracle fixtures under tests/fixtures/lmu/.

The LMUFormer reference (zeyuliu1037/LMUFormer @ 5debaddf) is not a package, so its modules are
rebuilt here in PyTorch from shared/SPEC-MODELS.md section 4, with the real packaged pieces:
scipy's `cont2discrete(method="zoh")` for the LMU matrices and spikingjelly 0.0.0.0.14's
`clock_driven.neuron.MultiStepLIFNode` (torch backend) for every spiking neuron. Module and
parameter names follow the reference, so the state dicts have its checkpoint names
(SPEC-MODELS.md 4.5). The forward is the reference's parallel form: the LMU memory by FFT
(128 frames, `fft_H` built with n = 256), LIF neurons multi-step along the frame axis.

Each fixture directory: checkpoint/ (config.json of SPEC-MODELS.md section 9 and
model.safetensors, or best_model.pth as the reference saves it), input.safetensors (`input`
[128, in_channels]) and expected.safetensors (`output` [128, classes] per frame before the
mean, `pooled` [classes], and for the spiking variant `spikes.<neuron>` [128, channels], the
spike train of every LIF neuron).

Spiking fixtures are only kept when no neuron's charged membrane lies within 2e-5 of its
threshold (re-seeded otherwise): a spike there would flip on a last-bit difference.

    .venv/bin/pip install -r tools/requirements.txt
    .venv/bin/python tools/gen_lmu_fixtures.py
"""

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn
from safetensors.torch import save_file
from scipy.signal import cont2discrete
from spikingjelly.clock_driven import functional
from spikingjelly.clock_driven.neuron import MultiStepLIFNode

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "lmu"
FRAMES = 128  # the reference's seq_len and theta
THETA = 128
# Smallest allowed distance of a charged membrane to its threshold in spiking fixtures: well
# above the ~1e-6 by which two correct f32 computations of a membrane can differ.
MARGIN = 2e-5


def lmu_matrices(d, theta):
    """Legendre delay system (SPEC 4.1), zero-order hold with dt = 1 in float64."""
    q = np.arange(d, dtype=np.float64).reshape(-1, 1)
    r = (2 * q + 1) / theta
    i, j = np.meshgrid(q, q, indexing="ij")
    a = r * np.where(i < j, -1, (-1.0) ** (i - j + 1))
    b = r * ((-1.0) ** q)
    a_d, b_d, *_ = cont2discrete((a, b, np.ones((1, d)), np.zeros((1,))), dt=1.0, method="zoh")
    return torch.from_numpy(a_d).float(), torch.from_numpy(b_d).float()


def lif(threshold=1.0):
    return MultiStepLIFNode(tau=2.0, v_threshold=threshold, detach_reset=True, backend="torch")


def over_frames(node, x):
    """A multi-step neuron along the frame axis of [B, C, N] (the reference permutes to [N, C, B])."""
    return node(x.permute(2, 1, 0).contiguous()).permute(2, 1, 0).contiguous()


class Cell(nn.Module):
    def __init__(self, dim, memory, spiking):
        super().__init__()
        self.spiking = spiking
        self.W_u = nn.Linear(dim, 1)
        self.W_h = nn.Linear(memory + dim, dim)
        a, b = lmu_matrices(memory, THETA)
        self.register_buffer("A", a)
        self.register_buffer("B", b)
        impulse, power = [], torch.eye(memory)
        for _ in range(FRAMES):
            impulse.append(power @ b)
            power = a @ power
        h = torch.cat(impulse, dim=-1)
        self.register_buffer("H", h)
        self.register_buffer("fft_H", torch.fft.rfft(h, n=2 * FRAMES, dim=-1))
        if spiking:
            self.bn_u, self.f_u = nn.BatchNorm1d(1), lif()
            self.bn_m, self.f_m = nn.BatchNorm1d(memory), lif()
            self.bn_h, self.f_h = nn.BatchNorm1d(dim), lif()

    def forward(self, x):  # [B, N, C] -> [B, N, dim]
        n = x.shape[1]
        if self.spiking:
            u = over_frames(self.f_u, self.bn_u(self.W_u(x).transpose(1, 2))).transpose(1, 2)
        else:
            u = torch.relu(self.W_u(x))
        spectrum = torch.fft.rfft(u.transpose(1, 2), n=2 * n, dim=-1) * self.fft_H.unsqueeze(0)
        m = torch.fft.irfft(spectrum, n=2 * n, dim=-1)[:, :, :n]  # [B, memory, N]
        if self.spiking:
            m = over_frames(self.f_m, self.bn_m(m))
        h = self.W_h(torch.cat((m.transpose(1, 2), x), dim=-1))
        if self.spiking:
            return over_frames(self.f_h, self.bn_h(h.transpose(1, 2))).transpose(1, 2)
        return torch.relu(h)


class Mixer(nn.Module):  # LMU / SLMUMs
    def __init__(self, dim, spiking):
        super().__init__()
        self.spiking = spiking
        if spiking:
            self.prev_bn, self.prev_lif = nn.BatchNorm1d(dim), lif(0.5)
        self.lmu = Cell(dim, 2 * dim if spiking else dim, spiking)
        self.proj_conv = nn.Conv1d(dim, dim, 1)
        self.proj_bn = nn.BatchNorm1d(dim)

    def forward(self, x):  # [B, C, N]
        if self.spiking:
            x = over_frames(self.prev_lif, self.prev_bn(x))
        h = self.lmu(x.transpose(1, 2)).transpose(1, 2)
        return self.proj_bn(self.proj_conv(h))


class Ffn(nn.Module):  # ConvFFN / ConvFFNMs
    def __init__(self, dim, hidden, spiking):
        super().__init__()
        self.spiking = spiking
        if spiking:
            self.fc1_bn, self.fc1_lif = nn.BatchNorm1d(dim), lif()
            self.fc1_conv = nn.Conv1d(dim, hidden, 1)
            self.fc2_bn, self.fc2_lif = nn.BatchNorm1d(hidden), lif()
            self.fc2_conv = nn.Conv1d(hidden, dim, 1)
        else:
            self.fc1_conv, self.fc1_bn = nn.Conv1d(dim, hidden, 1), nn.BatchNorm1d(hidden)
            self.fc2_conv, self.fc2_bn = nn.Conv1d(hidden, dim, 1), nn.BatchNorm1d(dim)

    def forward(self, x):
        if self.spiking:
            x = self.fc1_conv(over_frames(self.fc1_lif, self.fc1_bn(x)))
            return self.fc2_conv(over_frames(self.fc2_lif, self.fc2_bn(x)))
        x = nn.functional.gelu(self.fc1_bn(self.fc1_conv(x)))
        return torch.relu(self.fc2_bn(self.fc2_conv(x)))


class Block(nn.Module):
    def __init__(self, dim, mlp_ratio, spiking):
        super().__init__()
        self.attn = Mixer(dim, spiking)
        self.mlp = Ffn(dim, int(dim * mlp_ratio), spiking)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


def conv3(cin, cout):
    return nn.Conv1d(cin, cout, kernel_size=3, stride=1, padding=1, bias=False)


class Tokenizer(nn.Module):  # non-spiking patch embedding: (conv -> ReLU -> BN) x 4, + rpe_conv
    def __init__(self, cin, dim):
        super().__init__()
        chans = [cin, dim, dim, dim, dim]
        self.conv_layers = nn.Sequential(*[
            nn.Sequential(conv3(chans[i], chans[i + 1]), nn.ReLU(), nn.Identity(), nn.BatchNorm1d(chans[i + 1]))
            for i in range(4)
        ])
        self.rpe_conv = conv3(dim, dim)

    def forward(self, x):
        x = self.conv_layers(x)
        return x + self.rpe_conv(x)


class SpikingEmbed(nn.Module):  # Conv1d4EBMs
    def __init__(self, cin, dim):
        super().__init__()
        self.proj_conv, self.proj_bn, self.proj_lif = conv3(cin, dim), nn.BatchNorm1d(dim), lif()
        for i in (1, 2, 3):
            setattr(self, f"proj_conv{i}", conv3(dim, dim))
            setattr(self, f"proj_bn{i}", nn.BatchNorm1d(dim))
            setattr(self, f"proj_lif{i}", lif())
        self.rpe_conv = conv3(dim, dim)

    def forward(self, x):
        x = self.proj_conv(x)
        x = self.proj_conv1(over_frames(self.proj_lif, self.proj_bn(x)))
        x = self.proj_conv2(over_frames(self.proj_lif1, self.proj_bn1(x)))
        x = self.proj_conv3(over_frames(self.proj_lif2, self.proj_bn2(x)))
        return x + self.rpe_conv(over_frames(self.proj_lif3, self.proj_bn3(x)))


class LmuFormer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        spiking = cfg["variant"] == "slmu_rnn_ms_conv1d"
        self.spiking = spiking
        dim = cfg["dim"]
        self.patch_embed = (SpikingEmbed if spiking else Tokenizer)(cfg["in_channels"], dim)
        self.block = nn.ModuleList([Block(dim, cfg["mlp_ratio"], spiking) for _ in range(cfg["depths"])])
        if spiking:
            self.head_bn, self.head_lif = nn.BatchNorm1d(dim), lif()
        self.head = nn.Linear(dim, cfg["num_classes"])

    def forward(self, x):  # [B, N, C_in] -> per-frame [B, N, classes], pooled [B, classes]
        x = self.patch_embed(x.transpose(1, 2))
        for blk in self.block:
            x = blk(x)
        if self.spiking:
            x = over_frames(self.head_lif, self.head_bn(x))
        y = self.head(x.transpose(1, 2))
        return y, y.mean(dim=1)


def perturb(model, seed, spiking):
    """Random weights and BatchNorm statistics. Spiking models get BN affines that make the
    neurons fire at useful rates (a unit-variance input to a threshold-1 LIF rarely fires)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.BatchNorm1d):
                c = module.num_features
                module.running_mean.copy_(uniform(c, -0.3, 0.3))
                module.running_var.copy_(uniform(c, 0.5, 2.0))
                if spiking:
                    module.weight.copy_(uniform(c, 0.8, 2.5))
                    module.bias.copy_(uniform(c, 0.0, 1.2))
                else:
                    module.weight.copy_(uniform(c, 0.5, 1.5))
                    module.bias.copy_(uniform(c, -0.3, 0.3))
                module.num_batches_tracked.fill_(1000)
            elif isinstance(module, (nn.Conv1d, nn.Linear)):
                module.weight.add_(0.3 * module.weight.std() * torch.randn(module.weight.shape, generator=g))
                if module.bias is not None:
                    module.bias.copy_(uniform(module.bias.shape, -0.2, 0.2))


def lif_nodes(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MultiStepLIFNode)]


def run(model, features):
    """The reference forward; returns outputs, the spike train of every neuron and the smallest
    distance of a charged membrane to its threshold."""
    functional.reset_net(model)
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: inputs.__setitem__(name, (inp[0], out)))
             for name, m in lif_nodes(model)]
    with torch.no_grad():
        y, pooled = model(features.unsqueeze(0))
    for h in hooks:
        h.remove()
    spikes, margin = {}, float("inf")
    for name, node in lif_nodes(model):
        x_seq, out = inputs[name]  # [N, C, B=1]
        v = torch.zeros_like(x_seq[0])
        for t in range(x_seq.shape[0]):  # the charge of SPEC 4.3, to find near-threshold membranes
            h = v + (x_seq[t] - v) / node.tau
            margin = min(margin, float((h - node.v_threshold).abs().min()))
            s = (h >= node.v_threshold).float()
            v = h * (1 - s)
        spikes[name] = out[:, :, 0].contiguous()  # [N, C]
    return y[0], pooled[0], spikes, margin


def make(name, cfg, seed, prefix="", drop=(), pth=False, features=None, frontend=None):
    spiking = cfg["variant"] == "slmu_rnn_ms_conv1d"
    for attempt in range(50):
        torch.manual_seed(seed + 1000 * attempt)
        model = LmuFormer(cfg).eval()
        perturb(model, seed + 1000 * attempt, spiking)
        if features is None:
            features = 0.7 * torch.randn(FRAMES, cfg["in_channels"])
        y, pooled, spikes, margin = run(model, features)
        if not spiking or margin > MARGIN:
            break
    else:
        raise SystemExit(f"{name}: no seed without near-threshold membranes")
    out = ROOT / name
    shutil.rmtree(out, ignore_errors=True)
    (out / "checkpoint").mkdir(parents=True)
    config = {"model_type": "lmuformer", "theta": THETA, "seq_len": FRAMES, "lif_tau": 2.0,
              "lif_threshold": 1.0, **cfg}
    if frontend is not None:
        config["frontend"] = frontend
    (out / "checkpoint" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {prefix + k: v.contiguous() for k, v in model.state_dict().items()
             if not any(k.endswith(d) for d in drop)}
    if pth:
        torch.save(state, out / "checkpoint" / "best_model.pth")
    else:
        # safetensors has no complex dtype: fft_H (derived, never needed) stays out.
        save_file({k: v for k, v in state.items() if not k.endswith("fft_H")}, out / "checkpoint" / "model.safetensors")
    save_file({"input": features.contiguous()}, out / "input.safetensors")
    expected = {"output": y.contiguous(), "pooled": pooled.contiguous()}
    expected.update({f"spikes.{k}": v for k, v in spikes.items()})
    save_file(expected, out / "expected.safetensors")
    rates = [float(v.mean()) for v in spikes.values()]
    note = f", {len(spikes)} neurons, firing rate {min(rates):.2f}..{max(rates):.2f}, margin {margin:.1e}" if spiking else ""
    print(f"{name}: output {tuple(y.shape)}{note}")


def main():
    base = {"mlp_ratio": 4}
    make("lmu_d32_c16", {**base, "variant": "lmu_rnn_conv1d", "dim": 32, "in_channels": 16,
                         "num_classes": 5, "depths": 1}, seed=1)
    make("lmu_d48_c20_depth2_prefixed", {"variant": "lmu_rnn_conv1d", "dim": 48, "in_channels": 20,
                                         "num_classes": 7, "depths": 2, "mlp_ratio": 2},
         seed=2, prefix="module.", drop=("lmu.A", "lmu.B", "lmu.H", "lmu.fft_H"))
    make("slmu_d32_c16", {**base, "variant": "slmu_rnn_ms_conv1d", "dim": 32, "in_channels": 16,
                          "num_classes": 5, "depths": 1}, seed=3)
    make("slmu_d40_c24_depth2_prefixed", {"variant": "slmu_rnn_ms_conv1d", "dim": 40, "in_channels": 24,
                                          "num_classes": 6, "depths": 2, "mlp_ratio": 2},
         seed=4, prefix="module.", drop=("lmu.H", "lmu.fft_H"))
    make("slmu_d32_c16_pth", {**base, "variant": "slmu_rnn_ms_conv1d", "dim": 32, "in_channels": 16,
                              "num_classes": 5, "depths": 1}, seed=5, prefix="module.", pth=True)
    make("lmu_d32_c16_pth", {**base, "variant": "lmu_rnn_conv1d", "dim": 32, "in_channels": 16,
                             "num_classes": 5, "depths": 1}, seed=6, prefix="module.", pth=True)


    # An LMUFormer with the audio front end of SPEC-MODELS.md section 9, on the features that
    # torchaudio computes for tests/fixtures/audio/chirp_16k_s16.wav (tools/gen_audio_fixtures.py;
    # 128 frames, the reference's clip length).
    from safetensors.torch import load_file
    audio = ROOT.parent / "audio" / "chirp_16k_s16.features.safetensors"
    features = load_file(audio)["normalised"]
    frontend = {"kind": "kaldi_fbank", "sample_rate": 16000, "num_mel_bins": 128, "frame_length_ms": 25.0,
                "frame_shift_ms": 10.0, "window": "hanning", "htk_compat": True, "use_energy": False,
                "dither": 0.0, "remove_mean": True, "norm_mean": -6.845978, "norm_std": 5.5654526}
    make("lmu_d16_c128_frontend", {**base, "variant": "lmu_rnn_conv1d", "dim": 16, "in_channels": 128,
                                   "num_classes": 4, "depths": 1}, seed=7, features=features, frontend=frontend)


if __name__ == "__main__":
    main()
