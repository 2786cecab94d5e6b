"""Export: download a model as low-rank safetensors, dense safetensors or ONNX."""

from __future__ import annotations

import streamlit as st

from app import cache, jobs, latency, state, ui
from app import compress as cz
from app import export as ex
from lorita.data import DatasetUnavailable
from lorita.scores import score_of


@st.cache_resource(show_spinner="Writing the file and loading it back…", max_entries=16)
def _build(  # noqa: PLR0913 - the cache key is the whole choice
    root: str, name: str, which: str, mtime: float, choice_key: tuple, fmt: str, base: str,
    _model, _meta,
) -> ex.Built:  # fmt: skip
    session = cache.session(root, name, which)
    return ex.build(session, _model, fmt, base_name=base, meta=_meta)


@st.cache_resource(show_spinner=False, max_entries=16)
def _model(  # noqa: PLR0913 - the cache key is the whole choice
    root: str, name: str, which: str, mtime: float, choice_key: tuple, fmt: str, by: str,
    batch: int, _choice, _tuned,
):  # fmt: skip
    session = cache.session(root, name, which)
    return ex.choose_model(session, _choice, fmt, finetuned=_tuned, by=by, batch=batch)


def _decide(pick: str, fmt: str) -> tuple[str, int]:
    """How each cut layer's form is chosen (by FLOPs or by latency measured at a batch)."""
    if pick == "full":
        return "flops", ex.DEFAULT_BATCH
    if fmt == "dense":
        st.caption("Dense: every layer keeps its original shape with a rank-r weight.")
        return "flops", ex.DEFAULT_BATCH
    choices = ex.decide_options()
    state.setdefault(state.EXPORT_BY, "flops")
    if st.session_state.get(state.EXPORT_BY) not in choices:
        st.session_state[state.EXPORT_BY] = next(iter(choices))
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    by = c1.radio("Each cut layer's form", list(choices), key=state.EXPORT_BY,
                  format_func=choices.get, horizontal=True)  # fmt: skip
    state.setdefault(state.EXPORT_BATCH, ex.DEFAULT_BATCH)
    batch = c2.number_input(
        "batch", 1, ex.MAX_BATCH, step=1, key=state.EXPORT_BATCH, disabled=by != "latency",
        help="The batch size the thin and dense forms are timed at (1: one image at a time).",
    )  # fmt: skip
    return by, int(batch) if by == "latency" else ex.DEFAULT_BATCH  # one build for FLOPs


def _checkpoint_mtime(root: str, name: str, which: str) -> float:
    """The checkpoint's time (0.0 when there is none: a warning); a note when it still trains."""
    mtime = cz.checkpoint_mtime(name, which, root)
    if not mtime:
        st.warning(f"Run {name} has no {which} checkpoint.")
        return 0.0
    training = cz.still_training(name, which, root)
    if training:
        st.info(f"{training}; a file exported now is not the run's final model.", icon="⏳")
    return mtime


@ui.guarded
def main() -> None:
    ui.page_title("Export")
    root = str(jobs.runs_dir())
    rows = cz.finished_runs(root)
    if not rows:
        st.info("No run with a checkpoint yet. Train one first.")
        st.page_link("pages/train.py", label="Go to Train", icon="🏋️")
        return
    names = [r["name"] for r in rows]
    choice = st.session_state.get(state.COMPRESS_CHOICE) or _choice_from_url(root, names)
    wanted = choice["run"] if choice else state.current_run()
    if st.session_state.get(state.EXPORT_RUN) not in names:
        note = cz.unavailable_note(st.session_state.get(state.EXPORT_RUN) or wanted, rows, root)
        note = note or state.url_run_note()
        if note:
            st.info(note, icon="ℹ️")
        st.session_state[state.EXPORT_RUN] = cz.default_run(rows, wanted)
    c1, c2 = st.columns([3, 1])
    name = c1.selectbox("Run", names, key=state.EXPORT_RUN, on_change=state.pick_run,
                        args=(state.EXPORT_RUN,))  # fmt: skip
    state.to_url(state.QUERY_RUN, name)  # a refresh comes back to this run
    if choice and choice.get("run") == name:
        state.setdefault(state.EXPORT_WHICH, choice["which"])
    state.pick_checkpoint(state.EXPORT_WHICH, cz.checkpoints(name, root))
    which = c2.radio("Checkpoint", ["best", "last"], key=state.EXPORT_WHICH, horizontal=True)
    state.to_url(state.QUERY_WHICH, which)  # a refresh comes back to it, cut or not
    mtime = _checkpoint_mtime(root, name, which)
    if not mtime:
        return
    try:
        session = cache.session(root, name, which)
    except DatasetUnavailable as exc:  # the run came without its images: as trained only
        _offline(root, name, which, exc)
        return
    if session.data_note:  # the accuracy shown after export is measured on other images
        st.warning(session.data_note, icon="⚠️")

    options = _model_options(choice, name, which)
    if st.session_state.get(state.EXPORT_MODEL) not in options:
        st.session_state[state.EXPORT_MODEL] = list(options)[-1 if len(options) < 3 else 1]
    pick = st.radio("Model", list(options), key=state.EXPORT_MODEL, format_func=options.get)
    if len(options) == 1:
        st.caption("To export a cut model, set the truncation on the Compress page first.")
    formats = ex.formats()
    from_url = state.from_url(state.QUERY_FORMAT)  # a refresh comes back to the format
    state.setdefault(state.EXPORT_FORMAT, from_url if from_url in formats else "low_rank")
    if st.session_state.get(state.EXPORT_FORMAT) not in formats:
        st.session_state[state.EXPORT_FORMAT] = "low_rank"
    fmt = st.radio("Format", list(formats), key=state.EXPORT_FORMAT, format_func=formats.get)
    state.to_url(state.QUERY_FORMAT, fmt)
    if ex.missing_note():
        st.caption(ex.missing_note())

    _choice_to_url(choice if pick != "full" else None)
    by, batch = _decide(pick, fmt)
    _file(root, name, which, mtime, session, choice, pick, fmt, by, batch)


