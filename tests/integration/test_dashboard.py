"""The dashboard on the metrics port: its protection, its JSON, and the page in a real browser."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from jobbroker.broker.config import BrokerConfig
from jobbroker.broker.config import metrics_token as _metrics_token
from jobbroker.broker.errors import ConfigError
from jobbroker.broker.server import Broker
from jobbroker.broker.web import SESSION_COOKIE

from jobbroker import Client, JobDead
from tests.helpers import SECRET, TIME_UNIT
from tests.integration.conftest import BrokerProcess, Process, wait_until
from tests.integration.test_metrics import free_port

TOKEN = "dashboard-token-for-tests-0123456789abcdef"


def fetch(
    port: int,
    path: str,
    method: str = "GET",
    body: str | None = None,
    headers: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request, redirects not followed: (status, headers with lower-case names, body)."""
    connection = (
        http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        if tls is None
        else http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=tls)
    )
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "metrics-token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


async def run_some_jobs(broker: BrokerProcess, start_worker: Callable[..., Process]) -> None:
    """Ten squares done and one job dead, with its error."""
    start_worker(broker.address)
    start_worker(broker.address, "fragile", "handlers:fail_always")
    async with Client(broker.address, secret=SECRET) as client:
        assert await client.map("squares", range(10), timeout=20 * TIME_UNIT) == [n * n for n in range(10)]
        with pytest.raises(JobDead):
            await client.result(await client.submit("fragile", "bad input", max_attempts=1), timeout=20 * TIME_UNIT)


async def test_dashboard_on_loopback_serves_its_page_and_figures(
    start_broker: Callable[..., BrokerProcess], start_worker: Callable[..., Process]
) -> None:
    port = free_port()
    broker = start_broker("--metrics-port", str(port))
    await run_some_jobs(broker, start_worker)

    status, headers, page = await asyncio.to_thread(fetch, port, "/")
    assert status == 200 and b'<table id="queues">' in page
    assert "default-src 'self'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    status, headers, script = await asyncio.to_thread(fetch, port, "/static/dashboard.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript") and b"textContent" in script

    status, headers, body = await asyncio.to_thread(fetch, port, "/api/overview")
    assert status == 200 and headers["content-type"] == "application/json"
    overview = json.loads(body)
    assert overview["broker"]["address"] == broker.address and overview["broker"]["durable"] is True
    assert overview["queues"]["squares"]["done"] == 10 and overview["queues"]["fragile"]["dead"] == 1
    assert {w["queues"][0] for w in overview["workers"]} == {"squares", "fragile"}
    (dead,) = overview["dead"]
    assert dead["queue"] == "fragile" and "payload" not in dead
    assert {k: dead["error"][k] for k in ("type", "message")} == {
        "type": "ValueError",
        "message": "cannot handle 'bad input'",
    }
    assert overview["traffic"]["frames_in"] > 0

    # A web page elsewhere that rebinds its own name to 127.0.0.1 is refused by the Host check.
    status, _, _ = await asyncio.to_thread(fetch, port, "/api/overview", headers={"Host": "attacker.example"})
    assert status == 403
    status, _, _ = await asyncio.to_thread(fetch, port, "/api/overview", headers={"Host": f"localhost:{port}"})
    assert status == 200
    status, headers, _ = await asyncio.to_thread(fetch, port, "/api/overview", "POST", "x=1")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert (await asyncio.to_thread(fetch, port, "/nothing-here"))[0] == 404
    assert (await asyncio.to_thread(fetch, port, "/login"))[0] == 404  # no token, no login


