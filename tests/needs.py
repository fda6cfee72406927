"""Imports a test cannot run without: missing means a failure that says what to install, never a
silent skip."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def need(module: str, install: str = "-e '.[dev]'") -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"this test needs {module}: pip install {install} ({exc})", pytrace=False)
