"""Table columns -> model inputs, by the target's signature.

An input is fed from the column of the same name (a scalar column for a [-1] input, a list or
fixed-size-list column for a [-1, N] input) or, with `--map input=col1,col2,...`, from several
scalar columns stacked into a feature vector (shell-style patterns such as `f*` expand in table
order). Casting rules, applied per row so that one bad value fails one row, not the job:

- numbers and booleans become any FP type; floats become an INT type only when whole and in range;
- text (CSV cells, JSON strings) is parsed as a number; what does not parse is a bad row;
- null is a bad row; NaN is passed through (trees and many models treat it as missing);
- BYTES inputs take text or binary columns as UTF-8 bytes.

Anything else (a missing column, a timestamp feeding an FP32 input, a width that does not match)
is a configuration error raised before any row is read.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from inferplane.batch.extras import require_pyarrow
from inferplane.errors import BadRequest
from inferplane.tensors import BYTES, DATATYPE_TO_DTYPE

if TYPE_CHECKING:
    from inferplane.predictor import Signature


@dataclass(frozen=True, slots=True)
class InputBinding:
    name: str
    datatype: str
    kind: str  # "scalar" (one value per row), "list" (one list column), "columns" (stacked)
    columns: tuple[str, ...]
    width: int | None  # values per row for rank-2 inputs; None for rank 1


@dataclass(slots=True)
class MappedChunk:
    """The rows of a chunk that could be mapped, as model inputs, and why the others could not."""

    inputs: dict[str, np.ndarray]
    rows: np.ndarray  # positions (in the chunk) of the mapped rows, ascending
    errors: dict[int, str] = field(default_factory=dict)  # position -> reason


def parse_maps(items: Sequence[str], column_names: Sequence[str]) -> dict[str, list[str]]:
    """`input=col1,col2,f*` options -> {input: [columns]}; patterns expand in table order."""
    maps: dict[str, list[str]] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        name = name.strip()
        if not sep or not name or not spec.strip():
            raise BadRequest(f"--map '{item}': expected input=col1,col2,... (patterns like f* too)")
        if name in maps:
            raise BadRequest(f"--map names input '{name}' twice")
        columns: list[str] = []
        for token in (t.strip() for t in spec.split(",")):
            if not token:
                continue
            if any(c in token for c in "*?["):
                matched = [c for c in column_names if fnmatch.fnmatchcase(c, token)]
                if not matched:
                    raise BadRequest(f"--map {name}: pattern '{token}' matches no column")
                columns.extend(matched)
            else:
                columns.append(token)
        maps[name] = columns
    return maps


def bind_inputs(
    signature: Signature, schema: Any, maps: Mapping[str, Sequence[str]]
) -> list[InputBinding]:
    """How every model input is built from the table; BadRequest when the table cannot feed it."""
    pa = require_pyarrow()
    model = f"model '{signature.model_name}'"
    names = {spec.name for spec in signature.inputs}
    unknown = [m for m in maps if m not in names]
    if unknown:
        raise BadRequest(
            f"--map names {', '.join(repr(u) for u in unknown)}, which {model} does not take; "
            f"its inputs are {', '.join(sorted(names))}"
        )
    columns = list(schema.names)
    bindings = []
    for spec in signature.inputs:
        where = f"{model} input '{spec.name}' ({spec.datatype} {list(spec.shape)})"
        if not spec.shape or spec.shape[0] != -1 or len(spec.shape) > 2:
            raise BadRequest(
                f"{where}: batch scoring needs inputs of shape [-1] or [-1, N] (a batch dimension "
                "and at most one feature dimension)"
            )
        width = spec.shape[1] if len(spec.shape) == 2 else None
        if spec.name in maps:
            chosen = list(maps[spec.name])
            missing = [c for c in chosen if c not in columns]
            if missing:
                raise BadRequest(
                    f"--map {spec.name}: no column {', '.join(repr(m) for m in missing)} in the "
                    f"table; columns are {', '.join(columns)}"
                )
        elif spec.name in columns:
            chosen = [spec.name]
        else:
            raise BadRequest(
                f"{where} has no column of that name in the table (columns: "
                f"{', '.join(columns)}); build it from columns with "
                f"--map {spec.name}=col1,col2,..."
            )
        types = [schema.field(c).type for c in chosen]
        if len(chosen) == 1 and _is_list(pa, types[0]):
            if width is None:
                raise BadRequest(f"{where} takes one value per row; column '{chosen[0]}' is a list")
            if width == -1:
                width = getattr(types[0], "list_size", -1)
                if width in (-1, None):
                    raise BadRequest(
                        f"{where}: the model does not fix the row width; feed it from a "
                        "fixed-size-list column or from named columns with --map"
                    )
            _check_element_type(pa, where, chosen[0], types[0].value_type, spec.datatype)
            bindings.append(InputBinding(spec.name, spec.datatype, "list", tuple(chosen), width))
            continue
        for c, t in zip(chosen, types, strict=True):
            _check_element_type(pa, where, c, t, spec.datatype)
        if width is None:
            if len(chosen) != 1:
                raise BadRequest(f"{where} takes one value per row; --map gives {len(chosen)}")
            bindings.append(InputBinding(spec.name, spec.datatype, "scalar", tuple(chosen), None))
            continue
        if width != -1 and len(chosen) != width:
            raise BadRequest(
                f"{where} takes {width} values per row; "
                + (
                    f"column '{chosen[0]}' holds one (map {width} columns with "
                    f"--map {spec.name}=col1,col2,...)"
                    if len(chosen) == 1
                    else f"--map gives {len(chosen)} columns"
                )
            )
        bindings.append(
            InputBinding(spec.name, spec.datatype, "columns", tuple(chosen), len(chosen))
        )
    return bindings


def needed_columns(bindings: Sequence[InputBinding]) -> list[str]:
    seen: dict[str, None] = {}
    for b in bindings:
        for c in b.columns:
            seen[c] = None
    return list(seen)


def _is_list(pa: Any, t: Any) -> bool:
    return bool(pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))


def _check_element_type(pa: Any, where: str, column: str, t: Any, datatype: str) -> None:
    types = pa.types
    text = types.is_string(t) or types.is_large_string(t)
    if datatype == BYTES:
        ok = text or types.is_binary(t) or types.is_large_binary(t) or types.is_null(t)
    else:
        ok = (
            text
            or types.is_integer(t)
            or types.is_floating(t)
            or types.is_boolean(t)
            or types.is_decimal(t)
            or types.is_null(t)
        )
    if not ok:
        raise BadRequest(f"{where}: column '{column}' has type {t}, which cannot become {datatype}")


# --- per chunk ----------------------------------------------------------------------------------


def map_chunk(bindings: Sequence[InputBinding], table: Any) -> MappedChunk:
    """The chunk's rows as model inputs; rows with a bad value are left out with their reason."""
    n = table.num_rows
    errors: dict[int, str] = {}
    full: dict[str, np.ndarray] = {}
    for b in bindings:
        if b.kind == "list":
            values = _list_values(table.column(b.columns[0]), b, n, errors)
        else:
            cols = [_values(table.column(c), b.datatype, c, errors) for c in b.columns]
            if b.kind == "scalar":
                values = cols[0]
            elif len(cols) == 1:
                values = cols[0].reshape(-1, 1)
            else:
                values = np.column_stack(cols)
        full[b.name] = values
    if not errors:
        return MappedChunk(full, np.arange(n))
    keep = np.ones(n, dtype=bool)
    keep[list(errors)] = False
    rows = np.flatnonzero(keep)
    return MappedChunk({k: v[rows] for k, v in full.items()}, rows, errors)


