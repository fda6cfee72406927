"""Redaction of sampled audit payloads: the rules' syntax, what each action does to numpy
tensors, the salt, which rules apply to which target, and the predictor applying them."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inferplane.context import RequestContext
from inferplane.engine.manager import ModelManager
from inferplane.errors import BadRequest
from inferplane.observability import redaction
from inferplane.observability.audit import AuditLog, AuditRecord, payload_hash, payload_json
from inferplane.observability.metrics import Metrics
from inferplane.observability.redaction import (
    NO_REDACTION,
    AuditRules,
    Redactor,
    RedactRule,
    audit_salt,
    parse_field,
    parse_rule,
)
from inferplane.predictor import InProcessPredictor
from inferplane.repository.register import register
from inferplane.repository.store import Repository
from inferplane.routing.policy import parse_policy
from inferplane.tensors import TensorSpec

SALT = b"test-salt"


def mac(value: bytes, salt: bytes = SALT) -> str:
    return "hmac-sha256:" + hmac.new(salt, value, hashlib.sha256).hexdigest()


def emails(*values: str) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=object)


def doc(redactor: Redactor, inputs: dict[str, np.ndarray], **kw: Any) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(redactor.payload_json(inputs, **kw))
    return loaded


def redactor(*rules: tuple[str, str]) -> Redactor:
    return Redactor([parse_rule(f, a) for f, a in rules], SALT)


# -- the rules' syntax ----------------------------------------------------------------------

SERVICE = "services:\n  fraud:\n    routes: [{{model: m, weight: 100}}]\n    audit: {audit}\n"


def test_fields_and_actions_parse() -> None:
    assert parse_field("email") == ("email", None)
    assert parse_field("features[3]") == ("features", 3)
    assert parse_field("input.text[0]") == ("input.text", 0)
    assert parse_rule("ssn", "drop") == RedactRule("ssn", None, "drop")
    policy = parse_policy(
        SERVICE.format(
            audit="{redact: [{field: email, action: hash}, {field: 'features[3]', action: drop}]}"
        )
        + "audit:\n  redact:\n    - {target: 'fraud*', field: email, action: hash}\n"
        + "    - {target: 'tab?lar', field: email, action: drop}\n"
    )
    own = policy.services["fraud"].audit
    assert own is not None
    assert [r.rule() for r in own.redact] == [
        RedactRule("email", None, "hash"),
        RedactRule("features", 3, "drop"),
    ]
    assert [(r.target, r.rule()) for r in policy.audit.redact] == [
        ("fraud*", RedactRule("email", None, "hash")),
        ("tab?lar", RedactRule("email", None, "drop")),
    ]
    # No audit section anywhere is the usual file, and it compiles to no rules at all.
    assert not parse_policy("services: {}").audit_rules()


@pytest.mark.parametrize(
    ("audit", "message"),
    [
        (
            "{redact: [{field: email, action: mask}]}",
            "services.fraud.audit.redact.0.action: unknown action 'mask'; use one of: hash, drop",
        ),
        (
            "{redact: [{field: 'features[x]', action: drop}]}",
            "services.fraud.audit.redact.0.field: field 'features[x]': column 'x' is not a "
            "non-negative integer",
        ),
        (
            "{redact: [{field: 'features[-1]', action: drop}]}",
            "field 'features[-1]': column '-1' is not a non-negative integer",
        ),
        (
            "{redact: [{field: 'features[3', action: drop}]}",
            "field 'features[3' is not NAME or NAME[COLUMN]",
        ),
        (
            "{redact: [{field: 'features[1][2]', action: drop}]}",
            "field 'features[1][2]' is not NAME or NAME[COLUMN]",
        ),
        ("{redact: [{field: '', action: drop}]}", "field is empty"),
        ("{redact: [{field: email}]}", "services.fraud.audit.redact.0.action: Field required"),
        (
            "{redact: [{field: e, action: drop}, {field: e, action: hash}]}",
            "services.fraud.audit: more than one rule for the field(s): e",
        ),
        (  # a target belongs to the top-level defaults only
            "{redact: [{target: x, field: e, action: drop}]}",
            "services.fraud.audit.redact.0.target: Extra inputs are not permitted",
        ),
        ("{redakt: []}", "services.fraud.audit.redakt: Extra inputs are not permitted"),
    ],
)
def test_bad_service_rules_are_refused_at_parse_time(audit: str, message: str) -> None:
    with pytest.raises(BadRequest, match="^services file: .*" + re.escape(message)):
        parse_policy(SERVICE.format(audit=audit))


@pytest.mark.parametrize(
    ("defaults", "message"),
    [
        ("{redact: [{field: e, action: drop}]}", "audit.redact.0.target: Field required"),
        ("{redact: [{target: '', field: e, action: drop}]}", "audit.redact.0.target: String"),
        (
            "{redact: [{target: a, field: e, action: drop}, {target: a, field: e, action: hash}]}",
            "audit: more than one rule for the target and field: a e",
        ),
    ],
)
def test_bad_default_rules_are_refused_at_parse_time(defaults: str, message: str) -> None:
    with pytest.raises(BadRequest, match=re.escape(message)):
        parse_policy(f"audit: {defaults}")


# -- what the actions do --------------------------------------------------------------------


def test_fp32_columns_drop_and_hash_and_the_rest_stays() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4) + 0.5
    out = doc(redactor(("x[1]", "drop"), ("x[3]", "hash")), {"x": x})["x"]
    assert out["dtype"] == "float32" and out["shape"] == [3, 4]
    assert out["redacted"] == {"1": "drop", "3": "hash"}
    data = np.array(out["data"], dtype=object).reshape(3, 4)
    assert data[:, 1].tolist() == [None, None, None]
    assert data[:, [0, 2]].tolist() == x[:, [0, 2]].tolist()
    assert data[:, 3].tolist() == [mac(json.dumps(float(v)).encode()) for v in x[:, 3]]


def test_bytes_tensor_hashed_element_by_element_with_the_salt() -> None:
    r = redactor(("email", "hash"))
    out = doc(r, {"email": emails("ann@example.com", "bob@example.com", "ann@example.com")})
    assert out["email"]["redacted"] == {"*": "hash"}
    a, b, a_again = out["email"]["data"]
    assert a == mac(b"ann@example.com") and b == mac(b"bob@example.com")
    assert a == a_again  # same value, same hash: joins on it still work
    # An unsalted sha256 of a guessed address is not what the trail holds.
    assert hashlib.sha256(b"ann@example.com").hexdigest() not in a
    other_salt = Redactor([parse_rule("email", "hash")], b"another")
    assert doc(other_salt, {"email": emails("ann@example.com")})["email"]["data"] != [a]
    # Text and numbers hash as their text, so an id hashes alike in a BYTES or INT64 tensor.
    ids = doc(redactor(("id", "hash")), {"id": np.array([[42]], dtype=np.int64)})["id"]["data"]
    assert ids == [mac(b"42")] == doc(r, {"email": emails("42")})["email"]["data"]


def test_dropped_tensor_keeps_only_dtype_and_shape() -> None:
    out = doc(redactor(("ssn", "drop")), {"ssn": emails("123-45-6789", "987-65-4321")})
    assert out == {"ssn": {"dtype": "object", "shape": [2], "redacted": {"*": "drop"}}}


def test_a_rule_for_a_missing_tensor_is_ignored() -> None:
    r = redactor(("email", "hash"), ("features[2]", "drop"))
    x = np.ones((1, 2), dtype=np.float32)
    assert doc(r, {"other": x}) == doc(NO_REDACTION, {"other": x})
    assert r.digest({"other": x}) == payload_hash({"other": x})


def test_a_column_outside_the_tensor_drops_the_whole_tensor(
    caplog: pytest.LogCaptureFixture,
) -> None:
    r = redactor(("features[3]", "hash"))
    narrow = np.ones((2, 3), dtype=np.float32)
    flat = np.ones(5, dtype=np.float32)  # 1-D: no column axis at all
    with caplog.at_level(logging.WARNING, "inferplane.audit"):
        for _ in range(3):
            assert doc(r, {"features": narrow})["features"] == {
                "dtype": "float32",
                "shape": [2, 3],
                "redacted": {"*": "drop"},
            }
        assert "data" not in doc(r, {"features": flat})["features"]
    warnings = [m for m in caplog.messages if "tensor 'features'" in m]
    assert len(warnings) == 2, warnings  # once per layout, not once per request
    assert "has no column 3" in warnings[0] and "whole payload is dropped" in warnings[0]
    assert r.digest({"features": narrow}) == r.digest({"features": narrow + 1})


def test_the_strictest_rule_wins() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    both = doc(redactor(("x", "hash"), ("x[1]", "drop")), {"x": x})["x"]
    assert both["redacted"] == {"*": "hash", "1": "drop"}
    assert [v is None for v in both["data"]] == [False, True, False] * 2
    assert all(v.startswith("hmac-sha256:") for v in both["data"] if v is not None)
    whole_drop = doc(redactor(("x", "drop"), ("x[1]", "hash")), {"x": x})["x"]
    assert whole_drop["redacted"] == {"*": "drop"} and "data" not in whole_drop
    # A column hashed twice (two matching default rules) is just hashed.
    rules = [RedactRule("x", 1, "hash"), RedactRule("x", 1, "hash"), RedactRule("x", 1, "drop")]
    assert doc(Redactor(rules, SALT), {"x": x})["x"]["redacted"] == {"1": "drop"}


def test_truncated_payload_redacts_the_columns_it_keeps() -> None:
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    out = doc(redactor(("x[2]", "drop")), {"x": x}, max_values=6)["x"]
    assert out["truncated"] is True
    assert out["data"] == [0.0, 1.0, None, 3.0, 4.0, 5.0]


def test_payload_hash_covers_the_redacted_payload_only() -> None:
    r = redactor(("email", "hash"), ("f[0]", "drop"))
    base = {"email": emails("ann@example.com"), "f": np.array([[1.0, 2.0]], dtype=np.float32)}
    same = {"email": emails("ann@example.com"), "f": np.array([[1.0, 2.0]], dtype=np.float32)}
    assert r.digest(base) == r.digest(same)  # identical requests still match
    # Nobody can confirm a guess by hashing: the unredacted digest is not what is stored...
    assert r.digest(base) != payload_hash(base)
    # ... a dropped value does not reach the digest at all ...
    assert r.digest(base) == r.digest({**base, "f": np.array([[9.0, 2.0]], dtype=np.float32)})
    # ... and a hashed one only through the salted digest.
    assert r.digest(base) != r.digest({**base, "email": emails("bob@example.com")})
    assert r.digest(base) != Redactor(r.rules, b"another").digest(base)
    assert r.digest(base) != r.digest({**base, "f": np.array([[1.0, 3.0]], dtype=np.float32)})
    # Without rules the digest and the JSON are what they always were.
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert NO_REDACTION.capture({"x": x}) == (payload_hash({"x": x}), payload_json({"x": x}))


def test_an_input_that_cannot_be_captured_leaves_no_payload(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Opaque:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    odd = {"blob": np.array([Opaque()], dtype=object)}
    r = redactor(("blob", "hash"))
    with caplog.at_level(logging.ERROR, "inferplane.audit"):
        assert r.capture(odd) == (None, None)
        assert r.capture(odd) == (None, None)
    assert [m for m in caplog.messages if "capture failed" in m] == [
        "audit payload capture failed; the record keeps no payload"
    ]


# -- the salt -------------------------------------------------------------------------------


@pytest.fixture
def fresh_salt() -> Any:
    audit_salt.cache_clear()
    yield
    audit_salt.cache_clear()


def test_salt_from_the_environment(monkeypatch: pytest.MonkeyPatch, fresh_salt: None) -> None:
    monkeypatch.setenv("INFERPLANE_AUDIT_SALT", "s3cret")
    r = Redactor([parse_rule("email", "hash")])
    assert doc(r, {"email": emails("a@b.c")})["email"]["data"] == [mac(b"a@b.c", b"s3cret")]


def test_random_salt_when_unset_and_said_so(
    monkeypatch: pytest.MonkeyPatch, fresh_salt: None, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("INFERPLANE_AUDIT_SALT", raising=False)
    with caplog.at_level(logging.WARNING, "inferplane.audit"):
        first = audit_salt()
        assert audit_salt() is first  # one salt per process
    assert len(first) == 32
    assert any("INFERPLANE_AUDIT_SALT is not set" in m for m in caplog.messages)
    audit_salt.cache_clear()
    assert audit_salt() != first  # another process, another salt
    # Rules that only drop never ask for the salt.
    audit_salt.cache_clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, "inferplane.audit"):
        Redactor([parse_rule("ssn", "drop")])
    assert audit_salt.cache_info().currsize == 0 and not caplog.messages


# -- which rules apply to a request ---------------------------------------------------------


def test_own_rules_replace_the_defaults_and_defaults_match_target_or_model() -> None:
    policy = parse_policy(
        "services:\n"
        "  checkout:\n    routes: [{model: fraud_v2, weight: 100}]\n"
        "  open:\n    routes: [{model: fraud_v2, weight: 100}]\n    audit: {redact: []}\n"
        "  own:\n    routes: [{model: fraud_v2, weight: 100}]\n"
        "    audit: {redact: [{field: ssn, action: drop}]}\n"
        "audit:\n  redact:\n    - {target: 'fraud*', field: email, action: hash}\n"
        "    - {target: '*', field: ssn, action: hash}\n"
    )
    rules = policy.audit_rules()

    def applied(target: str, model: str = "") -> list[RedactRule]:
        return list(rules.for_request(target, model).rules)

    email, ssn_hash = RedactRule("email", None, "hash"), RedactRule("ssn", None, "hash")
    assert applied("fraud_v2", "fraud_v2") == [email, ssn_hash]  # a direct model call
    assert applied("checkout", "fraud_v2") == [email, ssn_hash]  # answered by a fraud model
    assert applied("checkout") == [ssn_hash]  # failed before a model answered
    assert applied("own", "fraud_v2") == [RedactRule("ssn", None, "drop")]
    assert applied("open", "fraud_v2") == []  # an empty list of its own: nothing redacted
    assert rules.for_request("checkout", "fraud_v2") is rules.for_request("checkout", "fraud_v2")
    assert AuditRules().for_request("anything", "x") is NO_REDACTION


def test_the_memo_of_targets_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redaction, "_MEMO_LIMIT", 10)
    rules = AuditRules(defaults=[("*", RedactRule("e", None, "drop"))], salt=SALT)
    for i in range(25):
        rules.for_request(f"unknown-{i}")
    assert 0 < len(rules._memo) <= 10


# -- the predictor applies them --------------------------------------------------------------

ECHO = """
import numpy as np


