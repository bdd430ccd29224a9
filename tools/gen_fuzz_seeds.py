"""Writes the seed corpora of the request-decoder fuzz targets (fuzz/corpus/kserve_request,
fuzz/corpus/stream_chunk): well-formed requests of each kind the decoders take, encoded as
protobuf the way the clients send them. ModelInferRequests come from tritonclient's own
messages; stream chunks are encoded by hand from tideway.proto (field numbers below).

    .venv-test/bin/python tools/gen_fuzz_seeds.py
"""

import pathlib
import struct

import numpy as np
from tritonclient.grpc import service_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parent.parent / "fuzz" / "corpus"


def infer_request(inputs, raw=(), **params):
    request = pb.ModelInferRequest(model_name="m", id="seed")
    for name, datatype, shape, contents in inputs:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if contents is not None:
            field, values = contents
            getattr(tensor.contents, field).extend(values)
    request.raw_input_contents.extend(raw)
    for key, value in params.items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        elif isinstance(value, str):
            request.parameters[key].string_param = value
        else:
            request.parameters[key].int64_param = value
    return request.SerializeToString()


def varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number, wire, payload):
    return varint(number << 3 | wire) + payload


def packed(number, payload):
    return field(number, 2, varint(len(payload)) + payload)


# tideway.v1.StreamChunk: tokens = 1 (int64), end = 2, samples_f32 = 3, samples_i16 = 4 (int32),
# sample_rate = 5, text = 6, frames = 7 (float), channels = 8.
def chunk(tokens=(), end=False, f32=(), i16=(), rate=0, text="", frames=(), channels=0):
    out = b""
    if tokens:
        out += packed(1, b"".join(varint(t & (2**64 - 1)) for t in tokens))
    if end:
        out += field(2, 0, varint(1))
    if f32:
        out += packed(3, struct.pack(f"<{len(f32)}f", *f32))
    if i16:
        out += packed(4, b"".join(varint(v & (2**64 - 1)) for v in i16))
    if rate:
        out += field(5, 0, varint(rate))
    if text:
        data = text.encode()
        out += field(6, 2, varint(len(data)) + data)
    if frames:
        out += packed(7, struct.pack(f"<{len(frames)}f", *frames))
    if channels:
        out += field(8, 0, varint(channels))
    return out


def main():
    ids = np.array([1, 2, 3, 49], dtype=np.int64)
    samples = (np.sin(np.arange(160) / 5) * 8000).astype(np.int16)
    kserve = {
        "ids_raw_int64": infer_request([("input_ids", "INT64", [1, 4], None)], [ids.tobytes()]),
        "ids_raw_int32": infer_request(
            [("input_ids", "INT32", [4], None)], [ids.astype(np.int32).tobytes()]
        ),
        "ids_typed_sequence": infer_request(
            [("input_ids", "INT64", [4], ("int64_contents", ids.tolist()))],
            sequence_id=7,
            sequence_start=True,
            sequence_end=False,
        ),
        "frames_raw": infer_request(
            [("input", "FP32", [1, 3, 2], None)],
            [np.arange(6, dtype=np.float32).tobytes()],
            sequence_id="s",
        ),
        "audio_int16_raw": infer_request(
            [("audio", "INT16", [160], None)], [samples.tobytes()], sample_rate=16000
        ),
        "audio_fp32_typed": infer_request(
            [("audio", "FP32", [1, 4], ("fp32_contents", [0.0, 0.5, -0.5, 1.0]))],
            sample_rate=8000,
        ),
    }
    native = {
        "tokens": chunk(tokens=[1, 2, 3, 49]),
        "tokens_end": chunk(tokens=[5], end=True),
        "text": chunk(text="hello wor"),
        "samples_i16": chunk(i16=samples.tolist(), rate=16000),
        "samples_f32": chunk(f32=[0.0, 0.25, -0.25], rate=44100),
        "frames": chunk(frames=[0.0, 1.0, 2.0, 3.0], channels=2),
    }
    for target, seeds in (("kserve_request", kserve), ("stream_chunk", native)):
        folder = ROOT / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (folder / f"{name}.pb").write_bytes(data)
        print(f"{target}: {len(seeds)} seeds in {folder}")


if __name__ == "__main__":
    main()
