"""A machine-wide cache of model versions' files, keyed by what the files are.

Layout: `<directory>/v1/<key>/<files as model.yaml names them>`, where the key is a digest of the
version's sha256 map (`ArtifactCache.key`): two versions with identical files share one entry, and
a different set of files can never land in the same folder.

Several processes may share one directory. An entry only ever appears whole: files are downloaded
into a temporary folder next to the entries, checked, and the folder is renamed into place in one
`os.rename`. A crash leaves a temporary folder behind, never a half entry; `trim` removes such
leftovers once their process is gone or nothing has been written in them for an hour.

Each use touches the entry (its mtime is the LRU clock). With a size limit, `trim` deletes the
least recently used entries until the total fits, except the entry just added and any used in
the last minute (another process may be loading from it right now).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from inferplane.errors import IntegrityError

log = logging.getLogger("inferplane.repository")

LAYOUT = "v1"  # bump when the layout changes; an old layout's folder is then simply not read
RECENT_S = 60.0
STALE_S = 3600.0
_KEY = re.compile(r"^[0-9a-f]{64}\Z")
_TEMP = ".tmp."
_TRASH = ".trash."
_LOCKS = ".locks"
_TRIM_LOCK = ".trim.lock"
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


@dataclass(frozen=True)
class _Entry:
    key: str
    path: str
    size: int
    used: float  # mtime: the last use


class ArtifactCache:
    """Entries of model files under `directory`, trimmed to `max_bytes` (None: never trimmed).

    Safe to use from several threads and processes at once. Counters (`hits`, `misses`,
    `bytes_downloaded`, `evictions`, `repairs`) count what this object did, for metrics.
    """

    def __init__(
        self,
        directory: str,
        max_bytes: int | None = None,
        *,
        recent_s: float = RECENT_S,
        stale_s: float = STALE_S,
    ) -> None:
        self.directory = os.path.join(directory, LAYOUT)
        self.max_bytes = max_bytes
        self.recent_s = recent_s
        self.stale_s = stale_s
        self.hits = 0
        self.misses = 0
        self.bytes_downloaded = 0
        self.evictions = 0
        self.repairs = 0  # cached copies that failed their check and were downloaded again
        self._counts = threading.Lock()

    @staticmethod
    def key(sha256: Mapping[str, str]) -> str:
        """The entry name of a set of files: a digest of (name, sha256) pairs, order-free."""
        canonical = json.dumps(sorted(sha256.items()), separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def entry_path(self, key: str) -> str:
        if not _KEY.match(key):
            raise ValueError(f"cache key {key!r} is not a sha256 hex digest")
        return os.path.join(self.directory, key)

    # using ---------------------------------------------------------------------------------
    def get(
        self, key: str, fill: Callable[[str], int], check: Callable[[str], None]
    ) -> tuple[str, bool]:
        """(the entry's folder, whether it was already cached).

        A cached entry is returned once `check(folder)` passes; one that fails it (IntegrityError)
        is dropped and filled again. To fill, `fill(folder)` writes the files into an empty
        temporary folder and returns the bytes it wrote; `check` must pass on that folder before it
        becomes the entry, so a bad download never enters the cache (its IntegrityError is
        raised). Threads and processes asking for the same key while it is filled wait for that
        one download instead of starting their own.
        """
        path = self.entry_path(key)
        failed = self._use(path, check)
        if failed is None:
            self._count(hits=1)
            return path, True
        with self._key_lock(key):
            if failed == _MISSING or _inode(path) != failed:
                # Filled or replaced while we waited for the lock: that copy may be good.
                failed = self._use(path, check)
                if failed is None:
                    self._count(hits=1)
                    return path, True
            if failed != _MISSING:
                self._discard(path)
                self._count(repairs=1)
            self._count(misses=1)
            self._fill(path, fill, check)
        self.trim(keep=key)
        return path, False

    def _use(self, path: str, check: Callable[[str], None]) -> int | None:
        """None when the entry is there and passes `check` (touched: it is in use); else
        _MISSING, or the inode of the entry that failed."""
        try:
            os.utime(path)
            inode = os.stat(path).st_ino
        except FileNotFoundError:
            return _MISSING
        try:
            check(path)
        except IntegrityError as exc:
            if not os.path.isdir(path):  # trimmed away while we read it
                return _MISSING
            log.warning("cached copy %s failed its check, downloading again: %s", path, exc)
            return inode
        return None

    def _fill(self, path: str, fill: Callable[[str], int], check: Callable[[str], None]) -> None:
        temp = os.path.join(self.directory, f"{_TEMP}{os.getpid()}.{uuid.uuid4().hex[:12]}.{_HOST}")
        os.makedirs(temp)
        try:
            written = fill(temp)
            self._count(bytes_downloaded=written)
            check(temp)
            try:
                os.rename(temp, path)
            except OSError as exc:
                # Another writer got there first (possible when the lock file was trimmed away
                # under a waiting process): theirs is as good as ours.
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not os.path.isdir(path):
                    raise
            os.utime(path)
        finally:
            shutil.rmtree(temp, ignore_errors=True)

    # trimming ------------------------------------------------------------------------------
    def entries(self) -> list[_Entry]:
        """The complete entries, least recently used first."""
        found = []
        for item in self._scan():
            if _KEY.match(item.name) and item.is_dir(follow_symlinks=False):
                try:
                    used = item.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                found.append(_Entry(item.name, item.path, _tree_size(item.path), used))
        return sorted(found, key=lambda e: e.used)

    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    def trim(self, keep: str | None = None) -> int:
        """Remove stale temporary folders, then least recently used entries until the total is
        within `max_bytes`; never `keep`, nor an entry used in the last `recent_s`. Returns the
        entries removed. One process trims at a time (a lock file); the others wait for it."""
        os.makedirs(self.directory, exist_ok=True)
        with _flock(os.path.join(self.directory, _TRIM_LOCK)):
            for item in self._scan():
                if item.name.startswith((_TEMP, _TRASH)) and self._stale(item.name, item.path):
                    shutil.rmtree(item.path, ignore_errors=True)
            if self.max_bytes is None:
                return 0
            entries = self.entries()
            total = sum(e.size for e in entries)
            removed = 0
            for entry in entries:
                if total <= self.max_bytes:
                    break
                if entry.key == keep:
                    continue
                try:  # again, now: a process may have touched it since the scan
                    used = os.stat(entry.path).st_mtime
                except FileNotFoundError:
                    total -= entry.size
                    continue
                if time.time() - used < self.recent_s:
                    continue
                self._discard(entry.path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, _LOCKS, entry.key))
                total -= entry.size
                removed += 1
            self._count(evictions=removed)
            if total > self.max_bytes:
                log.info(
                    "artifact cache %s holds %d bytes, over its %d: the rest is in use",
                    self.directory,
                    total,
                    self.max_bytes,
                )
            return removed

    def _stale(self, name: str, path: str) -> bool:
        if name.startswith(_TRASH):
            return True
        parts = name[len(_TEMP) :].split(".", 2)
        ours = len(parts) == 3 and parts[2] == _HOST and parts[0].isdigit()
        if ours and not _alive(int(parts[0])):
            return True
        # Another machine's (or container's) process, or a live pid that may be a reused one:
        # stale once nothing has been written in it for `stale_s`.
        return time.time() - _newest_mtime(path) > self.stale_s

    def _discard(self, path: str) -> None:
        """Take an entry out at once (a rename), then delete its files."""
        trash = os.path.join(self.directory, f"{_TRASH}{uuid.uuid4().hex}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def _scan(self) -> Iterator[os.DirEntry[str]]:
        try:
            with os.scandir(self.directory) as items:
                yield from list(items)
        except FileNotFoundError:
            return

    @contextlib.contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        locks = os.path.join(self.directory, _LOCKS)
        os.makedirs(locks, exist_ok=True)
        with _flock(os.path.join(locks, key)):
            yield

    def _count(self, **amounts: int) -> None:
        with self._counts:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)


_MISSING = -1


def _inode(path: str) -> int:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return _MISSING


@contextlib.contextmanager
def _flock(path: str) -> Iterator[None]:
    # flock locks belong to an open file description, so two threads of one process that each
    # open the file exclude each other as two processes do; the kernel drops the lock when its
    # holder dies, so a crash never leaves the cache locked.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _tree_size(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _newest_mtime(path: str) -> float:
    newest = 0.0
    with contextlib.suppress(FileNotFoundError):
        newest = os.lstat(path).st_mtime
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest
