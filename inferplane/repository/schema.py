"""The `model.yaml` of one model version: what every other layer reads about a model."""

from __future__ import annotations

import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inferplane.errors import RepositoryError
from inferplane.tensors import DATATYPE_TO_DTYPE, TensorSpec

RUNTIMES = ("onnx", "sklearn", "xgboost", "lightgbm", "torch", "python")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ALIAS_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
MODEL_YAML = "model.yaml"


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

    @field_validator("outputs", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: {"source": s} if isinstance(s, str) else s for k, s in v.items()}
        return v


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

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not MODEL_NAME.match(v):
            raise ValueError("model names use letters, digits, '_', '.', '-' (max 128)")
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
