#!/usr/bin/env python3
"""`make bench`: inferplane against MLServer, KServe (and optionally Triton) on the same models.

Reuses the peer harness in ../shared/bench (read-only there): it is copied to .bench/harness,
its setup_peers.sh installs the peers into .bench/venvs (once), make_models.py builds the
models, and run_peers.sh drives every server with perf_analyzer -- inferplane as its
"custom" server, served from a repository registered with our own CLI from the SAME model
files. With --with-triton, run_peers2.sh measures Triton (CPU build bundled in
nvidia-pytriton) and inferplane is driven with the same loadgen.py client.

Everything generated lives under .bench/ (git-ignored); the combined table is printed and
written to benchmarks/results/<date>-<mode>.{csv,md,png}. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contextlib

import host  # sibling modules (benchmarks/ is not a package)
import report

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".bench"
HARNESS = WORK / "harness"
VENVS = WORK / "venvs"
SESSIONS = WORK / "out"
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_SRC = ROOT.parent / "shared" / "bench"
IP_VENV = ROOT / ".venv"

PEER_SERVERS = ("mlserver", "mlserver_batch", "kserve")
ALL_SERVERS = ("inferplane", *PEER_SERVERS, "triton")
ALL_MODELS = ("tabular", "mlp", "tabular_skl")
PROTOCOL_TOKENS = ("http", "http-json", "http-binary", "grpc")
LOCK = os.environ.get("BENCH_LOCK", "/tmp/inferplane-bench.lock")
# what setup_peers2.sh installs for the two venvs --with-triton needs (ray and bentoml skipped)
PEERS2_VENVS = {
    "loadgen": ["aiohttp", "uvloop"],
    "pytriton": ["nvidia-pytriton", "onnxruntime", "numpy"],
}
QUIET_PCT = 15.0  # warn when other processes use more of the CPUs than this
LOADGEN_DUR_S = 15  # as in the harness README, step 4
LOADGEN_WARM_S = 3


Key = tuple[str, str, str, str, str, str, int]  # mode, server, config, model, proto, fmt, c


@dataclass
class Pass:
    """One run_peers.sh invocation: its title, environment and the points it measures."""

    title: str
    env: dict[str, str]
    keys: list[Key]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Log:
    """Progress lines on stdout, everything (including child output) in bench.log."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.file: Any = None

    def open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=1)  # noqa: SIM115  (lives as long as the run)

    def raw(self, line: str, show: bool = True) -> None:
        if show:
            print(line, flush=True)
        if self.file is not None:
            self.file.write(line + "\n")

    def __call__(self, msg: str) -> None:
        el = int(time.monotonic() - self.t0)
        self.raw(f"[bench {time.strftime('%H:%M:%S')} +{el // 60:d}m{el % 60:02d}s] {msg}")


log = Log()

# run_peers.sh pipes its summary through `sed 's/^/    /'`; we print our own table instead
_SUMMARY_LINE = re.compile(r"^ {4}(\||Offline ceiling|Servers \(|figure:|\(matplotlib|$)")


