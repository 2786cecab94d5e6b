"""Train: start a run as a child process and follow its folder live."""

from __future__ import annotations

import streamlit as st

from app import charts, jobs, live, presets, state, ui

FIELD_KEYS = {
    "dataset": state.TRAIN_DATASET,
    "model": state.TRAIN_MODEL,
    "n_factors": state.TRAIN_N,
    "init": state.TRAIN_INIT,
    "weight_decay": state.TRAIN_WD,
    "lr": state.TRAIN_LR,
    "epochs": state.TRAIN_EPOCHS,
    "batch_size": state.TRAIN_BATCH,
    "seed": state.TRAIN_SEED,
    "device": state.TRAIN_DEVICE,
}
LIVE_EVERY_S = 1.0
LIVE_KEY = "train-live"  # container of the live panel (its elements never fade; see _NO_FADE)
# While a fragment reruns, Streamlit dims the elements it is about to replace. The live panel
# replaces everything every second, so dimming would make it blink: keep it fully visible.
_NO_FADE = f"""<style>
.st-key-{LIVE_KEY} [data-stale="true"] {{ opacity: 1 !important; transition: none !important; }}
</style>"""
STATE_ICON = {
    "starting": "⏳",
    "queued": "🕒",
    "running": "▶️",
    "completed": "✅",
    "stopped": "⏹️",
    "failed": "🚫",
    "missing": "❓",
}


def _key(field: str) -> str:
    """Widget key of a form field for the current preset.

    Each preset gets its own widgets, created with the preset's values as their defaults, so
    switching presets never writes widget values through session state and the browser always
    knows every field's value (also when a click interrupts the page's first run).
    """
    return f"{FIELD_KEYS[field]}.{st.session_state[state.TRAIN_PRESET]}"


def _init_form() -> None:
    state.setdefault(state.TRAIN_PRESET, presets.DEFAULT_PRESET)


def _index(options: list, value) -> int:
    return options.index(value) if value in options else 0


def _form() -> None:
    from lorita.data import list_datasets
    from lorita.models import list_models

    st.selectbox(
        "Preset", list(presets.PRESETS), key=state.TRAIN_PRESET, format_func=presets.labels().get
    )
    v = presets.form_values(st.session_state[state.TRAIN_PRESET])
    datasets, models = list_datasets(), list_models()
    inits, devices = ["balanced", "independent"], ["auto", "cpu", "cuda", "mps"]
    with st.form("train.form", border=True):
        c = st.columns(4)
        c[0].selectbox(
            "Dataset", datasets, index=_index(datasets, v["dataset"]), key=_key("dataset")
        )
        c[1].selectbox("Model", models, index=_index(models, v["model"]), key=_key("model"))
        c[2].number_input(
            "N (factors per layer)", min_value=1, max_value=8, step=1, value=v["n_factors"],
            key=_key("n_factors"),
            help="N=1 is the ordinary network; N≥2 composes every weight from N factors.",
        )  # fmt: skip
        c[3].selectbox(
            "Init", inits, index=_index(inits, v["init"]), key=_key("init"),
            help="balanced: the composed network starts as the same function as N=1 "
            "(fair comparison); independent: every factor gets PyTorch's default init.",
        )  # fmt: skip
        c = st.columns(4)
        c[0].number_input(
            "Weight decay λ", min_value=0.0, step=1e-4, format="%g",
            value=float(v["weight_decay"]), key=_key("weight_decay"),
        )  # fmt: skip
        c[1].number_input(
            "Learning rate", min_value=0.0, step=1e-4, format="%g", value=float(v["lr"]),
            key=_key("lr"),
        )  # fmt: skip
        c[2].number_input(
            "Epochs", min_value=1, max_value=1000, step=1, value=v["epochs"], key=_key("epochs")
        )
        c[3].number_input(
            "Batch size", min_value=1, max_value=8192, step=16, value=v["batch_size"],
            key=_key("batch_size"),
        )  # fmt: skip
        c = st.columns(4)
        c[0].number_input(
            "Seed", min_value=0, max_value=2**31 - 1, step=1, value=v["seed"], key=_key("seed")
        )
        c[1].selectbox(
            "Device", devices, index=_index(devices, v["device"]), key=_key("device"),
            help=f"Available here: {', '.join(jobs.devices())}. auto picks the best one.",
        )  # fmt: skip
        c[2].checkbox(
            "also train N=1 (same seed)", value=True, key=state.TRAIN_BASELINE,
            help="Starts the ordinary network too (after this one when only one run may "
            "train at a time): the comparison the method is about.",
        )  # fmt: skip
        submitted = c[3].form_submit_button("Start training", type="primary", width="stretch")
    if submitted:
        _start()


