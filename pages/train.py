"""Train: start a run as a child process and follow its folder live."""

from __future__ import annotations

import streamlit as st

from app import charts, jobs, live, options, plot, presets, state, train_form, train_url, ui

FIELD_KEYS = {
    "dataset": state.TRAIN_DATASET,
    "dataset_path": state.TRAIN_DATA_PATH,
    "model": state.TRAIN_MODEL,
    "n_factors": state.TRAIN_N,
    "init": state.TRAIN_INIT,
    "weight_decay": state.TRAIN_WD,
    "lr": state.TRAIN_LR,
    "epochs": state.TRAIN_EPOCHS,
    "plain_epochs": state.TRAIN_PLAIN,
    "batch_size": state.TRAIN_BATCH,
    "seed": state.TRAIN_SEED,
    "device": state.TRAIN_DEVICE,
    "dataset_kwargs": state.TRAIN_DATA_OPTS,
    "model_kwargs": state.TRAIN_MODEL_OPTS,
}
_OPTION_HELP = {  # each options box: its placeholder and what it takes
    "dataset_kwargs": (
        "size=64, channels=1",
        "For folder: size (images resized to size×size px, default 32), channels (3 colour, "
        "1 grey), test_fraction. For lowrank: rank, dim, n_train, noise, task=regression (the "
        "teacher's outputs as targets, scored by R²), .... A dataset's options and their "
        "ranges: `python -m lorita datasets NAME`.",
    ),
    "model_kwargs": (
        "width_mult=0.5",
        "E.g. width=128 (mlp), width_mult=0.5 (torchvision:mobilenet_v3_small), "
        "drop_path_rate=0.1 (timm). The preset's options are dropped when you pick another "
        "model. A model's options and their defaults: `python -m lorita models NAME`.",
    ),
}
LIVE_EVERY_S = 1.0
# Start's key as the submit button of the form the fields were once in (scripts press it by
# key): the fields are no form now, so that each edit reaches the page and its address.
START_KEY = "FormSubmitter:train.form-Start training"
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


def _suffix() -> str:
    """Widget keys of the form end with the preset (and the run that filled the form).

    Each preset (and each seeding run) gets its own widgets, created with its values as their
    defaults, so switching presets never writes widget values through session state.
    """
    seed = st.session_state.get(state.TRAIN_SEED_RUN)
    preset = st.session_state[state.TRAIN_PRESET]
    return f"{preset}.{seed}" if seed else preset


def _key(field: str) -> str:
    return f"{FIELD_KEYS[field]}.{_suffix()}"


def _seed_config() -> dict | None:
    name = st.session_state.get(state.TRAIN_SEED_RUN)
    return jobs.run_config(name) if name else None


def _init_form() -> None:
    """Once per session: a page opened on a run (``?run=``, a refresh) shows that run's config,
    one whose address names a preset (``?preset=``) that preset's values; then the form fields
    the address gives (a refresh of a half-filled form: app/train_url.py)."""
    if state.TRAIN_PRESET in st.session_state:
        return
    seed, preset = _opened_on()
    wanted = state.from_url(state.QUERY_PRESET)
    if wanted in presets.PRESETS:
        seed, preset = None, wanted
    st.session_state[state.TRAIN_SEED_RUN] = seed
    st.session_state[state.TRAIN_PRESET] = preset
    texts = {field: st.query_params.get(field) for field in presets.FORM_FIELDS}
    given = train_url.read(texts, preset)
    ticked = train_url.read_baseline(st.query_params.get(train_url.BASELINE))
    if ticked is not None:
        given[train_url.BASELINE] = ticked
    st.session_state[state.TRAIN_FROM_URL] = (_suffix(), given)


def _opened_on() -> tuple[str | None, str]:
    """(the run whose settings the form shows, the preset) of the page opened on the current
    run with no preset in its address."""
    run = state.current_run()
    cfg = jobs.run_config(run) if run else None
    return (run if cfg else None), (train_form.seed_preset(cfg) if cfg else presets.DEFAULT_PRESET)


