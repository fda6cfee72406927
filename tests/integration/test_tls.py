"""TLS and mTLS on both ports of a real server, with the real clients: httpx, tritonclient.http and
tritonclient.grpc, grpcio's secure channel; handshakes refused without a client certificate or
with one from another CA; certificates (and the client CA) reloaded while the server runs, the
old ones kept when the new files are broken."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.conftest import write_onnx_model
from tests.integration.servers import ROOT, ServerProcess, start_server
from tests.needs import need
from tests.pki import CA, Issued, client_cert, make_ca, serial_of, server_cert

ROW = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
INFER_JSON = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": ROW[0].tolist()}]
}
HTTP_ALPN, GRPC_ALPN = ["http/1.1"], ["h2"]
RELOAD_WAIT_S = 6.0  # the server looks at its files every second


@dataclass
class Pki:
    ca: CA
    other_ca: CA  # unrelated: its client certificates must be refused
    server: Issued
    alice: Issued  # CN alice, URI SAN spiffe://inferplane.test/alice, from `ca`
    bob: Issued  # from `ca` too, mapped to no principal by the access file
    mallory: Issued  # from `other_ca`
    base: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    ca, other = make_ca(base), make_ca(base, "unrelated CA")
    return Pki(
        ca=ca,
        other_ca=other,
        server=server_cert(ca, base),
        alice=client_cert(ca, base, "alice", uri="spiffe://inferplane.test/alice"),
        bob=client_cert(ca, base, "bob", uri="spiffe://inferplane.test/bob"),
        mallory=client_cert(other, base, "mallory", uri="spiffe://inferplane.test/alice"),
        base=base,
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from inferplane.repository.register import register
    from inferplane.repository.store import Repository

    base = tmp_path_factory.mktemp("tls-models")
    register(Repository(str(base / "models")), "sum", write_onnx_model(base / "sum.onnx"))
    return base / "models"


# --- clients -----------------------------------------------------------------------------------


def client_context(ca: CA, cert: Issued | None, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    if cert is not None:
        ctx.load_cert_chain(cert.cert_path, cert.key_path)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def https(server: ServerProcess) -> str:
    return f"https://localhost:{server.http_port}"


def wait_tls(server: ServerProcess, ctx: ssl.SSLContext, timeout: float = 90.0) -> None:
    """`start_server`'s readiness wait, over https."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            r = httpx.get(https(server) + "/v2/health/ready", verify=ctx, timeout=1.0)
            if r.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"TLS server not ready after {timeout}s:\n{server.log()}")


@contextlib.contextmanager
def start_tls(
    repo: Path, log_dir: Path, ready_ctx: ssl.SSLContext, *args: str
) -> Iterator[ServerProcess]:
    server = start_server(repo, log_dir, *args, wait=False)
    try:
        wait_tls(server, ready_ctx)
        yield server
    finally:
        server.stop()


def infer_httpx(server: ServerProcess, ctx: ssl.SSLContext) -> httpx.Response:
    with httpx.Client(base_url=https(server), verify=ctx, timeout=10) as client:
        return client.post("/v2/models/sum/infer", json=INFER_JSON)


def assert_sum(doc: dict[str, object]) -> None:
    outputs = doc["outputs"]
    assert isinstance(outputs, list)
    assert outputs[0]["data"] == [10.0]


def grpc_request() -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="sum", id="tls")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(ROW.tobytes())
    return request


def infer_grpcio(server: ServerProcess, pki: Pki, cert: Issued | None) -> float:
    key, chain = cert.read() if cert is not None else (None, None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_path.read_bytes(), private_key=key, certificate_chain=chain
    )
    with grpc.secure_channel(f"localhost:{server.grpc_port}", credentials) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(grpc_request(), timeout=10)
    assert response.model_name == "sum"
    return float(np.frombuffer(response.raw_output_contents[0], dtype=np.float32)[0])


def triton_http_client(
    server: ServerProcess, pki: Pki, cert: Issued | None
) -> triton_http.InferenceServerClient:
    gevent_ssl = need("gevent.ssl", "'tritonclient[http]'")

    def factory() -> ssl.SSLContext:
        ctx: ssl.SSLContext = gevent_ssl.create_default_context(cafile=str(pki.ca.cert_path))
        if cert is not None:
            ctx.load_cert_chain(cert.cert_path, cert.key_path)
        return ctx

    return triton_http.InferenceServerClient(
        f"localhost:{server.http_port}", ssl=True, ssl_context_factory=factory
    )


