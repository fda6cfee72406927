"""A real server's repository API cannot reach outside its repository.

The layout, in one temporary folder:
- `repo/`: the served repository, with `sum` (ONNX);
- `escape/1/`, right next to `repo/`: a complete, valid model version whose code makes a folder
  `code-ran` when it is imported. `../escape` from the repository root is exactly this folder,
  so a server that followed any of the names below would load it (and the folder would appear);
- `outside/escape/1/`: the same again one level deeper, for `../outside/escape`.

Every attack is made over REST (raw sockets, so that the path is sent byte for byte, and
tritonclient.http) and gRPC (tritonclient.grpc), then the server must still serve `sum`.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from inferplane.repository.register import register
from inferplane.repository.store import Repository
from inferplane.tensors import TensorSpec
from tests.conftest import write_onnx_model
from tests.integration.servers import ROOT, ServerProcess, start_server

PLANTED = textwrap.dedent(
    """
    import os
    import numpy as np

    # Runs on import: the server loaded a model from outside its repository.
    os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                             "code-ran"), exist_ok=True)


    class Model:
        def predict(self, inputs):
            return {"y": np.asarray(inputs["x"])}
    """
)

# Names as a caller would write them; the comment says what the repository layer sees.
GRPC_NAMES = [
    "../escape",
    "..",
    "%2e%2e",  # never decoded again: '%' is outside the alphabet
    "%2e%2e%2fescape",
    "/etc",
    "a/../../escape",
    "../outside/escape",
    "..\\escape",
    "escape\x00",
    "x" * 300,
]
# Raw REST paths (sent as they are) whose {model} segment reaches the repository API: 400.
REST_400 = [
    "%2e%2e",  # decoded to '..'
    "%2E%2E",
    ".%2e",
    "..%5Cescape",  # '..\escape'
    "%252e%252e%252fescape",  # decoded once to '%2e%2e%2fescape'
    "escape%00",
    "x" * 300,
]
# Paths with a '/' in the model part once decoded: no route takes them (404) and nothing of the
# repository is touched.
REST_NO_ROUTE = [
    "..%2Fescape",
    "..%2fescape",
    "%2e%2e%2fescape",
    "..%2F..%2Foutside%2Fescape",
    "../escape",
    "a/../../escape",
    "%2Fetc",
]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("safety")
    repo = Repository(str(base / "repo"))
    register(repo, "sum", write_onnx_model(base / "src" / "model.onnx"))
    planted = base / "planted"
    planted.mkdir()
    (planted / "model.py").write_text(PLANTED)
    signature = {
        "inputs": [TensorSpec("x", "FP32", [-1])],
        "outputs": [TensorSpec("y", "FP32", [-1])],
    }
    # base/escape/1/... (a repository at `base`) and base/outside/escape/1/...
    register(Repository(str(base)), "escape", str(planted), **signature)
    register(Repository(str(base / "outside")), "escape", str(planted), **signature)
    assert (base / "escape" / "1" / "model.yaml").exists()
    return base


@pytest.fixture(scope="module")
def server(layout: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(layout / "repo", tmp_path_factory.mktemp("logs"))
    yield srv
    srv.stop()


def raw_post(server: ServerProcess, path: str) -> tuple[int, bytes]:
    """POST `path` exactly as written (no client normalises or re-encodes it)."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        request = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(request.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def assert_still_safe(server: ServerProcess, layout: Path) -> None:
    assert not (layout / "code-ran").exists(), "a model from outside the repository was loaded"
    index = httpx.post(server.url + "/v2/repository/index", timeout=30).json()
    assert {row["name"] for row in index} == {"sum"}
    x = np.ones((2, 4), dtype=np.float32)
    with httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}") as client:
        feed = httpclient.InferInput("input", [2, 4], "FP32")
        feed.set_data_from_numpy(x)
        out = client.infer("sum", [feed]).as_numpy("output")
    np.testing.assert_allclose(out, x.sum(axis=1, keepdims=True))
    # Nothing outside was even read: a model.yaml read through '../escape' would have been
    # logged as naming another model ("../escape/1/model.yaml says escape version 1"), and a
    # load as "model escape version 1 ...".
    log = server.log()
    assert "says escape" not in log and "model escape " not in log


@pytest.mark.parametrize("segment", REST_400)
@pytest.mark.parametrize("action", ["load", "unload"])
def test_rest_names_that_reach_the_api_are_400(
    server: ServerProcess, layout: Path, segment: str, action: str
) -> None:
    status, body = raw_post(server, f"/v2/repository/models/{segment}/{action}")
    assert status == 400, body
    message = httpx.Response(status, content=body).json()["error"]
    assert message.startswith("model name ")
    assert_still_safe(server, layout)


@pytest.mark.parametrize("path", REST_NO_ROUTE)
def test_rest_paths_with_a_separator_match_no_route(
    server: ServerProcess, layout: Path, path: str
) -> None:
    for action in ("load", "unload"):
        status, _ = raw_post(server, f"/v2/repository/models/{path}/{action}")
        assert status == 404
    assert_still_safe(server, layout)


def test_tritonclient_http_load_is_refused(server: ServerProcess, layout: Path) -> None:
    with httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}") as client:
        for name in ("../escape", "..", "%2e%2e", "/etc", "a/../../escape"):
            with pytest.raises(InferenceServerException) as info:
                client.load_model(name)
            assert info.value.status() in ("400", "404"), (name, info.value)
    assert_still_safe(server, layout)


@pytest.mark.parametrize("name", GRPC_NAMES, ids=[ascii(n)[:24] for n in GRPC_NAMES])
def test_grpc_load_and_unload_are_invalid_argument(
    server: ServerProcess, layout: Path, name: str
) -> None:
    with grpcclient.InferenceServerClient(server.grpc_target) as client:
        for call in (client.load_model, client.unload_model):
            with pytest.raises(InferenceServerException) as info:
                call(name)
            assert str(info.value.status()) == "StatusCode.INVALID_ARGUMENT", info.value
            assert "model name " in info.value.message()
        assert client.is_model_ready("sum")
    assert_still_safe(server, layout)


def test_the_models_command_refuses_the_same_names(layout: Path) -> None:
    for args in (["show", "../escape"], ["alias", "../escape", "production", "1"]):
        done = subprocess.run(
            [sys.executable, "-m", "inferplane", "models", *args, "--repository",
             str(layout / "repo")],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, done
        assert "model name '../escape' contains '/'" in done.stderr
    assert not (layout / "escape" / "aliases.yaml").exists()
    assert not (layout / "code-ran").exists()


def test_answers_do_not_tell_what_exists_outside(server: ServerProcess) -> None:
    """Triton's CVE-2026-24208 class: differing answers for existing and missing outside paths
    let a caller probe the host's folders. Here both are refused by the name rule alone."""
    with grpcclient.InferenceServerClient(server.grpc_target) as client:
        messages = []
        for name in ("../escape", "../no-such-folder"):
            with pytest.raises(InferenceServerException) as info:
                client.load_model(name)
            messages.append(info.value.message().replace(name, "<name>"))
    assert messages[0] == messages[1]
