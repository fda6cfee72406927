"""The rollout controller: moves each service's `rollout:` through its phases and writes every
decision as data.

Each pass reads the services file, and for every service with a rollout block: carries out a
command left by a person (pause, resume, abort, promote, start), reads the arms' counts from its
`Source`, judges the phase (`analysis.decide`), and writes what follows as the services file's
routes and shadow (and, on promotion, the model's alias), so every replica converges through
its own `--watch`. The state goes to `rollouts/<service>.yaml` after each pass; a controller
that starts again (a restarted server) carries on from it. Every decision is a log line, an
audit record (kind `rollout`) and a change of `inferplane_rollout_*`.
"""

from __future__ import annotations

import copy
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
import yaml
from prometheus_client import CollectorRegistry, Gauge

from inferplane.control.rollout.analysis import decide, shadow_checks, step_checks
from inferplane.control.rollout.figures import Arms, Source, Window
from inferplane.control.rollout.state import STATUSES, Command, RolloutState, StateStore
from inferplane.errors import BadRequest, InferplaneError
from inferplane.observability.audit import AuditLog, AuditRecord
from inferplane.repository.store import Repository, write_text
from inferplane.routing.policy import Policy, Rollout, Route, Service, parse_policy
from inferplane.routing.router import PRODUCTION

log = logging.getLogger("inferplane.rollout")
CANARY = "canary"  # the decision name of the candidate's route while it takes a share


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.step = Gauge(
            "inferplane_rollout_step",
            "The step a service's rollout is at: -1 shadow (mirror only), 0.. the weighted "
            "steps, the number of steps once finished.",
            ["service"],
            registry=registry,
        )
        self.weight = Gauge(
            "inferplane_rollout_weight",
            "The share of a service's traffic (percent) its rollout's candidate answers now.",
            ["service"],
            registry=registry,
        )
        self.state = Gauge(
            "inferplane_rollout_state",
            "1 for the state a service's rollout is in (running, paused, promoted, rolled_back, "
            "aborted), 0 for the others.",
            ["service", "state"],
            registry=registry,
        )

    def show(self, state: RolloutState, steps: int) -> None:
        self.step.labels(state.service).set(steps if state.finished else state.step)
        self.weight.labels(state.service).set(state.weight)
        for name in STATUSES:
            self.state.labels(state.service, name).set(1 if state.status == name else 0)


@dataclass(slots=True)
class _ServicesFile:
    doc: dict[str, Any]
    policy: Policy


