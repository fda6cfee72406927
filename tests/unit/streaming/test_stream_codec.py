"""Decoding events into model inputs and encoding predictions and dead letters."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from inferplane.errors import BadRequest
from inferplane.predictor import Signature
from inferplane.streaming.codec import (
    Decoder,
    child_traceparent,
    dead_letter_record,
    event_time_ms,
    output_record,
    parse_mapping,
)
from inferplane.streaming.connector import Event, parse_url
from inferplane.tensors import TensorSpec

TABULAR = Signature(
    "tabular", "1", [TensorSpec("input", "FP32", [-1, 4])],
    [TensorSpec("label", "INT64", [-1]), TensorSpec("probabilities", "FP32", [-1, 2])], 32,
)  # fmt: skip
TWO_INPUTS = Signature(
    "m", "1", [TensorSpec("x", "FP32", [-1, 2]), TensorSpec("text", "BYTES", [-1])],
    [TensorSpec("y", "FP32", [-1])], 8,
)  # fmt: skip


def event(payload: object, **kw: object) -> Event:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    fields: dict[str, object] = {
        "key": None, "headers": {}, "message_id": "7-0", "output_id": "in:7-0",
        "position": {"stream": "in", "id": "7-0"}, "timestamp_ms": 1_000,
    }  # fmt: skip
    fields.update(kw)
    return Event(payload=raw, **fields)  # type: ignore[arg-type]


def test_features_field_for_a_one_input_model() -> None:
    d = Decoder(TABULAR).decode(event({"id": "a", "features": [1, 2, 3, 4]}))
    assert d.event_id == "a" and d.rows == 1 and not d.v2
    assert d.inputs["input"].dtype == np.float32
    np.testing.assert_array_equal(d.inputs["input"], [[1, 2, 3, 4]])
    assert d.event_time_ms == 1_000  # the broker's timestamp when no time field is named


def test_input_name_as_field_and_broker_id_when_no_id() -> None:
    d = Decoder(TABULAR).decode(event({"input": [0.5, 0.5, 0.5, 0.5]}))
    assert d.event_id == "7-0"


def test_mapping_builds_the_vector_from_fields() -> None:
    decoder = Decoder(TABULAR, parse_mapping(["input=a,b,c,d"]))
    d = decoder.decode(event({"a": 1, "b": 2.5, "c": -1, "d": 0}))
    np.testing.assert_array_equal(d.inputs["input"], [[1, 2.5, -1, 0]])
    with pytest.raises(BadRequest, match="event has no field 'c' \\(mapped to 'input'\\)"):
        decoder.decode(event({"a": 1, "b": 2}))


def test_mapping_from_one_field_and_several_inputs() -> None:
    decoder = Decoder(TWO_INPUTS, parse_mapping(["x=vec", "text=comment"]))
    d = decoder.decode(event({"vec": [1, 2], "comment": "hello"}))
    np.testing.assert_array_equal(d.inputs["x"], [[1, 2]])
    assert d.inputs["text"].tolist() == [b"hello"]
    assert d.shape_key == ((2,), ())


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{nope", "event is not JSON"),
        ([1, 2], "event must be a JSON object, got list"),
        ({"features": [1, 2, 3]}, "input 'input' needs 4 values per event (shape [-1, 4]), got 3"),
        ({"features": ["a", "b", "c", "d"]}, "FP32 data must be numbers"),
        ({"amount": 1}, "event has no field for input 'input' (expected 'features' or 'input'"),
    ],
)
def test_poison_events_are_bad_requests(payload: object, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        Decoder(TABULAR).decode(event(payload))
    assert message in info.value.message


def test_mapping_must_name_real_inputs() -> None:
    with pytest.raises(BadRequest, match="--map names input 'nope'"):
        Decoder(TABULAR, {"nope": ["a"]})
    with pytest.raises(BadRequest, match="expected INPUT=FIELD"):
        parse_mapping(["input"])


def test_full_v2_request_as_the_event() -> None:
    doc = {"id": "req-1", "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4],
                                      "data": [1, 2, 3, 4, 5, 6, 7, 8]}]}  # fmt: skip
    d = Decoder(TABULAR).decode(event(doc))
    assert d.v2 and d.rows == 2 and d.event_id == "req-1"
    assert d.inputs["input"].shape == (2, 4)
    doc["inputs"][0]["datatype"] = "FP64"  # type: ignore[index]
    with pytest.raises(BadRequest, match="has datatype FP64, the model expects FP32"):
        Decoder(TABULAR).decode(event(doc))


def test_event_time_field_in_seconds_millis_or_iso() -> None:
    decoder = Decoder(TABULAR, time_field="ts")
    base = {"features": [1, 2, 3, 4]}
    assert decoder.decode(event({**base, "ts": 1_700_000_000})).event_time_ms == 1_700_000_000_000
    assert decoder.decode(event({**base, "ts": 1_700_000_000_123})).event_time_ms == (
        1_700_000_000_123
    )
    assert decoder.decode(event({**base, "ts": "2023-11-14T22:13:20Z"})).event_time_ms == (
        1_700_000_000_000
    )
    with pytest.raises(BadRequest, match="not ISO 8601"):
        event_time_ms("yesterday")


def test_traceparent_continues_the_callers_trace() -> None:
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    child = child_traceparent(parent)
    assert child.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-") and child.endswith("-01")
    assert child != parent
    fresh = child_traceparent("garbage")
    assert len(fresh) == 55 and fresh.split("-")[1] != "4bf92f3577b34da6a3ce929d0e0e4736"


def test_output_record_per_event() -> None:
    ev = event({"id": "a", "features": [1, 2, 3, 4]}, key=b"card-1",
               headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                        "tenant": "acme"})  # fmt: skip
    d = Decoder(TABULAR).decode(ev)
    outputs = {"label": np.array([1]), "probabilities": np.array([[0.25, 0.75]], np.float32)}
    record = output_record(d, outputs, model_name="tabular", model_version="1", route="canary",
                           scored_at_ms=2_000)  # fmt: skip
    doc = orjson.loads(record.value)
    assert doc["outputs"] == {"label": 1, "probabilities": [0.25, 0.75]}
    assert doc["id"] == "a" and doc["key"] == "card-1" and doc["output_id"] == "in:7-0"
    assert (doc["model_name"], doc["model_version"], doc["route"]) == ("tabular", "1", "canary")
    assert (doc["event_time"], doc["scored_at"]) == (1_000, 2_000)
    assert record.key == b"card-1"
    assert record.headers["tenant"] == "acme" and record.headers["output_id"] == "in:7-0"
    assert record.headers["traceparent"] == doc["traceparent"]


def test_dead_letter_keeps_the_original_bytes() -> None:
    ev = event(b"\xff\x00binary")
    doc = orjson.loads(dead_letter_record(ev, source="redis:in", reason="undecodable event: x",
                                          error="BadRequest", attempts=0).value)  # fmt: skip
    assert doc["payload_encoding"] == "base64"
    assert base64.b64decode(doc["payload"]) == b"\xff\x00binary"
    assert doc["position"] == {"stream": "in", "id": "7-0"} and doc["attempts"] == 0
    assert doc["reason"] == "undecodable event: x" and doc["source"] == "redis:in"


def test_url_shapes() -> None:
    url = parse_url("kafka://h1:9092,h2:9092/tx?session.timeout.ms=6000", "--source")
    assert (url.hosts, url.path, url.query) == ("h1:9092,h2:9092", "/tx",
                                               {"session.timeout.ms": "6000"})  # fmt: skip
    with pytest.raises(BadRequest, match="unknown scheme 'http'"):
        parse_url("http://h/x", "--sink")
