"""A value the model itself rejects fails a whole micro-batch; the worker finds the poison events."""

from __future__ import annotations

import textwrap
from pathlib import Path

import orjson

from inferplane.repository.register import register
from inferplane.repository.schema import Batching
from inferplane.repository.store import Repository
from inferplane.tensors import TensorSpec
from tests.integration.streaming.harness import (
    RedisServer,
    redis_fill,
    redis_read,
    run_until,
    unique,
)

PICKY = textwrap.dedent(
    """
    import numpy as np


    class Model:
        def predict(self, inputs):
            x = inputs["x"]
            if (x < 0).any():
                raise ValueError("negative amounts are not allowed")
            return {"total": x.sum(axis=1)}
    """
)


def test_model_rejected_events_are_isolated_and_dead_lettered(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    source = tmp_path / "picky"
    source.mkdir()
    (source / "model.py").write_text(PICKY)
    repo = tmp_path / "models"
    register(
        Repository(str(repo)), "picky", str(source),
        inputs=[TensorSpec("x", "FP32", [-1, 2])], outputs=[TensorSpec("total", "FP32", [-1])],
        batching=Batching(max_batch_size=64, max_queue_delay_us=100),
    )  # fmt: skip
    client, base = redis_server.client(), unique("picky")
    poison = {13, 77, 150}
    events = [
        {"id": i, "amount": -1.0 if i in poison else float(i), "fee": 1.0} for i in range(200)
    ]
    redis_fill(client, f"{base}-in", [{"data": orjson.dumps(e)} for e in events])
    run_until(
        ["--source", redis_server.url(f"{base}-in"), "--sink", redis_server.url(f"{base}-out"),
         "--dlq", redis_server.url(f"{base}-dlq"), "--service", "picky", "--repository", str(repo),
         "--map", "x=amount,fee", "--batch-size", "100", "--max-wait-ms", "5"],
        tmp_path, lambda: client.xlen(f"{base}-out") + client.xlen(f"{base}-dlq") >= 200,
        60, "200 outputs and dead letters",
    )  # fmt: skip
    outputs = [orjson.loads(f["data"]) for _, f in redis_read(client, f"{base}-out")]
    dead = [orjson.loads(f["data"]) for _, f in redis_read(client, f"{base}-dlq")]
    assert sorted(int(d["id"]) for d in dead) == sorted(poison)
    for record in dead:
        assert record["reason"].startswith("model rejected the event: BadRequest")
        assert "negative amounts are not allowed" in record["reason"]
        assert record["attempts"] == 1
    assert sorted(int(o["id"]) for o in outputs) == [i for i in range(200) if i not in poison]
    # Events in a poisoned batch still score correctly, and in their order.
    assert all(o["outputs"]["total"] == float(o["id"]) + 1.0 for o in outputs)
    assert [int(o["id"]) for o in outputs] == sorted(int(o["id"]) for o in outputs)