def _start() -> None:
    form = {field: st.session_state[_key(field)] for field in FIELD_KEYS}
    config = presets.build_config(st.session_state[state.TRAIN_PRESET], form)
    base_cfg = None
    if st.session_state[state.TRAIN_BASELINE] and int(config.get("n_factors", 1)) != 1:
        base_cfg = presets.baseline_config(config)
    try:
        with st.spinner("Starting the training process…"):
            name, baseline = jobs.start_pair(config, base_cfg)
    except ValueError as exc:
        st.error(f"Cannot start: {ui.one_line(exc)}", icon="🚫")
        return
    state.set_current_run(name)
    st.session_state[state.TRAIN_FOLLOW] = name
    st.toast(f"Started {name}" + (f" and its N=1 baseline {baseline}" if baseline else ""))


def _progress(v: jobs.JobView, *, small: bool = False) -> None:
    total = f"/{v.total_steps}" if v.total_steps else ""
    parts = [f"{v.state}", f"step {v.step}{total}"]
    if v.epoch is not None:
        parts.append(f"epoch {v.epoch}")
    if v.elapsed is not None:
        parts.append(f"{ui.fmt_duration(v.elapsed)} elapsed")
    if v.eta is not None:
        parts.append(f"about {ui.fmt_duration(v.eta)} left")
    label = f"**{v.name}** · " if small else ""
    st.progress(v.fraction, text=label + " · ".join(parts))


def _result_text(name: str) -> str:
    res = jobs.store().get(name).result()
    parts = []
    if res.get("best_val_acc") is not None:
        parts.append(f"best validation accuracy {ui.fmt_pct(res['best_val_acc'])}")
    if res.get("test_acc") is not None:
        parts.append(f"test accuracy of that checkpoint {ui.fmt_pct(res['test_acc'])}")
    return (", ".join(parts) + ".").capitalize() if parts else ""


def _status_line(v: jobs.JobView) -> None:
    if v.state == "queued":
        st.info(
            f"Queued: waiting for a free training slot (at most {jobs.max_concurrent()} run(s) "
            "train at a time). It starts by itself when the run ahead of it ends.",
            icon=STATE_ICON["queued"],
        )
    elif v.state == "starting":
        st.info("Starting the training process…", icon=STATE_ICON["starting"])
    elif v.state == "failed":
        st.error(f"The run failed: {v.message or 'no message'}", icon=STATE_ICON["failed"])
        st.caption(f"Full output of the training process: `{jobs.log_path(v.name)}`")
    elif v.state == "stopped":
        st.warning(f"Stopped by request. {v.message}", icon=STATE_ICON["stopped"])
    elif v.state == "completed":
        st.success(f"Completed. {_result_text(v.name)}", icon=STATE_ICON["completed"])
    elif v.state == "missing":
        st.warning(v.message, icon=STATE_ICON["missing"])


