"""Run the app as a child process on a free localhost port (the browser tests and benchmarks).

with serve(runs_dir) as server:
    server.url   # http://127.0.0.1:PORT
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lorita.io import read_json

ROOT = Path(__file__).resolve().parents[1]
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")

# The browser that drives the app in tests and benchmarks: Debian's Chromium, headless, and
# quiet (no background requests of its own, so every request seen is the page's).
CHROMIUM = os.environ.get("LORITA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@dataclass
class Server:
    url: str
    runs: Path
    log: Path
    proc: subprocess.Popen


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        if proc.poll() is not None or time.time() > deadline:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"streamlit did not start: {tail}")
        time.sleep(0.3)


def stop_training_children(runs: Path) -> None:
    """End any training process still queued or running in ``runs`` (STOP, then SIGTERM)."""
    for status in runs.glob("*/status.json"):
        st = read_json(status, {}) or {}
        if st.get("state") in ("queued", "running") and isinstance(st.get("pid"), int):
            (status.parent / "STOP").touch()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(st["pid"], signal.SIGTERM)


@contextlib.contextmanager
def serve(
    runs: Path, *, env: dict[str, str] | None = None, timeout: float = 90
) -> Iterator[Server]:
    """``streamlit run streamlit_app.py`` on a free port with ``runs`` as its run store."""
    port = free_port()
    log_path = runs.parent / f"streamlit-{port}.log"
    full_env = {**os.environ, "LORITA_RUNS": str(runs), "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(ROOT / "streamlit_app.py"),
        "--server.port", str(port), "--server.address", "127.0.0.1",
        "--server.headless", "true", "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc, log_path, timeout)
            yield Server(url=url, runs=runs, log=log_path, proc=proc)
        finally:
            stop_training_children(runs)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


def is_local(url: str) -> bool:
    """Whether a request URL stays on this machine (http(s) to localhost, data:, blob:)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about", "chrome-extension"):
        return True
    host = parts.hostname or ""
    return host in LOCAL_HOSTS or host == "::1"
