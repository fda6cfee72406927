"""The `inferplane` command line: serve models and manage the model repository."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from inferplane import __version__
from inferplane.errors import InferplaneError
from inferplane.observability.trace_options import OtlpEndpointOpt, TraceSampleOpt, trace_settings

if TYPE_CHECKING:  # imported where used: `inferplane --help` stays quick
    from inferplane.engine.residency import ResidencyOptions

app = typer.Typer(
    help="inferplane: serve ML models online (V2 REST/gRPC), on streams and in batch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Manage the versioned model repository.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

RepositoryOpt = Annotated[
    str,
    typer.Option(
        "--repository",
        "-r",
        envvar="INFERPLANE_REPOSITORY",
        help="Model repository: a folder or any fsspec URL (s3://bucket/models).",
    ),
]


def one_line_errors(fn: F) -> F:
    """Our errors become `error: <message>` on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InferplaneError as exc:
            # Escaped: messages quote user text and pip extras (`inferplane[batch]`) that rich
            # would otherwise read as markup and drop.
            err_console.print(
                f"[red]error:[/red] {escape(exc.message)}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _repo(url: str) -> Any:
    from inferplane.repository.store import Repository

    return Repository(url)


@app.command()
@one_line_errors
def serve(
    repository: RepositoryOpt = "./models",
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="V2/V1 REST and /metrics port.")] = 8080,
    grpc_port: Annotated[int, typer.Option(help="V2 gRPC port; 0 turns gRPC off.")] = 8081,
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Load only this model (repeatable); default: all."),
    ] = None,
    max_payload_mb: Annotated[
        float, typer.Option(help="Largest request body accepted (413 beyond).")
    ] = 64.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    http_server: Annotated[
        str,
        typer.Option(help="HTTP front end: uvicorn (uvloop + httptools) or granian (Rust)."),
    ] = "uvicorn",
    strict_readiness: Annotated[
        bool,
        typer.Option(
            help="Report ready only when every model loaded (Triton's rule); by default a model "
            "that failed to load is reported but does not hold the server out of traffic."
        ),
    ] = False,
    services: Annotated[
        str | None,
        typer.Option(
            help="Traffic policy file (services, canary, A/B, shadow, fallback); default: "
            "<repository>/services.yaml when it exists. See docs/traffic.md."
        ),
    ] = None,
    watch: Annotated[
        bool,
        typer.Option(
            help="Re-read the policy file and the loaded models' aliases when they change "
            "(every --watch-interval seconds): replicas reading one S3 prefix or ConfigMap "
            "converge on it."
        ),
    ] = False,
    watch_interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between the --watch reads.")
    ] = 1.0,
    rollouts: Annotated[
        bool,
        typer.Option(
            help="Run the rollout controller in this server: the services file's `rollout:` "
            "blocks move on this server's own figures (docs/rollouts.md). A fleet turns it off "
            "on its replicas and runs one `inferplane rollout run`."
        ),
    ] = True,
    stream_metrics: Annotated[
        list[str] | None,
        typer.Option(
            "--stream-metrics",
            help="A stream worker's /metrics URL (inferplane stream --metrics-port): the "
            "console shows its lag and throughput. Repeat for each worker.",
        ),
    ] = None,
    prometheus: Annotated[
        str | None,
        typer.Option(
            help="A Prometheus that scrapes the stream workers: the console reads their lag "
            "from it (instead of --stream-metrics)."
        ),
    ] = None,
    drain_seconds: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="On SIGTERM: answer readiness 503 at once, keep serving in-flight and new "
            "requests this long (load balancers take the replica out meanwhile), then close "
            "(gRPC GOAWAY), flush the audit and exit 0. See docs/deploy.md.",
        ),
    ] = 10.0,
    audit_sink: Annotated[
        str,
        typer.Option(
            envvar="INFERPLANE_AUDIT",
            help="Audit trail sink: a SQLite file, jsonl:PATH, parquet:DIR-or-URL (s3://...) "
            "or kafka://HOST:PORT/TOPIC; 'none' turns auditing off. See docs/audit.md.",
        ),
    ] = "./inferplane-audit.db",
    busy_poll_us: Annotated[
        int,
        typer.Option(
            min=0,
            help="After each answer keep polling for the next request this many microseconds "
            "before sleeping: lower latency at low concurrency for some CPU; 0 turns it off. "
            "See docs/serving.md.",
        ),
    ] = 300,
    audit_payload_sample: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of requests whose input payload the audit keeps, after the redaction "
            "rules of the services file (docs/audit.md); 0 keeps none.",
        ),
    ] = 0.0,
    access: Annotated[
        str | None,
        typer.Option(
            envvar="INFERPLANE_ACCESS",
            help="Access file (identities, grants, quotas; docs/security.md): turns "
            "authentication and authorization on.",
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Serve a non-loopback address without --access (e.g. behind a mesh that "
            "authenticates); refused otherwise.",
        ),
    ] = False,
    tls_cert: Annotated[
        str | None, typer.Option(help="PEM certificate chain: TLS on both ports (reloaded).")
    ] = None,
    tls_key: Annotated[str | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
    tls_client_ca: Annotated[
        str | None,
        typer.Option(help="CA bundle client certificates are verified against (mTLS)."),
    ] = None,
    tls_require_client_cert: Annotated[
        bool, typer.Option(help="Refuse TLS clients without a certificate from --tls-client-ca.")
    ] = False,
    pickles: Annotated[
        str,
        typer.Option(
            help="Pickled artifacts (sklearn/joblib) run code when loaded: warn (load, log a "
            "warning), allow, or refuse. See docs/security.md."
        ),
    ] = "warn",
    http_header_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds a request's head may take to arrive.")
    ] = 10.0,
    http_body_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds a request's body may take after its head.")
    ] = 30.0,
    http_keepalive: Annotated[
        float, typer.Option(min=0.1, help="Seconds an idle keep-alive connection stays open.")
    ] = 5.0,
    max_connections: Annotated[
        int, typer.Option(min=1, help="Open connections per port; new ones are refused past it.")
    ] = 4096,
    max_idle_connections: Annotated[
        int, typer.Option(min=0, help="Idle keep-alive connections kept; the oldest close first.")
    ] = 1024,
    grpc_max_streams: Annotated[
        int, typer.Option(min=1, help="Concurrent streams per gRPC connection.")
    ] = 128,
    load: Annotated[
        str,
        typer.Option(
            help="eager: load every version at start; on-demand: load a version on its first "
            "request (large catalogues; see docs/serving.md 'Many models')."
        ),
    ] = "eager",
    pin_aliases: Annotated[
        list[str] | None,
        typer.Option(
            "--pin-aliases",
            help="Keep the versions this alias names loaded and never evict them (repeatable, "
            "or comma-separated), e.g. production.",
        ),
    ] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option(
            help="Memory the loaded models may take, e.g. 4GiB; past it the least recently "
            "used idle versions are unloaded. Default: no budget."
        ),
    ] = None,
    idle_unload_s: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="Unload a version unused this long (seconds), unless its model.yaml says "
            "otherwise; the next request loads it again. Default: never.",
        ),
    ] = None,
    cache_dir: Annotated[
        str | None,
        typer.Option(help="Local copies of a remote repository's artifacts (shared by processes)."),
    ] = None,
    cache_size: Annotated[
        str | None,
        typer.Option(help="Trim the artifact cache to this size, least recently used first."),
    ] = None,
    otlp_endpoint: OtlpEndpointOpt = None,
    trace_sample: TraceSampleOpt = None,
) -> None:
    """Serve the repository's models over V2 REST and gRPC (and V1 REST)."""
    from inferplane.routing.policy_source import default_services_url, read_policy
    from inferplane.server import ServerSettings, run

    if http_server not in ("granian", "uvicorn"):
        raise typer.BadParameter("use granian or uvicorn", param_hint="--http-server")
    if pickles not in ("warn", "allow", "refuse"):
        raise typer.BadParameter("use warn, allow or refuse", param_hint="--pickles")
    _check_tls(tls_cert, tls_key, tls_client_ca, tls_require_client_cert, http_server)
    residency = _residency(load, pin_aliases, memory_budget, idle_unload_s)
    cache_bytes = _size(cache_size, "--cache-size")
    traces = trace_settings(otlp_endpoint, trace_sample, "inferplane")
    repo = _repo(repository)
    if not repo.exists():
        raise typer.BadParameter(
            f"repository '{repository}' does not exist", param_hint="--repository"
        )
    if access is None and not insecure and not _loopback(host):
        raise typer.BadParameter(
            f"{host} is reachable from other machines and no --access file says who may call: "
            "anyone could infer, load and unload models. Give --access FILE (docs/security.md), "
            "or --insecure when something in front (a mesh, a gateway) authenticates callers.",
            param_hint="--host",
        )
    if access is not None:
        from inferplane.edge.access import read_access

        read_access(access)  # a broken access file fails here, before serving
    # A policy file that cannot be right whatever models load fails here, before serving.
    policy_url = services or default_services_url(repository)
    if read_policy(policy_url) is None and services is not None:
        raise typer.BadParameter(f"'{services}' does not exist", param_hint="--services")
    run(
        ServerSettings(
            repository=repository,
            host=host,
            http_port=http_port,
            grpc_port=grpc_port or None,
            models=list(model or []),
            max_payload_bytes=int(max_payload_mb * 1024 * 1024),
            log_level=log_level.lower(),
            strict_readiness=strict_readiness,
            http_server=http_server,
            services=services,
            watch=watch,
            watch_interval_s=watch_interval,
            rollouts=rollouts,
            stream_metrics=list(stream_metrics or []),
            prometheus=prometheus,
            drain_seconds=drain_seconds,
            audit_sink=None if audit_sink.lower() in ("", "none", "off") else audit_sink,
            busy_poll_us=busy_poll_us,
            audit_payload_sample=audit_payload_sample,
            access=access,
            insecure=insecure,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            tls_require_client_cert=tls_require_client_cert,
            pickles=pickles,
            http_header_timeout_s=http_header_timeout,
            http_body_timeout_s=http_body_timeout,
            http_keepalive_s=http_keepalive,
            max_connections=max_connections,
            max_idle_connections=max_idle_connections,
            grpc_max_streams=grpc_max_streams,
            traces=traces,
            residency=residency,
            cache_dir=cache_dir,
            cache_size=cache_bytes,
        )
    )


