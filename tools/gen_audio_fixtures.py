#!/usr/bin/env python3
"""Writes the audio front-end fixtures under tests/fixtures/audio/: WAV files in several
encodings, and for each the Kaldi fbank features of its samples computed by the two references,
`kaldi-native-fbank` and `torchaudio.compliance.kaldi.fbank`, with the options of the LMUFormer
front end (shared/SPEC-MODELS.md 4.4 and 9: 25 ms / 10 ms, hanning, no dither, no energy,
htk_compat, waveform mean removed first, 128 mel bins), and the normalised features
`(fbank + 6.845978) / (2 * 5.5654526)` the model sees.

torchaudio 2.11 needs torch 2.11, so this runs in its own venv:

    python3 -m venv .venv-audio
    .venv-audio/bin/pip install torch==2.11.0 torchaudio==2.11.0 kaldi-native-fbank numpy safetensors
    .venv-audio/bin/python tools/gen_audio_fixtures.py     # needs espeak-ng (Debian package)

Files: NAME.wav and NAME.features.safetensors: `torchaudio` [frames, 128] and `normalised`
[frames, 128] (the LMUFormer front end), `knf80` and `torchaudio80` [frames, 80] (both references
at 80 mel bins: kaldi-native-fbank refuses 128 bins at 16 kHz, because with a 512-point FFT its
lowest filters are narrower than one FFT bin and cover none; torchaudio gives those filters
ln(eps)), plus `samples`, the mono waveform in [-1, 1] they were computed from. `speech_seven_22k_s16.wav` is at 22.05 kHz: its features are the reference's after
torchaudio's own resampling to 16 kHz (Tideway resamples with another filter, so it is compared
loosely), and `alaw_8k.wav` is an encoding Tideway must refuse.
"""

import struct
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import torch
import torchaudio
import torchaudio.compliance.kaldi as kaldi
import kaldi_native_fbank as knf
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "audio"
MEL = 128
NORM_MEAN, NORM_STD = -6.845978, 5.5654526


def write_wav(path, channels_samples, rate, kind):
    """channels_samples: [channels, n] floats in [-1, 1]. kind: s16, s24, f32 or alaw (8-bit
    A-law, format tag 6). Returns the mono waveform a reader recovers (quantised, averaged)."""
    x = np.asarray(channels_samples, dtype=np.float64)
    channels, n = x.shape
    if kind == "s16":
        q = np.clip(np.round(x * 32768), -32768, 32767).astype(np.int64)
        data = b"".join(struct.pack("<h", int(v)) for v in q.T.reshape(-1))
        tag, bits, decoded = 1, 16, q / 32768.0
    elif kind == "s24":
        q = np.clip(np.round(x * 8388608), -8388608, 8388607).astype(np.int64)
        data = b"".join(int(v).to_bytes(3, "little", signed=True) for v in q.T.reshape(-1))
        tag, bits, decoded = 1, 24, q / 8388608.0
    elif kind == "f32":
        q = x.astype(np.float32)
        data = q.T.reshape(-1).astype("<f4").tobytes()
        tag, bits, decoded = 3, 32, q.astype(np.float64)
    elif kind == "alaw":
        data = bytes((np.arange(channels * n) * 37 % 256).astype(np.uint8))
        tag, bits, decoded = 6, 8, None
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    if tag != 1:
        fmt += struct.pack("<H", 0)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    if decoded is None:
        return None
    # Mono as a reader mixes it: the mean of the channels, in f32 as Tideway computes it.
    return torch.from_numpy(decoded.astype(np.float32)).mean(dim=0)


def references(mono, rate, bins):
    wav = mono.to(torch.float32)
    wav = wav - wav.mean()
    ta = kaldi.fbank(wav.unsqueeze(0), htk_compat=True, sample_frequency=rate, use_energy=False,
                     window_type="hanning", num_mel_bins=bins, dither=0.0, frame_shift=10)
    if bins == MEL:
        return ta, None
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = rate
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = "hanning"
    opts.frame_opts.frame_shift_ms = 10.0
    opts.frame_opts.frame_length_ms = 25.0
    opts.mel_opts.num_bins = bins
    opts.use_energy = False
    opts.htk_compat = True
    online = knf.OnlineFbank(opts)
    online.accept_waveform(rate, wav.tolist())
    online.input_finished()
    kn = torch.tensor(np.array([online.get_frame(i) for i in range(online.num_frames_ready)]), dtype=torch.float32)
    return ta, kn


def save(name, mono, rate, features_input=None):
    """Features of `mono` (or of `features_input`, the same audio already at 16 kHz)."""
    x, r = (mono, rate) if features_input is None else (features_input, 16000)
    ta, _ = references(x, r, MEL)
    ta80, kn80 = references(x, r, 80)
    save_file({"samples": mono.contiguous(), "torchaudio": ta.contiguous(),
               "normalised": ((ta - NORM_MEAN) / (2 * NORM_STD)).contiguous(),
               "torchaudio80": ta80.contiguous(), "knf80": kn80.contiguous()},
              ROOT / f"{name}.features.safetensors")
    err = float((ta80 - kn80).norm() / kn80.norm())
    print(f"{name}: {len(mono)} samples at {rate} Hz, {ta.shape[0]} frames, torchaudio vs knf (80 bins) {err:.1e}")


def espeak(text):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "speech.wav"
        subprocess.run(["espeak-ng", "-w", str(out), text], check=True)
        with wave.open(str(out)) as w:
            assert w.getsampwidth() == 2 and w.getnchannels() == 1
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return torch.from_numpy(pcm / 32768.0).float().unsqueeze(0), rate


def main():
    ROOT.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rate = 16000
    t = torch.arange(int(1.3 * rate)) / rate
    chirp = 0.4 * torch.sin(2 * np.pi * (200 * t + 1500 * t * t)) + 0.02 * torch.randn(t.shape, generator=g)
    mono = write_wav(ROOT / "chirp_16k_s16.wav", chirp.unsqueeze(0), rate, "s16")
    save("chirp_16k_s16", mono, rate)

    left = 0.3 * torch.randn(int(0.9 * rate), generator=g).clamp(-1, 1)
    right = 0.5 * torch.sin(2 * np.pi * 440 * torch.arange(int(0.9 * rate)) / rate) + 0.1
    mono = write_wav(ROOT / "noise_tone_16k_s24_stereo.wav", torch.stack([left, right]), rate, "s24")
    save("noise_tone_16k_s24_stereo", mono, rate)

    speech, speech_rate = espeak("yes")
    speech16 = torchaudio.functional.resample(speech, speech_rate, rate)
    mono = write_wav(ROOT / "speech_yes_16k_f32.wav", speech16, rate, "f32")
    save("speech_yes_16k_f32", mono, rate)

    speech, speech_rate = espeak("seven")
    mono = write_wav(ROOT / "speech_seven_22k_s16.wav", speech, speech_rate, "s16")
    resampled = torchaudio.functional.resample(mono.unsqueeze(0), speech_rate, rate)[0]
    save("speech_seven_22k_s16", mono, speech_rate, features_input=resampled)

    write_wav(ROOT / "alaw_8k.wav", torch.zeros(1, 800), 8000, "alaw")
    print("alaw_8k.wav: A-law, to be refused")


if __name__ == "__main__":
    main()