def infer_tritonclients(server: ServerProcess, pki: Pki, cert: Issued | None) -> None:
    http_client = triton_http_client(server, pki, cert)
    try:
        assert http_client.is_server_ready()
        inp = triton_http.InferInput("input", [1, 4], "FP32")
        inp.set_data_from_numpy(ROW, binary_data=True)
        result = http_client.infer("sum", [inp])
        np.testing.assert_array_equal(result.as_numpy("output"), [[10.0]])
    finally:
        http_client.close()
    grpc_client = triton_grpc.InferenceServerClient(
        f"localhost:{server.grpc_port}",
        ssl=True,
        root_certificates=str(pki.ca.cert_path),
        private_key=None if cert is None else str(cert.key_path),
        certificate_chain=None if cert is None else str(cert.cert_path),
    )
    try:
        assert grpc_client.is_server_ready()
        ginp = triton_grpc.InferInput("input", [1, 4], "FP32")
        ginp.set_data_from_numpy(ROW)
        gresult = grpc_client.infer("sum", [ginp])
        np.testing.assert_array_equal(gresult.as_numpy("output"), [[10.0]])
    finally:
        grpc_client.close()


# --- raw handshakes ----------------------------------------------------------------------------


def presented_serial(port: int, ca: CA, alpn: list[str]) -> int:
    """The serial of the certificate a new connection to `port` is shown."""
    ctx = client_context(ca, None, alpn)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        assert tls.selected_alpn_protocol() == alpn[0]
        return serial_of(ssl.DER_cert_to_PEM_cert(der))


