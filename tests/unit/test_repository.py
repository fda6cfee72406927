"""The versioned model repository on local disk and on S3 (a real moto_server)."""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from inferplane.errors import BadRequest, IntegrityError, NotFound, RepositoryError
from inferplane.repository import Batching, ModelConfig, Repository, TensorDecl, verify
from inferplane.repository.register import parse_tensor_arg, register
from inferplane.tensors import TensorSpec

MakeModel = Callable[..., str]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Repository:
    """An empty repository: a local folder, or s3://<fresh bucket>/models on moto_server."""
    if request.param == "local":
        return Repository(str(tmp_path / "repo"))
    moto_s3 = request.getfixturevalue("moto_s3")
    bucket = moto_s3.new_bucket("repo")
    return Repository(f"s3://{bucket}/models", cache_dir=str(tmp_path / "cache"))


@pytest.fixture
def onnx4(tmp_path: Path, make_onnx_model: MakeModel) -> str:
    return make_onnx_model(tmp_path / "src4" / "model.onnx", n_features=4)


@pytest.fixture
def onnx8(tmp_path: Path, make_onnx_model: MakeModel) -> str:
    return make_onnx_model(tmp_path / "src8" / "model.onnx", n_features=8)


def sha256_of(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def stored(repo: Repository, model: str, version: int, rel: str) -> str:
    return posixpath.join(repo.version_path(model, version), rel)


def put(repo: Repository, path: str, data: bytes) -> None:
    """Write raw bytes into the store, behind the repository's back."""
    repo.fs.makedirs(posixpath.dirname(path), exist_ok=True)
    repo.fs.pipe_file(path, data)


def fresh(repo: Repository, tmp_path: Path, name: str) -> Repository:
    """The same repository opened anew, with an empty download cache."""
    return Repository(repo.url, cache_dir=str(tmp_path / name))


# --- registration ---------------------------------------------------------------------------


def test_register_assigns_versions_checksums_and_signature(
    repo: Repository, onnx4: str, onnx8: str
) -> None:
    first = register(repo, "fraud", onnx4)
    assert first.version == 1
    assert first.runtime == "onnx"
    assert first.artifact == "model.onnx"
    assert first.sha256 == {"model.onnx": sha256_of(onnx4)}
    assert first.inputs == [TensorDecl(name="input", datatype="FP32", shape=[-1, 4])]
    assert first.outputs == [TensorDecl(name="output", datatype="FP32", shape=[-1, 1])]
    assert "created_at" in first.metadata

    second = register(repo, "fraud", onnx8)
    assert second.version == 2
    assert second.sha256 == {"model.onnx": sha256_of(onnx8)}
    assert second.sha256 != first.sha256
    assert second.inputs == [TensorDecl(name="input", datatype="FP32", shape=[-1, 8])]

    # what is stored is byte for byte what was registered
    assert repo.fs.cat_file(stored(repo, "fraud", 1, "model.onnx")) == Path(onnx4).read_bytes()
    assert repo.fs.cat_file(stored(repo, "fraud", 2, "model.onnx")) == Path(onnx8).read_bytes()

    assert repo.list_versions("fraud") == [1, 2]
    assert repo.list_versions("nope") == []
    register(repo, "churn", onnx4)
    assert repo.list_models() == ["churn", "fraud"]
    # a second handle on the same URL sees the same state
    again = Repository(repo.url)
    assert again.list_models() == ["churn", "fraud"]
    assert again.read_config("fraud", 2) == second


def test_read_config_round_trips_every_field(repo: Repository, onnx4: str) -> None:
    written = register(
        repo,
        "fraud",
        onnx4,
        batching=Batching(max_batch_size=16, max_queue_delay_us=500),
        instances=2,
        options={"intra_op_threads": 2},
        metadata={"auc": 0.91, "training_data": "s3://lake/fraud"},
    )
    read = repo.read_config("fraud", 1)
    assert read == written
    assert read.max_batch_size == 16
    assert read.batching is not None and read.batching.max_queue_delay_us == 500
    assert read.instances == 2
    assert read.options == {"intra_op_threads": 2}
    assert read.metadata["auc"] == 0.91
    assert read.metadata["training_data"] == "s3://lake/fraud"
    assert list(repo.iter_configs()) == [written]


def test_unbatched_model_has_max_batch_size_zero(repo: Repository, onnx4: str) -> None:
    config = register(repo, "fraud", onnx4)
    assert config.batching is None
    assert repo.read_config("fraud", 1).max_batch_size == 0


def test_explicit_signature_overrides_inference(repo: Repository, onnx4: str) -> None:
    config = register(
        repo, "fraud", onnx4, outputs=[TensorSpec("output", "FP32", [-1, 1])], version=7
    )
    assert config.version == 7
    assert config.inputs[0].shape == [-1, 4]  # still inferred
    assert repo.list_versions("fraud") == [7]
    assert register(repo, "fraud", onnx4).version == 8


def test_versions_are_immutable(repo: Repository, onnx4: str, onnx8: str) -> None:
    first = register(repo, "fraud", onnx4)
    with pytest.raises(RepositoryError, match="version 1 already exists; versions are immutable"):
        repo.add_version(first, {"model.onnx": onnx8})
    with pytest.raises(RepositoryError, match="already exists"):
        register(repo, "fraud", onnx8, version=1)
    # nothing was overwritten
    assert repo.fs.cat_file(stored(repo, "fraud", 1, "model.onnx")) == Path(onnx4).read_bytes()
    assert repo.read_config("fraud", 1) == first


def test_folder_without_model_yaml_is_not_a_version(
    repo: Repository, onnx4: str, tmp_path: Path
) -> None:
    register(repo, "fraud", onnx4)
    register(repo, "fraud", onnx4)
    # a registration that crashed after copying the artifact, before writing model.yaml
    put(repo, stored(repo, "fraud", 3, "model.onnx"), b"half-written")
    put(repo, stored(repo, "ghost", 1, "model.onnx"), b"half-written")
    # and things that are not versions at all
    put(repo, posixpath.join(repo.root, "fraud", "0", "model.yaml"), b"name: fraud")
    put(repo, posixpath.join(repo.root, "fraud", "notes", "x"), b"x")

    repo = fresh(repo, tmp_path, "c1")
    assert repo.list_versions("fraud") == [1, 2]
    assert repo.list_versions("ghost") == []
    assert repo.list_models() == ["fraud"]
    assert repo.resolve_version("fraud", None) == 2
    with pytest.raises(NotFound, match="model 'fraud' has no version 3"):
        repo.read_config("fraud", 3)
    with pytest.raises(NotFound, match="unknown model 'ghost'"):
        repo.resolve_version("ghost", None)

    # the next registration takes the number of the crashed one and is complete
    third = register(repo, "fraud", onnx4)
    assert third.version == 3
    verify(third, repo.fetch(third))


def test_list_models_of_missing_repository_is_an_error(tmp_path: Path) -> None:
    repo = Repository(str(tmp_path / "nowhere"))
    assert not repo.exists()
    with pytest.raises(RepositoryError, match="does not exist"):
        repo.list_models()


# --- aliases --------------------------------------------------------------------------------


def test_aliases_set_resolve_remove(repo: Repository, onnx4: str, tmp_path: Path) -> None:
    for _ in range(3):
        register(repo, "fraud", onnx4)
    assert repo.aliases("fraud") == {}
    assert repo.resolve_version("fraud", None) == 3  # no production alias: the latest

    repo.set_alias("fraud", "production", 1)
    repo.set_alias("fraud", "staging", 2)
    assert repo.aliases("fraud") == {"production": 1, "staging": 2}
    assert fresh(repo, tmp_path, "c1").aliases("fraud") == {"production": 1, "staging": 2}
    assert repo.resolve_version("fraud", None) == 1  # production wins over latest
    assert repo.resolve_version("fraud", "production") == 1
    assert repo.resolve_version("fraud", "staging") == 2
    assert repo.resolve_version("fraud", 3) == 3
    assert repo.resolve_version("fraud", "3") == 3

    repo.set_alias("fraud", "production", 3)  # move an alias
    assert repo.resolve_version("fraud", None) == 3
    repo.set_alias("fraud", "production", 2)

    repo.remove_alias("fraud", "production")
    assert repo.aliases("fraud") == {"staging": 2}
    assert repo.resolve_version("fraud", None) == 3
    with pytest.raises(NotFound, match="has no version or alias 'production'"):
        repo.resolve_version("fraud", "production")
    with pytest.raises(NotFound, match="has no alias 'production'"):
        repo.remove_alias("fraud", "production")


def test_alias_errors(repo: Repository, onnx4: str) -> None:
    register(repo, "fraud", onnx4)
    with pytest.raises(NotFound, match="model 'fraud' has no version 9"):
        repo.set_alias("fraud", "production", 9)
    with pytest.raises(NotFound, match="has no version"):
        repo.set_alias("nope", "production", 1)
    for bad in ("1abc", "123", "has space", "-x", ""):
        with pytest.raises(RepositoryError, match=f"alias '{bad}'"):
            repo.set_alias("fraud", bad, 1)
    with pytest.raises(NotFound, match="model 'fraud' has no version 9"):
        repo.resolve_version("fraud", 9)
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        repo.resolve_version("nope", None)
    assert repo.aliases("fraud") == {}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (b"- 1\n- 2\n", r"aliases\.yaml: expected a mapping"),
        (b"production: three\n", r"aliases\.yaml: every alias maps to a version number"),
        (b"production: [1\n", r"aliases\.yaml: not valid YAML"),
        (b"[" * 5000, r"aliases\.yaml: nested too deeply"),
    ],
    ids=["list", "not-a-number", "bad-yaml", "deep"],
)
def test_malformed_aliases_file_is_a_repository_error(
    repo: Repository, onnx4: str, text: bytes, says: str
) -> None:
    register(repo, "fraud", onnx4)
    put(repo, posixpath.join(repo.root, "fraud", "aliases.yaml"), text)
    with pytest.raises(RepositoryError, match=says):
        repo.aliases("fraud")


