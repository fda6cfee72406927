"""JWT bearer tokens from an identity provider, verified against its JWKS (PyJWT).

Only RS256 and ES256 are accepted: a token names its own algorithm, and accepting HS256 or `none`
would let a forged token choose how it is checked. Issuer, audience and expiry are required;
`leeway_s` allows for clock skew. Verified tokens are cached until they expire, so the signature
check (tens of microseconds for RSA) runs once per token, not once per request.

The key set comes from a file (re-read when it changes, like the access file) or a URL, fetched
off the event loop at start, every `jwks_refresh_s`, and when a token names a key id the set does
not hold (at most once per `_MIN_REFETCH_S`, so that junk key ids cannot make us hammer the IdP).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import jwt

from inferplane.edge.access import SCOPES, JwtSettings
from inferplane.edge.identity import Principal
from inferplane.errors import BadRequest, Unauthenticated

log = logging.getLogger("inferplane.edge")

_MAX_JWKS_BYTES = 1 << 20
_MIN_REFETCH_S = 30.0
_CACHE_SIZE = 4096
_CHALLENGE = 'Bearer realm="inferplane", error="invalid_token"'


def parse_jwks(raw: bytes | str, where: str) -> jwt.PyJWKSet:
    try:
        return jwt.PyJWKSet.from_dict(json.loads(raw))
    except (ValueError, jwt.PyJWKSetError, jwt.PyJWKError) as exc:
        raise BadRequest(f"{where}: not a usable JWKS: {exc}") from None


class JwtVerifier:
    def __init__(self, settings: JwtSettings, base: Path) -> None:
        self.settings = settings
        self.jwks_file = (
            None
            if settings.jwks_file is None
            else (Path(settings.jwks_file) if Path(settings.jwks_file).is_absolute()
                  else base / settings.jwks_file)
        )  # fmt: skip
        self.keys: jwt.PyJWKSet | None = None
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._fetched_at = 0.0
        self._fetch_lock = threading.Lock()

    # key set -----------------------------------------------------------------------------------
    def load_keys(self) -> None:
        """Read or fetch the key set now (blocking: call from a thread)."""
        with self._fetch_lock:
            if self.jwks_file is not None:
                try:
                    raw: bytes | str = self.jwks_file.read_bytes()
                except OSError as exc:
                    raise BadRequest(f"cannot read the JWKS file {self.jwks_file}: {exc}") from None
                where = str(self.jwks_file)
            else:
                url = self.settings.jwks_url
                assert url is not None
                where = url
                self._fetched_at = time.monotonic()
                try:
                    with urllib.request.urlopen(url, timeout=5) as answer:
                        raw = answer.read(_MAX_JWKS_BYTES + 1)
                except OSError as exc:
                    raise BadRequest(f"cannot fetch the JWKS from {url}: {exc}") from None
                if len(raw) > _MAX_JWKS_BYTES:
                    raise BadRequest(f"the JWKS at {url} is larger than {_MAX_JWKS_BYTES} bytes")
            self.keys = parse_jwks(raw, where)
            self._cache.clear()

    def wants_refetch(self, kid: str | None) -> bool:
        """A token names a key we lack: worth one fetch (URL sets only, rate-limited)."""
        return (
            self.settings.jwks_url is not None
            and time.monotonic() - self._fetched_at >= _MIN_REFETCH_S
            and (self.keys is None or kid not in {k.key_id for k in self.keys.keys})
        )

    # tokens ------------------------------------------------------------------------------------
    def verify(self, token: str) -> Principal:
        """The token's principal, or Unauthenticated saying what is wrong with it. Raises
        `UnknownKey` when the token's key id is not in the set (the caller may refetch)."""
        cached = self._cache.get(token)
        now = time.time()
        if cached is not None:
            principal, expires = cached
            if now <= expires + self.settings.leeway_s:
                return principal
            del self._cache[token]
        s = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise Unauthenticated(f"malformed bearer token: {exc}", _CHALLENGE) from None
        alg = header.get("alg")
        if alg not in s.algorithms:
            raise Unauthenticated(
                f"token algorithm {alg!r} is not accepted (only {', '.join(s.algorithms)})",
                _CHALLENGE,
            )
        key = self._key(header.get("kid"), alg)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the bearer token has expired", _CHALLENGE) from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(
                f"the bearer token is not meant for this audience ({s.audience})", _CHALLENGE
            ) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(
                f"the bearer token was not issued by {s.issuer}", _CHALLENGE
            ) from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated(
                "the bearer token's signature does not verify", _CHALLENGE
            ) from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid bearer token: {exc}", _CHALLENGE) from None
        principal = self._principal(claims)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()  # bounded; a burst of distinct tokens costs re-verification only
        self._cache[token] = (principal, float(claims["exp"]))
        return principal

    def _key(self, kid: str | None, alg: str) -> Any:
        keys = self.keys
        if keys is None:
            raise UnknownKey(kid)
        if kid is None:
            usable = [k for k in keys.keys if k.algorithm_name == alg or k.algorithm_name is None]
            if len(usable) != 1:
                raise Unauthenticated("the bearer token names no key id (kid)", _CHALLENGE)
            return usable[0].key
        try:
            return keys[kid].key
        except KeyError:
            raise UnknownKey(kid) from None

    def _principal(self, claims: dict[str, Any]) -> Principal:
        s = self.settings
        name, tenant = claims.get(s.principal_claim), claims.get(s.tenant_claim)
        if not isinstance(name, str) or not name:
            raise Unauthenticated(
                f"the bearer token has no '{s.principal_claim}' claim", _CHALLENGE
            )
        if not isinstance(tenant, str) or not tenant:
            raise Unauthenticated(f"the bearer token has no '{s.tenant_claim}' claim", _CHALLENGE)
        scopes: frozenset[str] = frozenset()
        if s.scopes_claim is not None:
            raw = claims.get(s.scopes_claim, [])
            items = raw.split() if isinstance(raw, str) else raw if isinstance(raw, list) else []
            # Scopes of other APIs (e.g. "openid email") share the claim: keep only ours.
            scopes = frozenset(x for x in items if x in SCOPES)
        return Principal(name, tenant, "jwt", scopes)


class UnknownKey(Unauthenticated):
    def __init__(self, kid: str | None) -> None:
        super().__init__(
            f"the bearer token's signing key {kid!r} is not in the key set", _CHALLENGE
        )
        self.kid = kid
