"""Open Inference Protocol (KServe V2) over gRPC, in Triton's dialect so that unmodified
`tritonclient.grpc` and perf_analyzer work: streaming infer, model config, statistics and the
model repository ride along with the V2 core, plus the standard `grpc.health.v1` service.

The transport is our own (protocols/grpc_transport.py: HTTP/2 framing on the server's event loop,
not grpc.aio, which cost more than twice as much per call); the servicers below are plain classes
whose methods it routes to.

Handlers stay thin and answer exactly like the REST front end (v2_rest.py): the same model views,
the same errors (each InferplaneError carries its gRPC code) and the same metrics, labelled
protocol="grpc".

Our messages keep Triton's names (`inference.*`), which tritonclient also registers in protobuf's
default descriptor pool; two registrations of one name fail with "duplicate symbol", whatever the
.proto file is called. scripts/gen_grpc.sh therefore builds our stubs in a private pool, so that
this module and tritonclient can share a process (tests, a remote predictor).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from inferplane.edge.access import ADMIN, INFER, READ
from inferplane.edge.identity import Principal
from inferplane.edge.quotas import NO_LEASE
from inferplane.engine.scheduler import batch_rows
from inferplane.errors import BadRequest, CataloguePending, DeadlineExceeded, InferplaneError
from inferplane.observability import tracing
from inferplane.observability.metrics import UNKNOWN
from inferplane.predictor import Prediction, RequestContext
from inferplane.protocols import grpc_transport, model_views
from inferplane.protocols.deps import EXTENSIONS, ServingDeps
from inferplane.protocols.grpc_gen import grpc_predict_v2_pb2 as pb
from inferplane.protocols.v2_codec import (
    API_KEY_HEADER,
    ROUTE_PARAMETER,
    TENANT_HEADER,
    request_deadline,
    request_priority,
)
from inferplane.tensors import BYTES, check_shape, datatype_of, dtype_of, from_raw, to_raw

log = logging.getLogger("inferplane.grpc")
TENANT = TENANT_HEADER.decode()
API_KEY = API_KEY_HEADER.decode()

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# Requests of one ModelStreamInfer call that may run at once; past that we stop reading the
# stream, and gRPC flow control slows the client down instead of our memory growing.
STREAM_CONCURRENCY = 64
READINESS_POLL_S = 0.2

# V2 datatype -> the InferTensorContents member that carries it, and that member's numpy type.
# FP16 and BF16 have no member: the protocol sends them only as raw contents.
_CONTENTS: dict[str, tuple[str, np.dtype[Any] | None]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "INT8": ("int_contents", np.dtype(np.int32)),
    "INT16": ("int_contents", np.dtype(np.int32)),
    "INT32": ("int_contents", np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64)),
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "UINT16": ("uint_contents", np.dtype(np.uint32)),
    "UINT32": ("uint_contents", np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", np.dtype(np.uint64)),
    "FP32": ("fp32_contents", np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64)),
    BYTES: ("bytes_contents", None),
}
_INTERNAL = "internal server error (see the server log)"
M = TypeVar("M", bound=Message)


# --- tensors ------------------------------------------------------------------------------------


def _from_contents(
    name: str, datatype: str, shape: tuple[int, ...], contents: pb.InferTensorContents
) -> np.ndarray:
    dtype = dtype_of(datatype)  # rejects unknown datatypes with the list of known ones
    if datatype not in _CONTENTS:
        raise BadRequest(
            f"input '{name}': {datatype} has no typed contents; send it in raw_input_contents"
        )
    member, wire_dtype = _CONTENTS[datatype]
    values = getattr(contents, member)
    count = math.prod(shape)
    if len(values) != count:
        raise BadRequest(
            f"input '{name}': shape {list(shape)} needs {count} elements, contents.{member} has "
            f"{len(values)} ({datatype} data goes in contents.{member})"
        )
    if wire_dtype is None:
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    wide = np.array(values, dtype=wire_dtype)
    # INT8/16 and UINT8/16 travel widened to 32 bits; refuse values that would wrap around.
    if dtype.kind in "iu" and dtype.itemsize < wire_dtype.itemsize and wide.size:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise BadRequest(f"input '{name}': a value is out of range for {datatype}")
    return wide.astype(dtype, copy=False).reshape(shape)


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """The request's input tensors from typed `contents` or `raw_input_contents` (not both)."""
    if not request.inputs:
        raise BadRequest("the request needs at least one input")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "it needs one per input, in input order"
        )
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise BadRequest(f"inputs[{i}] needs a name")
        if name in inputs:
            raise BadRequest(f"input '{name}' appears twice")
        if not tensor.datatype:
            raise BadRequest(f"input '{name}' needs a datatype")
        shape = check_shape(name, list(tensor.shape))
        if raw:
            if tensor.contents.ListFields():
                raise BadRequest(
                    f"input '{name}' has contents while the request uses raw_input_contents; "
                    "send every input one way or the other"
                )
            inputs[name] = from_raw(name, tensor.datatype, shape, raw[i])
        else:
            inputs[name] = _from_contents(name, tensor.datatype, shape, tensor.contents)
    return inputs


