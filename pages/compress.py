"""Compress: pick a finished run, choose a rank policy, slide the truncation."""

from __future__ import annotations

import streamlit as st

from app import cache, charts, jobs, latency, live, plot, state, tables, ui
from app import compress as cz
from lorita.data import DatasetUnavailable
from lorita.kinds import stages
from lorita.scores import Score, score_of


def _slider_key(policy: str) -> str:
    return f"{state.COMPRESS_VALUE}.{policy}"


def _pick_smallest(root: str, name: str, which: str, policy: str) -> None:
    """The smallest model within X points (validation), for the slider to move to on the
    next run of the page (a widget's value cannot change once it is drawn)."""
    try:
        drop = float(st.session_state[state.COMPRESS_MAX_DROP])
        session = cache.session(root, name, which)
        value = cz.smallest_within(session, policy, drop)
        if value is None:
            st.session_state[state.LAST_ERROR] = (
                f"No {policy} setting keeps validation {score_of(session.task).name} within "
                f"{drop:g} points."
            )
            return
        st.session_state[state.COMPRESS_FOUND] = (policy, value)
        st.session_state[state.LAST_ERROR] = None
    except Exception as exc:  # noqa: BLE001 - shown as one line on the next run
        ui.report_later(exc, "Smallest model")


def _run_label(row: dict) -> str:
    acc = row.get("best_val_acc")
    acc = f", val {ui.score_text(score_of(row.get('task')), acc, 1)}" if acc is not None else ""
    return f"{row['name']}  (N={row.get('n_factors')}{acc})"


class CurveDrawer:
    """Progress callback of a trade-off sweep: a real progress bar, the chart filling in."""

    def __init__(self, label: str, x_axis: str, total_hint: str, task: str) -> None:
        self.label, self.x_axis, self.task = label, x_axis, task
        self.points: list[dict] = []
        self.bar = st.progress(0.0, text=f"Computing the {total_hint} trade-off curve…")
        self.chart = st.empty()

    def __call__(self, done: int, total: int, point: dict) -> None:
        self.points.append(point)
        self.bar.progress(done / max(1, total), text=f"{self.label}: {done} of {total} points")
        if done % 3 == 0 or done == total:
            plot.show(
                charts.tradeoff_chart(
                    {self.label: list(self.points)}, x=self.x_axis, task=self.task,
                    title=f"Computing the trade-off curve ({self.label})…",
                ),
                where=self.chart,
            )  # fmt: skip

    def clear(self) -> None:
        self.bar.empty()
        self.chart.empty()


def _curve(root: str, name: str, which: str, policy: str, label: str, x_axis: str) -> list:
    """The stored curve, or computed now (once per checkpoint) with a progress bar."""
    points = cz.stored_curve(name, which, policy, root)
    if points is None and cz.curve_being_kept(name, root):
        note = st.empty()
        text = f"The training process of {label} is keeping its trade-off curve"
        points = cz.wait_for_curve(name, which, policy, root,
                                   tick=lambda t: note.info(f"{text} ({t:.0f} s)…"))  # fmt: skip
        note.empty()
    if points is not None:
        return points
    session = cache.session(root, name, which)
    drawer = CurveDrawer(label, x_axis, label, session.task)
    points = cz.compute_curve(session, policy, root=root, progress=drawer)
    drawer.clear()
    return points


def _choose_run(root: str) -> tuple[str, str] | None:
    rows = cz.finished_runs(root)
    if not rows:
        st.info("No run with a checkpoint yet. Train one first (the classroom preset takes ~15 s).")
        st.page_link("pages/train.py", label="Go to Train", icon="🏋️")
        return None
    by_name = {r["name"]: r for r in rows}
    names = list(by_name)
    if st.session_state.get(state.COMPRESS_RUN) not in names:
        wanted = st.session_state.get(state.COMPRESS_RUN) or state.current_run()
        note = cz.unavailable_note(wanted, rows, root) or state.url_run_note()
        if note:
            st.info(note, icon="ℹ️")
        st.session_state[state.COMPRESS_RUN] = cz.default_run(rows, state.current_run())
    c1, c2 = st.columns([3, 1])
    name = c1.selectbox(
        "Run", names, key=state.COMPRESS_RUN, format_func=lambda n: _run_label(by_name[n]),
        on_change=state.pick_run, args=(state.COMPRESS_RUN,),
    )  # fmt: skip
    state.to_url(state.QUERY_RUN, name)  # a refresh comes back to this run
    state.pick_checkpoint(state.COMPRESS_WHICH, cz.checkpoints(name, root))
    score = score_of(by_name[name].get("task"))
    which = c2.radio(
        "Checkpoint", ["best", "last"], key=state.COMPRESS_WHICH, horizontal=True,
        help=f"best: highest validation {score.name} during training; last: the final weights.",
    )  # fmt: skip
    state.to_url(state.QUERY_WHICH, which)
    if not cz.checkpoint_mtime(name, which, root):
        st.warning(f"Run {name} has no {which} checkpoint yet.")
        return None
    return name, which


