"""The interface that online serving, streaming and batch all call, and its in-process form.

`InProcessPredictor` runs edge validation -> routing -> engine in this process;
`inferplane.remote.RemotePredictor` (a V2 HTTP client) satisfies the same protocol for
model-as-a-service deployments. `open_predictor` picks one from a command's options.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from inferplane.edge.validation import validate_inputs
from inferplane.engine.manager import ModelManager
from inferplane.errors import BadRequest, InferplaneError, InternalError
from inferplane.observability.metrics import Metrics
from inferplane.repository.store import Repository
from inferplane.routing.router import Router
from inferplane.tensors import TensorSpec


@dataclass(slots=True)
class RequestContext:
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    tenant: str | None = None
    deadline: float | None = None  # time.monotonic() after which the work is useless
    headers: Mapping[str, str] = field(default_factory=dict)
    traceparent: str | None = None
    priority: int = 0  # 0 = default; 1 is the highest of the model's priority levels


@dataclass(slots=True)
class Prediction:
    outputs: dict[str, np.ndarray]
    model_name: str
    model_version: str
    route: str = "direct"


@dataclass(slots=True)
class Signature:
    """What a target answers with today: the version a request without a version would reach."""

    model_name: str
    model_version: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int = 0


class Predictor(Protocol):
    async def signature(self, target: str, version: str | None = None) -> Signature: ...

    async def predict(
        self,
        target: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
        context: RequestContext,
    ) -> Prediction: ...


class InProcessPredictor:
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        self.router = Router(manager)

    async def signature(self, target: str, version: str | None = None) -> Signature:
        lv, _ = self.router.resolve(target, version)
        cfg = lv.config
        return Signature(
            lv.name, lv.version, cfg.input_specs(), cfg.output_specs(), cfg.max_batch_size
        )

    async def predict(
        self,
        target: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
        context: RequestContext,
    ) -> Prediction:
        lv, route = self.router.resolve(target, version)
        validate_inputs(lv.config, inputs, outputs)
        started = time.perf_counter_ns()
        ok = False
        try:
            result = await self.manager.infer(
                lv, dict(inputs), outputs, context.deadline, context.priority
            )
            ok = True
        except InferplaneError:
            raise
        except (ValueError, TypeError) as exc:
            # The framework refused this input (e.g. a value it cannot handle): the caller's problem.
            raise BadRequest(
                f"model '{lv.name}' version {lv.version} rejected the input: {exc}"
            ) from exc
        except Exception as exc:
            if _is_invalid_argument(exc):
                raise BadRequest(
                    f"model '{lv.name}' version {lv.version} rejected the input: {exc}"
                ) from exc
            raise InternalError(
                f"model '{lv.name}' version {lv.version} failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            lv.stats.record_request(ok, time.perf_counter_ns() - started)
        return Prediction(result, lv.name, lv.version, route)


@contextlib.asynccontextmanager
async def open_predictor(
    *, repository: str | None = None, server: str | None = None, models: Sequence[str] = ()
) -> AsyncIterator[Predictor]:
    """The predictor a streaming or batch command asked for: exactly one of the two options.

    In-process, the named models (default: all) are loaded and warmed before this yields.
    """
    if (repository is None) == (server is None):
        raise BadRequest("give exactly one of --repository (in-process) and --server (remote)")
    if server is not None:
        from inferplane.remote import RemotePredictor

        remote = RemotePredictor(server)
        try:
            yield remote
        finally:
            await remote.aclose()
        return
    assert repository is not None
    manager = ModelManager(Repository(repository), Metrics(), list(models) or None)
    try:
        await manager.load_initial()
        yield InProcessPredictor(manager)
    finally:
        await manager.close()


def _is_invalid_argument(exc: Exception) -> bool:
    # ONNX Runtime reports bad inputs as InvalidArgument / Fail with an "INVALID_ARGUMENT" text.
    return type(exc).__name__ in {"InvalidArgument", "InvalidArgumentException"} or (
        "INVALID_ARGUMENT" in str(exc)
    )
