"""A real `streamlit run` on a free localhost port with its own run store, and Chromium.

Every page a test opens records the requests it makes; a test fails if any leaves this
machine (the app must work offline: no fonts, icons or telemetry from outside).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """{"url", "runs", "log"} of a fresh app with its own run store."""
    if importlib.util.find_spec("streamlit") is None:
        pytest.skip("streamlit is not installed")
    from app.serve import serve

    runs = tmp_path_factory.mktemp("e2e-runs")
    with serve(runs) as server:
        yield {"url": server.url, "runs": runs, "log": server.log}


@pytest.fixture(scope="session")
def browser():
    from app.serve import CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Requests(list):
    """Every URL a browser context asked for."""

    def foreign(self) -> list[str]:
        from app.serve import is_local

        return [u for u in self if not is_local(u)]


@pytest.fixture
def new_page(browser):
    """Open pages in fresh browser contexts (separate sessions); each records its requests,
    and the test fails at the end if any request left localhost."""
    contexts, seen = [], Requests()

    def open_one():
        context = browser.new_context(
            viewport={"width": 1400, "height": 1000}, accept_downloads=True
        )
        context.on("request", lambda req: seen.append(req.url))
        contexts.append(context)
        pg = context.new_page()
        pg.set_default_timeout(60_000)
        return pg

    yield open_one
    for context in contexts:
        context.close()
    assert not seen.foreign(), f"requests outside this machine: {sorted(set(seen.foreign()))}"


@pytest.fixture
def page(new_page):
    return new_page()
