"""What every protocol front end is handed by the server: one engine, one predictor, one metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from inferplane import __version__
from inferplane.engine.manager import ModelManager
from inferplane.observability.metrics import Metrics
from inferplane.predictor import InProcessPredictor
from inferplane.protocols.busy_poll import BusyPoll

if TYPE_CHECKING:
    from inferplane.control.rollout.controller import RolloutController
    from inferplane.edge.gate import Edge
    from inferplane.observability.stream_view import StreamView
    from inferplane.routing.policy_source import PolicySource

DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024
EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics", "model_configuration"]


@dataclass
class ServingDeps:
    manager: ModelManager
    predictor: InProcessPredictor
    metrics: Metrics
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD
    server_name: str = "inferplane"
    server_version: str = __version__
    policy: PolicySource | None = None  # where the traffic policy comes from
    watch: bool = False  # re-read the policy file and the models' aliases/versions (--watch)
    watch_interval_s: float = 1.0
    # polls the event loop briefly after answers (off unless the server sets a window)
    busy_poll: BusyPoll = field(default_factory=lambda: BusyPoll(0))
    edge: Edge | None = None  # authentication, authorization, quotas; None: open (no --access)
    # the rollout controller in this process (serve --rollouts, the default); None: off
    rollouts: RolloutController | None = None
    # where GET /inferplane/streams reads the stream workers' figures (--stream-metrics,
    # --prometheus); None or not configured: the console says where lag lives instead
    streams: StreamView | None = None
