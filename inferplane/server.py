"""Assemble edge -> routing -> engine behind the protocols and run them in one process."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from inferplane.console import routes as console_routes
from inferplane.edge.gate import Edge
from inferplane.engine.residency import ResidencyOptions
from inferplane.observability import tracing
from inferplane.observability.stream_view import StreamView
from inferplane.observability.tracing import TraceSettings
from inferplane.predictor import build_in_process
from inferplane.protocols import (
    audit_rest,
    models_rest,
    rollouts_rest,
    services_rest,
    streams_rest,
    v1_rest,
    v2_rest,
)
from inferplane.protocols.busy_poll import DEFAULT_WINDOW_US, BusyPoll
from inferplane.protocols.deps import DEFAULT_MAX_PAYLOAD, ServingDeps
from inferplane.protocols.http_protocol import HttpLimits, v2_http_protocol
from inferplane.protocols.v2_infer_asgi import InferEndpoint

if TYPE_CHECKING:
    from inferplane.control.rollout.controller import RolloutController

log = logging.getLogger("inferplane.server")


@dataclass
class ServerSettings:
    repository: str
    host: str = "127.0.0.1"
    http_port: int = 8080
    grpc_port: int | None = 8081
    models: list[str] = field(default_factory=list)
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD
    log_level: str = "info"
    strict_readiness: bool = False
    http_server: str = "uvicorn"  # or "granian" (see docs/serving.md for the measurement)
    services: str | None = None  # traffic policy file; default: <repository>/services.yaml if any
    watch: bool = False  # re-read the policy file and the loaded models' aliases when they change
    watch_interval_s: float = 1.0
    drain_seconds: float = 10.0  # on SIGTERM: not ready at once, serve this long, then exit 0
    audit_sink: str | None = None  # audit trail sink (see docs/audit.md); None: no audit
    busy_poll_us: int = DEFAULT_WINDOW_US  # poll the loop this long after answers (0: off)
    audit_payload_sample: float = 0.0  # share of requests whose (redacted) payload is audited
    # --- the edge (docs/security.md) ---
    access: str | None = None  # access.yaml: identities, grants, quotas; None: no auth
    insecure: bool = False  # allow a non-loopback bind without --access
    tls_cert: str | None = None  # PEM certificate chain for both ports; None: plain TCP
    tls_key: str | None = None
    tls_client_ca: str | None = None  # CA bundle that client certificates must chain to (mTLS)
    tls_require_client_cert: bool = False  # refuse the handshake without a client certificate
    pickles: str = "warn"  # warn | allow | refuse: loading pickled (sklearn/joblib) artifacts
    # --- listener limits against hostile or broken clients ---
    http_header_timeout_s: float = 10.0  # a request's head must arrive within this
    http_body_timeout_s: float = 30.0  # ... and its body within this after the head
    http_keepalive_s: float = 5.0  # idle keep-alive connections close after this
    max_connections: int = 4096  # open connections per port; past it new ones are refused
    max_idle_connections: int = 1024  # idle keep-alive connections kept; the oldest close first
    grpc_max_streams: int = 128  # concurrent streams per gRPC connection (SETTINGS advertised)
    # --- many models (docs/serving.md "Many models") ---
    residency: ResidencyOptions = field(default_factory=ResidencyOptions)
    cache_dir: str | None = None  # local copies of remote artifacts; None: <tmp>/inferplane-cache
    cache_size: int | None = None  # bytes the cache is trimmed to (LRU); None: no limit
    traces: TraceSettings | None = None  # OpenTelemetry export (docs/observability.md); None: off
    rollouts: bool = True  # run the rollout controller in this process (docs/rollouts.md)
    # where the console's stream view reads workers' figures: their /metrics pages, or a
    # Prometheus that scrapes them (docs/observability.md, "Console")
    stream_metrics: list[str] = field(default_factory=list)
    prometheus: str | None = None


def build_deps(settings: ServerSettings) -> ServingDeps:
    predictor, policy = build_in_process(
        settings.repository,
        models=settings.models,
        services=settings.services,
        audit_sink=settings.audit_sink,
        audit_payload_sample=settings.audit_payload_sample,
        strict_readiness=settings.strict_readiness,
        pickles=settings.pickles,
        residency=settings.residency,
        cache_dir=settings.cache_dir,
        cache_size=settings.cache_size,
    )
    manager = predictor.manager
    manager.metrics.inflight.set_function(lambda: manager.inflight)
    rollouts = None
    if settings.rollouts and policy is not None:
        from inferplane.control.rollout.controller import RolloutController
        from inferplane.control.rollout.figures import RegistrySource

        rollouts = RolloutController(
            settings.repository,
            policy.url,
            RegistrySource(manager.metrics.registry),
            audit=predictor.audit,
            registry=manager.metrics.registry,
        )
    return ServingDeps(
        manager=manager,
        predictor=predictor,
        metrics=manager.metrics,
        max_payload_bytes=settings.max_payload_bytes,
        policy=policy,
        watch=settings.watch,
        watch_interval_s=settings.watch_interval_s,
        busy_poll=BusyPoll(settings.busy_poll_us, manager.metrics.busy_poll_seconds),
        edge=Edge(settings.access, metrics=manager.metrics) if settings.access else None,
        rollouts=rollouts,
        streams=StreamView(settings.stream_metrics, settings.prometheus),
    )


def build_app(deps: ServingDeps) -> InferEndpoint:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Load in the background: /v2/health/live answers at once, /ready once models are warm.
        tasks = [
            asyncio.create_task(_start(deps)),
            # idle_unload_s: versions unused that long are unloaded (scale to zero per model)
            asyncio.create_task(deps.manager.housekeeping()),
        ]
        if deps.edge is not None:
            tasks.append(asyncio.create_task(deps.edge.watch()))  # keys, grants, quotas, JWKS
        yield
        for task in tasks:
            task.cancel()
        await deps.predictor.aclose()

    routes = (
        v2_rest.build_routes(deps)
        + v1_rest.build_routes(deps)
        + services_rest.build_routes(deps)
        + models_rest.build_routes(deps)
        + audit_rest.build_routes(deps)
        + rollouts_rest.build_routes(deps)
        + streams_rest.build_routes(deps)
        + console_routes.build_routes(deps)
    )
    return InferEndpoint(
        deps,
        Starlette(
            routes=routes,
            lifespan=lifespan,
            # Unknown paths and methods answer the V2 error body too, not Starlette's plain text.
            exception_handlers={HTTPException: _v2_http_error},
        ),
    )


async def _v2_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    what = "path" if exc.status_code == 404 else "method"
    body = v2_rest.json_response(
        {"error": f"{exc.detail}: no {what} {request.method} {request.url.path}"}, exc.status_code
    )
    for name, value in (exc.headers or {}).items():
        body.headers[name] = value
    return body


async def _start(deps: ServingDeps) -> None:
    """Models first, then the traffic policy that refers to them, then (--watch) follow both as
    the repository changes."""
    await deps.manager.load_initial()
    # On demand the server is ready already; the model.yaml files are read now (a request
    # that names a model first reads its own at once), then pinned versions load.
    await deps.manager.read_catalogue_if_pending()
    # Everything loaded so far (libraries, models) lives as long as the server: out of the
    # collector's sight, a full collection under load took 0.4-0.7 ms instead of ~28 ms (it ran
    # about every 4.5 s at 8,000 requests/s and stalled every request in flight).
    gc.collect()
    gc.freeze()
    if deps.policy is not None:
        await asyncio.to_thread(deps.policy.load_logged)
    loops = []  # cancelled with this task at shutdown
    if deps.rollouts is not None:
        loops.append(_run_rollouts(deps, deps.rollouts))
    if deps.watch:
        loops.append(_watch(deps))
    if loops:
        await asyncio.gather(*loops)


async def _run_rollouts(deps: ServingDeps, controller: RolloutController) -> None:
    """The rollout controller's passes, off the event loop. What it writes (weights, aliases)
    is applied here at once, without waiting for --watch (or without --watch at all)."""
    changed = False

    def mark() -> None:
        nonlocal changed
        changed = True

    controller.on_change = mark
    while True:
        try:
            await asyncio.to_thread(controller.tick)
            if changed:
                changed = False
                await deps.manager.refresh()
                if deps.policy is not None:
                    await asyncio.to_thread(deps.policy.load_logged)
            interval = controller.interval()
        except Exception:  # one bad pass must not end every later rollout
            log.exception("rollouts: a controller pass failed")
            interval = 5.0
        await asyncio.sleep(min(interval, 1.0))


async def _watch(deps: ServingDeps) -> None:
    """--watch: each pass converges the models (new versions load, aliases move), then the
    policy, in that order, so that a policy naming a version registered with it finds the
    version there."""
    while True:
        await asyncio.sleep(deps.watch_interval_s)
        try:
            await deps.manager.refresh()
        except Exception:  # a bug in one pass must not end the watch of every later change
            log.exception("watch: refreshing the models from the repository failed")
        if deps.policy is not None:
            await asyncio.to_thread(deps.policy.load_logged)


class Drain:
    """A graceful stop, as a rolling update needs it.

    SIGTERM (what Kubernetes sends) takes the server out of readiness at once
    (`/v2/health/ready` and gRPC health answer 503 / NOT_SERVING, so load balancers and
    endpoints stop sending) while it goes on serving what still arrives for `seconds`; then
    gRPC sends GOAWAY and lets its calls finish, the HTTP server stops (its in-flight requests
    finish), and the lifespan's shutdown flushes the audit. SIGINT (Ctrl-C) is the quick stop,
    as in gunicorn: the same steps without the wait. A second signal cuts a wait short.
    """

    def __init__(self, deps: ServingDeps, seconds: float) -> None:
        self.deps = deps
        self.seconds = seconds
        self.grpc_server: Any = None
        self._skip = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def begin(self, stop_http: Callable[[], None], quick: bool = False) -> None:
        if self._task is not None:
            log.info("second signal: ending the drain now")
            self._skip.set()
            return
        self.deps.manager.draining = True
        if quick or self.seconds <= 0:
            self._skip.set()
            log.info("stopping: requests in flight finish, new ones are refused")
        else:
            log.info(
                "draining: not ready from now on, serving for %.1f s more, then stopping",
                self.seconds,
            )
        self._task = asyncio.get_running_loop().create_task(self._run(stop_http))

    async def _run(self, stop_http: Callable[[], None]) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._skip.wait(), self.seconds)
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=5)
        log.info("drained; stopping")
        stop_http()


class _UvicornServer(uvicorn.Server):
    """uvicorn's server with its signal handling handed to a `Drain`.

    uvicorn stops at once on SIGTERM and re-raises the signal once stopped, so the process
    would end killed by it (exit 143) with the gRPC port never closed; here a stop is a drain
    and the process exits 0.
    """

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._loop = asyncio.get_running_loop()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:  # draining is over and the stop has begun: a signal forces it
            self.force_exit = True
            return
        self._loop.call_soon_threadsafe(self.drain.begin, self._stop, sig == signal.SIGINT)

    def _stop(self) -> None:
        self.should_exit = True


async def serve(settings: ServerSettings) -> None:
    tracing.configure(settings.traces)
    try:
        await _serve(settings)
    finally:
        tracing.shutdown()  # the spans still buffered go out before the process ends


async def _serve(settings: ServerSettings) -> None:
    deps = build_deps(settings)
    drain = Drain(deps, settings.drain_seconds)
    app = build_app(deps)
    reloader = None
    if settings.tls_cert:
        from inferplane.edge.tls import CertReloader, TlsFiles

        if settings.http_server == "granian":
            raise ValueError(_GRANIAN_TLS)
        files = TlsFiles(
            settings.tls_cert,
            settings.tls_key or settings.tls_cert,  # a key in the certificate's file
            settings.tls_client_ca,
            settings.tls_require_client_cert,
        )
        reloader = CertReloader(files)
    grpc_server = None
    if settings.grpc_port:
        from inferplane.edge.tls import GRPC_ALPN
        from inferplane.protocols.grpc_transport import GrpcLimits
        from inferplane.protocols.v2_grpc import start_grpc_server

        limits = GrpcLimits(
            max_concurrent_streams=settings.grpc_max_streams,
            max_connections=settings.max_connections,
        )
        grpc_ssl = None if reloader is None else reloader.context(GRPC_ALPN)
        grpc_server = await start_grpc_server(
            deps, settings.host, settings.grpc_port, ssl=grpc_ssl, limits=limits
        )
        drain.grpc_server = grpc_server
        tls = "" if reloader is None else " (TLS)"
        log.info("gRPC listening on %s:%d%s", settings.host, settings.grpc_port, tls)
    watcher = None
    try:
        if reloader is None:
            if settings.http_server == "granian":
                await _serve_granian(app, settings, drain)
            else:
                await _serve_uvicorn(app, settings, drain)
        else:
            from inferplane.edge.tls import HTTP_ALPN

            http_ssl = reloader.context(HTTP_ALPN)
            watcher = asyncio.create_task(reloader.run())
            with reloader.install_sighup(asyncio.get_running_loop()):
                await _serve_uvicorn(app, settings, drain, http_ssl)
    finally:
        if watcher is not None:
            watcher.cancel()
        if grpc_server is not None:
            await grpc_server.stop(grace=5)


_GRANIAN_TLS = (
    "TLS needs --http-server uvicorn: granian neither reloads certificates in place nor hands "
    "the client certificate to the application"
)


async def _serve_uvicorn(
    app: InferEndpoint,
    settings: ServerSettings,
    drain: Drain,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    protocol = v2_http_protocol(
        app.handler,  # httptools; infer answered without ASGI
        HttpLimits(
            header_timeout_s=settings.http_header_timeout_s,
            body_timeout_s=settings.http_body_timeout_s,
            keepalive_s=settings.http_keepalive_s,  # the protocol's sweep closes idle ones
            max_connections=settings.max_connections,
            max_idle_connections=settings.max_idle_connections,
        ),
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.http_port,
        loop="uvloop",
        http=protocol,
        log_level=settings.log_level,
        access_log=False,
        proxy_headers=False,  # no X-Forwarded-* rewriting: nothing here reads the client address
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    config.load()
    # Handed over after load() (which would build its own from file names): the reloader keeps
    # this very context on the newest certificate, and uvicorn listens with it.
    config.ssl = ssl_context
    try:
        await _UvicornServer(config, drain).serve()
    finally:
        await protocol.registry.stop()


async def _serve_granian(app: InferEndpoint, settings: ServerSettings, drain: Drain) -> None:
    """Granian's Rust HTTP/1 front end in this process and event loop (its embedded mode).

    It parses requests and writes responses off the Python thread, which is where uvicorn spends
    most of its time on small requests (two socket writes per response under the GIL). Of the
    listener limits only the header timeout applies here; TLS is refused (`_GRANIAN_TLS`).
    """
    from granian.constants import Interfaces
    from granian.http import HTTP1Settings
    from granian.log import LogLevels
    from granian.server.embed import Server

    if settings.tls_cert:
        raise ValueError(_GRANIAN_TLS)
    logging.getLogger("_granian").setLevel(logging.ERROR)  # "embedded is experimental" at start
    server = Server(
        app,
        address=settings.host,
        port=settings.http_port,
        interface=Interfaces.ASGI,
        log_level=LogLevels.error,
        backlog=2048,
        http1_settings=HTTP1Settings(
            header_read_timeout=max(1, round(settings.http_header_timeout_s * 1000))
        ),
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, drain.begin, server.stop)
    loop.add_signal_handler(signal.SIGINT, drain.begin, server.stop, True)
    log.info("HTTP listening on %s:%d (granian)", settings.host, settings.http_port)
    await server.serve()


def run(settings: ServerSettings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        pass
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings))


__all__ = ["Drain", "ServerSettings", "build_app", "build_deps", "run", "serve"]