def _size(text: str | None, hint: str) -> int | None:
    from inferplane.sizes import parse_size

    if text is None:
        return None
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=hint) from None
    if size <= 0:
        raise typer.BadParameter("a size above zero", param_hint=hint)
    return size


def _residency(
    load: str, pin_aliases: list[str] | None, memory_budget: str | None, idle_unload_s: float | None
) -> ResidencyOptions:
    from inferplane.engine.residency import LOAD_MODES, ResidencyOptions
    from inferplane.repository.schema import ALIAS_NAME

    if load not in LOAD_MODES:
        raise typer.BadParameter(f"use {' or '.join(LOAD_MODES)}", param_hint="--load")
    aliases = tuple(a.strip() for item in pin_aliases or [] for a in item.split(",") if a.strip())
    for alias in aliases:
        if not ALIAS_NAME.match(alias):
            raise typer.BadParameter(f"{alias!r} is not an alias name", param_hint="--pin-aliases")
    return ResidencyOptions(
        load=load,
        pin_aliases=aliases,
        memory_budget=_size(memory_budget, "--memory-budget"),
        idle_unload_s=idle_unload_s,
    )


def _check_tls(
    cert: str | None, key: str | None, client_ca: str | None, require: bool, http_server: str
) -> None:
    """TLS options that go together, and files that load, checked before anything starts."""
    if cert is None:
        for given, hint in ((key, "--tls-key"), (client_ca, "--tls-client-ca")):
            if given is not None:
                raise typer.BadParameter(
                    "needs --tls-cert (TLS is off without it)", param_hint=hint
                )
        if require:
            raise typer.BadParameter(
                "needs --tls-cert and --tls-client-ca", param_hint="--tls-require-client-cert"
            )
        return
    if key is None:
        raise typer.BadParameter(
            "needs --tls-key, the certificate's private key", param_hint="--tls-cert"
        )
    if require and client_ca is None:
        raise typer.BadParameter(
            "needs --tls-client-ca, the CA bundle client certificates are checked against",
            param_hint="--tls-require-client-cert",
        )
    if http_server == "granian":
        raise typer.BadParameter(
            "TLS needs --http-server uvicorn: granian neither reloads certificates in place nor "
            "hands the client certificate to the application",
            param_hint="--http-server",
        )
    from inferplane.edge.tls import HTTP_ALPN, TlsFileError, TlsFiles, server_context

    try:
        server_context(TlsFiles(cert, key, client_ca, require), HTTP_ALPN)
    except TlsFileError as exc:
        raise typer.BadParameter(str(exc), param_hint="--tls-cert") from None


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _parse_kv(items: list[str] | None, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"'{item}': expected key=value", param_hint=what)
        try:
            out[key] = json.loads(value)  # numbers and booleans keep their type
        except json.JSONDecodeError:
            out[key] = value
    return out