@st.cache_resource(show_spinner="Writing the file and loading it back…", max_entries=8)
def _offline_file(root: str, name: str, which: str, mtime: float, fmt: str) -> ex.Offline:
    """One file per checkpoint file and format (the modification time keys a new one)."""
    return ex.build_offline(jobs.store(root).get(name), which, fmt)


def _model_options(choice: dict | None, name: str, which: str) -> dict[str, str]:
    """The models this run's checkpoint can be exported as: as trained, and the cut (and
    fine-tuned) one of the Compress page when it was made from this checkpoint."""
    options = {"full": "As trained (factors merged, nothing cut)"}
    if choice and choice.get("run") == name and choice.get("which") == which:
        options["compressed"] = "Compressed on the Compress page: " + cz.choice_text(choice)
        ft = st.session_state.get(state.FINETUNED)
        if ft and ft["key"] == cz.choice_token(choice):
            options["finetuned"] = "Compressed and fine-tuned on the Compress page"
    return options


_URL_CHOICE = (state.QUERY_POLICY, state.QUERY_VALUE)  # (the checkpoint is always there)


def _offline(root: str, name: str, which: str, exc: Exception) -> None:
    """A run whose data is not here: its checkpoint as trained, checked on one input."""
    st.warning(
        f"{ui.one_line(exc)}. Without its data the run can be exported only as trained (nothing "
        "cut), and the file is checked on one input instead of on the validation and test "
        "images; to cut it, put the data back.",
        icon="🗂️",
    )
    offline = {k: v for k, v in ex.formats().items() if k in ("low_rank", "onnx")}
    state.setdefault(state.EXPORT_FORMAT, "low_rank")
    if st.session_state.get(state.EXPORT_FORMAT) not in offline:
        st.session_state[state.EXPORT_FORMAT] = "low_rank"
    fmt = st.radio(
        "Format", list(offline), key=state.EXPORT_FORMAT,
        format_func=lambda f: "safetensors" if f == "low_rank" else offline[f],
    )  # fmt: skip
    try:
        built = _offline_file(root, name, which, cz.checkpoint_mtime(name, which, root), fmt)
    except ValueError as exc2:
        st.error(f"Cannot export: {ui.one_line(exc2)}", icon="🚫")
        return
    score = score_of(built.task)
    recorded = score.text(built.val_acc, 2, missing="not recorded")
    st.success(
        f"Reloaded from the file: outputs within {built.max_diff:.1e} of the model's on one "
        f"input. Validation {score.name} recorded in the checkpoint: {recorded}."
    )
    _offer(built, fmt)


def _choice_to_url(choice: dict | None) -> None:
    """Keep a slider's cut in the address, so that a refresh of this page exports it again
    (a per-layer rank table and a fine-tuned model live in the session only)."""
    if choice and choice.get("value") is not None:
        state.to_url(state.QUERY_RUN, choice["run"])
        state.to_url(state.QUERY_POLICY, choice["policy"])
        state.to_url(state.QUERY_VALUE, f"{choice['value']:g}")
    else:
        for param in _URL_CHOICE:
            state.to_url(param, None)


def _choice_from_url(root: str, names: list[str]) -> dict | None:
    """The Compress page's setting rebuilt from the address of a refreshed Export page (run,
    checkpoint, policy and slider value), cut once to learn its ranks; None when there is
    none, it is not valid, or the run's images are not here to cut it with."""
    name, policy = state.current_run(), state.from_url(state.QUERY_POLICY)
    which = state.from_url(state.QUERY_WHICH) or "best"
    value = cz.url_value(policy or "", state.from_url(state.QUERY_VALUE))
    if name not in names or value is None or not cz.checkpoint_mtime(name, which, root):
        return None  # checkpoint_mtime is 0.0 for a checkpoint that is not there or not valid
    try:
        session = cache.session(root, name, which)
    except DatasetUnavailable:  # no cut without the run's images: the page offers it as trained
        return None
    small, _ = session.cut(cz.make_policy(policy, value))
    choice = {"run": name, "which": which, "policy": policy, "value": value,
              "ranks": cz.every_rank(session, small)}  # fmt: skip
    st.session_state[state.COMPRESS_CHOICE] = choice
    return choice