# --- fetch and verify -----------------------------------------------------------------------


def test_fetch_and_verify_good_version(repo: Repository, onnx4: str) -> None:
    config = register(repo, "fraud", onnx4)
    local = repo.fetch(config)
    assert os.path.isdir(local)
    assert Path(local, "model.onnx").read_bytes() == Path(onnx4).read_bytes()
    verify(config, local)
    verify(config, repo.fetch(config))  # a second fetch (cache hit when remote) also passes


@pytest.mark.parametrize("same_size", [True, False], ids=["same-size", "other-size"])
def test_verify_rejects_tampered_artifact(
    repo: Repository, onnx4: str, tmp_path: Path, same_size: bool
) -> None:
    config = register(repo, "fraud", onnx4)
    good = Path(onnx4).read_bytes()
    bad = bytes(b ^ 0xFF for b in good) if same_size else good + b"\0"
    put(repo, stored(repo, "fraud", 1, "model.onnx"), bad)

    repo = fresh(repo, tmp_path, "c1")
    with pytest.raises(IntegrityError) as info:
        verify(config, repo.fetch(config))
    message = str(info.value)
    assert "fraud v1" in message
    assert "sha256 of 'model.onnx'" in message
    assert config.sha256["model.onnx"][:12] in message
    assert "tampered" in message


