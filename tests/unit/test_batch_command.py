"""`inferplane batch` without its extras: one line naming what to install, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("blocked", "engine", "hint"),
    [
        ("pyarrow", "local", "the 'pyarrow' package is not installed; install it with pip install 'inferplane[batch]'"),
        ("ray", "ray", "the 'ray[data]' package is not installed; install it with pip install 'inferplane[ray]'"),
    ],
)  # fmt: skip
def test_a_missing_extra_is_one_line_with_the_install_hint(
    tmp_path: Path, blocked: str, engine: str, hint: str
) -> None:
    code = f"import sys; sys.modules[{blocked!r}] = None\nfrom inferplane.cli import main\nmain()\n"
    args = ["batch", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-s", "m",
            "-r", str(tmp_path), "--engine", engine]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"error: {hint}"
