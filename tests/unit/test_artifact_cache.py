"""The artifact cache (content-keyed, shared by processes, LRU-trimmed) and the repository's
catalogue (one listing, concurrent reads), against a real moto_server and local disk."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import posixpath
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from inferplane.errors import InferplaneError, IntegrityError
from inferplane.repository import ModelConfig, Repository, verify
from inferplane.repository.cache import ArtifactCache
from inferplane.repository.register import register
from inferplane.repository.store import CatalogueEntry

MakeModel = Callable[..., str]


def s3_repo(moto_s3: object, tmp_path: Path, cache_size: int | None = None) -> Repository:
    bucket = moto_s3.new_bucket("cache")  # type: ignore[attr-defined]
    return Repository(
        f"s3://{bucket}/models", cache_dir=str(tmp_path / "cache"), cache_size=cache_size
    )


def add_blob(repo: Repository, name: str, data: bytes, version: int = 1) -> ModelConfig:
    """A version whose one artifact is `data` (a python-runtime config: nothing loads it here)."""
    fd, src = tempfile.mkstemp(prefix="blob-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    config = ModelConfig.checked(
        "test",
        name=name,
        version=version,
        runtime="python",
        artifact="weights.bin",
        inputs=[{"name": "x", "datatype": "FP32", "shape": [-1]}],
        outputs=[{"name": "y", "datatype": "FP32", "shape": [-1]}],
    )
    try:
        return repo.add_version(config, {"weights.bin": src})
    finally:
        os.unlink(src)


def cache_of(repo: Repository) -> ArtifactCache:
    assert repo.cache is not None
    return repo.cache


# --- where a fetch comes from -----------------------------------------------------------------


@pytest.mark.s3
def test_source_is_remote_then_cache_and_counted(
    moto_s3: object, tmp_path: Path, onnx4: str
) -> None:
    repo = s3_repo(moto_s3, tmp_path)
    config = register(repo, "fraud", onnx4)
    first, source = repo.fetch_with_source(config)
    assert source == "remote"
    assert first.startswith(str(tmp_path / "cache" / "v1") + os.sep)
    assert Path(first, "model.onnx").read_bytes() == Path(onnx4).read_bytes()
    again, source = repo.fetch_with_source(config)
    assert (again, source) == (first, "cache")
    cache = cache_of(repo)
    size = Path(onnx4).stat().st_size
    assert (cache.hits, cache.misses, cache.bytes_downloaded) == (1, 1, size)
    # Another Repository object (another process) on the same cache folder reuses the copy.
    other = Repository(repo.url, cache_dir=str(tmp_path / "cache"))
    assert other.fetch_with_source(config) == (first, "cache")


def test_a_local_repository_is_read_in_place(tmp_path: Path, onnx4: str) -> None:
    repo = Repository(str(tmp_path / "repo"))
    config = register(repo, "fraud", onnx4)
    assert repo.cache is None
    assert repo.fetch_with_source(config) == (repo.version_path("fraud", 1), "local")


@pytest.mark.s3
def test_identical_files_share_one_entry_and_different_files_never_collide(
    moto_s3: object, tmp_path: Path, onnx4: str, onnx8: str
) -> None:
    repo = s3_repo(moto_s3, tmp_path)
    one = register(repo, "fraud", onnx4)
    same = register(repo, "churn", onnx4)  # another model, the same bytes
    other = register(repo, "fraud", onnx8)
    first, _ = repo.fetch_with_source(one)
    assert repo.fetch_with_source(same) == (first, "cache")
    third, source = repo.fetch_with_source(other)
    assert source == "remote" and third != first
    verify(other, third)
    assert len(cache_of(repo).entries()) == 2


# --- integrity: a cached copy is checked, healed, and a bad download never enters ------------


@pytest.mark.s3
def test_a_corrupted_cached_file_is_downloaded_again(
    moto_s3: object, tmp_path: Path, onnx4: str
) -> None:
    repo = s3_repo(moto_s3, tmp_path)
    config = register(repo, "fraud", onnx4)
    local, _ = repo.fetch_with_source(config)
    cached = Path(local, "model.onnx")
    cached.write_bytes(cached.read_bytes()[:10])  # truncated, as by a disk fault
    healed, source = repo.fetch_with_source(config)
    assert (healed, source) == (local, "remote")
    assert cached.read_bytes() == Path(onnx4).read_bytes()
    assert cache_of(repo).repairs == 1
    assert repo.fetch_with_source(config)[1] == "cache"


@pytest.mark.s3
def test_a_tampered_store_is_refused_and_never_cached(
    moto_s3: object, tmp_path: Path, onnx4: str
) -> None:
    repo = s3_repo(moto_s3, tmp_path)
    config = register(repo, "fraud", onnx4)
    stored = posixpath.join(repo.version_path("fraud", 1), "model.onnx")
    repo.fs.pipe_file(stored, Path(onnx4).read_bytes() + b"x")
    with pytest.raises(IntegrityError, match=r"sha256 of 'model\.onnx'"):
        repo.fetch_with_source(config)
    cache = cache_of(repo)
    assert cache.entries() == []
    assert [p.name for p in Path(cache.directory).iterdir() if p.name.startswith(".tmp")] == []


@pytest.mark.s3
def test_a_crashed_download_is_never_served(moto_s3: object, tmp_path: Path) -> None:
    repo = s3_repo(moto_s3, tmp_path)
    data = os.urandom(200_000)
    config = add_blob(repo, "blob", data)
    cache = cache_of(repo)
    key = ArtifactCache.key(config.sha256)
    os.makedirs(cache.directory)
    # What a process killed mid-download leaves: a temporary folder with a truncated file.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    crashed = Path(cache.directory, f".tmp.{dead}.abcdef.{_host()}")
    crashed.mkdir()
    (crashed / "weights.bin").write_bytes(data[:1000])
    # ... and a live download of ours, still being written: not to be touched.
    running = Path(cache.directory, f".tmp.{os.getpid()}.fedcba.{_host()}")
    running.mkdir()
    local, source = repo.fetch_with_source(config)
    assert source == "remote"
    assert local == cache.entry_path(key)
    assert Path(local, "weights.bin").read_bytes() == data
    assert not crashed.exists()  # the insert's trim cleaned it
    assert running.exists()
    old = time.time() - 2 * cache.stale_s  # a live pid, but nothing written for too long
    os.utime(running, (old, old))
    cache.trim()
    assert not running.exists()


def _host() -> str:
    from inferplane.repository import cache

    return cache._HOST


@pytest.mark.s3
def test_two_processes_fetching_one_version_at_once_share_one_verified_download(
    moto_s3: object, tmp_path: Path
) -> None:
    repo = s3_repo(moto_s3, tmp_path)
    data = os.urandom(24 * 1024 * 1024)  # big enough that the two fetches overlap
    config = add_blob(repo, "blob", data)
    (tmp_path / "model.yaml").write_text(config.to_yaml())
    child = textwrap.dedent(
        f"""
        import hashlib, json, os, sys, time
        from pathlib import Path
        from inferplane.repository import ModelConfig, Repository
        tmp = Path({str(tmp_path)!r})
        config = ModelConfig.from_yaml((tmp / "model.yaml").read_text(), "test")
        repo = Repository({repo.url!r}, cache_dir=str(tmp / "cache"))
        (tmp / f"ready-{{sys.argv[1]}}").touch()
        while not (tmp / "go").exists():
            time.sleep(0.001)
        start = time.time()
        local, source = repo.fetch_with_source(config)
        end = time.time()
        digest = hashlib.sha256(Path(local, "weights.bin").read_bytes()).hexdigest()
        print(json.dumps(dict(local=local, source=source, digest=digest, start=start, end=end,
                              downloaded=repo.cache.bytes_downloaded)))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", child, str(i)], stdout=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline, "the child processes did not start"
        time.sleep(0.01)
    (tmp_path / "go").touch()
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        results.append(json.loads(out))
    first, second = sorted(results, key=lambda r: r["start"])
    assert second["start"] < first["end"], "the fetches did not overlap: nothing was tested"
    assert {r["local"] for r in results} == {
        cache_of(repo).entry_path(ArtifactCache.key(config.sha256))
    }
    assert {r["digest"] for r in results} == {hashlib.sha256(data).hexdigest()}
    assert sorted(r["source"] for r in results) == ["cache", "remote"]  # one waited for the other
    assert sum(r["downloaded"] for r in results) == len(data)


