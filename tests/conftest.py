"""Shared fixtures: free ports, a real moto S3 server, and a tiny ONNX model.

- `free_port()` (also the `free_port` fixture, which returns the same callable): a TCP port on
  127.0.0.1 that nothing listens on right now.
- `moto_s3` (session): a real `moto_server` process on loopback. While it runs, the process env
  carries AWS_ENDPOINT_URL and test credentials, so fsspec/s3fs in this process and in every
  subprocess (e.g. `inferplane serve --repository s3://...`) talk to it. `moto_s3.new_bucket()`
  creates a fresh bucket and returns its name.
- `make_onnx_model(path, n_features=4)`: writes an ONNX model `input` FP32 [N, n_features] ->
  `output` FP32 [N, 1] = the sum over features, and returns the path.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(name="free_port")
def free_port_fixture() -> Callable[[], int]:
    """The `free_port` callable; call it once per port needed."""
    return free_port


# --- S3 on a real moto_server -------------------------------------------------------------------

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class MotoS3:
    endpoint_url: str

    def new_bucket(self, prefix: str = "test") -> str:
        """Create a bucket with a unique name and return the name (no s3:// prefix)."""
        import s3fs

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
        return name


def _moto_command(port: int) -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    if exe.exists():
        return [str(exe), "-H", "127.0.0.1", "-p", str(port)]
    found = shutil.which("moto_server")
    if found:
        return [found, "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    for module, install in (("moto.server", "moto[server]"), ("s3fs", "s3fs")):
        try:
            __import__(module)
        except ImportError as exc:
            pytest.fail(
                f"S3 tests need {install}: pip install '{install}' "
                f"(or pip install -e '.[dev]'); import failed: {exc}",
                pytrace=False,
            )
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(_moto_command(port), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"moto_server exited with {proc.returncode}: {log_path.read_text()[-2000:]}",
                    pytrace=False,
                )
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                    break
            except urllib.error.HTTPError:
                break  # it answered, which is all we wait for
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not answer on {endpoint} within 30 s")
                time.sleep(0.1)

        env = {**_S3_ENV, "AWS_ENDPOINT_URL": endpoint}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        import s3fs

        # Filesystems cached before the env was set would still point at real AWS.
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield MotoS3(endpoint_url=endpoint)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --- a tiny ONNX model --------------------------------------------------------------------------


def write_onnx_model(path: str | os.PathLike[str], n_features: int = 4) -> str:
    """`input` FP32 [N, n_features] -> `output` FP32 [N, 1], the sum over the features."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError as exc:
        pytest.fail(f"needs the onnx package: pip install onnx ({exc})", pytrace=False)
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    node = helper.make_node("ReduceSum", ["input", "axes"], ["output"], keepdims=1)
    graph = helper.make_graph(
        [node],
        "sum_features",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", n_features])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])],
        initializer=[axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime the project supports
    onnx.checker.check_model(model)
    out = os.fspath(path)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    onnx.save(model, out)
    return out


@pytest.fixture
def make_onnx_model() -> Callable[..., str]:
    """Factory: `make_onnx_model(path, n_features=4)` writes the model and returns its path."""
    return write_onnx_model