def run(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    show: Callable[[str], bool] | None = None,
    prefix: str = "  ",
    stdin: int | None = subprocess.DEVNULL,
) -> int:
    """Run a child, stream its output to bench.log (and to stdout where show() says so)."""
    log.raw(f"$ {shlex.join(cmd)}", show=False)
    proc = subprocess.Popen(
        list(cmd),
        env=env,
        cwd=cwd,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            visible = show(line) if show else True
            log.raw(prefix + line, show=visible)
        return proc.wait()
    except BaseException:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def capture(cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = 60) -> str:
    try:
        res = subprocess.run(
            list(cmd), env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (res.stdout or "") + (res.stderr or "") if res.returncode == 0 else ""


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------- options


def parse_list(value: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [v for v in re.split(r"[,\s]+", value.strip()) if v]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"--{what}: unknown {bad}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Benchmark inferplane against MLServer, KServe (and Triton) with perf_analyzer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--fast", action="store_true", help="concurrency 1 and 32, 10 s per point")
    ap.add_argument(
        "--servers",
        default="inferplane,mlserver,mlserver_batch,kserve",
        help=f"comma list of {', '.join(ALL_SERVERS)} (triton = --with-triton)",
    )
    ap.add_argument("--models", default=",".join(ALL_MODELS), help="comma list")
    ap.add_argument(
        "--protocols",
        default="http,grpc",
        help="comma list of http (inferplane in JSON and binary tensors), http-json, "
        "http-binary (inferplane's HTTP format only; MLServer is always JSON, KServe binary), grpc",
    )
    ap.add_argument(
        "--concurrency", default=None, help="comma list (default: 1,8,32; --fast: 1,32)"
    )
    ap.add_argument(
        "--with-triton",
        action="store_true",
        help="also run Triton (run_peers2.sh, heavy install) and inferplane with loadgen.py",
    )
    ap.add_argument(
        "--triton-peers", default="triton_plain_py", help="run_peers2.sh PEERS for --with-triton"
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue the latest run of this mode, skip done points",
    )
    ap.add_argument(
        "--report-only", action="store_true", help="only rebuild the table of the latest run"
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=0,
        metavar="S",
        help="before each step, wait up to S s for other processes to use < 15%% of the CPUs",
    )
    ap.add_argument(
        "--session",
        default=None,
        help="with --resume/--report-only: that run folder under .bench/out instead of the latest",
    )
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the commands")
    ap.add_argument("--max-batch-size", type=int, default=32, help="inferplane registration")
    ap.add_argument("--max-queue-delay-us", type=int, default=500, help="inferplane registration")
    ap.add_argument(
        "--skl-optimize",
        choices=("auto", "on", "off"),
        default="auto",
        help="register tabular_skl with `--optimize` (auto: when the CLI offers it)",
    )
    ap.add_argument("--harness-src", default=str(DEFAULT_SRC), help="the shared peer harness")
    a = ap.parse_args(argv)
    a.servers = parse_list(a.servers, ALL_SERVERS, "servers")
    if a.with_triton and "triton" not in a.servers:
        a.servers.append("triton")
    a.with_triton = "triton" in a.servers
    a.models = parse_list(a.models, ALL_MODELS, "models")
    protos = parse_list(a.protocols, PROTOCOL_TOKENS, "protocols")
    a.ip_http_formats = []
    if "http" in protos or "http-json" in protos:
        a.ip_http_formats.append("json")
    if "http" in protos or "http-binary" in protos:
        a.ip_http_formats.append("binary")
    a.harness_protocols = (["http"] if a.ip_http_formats else []) + (
        ["grpc"] if "grpc" in protos else []
    )
    if a.concurrency:
        a.concurrency = [int(c) for c in re.split(r"[,\s]+", a.concurrency.strip()) if c]
    else:
        a.concurrency = [1, 32] if a.fast else [1, 8, 32]
    a.mode = "fast" if a.fast else "full"
    if not a.models or not a.servers or not a.harness_protocols:
        raise SystemExit("nothing to measure: check --servers, --models and --protocols")
    return a


# ---------------------------------------------------------------------------------- session


def find_session(mode: str, name: str | None = None) -> Path | None:
    if name:
        path = SESSIONS / name
        if not path.is_dir():
            raise SystemExit(f"no run folder {path}")
        if not name.endswith(f"-{mode}"):
            raise SystemExit(f"{name} is not a {mode} run (add or drop --fast)")
        return path
    if not SESSIONS.is_dir():
        return None
    cands = sorted(p for p in SESSIONS.iterdir() if p.is_dir() and p.name.endswith(f"-{mode}"))
    return cands[-1] if cands else None


class Bench:
    def __init__(self, a: argparse.Namespace, argv: Sequence[str]) -> None:
        self.a = a
        self.argv = list(argv)
        self.src = Path(a.harness_src)
        self.session: Path
        self.stamp: str
        self.started: str = utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")
        self.loadavg = Path("/proc/loadavg").read_text().split()[0]
        self.repo = WORK / "inferplane_repo"
        self.ip_config = f"batch{a.max_batch_size}_{a.max_queue_delay_us / 1000:g}ms"
        self.ip_version = (
            capture([str(IP_VENV / "bin" / "inferplane"), "version"])
            .strip()
            .removeprefix("inferplane ")
        )
        self.skl_note = ""

    # ------------------------------------------------------------------ paths and env
    def py(self, venv: str) -> str:
        return str(VENVS / venv / "bin" / "python")

    def harness_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTOM_")}
        env.update(
            VENVS=str(VENVS),
            BENCH_OUT=str(self.session),
            BENCH_LOCK=LOCK,
            PYTHON=env.get("PYTHON", "python3"),
        )
        return env

    # ------------------------------------------------------------------ steps
    def sync_harness(self) -> None:
        """Copy the shared harness into .bench/harness (not its venvs, models or outputs)."""
        if not (self.src / "run_peers.sh").is_file():
            raise SystemExit(f"no peer harness at {self.src} (see --harness-src)")
        skip = {".venvs", "out", "models", "__pycache__"}
        n = 0
        for dirpath, dirnames, filenames in os.walk(self.src):
            dirnames[:] = [d for d in dirnames if d not in skip]
            rel = Path(dirpath).relative_to(self.src)
            (HARNESS / rel).mkdir(parents=True, exist_ok=True)
            for fn in filenames:
                s, d = Path(dirpath) / fn, HARNESS / rel / fn
                if d.exists() and d.read_bytes() == s.read_bytes():
                    continue
                if d.exists():
                    d.chmod(0o644)
                shutil.copy2(s, d)
                d.chmod((s.stat().st_mode & 0o111) | 0o644)
                n += 1
        log(f"harness: {self.src} -> {HARNESS} ({n} files updated)")

    def setup_peers(self) -> None:
        """setup_peers.sh once (stamp = hash of the script); it is idempotent anyway."""
        stamp = VENVS / ".setup_peers.sha256"
        want = sha256_file(HARNESS / "setup_peers.sh")
        ok = all((VENVS / v / "bin" / "python").exists() for v in ("peers", "mlserver", "kserve"))
        ok = ok and (VENVS / "perf" / "bin" / "perf_analyzer").exists()
        if ok and stamp.exists() and stamp.read_text().strip() == want:
            log(f"peers already installed in {VENVS}")
            return
        log(
            f"installing the peers into {VENVS} with setup_peers.sh "
            "(first time: about 3-5 min of downloads, 2.6 GB on disk)"
        )
        VENVS.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        rc = run(
            ["bash", str(HARNESS / "setup_peers.sh")],
            env=self.harness_env(),
            show=lambda ln: ln.startswith(("Successfully installed", "Perf Analyzer", "need ")),
        )
        if rc != 0:
            raise SystemExit(f"setup_peers.sh failed (rc {rc}); see {self.session / 'bench.log'}")
        stamp.write_text(want + "\n")
        log(f"peers installed in {time.monotonic() - t0:.0f} s")

    def setup_triton(self) -> None:
        """The two venvs of peers2/setup_peers2.sh that Triton and loadgen.py need."""
        for name, pkgs in PEERS2_VENVS.items():
            stamp = VENVS / name / ".bench-installed"
            if stamp.exists():
                continue
            log(f"installing venv {name}: {' '.join(pkgs)} (as peers2/setup_peers2.sh does)")
            if not (VENVS / name / "bin" / "python").exists():
                py = os.environ.get("PYTHON", "python3")
                if run([py, "-m", "venv", str(VENVS / name)]) != 0:
                    raise SystemExit(f"could not create venv {name}")
            pip = str(VENVS / name / "bin" / "pip")
            if run([pip, "install", "-q", *pkgs], show=lambda ln: "ERROR" in ln) != 0:
                raise SystemExit(f"pip install for venv {name} failed; see bench.log")
            stamp.write_text(" ".join(pkgs) + "\n")

    def make_models(self) -> None:
        log("models: make_models.py (fixed seed; reused when present)")
        rc = run(
            [self.py("peers"), str(HARNESS / "make_models.py"), "--out", str(HARNESS / "models")],
            show=lambda ln: ln.startswith("models present"),
        )
        if rc != 0:
            raise SystemExit("make_models.py failed; see bench.log")

    def register_inferplane(self) -> None:
        """An inferplane repository holding the very files the peers serve."""
        cli = str(IP_VENV / "bin" / "inferplane")
        if self.repo.exists():
            shutil.rmtree(self.repo)
        models = HARNESS / "models"
        batching = [
            "--max-batch-size",
            str(self.a.max_batch_size),
            "--max-queue-delay-us",
            str(self.a.max_queue_delay_us),
        ]
        optimize = False
        if "tabular_skl" in self.a.models and self.a.skl_optimize != "off":
            offers = "--optimize" in capture([cli, "models", "register", "--help"])
            if self.a.skl_optimize == "on" and not offers:
                raise SystemExit(
                    "--skl-optimize on: `inferplane models register` has no --optimize"
                )
            optimize = offers
            self.skl_note = "registered with --optimize" if optimize else "served as the pickle"
        specs = {
            "tabular": [str(models / "tabular" / "model.onnx")],
            "mlp": [str(models / "mlp" / "model.onnx")],
            "tabular_skl": [
                str(models / "tabular" / "model.joblib"),
                "--input",
                "input:FP32:-1,32",
                *(["--optimize"] if optimize else []),
            ],
        }
        for m in self.a.models:
            art, *extra = specs[m]
            cmd = [cli, "models", "register", m, art, "--repository", str(self.repo)]
            cmd += batching + extra
            if run(cmd, show=lambda ln: True, prefix="  inferplane: ") != 0:
                raise SystemExit(f"inferplane models register {m} failed")
        log(f"inferplane {self.ip_version}: repository {self.repo} ({self.ip_config})")

    def ceiling(self) -> None:
        out = self.session / "ceiling.csv"
        if self.a.resume and out.exists():
            log("in-process ceiling: kept from the interrupted run")
            return
        secs = "1" if self.a.fast else "2"
        busy = self.background("ceiling")
        log(
            f"in-process ceiling (offline_ceiling.py, {secs} s per point, under flock {LOCK}; "
            f"CPU busy just before: {busy:.0f}%)"
        )
        logs = self.session / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        cmd = ["flock", "-w", "600", LOCK, self.py("peers"), str(HARNESS / "offline_ceiling.py")]
        cmd += ["--models", str(HARNESS / "models"), "--seconds", secs, "--out", str(out)]
        if run(cmd, show=lambda ln: "rows/s" in ln and "thr=1 " not in ln) != 0:
            log("WARNING: offline ceiling failed; see bench.log")

    # ------------------------------------------------------------------ perf_analyzer passes
    def passes(self) -> list[Pass]:
        """One run_peers.sh invocation per server (inferplane: one per HTTP tensor format)."""
        a = self.a
        out: list[Pass] = []

        def keys(server: str, config: str, protos: dict[str, str]) -> list[Key]:
            return [
                (a.mode, server, config, m, proto, fmt, c)
                for m in a.models
                for proto, fmt in protos.items()
                for c in a.concurrency
            ]

        if "inferplane" in a.servers:
            serve = (
                f"{shlex.quote(str(IP_VENV / 'bin' / 'inferplane'))} serve "
                f"--repository {shlex.quote(str(self.repo))} --host 127.0.0.1 "
                "--http-port {http_port} --grpc-port {grpc_port} --log-level warning "
                # audit on, as served by default, into the bench's own folder
                f"--audit-sink {shlex.quote(str(self.repo.parent / 'audit.db'))}"
            )
            custom = {
                "SERVERS": "custom",
                "CUSTOM_NAME": "inferplane",
                "CUSTOM_VERSION": self.ip_version,
                "CUSTOM_CONFIG": self.ip_config,
                "CUSTOM_CMD": serve,
            }
            # first pass: HTTP in the first format + gRPC; then HTTP in the other format only
            fmts = a.ip_http_formats or ["json"]
            for i, fmt in enumerate(fmts):
                protos = {"http": fmt} if a.ip_http_formats else {}
                if i == 0 and "grpc" in a.harness_protocols:
                    protos["grpc"] = "protobuf"
                title = (
                    "inferplane ("
                    + " + ".join("grpc" if p == "grpc" else f"http/{f}" for p, f in protos.items())
                    + ")"
                )
                env = {**custom, "CUSTOM_HTTP_FORMAT": fmt, "PROTOCOLS": " ".join(protos)}
                out.append(Pass(title, env, keys("inferplane", self.ip_config, protos)))
        # server and config columns as run_peers.sh writes them (its defaults)
        peers = {
            "mlserver": ("mlserver", "nobatch", "json"),
            "mlserver_batch": ("mlserver", "batch32_5ms", "json"),
            "kserve": ("kserve", "nobatch", "binary"),
        }
        for sid, (server, config, http_fmt) in peers.items():
            if sid in a.servers:
                protos = {p: (http_fmt if p == "http" else "protobuf") for p in a.harness_protocols}
                env = {"SERVERS": sid, "PROTOCOLS": " ".join(a.harness_protocols)}
                out.append(Pass(sid, env, keys(server, config, protos)))
        return out

    def pass_env(self, ps: Pass) -> dict[str, str]:
        a = self.a
        env = self.harness_env()
        per_point = 40 if a.fast else 75
        env.update(
            FAST="1" if a.fast else "0",
            MODELS=" ".join(a.models),
            CONCURRENCY=" ".join(str(c) for c in a.concurrency),
            RESUME="1" if a.resume else "0",
            SKIP_CEILING="1",
            DEADLINE_S=str(300 + len(ps.keys) * per_point),
        )
        env.update(ps.env)
        return env

    def done_keys(self) -> set[Key]:
        return {
            (p.mode, p.server, p.config, p.model, p.protocol, p.fmt, p.concurrency)
            for p in report.load_pa(str(self.session / "peers.csv"))
            if p.ok
        }

    def run_pass(self, i: int, n: int, ps: Pass) -> None:
        if self.a.resume and set(ps.keys) <= self.done_keys():
            log(f"pass {i}/{n}: {ps.title}: all {len(ps.keys)} points done before; skipped")
            return
        busy = self.background(ps.title)
        log(
            f"pass {i}/{n}: {ps.title}: {len(ps.keys)} points (CPU busy just before, with "
            f"nothing of ours running: {busy:.0f}% of {os.cpu_count()} cores)"
        )
        rc = run(
            ["bash", str(HARNESS / "run_peers.sh")],
            env=self.pass_env(ps),
            show=lambda ln: not _SUMMARY_LINE.match(ln),
        )
        if rc != 0:
            log(f"WARNING: run_peers.sh for {ps.title} exited with {rc}")
        if ps.env.get("SERVERS") == "custom":
            self.keep_custom_logs(ps.env["CUSTOM_HTTP_FORMAT"])

    def background(self, step: str) -> float:
        """Other processes' CPU use (%), waiting up to --quiet-wait s for it to drop; recorded."""
        busy = background_cpu()
        deadline = time.monotonic() + self.a.quiet_wait
        if busy > QUIET_PCT and self.a.quiet_wait > 0:
            log(f"{busy:.0f}% of the CPUs busy elsewhere; waiting up to {self.a.quiet_wait:.0f} s")
            while busy > QUIET_PCT and time.monotonic() < deadline:
                time.sleep(3)
                busy = background_cpu()
        self.note_background(step, busy)
        return busy

    def note_background(self, step: str, busy: float) -> None:
        """Keep the other processes' CPU use per step in session.json (the lock cannot stop it)."""
        meta = self.session / "session.json"
        info = json.loads(meta.read_text())
        info.setdefault("background_cpu_pct", []).append(
            {"utc": utcnow().strftime("%H:%M:%S"), "step": step, "busy_pct": round(busy, 1)}
        )
        meta.write_text(json.dumps(info, indent=2) + "\n")
        if busy > QUIET_PCT:
            log(
                f"WARNING: {busy:.0f}% of the CPUs are busy outside this benchmark; "
                "other load tests that ignore the lock skew the numbers"
            )

    def keep_custom_logs(self, fmt: str) -> None:
        """The harness names logs by server/config only: keep each HTTP format's own."""
        logs = self.session / "logs"
        srv = logs / "server_custom.log"
        if srv.exists():
            srv.replace(logs / f"server_inferplane_{fmt}.log")
        for p in logs.glob("pa_inferplane_*_http_c*.log*"):
            if not re.search(r"\.(json|binary)\.log", p.name):
                p.replace(p.with_name(p.name.replace(".log", f".{fmt}.log", 1)))

    # ------------------------------------------------------------------ Triton + loadgen
    def triton(self) -> None:
        a = self.a
        env = self.harness_env()
        csv_path = self.session / "peers2.csv"
        models = [m for m in a.models if m in ("tabular", "mlp")]
        if not models:
            log("Triton: only tabular and mlp are served by run_peers2.sh; nothing to do")
            return
        concs = " ".join(str(c) for c in a.concurrency)
        peers = a.triton_peers.split()
        done = {
            (p.server, p.config.split()[0], p.model, p.concurrency)
            for p in report.load_loadgen(str(csv_path))
            if p.ok
        }
        want = [(p, m, c) for p in peers for m in ("tabular", "mlp") for c in a.concurrency]
        if a.resume and all(("triton", p.split("_", 1)[1], m, c) in done for p, m, c in want):
            log("Triton: kept from the interrupted run")
        else:
            busy = self.background("triton")
            log(
                f"Triton: run_peers2.sh PEERS='{' '.join(peers)}' CONCS='{concs}' (busy {busy:.0f}%)"
            )
            env.update(
                PEERS=" ".join(peers),
                CONCS=concs,
                DUR=str(LOADGEN_DUR_S),
                WARM=str(LOADGEN_WARM_S),
                BUDGET_S=str(600 + 60 * len(want)),
            )
            rc = run(["bash", str(HARNESS / "run_peers2.sh")], env=env)
            if rc != 0:
                log(f"WARNING: run_peers2.sh exited with {rc}")
        self.inferplane_loadgen(models, csv_path)

    def inferplane_loadgen(self, models: list[str], csv_path: Path) -> None:
        """Harness README step 4: inferplane with loadgen.py at the same settings, same lock."""
        a = self.a
        p2 = HARNESS / "peers2"
        pl = self.session / "peers2_payloads"
        logs = self.session / "peers2_logs"
        pl.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        lg = [self.py("loadgen"), str(HARNESS / "loadgen.py")]
        feats = {"tabular": 32, "mlp": 256}
        for m in models:
            f = pl / f"{m}_v2.json"
            if not f.exists():  # same command as run_peers2.sh
                run([*lg, "--url", "none", "--shape", f"1,{feats[m]}", "--format", "v2",
                     "--dump-payload", str(f)])  # fmt: skip
        done = {
            (p.model, p.concurrency)
            for p in report.load_loadgen(str(csv_path))
            if p.ok and p.server == "inferplane"
        }
        todo = [(m, c) for m in models for c in a.concurrency if not (a.resume and (m, c) in done)]
        if not todo:
            log("inferplane with loadgen.py: kept from the interrupted run")
            return
        port, grpc_port = host.free_port(), host.free_port()
        run_id = utcnow().strftime("%Y%m%dT%H%M%SZ")
        cmd = [str(IP_VENV / "bin" / "inferplane"), "serve", "--repository", str(self.repo)]
        cmd += ["--host", "127.0.0.1", "--http-port", str(port), "--grpc-port", str(grpc_port)]
        cmd += ["--log-level", "warning", "--audit-sink", str(self.repo.parent / "audit.db")]
        launch = [sys.executable, str(p2 / "launch.py"), "--timeout", "150"]
        launch += ["--log", str(logs / f"inferplane_{run_id}.log")]
        launch += ["--pidfile", str(logs / "inferplane.pid")]
        for m in models:
            url = f"http://127.0.0.1:{port}/v2/models/{m}/infer"
            launch += ["--ready", url, str(pl / f"{m}_v2.json")]
        busy = self.background("inferplane loadgen")
        log(
            f"inferplane with loadgen.py on :{port} ({', '.join(f'{m} c={c}' for m, c in todo)}; "
            f"busy {busy:.0f}%)"
        )
        res = subprocess.run(
            ["flock", "-o", "-w", "600", LOCK, *launch, "--", *cmd],
            capture_output=True,
            text=True,
            check=False,
        )
        log.raw("  " + res.stdout.strip(), show=False)
        info: dict[str, Any] = {}
        with contextlib.suppress(ValueError, IndexError):
            info = json.loads(res.stdout.strip().splitlines()[-1])
        pid = int(info.get("pid") or 0)
        try:
            if not info.get("ready"):
                log(
                    f"WARNING: inferplane did not get ready for loadgen: {info or res.stderr[-500:]}"
                )
                return
            time.sleep(5)  # settle, then idle memory of the whole tree (as run_peers2.sh does)
            mem: dict[str, Any] = {}
            with_mem = capture([sys.executable, str(p2 / "proctree_mem.py"), str(pid), "--json"])
            with contextlib.suppress(ValueError, KeyError):
                mem = json.loads(with_mem)["total"]
            log(
                f"inferplane ready: cold start {info.get('cold_start_s')} s, idle "
                f"{mem.get('n_procs', '?')} procs, PSS {mem.get('pss_mib', '?')} MiB"
            )
            for m, c in todo:
                url = f"http://127.0.0.1:{port}/v2/models/{m}/infer"
                limit = str(LOADGEN_DUR_S + LOADGEN_WARM_S + 60)
                lg_cmd = ["flock", "-o", "-w", "600", LOCK, "timeout", limit, *lg, "--url", url]
                lg_cmd += ["--payload-file", str(pl / f"{m}_v2.json"), "--concurrency", str(c)]
                lg_cmd += ["--duration", str(LOADGEN_DUR_S), "--warmup", str(LOADGEN_WARM_S)]
                lg_cmd += ["--timeout", "30", "--server-pids", str(pid)]
                lg_cmd += ["--label", f"inferplane/{self.ip_config}/{m}/c{c}"]
                lg_cmd += ["--dump-latencies", str(logs / f"lat_{run_id}_inferplane_{m}_c{c}.csv")]
                log(f"measure inferplane/{self.ip_config} {m} http(json, loadgen) c={c}")
                out = subprocess.run(lg_cmd, capture_output=True, text=True, check=False).stdout
                with open(self.session / "peers2_raw.jsonl", "a") as raw:
                    raw.write(out)
                meta = {
                    "run_id": run_id,
                    "peer": "inferplane",
                    "variant": self.ip_config,
                    "model": m,
                    "url": url,
                    "concurrency": str(c),
                    "body_format": "v2json",
                    "cold_start_s": str(info.get("cold_start_s", "")),
                    "idle_rss_mib": str(mem.get("rss_mib", "")),
                    "idle_pss_mib": str(mem.get("pss_mib", "")),
                    "idle_nprocs": str(mem.get("n_procs", "")),
                    "max_batch": str(a.max_batch_size),
                    "batch_delay_us": str(a.max_queue_delay_us),
                    "server_version": self.ip_version,
                    "models_dir": str(self.repo),
                }
                summary = subprocess.run(
                    [sys.executable, str(p2 / "csv_append.py"), str(csv_path)]
                    + [f"{k}={v}" for k, v in meta.items()],
                    input=out,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                log.raw("  -> " + (summary.stdout.strip() or summary.stderr.strip()))
        finally:
            if pid:
                stop_pid(pid)

    # ------------------------------------------------------------------ report
    def versions(self) -> dict[str, Any]:
        def dists(venv: Path, names: Sequence[str]) -> dict[str, str]:
            py = venv / "bin" / "python"
            if not py.exists():
                return {}
            code = (
                "import importlib.metadata as m, json, platform\n"
                f"out = {{'python': platform.python_version()}}\n"
                f"for n in {list(names)!r}:\n"
                "    try: out[n] = m.version(n)\n"
                "    except m.PackageNotFoundError: pass\n"
                "print(json.dumps(out))"
            )
            try:
                return dict(json.loads(capture([str(py), "-c", code])))
            except ValueError:
                return {}

        v: dict[str, Any] = {
            "inferplane": {
                "version": self.ip_version,
                "git": git_describe(),
                **dists(IP_VENV, ["onnxruntime", "scikit-learn", "numpy", "uvicorn", "grpcio"]),
            },
            "mlserver": dists(
                VENVS / "mlserver",
                [
                    "mlserver",
                    "mlserver-sklearn",
                    "onnxruntime",
                    "scikit-learn",
                    "uvloop",
                    "fastapi",
                ],
            ),
            "kserve": dists(
                VENVS / "kserve", ["kserve", "onnxruntime", "scikit-learn", "fastapi", "grpcio"]
            ),
            "ceiling_and_models": dists(
                VENVS / "peers", ["onnxruntime", "scikit-learn", "skl2onnx", "onnx", "numpy"]
            ),
        }
        lib = sorted((VENVS / "perf").glob("lib/python3.*/site-packages/nvidia/cuda_runtime/lib"))
        env = dict(os.environ)
        if lib:
            env["LD_LIBRARY_PATH"] = str(lib[0])
        pa = capture([str(VENVS / "perf" / "bin" / "perf_analyzer"), "--version"], env=env)
        v["perf_analyzer"] = pa.strip().splitlines()[0] if pa.strip() else ""
        if self.a.with_triton or (self.session / "peers2.csv").exists():
            v["triton"] = dists(
                VENVS / "pytriton", ["nvidia-pytriton", "tritonclient", "onnxruntime"]
            )
            v["triton"]["tritonserver"] = (
                "2.51.0 (bundled in nvidia-pytriton 0.7.0, per the harness)"
            )
            v["loadgen"] = dists(VENVS / "loadgen", ["aiohttp", "uvloop"])
        return v

    def machine(self) -> dict[str, Any]:
        session = json.loads((self.session / "session.json").read_text())
        info = dict(session.get("machine", {}))
        info["versions"] = session.get("versions") or self.versions()
        ip = session.get("inferplane", {})
        self.ip_version = ip.get("version", self.ip_version)
        self.skl_note = ip.get("skl_note", self.skl_note)
        return info

    def write_report(self) -> int:
        a = self.a
        s = self.session
        points = report.load_pa(str(s / "peers.csv"))
        points = [
            p
            for p in points
            if p.mode == a.mode
            and p.model in a.models
            and (p.server != "inferplane" or p.config == self.ip_config)
        ]
        points += [p for p in report.load_loadgen(str(s / "peers2.csv")) if p.model in a.models]
        ceiling = {
            k: v for k, v in report.load_ceiling(str(s / "ceiling.csv")).items() if k in a.models
        }
        if not points:
            log(f"no results in {s}")
            return 1
        report.compare(points, ceiling)
        machine = self.machine()
        c_hi = max(a.concurrency)
        tgt = report.targets(points, c_hi)

        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = RESULTS / f"{self.stamp}-{a.mode}"
        report.write_csv(f"{stem}.csv", points, ceiling)
        (Path(f"{stem}.machine.json")).write_text(json.dumps(machine, indent=2) + "\n")
        fig = self.figure(stem)
        md = self.markdown(points, ceiling, machine, tgt, fig)
        Path(f"{stem}.md").write_text(md)

        print()
        print(f"inferplane benchmark, {a.mode} mode, {self.describe_machine(machine)}")
        print(report.text_table(points, ceiling))
        print()
        print(f"Targets (issues 3 and 4), at c={c_hi} unless stated:")
        print(report.targets_text(tgt))
        print()
        print(report.LEGEND)
        failed = [p for p in points if not p.ok]
        if failed:
            print()
            print(f"{len(failed)} point(s) failed; the errors:")
            for p in failed:
                print(
                    f"  {p.label} {p.config} {p.model} {p.proto_label} c={p.concurrency}: {p.notes}"
                )
            self.show_failure_logs(failed)
        print()
        print(f"results: {stem}.csv  {stem}.md  {stem}.machine.json" + (f"  {fig}" if fig else ""))
        print(f"raw: {s} (peers.csv, ceiling.csv, logs/, bench.log)")
        return 0

    def show_failure_logs(self, failed: list[report.Point]) -> None:
        logs = self.session / "logs"
        if any(p.server == "inferplane" for p in failed):
            for srv in sorted(logs.glob("server_inferplane_*.log")):
                tail = srv.read_text(errors="replace").splitlines()[-15:]
                print(f"  --- {srv} (last lines)")
                for ln in tail:
                    print("    " + ln)

    def figure(self, stem: Path) -> str:
        py = VENVS / "peers" / "bin" / "python"
        if not py.exists():
            return ""
        out = f"{stem}.png"
        cmd = [str(py), str(Path(__file__).with_name("plot.py")), "--csv", f"{stem}.csv"]
        cmd += ["--out", out, "--concurrency", str(max(self.a.concurrency))]
        if run(cmd, show=lambda ln: False) != 0 or not Path(out).exists():
            log("figure: skipped (plot.py failed or matplotlib missing; see bench.log)")
            return ""
        return out

    @staticmethod
    def describe_machine(m: dict[str, Any]) -> str:
        return (
            f"{m.get('cpus')} CPUs ({m.get('cpu_model')}), {m.get('mem_gib')} GiB, "
            f"python {m.get('python')}, {m.get('started_utc')}"
        )

    def markdown(
        self,
        points: list[report.Point],
        ceiling: dict[str, report.Ceiling],
        machine: dict[str, Any],
        tgt: list[report.Target],
        fig: str,
    ) -> str:
        a = self.a
        v = machine.get("versions", {})
        win = "3 x 3.334 s windows (10 s)" if a.fast else "3-5 x 3.5 s windows, stable within 20 %"
        lines = [
            f"# inferplane benchmark - {a.mode} mode, {machine.get('started_utc')}",
            "",
            "Produced by `make bench` (`benchmarks/run.py "
            + " | ".join(shlex.join(i) for i in self.invocations())
            + "`); how to read it: `benchmarks/README.md`.",
            "",
            "## Machine",
            "",
        ]
        for k in (
            "cpu_model",
            "cpus",
            "cpu_affinity",
            "cgroup_cpu_max",
            "mem_gib",
            "cgroup_memory_max",
            "os",
            "kernel",
            "python",
            "loadavg_1m_at_start",
            "started_utc",
            "finished_utc",
            "inferplane_git_at_start",
        ):
            if k in machine:
                lines.append(f"- {k}: {machine[k]}")
        bg = json.loads((self.session / "session.json").read_text()).get("background_cpu_pct", [])
        if bg:
            lines.append(
                "- CPU busy outside the benchmark just before each pass (other processes, which "
                "the lock cannot keep out): "
                + ", ".join(f"{b['step']} {b['busy_pct']:.0f}%" for b in bg)
            )
        lines += ["", "## Versions", ""]
        for name, d in v.items():
            if isinstance(d, dict):
                lines.append(f"- {name}: " + ", ".join(f"{k} {val}" for k, val in d.items()))
            else:
                lines.append(f"- {name}: {d}")
        lines += [
            "",
            "## Settings",
            "",
            f"- servers: {', '.join(a.servers)}; models: {', '.join(a.models)}; concurrency: "
            f"{', '.join(map(str, a.concurrency))}",
            f"- perf_analyzer: async, `--concurrency-range C:C`, {win}, 200-request warm-up per "
            "(server, model, protocol); one row per request",
            f"- inferplane {self.ip_version}: `{self.ip_config}` = registered with --max-batch-size "
            f"{a.max_batch_size} --max-queue-delay-us {a.max_queue_delay_us}"
            + (f"; tabular_skl {self.skl_note}" if self.skl_note else ""),
            "- MLServer: `nobatch` and `batch32_5ms` (adaptive batching, max 32, 5 ms); "
            "KServe: one uvicorn worker; HTTP tensors: MLServer JSON, KServe binary "
            "(harness README, problem 5)",
        ]
        if a.with_triton:
            lines.append(
                f"- loadgen.py: closed loop, {LOADGEN_DUR_S} s after {LOADGEN_WARM_S} s warm-up, "
                "HTTP/JSON V2 body; Triton from run_peers2.sh (python backend + onnxruntime, "
                "dynamic batching max 32, 1 ms)"
            )
        lines += [
            "- client and server share the same cores (nothing pinned); every timed step holds "
            f"`flock {LOCK}`",
            "",
            "## In-process ceiling (rows/s, no server)",
            "",
            report.ceiling_markdown(ceiling),
            "",
            "## Results",
            "",
            report.markdown_table(points, ceiling),
            f"## Targets (issues 3 and 4), c={max(a.concurrency)} unless stated",
            "",
            report.targets_markdown(tgt),
            "",
            report.LEGEND,
            "",
        ]
        failed = [p for p in points if not p.ok]
        if failed:
            lines += ["## Failed points", ""]
            lines += [
                f"- {p.label} {p.config} {p.model} {p.proto_label} c={p.concurrency}: "
                f"`{p.status}` {p.notes}"
                for p in failed
            ]
            lines.append("")
        if fig:
            lines += [f"![throughput and p99 at c={max(a.concurrency)}]({Path(fig).name})", ""]
        return "\n".join(lines)

    # ------------------------------------------------------------------ driver
    def open_session(self) -> None:
        a = self.a
        prev = find_session(a.mode, a.session) if (a.resume or a.report_only) else None
        if a.report_only and prev is None:
            raise SystemExit(f"no earlier {a.mode} run under {SESSIONS}")
        if prev is not None:
            self.session = prev
        else:
            self.session = SESSIONS / f"{utcnow().strftime('%Y-%m-%d-%H%M')}-{a.mode}"
        self.stamp = self.session.name.rsplit("-", 1)[0]
        if not a.dry_run:
            self.session.mkdir(parents=True, exist_ok=True)
            log.open(self.session / "bench.log")
        meta = self.session / "session.json"
        if meta.exists():
            info = json.loads(meta.read_text())
        else:
            info = {"machine": collect_machine(self.started, self.loadavg)}
        info.setdefault("invocations", []).append(
            {"utc": self.started, "argv": self.argv, "loadavg_1m": self.loadavg}
        )
        if not a.dry_run:
            meta.write_text(json.dumps(info, indent=2) + "\n")

    def invocations(self) -> list[list[str]]:
        """The argument lists of the runs that measured into this session."""
        info = json.loads((self.session / "session.json").read_text())
        return [
            list(i["argv"])
            for i in info.get("invocations", [])
            if not {"--report-only", "--dry-run"} & set(i["argv"])
        ]

    def finish_session(self) -> None:
        meta = self.session / "session.json"
        info = json.loads(meta.read_text())
        info["machine"]["finished_utc"] = utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")
        info["versions"] = self.versions()
        info["inferplane"] = {
            "version": self.ip_version,
            "config": self.ip_config,
            "skl_note": self.skl_note,
        }
        meta.write_text(json.dumps(info, indent=2) + "\n")

    def estimate(self, passes: list[Pass]) -> int:
        per = 17 if self.a.fast else 22  # measured: window(s) + warm-up + perf_analyzer start
        n = sum(len(p.keys) for p in passes)
        s = n * per + 15 * len(passes) + (30 if self.a.fast else 50)
        if self.a.with_triton:
            k = len([m for m in self.a.models if m in ("tabular", "mlp")]) * len(self.a.concurrency)
            s += 2 * k * (LOADGEN_DUR_S + LOADGEN_WARM_S + 10) + 60
        return s

    def main(self) -> int:
        a = self.a
        self.open_session()
        if a.report_only:
            return self.write_report()
        passes = self.passes()
        est = self.estimate(passes)
        log(
            f"{a.mode} run -> {self.session}: servers {','.join(a.servers)}; models "
            f"{','.join(a.models)}; protocols {','.join(a.harness_protocols)} (inferplane HTTP: "
            f"{'/'.join(a.ip_http_formats) or '-'}); concurrency {','.join(map(str, a.concurrency))}"
        )
        log(
            f"plan: {sum(len(p.keys) for p in passes)} perf_analyzer points in {len(passes)} passes"
            + (", plus Triton and inferplane with loadgen.py" if a.with_triton else "")
            + f"; about {est // 60 + 1} min after the one-time install"
            + (" (points already done are skipped)" if a.resume else "")
        )
        if a.dry_run:
            for i, ps in enumerate(passes, 1):
                env = self.pass_env(ps)
                keys: tuple[str, ...] = (
                    "SERVERS",
                    "PROTOCOLS",
                    "MODELS",
                    "CONCURRENCY",
                    "FAST",
                    "RESUME",
                )
                keys += ("CUSTOM_HTTP_FORMAT", "CUSTOM_CONFIG", "CUSTOM_CMD")
                shown = " ".join(f"{k}={shlex.quote(env[k])}" for k in keys if k in env)
                print(f"pass {i}: {ps.title}: {shown} {HARNESS / 'run_peers.sh'}")
            return 0
        self.sync_harness()
        self.setup_peers()
        if a.with_triton:
            self.setup_triton()
        self.make_models()
        if "inferplane" in a.servers or a.with_triton:
            self.register_inferplane()
        self.ceiling()
        for i, ps in enumerate(passes, 1):
            self.run_pass(i, len(passes), ps)
        if a.with_triton:
            self.triton()
        self.finish_session()
        log("measurements done")
        return self.write_report()


# ---------------------------------------------------------------------------------- helpers


def stop_pid(pid: int) -> None:
    """INT a server this script started (by PID; inferplane's quick stop, where TERM would drain
    for --drain-seconds first), KILL it after 20 s."""
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    for _ in range(100):
        time.sleep(0.2)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def background_cpu(seconds: float = 2.0) -> float:
    """Share of all CPUs (%) busy over `seconds`, from /proc/stat."""

    def sample() -> tuple[int, int]:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = f[3] + (f[4] if len(f) > 4 else 0)
        return sum(f[:8]), idle

    t1, i1 = sample()
    time.sleep(seconds)
    t2, i2 = sample()
    return 100.0 * (1 - (i2 - i1) / max(1, t2 - t1))


def git_describe() -> str:
    rev = capture(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).strip()
    dirty = capture(["git", "-C", str(ROOT), "status", "--porcelain", "--", "inferplane"]).strip()
    return rev + (" + uncommitted changes in inferplane/" if dirty else "")


def collect_machine(started: str, loadavg: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        **host.machine_basics(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "loadavg_1m_at_start": loadavg,
        "started_utc": started,
        "inferplane_git_at_start": git_describe(),
    }
    cpu_max = host.read_text("/sys/fs/cgroup/cpu.max").strip()
    if cpu_max:
        info["cgroup_cpu_max"] = cpu_max
    mem_max = host.read_text("/sys/fs/cgroup/memory.max").strip()
    if mem_max:
        info["cgroup_memory_max"] = mem_max
    return info


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(args)
    if a.report_only:  # report with the settings of the run that measured
        prev = find_session(a.mode, a.session)
        meta = prev / "session.json" if prev else None
        if meta is not None and meta.exists():
            runs = [
                i["argv"]
                for i in json.loads(meta.read_text()).get("invocations", [])
                if not {"--report-only", "--dry-run"} & set(i["argv"])
            ]
            if runs:
                session = a.session
                a = parse_args(runs[-1])
                a.report_only, a.resume, a.session = True, False, session
    bench = Bench(a, args)
    try:
        return bench.main()
    except KeyboardInterrupt:
        log("interrupted: rerun with --resume to continue where it stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
