"""A real `streamlit run` on a free localhost port with its own run store, and Chromium."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHROMIUM = os.environ.get("LORITA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_training_children(runs: Path) -> None:
    """End any training process the server started in this temporary store."""
    for status in runs.glob("*/status.json"):
        try:
            st = json.loads(status.read_text())
        except (OSError, ValueError):
            continue
        if st.get("state") in ("queued", "running") and isinstance(st.get("pid"), int):
            (status.parent / "STOP").touch()
            try:
                os.kill(st["pid"], signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """Base URL of a fresh app; the runs folder is ``<url>.runs``."""
    if shutil.which("streamlit") is None and not _has_module("streamlit"):
        pytest.skip("streamlit is not installed")
    runs = tmp_path_factory.mktemp("e2e-runs")
    port = _free_port()
    env = {**os.environ, "LORITA_RUNS": str(runs), "PYTHONUNBUFFERED": "1"}
    log = open(runs.parent / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "streamlit", "run", str(ROOT / "streamlit_app.py"),
            "--server.port", str(port), "--server.address", "127.0.0.1",
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
        ],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(
                    "streamlit did not start: "
                    + (runs.parent / "streamlit.log").read_text(errors="replace")[-2000:]
                )
            time.sleep(0.3)
        yield {"url": url, "runs": runs, "log": runs.parent / "streamlit.log"}
    finally:
        _stop_training_children(runs)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    yield pg
    context.close()