def _base_metrics(session) -> None:
    b, score = session.base, score_of(session.task)
    m = st.columns(4)
    m[0].metric(f"Original validation {score.name}", score.text(b["val_acc"], 1))
    m[1].metric(f"Original test {score.name}", score.text(b["test_acc"], 1))
    m[2].metric("Original parameters", ui.fmt_count(b["params"]))
    m[3].metric("Original FLOPs / input", ui.fmt_count(b["flops"]))
    if session.left_out:
        st.caption(" · ".join(f"**{n}** {why}" for n, why in session.left_out.items()))


def _url_value(policy: str, d: dict, url_policy: str | None) -> float:
    """The slider value a refreshed page had (from the URL, when it was ``policy``'s), else
    the policy's default; a value that is not a number in the slider's range is ignored."""
    value = (
        cz.url_value(policy, state.from_url(state.QUERY_VALUE)) if url_policy == policy else None
    )
    return d["default"] if value is None else value


def _slider(
    root: str, name: str, which: str, policy: str, url_policy: str | None, score: Score
):  # fmt: skip
    d = cz.scalar_policies()[policy]
    key = _slider_key(policy)
    found = st.session_state.pop(state.COMPRESS_FOUND, None)
    if found is not None and found[0] == policy:
        st.session_state[key] = found[1]
    state.setdefault(key, cz.snap(policy, _url_value(policy, d, url_policy)))
    value = st.slider(
        d["label"], float(d["min"]), float(d["max"]), step=float(d["step"]), key=key,
        help=d["help"], format=d["format"],
    )  # fmt: skip
    state.to_url(state.QUERY_VALUE, f"{value:g}")
    s1, s2 = st.columns([1, 3], vertical_alignment="bottom")
    state.setdefault(state.COMPRESS_MAX_DROP, 1.0)
    point = "" if score.percent else " (1 point = 0.01 of R²)"
    s1.number_input(
        f"within X points of validation {score.name}{point}", 0.0, 50.0, step=0.5,
        key=state.COMPRESS_MAX_DROP, help=f"X in {score.point_words}.",
    )  # fmt: skip
    if s2.button(
        "Smallest model within X points",
        help="Searches the slider's values on the validation split and moves the slider.",
    ):
        with st.spinner("Cutting and evaluating the slider's values on validation…"):
            _pick_smallest(root, name, which, policy)
        st.rerun()
    return value, cz.make_policy(policy, value)


def _rank_editor(session, name: str, which: str):
    full = dict(session.full_ranks)
    full = {n: full[n] for n in session.layers}
    prev = st.session_state.get(state.COMPRESS_CHOICE) or {}
    start = prev.get("ranks") if prev.get("run") == name and prev.get("ranks") else full
    groups = list(dict.fromkeys(stages(full, live.MAX_LAYERS_SHOWN).values()))  # in order
    ranks = {n: int(start.get(n, full[n])) for n in full}
    groups = groups if len(full) > live.MAX_LAYERS_SHOWN else [None]
    for stage in groups:
        with st.expander(f"stage {stage}" if stage else "ranks", expanded=stage is None):
            edited = st.data_editor(
                tables.rank_table(full, start, stage=stage),
                key=f"{state.COMPRESS_RANKS}.{name}.{which}.{stage}", hide_index=True,
                disabled=["layer", "full rank"],
                column_config={"rank": st.column_config.NumberColumn("rank", min_value=1, step=1)},
            )  # fmt: skip
            ranks.update(tables.read_rank_table(edited))
    return cz.make_policy("ranks", ranks=ranks)