def _from_url() -> dict:
    """The form fields the address gave when the page opened, while the form shows the preset
    (and run) they were written for."""
    kept = st.session_state.get(state.TRAIN_FROM_URL)
    if kept and kept[0] == _suffix():
        return kept[1]
    st.session_state.pop(state.TRAIN_FROM_URL, None)
    return {}


def _to_url(family: str, start: dict) -> bool:
    """Keep in the address the form's fields that differ from ``start`` (its starting values),
    so that a refresh comes back to a half-filled form (the preset they are edits of: main,
    :func:`_preset_to_url`); whether any field differs."""
    form = _typed_form(family)
    choice, path = form.pop("dataset"), (form.pop("dataset_path") or "").strip()
    form["dataset"] = f"{choice}:{path}" if options.is_path_family(choice) else choice
    kept = train_url.changed(form, start)
    for field in presets.FORM_FIELDS:
        state.to_url(field, kept.get(field))
    return bool(kept)


def _preset_to_url(edited: bool) -> None:
    """``?preset=`` while the form shows a preset (not a run's settings) that a page opened on
    the current run would not show by itself: another preset, or this one ``edited`` where
    that page would show the run's settings (untouched, a refresh shows them, as it always
    did); not once the run is the one this form started (its settings are the form's)."""
    preset = st.session_state[state.TRAIN_PRESET]
    started = (st.session_state.get(state.TRAIN_LAST_START) or {}).get("runs") or ()
    seed, opened = _opened_on()
    shows_preset = (
        st.session_state.get(state.TRAIN_SEED_RUN) is None
        and state.current_run() not in started
        and (opened != preset or (edited and seed is not None))
    )
    state.to_url(state.QUERY_PRESET, preset if shows_preset else None)


def _forget_seed() -> None:
    st.session_state[state.TRAIN_SEED_RUN] = None


def _index(options_: list, value) -> int:
    return options_.index(value) if value in options_ else 0


def _choosers(values: dict) -> str:
    """Preset and model family (outside the form: they change what the form offers)."""
    c = st.columns([3, 1])
    c[0].selectbox(
        "Preset", list(presets.PRESETS), key=state.TRAIN_PRESET,
        format_func=presets.labels().get, on_change=_forget_seed,
    )  # fmt: skip
    families = options.model_families()
    fam_key = f"{state.TRAIN_FAMILY}.{_suffix()}"
    state.setdefault(fam_key, options.family_of(str(values["model"])))
    family = c[1].selectbox("Model family", families, key=fam_key)
    seed = st.session_state.get(state.TRAIN_SEED_RUN)
    if seed:
        st.caption(f"The form shows the settings of run **{seed}**, the run this page follows.")
        started_from = (_seed_config() or {}).get("init_from")
        if started_from:  # an upload cannot be put back in its box
            st.caption(
                f"**{seed}** started from the weights `{train_form.upload_name(started_from)}`; Start "
                "starts from fresh weights unless you upload them again or pick a run below."
            )
    return family


