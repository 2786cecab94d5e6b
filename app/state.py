"""Every st.session_state key the app uses, with its guarded init, in one place.

Widget keys are namespaced by page ("train.lr", "compress.value", ...) so that two pages never
share a widget key. Values that must survive a browser refresh (the run a page is looking at)
are mirrored into the URL query parameters.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

# --- state shared between pages -------------------------------------------------------------
CURRENT_RUN = "current_run"  # str | None: the run the Train page follows ("?run=" in the URL)
COMPRESS_CHOICE = "compress_choice"  # dict | None: {"run", "which", "policy", "value", "ranks"}
FINETUNED = "finetuned"  # dict | None: {"key": tuple, "model": nn.Module, "metrics": dict}
CONFIRM_DELETE = "confirm_delete"  # str | None: run awaiting delete confirmation
LAST_ERROR = "last_error"  # str | None: one-line message shown after a failed action
LATENCY = "latency"  # dict: cut token -> measured latency of that cut (app/latency.py)

# --- widget keys (one namespace per page) ---------------------------------------------------
# Train form fields: the page appends the preset ("train.lr.classroom"), so each preset has its
# own widgets created with that preset's values.
TRAIN_PRESET = "train.preset"
TRAIN_DATASET = "train.dataset"
TRAIN_MODEL = "train.model"
TRAIN_N = "train.n_factors"
TRAIN_INIT = "train.init"
TRAIN_WD = "train.weight_decay"
TRAIN_LR = "train.lr"
TRAIN_EPOCHS = "train.epochs"
TRAIN_PLAIN = "train.plain_epochs"
TRAIN_BATCH = "train.batch_size"
TRAIN_SEED = "train.seed"
TRAIN_DEVICE = "train.device"
TRAIN_BASELINE = "train.baseline"
TRAIN_FOLLOW = "train.follow"
TRAIN_LAYER = "train.layer"
TRAIN_FAMILY = "train.family"  # model family chooser (outside the form: it changes the list)
TRAIN_DATA_PATH = "train.dataset_path"  # folder for a path dataset (folder:PATH)
TRAIN_DATA_OPTS = "train.dataset_kwargs"  # the dataset's options as key=value text
TRAIN_MODEL_OPTS = "train.model_kwargs"  # the model's options as key=value text
TRAIN_INIT_FROM = "train.init_from"  # uploaded weights to start from
TRAIN_INIT_RUN = "train.init_run"  # or a finished run whose best checkpoint to start from
TRAIN_SEED_RUN = "train.seed_run"  # str | None: the run whose config filled the form
TRAIN_LAST_START = "train.last_start"  # {"key", "at", "runs"}: what the last Start started
TRAIN_STOP_SAID = "train.stop_said"  # str: what the last Stop did, said once the panel redraws
TRAIN_FROM_URL = "train.from_url"  # (widget suffix, values): the form fields the address gave

RUNS_PICK = "runs.pick"
RUNS_LAYER = "runs.layer"
RUNS_DELETE = "runs.delete"
RUNS_DELETED = "runs.deleted"  # str: the run just deleted, said once the page is drawn again

COMPRESS_RUN = "compress.run"
COMPRESS_WHICH = "compress.which"
COMPRESS_POLICY = "compress.policy"
COMPRESS_VALUE = "compress.value"
COMPRESS_RANKS = "compress.ranks"
COMPRESS_X = "compress.x_axis"
COMPRESS_MAX_DROP = "compress.max_drop"
COMPRESS_FOUND = "compress.found"  # (policy, value) the smallest-within search moves the slider to
COMPRESS_FT_EPOCHS = "compress.ft_epochs"
COMPRESS_FT_LR = "compress.ft_lr"
COMPRESS_LOADED = "compress.loaded"  # (run, checkpoint, mtime) of the session this one has seen
# (COMPRESS_LOADED, run active) the page's uncut numbers and notes were drawn for; None while
# the whole page draws
COMPRESS_DRAWN = "compress.drawn"

EXPORT_RUN = "export.run"
EXPORT_WHICH = "export.which"
EXPORT_MODEL = "export.model"
EXPORT_FORMAT = "export.format"
EXPORT_BY = "export.by"  # choose each layer's form by "flops" | "latency" (lorita.kinds.DECIDE_BY)
EXPORT_BATCH = "export.batch"  # the batch size the latency choice measures at

THEORY_N = "theory.n_factors"
THEORY_LAMBDA = "theory.weight_decay"
THEORY_RANK = "theory.rank"
THEORY_SEED = "theory.seed"

QUERY_RUN = "run"  # URL query parameter that holds the current run
QUERY_POLICY = "policy"  # the Compress page's rank policy, kept in the URL with its value
QUERY_VALUE = "value"
QUERY_WHICH = "which"  # the checkpoint the Compress and Export pages show (best | last)
QUERY_FORMAT = "format"  # the Export page's file format
QUERY_COMPARE = "compare"  # "1" while the Compress page compares with the baselines
QUERY_OVERLAY = "overlay"  # the runs the Runs page overlays, one parameter each (empty: none)
QUERY_PRESET = "preset"  # the Train page's preset, while its form shows a preset's values
# The Train form's fields that differ from its starting values go under their config names
# (?epochs=5&lr=0.01): the names of app.presets.FORM_FIELDS (app/train_url.py).

DEFAULTS: dict[str, Any] = {
    CURRENT_RUN: None,
    COMPRESS_CHOICE: None,
    FINETUNED: None,
    CONFIRM_DELETE: None,
    LAST_ERROR: None,
}


def init() -> None:
    """Create every shared key once per session; never overwrite what is there."""
    for key, value in DEFAULTS.items():
        if key not in st.session_state:
            st.session_state[key] = value
    if st.session_state[CURRENT_RUN] is None:
        st.session_state[CURRENT_RUN] = _run_name(from_url(QUERY_RUN))


def _run_name(name: str | None) -> str | None:
    """``name`` if it can name a run (``?run=../../etc`` cannot: no page follows it)."""
    from lorita.runs import validate_name

    try:
        return validate_name(name) if name else None
    except ValueError:
        return None


def url_run_note() -> str | None:
    """Why the address's ``?run=`` cannot name a run (a hand-edited or mangled link: a path,
    spaces, markup), for a page that shows another run instead; None when it can, or when
    there is none."""
    from lorita.runs import validate_name

    name = from_url(QUERY_RUN)
    try:
        if name:
            validate_name(name)
    except ValueError as exc:
        return f"The address's ?run= names no run ({exc}); showing another run."
    return None


def url_which() -> str:
    """The checkpoint the address names (``?which=best`` or ``last``), else ``best``: the
    Compress and Export pages open on it, so a refresh comes back to the checkpoint shown."""
    which = from_url(QUERY_WHICH)
    return which if which in ("best", "last") else "best"


def pick_checkpoint(key: str, have: list[str]) -> None:
    """Set widget ``key`` (a page's checkpoint radio) once to the address's checkpoint
    (``?which=``), and to one of the run's checkpoints ``have`` when it holds another: a run
    stopped before its first validation has a last checkpoint and no best."""
    setdefault(key, url_which())
    if have and st.session_state[key] not in have:
        st.session_state[key] = have[0]


def current_run() -> str | None:
    """The run the user is looking at (session first, then the URL)."""
    init()
    return st.session_state[CURRENT_RUN]


def set_current_run(name: str | None) -> None:
    """Remember ``name`` in the session and in the URL so that a refresh comes back to it."""
    init()
    st.session_state[CURRENT_RUN] = name
    to_url(QUERY_RUN, name or None)


def pick_run(key: str) -> None:
    """``on_change`` of a page's run picker (widget ``key``): the run picked becomes the
    current run, the one every page opens on and a refresh comes back to."""
    set_current_run(st.session_state.get(key))


def from_url(param: str) -> str | None:
    """A URL query parameter (what a refresh brings back), None when absent."""
    value = st.query_params.get(param)
    return str(value) if value else None


def to_url(param: str, value: str | list[str] | None) -> None:
    """Keep ``value`` in the URL so that a refresh comes back to it (written only on change;
    a parameter given twice, ``?run=a&run=b``, is written once): a list as the parameter once
    per item, None as no parameter at all."""
    if value is None:
        if param in st.query_params:
            del st.query_params[param]
    elif st.query_params.get_all(param) != ([value] if isinstance(value, str) else value):
        st.query_params[param] = value


def setdefault(key: str, value: Any) -> Any:
    """Guarded init for a widget key: set ``value`` only if the key is not there yet."""
    if key not in st.session_state:
        st.session_state[key] = value
    return st.session_state[key]
