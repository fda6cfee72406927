"""The output folder: one Parquet file per input fragment, committed once, and the manifest.

Layout under the output URL (local path or any fsspec URL):

    <key>.parquet              scored rows of input fragment <key> (same sub-folders, .parquet)
    _errors/<key>.parquet      rows that could not be scored, with the reason
    _manifest/<id>.json        one commit entry per fragment: the commit point
    _job.json                  what the job is (input, target, mapping...), to resume it safely
    _manifest.json, _SUCCESS   written last, when every fragment is committed
    _tmp/                      files being written; removed when a job (re)starts
    _tmp/shard-<i>/            the same for shard i of a job split with --shards

A fragment is written under _tmp/ and moved to its final, deterministic name; only then is its
commit entry written. A crash before the entry leaves at most a file that the rerun overwrites
with the same name, so the output ends with exactly one row per scored input row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec

from inferplane.batch.extras import require_pyarrow
from inferplane.batch.readers import EXTENSIONS

TMP = "_tmp"
ERRORS = "_errors"
ENTRIES = "_manifest"
JOB_FILE = "_job.json"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"


def output_key(fragment_key: str) -> str:
    """The output file for an input file: same relative path, extension .parquet."""
    lower = fragment_key.lower()
    for suffix in sorted((s for v in EXTENSIONS.values() for s in v), key=len, reverse=True):
        if lower.endswith(suffix):
            return fragment_key[: -len(suffix)] + ".parquet"
    return fragment_key + ".parquet"


def entry_name(fragment_key: str) -> str:
    return hashlib.sha1(fragment_key.encode()).hexdigest()[:20] + ".json"


@dataclass(slots=True)
class WrittenFile:
    path: str  # relative to the output root
    rows: int
    bytes: int
    sha256: str


class _HashingFile:
    """A write-only file that hashes what passes through (pyarrow writes to any such object)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.size += view.nbytes
        self.raw.write(view)
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
            self.closed = True


class ParquetOutput:
    """One Parquet file written under _tmp/, moved to `final` (relative) by commit()."""

    def __init__(
        self,
        layout: OutputLayout,
        final: str,
        schema: Any,
        dictionary_columns: Sequence[str] | bool = True,
    ) -> None:
        pq = _pq()
        self.layout = layout
        self.final = final
        self.tmp = layout.path(layout.tmp, uuid.uuid4().hex, final)
        layout.fs.makedirs(posixpath.dirname(self.tmp), exist_ok=True)
        self.file = _HashingFile(layout.fs.open(self.tmp, "wb"))
        # Dictionary encoding only where values repeat (versions, job id, labels): on unique
        # floats it costs time for nothing (measured: writes ~40% faster, files ~40% smaller).
        self.writer = pq.ParquetWriter(
            self.file,
            schema,
            compression="zstd",
            use_dictionary=dictionary_columns
            if isinstance(dictionary_columns, bool)
            else list(dictionary_columns),
        )
        self.rows = 0

    def write(self, table: Any) -> None:
        if table.num_rows:
            self.writer.write_table(table)
            self.rows += table.num_rows

    def commit(self) -> WrittenFile:
        self.writer.close()
        self.file.close()
        target = self.layout.path(self.final)
        self.layout.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        self.layout.fs.mv(self.tmp, target)
        return WrittenFile(self.final, self.rows, self.file.size, self.file.hash.hexdigest())

    def abort(self) -> None:
        # Best effort: _tmp/ is cleared when the job starts again anyway.
        with contextlib.suppress(Exception):
            self.writer.close()
            self.file.close()
            self.layout.fs.rm(self.tmp)


class OutputLayout:
    """The output folder; `tmp` is the folder (relative) this process writes temporary files
    in: `_tmp`, or one of its own per shard, so that shards sharing the output never delete
    each other's files being written."""

    def __init__(self, url: str, tmp: str = TMP) -> None:
        self.url = url
        self.tmp = tmp
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "tmp": self.tmp}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state.get("tmp", TMP))  # type: ignore[misc]

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def prepare(self) -> None:
        """Create the folder and drop what an interrupted run left half-written."""
        self.fs.makedirs(self.root, exist_ok=True)
        self.drop_tmp()

    def clear(self) -> None:
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    def write_json(self, relative: str, doc: Mapping[str, Any]) -> None:
        """Write then move into place: a reader sees the whole document or none."""
        data = json.dumps(doc, indent=2, sort_keys=True).encode()
        tmp = self.path(self.tmp, uuid.uuid4().hex + ".json")
        self.fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
        self.fs.pipe_file(tmp, data)
        target = self.path(relative)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        self.fs.mv(tmp, target)

    def read_json(self, relative: str) -> dict[str, Any] | None:
        path = self.path(relative)
        if not self.fs.exists(path):
            return None
        doc: dict[str, Any] = json.loads(self.fs.cat_file(path))
        return doc

    def commit_entry(self, entry: Mapping[str, Any]) -> None:
        self.write_json(posixpath.join(ENTRIES, entry_name(entry["input"])), entry)

    def entries(self) -> dict[str, dict[str, Any]]:
        """Committed fragments by input key."""
        folder = self.path(ENTRIES)
        if not self.fs.exists(folder):
            return {}
        out: dict[str, dict[str, Any]] = {}
        for path in self.fs.glob(posixpath.join(folder, "*.json")):
            doc = json.loads(self.fs.cat_file(path))
            out[doc["input"]] = doc
        return out

    def remove(self, relative: str) -> None:
        path = self.path(relative)
        if self.fs.exists(path):
            self.fs.rm(path)

    def finish(self, manifest: Mapping[str, Any]) -> None:
        self.write_json(MANIFEST, manifest)
        self.fs.pipe_file(self.path(SUCCESS), b"")
        self.drop_tmp()

    def drop_tmp(self) -> None:
        """Remove this process's temporary folder (`tmp`), with what a crash left in it."""
        tmp = self.path(self.tmp)
        if self.fs.exists(tmp):
            self.fs.rm(tmp, recursive=True)
        if self.tmp != TMP:
            # A shard's folder is under _tmp/: the last one out removes the empty _tmp (a
            # local folder; object stores have none). Another shard writing keeps it non-empty.
            with contextlib.suppress(OSError):
                if not self.fs.ls(self.path(TMP)):
                    self.fs.rmdir(self.path(TMP))


def _pq() -> Any:
    require_pyarrow()
    import pyarrow.parquet as pq

    return pq
