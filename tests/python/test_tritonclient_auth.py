"""tritonclient[grpc] against `tideway serve --auth`: the bearer token goes as a header, as
tritonclient sends any header; without it, or with another, the server refuses the call."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from safetensors.numpy import load_file
from tritonclient.utils import InferenceServerException


def infer(client, model, ids, headers):
    tensor = grpcclient.InferInput("input_ids", [len(ids)], "INT64")
    tensor.set_data_from_numpy(np.asarray(ids, dtype=np.int64))
    return client.infer(model, [tensor], headers=headers)


def test_a_bearer_token_header_is_all_tritonclient_needs(auth_server):
    client = grpcclient.InferenceServerClient(auth_server["address"])
    expected = load_file(str(auth_server["dir"] / "expected.safetensors"))
    ids = expected["input_ids"].astype(np.int64)[:12]
    good = {"authorization": f"Bearer {auth_server['token']}"}
    got = infer(client, auth_server["model"], ids, good).as_numpy("logits")
    want = expected["logits"][: len(ids)]
    assert float(np.linalg.norm(got - want) / np.linalg.norm(want)) <= 1e-5
    assert client.is_model_ready(auth_server["model"], headers=good)
    for headers in [None, {"authorization": "Bearer not-the-token-at-all"}]:
        with pytest.raises(InferenceServerException) as refused:
            infer(client, auth_server["model"], ids, headers)
        assert "UNAUTHENTICATED" in str(refused.value.status()) or "token" in str(refused.value)