def _data_and_model(values: dict, family: str) -> None:
    datasets = options.datasets()
    choice, path = train_form.split_dataset(values["dataset"])
    models = options.models(family)
    c = st.columns(4)
    c[0].selectbox(
        "Dataset",
        datasets,
        index=_index(datasets, choice),
        key=_key("dataset"),
        help="folder: your own images, one sub-folder per class (the path below).",
    )
    c[1].text_input("Image folder (for folder)", value=path, key=_key("dataset_path"),
                    placeholder="/path/to/images")  # fmt: skip
    c[2].selectbox(
        "Model", models, index=_index(models, values["model"]), key=f"{_key('model')}.{family}"
    )
    # No type= filter: the browser would drop any other file with a note beside the box, and
    # the run would start from fresh weights; every file reaches Start, which names a wrong one.
    # A file over the upload limit is refused by the browser alone (the server never sees it):
    # the help says the limit and the way past it, and Start's toast says where weights came from.
    c[3].file_uploader(
        "Start from weights (optional)", key=f"{state.TRAIN_INIT_FROM}.{_suffix()}",
        help=f"{', '.join(train_form.INIT_SUFFIXES)}: safetensors, or a PyTorch state_dict "
        "(read with weights_only=True), loaded into the plain model before composing. Start "
        f"refuses any other file. At most {st.get_option('server.maxUploadSize')} MB: the box "
        "refuses a bigger file and Start then uses fresh weights; start the app with "
        "`--server.maxUploadSize MB` for more, or train with `python -m lorita train "
        "--init-from FILE`.",
    )  # fmt: skip
    for col, (field, label) in zip(st.columns(2), presets.OPTION_BOXES.items(), strict=True):
        example, help_ = _OPTION_HELP[field]
        # Another model family (chosen outside the form: the page reruns) gets a box of its
        # own, empty, not the preset's MLP width under a ResNet. A model changed inside the
        # form shows only at Start, which leaves the preset's options out and says so.
        key, text = _key(field), train_form.option_text(values, field)
        if field == "model_kwargs" and family != options.family_of(str(values["model"])):
            key, text = f"{key}.{family}", ""
        col.text_input(
            label, value=text, key=key,
            placeholder=example, help=f"key=value, separated by commas. {help_} A wrong name "
            "lists the allowed ones.",
        )  # fmt: skip
    points = jobs.start_points(jobs.list_runs())
    st.selectbox(
        "…or start from a finished run", [None, *points], key=f"{state.TRAIN_INIT_RUN}.{_suffix()}",
        format_func=lambda name: "no: fresh weights" if name is None else name,
        help="Its best checkpoint, loaded into the plain model before composing (the same "
        "function): e.g. your own trained network, or a finished N=1 run.",
    )  # fmt: skip


def _numbers(values: dict) -> None:
    inits, devices = options.inits(), options.devices()
    c = st.columns(4)
    c[0].number_input(
        "N (factors per layer)",
        step=1,
        value=int(values["n_factors"]),
        key=_key("n_factors"),
        help="N=1 is the ordinary network; N≥2 composes every weight from N factors.",
    )
    c[1].selectbox(
        "Init", inits, index=_index(inits, values["init"]), key=_key("init"),
        help="balanced: the composed network starts as the same function as N=1 "
        "(fair comparison); independent: every factor gets PyTorch's default init.",
    )  # fmt: skip
    c[2].number_input(
        "Weight decay λ",
        step=1e-4,
        format="%g",
        value=float(values["weight_decay"]),
        key=_key("weight_decay"),
    )
    c[3].number_input("Learning rate", step=1e-4, format="%g", value=float(values["lr"]),
                      key=_key("lr"))  # fmt: skip
    c = st.columns(5)
    c[0].number_input("Epochs", step=1, value=int(values["epochs"]), key=_key("epochs"))
    c[1].number_input(
        "Plain epochs first", step=1, min_value=0, value=int(values.get("plain_epochs", 0)),
        key=_key("plain_epochs"),
        help="Train the ordinary network for these epochs, then compose it into N factors (the "
        "same function) for the rest. The Fashion-MNIST preset trains 5 of its 10 epochs so, "
        "and its composed epochs at half the learning rate (composed_lr_scale 0.5, "
        "`--composed-lr-scale` on the command line): N=3 then ends within 0.1 points of N=1's "
        "accuracy (docs/vs_pruning.md). 0: composed from the start. Ignored for N=1.",
    )  # fmt: skip
    c[2].number_input(
        "Batch size", step=16, value=int(values["batch_size"]), key=_key("batch_size"),
        help="Examples per step, in all (split across the processes when training on several "
        f"GPUs). 0 = automatic: {options.auto_batch()['cuda']} on a GPU, "
        f"{options.auto_batch()['cpu']} on a CPU.",
    )  # fmt: skip
    c[3].number_input("Seed", step=1, value=int(values["seed"]), key=_key("seed"))
    c[4].selectbox(
        "Device", devices, index=_index(devices, values.get("device", options.AUTO)),
        key=_key("device"), help="auto picks the best one available here.",
    )  # fmt: skip


