"""Traffic policies as data: which model version answers a call to a *service*.

A policy file (`services.yaml` beside the repository, or `serve --services FILE`) maps service
names to weighted routes, A/B match rules, a sticky key, a shadow, resilience settings and a
fallback. It stays plain data so that a controller (a rollout, a person, GitOps) can change
weights by writing the file; `parse_policy` checks everything that can be checked without the
models, `check_references` the rest once the models are known. The same file holds the redaction
rules of the audit trail's sampled payloads (`audit:` per service and at the top level).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from inferplane.durations import parse_duration
from inferplane.errors import BadRequest
from inferplane.observability.redaction import (
    Action,
    AuditRules,
    RedactRule,
    parse_action,
    parse_field,
)

Retryable = Literal["unavailable", "overloaded", "deadline", "internal"]
_DEFAULT_RETRY_ON: tuple[Retryable, ...] = ("unavailable", "internal")


class _Strict(BaseModel):
    # No .inf / .nan (YAML has both): an infinite backoff_ms made a retry sleep forever, an
    # infinite timeout or cooldown means none at all, and NaN passes no comparison.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _version_text(cls: type, data: object) -> object:
    """`version: 2` in YAML is a number; versions and aliases are text from here on.

    `target: "tabular:production"` is short for `model: tabular, version: production`."""
    if isinstance(data, dict) and "target" in data:
        data = dict(data)
        target = data.pop("target")
        if not isinstance(target, str) or not target:
            raise ValueError("target is 'model' or 'model:version', as text")
        model, _, version = target.partition(":")
        if "model" in data or "version" in data:
            raise ValueError("give either target or model/version, not both")
        data["model"] = model
        if version:
            data["version"] = version
    if isinstance(data, dict) and isinstance(data.get("version"), int):
        data = {**data, "version": str(data["version"])}
    return data


def _seconds(value: object) -> float:
    if not isinstance(value, str | int | float):
        raise ValueError("a duration is text (90s, 2m) or a number of seconds")
    return parse_duration(value)


# A duration field: `2m`, `90s`, `500ms` or a number of seconds.
Seconds = Annotated[float, BeforeValidator(_seconds)]


class Target(_Strict):
    """One model version: `version` is a number, an alias (production, canary) or omitted."""

    model: str
    version: str | None = None

    _version_as_text = model_validator(mode="before")(_version_text)

    def label(self) -> str:
        return f"{self.model}:{self.version or 'default'}"


class Route(Target):
    weight: float = Field(ge=0, le=100)
    name: str | None = None  # the route decision callers see; default primary / canary / route<i>
    timeout_ms: float | None = Field(default=None, gt=0)


class Match(_Strict):
    """An A/B rule: requests whose header, tenant or request parameter has one of `values`."""

    name: str
    header: str | None = None
    tenant: bool = False
    parameter: str | None = None
    values: list[str] = Field(min_length=1)
    route: Target

    @model_validator(mode="after")
    def _one_key(self) -> Match:
        keys = [self.header is not None, self.tenant, self.parameter is not None]
        if sum(keys) != 1:
            raise ValueError(f"match '{self.name}' needs exactly one of header, tenant, parameter")
        return self


class Sticky(_Strict):
    """Hash this header or request parameter so that one caller stays in one arm."""

    header: str | None = None
    parameter: str | None = None

    @model_validator(mode="after")
    def _one_key(self) -> Sticky:
        if (self.header is None) == (self.parameter is None):
            raise ValueError("sticky needs exactly one of header, parameter")
        return self


class Shadow(Target):
    percent: float = Field(default=100, gt=0, le=100)
    max_inflight: int = Field(default=64, ge=1)  # beyond this, shadow copies are skipped


class Retries(_Strict):
    attempts: int = Field(default=0, ge=0, le=5)  # extra tries after the first
    backoff_ms: float = Field(default=5, ge=0)
    # not `on`: YAML 1.1 reads a bare `on` key as the boolean true
    retry_on: list[Retryable] = Field(default_factory=lambda: list(_DEFAULT_RETRY_ON))


class Breaker(_Strict):
    """Opens on `consecutive_failures`, or on `error_rate` over the last `window` calls."""

    consecutive_failures: int = Field(default=5, ge=1)
    error_rate: float | None = Field(default=0.5, gt=0, le=1)
    window: int = Field(default=20, ge=2)
    min_calls: int = Field(default=10, ge=1)
    cooldown_s: float = Field(default=10, gt=0)


class Fallback(_Strict):
    """Answer from another service or model version when the chosen route fails."""

    service: str | None = None
    model: str | None = None
    version: str | None = None

    _version_as_text = model_validator(mode="before")(_version_text)

    @model_validator(mode="after")
    def _one_target(self) -> Fallback:
        if (self.service is None) == (self.model is None):
            raise ValueError("fallback needs exactly one of service, model")
        if self.service is not None and self.version is not None:
            raise ValueError("fallback to a service takes no version")
        return self

    def target(self) -> Target | None:
        return None if self.model is None else Target(model=self.model, version=self.version)


class Cache(_Strict):
    """Recent successful answers, replayed for an identical input when everything else fails."""

    size: int = Field(default=10_000, ge=1)
    ttl_s: float = Field(default=300, gt=0)


class Redact(_Strict):
    """One redaction rule for sampled audit payloads: `field` is an input tensor (`email`) or
    one column of its last axis (`features[3]`), `action` hash or drop (docs/audit.md)."""

    field: str
    action: Action

    @field_validator("field")
    @classmethod
    def _field_syntax(cls, value: str) -> str:
        parse_field(value)
        return value

    @field_validator("action", mode="before")
    @classmethod
    def _known_action(cls, value: object) -> object:
        return parse_action(value)  # the message names the choices, pydantic's only the type

    def rule(self) -> RedactRule:
        tensor, column = parse_field(self.field)
        return RedactRule(tensor, column, self.action)


class DefaultRedact(Redact):
    """A top-level rule: for targets (fnmatch pattern on the name called or the model that
    answered) that have no rules of their own."""

    target: str = Field(min_length=1)


def _no_repeats(keys: list[str], what: str) -> None:
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"more than one rule for the {what}: {', '.join(dupes)}")


class ServiceAudit(_Strict):
    """A service's own audit rules; they replace the top-level defaults for it."""

    redact: list[Redact] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_rule_per_field(self) -> ServiceAudit:
        _no_repeats([r.field for r in self.redact], "field(s)")
        return self