@models_app.command("register")
@one_line_errors
def register_cmd(
    name: Annotated[str, typer.Argument(help="Model name.")],
    artifact: Annotated[str, typer.Argument(help="Model file, or folder for python models.")],
    repository: RepositoryOpt = "./models",
    runtime: Annotated[
        str | None,
        typer.Option(help="onnx, sklearn, xgboost, lightgbm, torch or python; default: guessed."),
    ] = None,
    input: Annotated[
        list[str] | None,
        typer.Option("--input", help="name:DATATYPE:shape, e.g. input:FP32:-1,32 (repeatable)."),
    ] = None,
    output: Annotated[
        list[str] | None, typer.Option("--output", help="name:DATATYPE:shape (repeatable).")
    ] = None,
    max_batch_size: Annotated[
        int | None, typer.Option(help="Dynamic batching: largest batch per execution.")
    ] = None,
    max_queue_delay_us: Annotated[
        int, typer.Option(help="Dynamic batching: longest wait for a batch to fill (µs).")
    ] = 1000,
    instances: Annotated[int, typer.Option(help="Concurrent executions of this version.")] = 1,
    instance_kind: Annotated[
        str,
        typer.Option(
            help="thread, process (one worker process per instance, for GIL-holding Python "
            "models), loop (executions on the event loop, for models that take microseconds) or "
            "auto (the loop when one instance's full batch measures within 150 µs at load, "
            "processes for python/sklearn models with several instances, threads otherwise)."
        ),
    ] = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    option: Annotated[
        list[str] | None,
        typer.Option("--option", help="Runtime option key=value, e.g. intra_op_threads=2."),
    ] = None,
    metadata: Annotated[
        list[str] | None,
        typer.Option(
            "--metadata", help="Lineage key=value, e.g. training_data=s3://...; auc=0.91."
        ),
    ] = None,
    alias: Annotated[
        list[str] | None, typer.Option("--alias", help="Point this alias at the new version.")
    ] = None,
    optimize: Annotated[
        bool,
        typer.Option(
            "--optimize",
            help="Also convert a scikit-learn, XGBoost or LightGBM model to ONNX, check it against "
            "the original and serve it when it matches and is faster.",
        ),
    ] = False,
    samples: Annotated[
        str | None,
        typer.Option(
            help="With --optimize: .npy array [N, n_features] of rows to check, besides the "
            "generated ones."
        ),
    ] = None,
    optimize_tolerance: Annotated[
        float,
        typer.Option(help="With --optimize: largest absolute difference accepted on numbers."),
    ] = 1e-5,
    optimize_rtol: Annotated[
        float,
        typer.Option(help="With --optimize: relative difference accepted on top (default 0)."),
    ] = 0.0,
    residency: Annotated[
        str | None,
        typer.Option(
            help="pinned (loaded at start, never evicted) or on_demand (loaded by its first "
            "request, evictable); default: the server's --load decides."
        ),
    ] = None,
    idle_unload_s: Annotated[
        float | None,
        typer.Option(help="Unload this version after this many seconds without a request."),
    ] = None,
    memory: Annotated[
        str | None,
        typer.Option(
            help="Memory the loaded version needs, e.g. 512MiB: the memory budget counts this "
            "until a load has measured it."
        ),
    ] = None,
) -> None:
    """Copy ARTIFACT into the repository as the next version of NAME."""
    from inferplane.repository.optimize import OptimizeOptions
    from inferplane.repository.register import parse_tensor_arg, register
    from inferplane.repository.schema import Batching

    if not optimize and samples is not None:
        raise typer.BadParameter("--samples is used with --optimize only", param_hint="--samples")
    if optimize_tolerance < 0 or optimize_rtol < 0:
        raise typer.BadParameter("tolerances are >= 0", param_hint="--optimize-tolerance")
    repo = _repo(repository)
    config = register(
        repo,
        name,
        artifact,
        runtime=runtime,
        inputs=[parse_tensor_arg(t) for t in input] if input else None,
        outputs=[parse_tensor_arg(t) for t in output] if output else None,
        batching=(
            Batching(max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us)
            if max_batch_size
            else None
        ),
        instances=instances,
        instance_kind=instance_kind,
        device=device,
        options=_parse_kv(option, "--option"),
        metadata=_parse_kv(metadata, "--metadata"),
        optimize=(
            OptimizeOptions(samples=samples, atol=optimize_tolerance, rtol=optimize_rtol)
            if optimize
            else None
        ),
        residency=residency,
        idle_unload_s=idle_unload_s,
        memory=memory,
    )
    for a in alias or []:
        repo.set_alias(name, a, config.version)
    served: str = config.runtime
    if config.optimized is not None and config.optimized.enabled:
        served = f"{config.runtime}, served as ONNX"
    console.print(
        f"registered [bold]{config.name}[/bold] version [bold]{config.version}[/bold] "
        f"({served}) in {repository}",
        highlight=False,
    )
    if optimize:
        report = config.metadata.get("optimization", {})
        if report.get("converted"):
            speed = report.get("speedup", {})
            console.print(
                f"optimization: {report.get('samples', {}).get('checked', 0)} samples match "
                f"within atol {optimize_tolerance:g}; max |diff| "
                f"{report.get('max_abs_diff') or '-'}; label agreement "
                f"{report.get('label_agreement') or '-'}; ONNX speed-up "
                f"{speed.get('batch_1')}x at batch 1, {speed.get('batch_32')}x at batch 32",
                highlight=False,
                soft_wrap=True,
            )
        if report.get("served") != "onnx":
            err_console.print(
                f"[yellow]warning:[/yellow] not optimized, serving the {config.runtime} artifact "
                f"as it is: {report.get('reason', 'unknown reason')}",
                highlight=False,
                soft_wrap=True,
            )


