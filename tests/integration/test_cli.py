"""The `inferplane` command line, run for real as a subprocess."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from inferplane.repository import Repository

MakeModel = Callable[..., str]
WIDE = {"COLUMNS": "400"}  # rich wraps at 80 columns when stdout is not a terminal
CLI_TIMEOUT = 120


def cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, narrow: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run `python -m inferplane ARGS`; `narrow` leaves the width to rich (80 when piped)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    if not narrow:
        full_env.update(WIDE)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "inferplane", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result.stdout


def assert_one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    assert expected in lines[0], lines[0]


def table_row(text: str, first_cell: str) -> list[str]:
    """The cells of the rich table row whose first cell is `first_cell`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃").split("│")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row '{first_cell}' in:\n{text}")


# --- help -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["version"],
        ["models"],
        ["models", "register"],
        ["models", "list"],
        ["models", "show"],
        ["models", "alias"],
    ],
    ids=lambda c: " ".join(c) or "inferplane",
)
def test_help_of_every_command(command: list[str]) -> None:
    out = ok(cli(*command, "--help"))
    assert "Usage:" in out
    assert f"inferplane {' '.join(command)}".strip() in out


def test_version_command() -> None:
    from inferplane import __version__

    assert ok(cli("version")).strip() == f"inferplane {__version__}"


# --- the models commands --------------------------------------------------------------------


def test_register_list_show_alias(tmp_path: Path, make_onnx_model: MakeModel) -> None:
    repo_dir = tmp_path / "repo"
    r = ["--repository", str(repo_dir)]
    model4 = make_onnx_model(tmp_path / "v1" / "model.onnx", n_features=4)
    model8 = make_onnx_model(tmp_path / "v2" / "model.onnx", n_features=8)
    sha4 = hashlib.sha256(Path(model4).read_bytes()).hexdigest()
    sha8 = hashlib.sha256(Path(model8).read_bytes()).hexdigest()

    out = ok(
        cli(
            "models",
            "register",
            "fraud",
            model4,
            *r,
            "--alias",
            "production",
            "--metadata",
            "auc=0.91",
            "--metadata",
            "training_data=s3://lake/fraud",
            "--max-batch-size",
            "16",
        )
    )
    assert "registered fraud version 1 (onnx)" in out
    out = ok(cli("models", "register", "fraud", model8, *r))
    assert "registered fraud version 2 (onnx)" in out

    # what the CLI wrote, read back through the library
    repo = Repository(str(repo_dir))
    assert repo.list_versions("fraud") == [1, 2]
    v1 = repo.read_config("fraud", 1)
    assert v1.metadata["auc"] == 0.91  # a number, not the string "0.91"
    assert v1.metadata["training_data"] == "s3://lake/fraud"
    assert v1.max_batch_size == 16
    assert v1.sha256 == {"model.onnx": sha4}
    assert repo.read_config("fraud", 2).batching is None
    assert repo.aliases("fraud") == {"production": 1}

    listing = ok(cli("models", "list", *r))
    assert table_row(listing, "fraud") == ["fraud", "1, 2", "2", "onnx", "production→1"]

    shown = ok(cli("models", "show", "fraud", *r))  # production, not the latest
    assert "fraud version 1" in shown
    assert table_row(shown, "aliases")[1] == "production"
    assert table_row(shown, "input")[1] == "input  FP32  [-1, 4]"
    assert table_row(shown, "output")[1] == "output  FP32  [-1, 1]"
    assert table_row(shown, "batching")[1].startswith("max_batch_size=16 ")
    assert table_row(shown, "sha256")[1] == f"model.onnx  {sha4}"
    assert table_row(shown, "metadata.auc")[1] == "0.91"

    shown = ok(cli("models", "show", "fraud", "--version", "2", *r))
    assert "fraud version 2" in shown
    assert table_row(shown, "input")[1] == "input  FP32  [-1, 8]"
    assert table_row(shown, "sha256")[1] == f"model.onnx  {sha8}"
    assert table_row(shown, "batching")[1] == "off"
    assert table_row(shown, "aliases")[1] == "-"

    assert "fraud: staging → version 2" in ok(cli("models", "alias", "fraud", "staging", "2", *r))
    assert table_row(ok(cli("models", "list", *r)), "fraud")[4] == "production→1, staging→2"
    assert "fraud version 2" in ok(cli("models", "show", "fraud", "--version", "staging", *r))

    out = ok(cli("models", "alias", "fraud", "production", "--remove", *r))
    assert "removed alias production of fraud" in out
    assert repo.aliases("fraud") == {"staging": 2}
    assert "fraud version 2" in ok(cli("models", "show", "fraud", *r))  # now the latest

    # INFERPLANE_REPOSITORY stands in for --repository
    listing = ok(cli("models", "list", env={"INFERPLANE_REPOSITORY": str(repo_dir)}))
    assert table_row(listing, "fraud")[1] == "1, 2"


