"""Fleet behind a load balancer (issue 15): throughput of three `inferplane serve` replicas behind
HAProxy vs one replica direct (same run, same load generator, same model), CPU seconds per process
from /proc/<pid>/stat, and a rolling restart (SIGTERM + start, one replica at a time) under load with
its failed-request count. The repository lives on a moto S3 server started here.

    python benchmarks/fleet_lb_bench.py [--seconds 20] [--rolling-seconds 60] [--concurrency 16]

Writes benchmarks/results/fleet-lb-<date>.json and .csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration import fleet_harness as fh  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_load(url: str, seconds: float, concurrency: int, pids: dict[str, int]) -> dict:
    before = {name: fh.cpu_seconds(pid) for name, pid in pids.items()}
    me = os.times()
    load = fh.Load(url, concurrency).start()
    for i in range(int(seconds)):
        time.sleep(1)
        if i % 5 == 4:
            progress(f"  {i + 1}/{int(seconds)} s, {load.answered} answered, {load.failed} failed")
    load.stop()
    after = os.times()
    elapsed = load.stopped - load.started
    cpu = {name: round(fh.cpu_seconds(pid) - before[name], 2) for name, pid in pids.items()}
    cpu["loadgen"] = round(after.user + after.system - me.user - me.system, 2)
    return {"seconds": round(elapsed, 2), "answered": load.answered, "failed": load.failed,
            "rps": round(load.answered / elapsed, 1), "cpu_s": cpu, "errors": load.errors[:5]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rolling-seconds", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=16)
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleet-lb-"))
    moto_port = free_port()
    endpoint = f"http://127.0.0.1:{moto_port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})  # fmt: skip
    moto_exe = Path(sys.executable).with_name("moto_server")
    moto = subprocess.Popen([str(moto_exe), "-H", "127.0.0.1", "-p", str(moto_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    procs: list = []
    replicas: list[fh.Replica] = []
    try:
        import s3fs

        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", moto_port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        bucket = f"fleet-lb-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
        url = f"s3://{bucket}/models"
        fh.build_repository(url, work)
        args = ("--watch", "--watch-interval", "1", "--drain-seconds", "3")
        replicas = [fh.Replica(url, free_port(), work, args) for _ in range(3)]
        progress("starting 3 replicas")
        for r in replicas:
            r.start(wait=False)
        for r in replicas:
            r.wait_ready()
        lb_port = free_port()
        cfg = work / "haproxy.cfg"
        cfg.write_text(fh.haproxy_config(lb_port, replicas, balance="leastconn"))
        haproxy = fh.start_haproxy(cfg, lb_port)
        procs.append(haproxy)
        time.sleep(1.5)
        lb = f"http://127.0.0.1:{lb_port}"
        progress(f"one replica direct, {opts.seconds:.0f} s at c={opts.concurrency}")
        direct = run_load(replicas[0].url, opts.seconds, opts.concurrency,
                          {"replica0": replicas[0].process.pid})  # fmt: skip
        progress(f"  {direct['rps']} req/s")
        progress(f"three replicas behind HAProxy, {opts.seconds:.0f} s")
        pids = {
            "haproxy": haproxy.pid,
            **{f"replica{i}": r.process.pid for i, r in enumerate(replicas)},
        }
        fleet = run_load(lb, opts.seconds, opts.concurrency, pids)
        progress(f"  {fleet['rps']} req/s, ratio {fleet['rps'] / direct['rps']:.2f}")
        # one core per replica: the fleet's rate if each replica had its own core is bounded by
        # 3 x (answers per replica CPU second); the load generator and HAProxy need theirs too
        per_cpu = direct["answered"] / max(direct["cpu_s"]["replica0"], 1e-9)
        progress(f"rolling restart, {opts.rolling_seconds:.0f} s at c={opts.concurrency}")
        load = fh.Load(lb, opts.concurrency).start()
        exits = []
        gap = opts.rolling_seconds / 3
        for r in replicas:
            t0 = time.monotonic()
            code, took = r.terminate(15)
            r.start()
            exits.append({"port": r.http_port, "exit": code, "drain_s": round(took, 1)})
            progress(f"  replica :{r.http_port} exit {code} after {took:.1f} s, restarted; "
                     f"{load.answered} answered, {load.failed} failed")  # fmt: skip
            time.sleep(max(0.0, gap - (time.monotonic() - t0)))
        load.stop()
        rolling = {"seconds": round(load.stopped - load.started, 1), "answered": load.answered,
                   "failed": load.failed, "statuses": {str(k): v for k, v in load.statuses.items()},
                   "exits": exits, "errors": load.errors[:5]}  # fmt: skip
        load1 = os.getloadavg()[0]
        result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(),
                  "loadavg_1m": load1, "concurrency": opts.concurrency, "direct": direct,
                  "fleet": fleet, "ratio": round(fleet["rps"] / direct["rps"], 3),
                  "answers_per_replica_cpu_s": round(per_cpu, 1),
                  "one_core_per_replica_rps_bound": round(3 * per_cpu, 1), "rolling": rolling}  # fmt: skip
        stamp = time.strftime("%Y-%m-%d-%H%M")
        out = ROOT / "benchmarks" / "results" / f"fleet-lb-{stamp}"
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        with open(out.with_suffix(".csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["run", "seconds", "answered", "failed", "rps", "cpu_s"])
            for name in ("direct", "fleet"):
                d = result[name]
                w.writerow(
                    [
                        name,
                        d["seconds"],
                        d["answered"],
                        d["failed"],
                        d["rps"],
                        json.dumps(d["cpu_s"]),
                    ]
                )
            w.writerow(
                ["rolling", rolling["seconds"], rolling["answered"], rolling["failed"], "", ""]
            )
        print(json.dumps(result, indent=2))
        progress(
            f"wrote {out}.json/.csv (load average {load1:.1f} on {os.cpu_count()} cores: noisy)"
        )
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        for r in replicas:
            r.stop()
        moto.terminate()
        moto.wait(10)


if __name__ == "__main__":
    main()