def test_verify_rejects_tampered_artifact_after_earlier_fetch(
    repo: Repository, onnx4: str, tmp_path: Path
) -> None:
    """The cache is keyed by model.yaml's sha256: a cached copy that still matches it is the
    registered artifact and keeps serving; the tampered bytes are refused wherever they are
    read, in place (local repository) or by any download (another machine's cache)."""
    config = register(repo, "fraud", onnx4)
    verify(config, repo.fetch(config))  # cache warm (remote)
    put(repo, stored(repo, "fraud", 1, "model.onnx"), Path(onnx4).read_bytes() + b"x")
    if not repo.is_local:
        local, source = repo.fetch_with_source(config)
        assert source == "cache"
        assert Path(local, "model.onnx").read_bytes() == Path(onnx4).read_bytes()
        repo = fresh(repo, tmp_path, "elsewhere")
    with pytest.raises(IntegrityError, match=r"sha256 of 'model\.onnx'"):
        verify(config, repo.fetch(config))


def test_missing_artifact_file_is_an_integrity_error(
    repo: Repository, onnx4: str, tmp_path: Path
) -> None:
    config = register(repo, "fraud", onnx4)
    repo.fs.rm_file(stored(repo, "fraud", 1, "model.onnx"))
    repo = fresh(repo, tmp_path, "c1")
    with pytest.raises(IntegrityError, match=r"fraud v1: artifact file 'model\.onnx' is missing"):
        verify(config, repo.fetch(config))


