"""Columns -> model inputs: binding by the signature, --map, casting rules and bad rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from inferplane.batch.mapping import bind_inputs, map_chunk, parse_maps
from inferplane.errors import BadRequest
from inferplane.predictor import Signature
from inferplane.tensors import TensorSpec


def sig(*inputs: TensorSpec) -> Signature:
    return Signature("m", "1", list(inputs), [TensorSpec("out", "FP32", [-1])], 32)


VEC3 = sig(TensorSpec("input", "FP32", [-1, 3]))


def test_fixed_size_list_column_feeds_a_matrix_input() -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    table = pa.table({"input": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 3)})
    [binding] = bind_inputs(VEC3, table.schema, {})
    assert binding.kind == "list" and binding.width == 3
    mapped = map_chunk([binding], table)
    np.testing.assert_array_equal(mapped.inputs["input"], x)
    assert mapped.inputs["input"].dtype == np.float32 and not mapped.errors


def test_variable_list_rows_of_the_wrong_length_or_null_are_bad_rows() -> None:
    table = pa.table({"input": pa.array([[1, 2, 3], [1, 2], None, [4.5, 5, 6], [1, None, 3]])})
    [binding] = bind_inputs(VEC3, table.schema, {})
    mapped = map_chunk([binding], table)
    assert mapped.rows.tolist() == [0, 3]
    np.testing.assert_array_equal(mapped.inputs["input"], [[1, 2, 3], [4.5, 5, 6]])
    assert mapped.errors == {
        1: "column 'input' has 2 values, input 'input' takes 3",
        2: "column 'input' is null",
        4: "column 'input' is null",
    }


def test_map_stacks_named_columns_and_patterns_expand_in_table_order() -> None:
    table = pa.table({"id": [1, 2], "f2": [3.0, 6.0], "f0": [1, 4], "f1": [2.0, 5.0]})
    maps = parse_maps(["input=f*"], table.schema.names)
    assert maps == {"input": ["f2", "f0", "f1"]}
    maps = parse_maps(["input=f0,f1,f2"], table.schema.names)
    [binding] = bind_inputs(VEC3, table.schema, maps)
    mapped = map_chunk([binding], table)
    np.testing.assert_array_equal(mapped.inputs["input"], [[1, 2, 3], [4, 5, 6]])
    assert mapped.inputs["input"].dtype == np.float32


def test_text_cells_parse_as_numbers_and_bad_cells_are_bad_rows() -> None:
    table = pa.table({"a": ["1.5", "x", None, "2"], "b": ["1", "2", "3", "4"]})
    spec = sig(TensorSpec("input", "FP64", [-1, 2]))
    [binding] = bind_inputs(spec, table.schema, parse_maps(["input=a,b"], table.schema.names))
    mapped = map_chunk([binding], table)
    assert mapped.rows.tolist() == [0, 3]
    np.testing.assert_array_equal(mapped.inputs["input"], [[1.5, 1], [2, 4]])
    assert mapped.errors == {1: "column 'a': 'x' is not a number", 2: "column 'a' is null"}


def test_floats_become_integers_only_when_whole_and_in_range() -> None:
    table = pa.table({"n": [1.0, 2.5, 300.0, float("nan"), -3.0]})
    spec = sig(TensorSpec("n", "INT8", [-1]))
    [binding] = bind_inputs(spec, table.schema, {})
    mapped = map_chunk([binding], table)
    assert mapped.rows.tolist() == [0, 4]
    assert mapped.inputs["n"].dtype == np.int8
    assert mapped.inputs["n"].tolist() == [1, -3]
    assert mapped.errors[1] == "column 'n': 2.5 is not a whole number for INT8"
    assert mapped.errors[2] == "column 'n': 300.0 is out of range for INT8"
    assert "not a whole number" in mapped.errors[3]


def test_nan_passes_through_and_ints_and_bools_cast_to_float() -> None:
    table = pa.table(
        {"a": [1.0, float("nan")], "b": [True, False], "c": pa.array([7, 8], pa.int64())}
    )
    spec = sig(TensorSpec("input", "FP32", [-1, 3]))
    [binding] = bind_inputs(spec, table.schema, {"input": ["a", "b", "c"]})
    mapped = map_chunk([binding], table)
    assert not mapped.errors
    out = mapped.inputs["input"]
    assert out[0].tolist() == [1, 1, 7] and np.isnan(out[1, 0]) and out[1, 1:].tolist() == [0, 8]


def test_bytes_inputs_take_text_columns() -> None:
    table = pa.table({"text": ["hello", None, "hi"]})
    spec = sig(TensorSpec("text", "BYTES", [-1]))
    [binding] = bind_inputs(spec, table.schema, {})
    mapped = map_chunk([binding], table)
    assert mapped.inputs["text"].tolist() == [b"hello", b"hi"]
    assert mapped.errors == {1: "column 'text' is null"}


def test_several_inputs_drop_a_row_bad_in_any_of_them() -> None:
    table = pa.table({"a": [1.0, None, 3.0], "b": [1, 2, None]})
    spec = sig(TensorSpec("a", "FP32", [-1]), TensorSpec("b", "INT64", [-1, 1]))
    bindings = bind_inputs(spec, table.schema, {})
    mapped = map_chunk(bindings, table)
    assert mapped.rows.tolist() == [0]
    assert mapped.inputs["a"].tolist() == [1.0] and mapped.inputs["b"].tolist() == [[1]]
    assert set(mapped.errors) == {1, 2}


@pytest.mark.parametrize(
    ("schema", "maps", "message"),
    [
        (pa.schema([("x", pa.float32())]), {}, "has no column of that name in the table (columns: x); build it from columns with --map input=col1,col2,..."),
        (pa.schema([("input", pa.float32())]), {}, "takes 3 values per row; column 'input' holds one"),
        (pa.schema([("a", pa.float32()), ("b", pa.float32())]), {"input": ["a", "b"]}, "takes 3 values per row; --map gives 2 columns"),
        (pa.schema([("a", pa.float32())]), {"input": ["a", "zz", "a"]}, "--map input: no column 'zz' in the table; columns are a"),
        (pa.schema([("a", pa.timestamp("s"))]), {"input": ["a", "a", "a"]}, "column 'a' has type timestamp[s], which cannot become FP32"),
        (pa.schema([("a", pa.float32())]), {"other": ["a"]}, "--map names 'other', which model 'm' does not take; its inputs are input"),
    ],
)  # fmt: skip
def test_configuration_errors_say_what_to_do(schema: pa.Schema, maps: dict, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        bind_inputs(VEC3, schema, maps)
    assert message in info.value.message


def test_parse_maps_rejects_malformed_options() -> None:
    with pytest.raises(BadRequest, match="expected input=col1,col2"):
        parse_maps(["input"], ["a"])
    with pytest.raises(BadRequest, match="pattern 'g\\*' matches no column"):
        parse_maps(["input=g*"], ["a"])
    with pytest.raises(BadRequest, match="twice"):
        parse_maps(["input=a", "input=a"], ["a"])


def test_inputs_without_a_batch_dimension_are_refused() -> None:
    spec = sig(TensorSpec("input", "FP32", [3]))
    with pytest.raises(BadRequest, match="needs inputs of shape \\[-1\\] or \\[-1, N\\]"):
        bind_inputs(spec, pa.schema([("input", pa.list_(pa.float32(), 3))]), {})