def _form() -> bool:
    """The form, and Start pressed; whether a field differs from its starting value."""
    start = train_form.starting_values(st.session_state[state.TRAIN_PRESET], _seed_config())
    given = dict(_from_url())
    ticks = train_form.ticks_baseline(st.session_state.get(state.TRAIN_SEED_RUN))
    ticked = given.pop(train_url.BASELINE, ticks)  # the address's, on a refresh
    values = {**start, **given}
    family = _choosers(values)
    with st.container(border=True):
        _data_and_model(values, family)
        _numbers(values)
        c = st.columns([3, 1])
        c[0].checkbox(
            "also train N=1 (same seed)", key=state.TRAIN_BASELINE, value=ticked,
            help="Starts the ordinary network too (after this one when only one run may "
            "train at a time): the comparison the method is about.",
        )  # fmt: skip
        submitted = c[1].button("Start training", type="primary", width="stretch", key=START_KEY)
    if submitted:
        _start(family)
    edited = _to_url(family, start)
    return _baseline_to_url(ticks) or edited


def _baseline_to_url(ticks: bool) -> bool:
    """Keep the "also train N=1" box in the address while it differs from ``ticks`` (what
    the form ticks by itself); whether it differs."""
    kept = train_url.baseline_text(st.session_state.get(state.TRAIN_BASELINE, ticks), ticks)
    state.to_url(train_url.BASELINE, kept)
    return kept is not None


def _typed_form(family: str) -> dict:
    """The form's fields as its widgets hold them (the dataset's choice and folder apart)."""
    form = {f: st.session_state.get(_key(f)) for f in FIELD_KEYS if f != "model"}
    own = f"{_key('model_kwargs')}.{family}"  # the box of a family other than the preset's
    if own in st.session_state:
        form["model_kwargs"] = st.session_state[own]
        form["typed"] = ("model_kwargs",)  # filled for this family: the user's own
    form["model"] = st.session_state.get(f"{_key('model')}.{family}")
    return form


def _upload():
    """The uploaded starting weights (a Streamlit UploadedFile; a DeletedFile when its bytes
    are gone from the server), or None."""
    return st.session_state.get(f"{state.TRAIN_INIT_FROM}.{_suffix()}")


def _form_values(family: str) -> tuple[dict, list[str]]:
    """The form's fields, and what is wrong with those the config cannot check: an image
    folder given for a dataset that takes none, the starting weights (uploaded or a run's)."""
    form = _typed_form(family)
    errors = train_form.folder_errors(form["dataset"], form["dataset_path"])
    run = st.session_state.get(f"{state.TRAIN_INIT_RUN}.{_suffix()}")
    try:
        form["init_from"] = _init_from(_upload(), run)
    except ValueError as exc:
        errors.append(ui.one_line(exc))
    except OSError as exc:  # a runs folder the upload cannot be kept in (full, read-only)
        errors.append(f"init_from: the upload cannot be kept in the runs folder ({exc.strerror})")
    return form, errors


def _init_from(upload, run: str | None):
    """Where the starting weights are: the upload, kept in the runs folder, or a finished
    run's best checkpoint; None for fresh weights. ValueError naming init_from otherwise."""
    if upload is not None and run:
        raise ValueError("init_from: start from the uploaded weights or from a run, not both")
    if upload is None:
        return jobs.start_point(run) if run else None
    if not hasattr(upload, "getvalue"):
        raise ValueError("init_from: the uploaded file is gone from the server; upload it again")
    return train_form.save_upload(upload.name, upload.getvalue())


def _weights_text(config: dict) -> str:
    """Where a started run's weights come from, as the toast says it."""
    run = st.session_state.get(f"{state.TRAIN_INIT_RUN}.{_suffix()}")
    if not config.get("init_from"):
        return "fresh weights"
    if run:
        return f"the best checkpoint of {run}"
    return f"the weights `{train_form.upload_name(config['init_from'])}`"


def _cannot_start(message: str, saved=None) -> None:
    upload = _upload()
    shown = train_form.name_upload(message, saved, getattr(upload, "name", None))
    st.error(f"Cannot start: {shown}", icon="🚫")


