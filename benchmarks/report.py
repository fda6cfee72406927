"""Combine the harness's CSVs into one table: throughput, p50/p99, inferplane's ratio to each
peer, and each server against the in-process ceiling.

Inputs (all written by the harness copied from ../shared/bench, see benchmarks/README.md):
  peers.csv    one row per perf_analyzer point (peers/pa_record.py)
  ceiling.csv  in-process rows/s per (model, engine, threads, batch) (offline_ceiling.py)
  peers2.csv   optional, loadgen.py points of the second harness (run_peers2.sh) plus the
               inferplane rows benchmarks/run.py adds with the same client

Standard library only, so that it runs in the project's venv and in the peers' venvs.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

INFERPLANE = "inferplane"
MODEL_ORDER = {"tabular": 0, "mlp": 1, "tabular_skl": 2}
PROTO_ORDER = {("http", "json"): 0, ("http", "binary"): 1, ("grpc", "protobuf"): 2}
SERVER_ORDER = {INFERPLANE: 0, "mlserver": 1, "kserve": 2, "triton": 3}
MODEL_LABEL = {
    "tabular": "tabular: 100-tree forest, ONNX",
    "mlp": "mlp: 256-1024-1024-10 MLP, ONNX",
    "tabular_skl": "tabular_skl: the same forest, sklearn joblib",
}

CSV_FIELDS = [
    "source",
    "run_id",
    "timestamp_utc",
    "mode",
    "model",
    "protocol",
    "tensor_format",
    "concurrency",
    "batch",
    "server",
    "server_version",
    "config",
    "throughput_infer_s",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "stable",
    "status",
    "ceiling_b1_rows_s",
    "ceiling_best_rows_s",
    "vs_ceiling_b1",
    "vs_ceiling_best",
    "inferplane_compared",
    "inferplane_throughput_ratio",
    "inferplane_p99_ratio",
    "loadavg_1m_at_start",
    "lock_wait_s",
    "client_cpu_pct",
    "server_cpu_pct",
    "cold_start_s",
    "idle_pss_mib",
    "notes",
]


def _f(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out


def _us_to_ms(value: Any) -> float | None:
    v = _f(value)
    return None if v is None else v / 1000.0


@dataclass
class Point:
    """One measured load point of one server."""

    source: str  # perf_analyzer | loadgen
    model: str
    protocol: str  # http | grpc
    fmt: str  # json | binary | protobuf
    concurrency: int
    server: str
    version: str
    config: str
    thr: float | None
    p50: float | None  # ms
    p90: float | None
    p95: float | None
    p99: float | None
    status: str
    stable: str = ""
    run_id: str = ""
    timestamp: str = ""
    mode: str = ""
    notes: str = ""
    loadavg: str = ""
    lock_wait: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    # filled by compare()
    vs_b1: float | None = None
    vs_best: float | None = None
    ip_ref: Point | None = None
    ip_thr_ratio: float | None = None
    ip_p99_ratio: float | None = None
    ip_cross_format: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.thr is not None

    @property
    def label(self) -> str:
        return f"{self.server} {self.version}".strip()

    @property
    def proto_label(self) -> str:
        return "grpc" if self.protocol == "grpc" else f"{self.protocol}/{self.fmt}"

    def sort_key(self) -> tuple[Any, ...]:
        return (
            MODEL_ORDER.get(self.model, 9),
            self.source != "perf_analyzer",
            0 if self.protocol == "http" else 1,
            self.concurrency,
            SERVER_ORDER.get(self.server, 8),
            self.config,
            PROTO_ORDER.get((self.protocol, self.fmt), 9),
        )


@dataclass
class Ceiling:
    """In-process rows/s by batch size for one model (no server, no serialization)."""

    model: str
    engine: str
    version: str
    by_batch: dict[int, float]
    p50_us: dict[int, float]

    @property
    def b1(self) -> float | None:
        return self.by_batch.get(1)

    @property
    def best(self) -> tuple[int, float] | None:
        if not self.by_batch:
            return None
        b = max(self.by_batch, key=lambda k: self.by_batch[k])
        return b, self.by_batch[b]


def _read_csv(path: str) -> list[dict[str, str]]:
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_pa(path: str) -> list[Point]:
    """peers.csv (perf_analyzer) -> points."""
    out = []
    for r in _read_csv(path):
        out.append(
            Point(
                source="perf_analyzer",
                model=r["model"],
                protocol=r["protocol"],
                fmt=r["tensor_format"],
                concurrency=int(r["concurrency"]),
                server=r["server"],
                version=r.get("server_version", ""),
                config=r.get("config", ""),
                thr=_f(r.get("throughput_infer_s")),
                p50=_us_to_ms(r.get("p50_us")),
                p90=_us_to_ms(r.get("p90_us")),
                p95=_us_to_ms(r.get("p95_us")),
                p99=_us_to_ms(r.get("p99_us")),
                status=r.get("status", ""),
                stable=r.get("stable", ""),
                run_id=r.get("run_id", ""),
                timestamp=r.get("timestamp_utc", ""),
                mode=r.get("mode", ""),
                notes=r.get("notes", ""),
                loadavg=r.get("loadavg_1m_at_start", ""),
                lock_wait=r.get("lock_wait_s", ""),
            )
        )
    return out


def _peer2_server(peer: str) -> str:
    if peer.startswith("triton"):
        return "triton"
    if peer.startswith("ray"):
        return "ray"
    return peer


def load_loadgen(path: str) -> list[Point]:
    """peers2.csv (loadgen.py, HTTP/JSON) -> points; the last row per key wins."""
    latest: dict[tuple[str, str, str, str], dict[str, str]] = {}
    for r in _read_csv(path):
        latest[(r["peer"], r["variant"], r["model"], r["concurrency"])] = r
    out = []
    for r in latest.values():
        errors = r.get("errors", "") or "0"
        status = r.get("status", "")
        if status == "ok" and errors not in ("", "0"):
            status = f"ok ({errors} errors)"
        peer = r["peer"]
        config = r["variant"] if peer == INFERPLANE else f"{peer.split('_', 1)[-1]} {r['variant']}"
        version = r.get("server_version", "")
        m = re.search(r"tritonserver-([\d.]+)", version)
        if m:
            version = m.group(1)
        version = version.removeprefix(f"{peer} ").removeprefix("inferplane ")
        out.append(
            Point(
                source="loadgen",
                model=r["model"],
                protocol="http",
                fmt="json",
                concurrency=int(r["concurrency"]),
                server=_peer2_server(peer),
                version=version,
                config=config,
                thr=_f(r.get("throughput_rps")),
                p50=_f(r.get("lat_p50_ms")),
                p90=_f(r.get("lat_p90_ms")),
                p95=_f(r.get("lat_p95_ms")),
                p99=_f(r.get("lat_p99_ms")),
                status=status,
                run_id=r.get("run_id", ""),
                timestamp=r.get("utc", ""),
                notes="" if status.startswith("ok") else status,
                extra={
                    k: r.get(k, "")
                    for k in ("client_cpu_pct", "server_cpu_pct", "cold_start_s", "idle_pss_mib")
                },
            )
        )
    return out


def load_ceiling(path: str) -> dict[str, Ceiling]:
    """ceiling.csv -> per served model name: ORT default threads; sklearn for tabular_skl."""
    out: dict[str, Ceiling] = {}
    for r in _read_csv(path):
        if r["engine"] == "onnxruntime" and r["threads"] != "default":
            continue
        name = "tabular_skl" if r["engine"] == "sklearn" else r["model"]
        c = out.setdefault(
            name,
            Ceiling(name, r["engine"], r.get("ort_version", "") or "", {}, {}),
        )
        b = int(r["batch"])
        c.by_batch[b] = float(r["rows_per_s"])
        c.p50_us[b] = float(r["p50_us"])
    return out


def compare(points: list[Point], ceiling: dict[str, Ceiling]) -> None:
    """Fill ceiling ratios and inferplane/peer ratios (same client, model, protocol, c)."""
    ips: dict[tuple[str, str, str, str, int], Point] = {}
    for p in points:
        if p.server == INFERPLANE and p.ok:
            ips[(p.source, p.model, p.protocol, p.fmt, p.concurrency)] = p
    for p in points:
        c = ceiling.get(p.model)
        if c and p.thr is not None:
            if c.b1:
                p.vs_b1 = p.thr / c.b1
            best = c.best
            if best:
                p.vs_best = p.thr / best[1]
        if p.server == INFERPLANE or not p.ok:
            continue
        ref = ips.get((p.source, p.model, p.protocol, p.fmt, p.concurrency))
        if ref is None and p.protocol == "http":
            # the peer only speaks the other HTTP tensor format to perf_analyzer: compare with
            # whatever inferplane HTTP row exists, JSON first, and flag it
            for fmt in ("json", "binary"):
                ref = ips.get((p.source, p.model, "http", fmt, p.concurrency))
                if ref is not None:
                    p.ip_cross_format = True
                    break
        if ref is None or ref.thr is None or p.thr is None or p.thr <= 0:
            continue
        p.ip_ref = ref
        p.ip_thr_ratio = ref.thr / p.thr
        if ref.p99 is not None and p.p99:
            p.ip_p99_ratio = ref.p99 / p.p99


# ------------------------------------------------------------------------------ formatting


def fmt_num(x: float | None, nd: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{nd}f}"


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def fmt_ratio(x: float | None, cross: bool = False) -> str:
    if x is None:
        return "-"
    s = f"{x:.3f}" if x < 0.1 else f"{x:.2f}"
    return s + "x" + ("*" if cross else "")


def fmt_ceil(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4f}" if x < 0.01 else f"{x:.3f}"


HEADERS = [
    "proto",
    "c",
    "server",
    "config",
    "infer/s",
    "p50 ms",
    "p99 ms",
    "/ceil b1",
    "ip/peer thr",
    "ip/peer p99",
    "status",
]
RIGHT = {1, 4, 5, 6, 7, 8, 9}


def _cells(p: Point) -> list[str]:
    status = p.status if p.ok else f"{p.status}: {p.notes}"[:70]
    if p.ok and p.stable == "0":
        status = "ok (unstable)"
    return [
        p.proto_label,
        str(p.concurrency),
        p.label,
        p.config,
        fmt_num(p.thr),
        fmt_ms(p.p50),
        fmt_ms(p.p99),
        fmt_ceil(p.vs_b1),
        fmt_ratio(p.ip_thr_ratio, p.ip_cross_format),
        fmt_ratio(p.ip_p99_ratio, p.ip_cross_format),
        status,
    ]


def ceiling_line(c: Ceiling | None) -> str:
    if c is None:
        return "in-process ceiling: not measured"
    parts = [f"b={b} {fmt_num(v)}" for b, v in sorted(c.by_batch.items())]
    eng = f"{c.engine} {c.version}".strip() if c.engine == "onnxruntime" else c.engine
    return f"in-process ceiling ({eng}, rows/s): " + " | ".join(parts)


def _sections(points: Sequence[Point]) -> list[tuple[str, str, list[Point]]]:
    """(model, client, points) in display order."""
    out: list[tuple[str, str, list[Point]]] = []
    for p in sorted(points, key=Point.sort_key):
        if not out or out[-1][0] != p.model or out[-1][1] != p.source:
            out.append((p.model, p.source, []))
        out[-1][2].append(p)
    return out


CLIENT_LABEL = {
    "perf_analyzer": "perf_analyzer (async, 1 row per request)",
    "loadgen": "loadgen.py (closed loop, HTTP/JSON, 1 row per request) - second client, not comparable with perf_analyzer rows",
}


def text_table(points: Sequence[Point], ceiling: dict[str, Ceiling]) -> str:
    rows_by_section = _sections(points)
    all_rows = [_cells(p) for _, _, ps in rows_by_section for p in ps]
    widths = [len(h) for h in HEADERS]
    for r in all_rows:
        for i, cell in enumerate(r[:-1]):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            if i == len(cells) - 1:
                out.append(cell)
            elif i in RIGHT:
                out.append(cell.rjust(widths[i]))
            else:
                out.append(cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    total = sum(widths[:-1]) + 2 * (len(widths) - 1) + 6
    lines = []
    for model, source, ps in rows_by_section:
        lines.append("=" * total)
        lines.append(f"{MODEL_LABEL.get(model, model)}  [{CLIENT_LABEL.get(source, source)}]")
        lines.append("  " + ceiling_line(ceiling.get(model)))
        lines.append(line(HEADERS))
        lines.append("-" * total)
        prev: tuple[str, int] | None = None
        for p in ps:
            key = (p.protocol, p.concurrency)
            if prev is not None and key != prev:
                lines.append("")
            prev = key
            lines.append(line(_cells(p)))
    lines.append("=" * total)
    return "\n".join(lines)


def markdown_table(points: Sequence[Point], ceiling: dict[str, Ceiling]) -> str:
    lines = []
    for model, source, ps in _sections(points):
        lines.append(f"### {MODEL_LABEL.get(model, model)} - {CLIENT_LABEL.get(source, source)}")
        lines.append("")
        lines.append(ceiling_line(ceiling.get(model)))
        lines.append("")
        lines.append("| " + " | ".join(HEADERS) + " |")
        lines.append(
            "|" + "|".join("---:" if i in RIGHT else "---" for i in range(len(HEADERS))) + "|"
        )
        for p in ps:
            lines.append("| " + " | ".join(c.replace("|", "/") for c in _cells(p)) + " |")
        lines.append("")
    return "\n".join(lines)


def ceiling_markdown(ceiling: dict[str, Ceiling]) -> str:
    batches = sorted({b for c in ceiling.values() for b in c.by_batch})
    lines = [
        "| model | engine | " + " | ".join(f"b={b}" for b in batches) + " |",
        "|---|---|" + "---:|" * len(batches),
    ]
    for m in sorted(ceiling, key=lambda k: MODEL_ORDER.get(k, 9)):
        c = ceiling[m]
        lines.append(
            f"| {m} | {c.engine} | "
            + " | ".join(fmt_num(c.by_batch.get(b)) for b in batches)
            + " |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ targets


@dataclass
class Target:
    what: str
    value: str
    goal: str
    verdict: str


def _find(
    points: Iterable[Point],
    *,
    source: str = "perf_analyzer",
    server: str,
    model: str,
    protocol: str,
    c: int,
    fmt: str | None = None,
    config_prefix: str | None = None,
) -> Point | None:
    for p in points:
        if (
            p.ok
            and p.source == source
            and p.server == server
            and p.model == model
            and p.protocol == protocol
            and p.concurrency == c
            and (fmt is None or p.fmt == fmt)
            and (config_prefix is None or p.config.startswith(config_prefix))
        ):
            return p
    return None


def targets(points: Sequence[Point], c_hi: int = 32) -> list[Target]:
    """The throughput/latency targets of issues 3 and 4 that this run can check."""
    out: list[Target] = []

    def ratio(what: str, num: Point | None, den: Point | None, goal: float) -> None:
        if num is None or den is None or num.thr is None or den.thr is None or den.thr <= 0:
            out.append(Target(what, "not measured", f">= {goal}x", "-"))
            return
        r = num.thr / den.thr
        out.append(
            Target(
                what,
                f"{r:.2f}x ({fmt_num(num.thr)} / {fmt_num(den.thr)} infer/s)",
                f">= {goal}x",
                "met" if r >= goal else "NOT met",
            )
        )

    def ip(
        model: str, protocol: str, c: int, fmt: str | None = None, source: str = "perf_analyzer"
    ) -> Point | None:
        return _find(
            points, source=source, server=INFERPLANE, model=model, protocol=protocol, c=c, fmt=fmt
        )

    ipj = ip("tabular", "http", c_hi, "json")
    ratio(
        f"forest HTTP/JSON c={c_hi} vs MLServer, no batching",
        ipj,
        _find(
            points,
            server="mlserver",
            model="tabular",
            protocol="http",
            c=c_hi,
            config_prefix="nobatch",
        ),
        8.0,
    )
    ratio(
        f"forest HTTP/JSON c={c_hi} vs KServe HTTP (binary: KServe's JSON fails perf_analyzer)",
        ipj,
        _find(points, server="kserve", model="tabular", protocol="http", c=c_hi),
        3.0,
    )
    ratio(
        f"forest HTTP/JSON c={c_hi} vs Triton (loadgen client)",
        ip("tabular", "http", c_hi, "json", source="loadgen"),
        _find(points, source="loadgen", server="triton", model="tabular", protocol="http", c=c_hi),
        1.0,
    )
    peers_p99 = [
        p
        for p in points
        if p.ok
        and p.server != INFERPLANE
        and p.model == "tabular"
        and p.protocol == "http"
        and p.concurrency == c_hi
        and p.p99 is not None
    ]
    if ipj is not None and ipj.p99 is not None and peers_p99:
        best = min(peers_p99, key=lambda p: p.p99 or 0.0)
        ref = ip("tabular", "http", c_hi, "json", source=best.source) or ipj
        ok = ref.p99 is not None and best.p99 is not None and ref.p99 < best.p99
        out.append(
            Target(
                f"forest HTTP/JSON c={c_hi} p99 below every peer",
                f"{fmt_ms(ref.p99)} ms vs {fmt_ms(best.p99)} ms ({best.server} {best.config}, "
                f"{best.proto_label}, {best.source})",
                "below",
                "met" if ok else "NOT met",
            )
        )
    else:
        out.append(
            Target(f"forest HTTP/JSON c={c_hi} p99 below every peer", "not measured", "below", "-")
        )
    ratio(
        f"MLP HTTP/JSON c={c_hi} vs MLServer with adaptive batching",
        ip("mlp", "http", c_hi, "json"),
        _find(
            points, server="mlserver", model="mlp", protocol="http", c=c_hi, config_prefix="batch"
        ),
        3.5,
    )
    ratio(
        f"sklearn forest HTTP/JSON c={c_hi} vs MLServer with adaptive batching",
        ip("tabular_skl", "http", c_hi, "json"),
        _find(
            points,
            server="mlserver",
            model="tabular_skl",
            protocol="http",
            c=c_hi,
            config_prefix="batch",
        ),
        6.0,
    )
    one = ip("tabular", "http", 1, "json")
    out.append(
        Target(
            "forest HTTP/JSON c=1 p50",
            f"{fmt_ms(one.p50)} ms" if one else "not measured",
            "<= 0.3 ms",
            "-" if one is None or one.p50 is None else ("met" if one.p50 <= 0.3 else "NOT met"),
        )
    )
    ipg = ip("tabular", "grpc", c_hi)
    ratio(
        f"forest gRPC c={c_hi} vs KServe gRPC",
        ipg,
        _find(points, server="kserve", model="tabular", protocol="grpc", c=c_hi),
        2.0,
    )
    ratio(
        f"forest gRPC c={c_hi} vs MLServer gRPC, no batching",
        ipg,
        _find(
            points,
            server="mlserver",
            model="tabular",
            protocol="grpc",
            c=c_hi,
            config_prefix="nobatch",
        ),
        2.0,
    )
    ratio(f"forest gRPC c={c_hi} vs inferplane's own HTTP/JSON", ipg, ipj, 0.6)
    return out


def targets_text(ts: Sequence[Target]) -> str:
    w0 = max(len(t.what) for t in ts)
    w1 = max(len(t.value) for t in ts)
    w2 = max(len(t.goal) for t in ts)
    return "\n".join(
        f"{t.what.ljust(w0)}  {t.value.ljust(w1)}  {t.goal.ljust(w2)}  {t.verdict}" for t in ts
    )


def targets_markdown(ts: Sequence[Target]) -> str:
    lines = ["| target | measured | goal | verdict |", "|---|---|---|---|"]
    lines += [f"| {t.what} | {t.value} | {t.goal} | {t.verdict} |" for t in ts]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ CSV


def _s(x: float | None, nd: int = 4) -> str:
    return "" if x is None else f"{x:.{nd}f}".rstrip("0").rstrip(".")


def write_csv(path: str, points: Sequence[Point], ceiling: dict[str, Ceiling]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for m in sorted(ceiling, key=lambda k: MODEL_ORDER.get(k, 9)):
            cm = ceiling[m]
            for b, v in sorted(cm.by_batch.items()):
                w.writerow(
                    {
                        "source": "ceiling",
                        "model": m,
                        "batch": b,
                        "server": f"{cm.engine} in-process",
                        "server_version": cm.version if cm.engine == "onnxruntime" else "",
                        "config": "default threads"
                        if cm.engine == "onnxruntime"
                        else "predict_proba",
                        "throughput_infer_s": _s(v, 1),
                        "p50_ms": _s(cm.p50_us.get(b, 0.0) / 1000.0),
                        "status": "ok",
                    }
                )
        for p in sorted(points, key=Point.sort_key):
            c = ceiling.get(p.model)
            best = c.best if c else None
            w.writerow(
                {
                    "source": p.source,
                    "run_id": p.run_id,
                    "timestamp_utc": p.timestamp,
                    "mode": p.mode,
                    "model": p.model,
                    "protocol": p.protocol,
                    "tensor_format": p.fmt,
                    "concurrency": p.concurrency,
                    "batch": 1,
                    "server": p.server,
                    "server_version": p.version,
                    "config": p.config,
                    "throughput_infer_s": _s(p.thr, 1),
                    "p50_ms": _s(p.p50),
                    "p90_ms": _s(p.p90),
                    "p95_ms": _s(p.p95),
                    "p99_ms": _s(p.p99),
                    "stable": p.stable,
                    "status": p.status,
                    "ceiling_b1_rows_s": _s(c.b1 if c else None, 1),
                    "ceiling_best_rows_s": _s(best[1] if best else None, 1),
                    "vs_ceiling_b1": _s(p.vs_b1, 5),
                    "vs_ceiling_best": _s(p.vs_best, 6),
                    "inferplane_compared": (
                        f"{p.ip_ref.protocol}/{p.ip_ref.fmt}" if p.ip_ref is not None else ""
                    ),
                    "inferplane_throughput_ratio": _s(p.ip_thr_ratio, 3),
                    "inferplane_p99_ratio": _s(p.ip_p99_ratio, 3),
                    "loadavg_1m_at_start": p.loadavg,
                    "lock_wait_s": p.lock_wait,
                    "client_cpu_pct": p.extra.get("client_cpu_pct", ""),
                    "server_cpu_pct": p.extra.get("server_cpu_pct", ""),
                    "cold_start_s": p.extra.get("cold_start_s", ""),
                    "idle_pss_mib": p.extra.get("idle_pss_mib", ""),
                    "notes": p.notes,
                }
            )


LEGEND = """\
How to read it: infer/s = rows/s (every request carries one row). p50/p99 are client-side
latencies in ms. "/ceil b1" = the server's infer/s divided by in-process ONNX Runtime (sklearn
for tabular_skl) at batch 1: the share of the model's own speed that survives the server.
"ip/peer thr" = inferplane infer/s / that peer's infer/s in the same model, protocol, tensor
format and concurrency (> 1: inferplane is faster); "ip/peer p99" = inferplane p99 / peer p99
(< 1: inferplane's tail is shorter). "*" = inferplane was not measured in the peer's HTTP tensor
format, so its other HTTP format is compared (JSON first). Rows from the two clients
(perf_analyzer, loadgen.py) are never compared with each other. Client and server share the
same cores: see benchmarks/README.md."""
