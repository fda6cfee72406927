"""A model repository on any fsspec URL: `<root>/<model>/<version>/{artifact files, model.yaml}`.

A version exists once its `model.yaml` exists: artifacts are written first and `model.yaml` last, so a
crashed registration leaves an invisible folder, never a half-readable version. Versions are
immutable: nothing here rewrites or deletes a version folder that has a `model.yaml`. Aliases live
in `<root>/<model>/aliases.yaml` (alias -> version).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fsspec
import yaml
from fsspec.implementations.local import LocalFileSystem

from inferplane.errors import BadRequest, IntegrityError, NotFound, RepositoryError, VersionTaken
from inferplane.repository.schema import (
    ALIAS_NAME,
    MODEL_YAML,
    ModelConfig,
    check_model_name,
    check_version,
    check_version_ref,
    model_name_problem,
)

ALIASES_YAML = "aliases.yaml"
_CHUNK = 1 << 20


def sha256_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


CLAIM = ".claim"  # a version folder's lock file (see Repository._claim)


class Repository:
    """Reads and writes model versions and aliases under one root URL."""

    def __init__(
        self, url: str, cache_dir: str | None = None, cache_size: int | None = None
    ) -> None:
        self.url = url
        try:
            fs, root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise RepositoryError(f"cannot open repository '{url}': {exc}") from None
        self.fs: fsspec.AbstractFileSystem = fs
        self.root = root.rstrip("/") if root != "/" else root
        self.is_local = isinstance(fs, LocalFileSystem)
        self._cache_dir = cache_dir
        self._cache_size = cache_size  # bytes the artifact cache is trimmed to; None: no limit

    # paths -------------------------------------------------------------------------------
    # Every path below the root is built by _model_path (a model's folder and what is in it),
    # so a name or version from a request, a command line or a model.yaml is checked once,
    # here, before anything is read or written.
    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _model_path(self, model: str, *parts: str) -> str:
        path = self._path(check_model_name(model), *parts)
        # The name rule already keeps `model` to one folder; this second check holds even for
        # a caller that slips a separator into `parts`. Lexical on purpose: a symlink that the
        # repository's owner put inside the root is followed as they meant it.
        normal = posixpath.normpath(path)
        if self.is_local:
            normal = os.path.abspath(normal)
        if not normal.startswith(self._root_prefix):
            raise BadRequest(f"model {model!r}: the path leaves the repository")
        return path

    @property
    def _root_prefix(self) -> str:
        root = os.path.abspath(self.root) if self.is_local else posixpath.normpath(self.root)
        return root if root.endswith("/") else root + "/"

    def version_path(self, model: str, version: int) -> str:
        return self._model_path(model, str(check_version(version)))

    # reading -----------------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(self.fs.exists(self.root))

    def list_models(self) -> list[str]:
        if not self.fs.exists(self.root):
            raise RepositoryError(f"repository '{self.url}' does not exist")
        names = []
        for entry in self.fs.ls(self.root, detail=True):
            name = posixpath.basename(entry["name"].rstrip("/"))
            if (
                entry["type"] == "directory"
                and model_name_problem(name) is None
                and self.list_versions(name)
            ):
                names.append(name)
        return sorted(names)

    def list_versions(self, model: str) -> list[int]:
        base = self._model_path(model)
        if not self.fs.exists(base):
            return []
        versions = []
        for entry in self.fs.ls(base, detail=True):
            name = posixpath.basename(entry["name"].rstrip("/"))
            if (
                entry["type"] == "directory"
                and name.isascii()  # "²".isdigit() holds, yet int("²") raises
                and name.isdigit()
                and int(name) > 0
                and self.fs.exists(self._model_path(model, name, MODEL_YAML))
            ):
                versions.append(int(name))
        return sorted(versions)

    def read_config(self, model: str, version: int) -> ModelConfig:
        path = posixpath.join(self.version_path(model, version), MODEL_YAML)
        try:
            with self.fs.open(path, "rb") as fh:
                text = fh.read().decode("utf-8")
        except FileNotFoundError:
            raise NotFound(f"model '{model}' has no version {version}") from None
        config = ModelConfig.from_yaml(text, f"{model}/{version}/{MODEL_YAML}")
        if config.name != model or config.version != version:
            raise RepositoryError(
                f"{model}/{version}/{MODEL_YAML} says {config.name} version {config.version}"
            )
        return config

    def iter_configs(self, models: list[str] | None = None) -> Iterator[ModelConfig]:
        for model in models if models is not None else self.list_models():
            for version in self.list_versions(model):
                yield self.read_config(model, version)

    # aliases -----------------------------------------------------------------------------
    def aliases(self, model: str) -> dict[str, int]:
        path = self._model_path(model, ALIASES_YAML)
        if not self.fs.exists(path):
            return {}
        with self.fs.open(path, "rb") as fh:
            text = fh.read()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise RepositoryError(f"{model}/{ALIASES_YAML}: not valid YAML: {exc}") from None
        except RecursionError:  # PyYAML recurses once per nesting level
            raise RepositoryError(f"{model}/{ALIASES_YAML}: nested too deeply") from None
        if not isinstance(data, dict):
            raise RepositoryError(f"{model}/{ALIASES_YAML}: expected a mapping alias -> version")
        try:
            return {str(k): int(v) for k, v in data.items()}
        except (TypeError, ValueError):
            raise RepositoryError(
                f"{model}/{ALIASES_YAML}: every alias maps to a version number"
            ) from None

    def set_alias(self, model: str, alias: str, version: int) -> None:
        if not ALIAS_NAME.match(alias):
            raise RepositoryError(
                f"alias {alias!r}: use a letter then letters, digits, '_', '-' (at most 64)"
            )
        if version not in self.list_versions(model):
            raise NotFound(f"model '{model}' has no version {version}")
        aliases = self.aliases(model)
        aliases[alias] = version
        self._write_aliases(model, aliases)

    def remove_alias(self, model: str, alias: str) -> None:
        aliases = self.aliases(model)
        if alias not in aliases:
            raise NotFound(f"model '{model}' has no alias '{alias}'")
        del aliases[alias]
        self._write_aliases(model, aliases)

    def _write_aliases(self, model: str, aliases: dict[str, int]) -> None:
        text = yaml.safe_dump(dict(sorted(aliases.items())), sort_keys=False)
        self._write_text(self._model_path(model, ALIASES_YAML), text)

    def resolve_version(self, model: str, ref: str | int | None) -> int:
        """A version number, an alias, or None (`production` alias if set, else the latest)."""
        if ref is not None:
            ref = check_version_ref(ref)
        versions = self.list_versions(model)
        if not versions:
            raise NotFound(f"unknown model '{model}'")
        if ref is None:
            return self.aliases(model).get("production", versions[-1])
        text = str(ref)
        if isinstance(ref, int):
            if int(text) not in versions:
                raise NotFound(f"model '{model}' has no version {text}")
            return int(text)
        aliases = self.aliases(model)
        if text not in aliases:
            raise NotFound(f"model '{model}' has no version or alias '{text}'")
        return aliases[text]

    # writing -----------------------------------------------------------------------------
    def _write_text(self, path: str, text: str) -> None:
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        if self.is_local:
            # Atomic on local disk: readers never see a half-written file.
            tmp = f"{path}.tmp-{os.getpid()}"
            Path(tmp).write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        else:
            with self.fs.open(path, "wb") as fh:
                fh.write(text.encode("utf-8"))

    def add_version(self, config: ModelConfig, files: dict[str, str]) -> ModelConfig:
        """Copy `files` (name in the version folder -> local source path) in, then commit.

        Checksums are computed from the copies as written, so what is recorded is what is stored.
        """
        vdir = self.version_path(config.name, config.version)
        if self.fs.exists(posixpath.join(vdir, MODEL_YAML)):
            raise VersionTaken(
                f"model '{config.name}' version {config.version} already exists; "
                "versions are immutable"
            )
        self.fs.makedirs(vdir, exist_ok=True)
        self._claim(config, vdir)
        sums: dict[str, str] = {}
        for rel, src in sorted(files.items()):
            dest = posixpath.join(vdir, rel)
            self.fs.makedirs(posixpath.dirname(dest), exist_ok=True)
            self.fs.put_file(src, dest)
            sums[rel] = sha256_file(self.fs, dest)
        committed = config.model_copy(update={"sha256": sums})
        self._write_text(posixpath.join(vdir, MODEL_YAML), committed.to_yaml())
        return committed

    def _claim(self, config: ModelConfig, vdir: str) -> None:
        """Take the version number before writing into its folder: two registrations racing for
        it would otherwise interleave their files. The claim is an exclusive create (O_EXCL on
        disk, a conditional put on S3); it stays behind, so a crashed registration's number is
        never reused for different files."""
        try:
            with self.fs.open(posixpath.join(vdir, CLAIM), "xb") as fh:
                fh.write(f"{os.getpid()}@{socket.gethostname()}\n".encode())
        except FileExistsError:
            raise VersionTaken(
                f"model '{config.name}' version {config.version} is taken by another "
                "registration (running, or one that crashed before it finished)"
            ) from None

    # loading -----------------------------------------------------------------------------
    def fetch(self, config: ModelConfig) -> str:
        """A local folder holding the version's files: the folder itself on local disk, else a
        cache copy; cached files are reused only when their sha256 matches model.yaml."""
        vdir = self.version_path(config.name, config.version)
        if self.is_local:
            return vdir
        base = self._cache_dir or os.path.join(tempfile.gettempdir(), "inferplane-cache")
        key = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        local = os.path.join(base, key, config.name, str(config.version))
        for rel in config.sha256:
            src, dest = posixpath.join(vdir, rel), os.path.join(local, rel)
            try:
                size = self.fs.size(src)
            except FileNotFoundError:
                raise IntegrityError(
                    f"{config.name} v{config.version}: artifact file '{rel}' is missing"
                ) from None
            if (
                os.path.exists(dest)
                and os.path.getsize(dest) == size
                and sha256_file(LocalFileSystem(), dest) == config.sha256[rel]
            ):
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = f"{dest}.part-{os.getpid()}"
            self.fs.get_file(src, tmp)
            os.replace(tmp, dest)  # a crashed download never looks like a cached copy
        return local


def verify(config: ModelConfig, local_dir: str) -> None:
    """Raise IntegrityError unless every recorded artifact file in `local_dir` matches its sha256."""
    artifact = config.artifact.rstrip("/")
    if artifact not in config.sha256 and not any(
        k.startswith(artifact + "/") for k in config.sha256
    ):
        raise IntegrityError(
            f"{config.name} v{config.version}: model.yaml records no sha256 for artifact "
            f"'{config.artifact}'"
        )
    local = LocalFileSystem()
    for rel, expected in config.sha256.items():
        path = os.path.join(local_dir, rel)
        if not os.path.exists(path):
            raise IntegrityError(
                f"{config.name} v{config.version}: artifact file '{rel}' is missing"
            )
        actual = sha256_file(local, path)
        if actual != expected:
            raise IntegrityError(
                f"{config.name} v{config.version}: sha256 of '{rel}' is {actual[:12]}..., "
                f"model.yaml records {expected[:12]}...; refusing to load a corrupt or tampered "
                "artifact"
            )
