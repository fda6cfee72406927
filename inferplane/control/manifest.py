"""The platform file `inferplane apply -f` reads: models (versions, aliases) and services.

```yaml
apiVersion: inferplane.dev/v1
kind: Platform
repository: ./models                # optional; --repository / INFERPLANE_REPOSITORY win
prune: false                        # delete listed models' versions that the file leaves out
models:
  tabular:
    versions:
      1: {artifact: artifacts/tabular_v1.onnx, batching: {max_batch_size: 32}}
    aliases: {production: 1}
services: {...}                     # exactly the `services:` of services.yaml
audit: {...}                        # optional: the `audit:` of services.yaml
```

Everything is checked strictly (unknown keys are errors naming the field's path) before the
reconciler (`inferplane.control.reconcile`) looks at the repository. docs/apply.md has every field.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from inferplane.errors import BadRequest
from inferplane.repository.schema import (
    ALIAS_NAME,
    Batching,
    Resources,
    TensorDecl,
    describe,
    model_name_problem,
    relative_file_problem,
)
from inferplane.routing.policy import Policy, parse_policy

API_VERSION = "inferplane.dev/v1"
KIND = "Platform"
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)\Z")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _digest(value: str) -> str:
    text = value.strip().lower().removeprefix("sha256:")
    if not _SHA256.match(text):
        raise ValueError(f"{value[:80]!r} is not a sha256 digest (64 hex digits)")
    return text


class VersionSpec(_Strict):
    """One version as the file declares it: where its artifact is and the settings that
    `inferplane models register` would write into its model.yaml."""

    artifact: str = Field(min_length=1)  # a path (relative to the file) or an fsspec URL
    # A digest for a file artifact; for a folder artifact, file (relative to the folder) -> digest.
    sha256: str | dict[str, str] | None = None
    runtime: Literal["onnx", "sklearn", "xgboost", "lightgbm", "torch", "python"] | None = None
    inputs: list[TensorDecl] | None = None
    outputs: list[TensorDecl] | None = None
    batching: Batching | None = None
    instances: int = Field(default=1, ge=1)
    instance_kind: Literal["auto", "thread", "process", "loop"] = "auto"
    device: str = "cpu"
    options: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    residency: Literal["pinned", "on_demand"] | None = None
    idle_unload_s: float | None = Field(default=None, gt=0)
    resources: Resources | None = None

    @field_validator("sha256", mode="before")
    @classmethod
    def _text(cls, v: Any) -> Any:
        # YAML reads an unquoted digest of digits only as a number (and 1e5… as a float)
        values = v.values() if isinstance(v, dict) else [v]
        if any(isinstance(d, int | float) for d in values):
            raise ValueError("a sha256 digest is text: quote it (YAML read it as a number)")
        return v

    @field_validator("sha256")
    @classmethod
    def _digests(cls, v: str | dict[str, str] | None) -> str | dict[str, str] | None:
        if v is None or isinstance(v, str):
            return None if v is None else _digest(v)
        if not v:
            raise ValueError("give at least one file -> digest, or leave sha256 out")
        out: dict[str, str] = {}
        for rel, digest in v.items():
            problem = relative_file_problem(rel)
            if problem is not None:
                raise ValueError(f"file {problem}")
            out[rel.rstrip("/")] = _digest(digest)
        return out

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError("device is cpu, cuda or cuda:N")
        return v

    @field_validator("inputs", "outputs")
    @classmethod
    def _tensors(cls, v: list[TensorDecl] | None) -> list[TensorDecl] | None:
        if v is not None:
            names = [t.name for t in v]
            if not v:
                raise ValueError("at least one tensor is required (or leave it out)")
            if len(set(names)) != len(names):
                raise ValueError("tensor names must be unique")
        return v

    def digests(self) -> dict[str, str] | None:
        """The declared sha256 as artifact content: {"": digest} for a file, else
        {file inside the folder: digest}."""
        if self.sha256 is None:
            return None
        return {"": self.sha256} if isinstance(self.sha256, str) else dict(self.sha256)


class ModelSpec(_Strict):
    """One model: its versions (number -> spec) and the complete set of its aliases."""

    versions: dict[int, VersionSpec] = Field(default_factory=dict)
    aliases: dict[str, int] = Field(default_factory=dict)

    @field_validator("versions")
    @classmethod
    def _numbers(cls, v: dict[int, VersionSpec]) -> dict[int, VersionSpec]:
        for number in v:
            if number < 1 or len(str(number)) > 18:
                raise ValueError(f"version {number} is out of range (1 to 18 digits)")
        return dict(sorted(v.items()))

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: dict[str, int]) -> dict[str, int]:
        for alias, number in v.items():
            if not ALIAS_NAME.match(alias):
                raise ValueError(
                    f"alias {alias[:80]!r}: use a letter then letters, digits, '_', '-' "
                    "(at most 64)"
                )
            if number < 1:
                raise ValueError(f"alias {alias!r}: {number} is not a version number")
        return v


class Platform(_Strict):
    api_version: Literal["inferplane.dev/v1"] = Field(alias="apiVersion")
    kind: Literal["Platform"]
    repository: str | None = Field(default=None, min_length=1)
    prune: bool = False
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    services: dict[str, Any] | None = None  # validated by routing.policy.parse_policy
    audit: dict[str, Any] | None = None

    @field_validator("models")
    @classmethod
    def _names(cls, v: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        for name in v:
            problem = model_name_problem(name)
            if problem is not None:
                raise ValueError(problem)
        return v


@dataclass
class Manifest:
    """A checked platform file: the parsed document, where relative paths start, and the policy
    it declares (None when the file leaves services.yaml alone)."""

    platform: Platform
    source: str  # the file's name, for messages
    base_dir: str  # relative artifact and repository paths start here
    policy: Policy | None
    services_doc: dict[str, Any] | None  # what is written to services.yaml, as the file has it

    @property
    def models(self) -> dict[str, ModelSpec]:
        return self.platform.models


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: construct_mapping says so below
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice", key_node.start_mark
            )
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def parse_manifest(text: str, source: str = "platform file", base_dir: str = ".") -> Manifest:
    """A checked Manifest, or BadRequest naming the file, the field's path and the problem."""
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise BadRequest(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise BadRequest(f"{source}: nested too deeply to be a platform file") from None
    if not isinstance(doc, dict):
        raise BadRequest(
            f"{source}: expected a mapping with apiVersion: {API_VERSION} and kind: {KIND}"
        )
    try:
        platform = Platform.model_validate(doc)
    except ValidationError as exc:
        raise BadRequest(f"{source}: {describe(exc).replace('Value error, ', '')}") from None
    policy: Policy | None = None
    services_doc: dict[str, Any] | None = None
    if platform.services is not None or platform.audit is not None:
        services_doc = {"services": platform.services or {}}
        if platform.audit is not None:
            services_doc["audit"] = platform.audit
        # The same checks `serve` makes of services.yaml; messages name services.<name>...
        policy = parse_policy(yaml.safe_dump(services_doc, sort_keys=False), source)
    return Manifest(platform, source, base_dir, policy, services_doc)


def load_manifest(path: str) -> Manifest:
    """Read and check the platform file at `path` ("-" reads standard input)."""
    if path == "-":
        return parse_manifest(sys.stdin.read(), "<stdin>", os.getcwd())
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise BadRequest(f"platform file {path} does not exist") from None
    except UnicodeDecodeError:
        raise BadRequest(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise BadRequest(f"cannot read platform file {path}: {exc.strerror or exc}") from None
    return parse_manifest(text, path, os.path.dirname(os.path.abspath(path)))
