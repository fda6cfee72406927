#!/usr/bin/env python3
"""Batch scoring throughput and memory: `inferplane batch` (local engine) on the tabular forest.

    .venv/bin/python benchmarks/batch_bench.py [--rows 5000000] [--files 16]

1. writes a Parquet table of N rows (an `id` and a 32-float `input` column) in chunks, so the
   generator never holds the table in memory;
2. measures the in-process ONNX Runtime ceiling: the same model fed 65,536-row batches already in
   memory (no I/O, no mapping), as one session with its default threads and as one
   single-threaded session per core, before and after the job; the best of the four counts;
3. runs `inferplane batch` on the table as a subprocess and samples the memory of its whole
   process tree (the job and its workers) every 100 ms;
4. also compares rows per CPU-second (the job and its workers vs ONNX Runtime alone), a figure
   that a busy neighbour on a shared machine disturbs far less than wall-clock rows/s;
5. prints a table and writes benchmarks/results/batch-<date>.csv with the machine description.

Two configurations of the same ONNX file: the example repository's (max_batch_size 32, its online
setting: the in-process predictor sends requests of at most 32 rows) and the file registered for
batch scoring with max_batch_size 4096.

Targets (issue 7): throughput >= 70% of the ceiling; peak RSS of the job < 1.5 GB whatever N.
RSS summed over processes counts shared pages once per process, so it overstates the job's
footprint; PSS (proportional set size) shares them out and is shown beside it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FEATURES = 32
TARGET_RATIO = 0.70
TARGET_RSS_MB = 1536


def ensure_repository(work: Path) -> Path:
    """examples/models when `make models` built it; otherwise build the examples into `work`."""
    built = ROOT / "examples" / "models"
    if (built / "tabular" / "1" / "model.yaml").exists():
        return built
    repo = work / "models"
    if not (repo / "tabular").exists():
        print("building the example models (examples/build_models.py) ...", flush=True)
        subprocess.run(
            [sys.executable, str(ROOT / "examples" / "build_models.py"), "--out", str(repo),
             "--artifacts", str(work / "artifacts")],
            check=True, cwd=ROOT,
        )  # fmt: skip
    return repo


def generate(folder: Path, rows: int, files: int, chunk: int = 131_072) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261128)
    per_file = -(-rows // files)
    schema = pa.schema([("id", pa.int64()), ("input", pa.list_(pa.float32(), FEATURES))])
    written = 0
    for f in range(files):
        n_file = min(per_file, rows - written)
        if n_file <= 0:
            break
        with pq.ParquetWriter(folder / f"part-{f:05d}.parquet", schema) as writer:
            done = 0
            while done < n_file:
                n = min(chunk, n_file - done)
                x = rng.standard_normal((n, FEATURES), dtype=np.float32)
                ids = np.arange(written + done, written + done + n, dtype=np.int64)
                values = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), FEATURES)
                writer.write_table(pa.table({"id": ids, "input": values}, schema=schema))
                done += n
        written += n_file
    return written


def _session(model: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def _rows_per_s(model: Path, seconds: float, threads: int, batch: int = 65_536) -> float:
    session = _session(model, threads)
    x = np.random.default_rng(1).standard_normal((batch, FEATURES), dtype=np.float32)
    session.run(None, {"input": x})
    rows = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, {"input": x})
        rows += batch
    return rows / (time.perf_counter() - started)


def ceiling(model: Path, seconds: float) -> dict[str, float]:
    """ONNX Runtime alone at batch 65,536, two ways; the job is compared with the better one.

    - one session with its default threads (all cores): the plain in-process ceiling;
    - one single-threaded session per core, in parallel processes: the same layout as the local
      engine's workers, and the higher figure when the machine is shared (a multi-threaded
      session loses more to a noisy neighbour).
    """
    cores = len(os.sched_getaffinity(0))
    cpu = time.process_time()
    wall = time.perf_counter()
    one_session = _rows_per_s(model, seconds, 0)
    one_session_per_cpu = one_session * (time.perf_counter() - wall) / (time.process_time() - cpu)
    before = _children_cpu()
    with concurrent.futures.ProcessPoolExecutor(
        cores, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        rates = list(pool.map(_rows_per_s, [model] * cores, [seconds] * cores, [1] * cores))
    per_core = sum(rates)
    # rows per CPU-second of the scoring loops (the pool's start-up CPU is left out)
    per_core_per_cpu = sum(r * seconds for r in rates) / max(_children_cpu() - before, 1e-9)
    return {
        "one_session": one_session,
        "per_core": per_core,
        "per_cpu_s": max(one_session_per_cpu, per_core_per_cpu),
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class TreeMemory(threading.Thread):
    """Peak RSS and PSS summed over a process and all its descendants (Linux /proc)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.peak_procs = 0
        self.stop = threading.Event()

    def _tree(self) -> list[int]:
        pids, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as fh:
                        todo.extend(int(c) for c in fh.read().split())
            except OSError:
                continue
        return pids

    @staticmethod
    def _field(path: str, name: str) -> int:
        try:
            with open(path) as fh:
                for line in fh:
                    if line.startswith(name):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def run(self) -> None:
        while not self.stop.is_set():
            pids = self._tree()
            rss = sum(self._field(f"/proc/{p}/status", "VmRSS:") for p in pids)
            pss = sum(self._field(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.peak_pss_kb = max(self.peak_pss_kb, pss)
            self.peak_procs = max(self.peak_procs, len(pids))
            self.stop.wait(self.interval)


def run_job(repo: Path, table: Path, out: Path, extra: list[str]) -> dict[str, float]:
    cmd = [
        str(Path(sys.executable).with_name("inferplane")), "batch", "--input", str(table),
        "--output", str(out), "--service", "tabular", "--repository", str(repo),
        "--id-column", "id", "--overwrite", "--log-interval", "5", *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    cpu_before = _children_cpu()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    memory = TreeMemory(proc.pid)
    memory.start()
    rc = proc.wait()
    wall = time.perf_counter() - started
    cpu_s = _children_cpu() - cpu_before  # the job and its workers, all waited for
    memory.stop.set()
    memory.join()
    if rc != 0:
        raise SystemExit(f"inferplane batch exited with {rc}")
    manifest = json.loads((out / "_manifest.json").read_text())
    fragments = manifest["fragments"]
    first = min(datetime.datetime.fromisoformat(f["started_at"]) for f in fragments)
    last = max(datetime.datetime.fromisoformat(f["committed_at"]) for f in fragments)
    return {
        "rows": manifest["rows"]["out"],
        "wall_s": wall,
        "cpu_s": cpu_s,
        "scoring_s": (last - first).total_seconds(),
        "peak_rss_mb": memory.peak_rss_kb / 1024,
        "peak_pss_mb": memory.peak_pss_kb / 1024,
        "processes": memory.peak_procs,
    }


def machine() -> dict[str, object]:
    import onnxruntime
    import pyarrow

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = TreeMemory._field("/proc/meminfo", "MemTotal:")
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu_model": cpu,
        "cpus": len(os.sched_getaffinity(0)),
        "mem_gib": round(mem_kb / 1024**2, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "pyarrow": pyarrow.__version__,
        "numpy": np.__version__,
        "git": git,
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def batch_repository(work: Path, model: Path) -> Path:
    """The same ONNX file registered for batch scoring: max_batch_size 4096, no queue delay."""
    repo = work / "batch-models"
    if not (repo / "tabular").exists():
        subprocess.run(
            [str(Path(sys.executable).with_name("inferplane")), "models", "register", "tabular",
             str(model), "--repository", str(repo), "--max-batch-size", "4096",
             "--max-queue-delay-us", "0"],
            check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return repo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--files", type=int, default=16, help="input files (fragments)")
    parser.add_argument("--ceiling-seconds", type=float, default=10.0)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the generated table")
    parser.add_argument("--job-arg", action="append", default=[], help="extra batch option")
    args = parser.parse_args()

    host = machine()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="batch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, dict[str, float]]] = []
    try:
        repo = ensure_repository(work)
        table = work / f"table-{args.rows}"
        if not table.exists():
            t0 = time.perf_counter()
            generate(table, args.rows, args.files)
            print(f"generated {args.rows:,} rows in {time.perf_counter() - t0:.1f}s", flush=True)
        size_mb = sum(p.stat().st_size for p in table.iterdir()) / 2**20
        model = next((repo / "tabular" / "1").glob("*.onnx"))
        configs = [
            # the example's online settings: requests of at most 32 rows
            ("example config, max_batch_size 32", repo),
            ("registered for batch, max_batch_size 4096", batch_repository(work, model)),
        ]
        # Measured before and after the jobs; the highest figure is the ceiling, so that a noisy
        # neighbour during one measurement cannot flatter the ratio.
        before = ceiling(model, args.ceiling_seconds / 4)
        for label, config_repo in configs:
            jobs.append((label, run_job(config_repo, table, work / "scores", args.job_arg)))
        after = ceiling(model, args.ceiling_seconds / 4)
        for when, c in (("before", before), ("after", after)):
            print(
                f"ceiling {when} the jobs: {c['one_session']:,.0f} rows/s in one session, "
                f"{c['per_core']:,.0f} with one single-threaded session per core",
                flush=True,
            )
        ceiling_rows_s = max(
            before["one_session"], before["per_core"], after["one_session"], after["per_core"]
        )
        ceiling_per_cpu = max(before["per_cpu_s"], after["per_cpu_s"])
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    lines = [
        ("input", f"{args.rows:,} rows x {FEATURES} FP32, {args.files} files, {size_mb:,.0f} MiB"),
        ("ONNX Runtime ceiling (batch 65536)", f"{ceiling_rows_s:,.0f} rows/s (best of 4)"),
    ]
    records = []
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d-%H%M")
    for label, job in jobs:
        e2e = job["rows"] / job["wall_s"]
        steady = job["rows"] / job["scoring_s"] if job["scoring_s"] > 0 else float("nan")
        lines += [
            (f"[{label}]", ""),
            (
                "  end to end",
                f"{e2e:,.0f} rows/s ({e2e / ceiling_rows_s:.0%}; wall {job['wall_s']:.1f} s)",
            ),
            (
                "  scoring phase",
                f"{steady:,.0f} rows/s ({steady / ceiling_rows_s:.0%}; "
                f"{job['scoring_s']:.1f} s); target >= {TARGET_RATIO:.0%}",
            ),
            (
                "  per CPU-second",
                f"{job['rows'] / job['cpu_s']:,.0f} rows/CPU-s "
                f"({job['rows'] / job['cpu_s'] / ceiling_per_cpu:.0%} of ONNX Runtime's "
                f"{ceiling_per_cpu:,.0f}; start-up included)",
            ),
            (
                "  peak memory, job + workers",
                f"RSS {job['peak_rss_mb']:,.0f} MiB, PSS {job['peak_pss_mb']:,.0f} MiB "
                f"({job['processes']:.0f} processes); target RSS < {TARGET_RSS_MB} MiB",
            ),
        ]
        records.append(
            {
                "timestamp_utc": stamp,
                "config": label,
                "rows": args.rows,
                "files": args.files,
                "input_mib": round(size_mb, 1),
                "ceiling_rows_s": round(ceiling_rows_s),
                "ceiling_one_session_rows_s": round(
                    max(before["one_session"], after["one_session"])
                ),
                "ceiling_per_core_rows_s": round(max(before["per_core"], after["per_core"])),
                "e2e_rows_s": round(e2e),
                "e2e_ratio": round(e2e / ceiling_rows_s, 3),
                "scoring_rows_s": round(steady),
                "scoring_ratio": round(steady / ceiling_rows_s, 3),
                "wall_s": round(job["wall_s"], 2),
                "cpu_s": round(job["cpu_s"], 2),
                "rows_per_cpu_s": round(job["rows"] / job["cpu_s"]),
                "ceiling_rows_per_cpu_s": round(ceiling_per_cpu),
                "cpu_ratio": round(job["rows"] / job["cpu_s"] / ceiling_per_cpu, 3),
                "scoring_s": round(job["scoring_s"], 2),
                "peak_rss_mib": round(job["peak_rss_mb"]),
                "peak_pss_mib": round(job["peak_pss_mb"]),
                "job_args": " ".join(args.job_arg),
                **{f"machine_{k}": v for k, v in host.items()},
            }
        )
    lines.append(("machine", f"{host['cpu_model']}, {host['cpus']} CPUs, {host['mem_gib']} GiB, "
                  f"load {host['loadavg_1m_at_start']} at start"))  # fmt: skip
    width = max(len(k) for k, _ in lines)
    print()
    for key, value in lines:
        print(f"{key:<{width}}  {value}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"batch-{stamp}.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
