"""Writes the seed corpus of the `state_blob` fuzz target (fuzz/corpus/state_blob): session
state blobs as ExportState answers them, written here from the format's description (README,
"Session state"), not by Tideway: a safetensors file whose metadata names the format, version,
model and session, with a CRC-32 (zlib's) over each tensor's name, dtype name and bytes in name
order. The states are shaped for tests/fixtures/mamba/hf_k4_sharded (2 layers, d_inner 96,
d_state 16, d_conv 4): one that imports, one with a short tensor, one with a wrong checksum.

    .venv/bin/python tools/gen_state_blob_seeds.py
"""

import json
import pathlib
import zlib

import numpy as np
from safetensors.numpy import save

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "fuzz" / "corpus" / "state_blob"


def blob(tensors, crc_delta=0, **meta):
    crc = 0
    for name in sorted(tensors):
        value = tensors[name]
        dtype = {np.float32: "F32", np.float64: "F64", np.uint64: "U64", np.uint8: "U8"}[value.dtype.type]
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(dtype.encode(), crc)
        crc = zlib.crc32(value.tobytes(), crc)
    metadata = {
        "format": "tideway.session-state",
        "version": "1",
        "key": "12345",
        "name": "seed",
        "model": "hf_k4_sharded",
        "fingerprint": "00000000-0",
        "owner": "anonymous",
        "chunks": "3",
        "position": "7",
        "last_used_unix": "1764600000.5",
        "crc32": f"{(crc + crc_delta) & 0xFFFFFFFF:08x}",
    }
    metadata.update(meta)
    return save(tensors, metadata=metadata)


def mamba_state(rng, short=False):
    config = json.loads((ROOT / "tests/fixtures/mamba/hf_k4_sharded/config.json").read_text())
    e, n, k = config["intermediate_size"], config["state_size"], config["conv_kernel"]
    tensors = {"position": np.array([7], dtype=np.uint64)}
    for i in range(config["num_hidden_layers"]):
        tensors[f"layers.{i}.conv"] = rng.standard_normal(e * k).astype(np.float32)
        tensors[f"layers.{i}.ssm"] = rng.standard_normal(n * e - (1 if short else 0)).astype(np.float32)
    tensors["frontend.text.bytes"] = np.frombuffer(b"\xc3", dtype=np.uint8).copy()
    tensors["frontend.text.text"] = np.frombuffer("tail".encode(), dtype=np.uint8).copy()
    tensors["frontend.text.consumed"] = np.array([0], dtype=np.uint64)
    tensors["frontend.text.ended"] = np.array([0], dtype=np.uint64)
    return tensors


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    (OUT / "mamba_k4.safetensors").write_bytes(blob(mamba_state(rng)))
    (OUT / "mamba_k4_short_tensor.safetensors").write_bytes(blob(mamba_state(rng, short=True)))
    (OUT / "mamba_k4_bad_crc.safetensors").write_bytes(blob(mamba_state(rng), crc_delta=1))
    lmu = {"head.output_sum": rng.standard_normal(12).astype(np.float64), "frames_out": np.array([9], dtype=np.uint64)}
    (OUT / "lmu_parts.safetensors").write_bytes(blob(lmu, model="kws"))
    print(f"wrote {len(list(OUT.iterdir()))} seeds to {OUT}")


if __name__ == "__main__":
    main()