class Model:
    def predict(self, inputs):
        return {"n": np.full(inputs["features"].shape[0], 1, dtype=np.int64)}
"""


class ListSink:
    description = "list:"

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    def write(self, records: Sequence[AuditRecord]) -> None:
        self.records.extend(records)

    def close(self) -> None:
        pass


@pytest.fixture
async def predictor(tmp_path: Path) -> AsyncIterator[tuple[InProcessPredictor, ListSink]]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.py").write_text(ECHO)
    repo = Repository(str(tmp_path / "repo"))
    register(
        repo,
        "fraud",
        str(src),
        runtime="python",
        inputs=[TensorSpec("email", "BYTES", [-1]), TensorSpec("features", "FP32", [-1, 3])],
        outputs=[TensorSpec("n", "INT64", [-1])],
        instance_kind="thread",
    )
    sink = ListSink()
    manager = ModelManager(repo, Metrics())
    await manager.load_initial()
    p = InProcessPredictor(manager, AuditLog(sink, payload_sample_rate=1.0))
    try:
        yield p, sink
    finally:
        await p.aclose()


async def test_predictor_records_the_principal_and_the_redacted_payload(
    predictor: tuple[InProcessPredictor, ListSink],
    monkeypatch: pytest.MonkeyPatch,
    fresh_salt: None,
) -> None:
    monkeypatch.setenv("INFERPLANE_AUDIT_SALT", "s3cret")
    p, sink = predictor
    p.services.apply(
        parse_policy(
            "services:\n  checks:\n    routes: [{model: fraud, weight: 100}]\n"
            "    audit: {redact: [{field: email, action: hash}, {field: 'features[1]', "
            "action: drop}]}\n"
        )
    )
    inputs = {"email": emails("ann@example.com"), "features": np.array([[1, 2, 3]], np.float32)}
    ctx = RequestContext(request_id="r1", principal="key:ops", tenant="acme")
    await p.predict("checks", inputs, context=ctx)
    await p.predict("fraud", inputs, context=RequestContext(request_id="r2"))
    # A policy reload (a new object) brings its rules with it.
    p.services.apply(
        parse_policy("services: {}\naudit: {redact: [{target: fr*, field: email, action: drop}]}")
    )
    await p.predict("fraud", inputs, context=RequestContext(request_id="r3"))
    assert p.audit is not None and p.audit.flush()

    r1, r2, r3 = sink.records
    assert (r1.principal, r1.tenant, r2.principal) == ("key:ops", "acme", None)
    one = json.loads(r1.payload or "")
    assert one["email"]["data"] == [mac(b"ann@example.com", b"s3cret")]
    assert one["features"]["data"] == [1.0, None, 3.0]
    assert json.loads(r2.payload or "")["email"]["data"] == ["ann@example.com"]  # no rules
    assert r2.payload_hash == payload_hash(inputs) != r1.payload_hash
    assert "data" not in json.loads(r3.payload or "")["email"]
