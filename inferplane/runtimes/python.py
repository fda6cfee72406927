"""The escape hatch: a user's `Model` class in a `.py` file, or in a folder's `model.py`.

    class Model:
        def load(self, path, options):  # optional; `options` optional too
            ...
        def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            ...
        def unload(self):  # optional
            ...

`load` gets the folder holding the code, so that the model can open files beside it.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from inferplane.errors import InternalError, RepositoryError
from inferplane.runtimes.base import Runtime, as_declared

ENTRY = "model.py"


def _import(path: str, module_name: str) -> ModuleType:
    """Import a user's file with its folder on sys.path, so that helpers beside it import too.

    Helper modules from that folder are dropped from sys.modules afterwards: the next model (or
    the next version of this one) may ship a different `helpers.py` under the same name.
    """
    folder = os.path.dirname(path)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RepositoryError(f"cannot import '{path}' as Python code")
    module = importlib.util.module_from_spec(spec)
    # Registered before running: dataclasses and pickle look the module up by name.
    sys.modules[module_name] = module
    sys.path.insert(0, folder)
    before = set(sys.modules)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise RepositoryError(f"importing '{path}' failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(folder)
        prefix = os.path.join(folder, "")
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None) or ""
            if file.startswith(prefix):
                del sys.modules[name]
    return module


class PythonRuntime(Runtime):
    name = "python"
    platform = "python"
    releases_gil = False
    loop_safe = False  # user code may wait on I/O
    artifact_suffixes = (".py",)

    def load(self) -> None:
        path = self.artifact_path
        file = os.path.join(path, ENTRY) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise RepositoryError(f"python model '{self.config.name}': '{file}' does not exist")
        safe = re.sub(r"\W", "_", self.config.name)
        self._module = _import(file, f"inferplane_user_{safe}_{self.config.version}")
        cls = getattr(self._module, "Model", None)
        if not inspect.isclass(cls):
            self._forget_module()
            raise RepositoryError(
                f"'{file}' defines no class Model; the python runtime needs a class Model with "
                "predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]"
            )
        self.model: Any = cls()
        load = getattr(self.model, "load", None)
        if callable(load):
            folder = os.path.dirname(file)
            options = dict(self.config.options)
            args: tuple[Any, ...] = (folder, options)
            try:
                inspect.signature(load).bind(*args)
            except TypeError:
                args = (folder,)
            load(*args)

    def predict(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        results = self.model.predict(dict(inputs))
        if not isinstance(results, dict):
            raise InternalError(
                f"python model '{self.config.name}': Model.predict returned "
                f"{type(results).__name__}, expected a dict of output name -> array"
            )
        names = list(outputs) if outputs else [o.name for o in self.config.outputs]
        missing = [n for n in names if n not in results]
        if missing:
            raise InternalError(
                f"python model '{self.config.name}': Model.predict returned no "
                f"{', '.join(missing)} (it returned {', '.join(map(str, results)) or 'nothing'})"
            )
        return as_declared(self.config, results, names)

    def unload(self) -> None:
        unload = getattr(getattr(self, "model", None), "unload", None)
        if callable(unload):
            unload()
        self.model = None
        self._forget_module()

    def _forget_module(self) -> None:
        # Another instance of the same version may have imported the file again since.
        module: ModuleType | None = getattr(self, "_module", None)
        name = module.__name__ if module is not None else ""
        if module is not None and sys.modules.get(name) is module:
            del sys.modules[name]

    @classmethod
    def sniff(cls, artifact_path: str) -> bool:
        if os.path.isdir(artifact_path):
            return os.path.isfile(os.path.join(artifact_path, ENTRY))
        return artifact_path.endswith(cls.artifact_suffixes)
