"""The real tritonclient[grpc] against a feature model (LMUFormer with an audio front end):
raw int16 and f32 audio in a sequence of requests, and frames of features, give the
reference model's per-frame outputs."""

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from safetensors.numpy import load_file
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parents[2]


def relative_error(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def samples():
    return load_file(str(ROOT / "tests" / "fixtures" / "audio" / "chirp_16k_s16.features.safetensors"))["samples"]


def test_metadata_lists_audio_and_features(audio_server):
    client = grpcclient.InferenceServerClient(audio_server["address"])
    meta = client.get_model_metadata(audio_server["model"], as_json=True)
    assert [i["name"] for i in meta["inputs"]] == ["audio", "input"]
    assert meta["outputs"][0]["name"] == "output"


@pytest.mark.parametrize("dtype", ["INT16", "FP32"])
def test_audio_in_a_sequence_gives_the_reference_outputs(audio_server, dtype):
    want = load_file(str(audio_server["fixture"] / "expected.safetensors"))["output"]
    wav = samples()
    client = grpcclient.InferenceServerClient(audio_server["address"])
    cuts = [0, 4000, 4001, 9100, 15000, len(wav)]
    rows = []
    for i in range(len(cuts) - 1):
        piece = wav[cuts[i]:cuts[i + 1]]
        data = np.round(piece * 32768).astype(np.int16) if dtype == "INT16" else piece.astype(np.float32)
        inp = grpcclient.InferInput("audio", [len(data)], dtype)
        inp.set_data_from_numpy(data)
        result = client.infer(
            audio_server["model"], [inp], sequence_id=77 if dtype == "INT16" else 78,
            sequence_start=i == 0, sequence_end=i == len(cuts) - 2,
            parameters={"sample_rate": 16000},
        )
        rows.append(result.as_numpy("output"))
    got = np.concatenate(rows)
    assert got.shape == want.shape
    assert relative_error(got, want) <= 1e-4


def test_features_and_bad_audio(audio_server):
    client = grpcclient.InferenceServerClient(audio_server["address"])
    features = load_file(str(ROOT / "tests" / "fixtures" / "audio" / "chirp_16k_s16.features.safetensors"))["normalised"]
    want = load_file(str(audio_server["fixture"] / "expected.safetensors"))["output"]
    inp = grpcclient.InferInput("input", list(features.shape), "FP32")
    inp.set_data_from_numpy(features)
    got = client.infer(audio_server["model"], [inp]).as_numpy("output")
    assert relative_error(got, want) <= 1e-4
    inp = grpcclient.InferInput("audio", [100], "FP32")
    inp.set_data_from_numpy(np.zeros(100, dtype=np.float32))
    with pytest.raises(InferenceServerException, match="sample_rate"):
        client.infer(audio_server["model"], [inp])
