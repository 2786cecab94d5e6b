"""Small display helpers shared by the pages: error guard, number formatting."""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import streamlit as st

F = TypeVar("F", bound=Callable[..., Any])

_log = logging.getLogger("lorita.app")
if not _log.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(asctime)s lorita.app %(levelname)s %(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False


def page_title(title: str, *, uses_runs: bool = True) -> None:
    """A page's title, then what is wrong with the app's settings: a warning for each setting
    that is not a number (:func:`app.jobs.setting_problems`), and for a page that reads the
    runs folder (``uses_runs``), an error that says what to do when it cannot be used, and
    nothing more of the page. (Elements the entry script draws before the page runs show on
    the default page only, so each page draws these itself.)"""
    from app import jobs

    st.title(title)
    for problem in jobs.setting_problems():
        st.warning(problem, icon="⚠️")
    problem = jobs.runs_dir_problem() if uses_runs else None
    if problem:
        st.error(problem, icon="🚫")
        st.stop()


def sentence(note: str) -> str:
    """A library note shown as a sentence: capitalised and ended with a full stop, unless it
    starts with the field it is about (``init_from: ...``), which keeps its own spelling."""
    note = note.strip().rstrip(".")
    if not re.match(r"[A-Za-z_][\w.]*:", note):
        note = note[:1].upper() + note[1:]
    return note + "."


def one_line(exc: BaseException) -> str:
    """A short, single-line description of ``exc`` for the user."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, (ValueError, FileNotFoundError, PermissionError)) and text:
        return text
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def report(exc: BaseException, context: str = "") -> None:
    """Show ``exc`` as one st.error line; log the full traceback to stderr."""
    _log.error(
        "%s%s",
        f"{context}: " if context else "",
        "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip(),
    )
    prefix = f"{context}: " if context else ""
    st.error(prefix + one_line(exc), icon="🚫")


def report_later(exc: BaseException, context: str = "") -> None:
    """For widget callbacks: log ``exc`` and keep its one-line message for the page to show.

    Callbacks run before the page script, so they cannot draw; the page shows
    ``st.session_state["last_error"]`` (see app.state.LAST_ERROR) on its next run.
    """
    _log.error(
        "%s%s",
        f"{context}: " if context else "",
        "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip(),
    )
    st.session_state["last_error"] = (f"{context}: " if context else "") + one_line(exc)


def show_pending_error() -> None:
    """Show (once) the message a callback left with :func:`report_later`."""
    msg = st.session_state.get("last_error")
    if msg:
        st.error(msg, icon="🚫")
        st.session_state["last_error"] = None


@contextlib.contextmanager
def guard(context: str = "") -> Iterator[None]:
    """``with guard("Loading run"):`` shows any exception inside as a one-line st.error.

    Streamlit's own control flow (st.rerun, st.stop, st.switch_page) derives from
    BaseException and passes through untouched.
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the whole point: no traceback reaches the user
        report(exc, context)


def guarded(func: F) -> F:
    """Decorator form of :func:`guard` for page bodies and fragments."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            report(exc)
            return None

    return wrapper  # type: ignore[return-value]


def fmt_count(n: float) -> str:
    """12345678 -> '12.3 M'; used for params and FLOPs."""
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f}"


def fmt_duration(seconds: float | None) -> str:
    """75 -> '1 min 15 s'; None -> '—'."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def score_text(score: Any, x: Any, digits: int | None = None) -> str:
    """A run's score ``x`` as its :class:`lorita.scores.Score` writes it, named where the
    number alone does not say what it is: '93.1 %' (an accuracy) or 'R² 0.642'."""
    text = score.text(x, digits)
    return text if score.percent else f"{score.short} {text}"


def fmt_pct(x: float | None, digits: int = 1) -> str:
    """0.9312 -> '93.1 %' (x is a fraction: params and FLOPs shares; a run's score is written
    by its task's :class:`lorita.scores.Score`, :func:`score_text`)."""
    if x is None:
        return "—"
    return f"{100.0 * float(x):.{digits}f} %"
