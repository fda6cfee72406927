"""The gRPC transport (protocols/grpc_transport.py) on a real loopback port, driven by grpcio's
client and, for what grpcio never sends (a bad preface, a bare PING), by a raw socket.

The service is `grpc.health.v1.Health` with a toy servicer, so that the transport is tested apart
from the inference servicer (tests/integration/test_grpc.py covers that one end to end).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferplane.protocols.grpc_transport import GrpcServer, methods_of

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ToyHealth:
    """Check answers from the call's metadata and sleeps `sleep:<s>` services; Watch streams
    `count:<n>` answers."""

    async def Check(self, request: Any, context: Any) -> Any:
        if request.service.startswith("sleep:"):
            await asyncio.sleep(float(request.service.split(":")[1]))
        ok = dict(context.invocation_metadata()).get("x-ok") == "yes"
        return health_pb2.HealthCheckResponse(status=SERVING if ok else NOT_SERVING)

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        for i in range(int(request.service.split(":")[1])):
            yield health_pb2.HealthCheckResponse(status=SERVING if i % 2 else NOT_SERVING)


@pytest.fixture
async def server() -> AsyncIterator[GrpcServer]:
    routes = methods_of(ToyHealth(), health_pb2.DESCRIPTOR.services_by_name["Health"], health_pb2)
    srv = GrpcServer(routes, max_message_bytes=1 << 20)
    await srv.start("127.0.0.1", 0)
    yield srv
    await srv.stop(grace=1)


def _check(port: int, service: str, metadata: tuple[tuple[str, str], ...] = (), **kw: Any) -> Any:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), metadata=metadata, **kw)


async def test_metadata_reaches_the_handler_call_after_call(server: GrpcServer) -> None:
    """The same header block is decoded once and reused: alternating metadata must still be seen
    exactly as each call sent it."""

    def calls() -> list[int]:
        out = []
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for i in range(40):
                md = (("x-ok", "yes" if i % 3 else "no"),)
                answer = stub.Check(health_pb2.HealthCheckRequest(), metadata=md, timeout=5)
                out.append(answer.status)
        return out

    got = await asyncio.to_thread(calls)
    assert got == [SERVING if i % 3 else NOT_SERVING for i in range(40)]


async def test_server_streaming_past_the_clients_window(server: GrpcServer) -> None:
    def watch() -> list[int]:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="count:20000")
            return [a.status for a in stub.Watch(request, timeout=30)]

    statuses = await asyncio.to_thread(watch)
    assert statuses == [SERVING if i % 2 else NOT_SERVING for i in range(20000)]


async def test_deadline_ends_a_slow_call(server: GrpcServer) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        await asyncio.to_thread(_check, server.port, "sleep:2", timeout=0.2)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.5


async def test_oversized_request_is_resource_exhausted(server: GrpcServer) -> None:
    with pytest.raises(grpc.RpcError) as info:
        await asyncio.to_thread(_check, server.port, "x" * (2 << 20), timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (info.value.details() or "")


async def test_stop_lets_calls_in_flight_finish_within_grace(server: GrpcServer) -> None:
    quick = asyncio.ensure_future(asyncio.to_thread(_check, server.port, "sleep:0.3", timeout=5))
    slow = asyncio.ensure_future(asyncio.to_thread(_check, server.port, "sleep:5", timeout=10))
    await asyncio.sleep(0.15)
    await server.stop(grace=0.5)
    assert (await quick).status == NOT_SERVING  # answered: it ended within the grace period
    with pytest.raises(grpc.RpcError) as info:
        await slow
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def _raw(port: int, data: bytes, want: int = 1) -> list[tuple[int, int, bytes]]:
    """Send bytes, read frames (type, flags, payload) until `want` non-SETTINGS/WINDOW frames
    arrived or the server closed."""
    frames: list[tuple[int, int, bytes]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        buf = b""
        while len([f for f in frames if f[0] not in (4, 8)]) < want:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                n = int.from_bytes(buf[:3], "big")
                frames.append((buf[3], buf[4], buf[9 : 9 + n]))
                buf = buf[9 + n :]
    return frames


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


async def test_ping_is_answered(server: GrpcServer) -> None:
    ping = (8).to_bytes(3, "big") + bytes((6, 0)) + (0).to_bytes(4, "big") + b"12345678"
    frames = await asyncio.to_thread(_raw, server.port, PREFACE + ping)
    assert (6, 1, b"12345678") in frames  # PING with ACK, same payload


async def test_not_http2_gets_goaway_and_the_server_goes_on(server: GrpcServer) -> None:
    frames = await asyncio.to_thread(_raw, server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    goaway = [f for f in frames if f[0] == 7]
    assert goaway and int.from_bytes(goaway[0][2][4:8], "big") == 1  # PROTOCOL_ERROR
    answer = await asyncio.to_thread(_check, server.port, "", (("x-ok", "yes"),), timeout=5)
    assert answer.status == SERVING