def _forms(session, model, fmt: str, by: str, batch: int) -> None:
    """Which form each layer got in the file (and why)."""
    rows = ex.layer_forms(session, model)
    thin = sum(r["form"].startswith("thin") for r in rows)
    how = f"chosen by latency measured at batch {batch}" if by == "latency" else "chosen by FLOPs"
    how = "dense format" if fmt == "dense" else how
    with st.expander(f"Each layer's form: {thin} of {len(rows)} thin ({how})"):
        st.dataframe(rows, hide_index=True)
        note = ex.params_note(session, model) if fmt != "dense" else None
        if note:
            st.info(note, icon="ℹ️")
        if by == "latency":
            st.caption(
                "Each cut layer was timed thin and dense on this machine (in PyTorch), then the "
                "whole model both ways: the thin layers are kept only if the model runs faster "
                "with them, so this file is never slower than the model it came from (at that "
                "batch)."
            )


def _latency(session, model, fmt: str, by: str, batch: int) -> None:
    """This model's measured latency against the model it came from (on a button press)."""
    if by == "latency":
        hint = (f"The forms were chosen at batch {batch}: choose them at the batch size you "
                "will deploy with.")  # fmt: skip
    elif fmt == "dense":
        hint = "The dense format keeps every layer's original cost."
    else:
        hint = "Choose each cut layer's form by measured latency above."
    with st.expander("Measured latency of this model on this machine (PyTorch, batch 1 and 64)"):
        latency.show(session, {"model": model}, key="export.latency", slower_hint=hint)


def _file(root, name, which, mtime, session, choice, pick, fmt, by, batch) -> None:  # noqa: PLR0913
    """Build the file, show that it reloads to the same model, offer the download."""
    used = choice if pick in ("compressed", "finetuned") else None
    tuned = st.session_state[state.FINETUNED]["model"] if pick == "finetuned" else None
    choice_key = (
        pick,
        None if used is None else (used["policy"], used.get("value"), tuple(used["ranks"].items())),
        id(tuned) if tuned is not None else None,
        by,
        batch,
    )
    timed = "Timing each layer thin and dense on this machine…" if by == "latency" else "Cutting…"
    with st.spinner(timed):
        model = _model(root, name, which, mtime, choice_key, fmt, by, batch, used, tuned)
    meta = ex.metadata(session, used, fmt, model=model, by=by, batch=batch)
    base = ex.file_base(name, which, used, finetuned=tuned is not None)
    built = _build(root, name, which, mtime, choice_key, fmt, base, model, meta)

    st.subheader("Check: the file loads back to the same model")
    _check(built)
    _offer(built, fmt)
    if used is not None:  # last: once it shows, the download button above is this run's
        _forms(session, model, fmt, by, batch)
        _latency(session, model, fmt, by, batch)


def _check(built: ex.Built) -> None:
    """The reloaded file's scores against the model's in memory (R² within a rounding)."""
    score = score_of(built.task)
    m = st.columns(3)
    m[0].metric(f"Test {score.name} before saving", score.text(built.original["test_acc"], 2))
    m[1].metric(f"Test {score.name} after reloading", score.text(built.reloaded["test_acc"], 2))
    m[2].metric("File size", ui.fmt_count(len(built.data)) + "B")
    val, test = (ui.score_text(score, built.reloaded[k], 2) for k in ("val_acc", "test_acc"))
    if built.same:
        same = "identical to" if score.percent else "the same as"
        st.success(f"Reloaded from the file: validation {val}, test {test} — {same} the model "
                   "in memory.")  # fmt: skip
    elif score.percent:
        st.warning(
            f"The reloaded model differs by {100 * built.max_diff:.2f} points "
            "(floating-point rounding in the runtime flips a few borderline predictions)."
        )
    else:
        st.warning(
            f"The reloaded model's {score.name} differs by {built.max_diff:.2g} (floating-point "
            "rounding in the runtime moves its outputs slightly)."
        )


def _offer(built, fmt: str) -> None:
    """The download button of a written file, and the few lines that load it."""
    st.download_button(
        f"Download {built.file_name}",
        data=built.data,
        file_name=built.file_name,
        mime=ex.MIME[fmt],
        key="export.download",
        on_click="ignore",
        type="primary",
        icon="📦",
    )
    st.markdown("**Load it**")
    st.code(built.snippet, language="python")


main()
