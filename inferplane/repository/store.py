"""A model repository on any fsspec URL: `<root>/<model>/<version>/{artifact files, model.yaml}`.

A version exists once its `model.yaml` exists: artifacts are written first and `model.yaml` last, so a
crashed registration leaves an invisible folder, never a half-readable version. Versions are
immutable: nothing here rewrites a version folder that has a `model.yaml`; `delete_version` (used
by `inferplane apply --prune`) removes a whole version, `model.yaml` first. Aliases live in
`<root>/<model>/aliases.yaml` (alias -> version).

Listings are recursive (`fs.find`: on S3 one paginated ListObjects for the whole tree), so
`list_models`, `index` and `catalogue` cost a few requests whatever the number of models. A
remote version is loaded from the machine's artifact cache (`inferplane.repository.cache`).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import fsspec
import yaml
from fsspec.implementations.local import LocalFileSystem

from inferplane.errors import (
    BadRequest,
    InferplaneError,
    IntegrityError,
    NotFound,
    RepositoryError,
    VersionTaken,
)
from inferplane.repository.cache import ArtifactCache
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
_READERS = 32  # model.yaml / aliases.yaml reads in flight at once on a remote store

# Where fetch_with_source found a version's files: read in place, a cached copy, downloaded now.
FetchSource = Literal["local", "cache", "remote"]


@dataclass
class CatalogueEntry:
    """What the repository holds for one model: its readable versions (ascending), its aliases,
    and one message per version (or aliases file) that could not be read."""

    configs: list[ModelConfig] = field(default_factory=list)
    aliases: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def versions(self) -> list[int]:
        return [c.version for c in self.configs]


@dataclass
class _Listing:
    """What one recursive listing found: model -> version -> model.yaml path, and the models
    with an aliases.yaml (model -> its path)."""

    versions: dict[str, dict[int, str]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # path -> a tag that changes with content

    def merge(self, other: _Listing) -> None:
        self.versions.update(other.versions)
        self.aliases.update(other.aliases)
        self.tags.update(other.tags)


# Listing fields that change whenever an object's bytes do (S3/Azure ETag, GCS md5Hash and
# generation); times are not among them: a rewrite within a clock tick would keep its time.
_CONTENT_TAGS = ("ETag", "etag", "md5Hash", "generation")


def _content_tag(info: dict[str, Any]) -> str | None:
    parts = [str(info[k]) for k in _CONTENT_TAGS if info.get(k)]
    return f"{info.get('size')}:{':'.join(parts)}" if parts else None


def _version_folder(name: str) -> int | None:
    """The version a folder name stands for, or None: positive ASCII digits as `str(n)` writes
    them ("01" would be listed as 1 yet read_config(1) opens "1/"), at most 18 of them."""
    # "²".isdigit() holds, yet int("²") raises
    if not (name.isascii() and name.isdigit()) or len(name) > 18:
        return None
    number = int(name)
    return number if number > 0 and str(number) == name else None


def write_text(fs: fsspec.AbstractFileSystem, path: str, text: str) -> None:
    """Write a small text file whole: atomic on local disk (readers never see half of it); an
    object store's PUT is whole by nature."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        Path(tmp).write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as fh:
            fh.write(text.encode("utf-8"))


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
        # Remote versions are read from a local copy; a local repository is read in place.
        self.cache: ArtifactCache | None = None
        # What a catalogue made of each model.yaml (a ModelConfig) and aliases.yaml (a dict), by
        # path, with the content tag the listing gave the file: the next catalogue reads and
        # parses only what changed (remote stores only; a local read costs next to nothing).
        self._parsed: dict[str, tuple[str, Any]] = {}
        if not self.is_local:
            base = cache_dir or os.path.join(tempfile.gettempdir(), "inferplane-cache")
            self.cache = ArtifactCache(base, cache_size)  # cache_size None: never trimmed

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
        return sorted(self._list(self.root).versions)

    def list_versions(self, model: str) -> list[int]:
        return sorted(self._list(self._model_path(model)).versions.get(model, {}))

    def index(self, models: list[str] | None = None) -> dict[str, list[int]]:
        """Model -> its versions (ascending), from the listing alone: no file is read, so this is
        what a server can show at once while `catalogue` reads the model.yaml files. A version
        listed here may still turn out unreadable. With `models`, only those (each one's folder
        listed once; a name that is no model name, or has no version, is left out)."""
        listing, names = self._listing(models)
        return {n: sorted(listing.versions[n]) for n in names if n in listing.versions}

    def _listing(self, models: list[str] | None) -> tuple[_Listing, list[str]]:
        if models is None:
            listing = self._list(self.root)
            return listing, sorted(listing.versions)
        listing, names = _Listing(), list(dict.fromkeys(models))
        for name in names:
            if model_name_problem(name) is None:
                listing.merge(self._list(self._model_path(name)))
        return listing, names

    def _list(self, path: str) -> _Listing:
        """One recursive listing of `path` (the root or a model's folder): on S3 one paginated
        ListObjects for the whole tree instead of a request per model and version."""
        try:
            found: dict[str, dict[str, Any]] = self.fs.find(path, detail=True)
        except FileNotFoundError:
            found = {}
        finally:
            self._forget_listings(path)
        if not found and path == self.root and not self.fs.exists(self.root):
            raise RepositoryError(f"repository '{self.url}' does not exist")
        listing = _Listing()
        prefix = self._root_prefix if self.is_local else self.root.rstrip("/") + "/"
        for file, info in found.items():
            file = str(file)
            full = os.path.abspath(file) if self.is_local else file
            if not full.startswith(prefix):
                continue
            parts = full[len(prefix) :].split("/")
            if model_name_problem(parts[0]) is not None:
                continue
            if len(parts) == 2 and parts[1] == ALIASES_YAML:
                listing.aliases[parts[0]] = file
            elif len(parts) == 3 and parts[2] == MODEL_YAML:
                version = _version_folder(parts[1])
                if version is None:
                    continue
                listing.versions.setdefault(parts[0], {})[version] = file
            else:
                continue
            tag = None if self.is_local else _content_tag(info)
            if tag is not None:
                listing.tags[file] = tag
        return listing

    def _forget_listings(self, path: str) -> None:
        """Drop the filesystem's cached directory listings at and below `path`. s3fs keeps every
        listing it makes (find fills it for the whole tree) and answers exists/open from it, so a
        version another process registers later would stay invisible to this one."""
        cache = getattr(self.fs, "dircache", None)
        if not cache:
            return
        below = path.rstrip("/") + "/"
        for key in list(cache):
            if key == path or key.startswith(below):
                cache.pop(key, None)

    def catalogue(self, models: list[str] | None = None) -> dict[str, CatalogueEntry]:
        """Every model's readable versions, aliases and problems, from one recursive listing
        (of the root, or of each named model's folder) and one concurrent read of all the
        model.yaml and aliases.yaml files: the cost of a start-up no longer grows with a round
        trip per model and version.

        The rules are those of list_models, list_versions, read_config and aliases: a version
        exists once its model.yaml does; a model.yaml that does not parse, or whose name or
        version disagrees with its folder, takes out that version only (a message in
        `problems`), a broken aliases.yaml only the aliases. With `models`, a name that is no
        model name, or a model without versions, is an entry with no configs and a problem.

        On a remote store, a second catalogue reads and parses only the files whose listing tag
        (ETag) changed; the ModelConfig objects it returns are then the same objects as before,
        so treat them as read-only (they describe immutable versions).
        """
        listing, names = self._listing(models)
        paths = [p for n in names for p in listing.versions.get(n, {}).values()]
        paths += [listing.aliases[n] for n in names if n in listing.aliases]

        def known(path: str) -> tuple[str, Any] | None:
            hit = self._parsed.get(path)
            return hit if hit is not None and hit[0] == listing.tags.get(path) else None

        texts = self._read_many([p for p in paths if known(p) is None])

        def parsed(path: str, parse: Callable[[bytes | InferplaneError], Any]) -> Any:
            hit = known(path)
            if hit is not None:
                return hit[1]
            value = parse(texts[path])  # errors are not kept: the next catalogue says them again
            tag = listing.tags.get(path)
            if tag is not None:
                self._parsed[path] = (tag, value)
            return value

        out: dict[str, CatalogueEntry] = {}
        for name in names:
            entry = out[name] = CatalogueEntry()
            problem = model_name_problem(name)
            versions = listing.versions.get(name, {})
            if problem is not None or not versions:
                entry.problems.append(problem or f"unknown model '{name}' in {self.url}")
                continue
            for version, path in sorted(versions.items()):
                try:
                    entry.configs.append(parsed(path, partial(self._parse_config, name, version)))
                except InferplaneError as exc:
                    entry.problems.append(f"version {version}: {exc.message}")
            if name in listing.aliases:
                try:
                    aliases = parsed(listing.aliases[name], partial(self._parse_aliases, name))
                    entry.aliases = dict(aliases)
                except InferplaneError as exc:
                    entry.problems.append(exc.message)
        return out

    def _read_many(self, paths: list[str]) -> dict[str, bytes | InferplaneError]:
        """Each file's bytes, or the RepositoryError reading it raised (the others still read)."""

        def read(path: str) -> bytes | InferplaneError:
            try:
                return bytes(self.fs.cat_file(path))
            except FileNotFoundError:  # deleted since the listing
                return RepositoryError(f"{path}: gone since the listing")
            except OSError as exc:
                return RepositoryError(f"cannot read {path}: {exc}")

        if self.is_local or len(paths) < 2:
            return {p: read(p) for p in paths}
        with ThreadPoolExecutor(min(_READERS, len(paths))) as pool:
            return dict(zip(paths, pool.map(read, paths), strict=True))

    def read_config(self, model: str, version: int) -> ModelConfig:
        path = posixpath.join(self.version_path(model, version), MODEL_YAML)
        try:
            # cat_file, not open: s3fs's open asks its listing cache first, which may predate
            # this version.
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise NotFound(f"model '{model}' has no version {version}") from None
        return self._parse_config(model, version, data)

    @staticmethod
    def _parse_config(model: str, version: int, data: bytes | InferplaneError) -> ModelConfig:
        if isinstance(data, InferplaneError):
            raise data
        where = f"{model}/{version}/{MODEL_YAML}"
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise RepositoryError(f"{where}: not UTF-8 text") from None
        config = ModelConfig.from_yaml(text, where)
        if config.name != model or config.version != version:
            raise RepositoryError(f"{where} says {config.name} version {config.version}")
        return config

    def iter_configs(self, models: list[str] | None = None) -> Iterator[ModelConfig]:
        for model in models if models is not None else self.list_models():
            for version in self.list_versions(model):
                yield self.read_config(model, version)

    # aliases -----------------------------------------------------------------------------
    def aliases(self, model: str) -> dict[str, int]:
        path = self._model_path(model, ALIASES_YAML)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return {}
        return self._parse_aliases(model, data)

    @staticmethod
    def _parse_aliases(model: str, text: bytes | InferplaneError) -> dict[str, int]:
        if isinstance(text, InferplaneError):
            raise text
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
        write_text(self.fs, path, text)

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

    def delete_version(self, model: str, version: int) -> None:
        """Delete one version: its model.yaml first, so that from then on no reader sees the
        version, then its other files. The claim stays behind, so the number is never given to
        other files. The caller makes sure that no alias or service refers to it any more."""
        vdir = self.version_path(model, version)
        try:
            self.fs.rm_file(posixpath.join(vdir, MODEL_YAML))
        except FileNotFoundError:
            raise NotFound(f"model '{model}' has no version {version}") from None
        claim = posixpath.join(vdir, CLAIM)
        for path in sorted(self.fs.find(vdir), reverse=True):
            if str(path).rstrip("/") != claim:
                self.fs.rm_file(path)
        self._forget_listings(self._model_path(model))

    # loading -----------------------------------------------------------------------------
    def fetch(self, config: ModelConfig) -> str:
        """`fetch_with_source` without the source."""
        return self.fetch_with_source(config)[0]

    def fetch_with_source(self, config: ModelConfig) -> tuple[str, FetchSource]:
        """(a local folder holding the version's files, where they came from).

        The folder is verified: every file matches model.yaml's sha256 when this returns
        (IntegrityError otherwise), so a caller need not call `verify` again. From a local
        repository: the version folder itself, read in place ("local"). From a remote one: a
        copy in the machine's artifact cache (`self.cache`), reused when it passes the check
        ("cache"), else downloaded, checked and then published ("remote"); a cached copy that
        fails the check is dropped and downloaded once more, so a corrupted cache heals.
        Safe to call from several threads at once.
        """
        vdir = self.version_path(config.name, config.version)
        if self.cache is None:
            verify(config, vdir)
            return vdir, "local"
        check_recorded(config)  # before any download: without a sha256 nothing could pass
        local, cached = self.cache.get(
            ArtifactCache.key(config.sha256),
            fill=self._downloader(config, vdir),
            check=lambda folder: verify(config, folder),
        )
        return local, "cache" if cached else "remote"

    def _downloader(self, config: ModelConfig, vdir: str) -> Callable[[str], int]:
        def download(dest: str) -> int:
            written = 0
            for rel in sorted(config.sha256):
                target = os.path.join(dest, rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                try:
                    self.fs.get_file(posixpath.join(vdir, rel), target)
                except FileNotFoundError:
                    raise IntegrityError(
                        f"{config.name} v{config.version}: artifact file '{rel}' is missing"
                    ) from None
                written += os.path.getsize(target)
            return written

        return download


def check_recorded(config: ModelConfig) -> None:
    """IntegrityError unless model.yaml records a sha256 for the artifact (the first check of
    `verify`, which needs no files)."""
    artifact = config.artifact.rstrip("/")
    if artifact not in config.sha256 and not any(
        k.startswith(artifact + "/") for k in config.sha256
    ):
        raise IntegrityError(
            f"{config.name} v{config.version}: model.yaml records no sha256 for artifact "
            f"'{config.artifact}'"
        )


def verify(config: ModelConfig, local_dir: str) -> None:
    """Raise IntegrityError unless every recorded artifact file in `local_dir` matches its sha256."""
    check_recorded(config)
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