def test_verify_requires_a_checksum_for_the_artifact(repo: Repository, onnx4: str) -> None:
    config = register(repo, "fraud", onnx4)
    unsummed = config.model_copy(update={"sha256": {}})
    with pytest.raises(IntegrityError, match=r"records no sha256 for artifact 'model\.onnx'"):
        verify(unsummed, repo.fetch(config))


@pytest.mark.s3
def test_fetch_repairs_a_corrupted_cache_copy(moto_s3: object, onnx4: str, tmp_path: Path) -> None:
    bucket = moto_s3.new_bucket("cache")  # type: ignore[attr-defined]
    repo = Repository(f"s3://{bucket}/models", cache_dir=str(tmp_path / "cache"))
    config = register(repo, "fraud", onnx4)
    local = repo.fetch(config)
    cached = Path(local, "model.onnx")
    cached.write_bytes(bytes(b ^ 0xFF for b in cached.read_bytes()))  # same size, bad bytes
    verify(config, repo.fetch(config))  # the store is intact: fetch should heal the cache


# --- malformed model.yaml -------------------------------------------------------------------


MALFORMED = {
    "bad-yaml": (lambda d: "name: [unclosed\n", "not valid YAML"),
    "not-a-mapping": (lambda d: "- just\n- a list\n", "expected a mapping at the top level"),
    "nested-too-deeply": (lambda d: "[" * 5000, "nested too deeply"),  # was a RecursionError
    "unknown-runtime": (lambda d: {**d, "runtime": "tensorflow"}, r"runtime: Input should be"),
    "bad-datatype": (
        lambda d: {**d, "inputs": [{**d["inputs"][0], "datatype": "FP99"}]},
        r"inputs\.0\.datatype: .*unknown datatype 'FP99'",
    ),
    "bad-dimension": (
        lambda d: {**d, "inputs": [{**d["inputs"][0], "shape": [0, 4]}]},
        r"inputs\.0\.shape: .*dimensions are positive integers or -1",
    ),
    "missing-artifact": (
        lambda d: {k: v for k, v in d.items() if k != "artifact"},
        "artifact: Field required",
    ),
    "missing-inputs": (
        lambda d: {k: v for k, v in d.items() if k != "inputs"},
        "inputs: Field required",
    ),
    "unknown-field": (lambda d: {**d, "colour": "blue"}, "colour: Extra inputs are not permitted"),
    "bad-device": (lambda d: {**d, "device": "gpu"}, "device: .*cpu, cuda or cuda:N"),
    "wrong-version": (lambda d: {**d, "version": 5}, "says fraud version 5"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_model_yaml_names_the_problem(repo: Repository, onnx4: str, case: str) -> None:
    register(repo, "fraud", onnx4)
    path = stored(repo, "fraud", 1, "model.yaml")
    data = yaml.safe_load(repo.fs.cat_file(path))
    change, expected = MALFORMED[case]
    changed = change(data)
    text = changed if isinstance(changed, str) else yaml.safe_dump(changed)
    put(repo, path, text.encode())
    with pytest.raises(RepositoryError, match=expected) as info:
        Repository(repo.url).read_config("fraud", 1)
    assert str(info.value).startswith("fraud/1/model.yaml")


# --- parse_tensor_arg -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("input:FP32:-1,32", TensorSpec("input", "FP32", [-1, 32])),
        ("x:INT64:3", TensorSpec("x", "INT64", [3])),
        ("text:BYTES:", TensorSpec("text", "BYTES", [])),
        (" probs:FP64:-1,2 ", TensorSpec("probs", "FP64", [-1, 2])),
        ("ns/in.0:UINT8:-1,3,224,224", TensorSpec("ns/in.0", "UINT8", [-1, 3, 224, 224])),
    ],
)
def test_parse_tensor_arg_good(text: str, expected: TensorSpec) -> None:
    assert parse_tensor_arg(text) == expected