@pytest.mark.s3
def test_threads_fetching_at_once_get_verified_copies(moto_s3: object, tmp_path: Path) -> None:
    repo = s3_repo(moto_s3, tmp_path)
    configs = [add_blob(repo, f"m{i}", os.urandom(300_000 + i)) for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(repo.fetch_with_source, configs * 4))
    for config, (local, _) in zip(configs * 4, got, strict=True):
        verify(config, local)
    cache = cache_of(repo)
    assert cache.misses == 4  # one download per version, however many asked at once
    assert cache.hits == 12
    assert sorted(source for _, source in got).count("remote") == 4


# --- LRU trim -------------------------------------------------------------------------------


def blob_filler(data: bytes) -> Callable[[str], int]:
    def fill(folder: str) -> int:
        Path(folder, "blob").write_bytes(data)
        return len(data)

    return fill


def no_check(folder: str) -> None:
    if not Path(folder, "blob").exists():
        raise IntegrityError("missing")


def put_entry(cache: ArtifactCache, name: str, size: int = 100, age_s: float = 0) -> str:
    key = ArtifactCache.key({name: "0" * 64})
    path, cached = cache.get(key, blob_filler(b"x" * size), no_check)
    assert not cached
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))
    return key


def test_trim_keeps_the_cache_under_its_size_removing_the_least_recently_used(
    tmp_path: Path,
) -> None:
    cache = ArtifactCache(str(tmp_path), max_bytes=300, recent_s=0)
    a = put_entry(cache, "a", age_s=300)
    b = put_entry(cache, "b", age_s=200)
    c = put_entry(cache, "c", age_s=100)
    assert cache.total_bytes() == 300 and cache.evictions == 0
    assert cache.get(a, blob_filler(b""), no_check) == (cache.entry_path(a), True)  # a: newest
    d = put_entry(cache, "d")
    assert [e.key for e in cache.entries()] == [c, a, d]  # b was the least recently used
    assert cache.total_bytes() == 300
    assert cache.evictions == 1
    assert not Path(cache.entry_path(b)).exists()
    assert not [p for p in Path(cache.directory).iterdir() if p.name.startswith(".trash")]


