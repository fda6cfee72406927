"""The edge on a real server: API keys (made with the real CLI), JWT bearer tokens against a JWKS,
scopes on every endpoint family over REST, V1 and gRPC (tritonclient), tenants bound to their
principal, quotas with 429 + Retry-After, and rules reloaded while the server runs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tritonclient.utils import InferenceServerException

from tests.conftest import write_onnx_model
from tests.integration.servers import ROOT, ServerProcess, start_server

ISSUER, AUDIENCE = "https://idp.test/", "inferplane"
ROW = [[1.0, 2.0, 3.0, 4.0]]
SLOW_MODEL = textwrap.dedent(
    """
    import time

    import numpy as np


    class Model:
        def predict(self, inputs):
            time.sleep(0.4)
            return {"output": np.asarray(inputs["input"]).sum(axis=1, keepdims=True)}
    """
)


def body(rows: list[list[float]] = ROW) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [len(rows), 4],
                "data": [x for row in rows for x in row],
            }
        ]
    }


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferplane", *args], capture_output=True, text=True, cwd=ROOT
    )


def new_key(access: Path, tenant: str, scopes: str, targets: str = "*", **extra: str) -> str:
    args = ["keys", "create", "--access", str(access), "--tenant", tenant, "--scopes", scopes]
    args += ["--targets", targets]
    for name, value in extra.items():
        args += [f"--{name}", value]
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert key.startswith("ipk_") and "shown only now" in done.stderr
    return key


@dataclass
class Idp:
    """A test identity provider: signing keys and the JWKS a server trusts."""

    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey
    jwks_path: Path

    def token(self, key: str = "rsa", **overrides: Any) -> str:
        now = int(time.time())
        claims = {
            "sub": "alice", "tenant": "acme", "iss": ISSUER, "aud": AUDIENCE,
            "iat": now, "exp": now + 300, "scope": "openid infer",
        }  # fmt: skip
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        if key == "rsa":
            return jwt.encode(claims, self.rsa_key, "RS256", headers={"kid": "rsa-1"})
        return jwt.encode(claims, self.ec_key, "ES256", headers={"kid": "ec-1"})


def make_idp(folder: Path) -> Idp:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    keys = []
    for kid, alg, public in (
        ("rsa-1", "RS256", jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)),
        ("ec-1", "ES256", jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)),
    ):
        keys.append({**public, "kid": kid, "alg": alg, "use": "sig"})
    path = folder / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    return Idp(rsa_key, ec_key, path)


@dataclass
class EdgeServer:
    server: ServerProcess
    access: Path
    idp: Idp
    keys: dict[str, str]

    def client(self, key: str | None = None, **headers: str) -> httpx.Client:
        if key is not None:
            headers["authorization"] = f"Bearer {self.keys.get(key, key)}"
        return httpx.Client(base_url=self.server.url, headers=headers, timeout=10)


ACCESS = """
keys: keys.yaml
jwt: {jwks_file: jwks.json, issuer: "https://idp.test/", audience: inferplane}
metrics: read
grants:
  - {tenant: acme, scopes: [read], targets: ["fraud*"]}
  - {principal: alice, scopes: [read]}
quotas:
  - {tenant: limited, requests_per_s: 2, burst: 3}
  - {tenant: rows, rows_per_s: 4, rows_burst: 4}
  - {tenant: conc, max_inflight: 1}
