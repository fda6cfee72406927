"""The web console (/console) in real headless Chromium against real servers over the example
repository: what it shows (models, the `reco` service and its split, latency plots, audit
records, stream lag), that it follows live traffic, that it searches the audit by request id,
that it works at a phone's and a desktop's size, and that with auth on the data endpoints
refuse without a credential while the page asks for one.

Chromium is not optional here: without it the tests fail with how to install it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.console.harness import (
    DESKTOP,
    PHONE,
    browser,
    build_examples,
    chromium_missing,
    infer,
    next_poll,
    screenshots,
    severe,
    wait_for,
)
from tests.integration.brokers import redis_server  # noqa: F401 - the fixture
from tests.integration.servers import ROOT, ServerProcess, start_server

EXAMPLE_MODELS = {
    ("lgbm", "1"), ("mlp", "1"), ("tabular", "1"), ("tabular", "2"), ("tabular_skl", "1"),
    ("text_stats", "1"), ("torch_mlp", "1"), ("xgb", "1"),
}  # fmt: skip
# What a page refused by the edge logs on its own: the browser reports each 401/403/404 answer.
REFUSED = ("status of 401", "status of 403", "status of 404")


@pytest.fixture(scope="module")
def chrome_ok() -> None:
    why = chromium_missing()
    if why is not None:
        pytest.fail(why)


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_examples(tmp_path_factory.mktemp("console-examples"))


@pytest.fixture(scope="module")
def server(examples: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with an audit sink (SQLite, start_server's default) and no auth."""
    srv = start_server(examples, tmp_path_factory.mktemp("console-logs"))
    yield srv
    srv.stop()


@pytest.fixture
def page(chrome_ok: None, server: ServerProcess) -> Iterator[Any]:
    driver = browser(DESKTOP)
    try:
        driver.get(server.url + "/console")
        next_poll(driver)
        yield driver
    finally:
        driver.quit()


def rows(driver: Any, selector: str) -> list[Any]:
    return driver.find_elements("css selector", selector)


def text(driver: Any, selector: str) -> str:
    found = rows(driver, selector)
    return found[0].text if found else ""


def number(driver: Any, selector: str) -> float:
    value = text(driver, selector).replace(",", "").strip()
    return float(value) if value and value not in ("\u2013", "-") else 0.0


def attr(driver: Any, selector: str, name: str) -> str | None:
    found = rows(driver, selector)
    return found[0].get_attribute(name) if found else None


# --- the page and its assets -------------------------------------------------------------------