def _start(family: str) -> None:
    preset = st.session_state[state.TRAIN_PRESET]
    form, errors = _form_values(family)
    notes: list[str] = []  # said once the run starts
    found: dict = {}  # what the dataset check said (its note, its warnings)
    try:
        typed = form.pop("typed", ())
        config = train_form.build(preset, form, _seed_config(), notes, typed)
    except ValueError as exc:
        errors.append(ui.one_line(exc))
        config = None
    saved = config.get("init_from") if config else None
    if config is not None:
        errors += train_form.check(preset, config, notes, found)
    if any(e.startswith(train_form.FOLDER_BOX) for e in errors):  # said of the box already
        errors = [e for e in errors if not e.startswith("dataset:")]
    for message in errors:
        _cannot_start(message, saved)
    if errors or config is None:
        train_form.forget_upload(form.get("init_from"))  # a refused file is not kept
        return
    base_cfg = None
    if st.session_state[state.TRAIN_BASELINE] and int(config.get("n_factors", 1)) != 1:
        base_cfg = presets.baseline_config(config)
    key = train_form.start_key(config, base_cfg)
    ago = train_form.same_start_ago(st.session_state.get(state.TRAIN_LAST_START), key)
    if ago is not None:
        # Streamlit runs a page again with the button still pressed when a rerun cut the
        # run that started these (the toast below is a point where it can): the same click
        name, baseline = st.session_state[state.TRAIN_LAST_START]["runs"]
        st.info(f"{name} was started with these settings {ago:.0f} s ago; press Start again "
                "for another run.", icon="ℹ️")  # fmt: skip
        st.session_state[state.TRAIN_LAST_START] = None
    else:
        try:
            with st.spinner("Starting the training process…"):
                name, baseline = jobs.start_pair(config, base_cfg)
        except (ValueError, OSError) as exc:  # (OSError: a runs folder it cannot write in)
            _cannot_start(ui.one_line(exc), saved)
            train_form.forget_upload(form.get("init_from"))
            return
        st.session_state[state.TRAIN_LAST_START] = train_form.start_record(key, name, baseline)
        train_form.remember_start(name, baseline)
    state.set_current_run(name)
    st.session_state[state.TRAIN_FOLLOW] = name
    st.toast(f"Started {name}" + (f" and its N=1 baseline {baseline}" if baseline else "")
             + f" from {_weights_text(config)}")  # fmt: skip
    _said_at_start(notes, found)


def _said_at_start(notes: list[str], found: dict) -> None:
    """What a run that started is worth knowing: ``notes`` (the preset's options left out, a
    pretrained head left fresh), then what the dataset check said (``found``), each once."""
    for said in notes:
        st.info(ui.sentence(said), icon="ℹ️")
    for said in found.get("warnings", ()):  # (an image over Pillow's pixel limit)
        st.warning(ui.sentence(said), icon="⚠️")
    note = found.get("note", "")
    if "download" in note:
        st.info(f"Data: {note}. Without internet the run stops with what to do.", icon="🌐")
    elif "too few to measure" in note:
        st.warning(f"Data: {note}.", icon="⚠️")
    elif "left out" in note:
        st.info(f"Data: {note}.", icon="🗂️")


def _progress(v: jobs.JobView, *, small: bool = False) -> None:
    label = f"**{v.name}** · " if small else ""
    st.progress(v.fraction, text=label + jobs.progress_text(v))


def _status_line(v: jobs.JobView) -> None:
    if v.status.get("note"):  # what the run chose for itself (a pretrained head left fresh)
        st.caption(str(v.status["note"]))
    if v.waiting_for_slot:
        st.info(
            f"Queued: waiting for a free training slot (at most {jobs.max_concurrent()} run(s) "
            "train at a time). It starts by itself when the run ahead of it ends.",
            icon=STATE_ICON["queued"],
        )
    elif v.state == "queued":
        st.info("Preparing: loading the data and building the model…", icon=STATE_ICON["queued"])
    elif v.state == jobs.STARTING:
        st.info("Starting the training process…", icon=STATE_ICON["starting"])
    elif v.state == "failed":
        st.error(f"The run failed: {v.message or 'no message'}", icon=STATE_ICON["failed"])
        if jobs.log_path(v.name).is_file():  # (a run started from the command line has none)
            st.caption(f"Full output of the training process: `{jobs.log_path(v.name)}`")
    elif v.state == "stopped":
        text = v.message[:1].upper() + v.message[1:] if v.message else "Stopped"
        st.warning(f"{text.rstrip('.')}.", icon=STATE_ICON["stopped"])
    elif v.state == "completed":
        st.success(f"Completed. {jobs.result_text(v.name)}", icon=STATE_ICON["completed"])
    elif v.state == "missing":
        st.warning(v.message, icon=STATE_ICON["missing"])


