"""What the front-end fuzz tests need around a real server: sending bytes exactly as generated,
reading what comes back within a bound, and checking after every example that the server is
alive, still answers a good request on both ports, and logged no internal error."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import grpc
import httpx
import numpy as np

from inferplane.protocols.grpc_gen import grpc_predict_v2_pb2 as pb
from tests.integration.servers import ServerProcess

SERVICE = "/inference.GRPCInferenceService/"
# What the server writes when something escaped the error handling (a 500 from `guarded`, an
# exception in a task or the ASGI application, a traceback from anywhere).
LOG_ALARMS = ("Traceback", "internal error", "Exception in", "exception was never retrieved")
# A connection the server neither answers nor closes within this is a hang: the fuzz server's
# header and body timeouts are 0.5 s and keep-alive 1 s.
ANSWER_WITHIN_S = 6.0
GOOD_BODY = (
    b'{"inputs":[{"name":"input","datatype":"FP32","shape":[2,4],"data":[1,2,3,4,5,6,7,8]}]}'
)


@dataclass
class Exchange:
    """What came back on one raw connection."""

    status: int | None  # of the first final (non-1xx) response, None if none came, -1: garbled
    closed: bool  # the server closed the connection
    data: bytes
    seconds: float
    statuses: list[int] = field(default_factory=list)  # of every complete final response


def _responses(data: bytes, head_requests: list[bool]) -> tuple[list[int], bool]:
    """(statuses of the complete final responses in `data`, whether it ends in an unparsable
    one). `head_requests[i]` says the i-th request was a HEAD: its answer has no body."""
    statuses: list[int] = []
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return statuses, False
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            return statuses, True
        if 100 <= status < 200:
            data = rest
            continue
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        is_head = len(statuses) < len(head_requests) and head_requests[len(statuses)]
        if is_head or status in (204, 304):
            length = 0
        if len(rest) < length:
            return statuses, False
        statuses.append(status)
        data = rest[length:]


def exchange(port: int, payload: bytes, head_requests: list[bool] | None = None) -> Exchange:
    """Send `payload` on a fresh connection; read until an answer has come for each request
    (`head_requests` lists them, HEAD or not; default: one request, not HEAD) or the server
    closes, at most ANSWER_WITHIN_S. Reading every answer before closing matters: a client that
    closes with answers still due meets another bug (see test_rest_front's known bugs)."""
    heads = head_requests if head_requests is not None else [False]
    started = time.monotonic()
    data = b""
    closed = False
    statuses: list[int] = []
    garbled = False
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WITHIN_S) as sock:
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            closed = True  # refused mid-send (a bad head answered and closed at once)
        while not closed:
            remaining = ANSWER_WITHIN_S - (time.monotonic() - started)
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
            statuses, garbled = _responses(data, heads)
            if garbled or len(statuses) >= len(heads):
                break
    statuses, garbled = _responses(data, heads)
    return Exchange(
        statuses[0] if statuses else (-1 if garbled else None),
        closed,
        data,
        time.monotonic() - started,
        statuses,
    )


@dataclass
class FuzzServer:
    server: ServerProcess
    _log_offset: int = 0
    _http: httpx.Client = field(init=False)
    _channel: grpc.Channel = field(init=False)

    def __post_init__(self) -> None:
        self._http = httpx.Client(base_url=self.server.url, timeout=30)
        self._channel = grpc.insecure_channel(self.server.grpc_target)
        self._log_offset = len(self.server.log_path.read_bytes())

    @property
    def http_port(self) -> int:
        return self.server.http_port

    @property
    def grpc_port(self) -> int:
        return self.server.grpc_port

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def close(self) -> None:
        self._http.close()
        self._channel.close()

    def new_log(self) -> str:
        data = self.server.log_path.read_bytes()
        new, self._log_offset = data[self._log_offset :], len(data)
        return new.decode(errors="replace")

    def assert_healthy(self) -> None:
        """Alive, no alarm in the log since the last check, and a good request answered right on
        both ports."""
        assert self.server.process.poll() is None, f"the server died:\n{self.server.log()}"
        log = self.new_log()
        alarms = [a for a in LOG_ALARMS if a in log]
        assert not alarms, f"the server logged {alarms}:\n{log[-4000:]}"
        answer = self._http.post(
            "/v2/models/sum/infer", content=GOOD_BODY, headers={"content-type": "application/json"}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["data"] == [10.0, 26.0]
        self.assert_grpc_serving()

    def assert_grpc_serving(self, channel: grpc.Channel | None = None) -> None:
        request = pb.ModelInferRequest(model_name="sum")
        request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
        call = (channel or self._channel).unary_unary(
            SERVICE + "ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        response = call(request, timeout=10)
        assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [6.0]