def _result_metrics(res: dict, base: dict, setting: str, score: Score) -> None:
    r = st.columns(4)
    for col, part in ((r[0], "val"), (r[1], "test")):
        col.metric(
            f"{'Validation' if part == 'val' else 'Test'} {score.name}",
            score.text(res[f"{part}_acc"], 1),
            delta=score.change(res[f"{part}_acc"], base[f"{part}_acc"], 1, unit=" pts"),
        )
    r[2].metric("Parameters", ui.fmt_count(res["params"]),
                delta=f"{res['params_pct']:.1f} % of original", delta_color="off",
                delta_arrow="off")  # fmt: skip
    r[3].metric("FLOPs / input", ui.fmt_count(res["flops"]),
                delta=f"{res['flops_pct']:.1f} % of original", delta_color="off",
                delta_arrow="off")  # fmt: skip
    how = (f" (cut now; its {score.name} was measured when the run completed)"
           if res.get("kept") else "")  # fmt: skip
    st.caption(f"{setting}: computed in {1000 * res['seconds']:.0f} ms{how}.")
    budget = res.get("budget") or {}
    if budget and not budget.get("met", True):
        kept = res["params_pct"] if budget.get("measure") == "params" else res["flops_pct"]
        st.warning(
            f"A {budget['percent']:g} % budget cannot be met: with every layer at rank 1 the "
            f"model keeps {kept:.1f} % (what no cut shrinks: the whole head, BatchNorm, biases).",
            icon="⚠️",
        )


def _cost_axis() -> str:
    state.setdefault(state.COMPRESS_X, "params_pct")
    return st.radio(
        "Cost axis", ["params_pct", "flops_pct"], key=state.COMPRESS_X, horizontal=True,
        format_func={"flops_pct": "FLOPs %", "params_pct": "parameters %"}.get,
    )  # fmt: skip


def _kept_curves(root: str, name: str, which: str, policy: str, n: int) -> dict | None:
    """The trade-off curves kept in the run folders (this run and its N=1 baseline), or None
    if one of them still has to be swept (the session is needed for that)."""
    out = {f"this run (N={n})": cz.stored_curve(name, which, policy, root)}
    base_run = cz.find_baseline(name, root)
    if base_run:
        out["N=1 baseline"] = cz.stored_curve(base_run, which, policy, root)
    return None if any(v is None for v in out.values()) else out


def _swept_curves(root: str, name: str, which: str, policy: str, n: int, x_axis: str) -> dict:
    curves = {f"this run (N={n})": _curve(root, name, which, policy, f"N={n}", x_axis)}
    base_run = cz.find_baseline(name, root)
    if base_run:
        curves["N=1 baseline"] = _curve(root, base_run, which, policy, "N=1", x_axis)
    return curves


def _draw_tradeoff(
    slot, curves: dict, x_axis: str, name: str, task: str, res: dict | None = None
) -> None:
    plot.show(
        charts.tradeoff_chart(curves, x=x_axis, y="val_acc", current=res, task=task,
                              uirevision=f"tradeoff-{name}"),
        where=slot, key="compress.tradeoff" if res is not None else None,
    )  # fmt: skip


def _tradeoff_notes(root: str, name: str, n: int) -> None:
    st.caption("Where the chart opens zoomed on its top 20 points, double-click it to see all.")
    if n > 1 and not cz.find_baseline(name, root):
        paired = jobs.baseline_of(name, root)  # there, but without a checkpoint yet
        if paired:
            st.caption(
                f"Its N=1 baseline **{paired}** has no checkpoint yet (still starting, or "
                "stopped before its first one): its curve shows here once it has one."
            )
        else:
            st.caption(
                "No N=1 baseline with the same setup found. Tick “also train N=1” on the Train "
                "page to get its curve here."
            )


@st.cache_data(show_spinner="Cutting and pruning to this budget…", max_entries=32)
def _at_budget(
    root: str, name: str, base: str, which: str, percent: float, measure: str, mtimes: tuple
):
    ours, theirs = cache.session(root, name, which), cache.session(root, base, which)
    return cz.at_budget(ours, theirs, percent, measure)


def _baselines(root: str, name: str, which: str, policy: str, value, x_axis: str) -> None:
    """LoRITa's cut against the SVD cut and L1 pruning of the N=1 run (budget policies)."""
    base = cz.find_baseline(name, root)
    if policy not in cz.MEASURES or not base:
        return
    st.subheader("LoRITa against the baselines")
    state.setdefault("compress.compare", state.from_url(state.QUERY_COMPARE) == "1")
    on = st.toggle("Compare with the SVD cut and L1 pruning of the N=1 run", key="compress.compare")
    state.to_url(state.QUERY_COMPARE, "1" if on else None)  # a refresh comes back to it
    if not on:
        st.caption("Sweeps 5–50 % budgets once per checkpoint (kept in the run folder).")
        return
    measure = cz.MEASURES[policy]
    rows = cz.stored_comparison(name, base, which, measure, root)
    if rows is None:
        bar = st.progress(0.0, text="Cutting and pruning at 5–50 % budgets…")
        rows = cz.compute_comparison(
            cache.session(root, name, which), cache.session(root, base, which), measure,
            root=root, progress=lambda d, t, r: bar.progress(d / t, text=f"{d} of {t} cuts"),
        )  # fmt: skip
        bar.empty()
    task = cache.session(root, name, which).task
    plot.show(
        charts.tradeoff_chart(cz.comparison_curves(rows), x=x_axis, y="test_acc", task=task,
                              title=f"Test {score_of(task).name} of each method at 5–50 % "
                              "budgets"),
        key="compress.compare_chart",
    )  # fmt: skip
    mtimes = (cz.checkpoint_mtime(name, which, root), cz.checkpoint_mtime(base, which, root))
    table = _at_budget(root, name, base, which, float(value), measure, mtimes)
    st.markdown(f"**At this budget ({value:g} % of the {measure})**, no fine-tuning; every cut "
                "is chosen without the test split, which only reports.")  # fmt: skip
    st.dataframe(table, hide_index=True)