@models_app.command("list")
@one_line_errors
def list_cmd(
    repository: RepositoryOpt = "./models",
    server: Annotated[
        str | None,
        typer.Option(
            help="A running server's URL: list what it holds in memory (state, footprint) "
            "instead of the repository."
        ),
    ] = None,
) -> None:
    """A table of models, their versions and aliases (or, with --server, their residency)."""
    if server is not None:
        from inferplane.engine.residency_command import (
            fetch_residency,
            residency_table,
            summary_line,
        )

        report = fetch_residency(server)
        console.print(residency_table(report, f"models in {server}"))
        console.print(summary_line(report), highlight=False)
        return
    repo = _repo(repository)
    table = Table(title=f"models in {repository}")
    for col in ("model", "versions", "latest", "runtime", "aliases"):
        table.add_column(col)
    for name, item in sorted(repo.catalogue().items()):
        if not item.configs:
            continue
        versions = [c.version for c in item.configs]
        aliases = ", ".join(f"{a}→{v}" for a, v in item.aliases.items())
        table.add_row(
            name,
            ", ".join(map(str, versions)),
            str(versions[-1]),
            item.configs[-1].runtime,
            aliases,
        )
    console.print(table)


@models_app.command("show")
@one_line_errors
def show_cmd(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[
        str | None, typer.Option(help="Version number or alias; default: production/latest.")
    ] = None,
    repository: RepositoryOpt = "./models",
    server: Annotated[
        str | None,
        typer.Option(help="A running server's URL: add what it measured (footprint, loads)."),
    ] = None,
) -> None:
    """One version's signature, settings, checksums and metadata."""
    repo = _repo(repository)
    config = repo.read_config(name, repo.resolve_version(name, version))
    aliases = [a for a, v in repo.aliases(name).items() if v == config.version]
    table = Table(title=f"{name} version {config.version}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", no_wrap=True, overflow="ignore")  # digests must stay whole
    table.add_row("runtime", config.runtime)
    table.add_row("artifact", config.artifact)
    table.add_row("aliases", ", ".join(aliases) or "-")
    for kind, tensors in (("input", config.inputs), ("output", config.outputs)):
        for t in tensors:
            table.add_row(kind, f"{t.name}  {t.datatype}  {t.shape}")
    batching = config.batching
    table.add_row(
        "batching",
        "off"
        if batching is None
        else f"max_batch_size={batching.max_batch_size} "
        f"max_queue_delay_us={batching.max_queue_delay_us} enabled={batching.enabled}",
    )
    table.add_row(
        "instances / device", f"{config.instances} ({config.instance_kind}) / {config.device}"
    )
    for file, digest in config.sha256.items():
        table.add_row("sha256", f"{file}  {digest}")
    for key, value in config.metadata.items():
        table.add_row(f"metadata.{key}", str(value))
    if config.residency or config.idle_unload_s or config.memory_hint:
        table.add_row(
            "residency",
            f"{config.residency or 'server default'}; idle_unload_s "
            f"{config.idle_unload_s or '-'}; memory hint {config.memory_hint or '-'}",
        )
    if server is not None:
        from inferplane.engine.residency_command import fetch_residency, footprint_rows

        rows = fetch_residency(server, name)["versions"]
        table.add_section()
        table.add_row("on the server", server)
        for row in rows:
            if row["version"] == str(config.version):
                for field_name, value in footprint_rows(row):
                    table.add_row(field_name, value)
    console.print(table)


