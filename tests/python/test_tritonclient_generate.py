"""Generation over the inference protocol with the real tritonclient[grpc]: a ModelStreamInfer
request with the parameter `generate` is answered by one response per token, the last flagged
`triton_final_response`, read by tritonclient's stream callback as they come. Greedy tokens
equal the reference's (HF transformers' MambaForCausalLM.generate, committed in
tests/fixtures/generation/ by tools/gen_generation_fixtures.py); text streams from a model with a
tokenizer; bad parameters come back as errors on the open stream."""

import json
import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import ROOT, start_server, stop_server

CASE = json.loads((ROOT / "tests" / "fixtures" / "generation" / "mamba_bias_untied_k2.json").read_text())


@pytest.fixture(scope="module")
def generation_server():
    proc, address, log = start_server(
        [f"ids={ROOT / CASE['model']}", f"bpe={ROOT / 'tests' / 'fixtures' / 'text' / 'mamba_bpe'}"])
    yield address
    stop_server(proc, log)


def stream_generate(address, model, inputs, parameters):
    """Sends one generation on a stream; returns every response (result or error) in order."""
    responses = queue.Queue()
    client = grpcclient.InferenceServerClient(address)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(model, inputs, request_id="g1", parameters=parameters)
    out = []
    while True:
        result, error = responses.get(timeout=30)
        out.append((result, error))
        if error is not None:
            break
        params = result.get_response().parameters
        if params["triton_final_response"].bool_param:
            break
    client.stop_stream()
    return out


def ids_input(ids):
    tensor = grpcclient.InferInput("input_ids", [len(ids)], "INT64")
    tensor.set_data_from_numpy(np.asarray(ids, dtype=np.int64))
    return tensor


def test_greedy_tokens_stream_one_response_each_and_equal_the_reference(generation_server):
    want = CASE["tokens"][:50]
    responses = stream_generate(generation_server, "ids", [ids_input(CASE["prompt_ids"])],
                                {"generate": True, "max_tokens": len(want), "temperature": 0, "ignore_eos": True})
    assert all(error is None for _, error in responses), responses
    tokens = [int(t) for result, _ in responses[:-1] for t in result.as_numpy("output_ids")]
    assert tokens == want
    assert len(responses) == len(want) + 1
    final = responses[-1][0].get_response()
    assert final.id == "g1"
    assert final.parameters["finish_reason"].string_param == "length"
    assert final.parameters["completion_tokens"].uint64_param == len(want)


def test_text_streams_and_a_stop_string_ends_it(generation_server):
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array(["Hello world".encode()], dtype=np.object_))
    params = {"generate": True, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    responses = stream_generate(generation_server, "bpe", [text], params)
    pieces = [result.as_numpy("text_output")[0].decode() for result, _ in responses[:-1]]
    whole = "".join(pieces)
    assert len(whole) > 10
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    stopped = stream_generate(generation_server, "bpe", [text], {**params, "stop": stop})
    got = "".join(r.as_numpy("text_output")[0].decode() for r, _ in stopped[:-1])
    assert got == whole[:whole.find(stop)]
    assert stopped[-1][0].get_response().parameters["finish_reason"].string_param == "stop"


def test_bad_parameters_are_errors_on_the_stream(generation_server):
    for params, says in [({"generate": True, "temperature": -1.0}, "temperature -1"),
                         ({"generate": True, "top_p": 1.5}, "top_p 1.5"),
                         ({"generate": True, "max_tokens": 10**6}, "--max-new-tokens"),
                         ({"generate": True, "stop": 3}, "stop")]:
        responses = stream_generate(generation_server, "ids", [ids_input([1, 2, 3])], params)
        (_, error), = responses
        assert error is not None and says in str(error), (params, error)