def _spectra(session, res: dict, name: str) -> None:
    st.subheader("Spectrum of every layer, with the cut")
    layers = session.layers
    shown = layers
    if len(layers) > live.MAX_LAYERS_SHOWN:
        shown = st.multiselect(
            "Layers to show", layers, default=live.pick_layers(layers, 6),
            key=f"compress.layers.{name}",
        )  # fmt: skip
    spectra = session.svd.spectra
    plot.show(
        charts.spectra_cut({n: spectra[n].tolist() for n in shown}, res["ranks"],
                           uirevision=f"cut-{name}", hover=False, max_points=charts.SHOWN_POINTS),
        key="compress.cut",
        config={"staticPlot": True},  # redrawn on every slider move: a picture is cheapest
    )  # fmt: skip
    st.caption("Each line is a layer's singular values over its largest; the dashed line is "
               "its cut. The table beside the trade-off chart lists the ranks.")  # fmt: skip


def _finetune(session, res: dict) -> None:
    with st.expander("Fine-tune after the cut (optional)"):
        f1, f2, f3 = st.columns([1, 1, 2], vertical_alignment="bottom")
        state.setdefault(state.COMPRESS_FT_EPOCHS, 2)
        state.setdefault(state.COMPRESS_FT_LR, 1e-3)
        epochs = f1.number_input("epochs", 1, 50, key=state.COMPRESS_FT_EPOCHS)
        lr = f2.number_input("learning rate", 1e-6, 1.0, key=state.COMPRESS_FT_LR, format="%.0e")
        token = cz.choice_token(st.session_state[state.COMPRESS_CHOICE])
        if f3.button("Fine-tune this model", key="compress.ft_go"):
            bar = st.progress(0.0, text=f"Fine-tuning: epoch 1 of {int(epochs)}…")
            tuned, metrics = cz.finetune(session, res["model"], epochs=int(epochs), lr=float(lr),
                                         progress=lambda text, done: bar.progress(done, text))  # fmt: skip
            bar.empty()
            st.session_state[state.FINETUNED] = {"key": token, "model": tuned, "metrics": metrics}
        f3.caption("The fine-tuned model is kept in this tab until a refresh: export it from the "
                   "Export page.")  # fmt: skip
        ft = st.session_state.get(state.FINETUNED)
        if ft and ft["key"] == token:
            score = score_of(session.task)
            st.success(
                f"Fine-tuned: validation {ui.score_text(score, ft['metrics']['val_acc'], 1)}, "
                f"test {ui.score_text(score, ft['metrics']['test_acc'], 1)}. The Export page "
                "can save it."
            )


def _session_or_say(root: str, name: str, which: str, mtime: float, box):
    """The compress session of the run's checkpoint; None when its images are not here as it
    trained on them (moved, or their classes changed), which ``box`` then says: no cut can be
    scored."""
    try:
        return cache.session(root, name, which, mtime)
    except DatasetUnavailable as exc:
        box.warning(
            f"{ui.one_line(exc)}. Every cut of run {name} is scored on the validation and test "
            "images it trained with: put the images back as they were to compress it. The "
            "Export page still writes it as trained (nothing cut).",
            icon="🗂️",
        )
        return None


def _controls(root: str, name: str, which: str):
    """The policy radio and its slider (no session needed); the rank table comes later."""
    labels = cz.policy_labels()
    from_url = state.from_url(state.QUERY_POLICY)
    state.setdefault(state.COMPRESS_POLICY, from_url if from_url in labels else "global")
    policy = st.radio("Rank policy", list(labels), key=state.COMPRESS_POLICY, horizontal=True,
                      format_func=labels.get)  # fmt: skip
    state.to_url(state.QUERY_POLICY, policy)
    if policy in cz.scalar_policies():
        return policy, *_slider(root, name, which, policy, from_url, cz.score_of_run(name, root))
    state.to_url(state.QUERY_VALUE, None)  # a slider's value, not this policy's
    return policy, None, None