def _charts(name: str) -> None:
    run = jobs.store().get(name)
    metrics = run.metrics()
    spectra = run.spectra()
    c1, c2 = st.columns(2)
    c1.plotly_chart(
        charts.training_curves({name: metrics}, "loss", uirevision=f"loss-{name}"),
        key="train.chart.loss",
    )
    c2.plotly_chart(
        charts.training_curves({name: metrics}, "acc", uirevision=f"acc-{name}"),
        key="train.chart.acc",
    )
    st.subheader("Spectra")
    layers = live.layer_names(spectra)
    if not layers:
        st.caption("The first spectra snapshot appears after the first evaluation.")
        return
    if st.session_state.get(state.TRAIN_LAYER) not in layers:
        st.session_state[state.TRAIN_LAYER] = live.widest_layer(spectra) or layers[0]
    layer = st.selectbox("Layer for the heatmap", layers, key=state.TRAIN_LAYER)
    steps, values = live.layer_series(spectra, layer)
    st.plotly_chart(
        charts.spectrum_heatmap(steps, values, layer=layer, uirevision=f"heat-{name}-{layer}"),
        key="train.chart.heatmap",
    )
    c1, c2 = st.columns(2)
    step, current = live.latest(spectra)
    c1.plotly_chart(
        charts.layer_spectra_chart(
            current,
            title=f"Singular values of every layer at step {step} (σ/σ_max)",
            uirevision=f"spectra-{name}",
        ),
        key="train.chart.spectra",
    )
    r_steps, ranks = live.rank_series(spectra)
    c2.plotly_chart(
        charts.rank_curves(
            r_steps, ranks, title=f"Effective rank of every layer ({live.rank_rule()})",
            uirevision=f"ranks-{name}",
        ),
        key="train.chart.ranks",
    )  # fmt: skip


def _baseline(name: str) -> str | None:
    """The N=1 run started beside ``name`` (found from the run folders)."""
    try:
        partner = jobs.partner(name)
    except Exception:  # noqa: BLE001 - the pair is a nicety; never block the page on it
        return None
    if partner and int(jobs.store().get(partner).config.get("n_factors", 1)) == 1:
        return partner
    return None


def _panel(name: str) -> jobs.JobView:
    v = jobs.view(name)
    st.markdown(f"### {v.name}")
    _progress(v)
    baseline = _baseline(name)
    if baseline:
        _progress(jobs.view(baseline), small=True)
    _status_line(v)
    active = [n for n, a in ((name, v.active), (baseline, baseline and jobs.view(baseline).active))
              if n and a]  # fmt: skip
    if active:
        label = "Stop" if len(active) == 1 else "Stop both"
        if st.button(label, key="train.stop", icon="⏹️"):
            for run in active:
                jobs.stop(run)
            st.toast("Stop requested: a run ends after its current step, with a checkpoint.")
    if v.state in ("completed", "stopped"):
        st.page_link("pages/compress.py", label="Compress this run", icon="🗜️")
    if v.state not in ("starting", "missing"):
        _charts(name)
    return v


@st.fragment(run_every=LIVE_EVERY_S)
def _live(name: str) -> None:
    """Redrawn every second while the run is active; a full rerun once it ends."""
    try:
        with st.container(key=LIVE_KEY):
            v = _panel(name)
    except Exception as exc:  # noqa: BLE001
        ui.report(exc, "Following the run")
        return
    jobs.reap()
    baseline = _baseline(name)
    if not v.active and not (baseline and jobs.view(baseline).active):
        st.rerun()


def _default_run(rows: list[dict]) -> str | None:
    """With nothing chosen yet: the newest active run, else the newest composed (N>1) run."""
    for row in rows:
        if row["state"] in jobs.ACTIVE:
            return row["name"]
    for row in rows:
        if (row.get("N") or 1) > 1:
            return row["name"]
    return None


def _follow() -> None:
    runs = jobs.list_runs()
    names = [r["name"] for r in runs]
    current = state.current_run()
    if current and current not in names and jobs.view(current).state != "starting":
        current = None
    if not names and not current:
        st.caption("No runs yet. Pick a preset and press Start.")
        return
    options = names if current is None or current in names else [current, *names]
    if st.session_state.get(state.TRAIN_FOLLOW) not in options:
        st.session_state[state.TRAIN_FOLLOW] = current or _default_run(runs) or options[0]
    name = st.selectbox("Follow run", options, key=state.TRAIN_FOLLOW)
    if name != current:
        state.set_current_run(name)
    elif name:
        st.query_params[state.QUERY_RUN] = name
    v = jobs.view(name)
    baseline = _baseline(name)
    if v.active or (baseline and jobs.view(baseline).active):
        st.html(_NO_FADE)
        _live(name)
    else:
        _panel(name)


@ui.guarded
def main() -> None:
    st.title("Train")
    _init_form()
    _form()
    st.divider()
    _follow()


main()
