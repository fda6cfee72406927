"""The interface that online serving, streaming and batch all call, and its in-process form.

`InProcessPredictor` runs edge validation -> routing -> engine in this process. A remote
implementation (a V2 client) will satisfy the same protocol for model-as-a-service deployments.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from inferplane.edge.validation import validate_inputs
from inferplane.engine.manager import ModelManager
from inferplane.errors import BadRequest, InferplaneError, InternalError
from inferplane.routing.router import Router


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


class Predictor(Protocol):
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


def _is_invalid_argument(exc: Exception) -> bool:
    # ONNX Runtime reports bad inputs as InvalidArgument / Fail with an "INVALID_ARGUMENT" text.
    return type(exc).__name__ in {"InvalidArgument", "InvalidArgumentException"} or (
        "INVALID_ARGUMENT" in str(exc)
    )