def encode_response(request: pb.ModelInferRequest, prediction: Prediction) -> pb.ModelInferResponse:
    """Outputs as raw contents (where tritonclient reads them), in the requested order."""
    response = pb.ModelInferResponse(
        model_name=prediction.model_name,
        model_version=prediction.model_version,
        # Echoed as sent, empty included: stream clients (perf_analyzer) match answers by it.
        id=request.id,
    )
    names = [o.name for o in request.outputs] or list(prediction.outputs)
    for name in names:
        arr = prediction.outputs[name]
        response.outputs.add(name=name, datatype=datatype_of(arr), shape=arr.shape)
        response.raw_output_contents.append(to_raw(arr))
    return response


# --- handlers -----------------------------------------------------------------------------------

Unary = Callable[[Any, Any, Any], Awaitable[Any]]


def _status_code(exc: InferplaneError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)


def guarded(handler: Unary) -> Unary:
    """Every failure becomes a gRPC status; only unexpected faults are INTERNAL (and logged).

    Handlers raise and never call `context.abort` themselves: abort works by raising, and the
    catch-all below would otherwise turn it into INTERNAL.
    """

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            try:
                return await handler(self, request, context)
            except CataloguePending as pending:  # read that model.yaml now, then answer
                await pending.wait()
                return await handler(self, request, context)
        except InferplaneError as exc:
            code, message = _status_code(exc), exc.message
        except Exception:
            log.exception("internal error in %s", handler.__name__)
            code, message = grpc.StatusCode.INTERNAL, _INTERNAL
        await context.abort(code, message)
        raise AssertionError("context.abort returns only by raising")

    return wrapper


def _metadata(context: Any) -> dict[str, str]:
    # Binary metadata (keys ending in -bin) carries bytes; headers here are text only.
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    # The id rides along so that a client can tell which of its requests failed.
    failed = pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    return pb.ModelStreamInferResponse(error_message=message, infer_response=failed)


