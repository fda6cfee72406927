"""The `model.yaml` of one model version: what every other layer reads about a model."""

from __future__ import annotations

import re
import string
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inferplane.errors import BadRequest, RepositoryError
from inferplane.sizes import parse_size
from inferplane.tensors import DATATYPE_TO_DTYPE, TensorSpec

RUNTIMES = ("onnx", "sklearn", "xgboost", "lightgbm", "torch", "python")
MODEL_NAME_MAX = 128
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_.-")
# \Z, not $: `$` also matches before a trailing newline, and "prod\n" is no alias.
ALIAS_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}\Z")
MODEL_YAML = "model.yaml"


def _shown(text: str) -> str:
    """User text quoted for a message or a log line: escaped (no control characters, newlines or
    terminal sequences reach a log) and cut short."""
    return ascii(text[:64] + ("..." if len(text) > 64 else ""))


def model_name_problem(name: str) -> str | None:
    """Why `name` cannot be a model name, or None when it can.

    The one rule for every model name, whether it comes from a request (REST path, gRPC field),
    the command line or a model.yaml: a model is one folder directly under the repository root,
    so a name is a single path component from a small alphabet. This is Triton's
    ValidateModelName (no '..', no '/') made positive: a list of what is allowed instead of the
    few tricks known today. Names are taken as given, never percent-decoded again, so '%' is
    refused like any character outside the alphabet.
    """
    if not name:
        return "model name is empty"
    if len(name) > MODEL_NAME_MAX:
        return f"model name is {len(name)} characters long; the limit is {MODEL_NAME_MAX}"
    for bad, what in (("\0", "a NUL byte"), ("/", "'/'"), ("\\", "'\\'"), ("..", "'..'")):
        if bad in name:
            return f"model name {_shown(name)} contains {what}; a name is one folder name"
    for ch in name:
        if ch not in _NAME_CHARS:
            return (
                f"model name {_shown(name)} contains {ch!a}; use letters, digits, '_', "
                f"'.', '-' (at most {MODEL_NAME_MAX})"
            )
    if not name[0].isalnum():
        return f"model name {_shown(name)} must start with a letter or a digit"
    return None


def check_model_name(name: str) -> str:
    """`name`, or BadRequest (400, gRPC INVALID_ARGUMENT) saying what is wrong with it."""
    if not isinstance(name, str):
        raise BadRequest(f"model name must be a string, not {type(name).__name__}")
    problem = model_name_problem(name)
    if problem is not None:
        raise BadRequest(problem)
    return name


def check_version(version: int | str) -> int:
    """A version number (a positive integer, or its ASCII digits), or BadRequest."""
    if isinstance(version, bool):  # bool is an int subclass: True would be version 1
        raise BadRequest(f"version {version!r} is not a version number")
    if isinstance(version, int):
        number = version
    elif isinstance(version, str) and version.isascii() and version.isdigit():
        number = int(version)
    else:
        raise BadRequest(f"version {_shown(str(version))} is not a positive integer")
    if number < 1 or len(str(number)) > 18:
        raise BadRequest(f"version {number} is out of range (1 to 18 digits)")
    return number


def check_version_ref(ref: int | str) -> int | str:
    """A version reference: its number (digits) or an alias name; BadRequest otherwise."""
    if isinstance(ref, str) and not (ref.isascii() and ref.isdigit()):
        if not ALIAS_NAME.match(ref):
            raise BadRequest(
                f"version {_shown(ref)} is neither a version number nor an alias (a letter, then "
                "letters, digits, '_', '-'; at most 64)"
            )
        return ref
    return check_version(ref)


def relative_file_problem(path: str) -> str | None:
    """Why `path` cannot name a file inside a version folder (model.yaml's artifact, sha256 keys),
    or None: relative, no '..' or empty components, no backslash or NUL, so that a model.yaml
    cannot point the loader or the download cache outside the version."""
    if not path:
        return "empty path"
    if "\0" in path or "\\" in path:
        return f"{_shown(path)} contains a NUL byte or a backslash"
    if path.startswith("/"):
        return f"{_shown(path)} is absolute; paths are relative to the version folder"
    parts = path.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        return f"{_shown(path)} has an empty, '.' or '..' component"
    return None


def describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
    )


class TensorDecl(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    datatype: str
    shape: list[int]

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, v: str) -> str:
        if v not in DATATYPE_TO_DTYPE:
            raise ValueError(
                f"unknown datatype '{v}'; expected one of {', '.join(DATATYPE_TO_DTYPE)}"
            )
        return v

    @field_validator("shape")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if any(d < -1 or d == 0 for d in v):
            raise ValueError("dimensions are positive integers or -1 (variable)")
        return v

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.datatype, list(self.shape))