class AuditDefaults(_Strict):
    redact: list[DefaultRedact] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_rule_per_field(self) -> AuditDefaults:
        _no_repeats([f"{r.target} {r.field}" for r in self.redact], "target and field")
        return self


class Step(_Strict):
    """One step of a rollout: the candidate's share of the traffic and how long it holds."""

    weight: float = Field(gt=0, le=100)
    hold: Seconds = Field(gt=0)


class Analysis(_Strict):
    """When a rollout step passes or fails (docs/rollouts.md, "How it decides")."""

    min_requests: int = Field(default=200, ge=1)  # per arm and step, before any verdict
    max_error_rate: float | None = Field(default=0.01, ge=0, le=1)
    max_error_rate_delta: float | None = Field(default=None, ge=0, le=1)
    max_latency_p95_ratio: float | None = Field(default=None, gt=0)
    max_label_disagreement: float | None = Field(default=None, ge=0, le=1)
    # two-sided level of the bounds: a limit is broken only when the whole interval is past it
    confidence: float = Field(default=0.95, ge=0.5, lt=1)
    # a step whose figures are neither clearly in nor clearly out of bounds by hold + max_wait
    # fails ("inconclusive"); default: two more holds
    max_wait: Seconds | None = Field(default=None, ge=0)
    shadow_percent: float = Field(default=100, gt=0, le=100)  # of primary traffic mirrored


class Rollout(_Strict):
    """A progressive delivery of `candidate` to a service, run by the rollout controller."""

    candidate: Target
    shadow_first: Seconds | None = Field(default=None, gt=0)
    steps: list[Step] = Field(min_length=1)
    analysis: Analysis = Field(default_factory=Analysis)
    on_success: Literal["promote", "pause"] = "promote"
    on_failure: Literal["rollback", "pause"] = "rollback"
    interval: Seconds = Field(default=5, gt=0)  # how often the controller looks

    @field_validator("candidate", mode="before")
    @classmethod
    def _candidate_text(cls, value: object) -> object:
        if isinstance(value, str):
            model, _, version = value.partition(":")
            if not version:
                raise ValueError("candidate is 'model:version' (a version number or alias)")
            return {"model": model, "version": version}
        return value

    @field_validator("candidate")
    @classmethod
    def _candidate_version(cls, value: Target) -> Target:
        if not value.version:
            raise ValueError("candidate needs a version (a number or an alias)")
        return value

    @field_validator("steps")
    @classmethod
    def _rising(cls, steps: list[Step]) -> list[Step]:
        for i in range(1, len(steps)):
            if steps[i].weight <= steps[i - 1].weight:
                raise ValueError(
                    f"step {i} weight {steps[i].weight:g} does not rise above step {i - 1}'s "
                    f"{steps[i - 1].weight:g}"
                )
        return steps


