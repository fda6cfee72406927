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

    status: int | None  # of the first final (non-1xx) response, None if none came
    closed: bool  # the server closed the connection
    data: bytes
    seconds: float


def _final_status(data: bytes) -> tuple[int | None, bool]:
    """(status of the first non-1xx response, whether its head is complete)."""
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return None, False
        parts = head.split(b" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            return -1, True  # not HTTP at all: reported as such by the caller
        if 100 <= status < 200:
            data = rest
            continue
        return status, True


def exchange(port: int, payload: bytes) -> Exchange:
    """Send `payload` on a fresh connection; read until a final response head arrives or the
    server closes, at most ANSWER_WITHIN_S."""
    started = time.monotonic()
    data = b""
    closed = False
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
            if _final_status(data)[1]:
                break
    status, _ = _final_status(data)
    return Exchange(status, closed, data, time.monotonic() - started)


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