def _note(errors: dict[int, str], positions: Any, reason: Any) -> None:
    for i in positions:
        errors.setdefault(int(i), reason(int(i)) if callable(reason) else reason)


def _values(chunked: Any, datatype: str, column: str, errors: dict[int, str]) -> np.ndarray:
    arr = chunked.combine_chunks() if hasattr(chunked, "combine_chunks") else chunked
    if datatype == BYTES:
        return _bytes_values(arr, column, errors)
    return _numeric_values(arr, datatype, column, errors, lambda i: i)


def _bytes_values(arr: Any, column: str, errors: dict[int, str]) -> np.ndarray:
    values = arr.to_pylist()
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        if v is None:
            errors.setdefault(i, f"column '{column}' is null")
            out[i] = b""
        else:
            out[i] = v if isinstance(v, bytes) else str(v).encode()
    return out


def _numeric_values(
    arr: Any, datatype: str, column: str, errors: dict[int, str], row_of: Any
) -> np.ndarray:
    """`arr` as the datatype's dtype; bad elements noted under row_of(element index)."""
    pa = require_pyarrow()
    import pyarrow.compute as pc

    dtype = DATATYPE_TO_DTYPE[datatype]
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        arr = _parse_numbers(pa, pc, arr, column, errors, row_of)
    elif pa.types.is_decimal(t) or pa.types.is_null(t):
        arr = arr.cast(pa.float64())
    if arr.null_count:
        nulls = np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))
        _note(errors, (row_of(i) for i in nulls), f"column '{column}' is null")
        arr = arr.fill_null(False if pa.types.is_boolean(arr.type) else 0)
    values = arr.to_numpy(zero_copy_only=False)
    if dtype.kind in "iu" and values.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            whole = np.isfinite(values) & (np.floor(values) == values)
        for i in np.flatnonzero(~whole):
            errors.setdefault(
                row_of(int(i)),
                f"column '{column}': {values[i]!r} is not a whole number for {datatype}",
            )
        values = np.where(whole, values, 0)
    if dtype.kind in "iu" and values.dtype.kind in "iuf":
        info = np.iinfo(dtype)
        outside = (values < info.min) | (values > info.max)
        for i in np.flatnonzero(outside):
            errors.setdefault(
                row_of(int(i)), f"column '{column}': {values[i]!r} is out of range for {datatype}"
            )
        values = np.where(outside, 0, values)
    if dtype.kind == "b":
        return np.asarray(values != 0) if values.dtype.kind != "b" else values
    return values.astype(dtype, copy=False)


