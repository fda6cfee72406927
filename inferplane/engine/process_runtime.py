"""Instances in worker processes, for models whose code holds the GIL (pure Python, sklearn).

Threads give such models no parallelism: N instances in threads take turns on one interpreter.
`ProcessRuntime` runs each instance's runtime in its own child process (spawned, so that no
thread or lock state is inherited) and stands in for it in the scheduler: the scheduler's worker
threads hand a batch to an idle child over a pipe and wait, without the GIL, for the answer.

Costs: each child loads its own copy of the model (memory x instances) and tensors are pickled
across the pipe (a copy each way). A child that dies (a crash in native code, an OOM kill) fails
its batch with a 500 and is started again for the next one.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import queue
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from inferplane.errors import InternalError
from inferplane.repository.schema import ModelConfig
from inferplane.runtimes.base import Runtime

log = logging.getLogger("inferplane.engine")

_START_TIMEOUT_S = 120.0


def uses_processes(config: ModelConfig, runtime: Runtime) -> bool:
    """`instance_kind: process`, or `auto` for a GIL-holding runtime with several instances."""
    kind = config.instance_kind
    if kind == "process":
        return True
    return kind == "auto" and config.instances > 1 and not runtime.releases_gil


def _child(conn: Connection, config_json: str, local_dir: str, optimized: bool) -> None:
    from inferplane.runtimes import create_runtime

    try:
        config = ModelConfig.model_validate_json(config_json)
        runtime = create_runtime(config, local_dir, optimized=optimized)
        runtime.load()
    except BaseException as exc:
        conn.send(("error", _portable(exc)))
        return
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            break
        if message is None:
            break
        inputs, outputs = message
        try:
            conn.send(("ok", runtime.predict(inputs, outputs)))
        except BaseException as exc:
            conn.send(("error", _portable(exc)))
    try:
        runtime.unload()
    finally:
        conn.close()


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it pickles (its type decides 400 vs 500), else its text."""
    import pickle

    try:
        pickle.dumps(exc)
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class _Worker:
    def __init__(self, index: int, runtime: ProcessRuntime) -> None:
        self.index = index
        self.owner = runtime
        self.process: Any = None
        self.conn: Connection | None = None

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        owner = self.owner
        self.process = ctx.Process(
            target=_child,
            args=(child, owner.config.model_dump_json(), owner.local_dir, owner.optimized),
            name=f"inferplane {owner.config.name} v{owner.config.version} #{self.index}",
            daemon=True,
        )
        self.process.start()
        child.close()
        self.conn = parent
        if not parent.poll(_START_TIMEOUT_S):
            self.stop()
            raise InternalError(f"instance process #{self.index} did not start in time")
        try:
            status, payload = parent.recv()
        except EOFError:
            self.stop()
            raise InternalError(
                f"instance process #{self.index} exited while loading the model"
            ) from None
        if status != "ready":
            self.stop()
            raise payload

    def call(self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None) -> Any:
        if self.conn is None or not self.process.is_alive():
            self.start()
        assert self.conn is not None
        try:
            self.conn.send((inputs, list(outputs) if outputs else None))
            status, payload = self.conn.recv()
        except (EOFError, OSError):
            code = self.process.exitcode if self.process is not None else None
            self.stop()
            raise InternalError(
                f"instance process #{self.index} of model '{self.owner.config.name}' died "
                f"(exit code {code}); it restarts for the next request"
            ) from None
        if status == "error":
            raise payload
        return payload

    def stop(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(OSError):  # the child may be gone already
                self.conn.send(None)
            self.conn.close()
            self.conn = None
        if self.process is not None:
            self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
            self.process = None


class ProcessRuntime(Runtime):
    """Stands in for `inner` (already constructed, not loaded here) with one process per instance."""

    releases_gil = True  # the calling threads only wait on pipes
    loop_safe = False

    def __init__(self, inner: Runtime, optimized: bool = True) -> None:
        super().__init__(inner.config, inner.local_dir)
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.platform = inner.platform  # type: ignore[misc]
        self.optimized = optimized
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    @property
    def model_platform(self) -> str:
        return self.inner.model_platform

    def load(self) -> None:
        # Started one after another: a model that fails to load says so once, not N times.
        for i in range(self.config.instances):
            worker = _Worker(i, self)
            try:
                worker.start()
            except BaseException:
                self.unload()
                raise
            self._workers.append(worker)
            self._idle.put(worker)

    def predict(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        worker = self._idle.get()
        try:
            result: dict[str, np.ndarray] = worker.call(inputs, outputs)
            return result
        finally:
            self._idle.put(worker)

    def unload(self) -> None:
        with self._lock:
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.stop()

    def memory_bytes(self) -> int:
        return self.inner.memory_bytes() * max(1, len(self._workers))

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process is not None]
