"""The app's one-time set-up, run when the ``app`` package is first imported by the server.

Six jobs, each done once per server process:

- **Threads.** The server computes (a Compress slider move, the Theory fit) on the same cores
  as the training children it starts. With every torch thread it fights them for the cores
  and a slider move takes a second; with one intra-op thread it takes tens of milliseconds
  (docs/app_performance.md). ``$LORITA_APP_THREADS`` (default 1) sets the count. The training
  children are separate processes with their own thread count and a lower CPU priority
  (:mod:`app.jobs`).
- **Heavy imports.** torch, pandas, plotly and the library are imported here, under the
  ``app`` package's import lock, before any page runs. Two browser sessions that import them
  lazily at the same moment could otherwise see a partially initialised module.
- **A frozen heap.** The imports leave about 400,000 objects that live as long as the server.
  Python's full garbage collection walks every one of them: about 0.2 s on a 2-core machine,
  a pause that lands on whichever script run (a slider move) triggers it. :func:`freeze_heap`
  moves them to the permanent generation (``gc.freeze``), so a full collection walks only
  what the pages created since (milliseconds).
- **plotly.js served here.** Charts are drawn by plotly.js from this server's ``static/``
  folder (:mod:`app.plot`); :func:`app.plot.serve_plotly_js` copies the plotly package's file
  there.
- **Theory in the background.** The Theory page's fits run in a worker process; it is started,
  and the page's default setting fitted, in a background thread (:func:`prewarm`).
- **Folder mode.** Because the project has a top-level ``pages/`` folder, Streamlit starts in
  its legacy folder mode until some script run calls ``st.navigation`` (documented: "as soon
  as any session executes st.navigation, the app ignores the pages/ directory"). A first visit
  straight to ``/train`` would run ``pages/train.py`` alone, without the set-up in
  ``streamlit_app.py``. No public API switches the mode off before the first run, so
  :func:`leave_folder_mode` flips Streamlit's class flag and reruns; this is the only place
  that touches a private Streamlit name, and ``tests/app/test_boot.py`` fails if an upgrade
  removes or renames it.
"""

from __future__ import annotations

import os

THREADS_ENV = "LORITA_APP_THREADS"
DEFAULT_THREADS = 1


def env_int(var: str, default: int, low: int, high: int | None = None) -> tuple[int, str | None]:
    """``$var`` as a whole number from ``low`` to ``high``, and what was wrong with it: unset
    or empty gives ``default``; a number out of range gives the nearest bound, anything else
    ``default``, each with a sentence that names the variable, what it holds and what is
    allowed (the app shows it, :func:`app.jobs.setting_problems`)."""
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default, None
    allowed = (
        f"a whole number from {low} to {high}" if high is not None else f"a whole number ≥ {low}"
    )
    try:
        value = int(raw)
    except ValueError:
        return default, f"${var}={raw!r} is not {allowed}; using {default}"
    kept = max(low, value if high is None else min(high, value))
    if kept != value:
        return kept, f"${var}={raw!r} is not {allowed}; using {kept}"
    return value, None


def server_threads() -> int:
    """Intra-op torch threads for the server (``$LORITA_APP_THREADS``, default 1)."""
    return env_int(THREADS_ENV, DEFAULT_THREADS, 1)[0]


def configure_threads() -> int:
    """Give torch :func:`server_threads` intra-op threads (and one inter-op thread)."""
    import torch

    n = server_threads()
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran in this process
        pass
    return n


def import_heavy() -> None:
    """Import every heavy module a page uses, once, in a fixed order."""
    import numpy  # noqa: F401
    import pandas  # noqa: F401
    import plotly.graph_objects  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (FlopCounterMode's first use imports it: seconds)

    import lorita  # noqa: F401
    import lorita.data  # noqa: F401
    import lorita.models  # noqa: F401
    import lorita.runs  # noqa: F401
    import lorita.spectra  # noqa: F401
    import lorita.truncation  # noqa: F401


def freeze_heap() -> int:
    """Move every object alive now (the imports' modules, classes, caches) out of the garbage
    collector's reach; return how many were moved. Objects still die by reference counting."""
    import gc

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def folder_mode_flag():
    """Streamlit's class holding the folder-mode flag (private API; see the module docstring).

    Raises ImportError or AttributeError when a Streamlit upgrade moved it: the test suite
    calls this so that such an upgrade fails a test instead of a first visit.
    """
    from streamlit.runtime.pages_manager import PagesManager

    if not hasattr(PagesManager, "uses_pages_directory"):
        raise AttributeError("streamlit PagesManager.uses_pages_directory is gone")
    return PagesManager


def _served_runtime() -> bool:
    """True in a script run of ``streamlit run`` (not AppTest, not a plain import), whether or
    not the browser session that started the run is still connected."""
    from streamlit import runtime
    from streamlit.runtime import Runtime
    from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx

    if get_script_run_ctx(suppress_warning=True) is None or not runtime.exists():
        return False
    # AppTest's runtime is a stand-in (a mock of Runtime) that replays folder mode on every
    # run by design; a rerun there would drop the test's clicks.
    return type(runtime.get_instance()) is Runtime


def _in_served_session() -> bool:
    """True inside a browser session of ``streamlit run`` that is still connected."""
    from streamlit import runtime
    from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx

    if not _served_runtime():
        return False
    ctx = get_script_run_ctx(suppress_warning=True)
    return ctx is not None and runtime.get_instance().is_active_session(ctx.session_id) is True


def leave_folder_mode() -> None:
    """In ``streamlit run`` still in folder mode: switch to st.navigation's mode and rerun.

    The flag belongs to the server, not to the session: it is flipped even when the session
    that first imported the app has gone (a first visitor who reloads or closes the tab while
    the heavy imports run), else every later visit straight to a page's address would stay in
    folder mode. Only a session still connected is rerun.
    """
    if not _served_runtime():
        return
    try:
        manager = folder_mode_flag()
    except (ImportError, AttributeError):  # pragma: no cover - caught by tests/app/test_boot.py
        return
    if manager.uses_pages_directory:
        manager.uses_pages_directory = False
        if _in_served_session():
            import streamlit as st

            st.rerun()


def prewarm() -> None:
    """In a served session: start the Theory page's worker and fit its default setting in
    the background, so the first visit to Theory does not wait for them."""
    if not _in_served_session():
        return
    from app import theory

    theory.prewarm()


def start() -> None:
    """Everything above, in order (called by ``app/__init__.py``)."""
    configure_threads()
    import_heavy()
    from app import plot

    plot.serve_plotly_js()
    freeze_heap()
    prewarm()
    leave_folder_mode()
