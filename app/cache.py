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


def session(root: str, name: str, which: str, mtime: float | None = None):
    """The run's :class:`lorita.Compressor`, built once per (run, checkpoint file); ``mtime``
    names the checkpoint file a page has already loaded (a training run replaces it)."""
    if mtime is None:
        mtime = cz.checkpoint_mtime(name, which, root)
    return _session(root, name, which, mtime)
