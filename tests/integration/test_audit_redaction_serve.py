"""Redacted payloads end to end: `inferplane serve --audit-payload-sample 1` with redaction rules
in its services file, requests over REST, then the SQLite audit trail as the server wrote it."""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferplane.repository.register import register
from inferplane.repository.store import Repository
from inferplane.tensors import TensorSpec
from tests.integration.servers import ServerProcess, start_server

SALT = "e2e-audit-salt"
ANN, BOB, SSN = "ann@example.com", "bob@example.com", "123-45-6789"
OPEN, OPEN_SSN = "open@example.com", "000-00-0000"  # for the service that redacts nothing

MODEL = textwrap.dedent(
    """
    import numpy as np


    class Model:
        def predict(self, inputs):
            return {"score": inputs["features"].sum(axis=1)}
    """
)

POLICY = """
services:
  checks:
    routes: [{model: fraud, weight: 100}]
    audit:
      redact:
        - {field: email, action: hash}
        - {field: "features[1]", action: drop}
        - {field: ssn, action: drop}
  plain:                      # no rules of its own: the defaults of the model that answers
    routes: [{model: fraud, weight: 100}]
  open:                       # an empty list of its own: nothing redacted
    routes: [{model: fraud, weight: 100}]
    audit: {redact: []}
audit:
  redact:
    - {target: "fraud*", field: email, action: hash}
    - {target: "fraud*", field: ssn, action: drop}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("redaction")
    src = base / "src"
    src.mkdir()
    (src / "model.py").write_text(MODEL)
    repo = base / "models"
    register(
        Repository(str(repo)),
        "fraud",
        str(src),
        runtime="python",
        inputs=[
            TensorSpec("email", "BYTES", [-1]),
            TensorSpec("features", "FP32", [-1, 3]),
            TensorSpec("ssn", "BYTES", [-1]),
        ],
        outputs=[TensorSpec("score", "FP32", [-1])],
        instance_kind="thread",
    )
    policy = base / "services.yaml"
    policy.write_text(POLICY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INFERPLANE_AUDIT_SALT", SALT)  # the server inherits it
        srv = start_server(
            repo, base, "--services", str(policy), "--audit-payload-sample", "1", grpc=False
        )
    try:
        deadline = time.monotonic() + 30
        while "checks" not in httpx.get(srv.url + "/inferplane/services").json()["services"]:
            assert time.monotonic() < deadline, f"the policy never applied:\n{srv.log()}"
            time.sleep(0.1)
        yield srv
    finally:
        srv.stop()


def body(request_id: str, email: str, features: list[float], ssn: str = SSN) -> dict[str, Any]:
    return {
        "id": request_id,
        "inputs": [
            {"name": "email", "datatype": "BYTES", "shape": [1], "data": [email]},
            {"name": "features", "datatype": "FP32", "shape": [1, 3], "data": features},
            {"name": "ssn", "datatype": "BYTES", "shape": [1], "data": [ssn]},
        ],
    }


def mac(value: str) -> str:
    return "hmac-sha256:" + hmac.new(SALT.encode(), value.encode(), hashlib.sha256).hexdigest()


def test_sampled_payloads_are_redacted_before_they_reach_the_database(
    server: ServerProcess,
) -> None:
    calls = [
        ("checks", "c1", ANN, [0.5, 1.25, 2.0], SSN),
        ("checks", "c2", ANN, [0.5, 1.25, 2.0], SSN),  # the same request again
        ("checks", "c3", BOB, [4.5, 5.25, 6.0], SSN),
        ("fraud", "d1", ANN, [0.5, 1.25, 2.0], SSN),  # a direct model call: the defaults
        ("plain", "p1", ANN, [0.5, 1.25, 2.0], SSN),
        ("open", "o1", OPEN, [0.5, 1.25, 2.0], OPEN_SSN),
    ]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for target, rid, email, features, ssn in calls:
            r = client.post(f"/v2/models/{target}/infer", json=body(rid, email, features, ssn))
            assert r.status_code == 200, r.text
    server.stop()  # graceful: the audit log is flushed before the process exits

    with sqlite3.connect(server.audit_db) as db:
        rows = {
            rid: (json.loads(payload), digest, principal)
            for rid, payload, digest, principal in db.execute(
                "SELECT request_id, payload, payload_hash, principal FROM audit"
            )
        }
    db.close()
    assert set(rows) == {rid for _, rid, *_ in calls}
    payloads = {rid: p for rid, (p, _, _) in rows.items()}

    # The service's own rules: the email hashed with the salt, column 1 and the ssn dropped.
    c1 = payloads["c1"]
    assert c1["email"] == {
        "dtype": "object",
        "shape": [1],
        "data": [mac(ANN)],
        "redacted": {"*": "hash"},
    }
    assert c1["features"]["data"] == [0.5, None, 2.0]
    assert c1["features"]["redacted"] == {"1": "drop"}
    assert c1["ssn"] == {"dtype": "object", "shape": [1], "redacted": {"*": "drop"}}
    assert payloads["c2"] == c1  # the same input, the same hash: joins on it still work
    assert rows["c2"][1] == rows["c1"][1]  # ... and so does payload_hash
    assert payloads["c3"]["email"]["data"] == [mac(BOB)] != c1["email"]["data"]
    assert payloads["c3"]["features"]["data"] == [4.5, None, 6.0]
    assert rows["c3"][1] != rows["c1"][1]

    # A direct call and a service without rules get the defaults of the model ("fraud*").
    for rid in ("d1", "p1"):
        p = payloads[rid]
        assert p["email"]["data"] == [mac(ANN)], rid
        assert "data" not in p["ssn"], rid
        assert p["features"]["data"] == [0.5, 1.25, 2.0], rid  # no column rule there
    # A service whose own list is empty keeps the payload as it came.
    assert payloads["o1"]["email"]["data"] == [OPEN]
    assert payloads["o1"]["ssn"]["data"] == [OPEN_SSN]

    # No edge authenticated these callers: the principal column is there, and empty.
    assert {principal for _, _, principal in rows.values()} == {None}

    # No raw value of a redacted field in any byte of the database's files (WAL included);
    # the unredacted service's values are there, so the scan does see payloads.
    files = sorted(Path(server.audit_db).parent.glob(Path(server.audit_db).name + "*"))
    raw = b"".join(f.read_bytes() for f in files)
    assert OPEN.encode() in raw and OPEN_SSN.encode() in raw
    for secret in (ANN, BOB, SSN):
        assert secret.encode() not in raw, secret
        assert secret not in server.log(), secret