class Service(_Strict):
    routes: list[Route] = Field(min_length=1)
    match: list[Match] = Field(default_factory=list)
    sticky: Sticky | None = None
    shadow: Shadow | None = None
    timeout_ms: float | None = Field(default=None, gt=0)
    retries: Retries = Field(default_factory=Retries)
    breaker: Breaker | None = Field(default_factory=Breaker)
    fallback: Fallback | None = None
    cache: Cache | None = None
    audit: ServiceAudit | None = None
    rollout: Rollout | None = None

    @model_validator(mode="after")
    def _weights(self) -> Service:
        total = sum(r.weight for r in self.routes)
        if abs(total - 100) > 1e-6:
            raise ValueError(f"route weights add up to {total:g}, not 100")
        names = [r.name for r in self.routes if r.name] + [m.name for m in self.match]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"route/match names used twice: {', '.join(dupes)}")
        return self

    def route_names(self) -> list[str]:
        """The decision name of each weighted route, in order."""
        names: list[str] = []
        for i, route in enumerate(self.routes):
            if route.name:
                names.append(route.name)
            elif i == 0:
                names.append("primary")
            elif len(self.routes) == 2:
                names.append("canary")
            else:
                names.append(f"route{i}")
        return names


class Policy(_Strict):
    services: dict[str, Service] = Field(default_factory=dict)
    audit: AuditDefaults = Field(default_factory=AuditDefaults)

    @model_validator(mode="after")
    def _no_fallback_cycles(self) -> Policy:
        for name, service in self.services.items():
            fallback = service.fallback
            if fallback is not None and fallback.service not in (None, *self.services):
                raise ValueError(
                    f"service '{name}' falls back to unknown service '{fallback.service}'"
                )
            chain = [name]
            current = service
            while current.fallback is not None and current.fallback.service is not None:
                nxt = current.fallback.service
                if nxt in chain:
                    raise ValueError(f"fallback cycle: {' -> '.join([*chain, nxt])}")
                chain.append(nxt)
                current = self.services[nxt]
        return self

    def audit_rules(self) -> AuditRules:
        """The redaction rules compiled for the audit trail (call once per policy)."""
        own = {
            name: [r.rule() for r in s.audit.redact]
            for name, s in self.services.items()
            if s.audit is not None
        }
        return AuditRules(own, [(r.target, r.rule()) for r in self.audit.redact])

    def targets(self) -> list[tuple[str, Target]]:
        """(where, target) for every model version the policy refers to."""
        found: list[tuple[str, Target]] = []
        for name, s in self.services.items():
            found += [(f"service '{name}' route {i}", r) for i, r in enumerate(s.routes)]
            found += [(f"service '{name}' match '{m.name}'", m.route) for m in s.match]
            if s.shadow is not None:
                found.append((f"service '{name}' shadow", s.shadow))
            if s.fallback is not None and (t := s.fallback.target()) is not None:
                found.append((f"service '{name}' fallback", t))
            if s.rollout is not None:
                found.append((f"service '{name}' rollout candidate", s.rollout.candidate))
        return found


def parse_policy(text: str, source: str = "services file") -> Policy:
    """A checked policy, or BadRequest naming the file and the problem."""
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise BadRequest(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise BadRequest(f"{source}: nested too deeply to be a services file") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"{source}: expected a mapping with a 'services' key")
    try:
        return Policy.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise BadRequest(f"{source}: {problems}") from None


def check_references(
    policy: Policy,
    versions_of: Callable[[str], Mapping[str, int] | None],
    model_names: set[str],
    source: str = "services file",
) -> None:
    """Every target names a model and a version/alias it has; no service shadows a model name.

    `versions_of(model)` gives {version-or-alias: number} for a known model, else None.
    """
    problems: list[str] = []
    for name in policy.services:
        if name in model_names:
            problems.append(f"service '{name}' has the name of a model; pick another name")
    for where, target in policy.targets():
        known = versions_of(target.model)
        if known is None:
            problems.append(f"{where}: unknown model '{target.model}'")
        elif target.version is not None and target.version not in known:
            problems.append(
                f"{where}: model '{target.model}' has no version or alias '{target.version}'"
            )
    if problems:
        raise BadRequest(f"{source}: " + "; ".join(problems))
