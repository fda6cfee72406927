"""`inferplane rollout run|status|start|pause|resume|abort|promote` (docs/rollouts.md)."""

from __future__ import annotations

import getpass
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from inferplane.errors import BadRequest, NotFound

if TYPE_CHECKING:
    from inferplane.control.rollout.state import RolloutState
    from inferplane.routing.policy import Policy

console = Console()

RepositoryOpt = Annotated[
    str,
    typer.Option(
        "--repository",
        "-r",
        envvar="INFERPLANE_REPOSITORY",
        help="Model repository (a folder or any fsspec URL); rollout states live in its "
        "rollouts/ folder.",
    ),
]
ServicesOpt = Annotated[
    str | None,
    typer.Option(help="The services file the rollouts are declared in (default: "
                 "<repository>/services.yaml)."),
]  # fmt: skip


def _services_url(repository: str, services: str | None) -> str:
    from inferplane.routing.policy_source import default_services_url

    return services or default_services_url(repository)


def run_command(
    repository: RepositoryOpt,
    services: ServicesOpt = None,
    metrics: Annotated[
        list[str] | None,
        typer.Option(
            "--metrics",
            help="A server's /metrics URL to read the arms' figures from (repeat for each "
            "replica).",
        ),
    ] = None,
    prometheus: Annotated[
        str | None,
        typer.Option(
            help="A Prometheus server holding the servers' metrics (instead of --metrics)."
        ),
    ] = None,
    prometheus_selector: Annotated[
        str,
        typer.Option(help='Extra label matchers for the PromQL, e.g. job="inferplane".'),
    ] = "",
    api_key: Annotated[
        str | None,
        typer.Option(envvar="INFERPLANE_API_KEY", help="Bearer key for the servers' /metrics."),
    ] = None,
    audit_sink: Annotated[
        str | None,
        typer.Option("--audit", help="Audit sink for the decisions (as serve --audit)."),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve inferplane_rollout_* on this port (/metrics)."),
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="Address for --metrics-port.")] = "127.0.0.1",
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit.")] = False,
) -> None:
    """The controller for a fleet: judge every rollout on the replicas' figures and write the
    decisions to the services file and aliases, which the replicas follow with --watch."""
    from prometheus_client import CollectorRegistry, start_http_server

    from inferplane.control.rollout.controller import RolloutController
    from inferplane.control.rollout.figures import PrometheusSource, ScrapeSource, Source
    from inferplane.observability.audit import AuditLog, open_sink

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if bool(metrics) == bool(prometheus):
        raise BadRequest(
            "give the figures' source: --metrics URL (one per replica) or --prometheus URL"
        )
    source: Source
    if prometheus:
        source = PrometheusSource(prometheus, prometheus_selector)
    else:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        source = ScrapeSource(list(metrics or []), headers)
    registry = CollectorRegistry()
    if metrics_port is not None:
        start_http_server(metrics_port, addr=metrics_host, registry=registry)
    audit = AuditLog(open_sink(audit_sink)) if audit_sink else None
    controller = RolloutController(
        repository, _services_url(repository, services), source, audit=audit, registry=registry
    )
    logging.getLogger("inferplane.rollout").info(
        "rollout controller: services %s, figures from %s",
        controller.services_url,
        source.description,
    )
    try:
        while True:
            controller.tick()
            if once:
                return
            time.sleep(controller.interval())
    except KeyboardInterrupt:
        pass
    finally:
        if audit is not None:
            audit.close()


def status_command(
    repository: RepositoryOpt,
    service: Annotated[str | None, typer.Argument(help="One service (default: all).")] = None,
    services: ServicesOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="The states as JSON.")] = False,
) -> None:
    """Where each rollout stands: phase, weight, the last figures and the history."""
    from inferplane.control.rollout.state import StateStore

    store = StateStore(repository)
    names = [service] if service else store.services()
    states = [s for s in (store.load(n) for n in names) if s is not None]
    if service and not states:
        raise NotFound(f"service '{service}' has no rollout in {store.url}")
    steps = _declared_steps(repository, services)
    if as_json:
        print(json.dumps([summary(s, steps.get(s.service)) for s in states], indent=2))
        return
    if not states:
        console.print(f"no rollouts in {escape(store.url)}", highlight=False)
        return
    for state in states:
        _show(summary(state, steps.get(state.service)))


def _declared_steps(repository: str, services: str | None) -> dict[str, list[float]]:
    """service -> the weights of its declared steps (for the view), when the file reads."""
    from inferplane.routing.policy_source import read_policy

    try:
        found = read_policy(_services_url(repository, services))
    except (BadRequest, OSError):
        return {}
    return {} if found is None else steps_of(found[0])


def steps_of(policy: Policy) -> dict[str, list[float]]:
    """service -> the weights of its rollout's steps, for every service with a rollout block."""
    return {
        name: [st.weight for st in spec.rollout.steps]
        for name, spec in policy.services.items()
        if spec.rollout is not None
    }


