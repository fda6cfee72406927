"""The edge every network request passes before routing: who is calling, may they, and is there
room for them. One `Edge` per server, shared by REST, gRPC and V1 so that all answer alike.

- `authenticate`: an API key or JWT from `Authorization: Bearer ...` (or `x-api-key`), else the
  TLS client certificate, becomes a `Principal`; none, or one that does not verify, is 401.
- `authorize`: the principal's scopes on a target (model or service name; None for server-level
  reads) come from its credential and the access file's grants; missing is 403.
- `tenant`: once auth is on the tenant is the principal's; a tenant header naming another is 403.
- `admit`: the tenant's quotas (quotas.py); over is 429 with Retry-After.

Every decision is cached (verified keys, tokens, certificates, grant look-ups) and the caches are
dropped when the access, keys or JWKS file changes, so a request with a known key costs a few
dictionary look-ups.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric

from inferplane.edge.access import ADMIN, IMPLIED, INFER, READ, AccessSpec, beside, read_access
from inferplane.edge.identity import Principal
from inferplane.edge.jwt_auth import JwtVerifier, UnknownKey
from inferplane.edge.keys import KeyStore, looks_like_key, read_keys
from inferplane.edge.quotas import Lease, Quotas
from inferplane.errors import Forbidden, InferplaneError, Unauthenticated

log = logging.getLogger("inferplane.edge")

__all__ = ["ADMIN", "INFER", "READ", "Edge", "Principal"]

_CACHE_SIZE = 4096
_WATCH_INTERVAL_S = 1.0
NO_CREDENTIALS = (
    "no credentials: send 'Authorization: Bearer <API key or token>' or a client certificate"
)


class _Loaded:
    """Everything read from the files, swapped as one on reload."""

    def __init__(self, path: Path, share: float) -> None:
        self.spec: AccessSpec = read_access(path)
        self.keys_path = beside(path, self.spec.keys) if self.spec.keys else None
        self.keys = KeyStore(read_keys(self.keys_path) if self.keys_path else {})
        self.jwt = JwtVerifier(self.spec.jwt, path.parent) if self.spec.jwt else None
        if self.jwt is not None:
            try:
                self.jwt.load_keys()
            except InferplaneError as exc:
                if self.jwt.jwks_file is not None:
                    raise  # a file is ours to fix: refuse it like the access file
                # An identity provider that is down must not keep the server (or a reload) from
                # starting: tokens are refused until a later fetch succeeds.
                log.error("JWKS not loaded, bearer tokens are refused until it is: %s", exc.message)
        self.quotas = Quotas(list(self.spec.quotas), share)

    def watched(self, path: Path) -> list[Path]:
        files = [path]
        if self.keys_path is not None:
            files.append(self.keys_path)
        if self.jwt is not None and self.jwt.jwks_file is not None:
            files.append(self.jwt.jwks_file)
        return files


def _mtimes(paths: list[Path]) -> tuple[float | None, ...]:
    out: list[float | None] = []
    for p in paths:
        try:
            out.append(os.stat(p).st_mtime_ns)
        except OSError:
            out.append(None)
    return tuple(out)


class Edge:
    def __init__(
        self, path: str | Path, *, share: float | None = None, metrics: Any = None
    ) -> None:
        self.path = Path(path)
        if share is None:
            share = float(os.environ.get("INFERPLANE_QUOTA_SHARE", "1") or 1)
        self.share = share
        self.state = _Loaded(self.path, share)  # BadRequest on a bad file: serve refuses to start
        self._stamp = _mtimes(self.state.watched(self.path))
        # Decisions counted in a plain dict (a Prometheus counter's lock cost more than the rest
        # of the edge's check) and read by a collector at scrape time.
        self.counts: dict[tuple[str, str], int] = {}
        if metrics is not None:
            metrics.registry.register(_EdgeCollector(self.counts))
        self._principals: dict[str, Principal] = {}  # verified credential -> principal
        self._allowed: dict[tuple[Principal, str, str | None], bool] = {}

    @property
    def metrics_open(self) -> bool:
        return self.state.spec.metrics == "open"

    # reloading ---------------------------------------------------------------------------------
    def reload_if_changed(self) -> bool:
        """Re-read the files if any changed; a broken edit keeps the rules in force (logged)."""
        stamp = _mtimes(self.state.watched(self.path))
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            state = _Loaded(self.path, self.share)
        except InferplaneError as exc:
            log.error("access rules not reloaded, the previous ones stay in force: %s", exc.message)
            return False
        self._install(state)
        log.info(
            "access rules reloaded from %s: %d keys, %d grants, %d quotas",
            self.path, len(state.keys.records), len(state.spec.grants), len(state.spec.quotas),
        )  # fmt: skip
        return True

    def _install(self, state: _Loaded) -> None:
        # Buckets survive a reload of unchanged quotas: an edit must not hand out fresh bursts.
        if state.spec.quotas == self.state.spec.quotas:
            state.quotas = self.state.quotas
        self.state = state
        self._stamp = _mtimes(state.watched(self.path))
        self._principals.clear()
        self._allowed.clear()

    async def watch(self) -> None:
        """Poll the files (and refresh a JWKS URL) until cancelled."""
        since_jwks = 0.0
        while True:
            await asyncio.sleep(_WATCH_INTERVAL_S)
            try:
                await asyncio.to_thread(self.reload_if_changed)
                verifier = self.state.jwt
                since_jwks += _WATCH_INTERVAL_S
                if (
                    verifier is not None
                    and verifier.settings.jwks_url is not None
                    and since_jwks >= verifier.settings.jwks_refresh_s
                ):
                    since_jwks = 0.0
                    await self._refetch(verifier)
            except Exception:  # pragma: no cover - keep watching whatever happens
                log.exception("access file watch failed; retrying")

    async def _refetch(self, verifier: JwtVerifier) -> None:
        try:
            await asyncio.to_thread(verifier.load_keys)
        except InferplaneError as exc:
            log.warning("JWKS not refreshed, the previous keys stay in force: %s", exc.message)
        else:
            self._principals.clear()

    # authentication ----------------------------------------------------------------------------
    def authenticate(
        self, authorization: str | None, api_key: str | None, peer_cert: dict[str, Any] | None
    ) -> Principal:
        """The caller, from a bearer credential or else the client certificate; Unauthenticated
        (401) if there is none or it does not verify. UnknownKey: see `authenticate_async`."""
        token = None
        if authorization is not None:
            scheme, _, rest = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not rest.strip():
                raise Unauthenticated("the Authorization header must read 'Bearer <credential>'")
            token = rest.strip()
        elif api_key is not None:
            token = api_key.strip()
        if token is not None:
            known = self._principals.get(token)
            if known is not None:
                return known
            principal = self._verify(token)
        elif peer_cert is not None:
            key = _cert_key(peer_cert)
            known = self._principals.get(key)
            if known is not None:
                return known
            principal = self._from_cert(peer_cert)
            token = key
        else:
            raise Unauthenticated(NO_CREDENTIALS)
        if len(self._principals) >= _CACHE_SIZE:
            self._principals.clear()
        self._principals[token] = principal
        return principal

    async def authenticate_async(
        self, authorization: str | None, api_key: str | None, peer_cert: dict[str, Any] | None
    ) -> Principal:
        """`authenticate`, fetching the JWKS once when a token names a key we do not hold yet
        (the identity provider rotated its keys)."""
        try:
            return self.authenticate(authorization, api_key, peer_cert)
        except UnknownKey as exc:
            verifier = self.state.jwt
            if verifier is None or not verifier.wants_refetch(exc.kid):
                raise
            await self._refetch(verifier)
            return self.authenticate(authorization, api_key, peer_cert)

    def _verify(self, token: str) -> Principal:
        state = self.state
        if looks_like_key(token):
            record = state.keys.check(token)
            return Principal(
                record.principal, record.tenant, "key", frozenset(record.scopes),
                tuple(record.targets),
            )  # fmt: skip
        if state.jwt is None:
            raise Unauthenticated("unknown API key (this server accepts no bearer tokens)")
        return state.jwt.verify(token)

    def _from_cert(self, peer_cert: dict[str, Any]) -> Principal:
        from inferplane.edge.tls import cert_identity

        identity = cert_identity(peer_cert)
        for rule in self.state.spec.mtls:
            if rule.subject is not None and not fnmatch.fnmatchcase(identity.subject, rule.subject):
                continue
            if rule.common_name is not None and not fnmatch.fnmatchcase(
                identity.common_name or "", rule.common_name
            ):
                continue
            if rule.san is not None and not any(
                fnmatch.fnmatchcase(san, rule.san) for san in identity.sans
            ):
                continue
            name = rule.principal or identity.common_name or identity.subject
            return Principal(name, rule.tenant, "mtls", frozenset(rule.scopes))
        raise Unauthenticated(
            f"the client certificate {identity.subject!r} is not mapped to a principal "
            "(mtls rules of the access file)"
        )

    async def check(
        self,
        scope: str,
        target: str | None,
        authorization: str | None,
        api_key: str | None,
        peer_cert: dict[str, Any] | None,
    ) -> Principal:
        """Authenticate and authorize one request: what every protocol calls first."""
        try:
            principal = await self.authenticate_async(authorization, api_key, peer_cert)
        except Unauthenticated:
            self.count("", "unauthenticated")
            raise
        self.authorize(principal, scope, target)
        return principal

    # authorization -----------------------------------------------------------------------------
    def allowed(self, principal: Principal, scope: str, target: str | None) -> bool:
        key = (principal, scope, target)
        cached = self._allowed.get(key)
        if cached is not None:
            return cached
        accepted = IMPLIED[scope]
        ok = bool(principal.scopes & accepted) and _covers(principal.targets, target)
        if not ok:
            for grant in self.state.spec.grants:
                if (
                    grant.covers(principal.name, principal.tenant)
                    and accepted.intersection(grant.scopes)
                    and _covers(grant.targets, target)
                ):
                    ok = True
                    break
        if len(self._allowed) >= _CACHE_SIZE:
            self._allowed.clear()
        self._allowed[key] = ok
        return ok

    def authorize(self, principal: Principal, scope: str, target: str | None) -> None:
        if not self.allowed(principal, scope, target):
            self.count(principal.tenant, "forbidden")
            where = f" on '{target}'" if target is not None else ""
            raise Forbidden(f"principal '{principal.name}' lacks the '{scope}' scope{where}")

    def tenant(self, principal: Principal, claimed: str | None) -> str:
        if claimed is not None and claimed != principal.tenant:
            self.count(principal.tenant, "forbidden")
            raise Forbidden(
                f"the tenant header says '{claimed}' but principal '{principal.name}' belongs to "
                f"tenant '{principal.tenant}'"
            )
        return principal.tenant

    def admit(self, principal: Principal, target: str) -> Lease:
        try:
            lease = self.state.quotas.admit(principal.tenant, target)
        except InferplaneError:
            self.count(principal.tenant, "rate_limited")
            raise
        self.count(principal.tenant, "admitted")
        return lease

    def filter(self, principal: Principal, scope: str) -> Callable[[str], bool]:
        """Which targets a listing (repository index, statistics) may show this principal."""
        return lambda name: self.allowed(principal, scope, name)

    # metrics -----------------------------------------------------------------------------------
    def count(self, tenant: str, outcome: str) -> None:
        key = (tenant, outcome)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1


class _EdgeCollector:
    def __init__(self, counts: dict[tuple[str, str], int]) -> None:
        self.counts = counts

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "inferplane_edge_requests",
            "Requests by tenant and what the edge decided: admitted, rate_limited (quota), "
            "forbidden (scope or tenant), unauthenticated (tenant empty).",
            labels=["tenant", "outcome"],
        )
        for (tenant, outcome), value in list(self.counts.items()):
            family.add_metric([tenant, outcome], value)
        yield family


def _covers(patterns: tuple[str, ...] | list[str], target: str | None) -> bool:
    if target is None:
        return True
    return any(p == "*" or fnmatch.fnmatchcase(target, p) for p in patterns)


def _cert_key(peer_cert: dict[str, Any]) -> str:
    # Serial and issuer name one certificate; a leading NUL keeps it apart from any bearer token.
    return f"\0{peer_cert.get('serialNumber')}|{peer_cert.get('issuer')}"
