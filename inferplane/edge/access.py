"""The access file as data: who may call (identities), what they may do (grants), how much (quotas).

`serve --access access.yaml` turns the edge on. The file is plain YAML that a person or GitOps
writes; `parse_access` checks everything that can be checked without the server (unknown keys,
scopes, patterns, limits) and reports the first mistake with its place, like the traffic policy.

```yaml
keys: keys.yaml                 # hashed API keys (`inferplane keys create` writes it), beside this file
jwt:                            # bearer tokens from an identity provider (optional)
  jwks_url: https://idp.example/.well-known/jwks.json   # or jwks_file: jwks.json
  issuer: https://idp.example/
  audience: inferplane
  tenant_claim: tenant
mtls:                           # client certificates (needs serve --tls-client-ca)
  - {common_name: batch-runner, tenant: analytics, scopes: [infer]}
metrics: read                   # /metrics: open, or the read scope (default)
grants:
  - {tenant: acme, scopes: [infer, read], targets: ["fraud*", tabular]}
  - {principal: ops, scopes: [admin]}
quotas:
  - {tenant: "*", requests_per_s: 200, burst: 400, max_inflight: 64}   # each tenant its own
  - {tenant: acme, target: fraud, rows_per_s: 50000}                   # per tenant x service
```
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inferplane.errors import BadRequest

INFER, READ, ADMIN = "infer", "read", "admin"
SCOPES = (INFER, READ, ADMIN)
# admin includes read: whoever may load a model may also look at it.
IMPLIED = {INFER: frozenset({INFER}), READ: frozenset({READ, ADMIN}), ADMIN: frozenset({ADMIN})}
ALGORITHMS = ("RS256", "ES256")  # asymmetric only: a shared HMAC secret would sign for anyone


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_scopes(scopes: list[str]) -> list[str]:
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}; scopes are {', '.join(SCOPES)}")
    return scopes


class JwtSettings(_Strict):
    jwks_url: str | None = None
    jwks_file: str | None = None
    issuer: str
    audience: str
    algorithms: list[str] = Field(default_factory=lambda: list(ALGORITHMS))
    leeway_s: float = Field(default=30.0, ge=0, le=600)  # clock skew allowed on exp/nbf/iat
    principal_claim: str = "sub"
    tenant_claim: str = "tenant"
    # The claim whose scopes (a space-separated string, or a list) the token grants on every
    # target; None: tokens carry no scopes, grants below decide.
    scopes_claim: str | None = "scope"
    jwks_refresh_s: float = Field(default=300.0, ge=10)

    @model_validator(mode="after")
    def _one_source(self) -> JwtSettings:
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("jwt needs exactly one of jwks_url, jwks_file")
        bad = [a for a in self.algorithms if a not in ALGORITHMS]
        if bad or not self.algorithms:
            raise ValueError(
                f"jwt algorithm {bad[0] if bad else '(none)'!r} is not accepted; use "
                f"{' or '.join(ALGORITHMS)} (symmetric and 'none' tokens are refused)"
            )
        return self


class CertRule(_Strict):
    """A client certificate whose subject, common name or SAN matches (shell patterns) is this
    principal of this tenant."""

    subject: str | None = None
    common_name: str | None = None
    san: str | None = None  # e.g. "URI:spiffe://cluster.local/ns/batch/sa/runner", "DNS:*.acme"
    principal: str | None = None  # default: the certificate's common name
    tenant: str
    scopes: list[str] = Field(default_factory=list)

    _scopes = field_validator("scopes")(classmethod(lambda cls, v: _check_scopes(v)))

    @model_validator(mode="after")
    def _some_match(self) -> CertRule:
        if self.subject is None and self.common_name is None and self.san is None:
            raise ValueError("an mtls rule needs one of subject, common_name, san")
        return self


class Grant(_Strict):
    """`scopes` on `targets` (model or service name patterns) for a principal or a tenant."""

    principal: str | None = None
    tenant: str | None = None
    scopes: list[str] = Field(min_length=1)
    targets: list[str] = Field(default_factory=lambda: ["*"], min_length=1)

    _scopes = field_validator("scopes")(classmethod(lambda cls, v: _check_scopes(v)))

    @model_validator(mode="after")
    def _one_subject(self) -> Grant:
        if (self.principal is None) == (self.tenant is None):
            raise ValueError("a grant needs exactly one of principal, tenant ('*' for anyone)")
        return self

    def covers(self, principal: str, tenant: str) -> bool:
        if self.principal is not None:
            return fnmatch.fnmatchcase(principal, self.principal)
        return fnmatch.fnmatchcase(tenant, self.tenant or "")


class Quota(_Strict):
    """Limits per tenant (`tenant` a pattern: each matching tenant gets its own buckets), or per
    tenant x target when `target` is given. Every matching quota must admit a request."""

    tenant: str
    target: str | None = None
    requests_per_s: float | None = Field(default=None, gt=0)
    burst: float | None = Field(default=None, ge=1)  # default: one second of requests_per_s
    max_inflight: int | None = Field(default=None, ge=1)
    rows_per_s: float | None = Field(default=None, gt=0)  # batch-axis rows of the inputs
    rows_burst: float | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _some_limit(self) -> Quota:
        if self.requests_per_s is None and self.max_inflight is None and self.rows_per_s is None:
            raise ValueError("a quota needs requests_per_s, max_inflight or rows_per_s")
        if self.burst is not None and self.requests_per_s is None:
            raise ValueError("burst goes with requests_per_s")
        if self.rows_burst is not None and self.rows_per_s is None:
            raise ValueError("rows_burst goes with rows_per_s")
        return self


class AccessSpec(_Strict):
    keys: str | None = "keys.yaml"
    jwt: JwtSettings | None = None
    mtls: list[CertRule] = Field(default_factory=list)
    metrics: Literal["open", "read"] = "read"
    grants: list[Grant] = Field(default_factory=list)
    quotas: list[Quota] = Field(default_factory=list)


def parse_access(doc: Any, where: str = "access file") -> AccessSpec:
    """A parsed access document, or BadRequest naming the first problem and where it is."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise BadRequest(f"{where}: expected a mapping at the top level")
    try:
        return AccessSpec.model_validate(doc)
    except ValidationError as exc:
        raise first_problem(exc, where) from None


def first_problem(exc: ValidationError, where: str) -> BadRequest:
    """The first thing pydantic found wrong in a file, with its place: `where: a.0.b: ...`."""
    first = exc.errors()[0]
    place = ".".join(str(p) for p in first["loc"]) or "(top level)"
    return BadRequest(f"{where}: {place}: {first['msg'].removeprefix('Value error, ')}")


def read_yaml(path: Path, what: str, *, missing_ok: bool = False) -> Any:
    """The YAML document of `path` (None for a missing file when `missing_ok`), or BadRequest
    saying why it cannot be read; `what` names the file in messages ("access file")."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise BadRequest(f"cannot read the {what} {path}: it does not exist") from None
    except OSError as exc:
        raise BadRequest(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadRequest(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise BadRequest(f"{path}: nested too deeply for the {what}") from None


def read_access(path: str | Path) -> AccessSpec:
    """Parse an access file from disk (the keys file it names is read by `keys.KeyStore`)."""
    return parse_access(read_yaml(Path(path), "access file"), str(path))


def beside(access_file: str | Path, name: str) -> Path:
    """A file the access file names, relative to the access file's folder."""
    candidate = Path(name)
    return candidate if candidate.is_absolute() else Path(access_file).parent / candidate
