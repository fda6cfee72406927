"""A rollout's state, kept in the repository so that any controller (a restarted server, the
fleet's `inferplane rollout run`) resumes where it stood: `rollouts/<service>.yaml`.

People and the CLI never write that file: they leave a command in `rollouts/<service>.command.yaml`
(pause, resume, abort, promote, start) and the controller carries it out on its next pass,
recording the command's id so it is carried out once.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import yaml

from inferplane.control.rollout.figures import Window
from inferplane.errors import BadRequest
from inferplane.repository.store import write_text

ROLLOUTS_DIR = "rollouts"
Phase = Literal["shadow", "step", "done"]
# running: the controller moves it on; paused: weights stay, nothing is decided;
# promoted / rolled_back / aborted: finished (the first two by the controller's verdict)
Status = Literal["running", "paused", "promoted", "rolled_back", "aborted"]
STATUSES: tuple[str, ...] = ("running", "paused", "promoted", "rolled_back", "aborted")
COMMANDS = ("pause", "resume", "abort", "promote", "start")


@dataclass(slots=True)
class RolloutState:
    service: str
    candidate: dict[str, str]  # {model, version}: the version number the rollout resolved
    primary: dict[str, str]  # the version the service's first route resolved to at the start
    spec_key: str  # what the rollout block said (candidate as written); another one restarts
    base: dict[str, Any]  # the service's routes and shadow before the rollout, to come back to
    status: Status = "running"
    phase: Phase = "shadow"
    step: int = -1  # index into steps; -1 in the shadow phase
    weight: float = 0.0  # the candidate's share in force
    started_at: float = field(default_factory=time.time)
    phase_started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    paused_s: float = 0.0  # time this phase spent paused (not counted as holding)
    paused_at: float | None = None
    reason: str = ""
    window: Window = field(default_factory=Window)
    history: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)  # the last evaluation's
    last_command: str | None = None
    settled: bool = False  # finished, and the services file says so (written once)

    @property
    def finished(self) -> bool:
        return self.status in ("promoted", "rolled_back", "aborted")

    def held_s(self, now: float) -> float:
        paused = self.paused_s + (now - self.paused_at if self.paused_at is not None else 0.0)
        return max(0.0, now - self.phase_started_at - paused)

    def to_data(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "status": self.status,
            "phase": self.phase,
            "step": self.step,
            "weight": self.weight,
            "candidate": self.candidate,
            "primary": self.primary,
            "reason": self.reason,
            "started_at": self.started_at,
            "phase_started_at": self.phase_started_at,
            "updated_at": self.updated_at,
            "paused_s": self.paused_s,
            "paused_at": self.paused_at,
            "checks": self.checks,
            "history": self.history,
            "spec_key": self.spec_key,
            "base": self.base,
            "last_command": self.last_command,
            "settled": self.settled,
            "window": self.window.to_data(),
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> RolloutState:
        return cls(
            service=str(data["service"]),
            candidate={k: str(v) for k, v in data["candidate"].items()},
            primary={k: str(v) for k, v in data["primary"].items()},
            spec_key=str(data.get("spec_key", "")),
            base=dict(data.get("base") or {}),
            status=data.get("status", "running"),
            phase=data.get("phase", "shadow"),
            step=int(data.get("step", -1)),
            weight=float(data.get("weight", 0.0)),
            started_at=float(data.get("started_at", 0.0)),
            phase_started_at=float(data.get("phase_started_at", 0.0)),
            updated_at=float(data.get("updated_at", 0.0)),
            paused_s=float(data.get("paused_s", 0.0)),
            paused_at=None if data.get("paused_at") is None else float(data["paused_at"]),
            reason=str(data.get("reason", "")),
            window=Window.from_data(data.get("window")),
            history=list(data.get("history") or []),
            checks=list(data.get("checks") or []),
            last_command=data.get("last_command"),
            settled=bool(data.get("settled", False)),
        )


@dataclass(frozen=True, slots=True)
class Command:
    id: str
    command: str
    at: float
    by: str = ""
    candidate: str | None = None  # start: the candidate to roll out instead of the file's


class StateStore:
    """The `rollouts/` folder of a repository (any fsspec URL)."""

    def __init__(self, repository: str) -> None:
        self.url = repository.rstrip("/") + "/" + ROLLOUTS_DIR
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def _path(self, service: str, suffix: str = "") -> str:
        return f"{self.root}/{service}{suffix}.yaml"

    def _read(self, path: str) -> dict[str, Any] | None:
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as fh:
            try:
                data = yaml.safe_load(fh.read())
            except yaml.YAMLError as exc:
                raise BadRequest(f"{path} is not valid YAML: {exc}") from None
        return data if isinstance(data, dict) else None

    def load(self, service: str) -> RolloutState | None:
        """The state of a service's rollout; None when it has none; BadRequest naming the file
        when it cannot be read (edited by hand, truncated): nothing guesses a rollout's step."""
        path = self._path(service)
        data = self._read(path)
        if data is None:
            return None
        try:
            return RolloutState.from_data(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadRequest(
                f"{path} is not a rollout state ({type(exc).__name__}: {exc})"
            ) from None

    def save(self, state: RolloutState) -> None:
        text = yaml.safe_dump(state.to_data(), sort_keys=False, width=100)
        write_text(self.fs, self._path(state.service), text)

    def services(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        names = []
        for path in self.fs.ls(self.root, detail=False):
            name = str(path).rsplit("/", 1)[-1]
            if name.endswith(".yaml") and not name.endswith(".command.yaml"):
                names.append(name[: -len(".yaml")])
        return sorted(names)

    def command(self, service: str) -> Command | None:
        data = self._read(self._path(service, ".command"))
        if data is None or data.get("command") not in COMMANDS:
            return None
        return Command(
            str(data.get("id", "")),
            str(data["command"]),
            float(data.get("at", 0.0)),
            str(data.get("by", "")),
            None if data.get("candidate") is None else str(data["candidate"]),
        )

    def send(self, service: str, command: str, by: str, candidate: str | None = None) -> Command:
        if command not in COMMANDS:
            raise ValueError(f"unknown rollout command {command!r}; one of {', '.join(COMMANDS)}")
        sent = Command(uuid.uuid4().hex[:12], command, time.time(), by, candidate)
        data = {"id": sent.id, "command": command, "at": sent.at, "by": by}
        if candidate is not None:
            data["candidate"] = candidate
        write_text(self.fs, self._path(service, ".command"), yaml.safe_dump(data, sort_keys=False))
        return sent
