"""A policy from a Kubernetes ConfigMap volume with --watch: the kubelet's atomic update (a new
timestamped folder, the `..data` link swapped to it by rename, the old folder removed) reaches
the server, as docs/deploy.md says. The layout is the kubelet's AtomicWriter one, made by hand:
no cluster here."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from tests.integration.rollout_models import build_reco
from tests.integration.servers import start_server

POLICY = "services:\n  svc:\n    routes: [{target: 'reco:%d', weight: 100}]\n"
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": [0.7] * 32}]}


def _publish(volume: Path, stamp: str, text: str) -> None:
    """What the kubelet does on a ConfigMap change: write a new folder, swap `..data` to it."""
    folder = volume / f"..{stamp}"
    folder.mkdir()
    (folder / "services.yaml").write_text(text)
    old = os.readlink(volume / "..data") if (volume / "..data").is_symlink() else None
    os.symlink(folder.name, volume / "..data_tmp")
    os.rename(volume / "..data_tmp", volume / "..data")
    if not (volume / "services.yaml").is_symlink():
        os.symlink("..data/services.yaml", volume / "services.yaml")
    if old is not None:
        for f in (volume / old).iterdir():
            f.unlink()
        (volume / old).rmdir()


def test_a_configmap_update_reaches_a_watching_server(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    build_reco(repo)
    volume = tmp_path / "configmap"
    volume.mkdir()
    _publish(volume, "2026_12_08_01", POLICY % 1)
    srv = start_server(repo, tmp_path, "--services", str(volume / "services.yaml"), "--watch",
                       "--watch-interval", "0.2", grpc=False)  # fmt: skip
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            assert c.post("/v2/models/svc/infer", json=BODY).json()["model_version"] == "1"
            _publish(volume, "2026_12_08_02", POLICY % 2)
            deadline = time.monotonic() + 10
            version = "1"
            while version != "2" and time.monotonic() < deadline:
                time.sleep(0.1)
                answer = c.post("/v2/models/svc/infer", json=BODY)
                assert answer.status_code == 200, answer.text  # no failed call during the swap
                version = answer.json()["model_version"]
            assert version == "2", srv.log()
            # A broken ConfigMap is refused and the policy in force stays.
            _publish(volume, "2026_12_08_03", "services: {svc: {routes: []}}\n")
            deadline = time.monotonic() + 10
            while "previous policy stays in force" not in srv.log():
                assert time.monotonic() < deadline, srv.log()
                time.sleep(0.1)
            assert c.post("/v2/models/svc/infer", json=BODY).json()["model_version"] == "2"
    finally:
        srv.stop()