def test_trim_spares_the_new_entry_and_entries_in_use(tmp_path: Path) -> None:
    cache = ArtifactCache(str(tmp_path), max_bytes=150)  # recent_s: the default minute
    a = put_entry(cache, "a")
    b = put_entry(cache, "b")  # over the limit, but a was used a moment ago
    assert {e.key for e in cache.entries()} == {a, b}
    cache.recent_s = 0
    big = put_entry(cache, "big", size=1000)  # larger than the whole cache: kept, alone
    assert [e.key for e in cache.entries()] == [big]
    assert cache.evictions == 2


def test_without_a_size_nothing_is_evicted(tmp_path: Path) -> None:
    cache = ArtifactCache(str(tmp_path), recent_s=0)
    for name in "abcd":
        put_entry(cache, name, size=10_000, age_s=1000)
    assert len(cache.entries()) == 4 and cache.evictions == 0


@pytest.mark.s3
def test_repository_cache_size_trims_what_fetch_downloads(moto_s3: object, tmp_path: Path) -> None:
    repo = s3_repo(moto_s3, tmp_path, cache_size=150_000)
    cache_of(repo).recent_s = 0
    old = add_blob(repo, "old", os.urandom(100_000))
    new = add_blob(repo, "new", os.urandom(100_000))
    old_dir, _ = repo.fetch_with_source(old)
    new_dir, _ = repo.fetch_with_source(new)
    assert not Path(old_dir).exists()
    assert [e.path for e in cache_of(repo).entries()] == [new_dir]
    assert repo.fetch_with_source(old)[1] == "remote"  # evicted: downloaded again


def test_a_key_is_a_digest_of_the_file_set_in_any_order() -> None:
    one = ArtifactCache.key({"a": "1" * 64, "b": "2" * 64})
    assert one == ArtifactCache.key({"b": "2" * 64, "a": "1" * 64})
    assert one != ArtifactCache.key({"a": "2" * 64, "b": "1" * 64})
    assert one != ArtifactCache.key({"a": "1" * 64})
    with pytest.raises(ValueError):
        ArtifactCache("/tmp").entry_path("../escape")


# --- catalogue --------------------------------------------------------------------------------


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Repository:
    if request.param == "local":
        return Repository(str(tmp_path / "repo"))
    return s3_repo(request.getfixturevalue("moto_s3"), tmp_path)


@pytest.fixture
def onnx4(tmp_path: Path, make_onnx_model: MakeModel) -> str:
    return make_onnx_model(tmp_path / "src4" / "model.onnx", n_features=4)