def _parse_numbers(
    pa: Any, pc: Any, arr: Any, column: str, errors: dict[int, str], row_of: Any
) -> Any:
    try:
        return pc.cast(arr, pa.float64())
    except pa.ArrowInvalid:
        pass
    # Some cell does not parse: find which, row by row (only chunks with a bad cell get here).
    parsed: list[float | None] = []
    for i, text in enumerate(arr.to_pylist()):
        if text is None:
            parsed.append(None)
            continue
        try:
            parsed.append(float(text))
        except ValueError:
            errors.setdefault(row_of(i), f"column '{column}': {text!r} is not a number")
            parsed.append(0.0)
    return pa.array(parsed, type=pa.float64())


def _list_values(chunked: Any, b: InputBinding, n: int, errors: dict[int, str]) -> np.ndarray:
    pa = require_pyarrow()
    import pyarrow.compute as pc

    column = b.columns[0]
    width = b.width or 0
    arr = chunked.combine_chunks()
    lengths = pc.list_value_length(arr).fill_null(-1).to_numpy(zero_copy_only=False)
    ok = lengths == width
    for i in np.flatnonzero(~ok):
        errors.setdefault(
            int(i),
            f"column '{column}' is null"
            if lengths[i] < 0
            else f"column '{column}' has {lengths[i]} values, input '{b.name}' takes {width}",
        )
    ok_rows = np.flatnonzero(ok)
    good = arr.filter(pa.array(ok)) if not ok.all() else arr
    flat = good.flatten()
    values = _numeric_values(
        flat, b.datatype, column, errors, lambda i: int(ok_rows[i // width]) if width else 0
    )
    out = np.zeros((n, width), dtype=values.dtype)
    if len(ok_rows):
        out[ok_rows] = values.reshape(len(ok_rows), width)
    return out
