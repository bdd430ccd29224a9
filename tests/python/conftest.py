"""Starts the real `tideway serve` binary on a loopback port chosen at run time."""

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def tideway_binary() -> str:
    path = os.environ.get("TIDEWAY_BIN", str(ROOT / "target" / "debug" / "tideway"))
    if not Path(path).exists():
        pytest.fail(f"{path} does not exist: build it first (cargo build -p tideway-workers)")
    return path


def start_server(models, extra=()):
    """Starts `tideway serve` with `models` (NAME=DIR or DIR strings) and `extra` arguments;
    returns (process, address, log path)."""
    log = tempfile.NamedTemporaryFile(prefix="tideway-serve-", suffix=".log", delete=False)
    args = [tideway_binary(), "serve", "--listen", "127.0.0.1:0", "--workers", "2"]
    for m in models:
        args += ["--model", str(m)]
    args += list(extra)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 60
    while True:
        text = Path(log.name).read_text()
        match = re.search(r"tideway listening on (\S+)", text)
        if match:
            return proc, match.group(1), log.name
        if proc.poll() is not None:
            pytest.fail(f"tideway serve exited: {text}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"tideway serve did not start: {text}")
        time.sleep(0.05)


def stop_server(proc, log):
    proc.kill()
    proc.wait()
    os.unlink(log)


@pytest.fixture(scope="module")
def server():
    model = ROOT / "tests" / "fixtures" / "mamba" / "hf_k4_sharded"
    proc, address, log = start_server([model])
    yield {"address": address, "model": model.name, "dir": model}
    stop_server(proc, log)


@pytest.fixture(scope="module")
def audio_server():
    """An LMUFormer keyword-spotter fixture with the audio front end in its config.json."""
    fixture = ROOT / "tests" / "fixtures" / "lmu" / "lmu_d16_c128_frontend"
    proc, address, log = start_server([f"kws={fixture / 'checkpoint'}"])
    yield {"address": address, "model": "kws", "fixture": fixture}
    stop_server(proc, log)


AUTH_TOKEN = "triton-client-token-0123456789"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A server with bearer tokens (`--auth`): one client identity."""
    model = ROOT / "tests" / "fixtures" / "mamba" / "hf_k4_sharded"
    tokens = tmp_path_factory.mktemp("auth") / "tokens.txt"
    tokens.write_text(f"{AUTH_TOKEN} triton client\n")
    proc, address, log = start_server([model], ["--auth", str(tokens)])
    yield {"address": address, "model": model.name, "dir": model, "token": AUTH_TOKEN}
    stop_server(proc, log)