"""


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeServer]:
    base = tmp_path_factory.mktemp("edge")
    repo = base / "models"
    from inferplane.repository.register import register
    from inferplane.repository.store import Repository
    from inferplane.tensors import TensorSpec

    onnx = write_onnx_model(base / "sum.onnx")
    for name in ("fraud", "tabular"):
        register(Repository(str(repo)), name, onnx)
    slow = base / "slow"
    slow.mkdir()
    (slow / "model.py").write_text(SLOW_MODEL)
    register(
        Repository(str(repo)),
        "slow",
        str(slow),
        inputs=[TensorSpec("input", "FP32", [-1, 4])],
        outputs=[TensorSpec("output", "FP32", [-1, 1])],
    )
    access = base / "access.yaml"
    access.write_text(ACCESS)
    idp = make_idp(base)
    keys = {
        "infer": new_key(access, "acme", "infer", "fraud*", principal="acme-app"),
        "reader": new_key(access, "acme", "read", principal="acme-dash"),
        "admin": new_key(access, "ops", "admin", principal="ops"),
        "limited": new_key(access, "limited", "infer"),
        "rows": new_key(access, "rows", "infer"),
        "conc": new_key(access, "conc", "infer"),
        "revoked": new_key(access, "acme", "infer"),
    }
    server = start_server(repo, base, "--access", str(access))
    yield EdgeServer(server, access, idp, keys)
    server.stop()


def assert_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    message = r.json()["error"]
    for word in words:
        assert word in message, message


# --- authentication -----------------------------------------------------------------------------


def test_no_credentials_is_401_with_a_challenge_and_health_stays_open(edge: EdgeServer) -> None:
    with edge.client() as c:
        r = c.post("/v2/models/fraud/infer", json=body())
        assert_error(r, 401, "no credentials")
        assert r.headers["www-authenticate"].startswith("Bearer")
        for path in ("/v2/models/fraud", "/v2", "/metrics", "/inferplane/services"):
            assert c.get(path).status_code == 401, path
        assert c.post("/v2/repository/index").status_code == 401
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").status_code == 200
        assert c.get("/v2/models/fraud/ready").status_code == 200


def test_unknown_malformed_and_revoked_keys_are_refused(edge: EdgeServer) -> None:
    forged = edge.keys["infer"][:-4] + "AAAA"
    with edge.client(forged) as c:
        assert_error(c.post("/v2/models/fraud/infer", json=body()), 401, "unknown API key")
    with edge.client("ipk_nothex") as c:
        assert_error(c.post("/v2/models/fraud/infer", json=body()), 401)
    with httpx.Client(base_url=edge.server.url, headers={"authorization": "Basic eDp5"}) as c:
        assert_error(c.post("/v2/models/fraud/infer", json=body()), 401, "Bearer")
    with edge.client("revoked") as c:
        assert c.post("/v2/models/fraud/infer", json=body()).status_code == 200
        key_id = edge.keys["revoked"].split("_")[1]
        done = cli("keys", "revoke", key_id, "--access", str(edge.access))
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = c.post("/v2/models/fraud/infer", json=body())
            if r.status_code == 401:
                break
            time.sleep(0.2)
        assert_error(r, 401, "revoked")


def test_x_api_key_header_works_like_bearer(edge: EdgeServer) -> None:
    with httpx.Client(base_url=edge.server.url, headers={"x-api-key": edge.keys["infer"]}) as c:
        assert c.post("/v2/models/fraud/infer", json=body()).status_code == 200


def test_a_key_created_while_serving_works_without_restart(edge: EdgeServer) -> None:
    key = new_key(edge.access, "acme", "infer", "fraud")
    with edge.client(key) as c:
        deadline = time.monotonic() + 10
        while (r := c.post("/v2/models/fraud/infer", json=body())).status_code == 401:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)
        assert r.status_code == 200, r.text


# --- JWT ----------------------------------------------------------------------------------------


def test_jwt_good_rs256_and_es256_tokens_are_accepted(edge: EdgeServer) -> None:
    for key in ("rsa", "ec"):
        with edge.client(edge.idp.token(key)) as c:
            r = c.post("/v2/models/fraud/infer", json=body())
            assert r.status_code == 200, r.text
            # alice's grant gives read on everything; her token's scope claim gives infer
            assert c.get("/v2/models/tabular").status_code == 200
            assert_error(c.post("/v2/repository/models/fraud/unload"), 403, "admin")


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"aud": "someone-else"}, "audience"),
        ({"iss": "https://evil.test/"}, "issued"),
        ({"exp": None}, "exp"),
    ],
)
def test_jwt_bad_claims_are_401(edge: EdgeServer, overrides: dict[str, Any], words: str) -> None:
    with edge.client(edge.idp.token(**overrides)) as c:
        r = c.post("/v2/models/fraud/infer", json=body())
        assert_error(r, 401, words)
        assert "invalid_token" in r.headers["www-authenticate"]


def test_jwt_signed_by_another_key_alg_none_and_hs256_confusion_are_refused(
    edge: EdgeServer,
) -> None:
    now = int(time.time())
    claims = {"sub": "mallory", "tenant": "acme", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 60}
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    wrong_key = jwt.encode(claims, other, "RS256", headers={"kid": "rsa-1"})
    unsigned = jwt.encode(claims, None, "none")
    # The classic confusion: the server's public key used as an HMAC secret.
    # Signed by hand: PyJWT itself refuses to use a public key as an HMAC secret.
    public_pem = edge.idp.rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = b".".join(
        _b64(json.dumps(part).encode())
        for part in ({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims)
    )
    signature = _b64(hmac.new(public_pem, signing_input, hashlib.sha256).digest())
    hs = (signing_input + b"." + signature).decode()
    for token, words in ((wrong_key, "signature"), (unsigned, "'none'"), (hs, "'HS256'")):
        with edge.client(token) as c:
            assert_error(c.post("/v2/models/fraud/infer", json=body()), 401, words)


def _b64(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def test_jwt_tenant_comes_from_the_token(edge: EdgeServer) -> None:
    with edge.client(edge.idp.token(), **{"x-tenant": "globex"}) as c:
        assert_error(c.post("/v2/models/fraud/infer", json=body()), 403, "globex", "acme")
    with edge.client(edge.idp.token(), **{"x-tenant": "acme"}) as c:
        assert c.post("/v2/models/fraud/infer", json=body()).status_code == 200


# --- scopes on each endpoint family -------------------------------------------------------------


def test_infer_scope_is_per_target(edge: EdgeServer) -> None:
    with edge.client("infer") as c:
        assert c.post("/v2/models/fraud/infer", json=body()).status_code == 200
        assert c.post("/v2/models/fraud/versions/1/infer", json=body()).status_code == 200
        assert_error(c.post("/v2/models/tabular/infer", json=body()), 403, "infer", "tabular")
        # the acme tenant's grant gives read on fraud*, not on tabular
        assert c.get("/v2/models/fraud").status_code == 200
        assert_error(c.get("/v2/models/tabular"), 403, "read")
        assert_error(c.post("/v2/repository/models/fraud/load"), 403, "admin")
        assert_error(c.get("/inferplane/services"), 403, "admin")


def test_read_scope_lists_only_permitted_models(edge: EdgeServer) -> None:
    with edge.client("reader") as c:
        names = {row["name"] for row in c.post("/v2/repository/index").json()}
        assert names == {"fraud", "slow", "tabular"}  # the key reads every target
        assert_error(c.post("/v2/models/fraud/infer", json=body()), 403, "infer")
        assert c.get("/metrics").status_code == 200
        assert c.get("/v2/models/tabular/config").status_code == 200
    with edge.client("infer") as c:  # reads fraud* through its tenant's grant only
        names = {row["name"] for row in c.post("/v2/repository/index").json()}
        assert names == {"fraud"}
        stats = c.get("/v2/models/stats").json()["model_stats"]
        assert {row["name"] for row in stats} == {"fraud"}
        assert_error(c.get("/metrics"), 403, "read")


def test_admin_scope_loads_unloads_and_reads_the_policy(edge: EdgeServer) -> None:
    with edge.client("admin") as c:
        assert c.post("/v2/repository/models/tabular/unload").status_code == 200
        assert c.post("/v2/repository/models/tabular/load").status_code == 200
        assert c.get("/inferplane/services").status_code == 200
        assert c.get("/v2/models/tabular").status_code == 200  # admin includes read
        assert_error(c.post("/v2/models/tabular/infer", json=body()), 403, "infer")


def test_v1_predict_and_status_are_gated(edge: EdgeServer) -> None:
    doc = {"instances": ROW}
    with edge.client() as c:
        assert_error(c.post("/v1/models/fraud:predict", json=doc), 401)
    with edge.client("infer") as c:
        r = c.post("/v1/models/fraud:predict", json=doc)
        assert r.status_code == 200 and r.json()["predictions"] == [[10.0]], r.text
        assert_error(c.post("/v1/models/tabular:predict", json=doc), 403)
        assert c.get("/v1/models/fraud").status_code == 200
        assert_error(c.get("/v1/models/tabular"), 403)


def test_grpc_codes_and_scopes(edge: EdgeServer) -> None:
    client = triton_grpc.InferenceServerClient(edge.server.grpc_target)
    inp = triton_grpc.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(np.asarray(ROW, dtype=np.float32))

    def code(fn: Any, *args: Any, **kwargs: Any) -> str:
        with pytest.raises(InferenceServerException) as info:
            fn(*args, **kwargs)
        return str(info.value.status())

    assert client.is_server_live() and client.is_model_ready("fraud")
    assert "UNAUTHENTICATED" in code(client.infer, "fraud", [inp])
    assert "UNAUTHENTICATED" in code(client.get_model_metadata, "fraud")
    good = {"authorization": f"Bearer {edge.keys['infer']}"}
    result = client.infer("fraud", [inp], headers=good)
    assert result.as_numpy("output").tolist() == [[10.0]]
    assert "PERMISSION_DENIED" in code(client.infer, "tabular", [inp], headers=good)
    assert "PERMISSION_DENIED" in code(client.unload_model, "fraud", headers=good)
    index = client.get_model_repository_index(headers=good, as_json=True)
    assert {m["name"] for m in index["models"]} == {"fraud"}
    admin = {"x-api-key": edge.keys["admin"]}
    client.load_model("tabular", headers=admin)
    jwt_headers = {"authorization": f"Bearer {edge.idp.token('ec')}"}
    assert client.get_model_metadata("tabular", headers=jwt_headers).name == "tabular"
    client.close()


# --- quotas -------------------------------------------------------------------------------------


def test_rate_limit_answers_429_with_retry_after_on_rest_and_grpc(edge: EdgeServer) -> None:
    with edge.client("limited") as c:
        codes = [c.post("/v2/models/fraud/infer", json=body()).status_code for _ in range(6)]
        assert codes[:3] == [200, 200, 200] and 429 in codes[3:], codes
        r = c.post("/v2/models/fraud/infer", json=body())
        assert_error(r, 429, "rate limit", "limited")
        assert int(r.headers["retry-after"]) >= 1
        time.sleep(float(r.headers["retry-after"]) + 0.1)
        assert c.post("/v2/models/fraud/infer", json=body()).status_code == 200
    client = triton_grpc.InferenceServerClient(edge.server.grpc_target)
    inp = triton_grpc.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(np.asarray(ROW, dtype=np.float32))
    headers = {"authorization": f"Bearer {edge.keys['limited']}"}
    statuses = []
    for _ in range(6):
        try:
            client.infer("fraud", [inp], headers=headers)
            statuses.append("OK")
        except InferenceServerException as exc:
            statuses.append(str(exc.status()))
    assert any("RESOURCE_EXHAUSTED" in s for s in statuses), statuses
    client.close()
    with edge.client("admin") as c:
        text = c.get("/metrics", headers={"authorization": f"Bearer {edge.keys['reader']}"}).text
    assert 'inferplane_edge_requests_total{outcome="rate_limited",tenant="limited"}' in text


def test_rows_quota_counts_the_batch_axis(edge: EdgeServer) -> None:
    with edge.client("rows") as c:
        assert c.post("/v2/models/fraud/infer", json=body(ROW * 4)).status_code == 200
        r = c.post("/v2/models/fraud/infer", json=body(ROW * 2))
        assert_error(r, 429, "rows quota")
        time.sleep(float(r.headers["retry-after"]))
        assert c.post("/v2/models/fraud/infer", json=body(ROW * 2)).status_code == 200


def test_inflight_cap_refuses_the_second_concurrent_request(edge: EdgeServer) -> None:
    import concurrent.futures

    with (
        edge.client("conc") as c,
        concurrent.futures.ThreadPoolExecutor(2) as pool,
    ):
        first = pool.submit(c.post, "/v2/models/slow/infer", json=body())
        time.sleep(0.15)
        second = c.post("/v2/models/slow/infer", json=body())
        assert_error(second, 429, "in flight")
        assert first.result().status_code == 200
        assert c.post("/v2/models/slow/infer", json=body()).status_code == 200


# --- secure by default --------------------------------------------------------------------------


def test_serve_refuses_a_public_bind_without_access(tmp_path: Path) -> None:
    write_onnx_model(tmp_path / "m.onnx")
    from inferplane.repository.register import register
    from inferplane.repository.store import Repository

    register(Repository(str(tmp_path / "repo")), "m", str(tmp_path / "m.onnx"))
    done = cli("serve", "--repository", str(tmp_path / "repo"), "--host", "0.0.0.0")
    assert done.returncode == 2
    assert "--access" in done.stderr and "--insecure" in done.stderr


def test_serve_refuses_a_broken_access_file(tmp_path: Path) -> None:
    write_onnx_model(tmp_path / "m.onnx")
    from inferplane.repository.register import register
    from inferplane.repository.store import Repository

    register(Repository(str(tmp_path / "repo")), "m", str(tmp_path / "m.onnx"))
    bad = tmp_path / "access.yaml"
    bad.write_text("grants: [{tenant: a, scopes: [fly]}]\n")
    done = cli("serve", "--repository", str(tmp_path / "repo"), "--access", str(bad))
    assert done.returncode == 2
    assert "unknown scope 'fly'" in done.stderr


def test_the_audit_records_the_principal_and_its_tenant(edge: EdgeServer) -> None:
    from inferplane.observability.audit import query

    with edge.client("infer", **{"x-request-id": "ignored"}) as c:
        doc = body()
        doc["id"] = "audited-by-principal"
        assert c.post("/v2/models/fraud/infer", json=doc).status_code == 200
    deadline = time.monotonic() + 10
    while not (rows := query(str(edge.server.audit_db), request_id="audited-by-principal")):
        assert time.monotonic() < deadline, "the record never reached the audit trail"
        time.sleep(0.1)
    assert rows[0].principal == "acme-app" and rows[0].tenant == "acme"
    assert {r.principal for r in query(str(edge.server.audit_db), principal="acme-app")} == {
        "acme-app"
    }