@pytest.mark.parametrize(
    "text", ["input", "input:FP32", "input:fp32:1", "input:FP32:1,,2", "input:FP32:a", ":FP32:1"]
)
def test_parse_tensor_arg_bad_format(text: str) -> None:
    with pytest.raises(RepositoryError, match=r"expected name:DATATYPE:shape"):
        parse_tensor_arg(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("input:FP99:-1", "unknown datatype 'FP99'"),
        pytest.param("input:FP32:0,4", "positive integers or -1"),
        pytest.param("input:FP32:-2", "positive integers or -1"),
    ],
)
def test_parse_tensor_arg_bad_values(text: str, expected: str) -> None:
    with pytest.raises(RepositoryError, match=expected) as info:
        parse_tensor_arg(text)
    assert text in str(info.value)


# --- registration errors --------------------------------------------------------------------


def test_register_unknown_file_type_asks_for_runtime(repo: Repository, tmp_path: Path) -> None:
    artifact = tmp_path / "model.bin"
    artifact.write_bytes(b"\x00\x01 not a model")
    with pytest.raises(RepositoryError, match=r"cannot tell the runtime of .*pass --runtime"):
        register(repo, "blob", str(artifact))
    with pytest.raises(RepositoryError, match="unknown runtime 'tensorflow'"):
        register(repo, "blob", str(artifact), runtime="tensorflow")
    assert repo.list_versions("blob") == []