def summary(state: RolloutState, steps: list[float] | None) -> dict[str, Any]:
    """What status views show of a state (the CLI, GET /inferplane/rollouts, the console)."""
    return {
        "service": state.service,
        "status": state.status,
        "phase": state.phase,
        "step": state.step,
        "steps": steps,
        "weight": state.weight,
        "candidate": f"{state.candidate['model']}:{state.candidate['version']}",
        "primary": f"{state.primary['model']}:{state.primary['version']}",
        "reason": state.reason,
        "started_at": state.started_at,
        "phase_started_at": state.phase_started_at,
        "updated_at": state.updated_at,
        "checks": state.checks,
        "history": state.history,
    }


_MARK = {"pass": "[green]✓[/green]", "fail": "[red]✗[/red]"}
_STATUS_STYLE = {
    "running": "cyan",
    "paused": "yellow",
    "promoted": "green",
    "rolled_back": "red",
    "aborted": "red",
}


def _show(s: dict[str, Any]) -> None:
    style = _STATUS_STYLE.get(s["status"], "white")
    where = {"shadow": "shadow phase", "done": "finished"}.get(s["phase"], f"step {s['step'] + 1}")
    console.print(
        f"[bold]{escape(s['service'])}[/bold]: {escape(s['candidate'])} against "
        f"{escape(s['primary'])}  [{style}]{s['status']}[/{style}]  {where}, candidate at "
        f"{s['weight']:g}%",
        highlight=False,
    )
    verdicts = {h["phase"]: h["verdict"] for h in s["history"]}
    stages: list[str] = []
    if "shadow phase" in verdicts or s["phase"] == "shadow":
        stages.append(_stage("shadow", "shadow phase", verdicts, s["phase"] == "shadow", s))
    for i, weight in enumerate(s["steps"] or []):
        current = s["phase"] == "step" and s["step"] == i
        stages.append(_stage(f"{weight:g}%", f"step {i + 1}", verdicts, current, s))
    if stages:
        console.print("  " + " ─ ".join(stages), highlight=False)
    if s["reason"]:
        console.print(f"  {escape(s['reason'])}", highlight=False)
    if s["checks"] and s["status"] in ("running", "paused"):
        table = Table(show_header=True, box=None, padding=(0, 2))
        for col in ("check", "value", "limit", "bound", "state"):
            table.add_column(col)
        for c in s["checks"]:
            table.add_row(
                escape(c["name"]),
                "-" if c["value"] is None else f"{c['value']:.4g}",
                f"{c['limit']:g}",
                "-" if c["bound"] is None else f"{c['bound']:.4g}",
                c["state"],
            )
        console.print(table)


def _stage(label: str, key: str, verdicts: dict[str, str], current: bool, s: dict[str, Any]) -> str:
    if key in verdicts:
        return f"{label} {_MARK.get(verdicts[key], '?')}"
    if current and s["status"] in ("running", "paused"):
        return f"[bold]\\[{label} ●][/bold]"
    return f"[dim]{label}[/dim]"


def _send(
    repository: str, service: str, command: str, wait: float, candidate: str | None = None
) -> None:
    from inferplane.control.rollout.state import StateStore

    store = StateStore(repository)
    by = os.environ.get("INFERPLANE_USER") or getpass.getuser()
    sent = store.send(service, command, by, candidate)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        state = store.load(service)
        if state is not None and state.last_command == sent.id:
            console.print(
                f"{service}: {command} carried out; the rollout is {state.status}"
                + (f" ({escape(state.reason)})" if state.reason else ""),
                highlight=False,
            )
            return
        time.sleep(0.2)
    if wait > 0:
        raise BadRequest(
            f"{service}: '{command}' was left for the controller, which has not carried it out "
            f"within {wait:g} s; is a controller running (serve, or inferplane rollout run)?"
        )
    console.print(
        f"{service}: '{command}' left for the controller; it is carried out on its next pass",
        highlight=False,
    )


WaitOpt = Annotated[
    float,
    typer.Option(help="Seconds to wait until the controller has carried it out (0: do not wait)."),
]
ServiceArg = Annotated[str, typer.Argument(help="The service whose rollout to steer.")]


def start_command(
    repository: RepositoryOpt,
    service: ServiceArg,
    candidate: Annotated[
        str | None,
        typer.Option(help="Roll out this model:version instead of the file's candidate."),
    ] = None,
    wait: WaitOpt = 0.0,
) -> None:
    """Start the service's rollout again from its first phase (after a rollback or abort)."""
    _send(repository, service, "start", wait, candidate)


def pause_command(repository: RepositoryOpt, service: ServiceArg, wait: WaitOpt = 0.0) -> None:
    """Hold the weights where they are; nothing is decided until resume."""
    _send(repository, service, "pause", wait)


def resume_command(repository: RepositoryOpt, service: ServiceArg, wait: WaitOpt = 0.0) -> None:
    """Carry on from the phase it was paused in (paused time does not count as holding)."""
    _send(repository, service, "resume", wait)


def abort_command(repository: RepositoryOpt, service: ServiceArg, wait: WaitOpt = 0.0) -> None:
    """Stop: the candidate's weight goes to 0 and the service's routes are as before."""
    _send(repository, service, "abort", wait)


def promote_command(repository: RepositoryOpt, service: ServiceArg, wait: WaitOpt = 0.0) -> None:
    """Promote the candidate now, skipping the remaining steps."""
    _send(repository, service, "promote", wait)
