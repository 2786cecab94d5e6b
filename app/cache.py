"""Streamlit caches shared by the pages (one compress session per checkpoint per process).

Keys always include the checkpoint file's modification time, so a run that is trained again
or resumed is reloaded rather than served stale.
"""

from __future__ import annotations

import streamlit as st

from app import compress as cz


@st.cache_resource(
    show_spinner="Loading the checkpoint and taking every layer's SVD…", max_entries=4
)
def _session(root: str, name: str, which: str, mtime: float):
    return cz.session(name, which, root)


def session(root: str, name: str, which: str):
    """The run's :class:`lorita.Compressor`, built once per (run, checkpoint file)."""
    return _session(root, name, which, cz.checkpoint_mtime(name, which, root))
