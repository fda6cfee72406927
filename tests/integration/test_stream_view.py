"""GET /inferplane/streams: the stream workers' lag and throughput as the console shows them,
read from a real worker's /metrics page (serve --stream-metrics) or from a real Prometheus
scraping it (serve --prometheus); a worker that does not answer is listed as down."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import free_port
from tests.integration.prom_server import prometheus
from tests.integration.servers import start_server
from tests.integration.streaming.harness import RedisServer, reporting_worker, unique, wait_for


def test_the_server_shows_stream_workers_from_their_pages_and_from_prometheus(
    redis_server: RedisServer, example_build: tuple[Path, Path], tmp_path: Path
) -> None:
    client, base = redis_server.client(), unique("view")
    port, dead = free_port(), free_port()
    worker = reporting_worker(redis_server, base, 120, example_build[0], "w1", port, tmp_path)
    servers = []
    try:
        wait_for(lambda: client.xlen(f"{base}-out") >= 120, 60, "the events scored", worker)
        page = f"http://127.0.0.1:{port}/metrics"
        servers.append(
            start_server(example_build[0], tmp_path, "--stream-metrics", page, "--stream-metrics",
                         f"http://127.0.0.1:{dead}/metrics", grpc=False)
        )  # fmt: skip
        view = httpx.get(f"{servers[0].url}/inferplane/streams", timeout=10).json()
        assert view["from"] == "the workers' /metrics pages"
        up, down = view["workers"]
        assert (up["instance"], up["up"], down["up"]) == (page, True, False)
        assert "127.0.0.1:" in down["error"]
        assert (up["source"], up["group"], up["consumer"], up["target"]) == (
            f"redis:{base}-in",
            "scorers",
            "w1",
            "tabular",
        )
        assert (up["events_in"], up["events_out"], up["events_dlq"]) == (120, 120, 0)
        assert up["in_flight"] == 0 and up["lag"] in (0, 120)  # measured every 5 s

        def caught_up() -> bool:
            found = httpx.get(f"{servers[0].url}/inferplane/streams", timeout=10).json()
            return bool(found["workers"][0]["lag"] == 0)

        wait_for(caught_up, 15, "the worker's lag at 0", worker)

        with prometheus([f"127.0.0.1:{port}"], tmp_path / "prom") as prom:
            servers.append(
                start_server(example_build[0], tmp_path, "--prometheus", prom.url, grpc=False)
            )
            view = httpx.get(f"{servers[1].url}/inferplane/streams", timeout=10).json()
        assert view["from"] == f"Prometheus at {prom.url}" and view["error"] is None
        (seen,) = view["workers"]
        assert seen["instance"] == f"127.0.0.1:{port}"
        assert (seen["consumer"], seen["events_in"], seen["lag"]) == ("w1", 120, 0)
        # Prometheus gone: the view says so instead of failing.
        view = httpx.get(f"{servers[1].url}/inferplane/streams", timeout=10).json()
        assert view["workers"] == [] and "Prometheus at" in view["error"]
    finally:
        for srv in servers:
            srv.stop()
        assert worker.stop() == 0, worker.log()
