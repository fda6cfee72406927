"""Versioned model repository: model.yaml schema, fsspec store, registration."""

from inferplane.repository.schema import Batching, ModelConfig, TensorDecl
from inferplane.repository.store import Repository, verify

__all__ = ["Batching", "ModelConfig", "Repository", "TensorDecl", "verify"]