@models_app.command("alias")
@one_line_errors
def alias_cmd(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Argument(help="Alias, e.g. production or staging.")],
    version: Annotated[int | None, typer.Argument(help="Version the alias points to.")] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Delete the alias.")] = False,
    repository: RepositoryOpt = "./models",
) -> None:
    """Point ALIAS of model NAME at VERSION (or --remove it)."""
    repo = _repo(repository)
    if remove:
        repo.remove_alias(name, alias)
        console.print(f"removed alias {alias} of {name}", highlight=False)
        return
    if version is None:
        raise typer.BadParameter("give the VERSION the alias points to, or --remove")
    repo.set_alias(name, alias, version)
    console.print(f"{name}: {alias} → version {version}", highlight=False)


@app.command()
def version() -> None:
    """Print the inferplane version."""
    console.print(f"inferplane {__version__}", highlight=False)


# Commands that live beside their feature: each module defines plain typer command functions
# (Annotated options, no app of its own) and raises InferplaneError for user mistakes.
# One block per feature, so that features can be added without touching each other.
# -- stream (inferplane/streaming/command.py) --
from inferplane.streaming.command import stream_command  # noqa: E402

app.command("stream")(one_line_errors(stream_command))
# -- batch (inferplane/batch/command.py) --
from inferplane.batch.command import batch_command  # noqa: E402