def test_register_missing_artifact(repo: Repository, tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="does not exist"):
        register(repo, "fraud", str(tmp_path / "absent.onnx"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RepositoryError, match="is empty"):
        register(repo, "fraud", str(empty), runtime="python")


PY_MODEL = """\
import numpy as np

class Model:
    def predict(self, inputs):
        return {"y": np.asarray(inputs["x"]) * 2}
"""


def test_register_without_inferable_signature_needs_input_and_output(
    repo: Repository, tmp_path: Path
) -> None:
    artifact = tmp_path / "double.py"
    artifact.write_text(PY_MODEL)
    with pytest.raises(RepositoryError, match=r"pass --input and --output name:DATATYPE:shape"):
        register(repo, "double", str(artifact))
    with pytest.raises(RepositoryError, match=r"pass --output name:DATATYPE:shape") as info:
        register(repo, "double", str(artifact), inputs=[parse_tensor_arg("x:FP32:-1")])
    assert "--input" not in str(info.value).split("(")[0]
    assert repo.list_versions("double") == []

    config = register(
        repo,
        "double",
        str(artifact),
        inputs=[parse_tensor_arg("x:FP32:-1")],
        outputs=[parse_tensor_arg("y:FP32:-1")],
    )
    assert config.runtime == "python"
    assert config.inputs == [TensorDecl(name="x", datatype="FP32", shape=[-1])]
    assert config.sha256 == {"double.py": sha256_of(str(artifact))}


def test_register_folder_artifact_records_every_file(repo: Repository, tmp_path: Path) -> None:
    folder = tmp_path / "pymodel"
    (folder / "assets").mkdir(parents=True)
    (folder / "model.py").write_text(PY_MODEL)
    (folder / "assets" / "vocab.txt").write_text("a\nb\n")
    config = register(
        repo,
        "double",
        str(folder),
        inputs=[parse_tensor_arg("x:FP32:-1")],
        outputs=[parse_tensor_arg("y:FP32:-1")],
    )
    assert config.artifact == "pymodel"
    assert config.sha256 == {
        "pymodel/assets/vocab.txt": sha256_of(str(folder / "assets" / "vocab.txt")),
        "pymodel/model.py": sha256_of(str(folder / "model.py")),
    }
    verify(config, repo.fetch(config))


@pytest.mark.parametrize(
    ("kwargs", "error", "expected"),
    [
        # a name is a request-level mistake (the same BadRequest a server answers), checked
        # before the artifact is even opened
        ({"name": "bad name!"}, BadRequest, "model name 'bad name!' contains ' '"),
        ({"device": "gpu"}, RepositoryError, "device"),
        ({"instances": 0}, RepositoryError, "instances"),
    ],
    ids=["name", "device", "instances"],
)
def test_register_invalid_settings_are_refused(
    tmp_path: Path, onnx4: str, kwargs: dict, error: type[Exception], expected: str
) -> None:
    repo = Repository(str(tmp_path / "repo"))
    settings = dict(kwargs)
    name = settings.pop("name", "fraud")
    with pytest.raises(error, match=re.escape(expected)):
        register(repo, name, onnx4, **settings)
    assert not os.path.exists(tmp_path / "repo")


def test_model_config_yaml_is_valid_for_the_architecture_example() -> None:
    text = """
name: fraud
version: 3
runtime: onnx
artifact: model.onnx
sha256: {model.onnx: 9f2c}
inputs:  [{name: input, datatype: FP32, shape: [-1, 32]}]
outputs: [{name: probabilities, datatype: FP32, shape: [-1, 2]},
          {name: label, datatype: INT64, shape: [-1]}]
batching: {max_batch_size: 32, max_queue_delay_us: 1000}
instances: 1
device: cpu
metadata: {training_data: s3://lake/fraud/2026-11-01, auc: 0.91}
"""
    config = ModelConfig.from_yaml(text, "example")
    assert config.max_batch_size == 32
    assert [o.name for o in config.outputs] == ["probabilities", "label"]
    assert ModelConfig.from_yaml(config.to_yaml(), "again") == config


def test_concurrent_registrations_get_distinct_versions(
    repo: Repository, onnx4: str, onnx8: str
) -> None:
    import concurrent.futures

    sources = [onnx4, onnx8] * 3
    with concurrent.futures.ThreadPoolExecutor(len(sources)) as pool:
        # Each thread its own Repository, as separate processes would have.
        configs = list(pool.map(lambda src: register(Repository(repo.url), "race", src), sources))
    assert sorted(c.version for c in configs) == [1, 2, 3, 4, 5, 6]
    assert repo.list_versions("race") == [1, 2, 3, 4, 5, 6]
    for config, src in zip(configs, sources, strict=True):
        stored_bytes = repo.fs.cat_file(stored(repo, "race", config.version, "model.onnx"))
        assert stored_bytes == Path(src).read_bytes(), f"version {config.version} mixed files"


def test_a_crashed_registration_never_lends_its_number_to_other_files(
    repo: Repository, onnx4: str
) -> None:
    put(repo, f"{repo.version_path('crashed', 1)}/.claim", b"1234@elsewhere\n")
    assert repo.list_versions("crashed") == []  # not a version: no model.yaml
    assert register(repo, "crashed", onnx4).version == 2
    with pytest.raises(RepositoryError, match="version 1 is taken by another registration"):
        register(repo, "crashed", onnx4, version=1)


# --- names and versions cannot leave the repository ------------------------------------------

# (name, what the 400 says): every way found so far of writing "somewhere else" as a model name
ESCAPES = [
    ("../outside", "contains '/'"),
    ("..", "contains '..'"),
    ("%2e%2e", "contains '%'"),
    ("..%2Foutside", "contains '..'"),
    ("/etc", "contains '/'"),
    ("a/../../b", "contains '/'"),
    ("..\\outside", "contains '\\'"),
    ("fraud\x00.yaml", "a NUL byte"),
    ("fraud\n", "contains '\\n'"),
    (".hidden", "must start with a letter or a digit"),
    ("-rf", "must start with a letter or a digit"),
    ("frâud", "contains '\\xe2'"),
    ("", "model name is empty"),
    ("x" * 129, "129 characters long; the limit is 128"),
]


@pytest.fixture
def beside(tmp_path: Path, onnx4: str) -> tuple[Repository, Repository]:
    """(the repository, a valid repository right next to it) with model 'fraud' in each: what a
    name escaping the first would find."""
    repo = Repository(str(tmp_path / "repo"))
    outside = Repository(str(tmp_path / "outside"))
    register(repo, "fraud", onnx4)
    register(outside, "fraud", onnx4)
    return repo, outside


def spy_paths(monkeypatch: pytest.MonkeyPatch, repo: Repository) -> list[str]:
    """Every path the repository's filesystem is asked about from now on."""
    seen: list[str] = []
    for method in ("open", "exists", "ls", "makedirs", "put_file", "info", "isdir"):
        real = getattr(repo.fs, method)

        def spy(
            path: str, *args: object, _real: Callable[..., object] = real, **kw: object
        ) -> object:
            seen.append(str(path))
            return _real(path, *args, **kw)

        monkeypatch.setattr(repo.fs, method, spy)
    return seen


@pytest.mark.parametrize(("name", "says"), ESCAPES, ids=[ascii(n)[:24] for n, _ in ESCAPES])
def test_a_model_name_cannot_leave_the_repository(
    beside: tuple[Repository, Repository],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    says: str,
) -> None:
    repo, _ = beside
    seen = spy_paths(monkeypatch, repo)
    calls: list[Callable[[], object]] = [
        lambda: repo.list_versions(name),
        lambda: repo.read_config(name, 1),
        lambda: repo.aliases(name),
        lambda: repo.resolve_version(name, None),
        lambda: repo.resolve_version(name, "1"),
        lambda: repo.set_alias(name, "production", 1),
        lambda: repo.remove_alias(name, "production"),
        lambda: repo.version_path(name, 1),
    ]
    for call in calls:
        with pytest.raises(BadRequest) as caught:
            call()
        assert says in caught.value.message
        assert caught.value.status == 400 and caught.value.grpc_code == "INVALID_ARGUMENT"
    assert seen == []  # refused before the filesystem was asked anything


def test_register_refuses_an_escaping_name_before_writing(
    beside: tuple[Repository, Repository], onnx4: str, tmp_path: Path
) -> None:
    repo, outside = beside
    with pytest.raises(BadRequest, match="contains '/'"):
        register(repo, "../outside/fraud", onnx4)
    assert outside.list_versions("fraud") == [1]
    assert not (tmp_path / "outside" / "fraud" / "2").exists()


@pytest.mark.parametrize(
    ("version", "says"),
    [
        (0, "version 0 is out of range"),
        (-1, "version -1 is out of range"),
        (True, "is not a version number"),
        ("../1", "'../1' is not a positive integer"),
        ("1/../../x", "is not a positive integer"),
        ("²", "is not a positive integer"),  # str.isdigit() says yes, int() raises
        ("\u0661", "is not a positive integer"),  # Arabic-Indic 1: int() would take it
        (10**19, "out of range"),
    ],
)
def test_a_version_number_cannot_leave_the_model(
    beside: tuple[Repository, Repository], version: object, says: str
) -> None:
    repo, _ = beside
    for call in (repo.version_path, repo.read_config):
        with pytest.raises(BadRequest, match=re.escape(says)):
            call("fraud", version)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("ref", "says"),
    [
        ("../outside", "neither a version number nor an alias"),
        ("prod uction", "neither a version number nor an alias"),
        ("²", "neither a version number nor an alias"),
        ("production\n", "neither a version number nor an alias"),
        (0, "out of range"),
    ],
)
def test_a_version_reference_is_a_number_or_an_alias(
    beside: tuple[Repository, Repository], ref: object, says: str
) -> None:
    repo, _ = beside
    with pytest.raises(BadRequest, match=says):
        repo.resolve_version("fraud", ref)  # type: ignore[arg-type]
    repo.set_alias("fraud", "production", 1)
    assert repo.resolve_version("fraud", "production") == 1
    assert repo.resolve_version("fraud", "1") == 1
    assert repo.resolve_version("fraud", 1) == 1