def _follower(name: str) -> live.RunFollower:
    """The incremental reader of ``name``'s logs (new lines only, each second), shared by
    every session that shows the run."""
    return live.follower(jobs.store().get(name))


def _charts(name: str) -> None:
    f = _follower(name)
    metrics = f.metric_rows()
    c1, c2 = st.columns(2)
    for col, metric in ((c1, "loss"), (c2, "acc")):
        plot.show(
            charts.training_curves(
                {name: metrics}, metric, uirevision=f"{metric}-{name}", task=f.run.task
            ),  # fmt: skip
            key=f"train.chart.{metric}",
            where=col,
        )
    st.subheader("Spectra")
    spectra = f.spectra_rows()
    layers = live.layer_names(spectra)
    if not layers:
        st.caption("The first spectra snapshot appears after the first evaluation.")
        return
    if st.session_state.get(state.TRAIN_LAYER) not in layers:
        st.session_state[state.TRAIN_LAYER] = live.widest_layer(spectra) or layers[0]
    layer = st.selectbox("Layer for the heatmap", layers, key=state.TRAIN_LAYER)
    steps, values = live.layer_series(spectra, layer)
    plot.show(
        charts.spectrum_heatmap(
            steps,
            values,
            layer=layer,
            uirevision=f"heat-{name}-{layer}",
            max_rows=charts.SHOWN_POINTS,
        ),  # fmt: skip
        key="train.chart.heatmap",
    )
    c1, c2 = st.columns(2)
    step, current = live.latest(spectra)
    shown = live.pick_layers(current)
    plot.show(
        charts.layer_spectra_chart(
            {k: current[k] for k in shown},
            title=f"Singular values at step {step} (σ/σ_max)" if len(shown) < len(current)
            else f"Singular values of every layer at step {step} (σ/σ_max)",
            uirevision=f"spectra-{name}", max_points=charts.SHOWN_POINTS,
        ),
        key="train.chart.spectra", where=c1,
    )  # fmt: skip
    r_steps, ranks = f.rank_series()
    plot.show(
        charts.rank_curves(
            r_steps, {k: ranks[k] for k in shown if k in ranks},
            title=f"Effective rank ({live.rank_rule()})", uirevision=f"ranks-{name}",
        ),
        key="train.chart.ranks", where=c2,
    )  # fmt: skip


def _stop_button(active: list[str]) -> None:
    label = "Stop" if len(active) == 1 else "Stop both"
    st.button(label, key="train.stop", icon="⏹️", on_click=_stop, args=(active,))


def _stop(names: list[str]) -> None:
    """The Stop button's callback, given the runs that were training when it was drawn: each
    still training is asked to stop. A run that ended between the drawing and the click (its
    button then gone from the redrawn panel) has nothing to stop, and the page says so instead
    of saying nothing."""
    asked = [n for n in names if jobs.view(n).active]
    for name in asked:
        jobs.stop(name)
    st.session_state[state.TRAIN_STOP_SAID] = (
        "Stop requested: a run ends after its current step, with a checkpoint."
        if asked
        else f"{' and '.join(names)} had already ended: nothing to stop."
    )