def talk(port: int, ca: CA, cert: Issued | None, alpn: list[str], *, tls12: bool = False) -> str:
    """How a connection with this client certificate (or none) fares: "answered" when the server
    sends something back, "handshake failed", or "closed" (no answer to a request).

    asyncio's TLS (uvloop's too) drops the connection on a failed handshake without sending the
    alert that OpenSSL prepared, so a refusal shows as an end of the connection: during the
    handshake under TLS 1.2, where the server checks the client's certificate before finishing
    its side, and under TLS 1.3 only on the first read, since the client's side of the handshake
    is done before the server has looked at the certificate."""
    ctx = client_context(ca, cert, alpn)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            tls = ctx.wrap_socket(raw, server_hostname="localhost")
        except (ssl.SSLError, ConnectionError):
            return "handshake failed"
        with tls:
            try:
                # An HTTP request, or on the gRPC port the HTTP/2 preface (the server's SETTINGS
                # frame answers it).
                hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" if alpn == GRPC_ALPN else b""
                tls.sendall(hello or b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                data = tls.recv(1024)
            except (ssl.SSLError, ConnectionError):
                return "closed"
    return "answered" if data else "closed"


def assert_refused(server: ServerProcess, which: str, ca: CA, cert: Issued | None) -> None:
    port, alpn = _port(server, which)
    assert talk(port, ca, cert, alpn, tls12=True) == "handshake failed"
    assert talk(port, ca, cert, alpn) in ("handshake failed", "closed")


# --- TLS without client certificates -----------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(pki: Pki, repo: Path) -> Iterator[ServerProcess]:
    with start_tls(
        repo, pki.base, client_context(pki.ca, None),
        "--tls-cert", str(pki.server.cert_path), "--tls-key", str(pki.server.key_path),
    ) as server:  # fmt: skip
        yield server


def test_https_infer_with_httpx(tls_server: ServerProcess, pki: Pki) -> None:
    r = infer_httpx(tls_server, client_context(pki.ca, None))
    assert r.status_code == 200, r.text
    assert_sum(r.json())
    # Addressed by IP too: the certificate names 127.0.0.1.
    ctx = client_context(pki.ca, None)
    r = httpx.get(f"https://127.0.0.1:{tls_server.http_port}/v2/health/live", verify=ctx)
    assert r.json() == {"live": True}


def test_tritonclient_http_and_grpc_over_tls(tls_server: ServerProcess, pki: Pki) -> None:
    infer_tritonclients(tls_server, pki, None)


def test_grpcio_secure_channel(tls_server: ServerProcess, pki: Pki) -> None:
    assert infer_grpcio(tls_server, pki, None) == 10.0


def test_both_ports_present_the_certificate_with_their_alpn(
    tls_server: ServerProcess, pki: Pki
) -> None:
    assert presented_serial(tls_server.http_port, pki.ca, HTTP_ALPN) == pki.server.serial
    assert presented_serial(tls_server.grpc_port, pki.ca, GRPC_ALPN) == pki.server.serial


def test_plain_requests_to_a_tls_port_fail(tls_server: ServerProcess, pki: Pki) -> None:
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{tls_server.http_port}/v2/health/live", timeout=5)
    with grpc.insecure_channel(tls_server.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(grpc_request(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # ... and nothing older than TLS 1.2 is spoken.
    old = client_context(pki.ca, None)
    with warnings.catch_warnings():  # deprecated versions, which is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that this client really offers TLS 1.0/1.1
    with (
        socket.create_connection(("127.0.0.1", tls_server.http_port), timeout=5) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)) as refused,
    ):
        old.wrap_socket(raw, server_hostname="localhost")
    assert "NO_CIPHERS" not in str(refused.value)  # the server refused, not this client


# --- mTLS required -----------------------------------------------------------------------------

ACCESS = """\
keys: null
mtls:
  - {common_name: alice, san: "URI:spiffe://inferplane.test/*", tenant: acme, scopes: [infer]}
grants:
  - {tenant: acme, scopes: [infer, read]}
"""


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, repo: Path) -> Iterator[ServerProcess]:
    access = pki.base / "access.yaml"
    access.write_text(ACCESS)
    with start_tls(
        repo, pki.base, client_context(pki.ca, pki.alice),
        "--tls-cert", str(pki.server.cert_path), "--tls-key", str(pki.server.key_path),
        "--tls-client-ca", str(pki.ca.cert_path), "--tls-require-client-cert",
        "--access", str(access),
    ) as server:  # fmt: skip
        yield server


@pytest.mark.parametrize("port", ["http", "grpc"])
def test_mtls_refuses_handshakes_without_a_good_certificate(
    mtls_server: ServerProcess, pki: Pki, port: str
) -> None:
    number, alpn = _port(mtls_server, port)
    for tls12 in (True, False):  # the same probe with a good certificate is answered
        assert talk(number, pki.ca, pki.alice, alpn, tls12=tls12) == "answered"
    assert_refused(mtls_server, port, pki.ca, None)  # no certificate
    assert_refused(mtls_server, port, pki.ca, pki.mallory)  # one from another CA


def test_mtls_refusals_with_the_real_clients(mtls_server: ServerProcess, pki: Pki) -> None:
    with pytest.raises(httpx.TransportError):
        infer_httpx(mtls_server, client_context(pki.ca, None))
    with pytest.raises(httpx.TransportError):
        infer_httpx(mtls_server, client_context(pki.ca, pki.mallory))
    for cert in (None, pki.mallory):
        with pytest.raises(grpc.RpcError) as caught:
            infer_grpcio(mtls_server, pki, cert)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_serves_a_good_certificate_with_every_client(
    mtls_server: ServerProcess, pki: Pki
) -> None:
    r = infer_httpx(mtls_server, client_context(pki.ca, pki.alice))
    assert r.status_code == 200, r.text
    assert_sum(r.json())
    assert infer_grpcio(mtls_server, pki, pki.alice) == 10.0
    infer_tritonclients(mtls_server, pki, pki.alice)


def test_the_client_certificate_reaches_the_access_rules(
    mtls_server: ServerProcess, pki: Pki
) -> None:
    """bob's certificate verifies but no mtls rule maps it: 401 on the direct infer path, on the
    ASGI path (model metadata) and on gRPC, naming the subject the server read from it."""
    bob = client_context(pki.ca, pki.bob)
    with httpx.Client(base_url=https(mtls_server), verify=bob, timeout=10) as client:
        r = client.post("/v2/models/sum/infer", json=INFER_JSON)
        assert r.status_code == 401, r.text
        assert "CN=bob,O=inferplane tests" in r.json()["error"]
        r = client.get("/v2/models/sum")
        assert r.status_code == 401, r.text
        assert "CN=bob,O=inferplane tests" in r.json()["error"]
    alice = client_context(pki.ca, pki.alice)
    with httpx.Client(base_url=https(mtls_server), verify=alice, timeout=10) as client:
        assert client.post("/v2/models/sum/infer", json=INFER_JSON).status_code == 200
        assert client.get("/v2/models/sum").json()["name"] == "sum"
    with pytest.raises(grpc.RpcError) as caught:
        infer_grpcio(mtls_server, pki, pki.bob)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_client_certificate_reaches_infer_on_the_asgi_path(
    mtls_server: ServerProcess, pki: Pki
) -> None:
    """A query string sends infer through the ASGI path, which must see the certificate too."""
    alice = client_context(pki.ca, pki.alice)
    with httpx.Client(base_url=https(mtls_server), verify=alice, timeout=10) as client:
        r = client.post("/v2/models/sum/infer?via=asgi", json=INFER_JSON)
    assert r.status_code == 200, r.text


def _port(server: ServerProcess, which: str) -> tuple[int, list[str]]:
    return (server.http_port, HTTP_ALPN) if which == "http" else (server.grpc_port, GRPC_ALPN)


# --- reload ------------------------------------------------------------------------------------


@dataclass
class LiveFiles:
    """The certificate, key and client CA files of a server, which the tests overwrite."""

    cert: Path
    key: Path
    client_ca: Path

    def install(self, issued: Issued) -> None:
        # The key first: between the two writes the pair mismatches, which the server must
        # survive (it keeps the old pair and retries when the certificate changes too).
        shutil.copyfile(issued.key_path, self.key)
        shutil.copyfile(issued.cert_path, self.cert)


@dataclass
class Live(LiveFiles):
    server: ServerProcess


@pytest.fixture(scope="module")
def live(pki: Pki, repo: Path) -> Iterator[Live]:
    folder = pki.base / "live"
    folder.mkdir()
    files = LiveFiles(folder / "server.crt", folder / "server.key", folder / "client-ca.crt")
    files.install(pki.server)
    shutil.copyfile(pki.ca.cert_path, files.client_ca)
    with start_tls(
        repo, pki.base, client_context(pki.ca, None),
        "--tls-cert", str(files.cert), "--tls-key", str(files.key),
        "--tls-client-ca", str(files.client_ca),  # client certificates optional
    ) as server:  # fmt: skip
        yield Live(files.cert, files.key, files.client_ca, server)


def eventually(check: Callable[[], bool], what: str, timeout: float = RELOAD_WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.2)


def serving(live: Live, ca: CA, serial: int) -> bool:
    return (
        presented_serial(live.server.http_port, ca, HTTP_ALPN) == serial
        and presented_serial(live.server.grpc_port, ca, GRPC_ALPN) == serial
    )


def keep_alive_infer(tls: ssl.SSLSocket) -> bytes:
    body = httpx.Request("POST", "http://x", json=INFER_JSON).read()
    tls.sendall(
        b"POST /v2/models/sum/infer HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = tls.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    return data


def test_optional_client_certificates(live: Live, pki: Pki) -> None:
    """With --tls-client-ca alone a client may come without a certificate, not with a bad one."""
    assert infer_httpx(live.server, client_context(pki.ca, None)).status_code == 200
    assert infer_httpx(live.server, client_context(pki.ca, pki.alice)).status_code == 200
    for port in ("http", "grpc"):
        number, alpn = _port(live.server, port)
        assert talk(number, pki.ca, None, alpn) == "answered"
        assert_refused(live.server, port, pki.ca, pki.mallory)


def test_new_certificate_served_without_a_restart(live: Live, pki: Pki) -> None:
    pid = live.server.process.pid
    before = client_context(pki.ca, None, HTTP_ALPN)
    with (
        socket.create_connection(("127.0.0.1", live.server.http_port), timeout=10) as raw,
        before.wrap_socket(raw, server_hostname="localhost") as old_conn,
    ):
        assert b" 200 " in keep_alive_infer(old_conn)
        new = server_cert(pki.ca, pki.base)
        live.install(new)
        eventually(lambda: serving(live, pki.ca, new.serial), "the new certificate served")
        # The same process, and a connection from before the reload still serves.
        assert live.server.process.poll() is None and live.server.process.pid == pid
        assert b" 200 " in keep_alive_infer(old_conn)
    assert infer_httpx(live.server, client_context(pki.ca, None)).status_code == 200
    assert infer_grpcio(live.server, pki, None) == 10.0
    assert "TLS reloaded: certificate CN=localhost, serial " + hex(new.serial) in live.server.log()


@pytest.mark.parametrize("broken", ["garbage-key", "mismatched-pair", "missing-cert"])
def test_broken_new_files_keep_the_old_certificate(live: Live, pki: Pki, broken: str) -> None:
    good = server_cert(pki.ca, pki.base)
    live.install(good)
    eventually(lambda: serving(live, pki.ca, good.serial), "the good certificate served")
    failures = live.server.log().count("TLS reload failed")
    if broken == "garbage-key":
        live.key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    elif broken == "mismatched-pair":
        other = server_cert(pki.ca, pki.base)
        shutil.copyfile(other.cert_path, live.cert)  # with the good certificate's key
    else:
        live.cert.unlink()
    eventually(
        lambda: live.server.log().count("TLS reload failed") > failures, "the failure logged"
    )
    assert serving(live, pki.ca, good.serial)
    assert infer_httpx(live.server, client_context(pki.ca, None)).status_code == 200
    assert infer_grpcio(live.server, pki, None) == 10.0
    # Mended files are picked up again.
    fixed = server_cert(pki.ca, pki.base)
    live.install(fixed)
    eventually(lambda: serving(live, pki.ca, fixed.serial), "the mended files served")


def test_sighup_reloads_at_once(live: Live, pki: Pki) -> None:
    """Unchanged files are reloaded only on request: SIGHUP."""
    reloads = live.server.log().count("TLS reloaded")
    live.server.process.send_signal(signal.SIGHUP)
    eventually(lambda: live.server.log().count("TLS reloaded") > reloads, "a reload", 3.0)
    assert live.server.process.poll() is None
    assert infer_httpx(live.server, client_context(pki.ca, None)).status_code == 200


def test_client_ca_bundle_replaced(live: Live, pki: Pki) -> None:
    """A new CA bundle replaces the old one: its clients get in, the old CA's are refused."""
    shutil.copyfile(pki.other_ca.cert_path, live.client_ca)

    def accepted(cert: Issued) -> bool:
        try:
            return infer_httpx(live.server, client_context(pki.ca, cert)).status_code == 200
        except httpx.TransportError:
            return False

    eventually(lambda: accepted(pki.mallory), "a certificate of the new CA accepted")
    assert infer_grpcio(live.server, pki, pki.mallory) == 10.0
    assert_refused(live.server, "http", pki.ca, pki.alice)
    assert_refused(live.server, "grpc", pki.ca, pki.alice)
    shutil.copyfile(pki.ca.cert_path, live.client_ca)
    eventually(lambda: accepted(pki.alice), "the first CA back")
    assert not accepted(pki.mallory)


# --- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--tls-cert", "{cert}"], "needs --tls-key"),
        (["--tls-key", "{key}"], "needs --tls-cert"),
        (["--tls-cert", "{cert}", "--tls-key", "{key}", "--tls-require-client-cert"],
         "needs --tls-client-ca"),
        (["--tls-cert", "{cert}", "--tls-key", "{other_key}"], "key values mismatch"),
        (["--tls-cert", "{cert}", "--tls-key", "{key}", "--http-server", "granian"],
         "TLS needs --http-server uvicorn"),
    ],
    ids=["no-key", "no-cert", "require-without-ca", "mismatched", "granian"],
)  # fmt: skip
def test_serve_refuses_tls_options_that_cannot_work(
    pki: Pki, repo: Path, args: list[str], words: str
) -> None:
    names = {
        "cert": str(pki.server.cert_path),
        "key": str(pki.server.key_path),
        "other_key": str(pki.alice.key_path),
    }
    cmd = [sys.executable, "-m", "inferplane", "serve", "--repository", str(repo), "--http-port",
           "0", "--grpc-port", "0", *(a.format(**names) for a in args)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert words in " ".join(done.stderr.split()), done.stderr