@st.fragment
@ui.guarded
def workbench(root: str, name: str, which: str) -> None:
    """Everything a slider move changes, rerun alone when a widget in it changes.

    Drawn in an order that shows the most at once: the controls and the trade-off chart from
    the curves kept in the run folder come first; the session (checkpoint, SVDs) is loaded
    next, then the numbers of this setting. The uncut model's numbers are drawn by the page,
    outside the fragment.
    """
    if not cz.run_exists(name, root):  # deleted meanwhile (another tab): the page picks anew
        st.rerun()  # (and says why: cz.unavailable_note)
    policy, value, policy_obj = _controls(root, name, which)
    ui.show_pending_error()
    table_box, result_box = st.container(), st.container()
    left, right = st.columns([3, 2])
    with left:
        x_axis = _cost_axis()
        slot = st.empty()
    n = int((jobs.run_config(name, root) or {}).get("n_factors") or 1)
    curves = _kept_curves(root, name, which, policy, n) if value is not None else None
    loaded = (name, which, cz.checkpoint_mtime(name, which, root))
    task = cz.score_of_run(name, root).task
    if curves is not None and st.session_state.get(state.COMPRESS_LOADED) != loaded:
        _draw_tradeoff(slot, curves, x_axis, name, task)  # at once, while the session loads
    st.session_state[state.COMPRESS_LOADED] = None  # until it has loaded
    session = _session_or_say(root, name, which, loaded[2], table_box)
    if session is None:
        return
    st.session_state[state.COMPRESS_LOADED] = loaded
    drawn = st.session_state.get(state.COMPRESS_DRAWN)
    if drawn is not None and drawn != (loaded, jobs.view(name, root).active):
        # a newer checkpoint (the run trains on), or the run ended: the page's uncut numbers
        # and its note are of the older one, so the whole page is drawn again
        st.rerun()
    if session.data_note:
        with table_box:
            st.warning(session.data_note, icon="⚠️")
    if policy_obj is None:
        with table_box:
            policy_obj = _rank_editor(session, name, which)
    res = cz.apply(session, policy_obj, root)
    choice = {"run": name, "which": which, "policy": policy, "value": value,
              "ranks": res["ranks"]}  # fmt: skip
    st.session_state[state.COMPRESS_CHOICE] = choice
    with result_box:
        _result_metrics(res, session.base, cz.choice_text(choice), score_of(session.task))
        with st.expander(
            "Measured latency on this machine (batch 1 and 64) and where the time goes"
        ):
            latency.show(session, res)
    with left:
        if value is None:
            slot.info("The trade-off curve sweeps a policy's range; pick a policy with a slider.")
        else:
            curves = curves or _swept_curves(root, name, which, policy, n, x_axis)
            _draw_tradeoff(slot, curves, x_axis, name, session.task, res)
            _tradeoff_notes(root, name, n)
    with right:
        st.markdown("**Ranks kept**")
        st.dataframe(tables.kept_table(res["ranks"], dict(session.full_ranks)), hide_index=True)
    _baselines(root, name, which, policy, value, x_axis)
    _spectra(session, res, name)
    _finetune(session, res)


@ui.guarded
def main() -> None:
    ui.page_title("Compress")
    st.caption(
        "Merge the factors, take each layer's SVD once, then cut. Every slider move truncates "
        "from the cached SVD, evaluates validation and test in large batches and counts the cost."
    )
    root = str(jobs.runs_dir())
    picked = _choose_run(root)
    if picked is None:
        return
    # The uncut model's numbers do not change with the slider: drawn outside the fragment (a
    # slider move resends only what it changes), above it, once the fragment loaded the session.
    base_box = st.container()
    name, which = picked
    view = jobs.view(name, root)
    training = cz.still_training(name, which, root)
    if training:
        st.info(
            f"{training}; move the slider for a newer one, and wait for the run to complete "
            "for the final numbers.",
            icon="⏳",
        )
    st.session_state[state.COMPRESS_DRAWN] = None  # (the fragment draws along with the page)
    workbench(root, *picked)
    loaded = st.session_state.get(state.COMPRESS_LOADED)
    if loaded is not None and loaded[:2] == (name, which):
        with base_box:  # the checkpoint the fragment loaded (one that failed reports once)
            _base_metrics(cache.session(root, name, which, loaded[2]))
        st.session_state[state.COMPRESS_DRAWN] = (loaded, view.active)
    st.page_link("pages/export.py", label="Export this model", icon="📦")


main()