class RolloutController:
    def __init__(
        self,
        repository: str,
        services_url: str,
        source: Source,
        *,
        audit: AuditLog | None = None,
        registry: CollectorRegistry | None = None,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.repository = Repository(repository)
        self.services_url = services_url
        self.store = StateStore(repository)
        self.source = source
        self.audit = audit
        self.metrics = RolloutMetrics(registry)
        self.on_change = on_change  # after a write: the server in this process applies it now
        self.clock = clock
        self._due: dict[str, float] = {}  # service -> when its next evaluation is due
        self._refused: dict[str, str] = {}  # service -> the start problem logged (once)
        self._interval = 5.0
        self._over: set[str] = set()  # finished rollouts whose block left the services file

    # the pass ---------------------------------------------------------------------------
    def tick(self) -> list[RolloutState]:
        """One pass over every rollout; the states after it."""
        current = self._read_services()
        if current is None:
            return []
        self._interval = min(
            (s.rollout.interval for s in current.policy.services.values() if s.rollout),
            default=5.0,
        )
        now = self.clock()
        states: list[RolloutState] = []
        seen: set[str] = set()
        for name, spec in current.policy.services.items():
            if spec.rollout is None:
                continue
            seen.add(name)
            try:
                state = self._advance(name, spec, spec.rollout, current, now)
            except BadRequest as exc:  # its state file is unreadable: the others go on
                self._refuse(name, f"stopped: {exc.message}; fix or delete the file")
                continue
            if state is not None:
                states.append(state)
        for name in self.store.services():  # rollout blocks removed while running: abort
            if name in seen or name in self._over:
                continue
            try:
                state = self.store.load(name)
            except BadRequest:
                continue  # no rollout block and no readable state: nothing to do
            if state is not None and state.finished:
                self._over.add(name)  # not read again each pass (a new block makes it `seen`)
            elif state is not None and name in current.policy.services:
                self._finish(state, "aborted", "the rollout block left the services file")
                self._write_routes(state, current, None)
                state.settled = True
                self.store.save(state)
                states.append(state)
        return states

    def interval(self) -> float:
        """How often tick() has work: the shortest interval among the rollouts the last pass
        read (5 s when there were none)."""
        return self._interval

    def _advance(
        self, name: str, spec: Service, rollout: Rollout, current: _ServicesFile, now: float
    ) -> RolloutState | None:
        state = self.store.load(name)
        command = self.store.command(name)
        fresh = command is not None and (state is None or command.id != state.last_command)
        key = rollout.candidate.label()
        if fresh and command is not None and command.command == "start":
            state = self._start(name, spec, rollout, command.candidate or key, now, state, current)
            if state is None:
                return None
            state.last_command = command.id
            fresh = False
        elif state is None or state.spec_key != key:
            state = self._start(name, spec, rollout, key, now, state, current)
            if state is None:
                return None
        if fresh and command is not None:
            self._command(state, rollout, command, now)
        if state.status == "running" and now >= self._due.get(name, 0.0):
            self._due[name] = now + rollout.interval
            self._evaluate(state, rollout, now)
        self.metrics.show(state, len(rollout.steps))
        if state.finished and state.settled and not fresh:
            return state  # over, and the services file says so: nothing to write each pass
        state.updated_at = now
        # The state is saved before the routes are written: a pass that dies between the two
        # leaves a state whose routes the next pass writes again, never routes without a state.
        self.store.save(state)
        # A finished rollout writes its routes once; after that the file is its owners' again.
        if not (state.finished and state.settled):
            self._write_routes(state, current, rollout)
            if state.finished:
                state.settled = True
                self.store.save(state)
        return state

    # starting ---------------------------------------------------------------------------
    def _start(
        self,
        name: str,
        spec: Service,
        rollout: Rollout,
        key: str,
        now: float,
        previous: RolloutState | None,
        current: _ServicesFile,
    ) -> RolloutState | None:
        model, _, ref = key.partition(":")
        try:
            candidate = str(self.repository.resolve_version(model, ref or None))
            base = (
                previous.base
                if previous is not None and not previous.finished
                else _base_of(current, name)
            )
            base_primary = Route.model_validate(base["routes"][0])
            primary_version = str(
                self.repository.resolve_version(base_primary.model, base_primary.version)
            )
        except (InferplaneError, OSError, KeyError, IndexError) as exc:
            message = getattr(exc, "message", str(exc))
            return self._refuse(name, f"cannot start: {message}")
        if (model, candidate) == (base_primary.model, primary_version):
            if previous is not None and previous.spec_key == key:
                return previous  # finished already (promoted: the candidate is the primary now)
            return self._refuse(
                name, f"candidate {model}:{candidate} is the version the service serves already"
            )
        taken = {r.name for r in spec.routes if r.name} | {m.name for m in spec.match}
        if CANARY in taken and not (previous is not None and not previous.finished):
            return self._refuse(
                name,
                f"a route or match rule is named '{CANARY}', the name the rollout gives "
                "its candidate's route; rename it",
            )
        self._refused.pop(name, None)
        state = RolloutState(
            service=name,
            candidate={"model": model, "version": candidate},
            primary={"model": base_primary.model, "version": primary_version},
            spec_key=key,
            base=base,
            started_at=now,
            phase_started_at=now,
            updated_at=now,
            last_command=previous.last_command if previous is not None else None,
        )
        if rollout.shadow_first is not None:
            state.phase, state.step = "shadow", -1
        else:
            state.phase, state.step, state.weight = "step", 0, rollout.steps[0].weight
        self._baseline(state)
        self._decision(
            state,
            "started",
            f"{model}:{candidate} against {state.primary['model']}:{primary_version}; "
            + self._phase_text(state, rollout),
        )
        return state

    def _refuse(self, name: str, why: str) -> RolloutState | None:
        if self._refused.get(name) != why:
            log.error("rollout of service %s: %s", name, why)
            self._refused[name] = why
        return None

    # commands ---------------------------------------------------------------------------
    def _command(self, state: RolloutState, rollout: Rollout, command: Command, now: float) -> None:
        state.last_command = command.id
        by = f" (by {command.by})" if command.by else ""
        if state.finished:
            log.warning(
                "rollout of service %s: '%s' ignored, the rollout is %s",
                state.service,
                command.command,
                state.status,
            )
            return
        if command.command == "pause" and state.status == "running":
            state.status, state.paused_at = "paused", now
            self._decision(state, "paused", f"paused{by}")
        elif command.command == "resume" and state.status == "paused":
            self._resume(state, now)
            self._decision(state, "resumed", f"resumed{by}")
        elif command.command == "abort":
            self._finish(state, "aborted", f"aborted{by}")
        elif command.command == "promote":
            moved = self._promote(state)
            self._finish(state, "promoted", f"promoted by hand{by}; {moved}")

    def _resume(self, state: RolloutState, now: float) -> None:
        if state.paused_at is not None:
            state.paused_s += now - state.paused_at
        state.status, state.paused_at = "running", None

    # judging ----------------------------------------------------------------------------
    def _evaluate(self, state: RolloutState, rollout: Rollout, now: float) -> None:
        try:
            readings = self.source.read(self._arms(state))
        except InferplaneError as exc:
            state.reason = f"no figures: {exc.message}"
            log.warning("rollout of service %s: %s", state.service, state.reason)
            return
        state.window.update(readings)
        a = rollout.analysis
        if state.phase == "shadow":
            checks = shadow_checks(state.window.total, a)
            hold = rollout.shadow_first or 0.0
        else:
            checks = step_checks(state.window.total, a)
            hold = rollout.steps[state.step].hold
        max_wait = a.max_wait if a.max_wait is not None else 2 * hold
        verdict = decide(checks, state.held_s(now), hold, max_wait)
        state.checks = [c.to_data() for c in checks]
        state.reason = verdict.reason
        if verdict.outcome == "wait":
            return
        self._close_phase(state, verdict.outcome, verdict.reason, now)
        if verdict.outcome == "fail":
            if rollout.on_failure == "rollback":
                self._finish(state, "rolled_back", f"{self._where(state)} failed: {verdict.reason}")
            else:
                state.status, state.paused_at = "paused", now
                self._decision(
                    state,
                    "paused",
                    f"{self._where(state)} failed, paused for a person (on_failure: pause): "
                    f"{verdict.reason}",
                )
            return
        if state.phase == "step" and state.step + 1 >= len(rollout.steps):
            if rollout.on_success == "promote":
                moved = self._promote(state)
                self._finish(state, "promoted", f"every step passed; {moved}: {verdict.reason}")
            else:
                state.status, state.paused_at = "paused", now
                self._decision(
                    state, "paused", "every step passed; waiting for `inferplane rollout promote`"
                )
            return
        state.step = state.step + 1 if state.phase == "step" else 0
        state.phase = "step"
        state.weight = rollout.steps[state.step].weight
        state.phase_started_at, state.paused_s = now, 0.0
        self._baseline(state)
        self._decision(state, "advanced", self._phase_text(state, rollout))

    def _baseline(self, state: RolloutState) -> None:
        """A new phase counts from now: its window starts at the current readings."""
        state.window = Window()
        try:
            state.window.update(self.source.read(self._arms(state)))
        except InferplaneError as exc:
            log.warning("rollout of service %s: no figures yet: %s", state.service, exc.message)

    def _close_phase(self, state: RolloutState, outcome: str, reason: str, now: float) -> None:
        total = state.window.total
        state.history.append(
            {
                "phase": self._where(state),
                "weight": state.weight,
                "started_at": state.phase_started_at,
                "ended_at": now,
                "verdict": outcome,
                "reason": reason,
                "requests": {
                    "primary": total.primary.requests,
                    "candidate": total.candidate.requests,
                    "shadow": total.shadow.copies,
                },
                "errors": {"primary": total.primary.errors, "candidate": total.candidate.errors},
                "checks": [dict(c) for c in state.checks],  # no YAML anchors in the file
            }
        )

    def _arms(self, state: RolloutState) -> Arms:
        return Arms(
            state.service,
            (state.primary["model"], state.primary["version"]),
            (state.candidate["model"], state.candidate["version"]),
        )

    # finishing --------------------------------------------------------------------------
    def _finish(self, state: RolloutState, status: str, reason: str) -> None:
        assert status in ("promoted", "rolled_back", "aborted")
        state.status = status  # type: ignore[assignment]
        state.phase, state.weight, state.paused_at = "done", 0.0, None
        self._decision(state, status, reason)

    def _promote(self, state: RolloutState) -> str:
        """The candidate becomes what the service's first route names: the alias moves when
        that route names the candidate's model by alias (or by none: `production`); else the
        route itself is rewritten to the candidate. Says which it did."""
        routes = state.base["routes"]
        first = Route.model_validate(routes[0])
        model, version = state.candidate["model"], state.candidate["version"]
        alias = first.version if first.version is not None else PRODUCTION
        if first.model == model and not alias.isdigit():
            self.repository.set_alias(model, alias, int(version))
            return f"alias {model}:{alias} -> {version}"
        rewritten = {k: v for k, v in routes[0].items() if k not in ("target", "model", "version")}
        routes[0] = {"model": model, "version": version, **rewritten}
        return f"first route now {model}:{version}"

    # writing the policy -----------------------------------------------------------------
    def _desired(self, state: RolloutState, rollout: Rollout | None) -> dict[str, Any]:
        routes = copy.deepcopy(state.base["routes"])
        shadow = copy.deepcopy(state.base.get("shadow"))
        candidate = {"model": state.candidate["model"], "version": state.candidate["version"]}
        if state.finished or rollout is None:
            return {"routes": routes, "shadow": shadow}
        mirror = {**candidate, "percent": rollout.analysis.shadow_percent}
        if state.phase == "shadow":
            return {"routes": routes, "shadow": mirror}
        w = state.weight
        for route in routes:
            route["weight"] = float(route.get("weight", 0)) * (100 - w) / 100
        routes.append({**candidate, "weight": w, "name": CANARY})
        if rollout.analysis.max_label_disagreement is not None:
            shadow = mirror  # the primary's traffic mirrored: labels compared on the same inputs
        return {"routes": routes, "shadow": shadow}

    def _write_routes(
        self, state: RolloutState, current: _ServicesFile, rollout: Rollout | None
    ) -> None:
        raw = current.doc["services"].get(state.service)
        if raw is None:
            return
        want = self._desired(state, rollout)
        have = {"routes": raw.get("routes"), "shadow": raw.get("shadow")}
        if _same(want, have):
            return
        doc = copy.deepcopy(current.doc)
        entry = doc["services"][state.service]
        entry["routes"] = want["routes"]
        if want["shadow"] is None:
            entry.pop("shadow", None)
        else:
            entry["shadow"] = want["shadow"]
        text = yaml.safe_dump(doc, sort_keys=False, width=100)
        parse_policy(text, self.services_url)  # never write a file the servers would refuse
        fs, path = fsspec.core.url_to_fs(self.services_url)
        write_text(fs, path, text)
        current.doc = doc
        log.info(
            "rollout of service %s: services file now routes %s",
            state.service,
            ", ".join(f"{_label(r)} {float(r.get('weight', 0)):g}%" for r in want["routes"]),
        )
        if self.on_change is not None:
            self.on_change()

    def _read_services(self) -> _ServicesFile | None:
        fs, path = fsspec.core.url_to_fs(self.services_url)
        try:
            with fs.open(path, "rb") as fh:
                text = fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None
        try:
            policy = parse_policy(text, self.services_url)
        except BadRequest as exc:
            log.error("rollouts: %s; nothing changes until it is fixed", exc.message)
            return None
        doc = yaml.safe_load(text) or {}
        return _ServicesFile(doc, policy)

    # telling ----------------------------------------------------------------------------
    def _where(self, state: RolloutState) -> str:
        return "shadow phase" if state.phase == "shadow" else f"step {state.step + 1}"

    def _phase_text(self, state: RolloutState, rollout: Rollout) -> str:
        if state.phase == "shadow":
            return f"shadow phase: mirror only for {rollout.shadow_first:g} s"
        step = rollout.steps[state.step]
        return (
            f"step {state.step + 1} of {len(rollout.steps)}: {step.weight:g}% for {step.hold:g} s"
        )

    def _decision(self, state: RolloutState, event: str, reason: str) -> None:
        """A decision: the state's reason until the next evaluation, a log line, an audit
        record."""
        state.reason = reason
        cand = f"{state.candidate['model']}:{state.candidate['version']}"
        log.info("rollout of service %s (%s): %s: %s", state.service, cand, event, reason)
        if self.audit is not None:
            self.audit.record(
                AuditRecord(
                    request_id=f"rollout-{uuid.uuid4().hex[:12]}",
                    time=time.time(),
                    service=state.service,
                    model=state.candidate["model"],
                    version=state.candidate["version"],
                    route=event,
                    latency_ms=0.0,
                    status=200,
                    error=reason,
                    kind="rollout",
                )
            )


def _base_of(current: _ServicesFile, name: str) -> dict[str, Any]:
    """The service's routes and shadow as the file has them now: what a rollout comes back to."""
    raw = current.doc["services"][name]
    return {"routes": copy.deepcopy(raw["routes"]), "shadow": copy.deepcopy(raw.get("shadow"))}


def _label(route: dict[str, Any]) -> str:
    return Route.model_validate(route).label()


def _same(a: Any, b: Any) -> bool:
    """Equal as YAML data, numbers compared by value (100 == 100.0)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(float(a) - float(b)) < 1e-9
    return bool(a == b) or (str(a) == str(b) and a is not None and b is not None)