class Batching(BaseModel):
    """Dynamic batching settings (the batcher itself arrives with the engine's next stage)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    max_batch_size: int = Field(default=32, ge=1)
    max_queue_delay_us: int = Field(default=1000, ge=0)
    preferred_batch_sizes: list[int] = Field(default_factory=list)


class QueuePolicy(BaseModel):
    """Overload protection: how much work may wait for this version, and for how long."""

    model_config = ConfigDict(extra="forbid")

    max_size: int = Field(default=1024, ge=1)  # waiting requests; beyond: 503 at once
    default_timeout_us: int = Field(default=0, ge=0)  # 0 = none unless the request sets one
    priority_levels: int = Field(default=1, ge=1, le=16)  # 1 = highest


class OptimizedOutput(BaseModel):
    """Where one declared output comes from in the optimized graph."""

    model_config = ConfigDict(extra="forbid")

    source: str  # the output's name in the optimized graph
    column: int | None = Field(default=None, ge=0)  # take this column of a [N, K] output


class Optimized(BaseModel):
    """A faster equivalent of `artifact`, made and checked by `models register --optimize`.

    Fixed at registration like the rest of the version: `enabled` records whether the check passed
    and the optimized artifact was the faster one. The declared signature never changes; `outputs`
    maps every declared output to the optimized graph's output (a plain string is the source name).
    """

    model_config = ConfigDict(extra="forbid")

    artifact: str
    runtime: Literal["onnx"] = "onnx"
    enabled: bool = True
    outputs: dict[str, OptimizedOutput]

    @field_validator("artifact")
    @classmethod
    def _artifact(cls, v: str) -> str:
        problem = relative_file_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("outputs", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: {"source": s} if isinstance(s, str) else s for k, s in v.items()}
        return v


class Resources(BaseModel):
    """What a version needs from the server, as a hint before it has been measured."""

    model_config = ConfigDict(extra="forbid")

    # Resident memory once loaded (bytes, or a size such as "512MiB"). The server's memory budget
    # admits a version by this figure until a load has measured the real footprint.
    memory: int | None = None

    @field_validator("memory", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        return None if v is None else parse_size(v)


class ModelConfig(BaseModel):
    """One immutable model version."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: int = Field(ge=1)
    runtime: Literal["onnx", "sklearn", "xgboost", "lightgbm", "torch", "python"]
    artifact: str
    sha256: dict[str, str] = Field(default_factory=dict)
    inputs: list[TensorDecl]
    outputs: list[TensorDecl]
    batching: Batching | None = None
    instances: int = Field(default=1, ge=1)
    # thread: instances share this process (right for runtimes that release the GIL); process:
    # one worker process each; loop: executions run on the event loop (models that take
    # microseconds); auto: the loop for one instance whose full batch measured within the loop
    # budget at load, processes for GIL-holding runtimes (python, sklearn) when instances > 1,
    # threads otherwise.
    instance_kind: Literal["auto", "thread", "process", "loop"] = "auto"
    queue: QueuePolicy = Field(default_factory=QueuePolicy)
    device: str = "cpu"
    options: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    optimized: Optimized | None = None  # set by `models register --optimize`
    # Residency (docs/serving.md "Many models"): pinned = loaded at start, never evicted;
    # on_demand = loaded by its first request, evictable. Unset: the server's --load decides.
    residency: Literal["pinned", "on_demand"] | None = None
    idle_unload_s: float | None = Field(default=None, gt=0)  # unload after this long unused
    resources: Resources | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        problem = model_name_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("artifact")
    @classmethod
    def _artifact(cls, v: str) -> str:
        problem = relative_file_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("sha256")
    @classmethod
    def _sha256_files(cls, v: dict[str, str]) -> dict[str, str]:
        for rel in v:
            problem = relative_file_problem(rel)
            if problem is not None:
                raise ValueError(problem)
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.match(r"^(cpu|cuda(:\d+)?)$", v):
            raise ValueError("device is cpu, cuda or cuda:N")
        return v

    @field_validator("inputs", "outputs")
    @classmethod
    def _unique(cls, v: list[TensorDecl]) -> list[TensorDecl]:
        names = [t.name for t in v]
        if len(set(names)) != len(names):
            raise ValueError("tensor names must be unique")
        if not v:
            raise ValueError("at least one tensor is required")
        return v

    @model_validator(mode="after")
    def _one_loop_instance(self) -> ModelConfig:
        if self.instance_kind == "loop" and self.instances != 1:
            raise ValueError(
                "instance_kind loop runs one execution at a time on the event loop; "
                "set instances: 1, or use thread/process for several instances"
            )
        return self

    @property
    def memory_hint(self) -> int | None:
        """`resources.memory` in bytes, when model.yaml gives one."""
        return self.resources.memory if self.resources is not None else None

    @property
    def max_batch_size(self) -> int:
        """Triton's meaning: 0 = no batch dimension, else the largest batch one execution takes.

        Declaring `batching` says the first dimension is the batch; `enabled: false` keeps that
        meaning and only switches the dynamic batcher off.
        """
        return self.batching.max_batch_size if self.batching is not None else 0

    def input_specs(self) -> list[TensorSpec]:
        return [t.spec() for t in self.inputs]

    def output_specs(self) -> list[TensorSpec]:
        return [t.spec() for t in self.outputs]

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml(cls, text: str, where: str) -> ModelConfig:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RepositoryError(f"{where}: not valid YAML: {exc}") from None
        except RecursionError:  # PyYAML recurses once per nesting level
            raise RepositoryError(f"{where}: nested too deeply to be a model.yaml") from None
        if not isinstance(data, dict):
            raise RepositoryError(f"{where}: expected a mapping at the top level")
        return cls.checked(where, **data)

    @classmethod
    def checked(cls, where: str, **fields: Any) -> ModelConfig:
        """Validate, turning pydantic's report into one RepositoryError naming each field."""
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            raise RepositoryError(f"{where}: {describe(exc)}") from None