def _panel(name: str) -> tuple[jobs.JobView, jobs.JobView | None]:
    said = st.session_state.pop(state.TRAIN_STOP_SAID, None)
    if said:
        st.toast(said)
    v = jobs.view(name)
    st.markdown(f"### {v.name}")
    _progress(v)
    baseline = jobs.baseline_of(name)
    bv = jobs.view(baseline) if baseline else None
    if bv is not None:
        _progress(bv, small=True)
    _status_line(v)
    if bv is not None and bv.state == "failed" and bv.message != v.message:
        st.error(f"Its N=1 baseline **{bv.name}** failed: {bv.message or 'no message'}",
                 icon=STATE_ICON["failed"])  # fmt: skip
    active = [x.name for x in (v, bv) if x is not None and x.active]
    if active:
        _stop_button(active)
    elif not v.made and v.state == "failed":
        _dismiss_button([x for x in (v, bv) if x is not None and not x.made])
    if v.state in ("completed", "stopped"):
        st.page_link("pages/compress.py", label="Compress this run", icon="🗜️")
    if v.made and v.state not in ("starting", "missing"):
        _charts(name)
    return v, bv


def _dismiss_button(failed: list[jobs.JobView]) -> None:
    """Dismiss runs whose training process ended before making their folder: they leave the
    listings (the next Start also stops listing them), and the page follows another run."""
    st.button(
        "Dismiss", key="train.dismiss", icon="✖️", on_click=_dismiss, args=([v.name for v in failed],),
        help="Forget this failed start (its request and output in the runs folder's .app/ are "
        "removed).",
    )  # fmt: skip


def _dismiss(names: list[str]) -> None:
    """The Dismiss button's callback (before the page draws the follow picker)."""
    try:
        for name in names:
            jobs.dismiss(name)
    except ValueError as exc:  # started meanwhile, say: shown on the page
        ui.report_later(exc, "Dismiss")
        return
    state.set_current_run(None)
    st.session_state.pop(state.TRAIN_FOLLOW, None)


@st.fragment(run_every=LIVE_EVERY_S)
def _live(name: str) -> None:
    """Redrawn every second while the run is active; a full rerun once it ends."""
    try:
        with st.container(key=LIVE_KEY):
            v, bv = _panel(name)
    except Exception as exc:  # noqa: BLE001
        ui.report(exc, "Following the run")
        return
    jobs.reap()
    if not v.active and not (bv is not None and bv.active):
        st.rerun()


def _follow() -> None:
    ui.show_pending_error()  # (a Dismiss that was refused)
    runs = jobs.list_runs()
    names = [r["name"] for r in runs]
    current = state.current_run()
    if current and current not in names and jobs.view(current).state == "missing":
        st.info(f"Run {current} is not in the runs folder (deleted?); following another.")
        current = None
    elif current is None and state.url_run_note():
        st.info(state.url_run_note(), icon="ℹ️")
    # (a run whose training process ended before making its folder is followed still: its
    # panel says why it failed, never another run's state)
    if not names and not current:
        st.caption("No runs yet. Pick a preset and press Start.")
        return
    options_ = names if current is None or current in names else [current, *names]
    if st.session_state.get(state.TRAIN_FOLLOW) not in options_:
        st.session_state[state.TRAIN_FOLLOW] = current or jobs.default_follow(runs) or options_[0]
    name = st.selectbox("Follow run", options_, key=state.TRAIN_FOLLOW)
    if name != current:
        state.set_current_run(name)
    elif name:
        st.query_params[state.QUERY_RUN] = name
    if jobs.pair_active(name):
        st.html(_NO_FADE)
        _live(name)
    else:
        _other_training(runs, name)
        _panel(name)


def _other_training(runs: list[dict], followed: str) -> None:
    """Following a finished run while another one trains (a refresh just after Start, a
    second tab): say so, so that nobody starts it twice."""
    busy = [r for r in runs if r.get("state") in jobs.LIVE]
    busy = [r for r in busy if r["name"] not in (followed, jobs.baseline_of(followed))]
    if busy:
        now = ", ".join(f"**{r['name']}** ({r['state']})" for r in busy[:3])
        st.info(f"Training now: {now}. Pick it in *Follow run* to watch it.", icon="▶️")


@ui.guarded
def main() -> None:
    ui.page_title("Train")
    _init_form()
    edited = _form()
    st.divider()
    _follow()
    _preset_to_url(edited)  # after _follow: the run followed, which a refresh opens on


main()