def test_page_and_assets_are_served_with_types_caching_and_a_csp(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        page = c.get("/console")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["cache-control"] == "no-cache"
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "cdn" not in page.text.lower() and "https://" not in page.text
        assert c.get("/console", headers={"if-none-match": page.headers["etag"]}).status_code == 304
        for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css")):
            marker = f"/console/static/{name}?v="
            assert marker in page.text, name
            url = page.text.split(marker)[1].split('"')[0]
            hashed = c.get(marker + url)
            assert hashed.status_code == 200
            assert hashed.headers["content-type"].startswith(kind)
            assert "immutable" in hashed.headers["cache-control"]
            plain = c.get(f"/console/static/{name}")
            assert plain.headers["cache-control"] == "no-cache"
            assert plain.content == hashed.content
            assert c.head(f"/console/static/{name}").status_code == 200
        missing = c.get("/console/static/../server.py")
        assert missing.status_code == 404 and "error" in missing.json()
        assert c.get("/console/static/nope.js").json()["error"] == "no console file 'nope.js'"


def test_audit_endpoint_reads_the_servers_sink(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        infer(c, "reco", "audit-endpoint-1")
        infer(c, "tabular", "audit-endpoint-2")
        # no wait: the endpoint flushes what the writer thread still holds before it reads
        doc = c.get("/inferplane/audit", params={"request_id": "audit-endpoint-1"}).json()
        assert [r["request_id"] for r in doc["records"]] == ["audit-endpoint-1"]
        record = doc["records"][0]
        assert record["service"] == "reco" and record["model"] == "tabular"
        assert record["status"] == 200 and record["time_iso"].endswith("Z")
        assert doc["sink"].startswith("sqlite:")
        by_model = c.get("/inferplane/audit", params={"service": "tabular", "limit": 1}).json()
        assert [r["request_id"] for r in by_model["records"]] == ["audit-endpoint-2"]
        for bad in ({"limit": "0"}, {"limit": "many"}, {"status": "42"}):
            r = c.get("/inferplane/audit", params=bad)
            assert r.status_code == 400 and "error" in r.json(), bad


# --- what the page shows, live -----------------------------------------------------------------


def test_console_shows_the_server_and_follows_live_traffic(
    page: Any, server: ServerProcess
) -> None:
    d = page
    # models and versions with state, runtime, device and footprint
    shown = {
        (r.get_attribute("data-model"), r.get_attribute("data-version"))
        for r in rows(d, "#models tbody tr[data-model]")
    }
    assert shown == EXAMPLE_MODELS
    tab1 = '#models tr[data-model="tabular"][data-version="1"]'
    wait_for(lambda: text(d, f"{tab1} [data-field=runtime]") == "onnx", what="tabular's runtime")
    assert text(d, f"{tab1} [data-field=device]") == "cpu"
    assert text(d, f"{tab1} [data-field=state]") == "ready"
    assert text(d, f"{tab1} [data-field=footprint]").endswith("iB")
    assert text(d, '#models tr[data-model="lgbm"] [data-field=runtime]') == "lightgbm"

    # the reco service: its split, routes, breakers, no rollout
    reco = '#services .service[data-service="reco"]'
    assert rows(d, reco), d.find_element("id", "services").text
    weights = {
        s.get_attribute("data-route"): s.get_attribute("data-weight")
        for s in rows(d, f"{reco} .split span")
    }
    assert weights == {"primary": "90", "canary": "10"}
    assert text(d, f'{reco} tr[data-route="primary"] [data-field=weight]') == "90%"
    assert text(d, f'{reco} tr[data-route="canary"] [data-field=weight]') == "10%"
    assert text(d, f'{reco} tr[data-route="primary"] [data-field=resolved]') == "tabular@1"
    assert text(d, f'{reco} tr[data-route="primary"] [data-field=breaker]') == "closed"
    assert rows(d, f'{reco} tr[data-route="ab:b"]')
    assert "no rollout" in text(d, reco)

    # stream lag: honest about where it lives
    streams = text(d, "#streams")
    assert "stream lag: see Prometheus / dashboard" in streams
    assert "inferplane_stream_consumer_lag" in streams

    # live traffic moves the counts, the route counts and the latency plot
    def calls(route: str) -> float:
        return number(d, f'{reco} tr[data-route="{route}"] [data-field=calls]')

    routed_before = calls("primary") + calls("canary")
    tab_before = number(d, f"{tab1} [data-field=requests]") + number(
        d, '#models tr[data-model="tabular"][data-version="2"] [data-field=requests]'
    )
    plot = '#latency .plot[data-model="tabular"] canvas'
    total_before = float(attr(d, plot, "data-total") or 0)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for i in range(40):
            infer(c, "reco", headers={"x-user": f"u{i}"})
        last = infer(c, "reco", "console-find-me-42")
    assert last.headers["x-inferplane-route"] in ("primary", "canary")

    wait_for(lambda: calls("primary") + calls("canary") >= routed_before + 41, what="route counts")
    wait_for(
        lambda: (
            number(d, f"{tab1} [data-field=requests]")
            + number(d, '#models tr[data-model="tabular"][data-version="2"] [data-field=requests]')
            >= tab_before + 41
        ),
        what="request counts",
    )
    wait_for(
        lambda: float(attr(d, plot, "data-total") or 0) >= total_before + 41, what="plot total"
    )
    wait_for(lambda: float(attr(d, plot, "data-window-count") or 0) >= 41, what="the live window")
    drawn = [float(x) for x in (attr(d, plot, "data-buckets") or "").split(",") if x]
    assert len(drawn) == 17 and sum(drawn) >= 41  # 16 latency buckets + the +Inf one
    assert text(d, f'{reco} tr[data-route="primary"] [data-field=live]').endswith("%")
    assert text(d, f"{tab1} [data-field=p50]").endswith("s")
    # the canvas has ink on it: some pixel is not transparent
    painted = d.execute_script(
        "const c = document.querySelector(arguments[0]);"
        "const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "for (let i = 3; i < px.length; i += 4) if (px[i]) return true; return false;",
        plot,
    )
    assert painted

    # recent audit records, and a search by request id
    assert attr(d, "#audit-card", "data-audit") == "on"
    wait_for(
        lambda: rows(d, '#audit tr[data-request-id="console-find-me-42"]'),
        what="the request in the recent audit",
    )
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for _ in range(60):
            infer(c, "tabular")  # push it out of the recent 15
    d.find_element("id", "audit-request-id").send_keys("console-find-me-42")
    d.find_element("css selector", "#audit-search button[type=submit]").click()
    hit = '#audit tr[data-request-id="console-find-me-42"]'
    wait_for(lambda: len(rows(d, "#audit tbody tr")) == 1 and rows(d, hit), what="the audit search")
    assert text(d, f"{hit} [data-field=service]") == "reco"
    assert text(d, f"{hit} [data-field=model]") == "tabular"
    assert text(d, f"{hit} [data-field=status]") == "200"
    assert "1 record matches request_id=console-find-me-42" in text(d, "#audit-note")
    d.find_element("id", "audit-clear").click()
    wait_for(
        lambda: len(rows(d, "#audit tbody tr[data-request-id]")) > 1, what="recent records again"
    )

    assert "no write actions" in text(d, "footer")
    assert severe(d) == []


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone-390x844", "desktop-1440x900"])
def test_layout_fits_phone_and_desktop(
    chrome_ok: None, server: ServerProcess, viewport: tuple[int, int]
) -> None:
    d = browser(viewport, mobile=viewport == PHONE)
    try:
        d.get(server.url + "/console")
        next_poll(d, 2)
        width = d.execute_script("return window.innerWidth")
        assert width == viewport[0]
        # nothing wider than the screen: no sideways scrolling of the page
        assert d.execute_script("return document.documentElement.scrollWidth") <= viewport[0]
        cards = d.execute_script(
            "return [...document.querySelectorAll('.card')].map(c => c.getBoundingClientRect())"
            ".map(r => [Math.round(r.left), Math.round(r.right)])"
        )
        assert cards and all(left >= 0 and right <= viewport[0] for left, right in cards)
        heads = d.execute_script(
            "return getComputedStyle(document.querySelector('#models thead')).display"
        )
        if viewport == PHONE:
            assert heads == "none"  # rows become labelled cards
            assert len({left for left, _ in cards}) == 1  # one column
        else:
            assert heads != "none"
            lefts = {left for left, _ in cards}
            assert len(lefts) == 2  # services beside latency
        assert rows(d, '#models tr[data-model="tabular"]')[0].is_displayed()
        assert severe(d) == []
    finally:
        d.quit()


def test_screenshots(chrome_ok: None, server: ServerProcess, tmp_path: Path) -> None:
    """The harness that draws docs/images/console-*.png works (python -m tests.console.harness)."""
    paths = screenshots(server.url, tmp_path, settle_s=2.5)
    assert [p.name for p in paths] == ["console-desktop.png", "console-phone.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 300_000, (p, len(data))


# --- with auth on --------------------------------------------------------------------------------

ACCESS = "keys: keys.yaml\nmetrics: read\n"


def new_key(access: Path, tenant: str, scopes: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "inferplane", "keys", "create", "--access", str(access),
         "--tenant", tenant, "--scopes", scopes, "--principal", f"{tenant}-console"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def guarded(
    examples: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    """A server with --access (API keys) and no audit sink."""
    base = tmp_path_factory.mktemp("console-edge")
    access = base / "access.yaml"
    access.write_text(ACCESS)
    keys = {"reader": new_key(access, "dash", "read"), "admin": new_key(access, "ops", "admin")}
    srv = start_server(examples, base, "--access", str(access), "--audit-sink", "none")
    yield srv, keys
    srv.stop()


DATA = ("/inferplane/models", "/metrics", "/inferplane/services", "/inferplane/audit",
        "/inferplane/rollouts", "/inferplane/streams")  # fmt: skip


def test_with_auth_the_data_refuses_and_the_page_asks_for_a_key(
    chrome_ok: None, guarded: tuple[ServerProcess, dict[str, str]]
) -> None:
    srv, keys = guarded
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        assert c.get("/console").status_code == 200  # the page holds no data: public
        for path in DATA:
            r = c.get(path)
            assert r.status_code == 401 and "error" in r.json(), path
        reader = {"authorization": f"Bearer {keys['reader']}"}
        assert c.get("/inferplane/models", headers=reader).status_code == 200
        assert c.get("/metrics", headers=reader).status_code == 200
        assert c.get("/inferplane/rollouts", headers=reader).json() == {"rollouts": []}
        assert c.get("/inferplane/streams", headers=reader).json()["workers"] == []
        for path in ("/inferplane/services", "/inferplane/audit"):  # admin: every tenant's data
            r = c.get(path, headers=reader)
            assert r.status_code == 403 and "admin" in r.json()["error"], path
        off = c.get("/inferplane/audit", headers={"authorization": f"Bearer {keys['admin']}"})
        assert off.status_code == 404
        assert off.json() == {
            "error": "audit is off: this server has no audit sink (serve --audit-sink PATH)"
        }

    d = browser(DESKTOP)
    try:
        d.get(srv.url + "/console")
        next_poll(d)
        field = d.find_element("id", "auth-key")
        wait_for(field.is_displayed, what="the credential field")
        assert d.find_element("id", "auth-key").get_attribute("type") == "password"
        assert "needs a credential" in text(d, "#auth-message")
        assert d.find_element("tag name", "body").get_attribute("data-auth") == "needed"
        assert rows(d, "#models tbody tr[data-model]") == []

        # a read key: views appear, the admin-only panels say why they are empty
        field.send_keys(keys["reader"])
        d.find_element("css selector", "#auth-form button[type=submit]").click()
        wait_for(
            lambda: len(rows(d, "#models tbody tr[data-model]")) == len(EXAMPLE_MODELS),
            what="models with the read key",
        )
        assert not d.find_element("id", "auth").is_displayed()
        stored = d.execute_script("return sessionStorage.getItem('inferplane.console.credential')")
        assert stored == keys["reader"]
        wait_for(lambda: "admin scope" in text(d, "#services-note"), what="the services note")
        assert "admin scope" in text(d, "#audit-note")
        assert rows(d, "#latency")  # metrics: read

        # an admin key: the policy and the audit state show
        d.find_element("id", "auth-toggle").click()
        d.find_element("id", "auth-key").send_keys(keys["admin"])
        d.find_element("css selector", "#auth-form button[type=submit]").click()
        wait_for(
            lambda: rows(d, '#services .service[data-service="reco"] .split span'),
            what="the reco policy",
        )
        wait_for(
            lambda: "audit is off (serve --audit-sink" in text(d, "#audit-note"), what="audit off"
        )
        assert attr(d, "#audit-card", "data-audit") == "off"

        # a refused key asks again
        d.find_element("id", "auth-toggle").click()
        d.find_element("id", "auth-key").send_keys("ipk_not_a_real_key_0000000000000000")
        d.find_element("css selector", "#auth-form button[type=submit]").click()
        wait_for(lambda: "was refused" in text(d, "#auth-message"), what="the refusal")
        # the only console errors are the refused requests themselves
        assert severe(d, allowed=lambda m: any(code in m for code in REFUSED)) == []
    finally:
        d.quit()


# --- a rollout in progress --------------------------------------------------------------------

ROLLOUT = """
services:
  steady:
    routes: [{target: "reco:1", weight: 100}]
    rollout:
      candidate: "reco:2"
      shadow_first: 1s
      steps: [{weight: 10, hold: 1s}, {weight: 30, hold: 10m}, {weight: 60, hold: 10m}]
      analysis: {min_requests: 20, max_wait: 60s}
      interval: 0.3s
"""


def test_a_rollout_shows_its_stages_weight_and_state_live(chrome_ok: None, tmp_path: Path) -> None:
    from tests.integration.rollout_models import build_reco, load

    repo = tmp_path / "models"
    repo.mkdir()
    build_reco(repo)
    services = tmp_path / "services.yaml"
    services.write_text(ROLLOUT)
    srv = start_server(repo, tmp_path, "--services", str(services), grpc=False)
    driver = browser(DESKTOP)
    card = '#services .service[data-service="steady"]'
    try:
        with load(srv.url, ["steady"], threads=2):
            driver.get(srv.url + "/console")
            next_poll(driver)
            wait_for(
                lambda: attr(driver, f'{card} [data-stage="step 2"]', "data-state") == "current",
                timeout=60, what="the rollout at its second step",
            )  # fmt: skip
            assert attr(driver, f'{card} [data-stage="shadow phase"]', "data-state") == "pass"
            assert text(driver, f'{card} [data-stage="step 1"]') == "10% ✓"
            assert text(driver, f'{card} [data-stage="step 2"]') == "30% ●"
            assert attr(driver, f'{card} [data-stage="step 3"]', "data-state") == "pending"
            assert text(driver, f"{card} [data-field=rollout-weight]").startswith("reco:2 at 30%")
            assert "rollout running" in text(driver, f"{card} h3")
            wait_for(
                lambda: "holding" in text(driver, f"{card} [data-field=rollout-reason]"),
                what="the step's reason",  # the advance's own reason stands until the next look
            )
            # The split bar follows the weights the controller wrote.
            wait_for(
                lambda: (
                    attr(driver, f'{card} .split span[data-route="canary"]', "data-weight") == "30"
                ),
                what="the 70/30 split",
            )
            done = subprocess.run(
                [sys.executable, "-m", "inferplane", "rollout", "pause", "steady",
                 "-r", str(repo), "--wait", "10"],
                capture_output=True, text=True, cwd=ROOT, timeout=60,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
            wait_for(
                lambda: "rollout paused" in text(driver, f"{card} h3"), what="the paused badge"
            )
        assert severe(driver) == []
    finally:
        driver.quit()
        srv.stop()


# --- stream workers ------------------------------------------------------------------------------


def test_stream_workers_show_their_lag_and_counts(
    chrome_ok: None,
    examples: Path,
    redis_server: Any,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    from tests.conftest import free_port
    from tests.integration.streaming.harness import reporting_worker, unique

    base = unique("console")
    port, dead = free_port(), free_port()
    worker = reporting_worker(redis_server, base, 50, examples, "w-console", port, tmp_path)
    srv = start_server(examples, tmp_path, "--stream-metrics", f"http://127.0.0.1:{port}/metrics",
                       "--stream-metrics", f"http://127.0.0.1:{dead}/metrics", grpc=False)  # fmt: skip
    driver = browser(DESKTOP)
    row = '#streams tr[data-worker="w-console"]'
    try:
        driver.get(srv.url + "/console")
        wait_for(lambda: text(driver, f"{row} [data-field=events-out]") == "50", timeout=60,
                 what="the worker's 50 events out")  # fmt: skip
        assert text(driver, f"{row} [data-field=source]") == f"redis:{base}-in"
        assert text(driver, f"{row} [data-field=group]") == "scorers"
        assert text(driver, f"{row} [data-field=events-dlq]") == "0"
        assert text(driver, '#streams tr[data-up="false"] [data-field=lag]') == "down"
        assert "from the workers' /metrics pages" in text(driver, "#streams")
        assert severe(driver) == []
    finally:
        driver.quit()
        srv.stop()
        assert worker.stop() == 0, worker.log()