@pytest.fixture
def registered(tmp_path: Path, make_onnx_model: MakeModel) -> Path:
    """tmp_path holding m.onnx and ./repo with fraud v1 (so that paths in messages are short)."""
    make_onnx_model(tmp_path / "m.onnx")
    ok(cli("models", "register", "fraud", "m.onnx", "-r", "repo", cwd=tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["models", "show", "nope", "-r", "repo"], "unknown model 'nope'"),
        (["models", "show", "fraud", "--version", "9", "-r", "repo"], "has no version 9"),
        (["models", "show", "fraud", "--version", "beta", "-r", "repo"], "alias 'beta'"),
        (["models", "alias", "fraud", "production", "9", "-r", "repo"], "has no version 9"),
        (["models", "alias", "fraud", "1st", "1", "-r", "repo"], "alias '1st'"),
        (["models", "alias", "fraud", "gone", "--remove", "-r", "repo"], "no alias 'gone'"),
        (["models", "list", "-r", "nowhere"], "repository 'nowhere' does not exist"),
        (["models", "register", "fraud", "absent.onnx", "-r", "repo"], "does not exist"),
        (
            ["models", "register", "fraud", "m.onnx", "-r", "repo", "--input", "input-FP32-4"],
            "tensor 'input-FP32-4': expected name:DATATYPE:shape",
        ),
        (
            ["models", "register", "fraud", "m.onnx", "-r", "repo", "--runtime", "tf"],
            "unknown runtime 'tf'",
        ),
    ],
    ids=[
        "unknown-model",
        "unknown-version",
        "unknown-alias",
        "alias-unknown-version",
        "bad-alias-name",
        "remove-unknown-alias",
        "missing-repository",
        "missing-artifact",
        "bad-input-spec",
        "unknown-runtime",
    ],
)
def test_errors_are_one_line_with_exit_code_2(
    registered: Path, args: list[str], expected: str
) -> None:
    # wide: long messages piped at 80 columns have their own test below
    result = cli(*args, cwd=registered)
    assert_one_line_error(result, expected)
    assert result.stdout == ""


def test_register_unknown_file_type_asks_for_runtime(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0\1\2")
    result = cli("models", "register", "blob", "weights.bin", "-r", "repo", cwd=tmp_path)
    assert_one_line_error(result, "pass --runtime")


def test_register_without_signature_names_input(tmp_path: Path) -> None:
    (tmp_path / "double.py").write_text(
        "class Model:\n    def predict(self, inputs):\n        return {'y': inputs['x'] * 2}\n"
    )
    result = cli("models", "register", "double", "double.py", "-r", "repo", cwd=tmp_path)
    assert_one_line_error(result, "pass --input and --output name:DATATYPE:shape")
    result = cli(
        "models",
        "register",
        "double",
        "double.py",
        "-r",
        "repo",
        "--input",
        "x:FP32:-1",
        "--output",
        "y:FP32:-1",
        cwd=tmp_path,
    )
    assert "registered double version 1 (python)" in ok(result)


def test_alias_without_version_or_remove_is_a_usage_error(registered: Path) -> None:
    result = cli("models", "alias", "fraud", "production", "-r", "repo", cwd=registered)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "give the VERSION the alias points to, or --remove" in result.stderr


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        pytest.param(["--input", "input:FP99:-1,4"], "FP99"),
        pytest.param(["--input", "input:FP32:0,4"], "-1"),
        pytest.param(["--device", "gpu"], "device"),
        pytest.param(["--instances", "0"], "instances"),
    ],
    ids=["unknown-datatype", "zero-dimension", "bad-device", "zero-instances"],
)
def test_invalid_register_values_are_one_line_errors(
    registered: Path, option: list[str], expected: str
) -> None:
    result = cli(
        "models", "register", "fraud", "m.onnx", "-r", "repo", *option, cwd=registered, narrow=True
    )
    assert result.returncode != 0
    assert_one_line_error(result, expected)
    assert Repository(str(registered / "repo")).list_versions("fraud") == [1]