class InferenceServicer:
    def __init__(self, deps: ServingDeps) -> None:
        self.deps = deps
        self.manager = deps.manager
        self.predictor = deps.predictor
        self.metrics = deps.metrics

    # the edge --------------------------------------------------------------------------------
    async def _check(
        self, context: Any, scope: str, target: str | None, headers: dict[str, str] | None = None
    ) -> Principal | None:
        """The caller, once the edge let them `scope` on `target` (None when the edge is off)."""
        edge = self.deps.edge
        if edge is None:
            return None
        if headers is None:
            headers = _metadata(context)
        return await edge.check(
            scope,
            target or None,
            headers.get("authorization"),
            headers.get(API_KEY),
            getattr(context, "peer_cert", None),
        )

    async def _visible(self, context: Any, scope: str, target: str | None) -> Callable[[str], bool]:
        """Which models a listing shows the caller, once they may `scope` at all."""
        principal = await self._check(context, scope, target)
        if principal is None or self.deps.edge is None:
            return lambda name: True
        return self.deps.edge.filter(principal, scope)

    # health and metadata -----------------------------------------------------------------------
    @guarded
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Any
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @guarded
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.manager.ready)

    @guarded
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Any
    ) -> pb.ModelReadyResponse:
        ok = model_views.model_ready(self.predictor.router, request.name, request.version or None)
        return pb.ModelReadyResponse(ready=ok)

    @guarded
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        await self._check(context, READ, None)
        return pb.ServerMetadataResponse(
            name=self.deps.server_name, version=self.deps.server_version, extensions=EXTENSIONS
        )

    @guarded
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        await self._check(context, READ, request.name)
        lv, _ = self.predictor.router.lookup(request.name, request.version or None)
        doc = model_views.model_metadata(self.manager.entry(lv.name), lv)
        return _parse(doc, pb.ModelMetadataResponse())

    @guarded
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Any
    ) -> pb.ModelConfigResponse:
        await self._check(context, READ, request.name)
        lv, _ = self.predictor.router.lookup(request.name, request.version or None)
        config = _parse(model_views.model_config(lv.config, lv.platform), pb.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    # inference ---------------------------------------------------------------------------------
    async def _infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        """One request, counted in the metrics like REST; errors propagate as InferplaneError."""
        started = time.perf_counter()
        name = request.model_name
        label_model, label_version, status = UNKNOWN, "", 500
        self.manager.inflight += 1
        lease = NO_LEASE
        span = error = None
        request_id = request.id or str(uuid.uuid4())
        try:
            headers = _metadata(context)
            tracer = tracing.ACTIVE
            if tracer is not None:
                span = tracer.start_request(
                    "inference.GRPCInferenceService/ModelInfer",
                    headers.get("traceparent"),
                    {
                        "rpc.system": "grpc",
                        "rpc.service": "inference.GRPCInferenceService",
                        "rpc.method": "ModelInfer",
                        "inferplane.target": name,
                    },
                )
            tenant, principal = headers.get(TENANT), None
            edge = self.deps.edge
            if edge is not None:
                who = await self._check(context, INFER, name, headers)
                assert who is not None
                tenant, principal = edge.tenant(who, tenant), who.name
                lease = edge.admit(who, name)
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded("the request's deadline passed before the model ran")
            inputs = decode_inputs(request)
            lease.charge_rows(batch_rows(inputs))
            params = {k: getattr(v, v.WhichOneof("parameter_choice") or "bool_param")
                      for k, v in request.parameters.items()}  # fmt: skip
            deadline = request_deadline(params, None)
            if remaining is not None:
                grpc_deadline = time.monotonic() + remaining
                deadline = grpc_deadline if deadline is None else min(deadline, grpc_deadline)
            prediction = await self.predictor.predict(
                name,
                inputs,
                version=request.model_version or None,
                outputs=[o.name for o in request.outputs] or None,
                context=RequestContext(
                    request_id=request_id,
                    tenant=tenant,
                    principal=principal,
                    deadline=deadline,
                    headers=headers,
                    traceparent=headers.get("traceparent"),
                    priority=request_priority(params),
                    parameters=params,
                    span=span,
                ),
            )
            label_model, label_version = prediction.model_name, prediction.model_version
            response = encode_response(request, prediction)
            if not request.model_version and self.predictor.is_service(name):
                response.parameters[ROUTE_PARAMETER].string_param = prediction.route
            status = 200
            return response
        except InferplaneError as exc:
            # Same status vocabulary as REST (HTTP codes), so one alert covers both protocols.
            status, error = exc.status, exc.message
            if name in self.manager.models:
                label_model = name
            raise
        finally:
            self.manager.inflight -= 1
            lease.release()
            if span is not None:
                tracing.end_request(span, status, label_model, label_version, request_id, error)
            self.metrics.requests.labels(label_model, label_version, "grpc", str(status)).inc()
            if status == 200:
                self.metrics.request_latency.labels(label_model, label_version, "grpc").observe(
                    time.perf_counter() - started
                )

    @guarded
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        return await self._infer(request, context)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream run concurrently and are answered as they finish, each answer
        carrying its request's id; a failed request is an error_message, the stream goes on."""
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_CONCURRENCY)
        running: set[asyncio.Task[None]] = set()

        async def run_one(request: pb.ModelInferRequest) -> None:
            try:
                answer = pb.ModelStreamInferResponse(
                    infer_response=await self._infer(request, context)
                )
            except InferplaneError as exc:
                answer = _stream_error(request, exc.message)
            except Exception:
                log.exception("internal error in ModelStreamInfer")
                answer = _stream_error(request, _INTERNAL)
            finally:
                slots.release()
            answers.put_nowait(answer)

        async def read_all() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(run_one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*running)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read_all())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # surfaces a failure to read the stream as the call's status
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    # extensions --------------------------------------------------------------------------------
    @guarded
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        shown = await self._visible(context, READ, request.name or None)
        rows = model_views.statistics(self.manager, request.name or None, request.version or None)
        rows = [r for r in rows if shown(r["name"])]
        return _parse({"model_stats": rows}, pb.ModelStatisticsResponse())

    @guarded
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        shown = await self._visible(context, READ, None)
        rows = [r for r in await model_views.list_repository(self.manager, request.ready)
                if shown(r["name"])]  # fmt: skip
        return _parse({"models": rows}, pb.RepositoryIndexResponse())

    @guarded
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        # Like REST, load parameters (Triton's config override, files) are not supported and
        # are ignored: a model is always (re)loaded from its model.yaml.
        await self._check(context, ADMIN, request.model_name)
        await model_views.load_model(self.manager, _model_name(request.model_name))
        return pb.RepositoryModelLoadResponse()

    @guarded
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await self._check(context, ADMIN, request.model_name)
        await self.manager.unload_model(_model_name(request.model_name))
        return pb.RepositoryModelUnloadResponse()


