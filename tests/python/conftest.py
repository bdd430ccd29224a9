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


@pytest.fixture(scope="module")
def server():
    model = ROOT / "tests" / "fixtures" / "mamba" / "hf_k4_sharded"
    log = tempfile.NamedTemporaryFile(prefix="tideway-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [tideway_binary(), "serve", "--listen", "127.0.0.1:0", "--model", str(model), "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    deadline = time.time() + 60
    address = None
    while address is None:
        text = Path(log.name).read_text()
        match = re.search(r"tideway listening on (\S+)", text)
        if match:
            address = match.group(1)
        elif proc.poll() is not None:
            pytest.fail(f"tideway serve exited: {text}")
        elif time.time() > deadline:
            proc.kill()
            pytest.fail(f"tideway serve did not start: {text}")
        else:
            time.sleep(0.05)
    yield {"address": address, "model": model.name, "dir": model}
    proc.kill()
    proc.wait()
    os.unlink(log.name)
