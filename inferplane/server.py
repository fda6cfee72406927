"""Assemble edge -> routing -> engine behind the protocols and run them in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette

from inferplane.engine.manager import ModelManager
from inferplane.observability.metrics import Metrics
from inferplane.predictor import InProcessPredictor
from inferplane.protocols import v1_rest, v2_rest
from inferplane.protocols.deps import DEFAULT_MAX_PAYLOAD, ServingDeps
from inferplane.protocols.v2_infer_asgi import InferEndpoint
from inferplane.repository.store import Repository

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


def build_deps(settings: ServerSettings) -> ServingDeps:
    metrics = Metrics()
    manager = ModelManager(
        Repository(settings.repository),
        metrics,
        settings.models or None,
        strict_readiness=settings.strict_readiness,
    )
    metrics.inflight.set_function(lambda: manager.inflight)
    return ServingDeps(
        manager=manager,
        predictor=InProcessPredictor(manager),
        metrics=metrics,
        max_payload_bytes=settings.max_payload_bytes,
    )


def build_app(deps: ServingDeps) -> InferEndpoint:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Load in the background: /v2/health/live answers at once, /ready once models are warm.
        task = asyncio.create_task(deps.manager.load_initial())
        yield
        task.cancel()
        await deps.manager.close()

    routes = v2_rest.build_routes(deps) + v1_rest.build_routes(deps)
    return InferEndpoint(deps, Starlette(routes=routes, lifespan=lifespan))


async def serve(settings: ServerSettings) -> None:
    deps = build_deps(settings)
    app = build_app(deps)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.http_port,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    http = uvicorn.Server(config)
    grpc_server = None
    if settings.grpc_port:
        from inferplane.protocols.v2_grpc import start_grpc_server

        grpc_server = await start_grpc_server(deps, settings.host, settings.grpc_port)
        log.info("gRPC listening on %s:%d", settings.host, settings.grpc_port)
    try:
        await http.serve()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=5)


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


__all__ = ["ServerSettings", "build_app", "build_deps", "run", "serve", "signal"]
