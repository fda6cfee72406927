"""Real headless Chromium (Debian's chromium + chromedriver, scripts/system_deps.sh) against a
real server's /console, for tests/console/test_console.py and for the screenshots in the docs:

    .venv/bin/python -m tests.console.harness --out docs/images

builds the example repository into a temporary folder, serves it with an audit sink, sends some
traffic and writes console-desktop.png (1440x900 viewport, the whole page) and console-phone.png
(390x844).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.integration.servers import ROOT, ServerProcess, start_server

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
MISSING = "run ./scripts/system_deps.sh (apt-get install chromium chromium-driver)"
DESKTOP, PHONE = (1440, 900), (390, 844)
ROW = [0.1 * i for i in range(32)]  # one row of the example `tabular` model's input
DEMO_REQUEST_ID = "checkout-7f3a-0042"  # the request the screenshots search the audit for


def chromium_missing() -> str | None:
    """Why the browser cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing: {MISSING}"
    return None


def build_examples(out: Path) -> Path:
    """The example repository (models + services.yaml) built into `out`; returns its folder."""
    repo = out / "models"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "build_models.py"), "--out", str(repo),
         "--artifacts", str(out / "artifacts")],
        check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    return repo


def browser(viewport: tuple[int, int] = DESKTOP, *, mobile: bool = False) -> Any:
    """A headless Chromium whose page is exactly `viewport` CSS pixels, logging the browser
    console (goog:loggingPrefs) for `severe()`."""
    why = chromium_missing()
    if why is not None:
        raise RuntimeError(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-extensions", "--no-first-run", "--hide-scrollbars",
        f"--window-size={viewport[0]},{viewport[1]}",
    ):  # fmt: skip
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    set_viewport(driver, viewport, mobile=mobile)
    return driver


def set_viewport(driver: Any, viewport: tuple[int, int], *, mobile: bool = False) -> None:
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": viewport[0], "height": viewport[1], "deviceScaleFactor": 1, "mobile": mobile},
    )


def severe(driver: Any, allowed: Callable[[str], bool] = lambda message: False) -> list[str]:
    """The browser console's SEVERE entries since the last call, less those `allowed`."""
    return [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and not allowed(e["message"])
    ]


def wait_for(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """`check()`'s first truthy value, polled until `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # an element re-rendered under us: look again
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def ticks(driver: Any) -> int:
    return int(driver.execute_script("return Number(document.body.dataset.ticks || 0)"))


def next_poll(driver: Any, polls: int = 1, timeout: float = 15.0) -> None:
    """Return once the page finished `polls` more polls of the server."""
    start = ticks(driver)
    wait_for(lambda: ticks(driver) >= start + polls, timeout, f"{polls} more console polls")


def infer(
    client: httpx.Client,
    target: str,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    body: dict[str, Any] = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": ROW}]
    }
    if request_id is not None:
        body["id"] = request_id
    r = client.post(f"/v2/models/{target}/infer", json=body, headers=headers or {})
    assert r.status_code == 200, r.text
    return r


def traffic(url: str, n: int = 300) -> None:
    """Some service and model traffic, with a few A/B calls, for the screenshots."""
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(n):
            infer(client, "reco", headers={"x-user": f"user-{i % 40}"})
            if i % 10 == 0:
                infer(client, "reco", headers={"x-arm": "b"})
            if i % 3 == 0:
                infer(client, "tabular")
        for model in ("xgb", "torch_mlp"):
            for _ in range(n // 10):
                infer(client, model)


def screenshots(url: str, out: Path, settle_s: float = 4.5) -> list[Path]:
    """console-desktop.png (the whole page at a 1440x900 viewport) and console-phone.png (the
    390x844 viewport) of a running server's console, with traffic flowing while they load."""
    import base64
    import threading

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, viewport, mobile in (("desktop", DESKTOP, False), ("phone", PHONE, True)):
        driver = browser(viewport, mobile=mobile)
        try:
            driver.get(url + "/console")
            next_poll(driver)
            # traffic while the page watches: the live splits and the last-minute plots fill
            sender = threading.Thread(target=traffic, args=(url, 200))
            sender.start()
            sender.join()
            with httpx.Client(base_url=url, timeout=30) as client:
                infer(client, "reco", DEMO_REQUEST_ID, {"x-user": "user-7"})
            # the audit panel as a search shows it (and keeps the picture short)
            driver.find_element("id", "audit-request-id").send_keys(DEMO_REQUEST_ID)
            driver.find_element("css selector", "#audit-search button[type=submit]").click()
            time.sleep(settle_s)
            # the desktop picture is the whole page; the phone's scrolls to the services and
            # latency cards under the sticky header (the models' cards come first on a phone)
            driver.execute_script(
                "const top = document.querySelector('.top').offsetHeight;"
                "window.scrollTo(0, arguments[0] ? "
                "document.getElementById('services-card').offsetTop - top - 12 : 0)",
                mobile,
            )
            time.sleep(0.3)
            path = out / f"console-{name}.png"
            if mobile:
                driver.save_screenshot(str(path))
            else:
                height = int(driver.execute_script("return document.documentElement.scrollHeight"))
                shot = driver.execute_cdp_cmd(
                    "Page.captureScreenshot",
                    {
                        "format": "png",
                        "captureBeyondViewport": True,
                        "clip": {
                            "x": 0,
                            "y": 0,
                            "width": viewport[0],
                            "height": height,
                            "scale": 1,
                        },
                    },
                )
                path.write_bytes(base64.b64decode(shot["data"]))
            problems = severe(driver)
            if problems:
                raise AssertionError(f"browser console errors on the {name} page: {problems}")
            written.append(path)
        finally:
            driver.quit()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="inferplane-console-") as tmp:
        base = Path(tmp)
        repo = build_examples(base)
        server: ServerProcess = start_server(repo, base)
        try:
            traffic(server.url)
            for path in screenshots(server.url, args.out):
                print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
