"""Streamlit caches shared by the pages (one copy of a checkpoint's context per process).

Keys always include the checkpoint file's modification time, so a run that is trained again
or resumed is reloaded rather than served stale.
"""

from __future__ import annotations

import streamlit as st

from app import compress as cz


@st.cache_resource(
    show_spinner="Loading the checkpoint and taking every layer's SVD…", max_entries=4
)
def _context(root: str, name: str, which: str, mtime: float) -> cz.Context:
    return cz.load_context(name, which, root)


def context(root: str, name: str, which: str) -> cz.Context:
    """The run's :class:`app.compress.Context`, computed once per (run, checkpoint file)."""
    return _context(root, name, which, cz.checkpoint_mtime(name, which, root))


@st.cache_resource(
    show_spinner="Computing the trade-off curve over the whole range…", max_entries=16
)
def _curve(root: str, name: str, which: str, mtime: float, policy: str) -> list[dict]:
    return cz.curve(_context(root, name, which, mtime), policy)


def curve(root: str, name: str, which: str, policy: str) -> list[dict]:
    """The trade-off curve of a run and policy, computed once per (run, checkpoint, policy)."""
    return _curve(root, name, which, cz.checkpoint_mtime(name, which, root), policy)