def _model_name(name: str) -> str:
    if not name:
        raise BadRequest("model_name is required")
    return name


def _parse(doc: Any, message: M) -> M:
    """A model_views dict into its proto: both use Triton's field names. Keys the proto lacks
    (e.g. the metadata `parameters` Triton's gRPC message has no field for) are dropped."""
    return json_format.ParseDict(doc, message, ignore_unknown_fields=True)


# --- server -------------------------------------------------------------------------------------


class HealthServicer:
    """`grpc.health.v1.Health` answering from the server's readiness, like /v2/health/ready, so
    that a Kubernetes gRPC probe and the HTTP one agree (SERVING once the initial load is done).
    Known services: "" (the server) and the inference service."""

    def __init__(self, deps: ServingDeps) -> None:
        self.deps = deps

    def _status(self, service: str) -> int:
        if service not in ("", SERVICE_NAME):
            raise grpc_transport.AbortError(
                grpc.StatusCode.NOT_FOUND, f"unknown service '{service}'"
            )
        ready = self.deps.manager.ready
        return health_pb2.HealthCheckResponse.SERVING if ready else _NOT_SERVING

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=self._status(request.service))

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now, then each change (polled), until the client cancels."""
        last = None
        while True:
            status = self._status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(READINESS_POLL_S)


_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def start_grpc_server(
    deps: ServingDeps,
    host: str,
    port: int,
    *,
    ssl: grpc_transport.SSLContext | None = None,
    limits: grpc_transport.GrpcLimits | None = None,
) -> grpc_transport.GrpcServer:
    """Build, bind and start the gRPC server (inference and health services); TLS with `ssl`
    (configured by the caller: certificates, ALPN "h2", client certificates), the transport's
    default guards unless `limits`."""
    routes = grpc_transport.methods_of(
        InferenceServicer(deps), pb.DESCRIPTOR.services_by_name["GRPCInferenceService"], pb
    )
    routes.update(
        grpc_transport.methods_of(
            HealthServicer(deps), health_pb2.DESCRIPTOR.services_by_name["Health"], health_pb2
        )
    )
    server = grpc_transport.GrpcServer(routes, deps.max_payload_bytes, deps.busy_poll, limits)
    try:
        await server.start(host, port, ssl)
    except OSError as exc:
        raise OSError(f"cannot bind the gRPC port {_address(host, port)}: {exc}") from exc
    return server


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