@pytest.fixture
def onnx8(tmp_path: Path, make_onnx_model: MakeModel) -> str:
    return make_onnx_model(tmp_path / "src8" / "model.onnx", n_features=8)


def write(repo: Repository, rel: str, data: bytes) -> None:
    path = posixpath.join(repo.root, rel)
    repo.fs.makedirs(posixpath.dirname(path), exist_ok=True)
    repo.fs.pipe_file(path, data)


def mixed(repo: Repository, onnx4: str, onnx8: str) -> None:
    """Good versions, broken ones and stray files, as a long-lived repository collects them."""
    register(repo, "fraud", onnx4)
    register(repo, "fraud", onnx8)
    register(repo, "fraud", onnx4)
    write(repo, "fraud/2/model.yaml", b"name: [unclosed\n")  # broken: takes out v2 only
    repo.set_alias("fraud", "production", 1)
    register(repo, "churn", onnx8)
    v1 = repo.fs.cat_file(posixpath.join(repo.version_path("churn", 1), "model.yaml"))
    write(repo, "churn/7/model.yaml", v1)  # says version 1: a problem
    write(repo, "churn/aliases.yaml", b"- not\n- a mapping\n")  # broken aliases
    register(repo, "solo", onnx4)
    write(repo, "fraud/4/.claim", b"123@crashed\n")  # a crashed registration: no version
    write(repo, "fraud/01/model.yaml", v1)  # not how a version folder is written
    write(repo, "fraud/draft/model.yaml", v1)
    write(repo, "notes/readme.txt", b"a stray folder\n")
    write(repo, ".hidden/1/model.yaml", v1)
    write(repo, "README.md", b"hello\n")
    write(repo, "empty/aliases.yaml", b"production: 1\n")  # aliases but no version: no model


def by_the_old_calls(repo: Repository) -> dict[str, CatalogueEntry]:
    """What list_models, list_versions, read_config and aliases say, model by model."""
    out = {}
    for name in repo.list_models():
        entry = out[name] = CatalogueEntry()
        for version in repo.list_versions(name):
            try:
                entry.configs.append(repo.read_config(name, version))
            except InferplaneError as exc:
                entry.problems.append(f"version {version}: {exc.message}")
        try:
            entry.aliases = repo.aliases(name)
        except InferplaneError as exc:
            entry.problems.append(exc.message)
    return out


def test_catalogue_equals_what_the_one_by_one_calls_read(
    repo: Repository, onnx4: str, onnx8: str
) -> None:
    mixed(repo, onnx4, onnx8)
    catalogue = repo.catalogue()
    assert catalogue == by_the_old_calls(repo)
    assert sorted(catalogue) == ["churn", "fraud", "solo"]
    fraud, churn = catalogue["fraud"], catalogue["churn"]
    assert fraud.versions == [1, 3]
    assert fraud.aliases == {"production": 1}
    assert (
        len(fraud.problems) == 1
        and "version 2: fraud/2/model.yaml: not valid YAML" in fraud.problems[0]
    )
    assert churn.versions == [1]
    assert churn.aliases == {}
    assert any("churn/7/model.yaml says churn version 1" in p for p in churn.problems)
    assert any("aliases.yaml: expected a mapping" in p for p in churn.problems)
    assert catalogue["solo"].problems == []


def test_catalogue_of_named_models(repo: Repository, onnx4: str, onnx8: str) -> None:
    mixed(repo, onnx4, onnx8)
    full = repo.catalogue()
    some = repo.catalogue(["fraud", "absent", "../up", "fraud"])
    assert list(some) == ["fraud", "absent", "../up"]
    assert some["fraud"] == full["fraud"]
    assert some["absent"].configs == [] and "unknown model 'absent'" in some["absent"].problems[0]
    assert some["../up"].configs == [] and "contains '/'" in some["../up"].problems[0]
    assert repo.catalogue(["fr"]) == {
        "fr": CatalogueEntry(problems=[f"unknown model 'fr' in {repo.url}"])
    }


