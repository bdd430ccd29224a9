"""The real tritonclient[grpc] package against `tideway serve`: sequences interleaved on one
stream with uneven chunks, unary sequences, and the refusal of a non-start request for an
unknown sequence. Expected logits are HF transformers' own (tests/fixtures/mamba/*/expected)."""

import queue
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from safetensors.numpy import load_file
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def reference(server):
    expected = load_file(str(server["dir"] / "expected.safetensors"))
    return expected["input_ids"].astype(np.int64), expected["logits"]


def relative_error(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def ids_input(ids, dtype="INT64"):
    array = np.asarray(ids, dtype=np.int64 if dtype == "INT64" else np.int32)
    tensor = grpcclient.InferInput("input_ids", [len(array)], dtype)
    tensor.set_data_from_numpy(array)
    return tensor


# Three sequences (one with a string id) over prefixes of the fixture's tokens, in uneven
# chunks: (sequence id, number of tokens, chunk sizes).
SEQUENCES = [(1001, 40, [3, 7, 1, 12, 17]), ("text-id", 25, [10, 15]), (77, 33, [1, 1, 31])]


def chunk_plan():
    """(sequence id, start, end, token range) in an interleaved order."""
    plans = []
    for seq, total, sizes in SEQUENCES:
        assert sum(sizes) == total
        offset, steps = 0, []
        for i, size in enumerate(sizes):
            steps.append((seq, i == 0, i == len(sizes) - 1, offset, offset + size))
            offset += size
        plans.append(steps)
    order = []
    while any(plans):
        for steps in plans:
            if steps:
                order.append(steps.pop(0))
    return order


def test_server_and_model_metadata(server):
    client = grpcclient.InferenceServerClient(server["address"])
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(server["model"])
    meta = client.get_model_metadata(server["model"], as_json=True)
    assert meta["inputs"][0]["name"] == "input_ids"
    assert meta["outputs"][0]["name"] == "logits"
    config = client.get_model_config(server["model"], as_json=True)["config"]
    assert config["name"] == server["model"] and "sequence_batching" in config
    index = client.get_model_repository_index(as_json=True)
    assert [m["name"] for m in index["models"]] == [server["model"]]


def test_interleaved_sequences_on_one_stream(server, reference):
    ids, want = reference
    client = grpcclient.InferenceServerClient(server["address"])
    results = queue.Queue()

    def callback(results, result, error):
        results.put((result, error))

    client.start_stream(callback=partial(callback, results))
    plan = chunk_plan()
    for n, (seq, start, end, lo, hi) in enumerate(plan):
        dtype = "INT32" if n % 2 else "INT64"
        client.async_stream_infer(
            server["model"],
            [ids_input(ids[lo:hi], dtype)],
            request_id=f"r{n}",
            sequence_id=seq,
            sequence_start=start,
            sequence_end=end,
        )
    client.stop_stream()
    got = {}
    for _ in plan:
        result, error = results.get(timeout=30)
        assert error is None, error
        got[result.get_response().id] = result.as_numpy("logits")
    assert len(got) == len(plan), "every request gets exactly one answer"
    for seq, total, _ in SEQUENCES:
        rows = [got[f"r{n}"] for n, step in enumerate(plan) if step[0] == seq]
        logits = np.concatenate(rows)
        assert logits.shape == (total, want.shape[1])
        assert relative_error(logits, want[:total]) <= 1e-4, seq


def test_unary_sequences(server, reference):
    ids, want = reference
    client = grpcclient.InferenceServerClient(server["address"])
    rows = {seq: [] for seq, _, _ in SEQUENCES}
    for seq, start, end, lo, hi in chunk_plan():
        result = client.infer(
            server["model"],
            [ids_input(ids[lo:hi])],
            sequence_id=f"unary-{seq}",
            sequence_start=start,
            sequence_end=end,
        )
        rows[seq].append(result.as_numpy("logits"))
    for seq, total, _ in SEQUENCES:
        assert relative_error(np.concatenate(rows[seq]), want[:total]) <= 1e-4


def test_a_request_without_sequence_is_one_whole_sequence(server, reference):
    ids, want = reference
    client = grpcclient.InferenceServerClient(server["address"])
    result = client.infer(server["model"], [ids_input(ids)])
    assert relative_error(result.as_numpy("logits"), want) <= 1e-4


def test_non_start_request_for_unknown_sequence_is_refused(server, reference):
    ids, _ = reference
    client = grpcclient.InferenceServerClient(server["address"])
    with pytest.raises(InferenceServerException) as caught:
        client.infer(server["model"], [ids_input(ids[:3])], sequence_id=424242)
    assert "StatusCode.INVALID_ARGUMENT" in str(caught.value.status())
    assert "sequence:424242" in caught.value.message()
    assert "must start it" in caught.value.message()

    # On a stream the error is that request's answer, and the stream stays open.
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(server["model"], [ids_input(ids[:2])], request_id="bad", sequence_id=31337)
    client.async_stream_infer(
        server["model"], [ids_input(ids[:2])], request_id="good", sequence_id=31338,
        sequence_start=True, sequence_end=True,
    )
    client.stop_stream()
    answers = [results.get(timeout=30) for _ in range(2)]
    errors = [e for _, e in answers if e is not None]
    oks = [r for r, e in answers if e is None]
    assert len(errors) == 1 and "must start it" in errors[0].message()
    assert len(oks) == 1 and oks[0].get_response().id == "good"


def test_bad_inputs_are_refused_with_reasons(server):
    client = grpcclient.InferenceServerClient(server["address"])
    with pytest.raises(InferenceServerException) as caught:
        client.infer(server["model"], [ids_input([1, 64])])
    assert "token id 64 at position 1" in caught.value.message()
    floats = grpcclient.InferInput("input_ids", [2], "FP32")
    floats.set_data_from_numpy(np.zeros(2, dtype=np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer(server["model"], [floats])
    assert "allowed: \"INT64\", \"INT32\"" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        client.infer("missing-model", [ids_input([1])])
    assert "StatusCode.NOT_FOUND" in str(caught.value.status())