def test_listing_skips_folders_that_are_no_model_or_version(
    beside: tuple[Repository, Repository], tmp_path: Path
) -> None:
    repo, _ = beside
    root = tmp_path / "repo"
    for odd in (".hidden", "a..b", "fraud\n", "-x"):
        (root / odd / "1").mkdir(parents=True)
        (root / odd / "1" / "model.yaml").write_text("name: x\n")
    (root / "fraud" / "²").mkdir()  # isdigit() but not a number int() takes: was a ValueError
    (root / "fraud" / "²" / "model.yaml").write_text("name: fraud\n")
    assert repo.list_models() == ["fraud"]
    assert repo.list_versions("fraud") == [1]


def test_a_path_built_below_a_model_stays_in_the_repository(
    beside: tuple[Repository, Repository],
) -> None:
    """The second check, for a path a future caller builds with separators in it."""
    repo, _ = beside
    with pytest.raises(BadRequest, match="the path leaves the repository"):
        repo._model_path("fraud", "..", "..", "outside", "fraud")
    assert repo._model_path("fraud", "1", "model.yaml").endswith("/repo/fraud/1/model.yaml")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("artifact", "../../outside/fraud/1/model.onnx"),
        ("artifact", "/etc/passwd"),
        ("sha256", {"../../../evil.py": "00"}),
        ("sha256", {"model.onnx": "00", "sub//x": "00"}),
        ("sha256", {"a\\..\\b": "00"}),
    ],
)
def test_model_yaml_cannot_point_outside_its_version(
    beside: tuple[Repository, Repository], tmp_path: Path, field: str, value: object
) -> None:
    """model.yaml names the files the loader opens and the download cache writes: both must stay
    in the version folder."""
    repo, _ = beside
    path = tmp_path / "repo" / "fraud" / "1" / "model.yaml"
    doc = yaml.safe_load(path.read_text())
    doc[field] = value
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(RepositoryError, match=f"{field}"):
        repo.read_config("fraud", 1)