app.command("batch")(one_line_errors(batch_command))
# -- audit (inferplane/observability/audit_command.py) --
from inferplane.observability.audit_command import audit_command  # noqa: E402

app.command("audit")(one_line_errors(audit_command))
# -- apply (inferplane/control/apply_command.py) --
from inferplane.control.apply_command import apply_command  # noqa: E402

app.command("apply")(one_line_errors(apply_command))


# -- keys (inferplane/edge/keys_command.py) --
from inferplane.edge import keys_command  # noqa: E402

keys_app = typer.Typer(help="API keys of an access file (docs/security.md).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
keys_app.command("create")(one_line_errors(keys_command.create_command))
keys_app.command("list")(one_line_errors(keys_command.list_command))
keys_app.command("revoke")(one_line_errors(keys_command.revoke_command))

# -- rollout (inferplane/control/rollout/command.py) --
from inferplane.control.rollout import command as rollout_command  # noqa: E402

rollout_app = typer.Typer(
    help="Progressive delivery: run the rollout controller, see and steer rollouts "
    "(docs/rollouts.md).",
    no_args_is_help=True,
)
app.add_typer(rollout_app, name="rollout")
for _name in ("run", "status", "start", "pause", "resume", "abort", "promote"):
    rollout_app.command(_name)(one_line_errors(getattr(rollout_command, f"{_name}_command")))


def main() -> None:
    app(prog_name="inferplane")


if __name__ == "__main__":
    main()