def test_catalogue_lists_once_whatever_the_number_of_models(
    repo: Repository, onnx4: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(12):
        register(repo, f"m{i}", onnx4)
        register(repo, f"m{i}", onnx4)
    calls: dict[str, int] = {}
    for method in ("find", "ls", "exists", "info", "open", "cat_file"):
        real = getattr(repo.fs, method)

        def spy(
            *args: object, _real: Callable[..., object] = real, _m: str = method, **kw: object
        ) -> object:
            calls[_m] = calls.get(_m, 0) + 1
            return _real(*args, **kw)

        monkeypatch.setattr(repo.fs, method, spy)

    def requests() -> dict[str, int]:
        # On disk, find walks with ls/info and cat_file opens: local calls, no round trips.
        local = ("find", "cat_file")
        return {k: n for k, n in calls.items() if not repo.is_local or k in local}

    catalogue = repo.catalogue()
    assert [len(e.configs) for e in catalogue.values()] == [2] * 12
    assert requests() == {"find": 1, "cat_file": 24}  # one listing, then the model.yaml reads
    calls.clear()
    assert len(repo.list_models()) == 12
    assert requests() == {"find": 1}


def test_catalogue_of_a_missing_repository_is_an_error(tmp_path: Path) -> None:
    from inferplane.errors import RepositoryError

    with pytest.raises(RepositoryError, match="does not exist"):
        Repository(str(tmp_path / "nowhere")).catalogue()
    (tmp_path / "empty").mkdir()
    assert Repository(str(tmp_path / "empty")).catalogue() == {}


@pytest.mark.s3
def test_a_version_registered_elsewhere_after_a_catalogue_is_seen(
    moto_s3: object, tmp_path: Path, onnx4: str
) -> None:
    import s3fs

    repo = s3_repo(moto_s3, tmp_path)
    register(repo, "fraud", onnx4)
    assert repo.catalogue()["fraud"].versions == [1]
    assert repo.list_versions("fraud") == [1]
    # Another process: its own filesystem object, so nothing here hears of its writes.
    elsewhere = Repository(repo.url)
    elsewhere.fs = s3fs.S3FileSystem(skip_instance_cache=True)
    register(elsewhere, "fraud", onnx4)
    elsewhere.set_alias("fraud", "production", 2)
    assert repo.list_versions("fraud") == [1, 2]
    assert repo.read_config("fraud", 2).version == 2
    assert repo.aliases("fraud") == {"production": 2}
    assert repo.catalogue()["fraud"].versions == [1, 2]


def test_losing_the_publish_race_uses_the_winners_copy(tmp_path: Path) -> None:
    cache = ArtifactCache(str(tmp_path))
    key = ArtifactCache.key({"blob": "0" * 64})

    def fill_while_another_process_publishes(folder: str) -> int:
        winner = Path(cache.entry_path(key))
        winner.mkdir()
        (winner / "blob").write_bytes(b"theirs")
        Path(folder, "blob").write_bytes(b"ours")
        return 4

    path, cached = cache.get(key, fill_while_another_process_publishes, no_check)
    assert (path, cached) == (cache.entry_path(key), False)
    assert Path(path, "blob").read_bytes() == b"theirs"
    assert [p.name for p in Path(cache.directory).iterdir() if p.name.startswith(".tmp")] == []


def test_index_lists_versions_without_reading_a_file(
    repo: Repository, onnx4: str, onnx8: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mixed(repo, onnx4, onnx8)
    monkeypatch.setattr(repo.fs, "cat_file", None)  # any read would fail
    assert repo.index() == {"churn": [1, 7], "fraud": [1, 2, 3], "solo": [1]}
    assert repo.index(["solo", "absent", "../up"]) == {"solo": [1]}


@pytest.mark.s3
def test_a_second_catalogue_reads_only_what_changed(
    moto_s3: object, tmp_path: Path, onnx4: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = s3_repo(moto_s3, tmp_path)
    for name in ("a", "b", "c"):
        register(repo, name, onnx4)
    repo.set_alias("a", "production", 1)
    first = repo.catalogue()
    reads: list[str] = []
    real = repo.fs.cat_file
    monkeypatch.setattr(repo.fs, "cat_file", lambda p, **kw: reads.append(p) or real(p, **kw))
    assert repo.catalogue() == first
    assert reads == []
    # Rewritten behind the repository's back: its listing tag changes, so it is read again.
    path = posixpath.join(repo.version_path("b", 1), "model.yaml")
    repo.fs.pipe_file(path, b"name: [unclosed\n")
    register(repo, "a", onnx4)
    again = repo.catalogue()
    assert sorted(reads) == sorted([path, posixpath.join(repo.version_path("a", 2), "model.yaml")])
    assert again["a"].versions == [1, 2]
    assert again["b"].configs == [] and "not valid YAML" in again["b"].problems[0]