async def test_a_token_guards_metrics_and_dashboard(
    start_broker: Callable[..., BrokerProcess], token_file: Path
) -> None:
    port = free_port()
    start_broker("--metrics-port", str(port), "--metrics-token-file", str(token_file))

    for path in ("/metrics", "/api/overview", "/favicon.ico"):
        status, headers, _ = await asyncio.to_thread(fetch, port, path)
        assert status == 401 and headers["www-authenticate"].startswith("Bearer"), path
    for path in ("/static/dashboard.js", "/static/dashboard.css"):  # the login page needs them; no data
        assert (await asyncio.to_thread(fetch, port, path))[0] == 200
    status, _, scraped = await asyncio.to_thread(fetch, port, "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and b"jobbroker_workers_connected" in scraped
    status, _, _ = await asyncio.to_thread(fetch, port, "/metrics", headers={"Authorization": "Bearer wrong"})
    assert status == 401

    status, headers, _ = await asyncio.to_thread(fetch, port, "/")
    assert status == 303 and headers["location"] == "login"
    status, _, login_page = await asyncio.to_thread(fetch, port, "/login")
    assert status == 200 and b'name="token"' in login_page

    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, headers, _ = await asyncio.to_thread(fetch, port, "/login", "POST", "token=guess", form)
    assert status == 303 and headers["location"] == "login?failed=1" and "set-cookie" not in headers
    status, headers, _ = await asyncio.to_thread(fetch, port, "/login", "POST", f"token={TOKEN}", form)
    assert status == 303 and headers["location"] == "./"
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert TOKEN not in cookie  # the cookie opens the dashboard only; it is not the token
    session = cookie.split(";")[0]
    status, _, body = await asyncio.to_thread(fetch, port, "/api/overview", headers={"Cookie": session})
    assert status == 200 and json.loads(body)["broker"]["sessions"] == 0
    status, _, _ = await asyncio.to_thread(fetch, port, "/api/overview", headers={"Cookie": f"{SESSION_COOKIE}=x"})
    assert status == 401


async def test_with_tls_the_metrics_port_speaks_https(
    start_broker: Callable[..., BrokerProcess], token_file: Path, tmp_path: Path
) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    certificate.private_key_pem.write_to_path(str(key_file))
    port = free_port()
    args = ["--tls-cert", str(cert_file), "--tls-key", str(key_file), "--metrics-token-file", str(token_file)]
    broker = start_broker("--metrics-port", str(port), *args)
    broker.wait_for_output(rf"dashboard on https://127\.0\.0\.1:{port}/")
    context = ssl.create_default_context()
    authority.configure_trust(context)

    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, headers, _ = await asyncio.to_thread(fetch, port, "/login", "POST", f"token={TOKEN}", form, context)
    assert status == 303 and "; Secure" in headers["set-cookie"]
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    status, _, scraped = await asyncio.to_thread(fetch, port, "/metrics", headers=bearer, tls=context)
    assert status == 200 and b"jobbroker_workers_connected" in scraped
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        await asyncio.to_thread(fetch, port, "/metrics", headers=bearer)  # plain HTTP gets no answer


async def test_off_loopback_the_metrics_port_needs_a_token() -> None:
    config = BrokerConfig(port=0, data_dir=None, metrics_port=0, metrics_host="0.0.0.0")
    broker = Broker(config, SECRET)
    with pytest.raises(ConfigError, match="needs a token"):
        await broker.start()  # refused before anything binds 0.0.0.0


def test_serve_generates_a_token_off_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert _metrics_token(None, None, "0.0.0.0") is None  # no metrics port
    assert _metrics_token(None, 9100, "127.0.0.1") is None  # loopback: no token unless given
    token = _metrics_token(None, 9100, "0.0.0.0")
    assert token is not None and len(token) >= 32
    generated = tmp_path / "jobbroker" / "metrics-token"
    assert generated.read_text().strip().encode() == token and generated.stat().st_mode & 0o077 == 0
    assert _metrics_token(None, 9100, "0.0.0.0") == token  # kept across restarts


# --- in a real browser ----------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Debian's chromium, headless, driven by selenium through Debian's chromedriver."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        if os.environ.get("JOBBROKER_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required (apt-get install chromium chromium-driver)")
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The flags keep chromium off the network (it would call home otherwise) and able to run
    # as root in a container.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def text_of(driver: Any, selector: str) -> str:
    """The text of the first element matching `selector`, or "": read in one step inside the
    page, since the page redraws its tables under our feet."""
    return str(driver.execute_script("return document.querySelector(arguments[0])?.innerText ?? ''", selector))


async def test_dashboard_in_a_browser_sees_the_run(
    start_broker: Callable[..., BrokerProcess],
    start_worker: Callable[..., Process],
    token_file: Path,
    browser: Any,
    tmp_path: Path,
) -> None:
    port = free_port()
    broker = start_broker("--metrics-port", str(port), "--metrics-token-file", str(token_file))
    await run_some_jobs(broker, start_worker)
    release = tmp_path / "release"
    start_worker(broker.address, "halves", "handlers:halfway", env={"HANDLER_RELEASE": str(release)})
    async with Client(broker.address, secret=SECRET) as client:
        halfway = await client.submit("halves", "the report")

        # Sign in through the login form, as a person would.
        await asyncio.to_thread(browser.get, f"http://127.0.0.1:{port}/")
        assert browser.current_url.endswith("/login")
        await asyncio.to_thread(browser.find_element("id", "token").send_keys, "not the token")
        await asyncio.to_thread(browser.find_element("css selector", "button[type=submit]").click)
        refused = "return document.getElementById('failed')?.hidden === false"
        await wait_until(lambda: _shown(browser.execute_script(refused)), what="the refusal")
        await asyncio.to_thread(browser.find_element("id", "token").send_keys, TOKEN)
        await asyncio.to_thread(browser.find_element("css selector", "button[type=submit]").click)
        await wait_until(lambda: _shown(browser.current_url == f"http://127.0.0.1:{port}/"), what="the dashboard")

        def cell(queue: str, field: str) -> str:
            return text_of(browser, f'#queues tr[data-queue="{queue}"] td[data-field="{field}"]')

        await wait_until(lambda: _shown(cell("squares", "done") == "10"), what="10 squares done on the page")
        assert cell("fragile", "dead") == "1" and cell("fragile", "done") == "0"
        dead_error = text_of(browser, '#dead tr td[data-field="error"]')
        # The error, then its traceback folded under a "traceback" summary.
        assert dead_error.splitlines() == ["ValueError: cannot handle 'bad input'", "traceback"]
        worker_text = await wait_until(
            lambda: _shown(text_of(browser, f'#workers .job[data-job="{halfway}"]')), what="the running job"
        )
        assert "50% half of the report" in worker_text
        bar = f'#workers .job[data-job="{halfway}"] progress'
        assert browser.execute_script("return document.querySelector(arguments[0]).value", bar) == 0.5
        assert "durable" in text_of(browser, "#broker")

        # It refreshes by itself: more work shows up without reloading the page.
        assert await client.map("squares", range(5), timeout=20 * TIME_UNIT) == [n * n for n in range(5)]
        release.touch()
        assert await client.result(halfway, timeout=20 * TIME_UNIT) == "the report"
        await wait_until(lambda: _shown(cell("squares", "done") == "15"), what="the page to refresh to 15")
        await wait_until(lambda: _shown(cell("halves", "done") == "1"), what="the running job to finish")
        assert "failing" not in (browser.find_element("id", "status").get_attribute("class") or "")


async def _shown(value: Any) -> Any:
    """wait_until takes an async predicate; the browser's answers are synchronous."""
    return value