# --- residency fields from `models register` ----------------------------------------------


def test_register_records_residency_idle_unload_and_memory(repo: Repository, onnx4: str) -> None:
    config = register(
        repo, "fraud", onnx4, residency="on_demand", idle_unload_s=30.5, memory="512MiB"
    )
    read = repo.read_config("fraud", config.version)
    assert read.residency == "on_demand"
    assert read.idle_unload_s == 30.5
    assert read.memory_hint == 512 * 1024**2
    plain = register(repo, "fraud", onnx4)
    text = repo.fs.cat_file(posixpath.join(repo.version_path("fraud", plain.version), "model.yaml"))
    doc = yaml.safe_load(text)
    assert not {"residency", "idle_unload_s", "resources"} & set(doc)  # unset: the server decides


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"residency": "always"}, "residency: Input should be 'pinned' or 'on_demand'"),
        ({"idle_unload_s": 0.0}, "idle_unload_s: Input should be greater than 0"),
        ({"memory": "lots"}, "resources.memory: .*'lots' is not a size"),
    ],
)
def test_register_refuses_bad_residency_settings_before_writing(
    repo: Repository, onnx4: str, settings: dict[str, object], says: str
) -> None:
    with pytest.raises(RepositoryError, match=says):
        register(repo, "fraud", onnx4, **settings)  # type: ignore[arg-type]
    assert repo.list_versions("fraud") == []


def test_models_register_command_writes_residency_fields(onnx4: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from inferplane.cli import app

    root = str(tmp_path / "repo")
    args = ["models", "register", "fraud", onnx4, "-r", root]
    extra = ["--residency", "pinned", "--idle-unload-s", "120", "--memory", "1.5G"]
    result = CliRunner().invoke(app, [*args, *extra])
    assert result.exit_code == 0, result.output
    config = Repository(root).read_config("fraud", 1)
    assert (config.residency, config.idle_unload_s, config.memory_hint) == (
        "pinned",
        120.0,
        15 * 10**8,
    )

    bad = CliRunner().invoke(app, [*args, "--residency", "sometimes"])
    assert bad.exit_code == 2
    assert "residency" in bad.output and "Traceback" not in bad.output
    assert Repository(root).list_versions("fraud") == [1]
