"""The edge's parts on their own: the access file parser, API key storage, grants and quotas."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest
import yaml

from inferplane.edge import quotas as quotas_module
from inferplane.edge.access import Quota, parse_access
from inferplane.edge.gate import Edge
from inferplane.edge.identity import Principal
from inferplane.edge.keys import KeyStore, create_key, read_keys, revoke_key
from inferplane.edge.quotas import Quotas
from inferplane.errors import BadRequest, Forbidden, TooManyRequests, Unauthenticated


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([1], "expected a mapping"),
        ({"grants": [{"tenant": "a", "scopes": ["fly"]}]}, "grants.0.scopes: unknown scope 'fly'"),
        ({"grants": [{"scopes": ["infer"]}]}, "exactly one of principal, tenant"),
        ({"grants": [{"tenant": "a", "scopes": []}]}, "grants.0.scopes"),
        ({"quotas": [{"tenant": "a"}]}, "needs requests_per_s, max_inflight or rows_per_s"),
        ({"quotas": [{"tenant": "a", "requests_per_s": -1}]}, "quotas.0.requests_per_s"),
        ({"quotas": [{"tenant": "a", "max_inflight": 2, "burst": 3}]}, "burst goes with"),
        ({"jwt": {"issuer": "i", "audience": "a"}}, "exactly one of jwks_url, jwks_file"),
        (
            {"jwt": {"issuer": "i", "audience": "a", "jwks_file": "j", "algorithms": ["HS256"]}},
            "'HS256' is not accepted",
        ),
        (
            {"jwt": {"issuer": "i", "audience": "a", "jwks_file": "j", "algorithms": ["none"]}},
            "'none' tokens are refused",
        ),
        ({"mtls": [{"tenant": "a"}]}, "one of subject, common_name, san"),
        ({"metrics": "public"}, "metrics"),
        ({"grant": []}, "grant: Extra inputs are not permitted"),
    ],
)
def test_access_file_mistakes_are_named(doc: object, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_access(doc, "access.yaml")
    assert message in info.value.message
    assert info.value.message.startswith("access.yaml")


def test_an_empty_access_file_is_valid_and_closed() -> None:
    spec = parse_access(None)
    assert spec.keys == "keys.yaml" and spec.grants == [] and spec.metrics == "read"


def test_keys_are_stored_hashed_owner_only_and_revocable(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    new = create_key(path, tenant="acme", scopes=["infer"], targets=["fraud*"])
    text = path.read_text()
    assert new.key not in text and new.record.sha256 in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store = KeyStore(read_keys(path))
    assert store.check(new.key).tenant == "acme"
    with pytest.raises(Unauthenticated, match="unknown API key"):
        store.check(new.key[:-1] + ("A" if new.key[-1] != "A" else "B"))
    with pytest.raises(Unauthenticated, match="malformed"):
        store.check("ipk_short")
    revoke_key(path, new.record.id)
    with pytest.raises(Unauthenticated, match="revoked"):
        KeyStore(read_keys(path)).check(new.key)
    with pytest.raises(BadRequest, match="unknown scope"):
        create_key(path, tenant="acme", scopes=["write"])
    with pytest.raises(BadRequest, match="tenant"):
        create_key(path, tenant="../etc", scopes=["infer"])


def _edge(tmp_path: Path, doc: dict[str, object]) -> Edge:
    access = tmp_path / "access.yaml"
    access.write_text(yaml.safe_dump(doc))
    return Edge(access)


def test_grants_combine_credential_scopes_and_the_access_file(tmp_path: Path) -> None:
    edge = _edge(
        tmp_path,
        {
            "grants": [
                {"tenant": "acme", "scopes": ["read"], "targets": ["fraud*"]},
                {"principal": "ops-*", "scopes": ["admin"]},
            ]
        },
    )
    app = Principal("app", "acme", "key", frozenset({"infer"}), ("fraud",))
    assert edge.allowed(app, "infer", "fraud")
    assert not edge.allowed(app, "infer", "fraud2")  # the key names fraud only
    assert edge.allowed(app, "read", "fraud2")  # the tenant's grant covers fraud*
    assert not edge.allowed(app, "read", "tabular")
    assert edge.allowed(app, "read", None)  # some read grant: server-level reads
    assert not edge.allowed(app, "read", "*")  # but not endpoints that show every model
    ops = Principal("ops-1", "ops", "jwt")
    assert edge.allowed(ops, "read", "anything")  # admin includes read
    assert not edge.allowed(ops, "infer", "anything")
    with pytest.raises(Forbidden, match="lacks the 'admin' scope on 'fraud'"):
        edge.authorize(app, "admin", "fraud")
    with pytest.raises(Forbidden, match="tenant 'acme'"):
        edge.tenant(app, "globex")
    assert edge.tenant(app, None) == "acme"


def test_credentials_are_read_from_bearer_or_api_key_and_must_exist(tmp_path: Path) -> None:
    edge = _edge(tmp_path, {"keys": "keys.yaml"})
    key = create_key(tmp_path / "keys.yaml", tenant="acme", scopes=["infer"]).key
    edge.reload_if_changed()
    assert edge.authenticate(f"Bearer {key}", None, None).tenant == "acme"
    assert edge.authenticate(None, key, None).tenant == "acme"
    for header, words in (("Basic abc", "Bearer"), ("Bearer", "Bearer"), ("Bearer xyz", "tokens")):
        with pytest.raises(Unauthenticated, match=words):
            edge.authenticate(header, None, None)
    with pytest.raises(Unauthenticated, match="no credentials"):
        asyncio.run(edge.check("infer", "m", None, None, None))


def test_a_broken_edit_keeps_the_rules_in_force(tmp_path: Path) -> None:
    edge = _edge(tmp_path, {"grants": [{"tenant": "a", "scopes": ["read"]}]})
    (tmp_path / "access.yaml").write_text("grants: [{tenant: a, scopes: [oops]}]\n")
    assert edge.reload_if_changed() is False
    assert edge.allowed(Principal("p", "a", "key"), "read", "m")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(quotas_module.time, "monotonic", fake)
    return fake


def test_token_bucket_refills_at_its_rate_and_says_when(clock: FakeClock) -> None:
    q = Quotas([Quota(tenant="*", requests_per_s=2, burst=2)])
    q.admit("a", "m").release()
    q.admit("a", "m").release()
    with pytest.raises(TooManyRequests) as info:
        q.admit("a", "m")
    assert info.value.retry_after_s == pytest.approx(0.5)
    assert ("retry-after", "1") in [
        (k.decode(), v.decode()) for k, v in info.value.response_headers()
    ]
    q.admit("b", "m").release()  # another tenant has its own bucket
    clock.now += 0.5
    q.admit("a", "m").release()


def test_per_target_quota_and_inflight_cap(clock: FakeClock) -> None:
    q = Quotas(
        [
            Quota(tenant="acme", target="fraud", requests_per_s=1, burst=1),
            Quota(tenant="*", max_inflight=2),
        ]
    )
    q.admit("acme", "fraud").release()
    with pytest.raises(TooManyRequests, match="on 'fraud'"):
        q.admit("acme", "fraud")
    held = [q.admit("acme", "tabular"), q.admit("acme", "other")]
    with pytest.raises(TooManyRequests, match="in flight"):
        q.admit("acme", "tabular")
    held[0].release()
    held[0].release()  # releasing twice frees one slot only
    q.admit("acme", "tabular")
    with pytest.raises(TooManyRequests, match="in flight"):
        q.admit("acme", "x")


def test_rows_may_go_into_debt_once_then_wait(clock: FakeClock) -> None:
    q = Quotas([Quota(tenant="*", rows_per_s=10, rows_burst=10)])
    lease = q.admit("a", "m")
    lease.charge_rows(25)  # larger than the burst: served from a full bucket
    with pytest.raises(TooManyRequests, match="rows quota") as info:
        q.admit("a", "m").charge_rows(1)
    assert info.value.retry_after_s == pytest.approx(1.6)
    clock.now += 1.6
    q.admit("a", "m").charge_rows(1)


def test_the_fleet_share_divides_rates_and_caps(clock: FakeClock) -> None:
    q = Quotas([Quota(tenant="*", requests_per_s=10, burst=4, max_inflight=3)], share=2)
    held = [q.admit("a", "m"), q.admit("a", "m")]
    with pytest.raises(TooManyRequests, match="in flight"):
        q.admit("a", "m")
    for lease in held:
        lease.release()
    with pytest.raises(TooManyRequests, match="rate limit"):
        q.admit("a", "m")  # burst 4 / 2 replicas = 2


def test_a_jwks_url_is_fetched_again_when_the_idp_rotates_its_keys(tmp_path: Path) -> None:
    """A real HTTP server plays the identity provider; a token signed by a key published after
    the server started is accepted once the edge refetches the set."""
    import http.server
    import json
    import threading
    import time

    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    from inferplane.edge import jwt_auth

    keys = {"old": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
    published: list[str] = ["old"]

    class Jwks(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            doc = {
                "keys": [
                    {**jwt.algorithms.RSAAlgorithm.to_jwk(keys[k].public_key(), as_dict=True),
                     "kid": k, "alg": "RS256"}
                    for k in published
                ]
            }  # fmt: skip
            raw = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: object) -> None:
            return None

    idp = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
    threading.Thread(target=idp.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{idp.server_address[1]}/jwks"
        edge = _edge(
            tmp_path, {"jwt": {"jwks_url": url, "issuer": "https://i/", "audience": "inferplane"}}
        )
        claims = {"sub": "alice", "tenant": "acme", "iss": "https://i/", "aud": "inferplane"}
        claims["exp"] = int(time.time()) + 60

        def token(kid: str) -> str:
            return jwt.encode(claims, keys[kid], "RS256", headers={"kid": kid})

        assert (
            asyncio.run(edge.authenticate_async(f"Bearer {token('old')}", None, None)).name
            == "alice"
        )
        keys["new"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        published.append("new")
        # the set was fetched just now: a refetch waits for the rate limit, then happens
        with pytest.raises(Unauthenticated, match="'new' is not in the key set"):
            asyncio.run(edge.authenticate_async(f"Bearer {token('new')}", None, None))
        assert edge.state.jwt is not None
        edge.state.jwt._fetched_at -= jwt_auth._MIN_REFETCH_S
        principal = asyncio.run(edge.authenticate_async(f"Bearer {token('new')}", None, None))
        assert (principal.name, principal.tenant, principal.method) == ("alice", "acme", "jwt")
    finally:
        idp.shutdown()


def test_the_example_access_file_parses() -> None:
    from inferplane.edge.access import read_access

    spec = read_access(Path(__file__).resolve().parents[2] / "examples" / "access.yaml")
    assert spec.grants and spec.quotas and spec.mtls


def test_infinite_limits_and_deep_nesting_are_refused(tmp_path: Path) -> None:
    from inferplane.edge.access import read_access

    with pytest.raises(BadRequest, match=r"quotas\.0\.requests_per_s"):
        parse_access({"quotas": [{"tenant": "a", "requests_per_s": float("inf")}]})
    deep = tmp_path / "access.yaml"
    deep.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(BadRequest, match="nested too deeply"):
        read_access(deep)