def test_long_error_stays_on_one_line_when_piped(registered: Path) -> None:
    deep = "a/very/long/path/that/goes/on/and/on/for/quite/a/while/model.onnx"
    result = cli("models", "register", "fraud", deep, "-r", "repo", cwd=registered, narrow=True)
    assert_one_line_error(result, "does not exist")


def test_show_prints_the_full_sha256_when_piped(registered: Path) -> None:
    digest = hashlib.sha256((registered / "m.onnx").read_bytes()).hexdigest()
    shown = ok(cli("models", "show", "fraud", "-r", "repo", cwd=registered, narrow=True))
    assert digest in shown


@pytest.mark.parametrize("where", ["/nonexistent", "relative/missing"])
def test_serve_missing_repository_fails_clearly(tmp_path: Path, where: str) -> None:
    result = cli("serve", "--repository", where, "--http-port", "1", cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert f"repository '{where}' does not exist" in result.stderr


# --- S3: register through the CLI, serve from S3, infer over V2 HTTP --------------------------


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} not 200 within {timeout} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


@pytest.mark.s3
def test_serve_from_s3_and_infer(
    moto_s3: object, tmp_path: Path, make_onnx_model: MakeModel, free_port: Callable[[], int]
) -> None:
    try:
        import httpx
    except ImportError:
        pytest.fail("needs httpx: pip install httpx (or pip install -e '.[dev]')")
    bucket = moto_s3.new_bucket("serve")  # type: ignore[attr-defined]
    url = f"s3://{bucket}/models"
    model4 = make_onnx_model(tmp_path / "v1" / "model.onnx", n_features=4)
    model8 = make_onnx_model(tmp_path / "v2" / "model.onnx", n_features=8)
    ok(cli("models", "register", "fraud", model4, "-r", url, "--alias", "production"))
    ok(cli("models", "register", "fraud", model8, "-r", url))
    assert table_row(ok(cli("models", "list", "-r", url)), "fraud")[1:3] == ["1, 2", "2"]
    assert Repository(url).list_versions("fraud") == [1, 2]  # it really is in the bucket

    port = free_port()
    log = tmp_path / "server.log"
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp_path)  # the S3 download cache lands in tmp_path
    env["INFERPLANE_AUDIT"] = str(tmp_path / "audit.db")  # not the working directory
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "inferplane",
                "serve",
                "--repository",
                url,
                "--grpc-port",
                "0",
                "--http-port",
                str(port),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(proc, f"{base}/v2/health/ready", log)

        # the default version is the production alias: v1, 4 features
        body = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 4],
                    "datatype": "FP32",
                    "data": [1, 2, 3, 4, 0.5, 0.25, 0.125, -1],
                }
            ]
        }
        resp = httpx.post(f"{base}/v2/models/fraud/infer", json=body, timeout=30)
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        assert answer["model_name"] == "fraud"
        assert answer["model_version"] == "1"
        (out,) = answer["outputs"]
        assert out["name"] == "output"
        assert out["datatype"] == "FP32"
        assert out["shape"] == [2, 1]
        assert out["data"] == pytest.approx([10.0, -0.125])

        # version 2 from the same bucket takes 8 features
        body8 = {
            "inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [1] * 8}]
        }
        resp = httpx.post(f"{base}/v2/models/fraud/versions/2/infer", json=body8, timeout=30)
        assert resp.status_code == 200, resp.text
        assert resp.json()["model_version"] == "2"
        assert resp.json()["outputs"][0]["data"] == pytest.approx([8.0])

        # the S3 artifact was fetched into the cache and verified, byte for byte
        # (one content-keyed entry per version: v1 and v2 differ)
        cached = list(tmp_path.glob("inferplane-cache/v1/*/model.onnx"))
        assert len(cached) == 2, list(tmp_path.glob("inferplane-cache/**"))
        assert Path(model4).read_bytes() in {c.read_bytes() for c in cached}
    finally:
        proc.send_signal(signal.SIGINT)  # the quick stop: SIGTERM drains first
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
