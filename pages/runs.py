"""Runs: every run in the store; overlay two or more; delete one with confirmation."""

from __future__ import annotations

import streamlit as st

from app import charts, jobs, live, plot, state, tables, ui
from lorita.scores import score_of


def _default_pick(rows: list[dict]) -> list[str]:
    names = [r["name"] for r in rows]
    current = state.current_run()
    if current in names:
        pick = [current]
        partner = jobs.partner(current)
        if partner:
            pick.append(partner)
        return pick
    whole = [r["name"] for r in rows if not r.get("broken")]  # a broken folder draws nothing
    return (whole or names)[:2]


def _delete_section(names: list[str]) -> None:
    """Delete a finished run (``names``; a run still training is stopped on the Train page
    first), after a confirmation."""
    st.subheader("Delete a run")
    ui.show_pending_error()
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    target = c1.selectbox("Run to delete", names, key=state.RUNS_DELETE, index=None,
                          placeholder="choose a run",
                          help="Finished runs; stop a run on the Train page to delete it.")  # fmt: skip
    if c2.button("Delete…", key="runs.delete_ask", disabled=target is None):
        st.session_state[state.CONFIRM_DELETE] = target
    pending = st.session_state.get(state.CONFIRM_DELETE)
    if pending:
        st.warning(f"Delete run **{pending}** and all its files? This cannot be undone.")
        y, n, _ = st.columns([1, 1, 4])
        if y.button("Yes, delete", key="runs.delete_yes", type="primary"):
            st.session_state[state.CONFIRM_DELETE] = None
            try:
                jobs.delete(pending)
            except ValueError as exc:  # started again meanwhile, say: the page redrawn says why
                st.session_state[state.LAST_ERROR] = ui.one_line(exc)
                st.rerun()
            if state.current_run() == pending:
                state.set_current_run(None)
            st.session_state.pop(state.RUNS_DELETE, None)
            # said by the page drawn again: a toast made just before st.rerun() is lost
            st.session_state[state.RUNS_DELETED] = pending
            st.rerun()
        if n.button("Cancel", key="runs.delete_no"):
            st.session_state[state.CONFIRM_DELETE] = None
            st.rerun()


def _compare(picked: list[str], summaries: dict[str, dict]) -> None:
    """Overlay the ``picked`` runs (``summaries``: their table rows, by name), each from its logs'
    bounded, thinned copy (:func:`app.live.follower`: new lines only on a rerun)."""
    store = jobs.store()
    runs = {n: store.get(n) for n in picked}
    followers = {n: live.follower(r) for n, r in runs.items()}
    metrics = {n: f.metric_rows() for n, f in followers.items()}
    spectra = {n: f.spectra_rows() for n, f in followers.items()}
    labels = {n: f"{n} (N={r.config.get('n_factors')})" for n, r in runs.items()}
    key = "-".join(picked)
    c1, c2 = st.columns(2)
    plot.show(
        charts.training_curves(
            {labels[n]: m for n, m in metrics.items()}, "loss", splits=("val",),
            title="Validation loss", uirevision=f"cmp-loss-{key}",
        ),
        key="runs.chart.loss", where=c1,
    )  # fmt: skip
    tasks = {n: r.task for n, r in runs.items()}
    by_task = {t: [n for n in picked if tasks[n] == t] for t in dict.fromkeys(tasks.values())}
    for task, names in by_task.items():  # accuracy and R² are not drawn on one axis
        score = score_of(task)
        plot.show(
            charts.training_curves(
                {labels[n]: metrics[n] for n in names}, "acc", splits=("val",), task=task,
                title=f"Validation {score.name}", uirevision=f"cmp-acc-{key}-{task}",
            ),
            key="runs.chart.acc" if len(by_task) == 1 else f"runs.chart.acc.{task}", where=c2,
        )  # fmt: skip
    layers: list[str] = []
    for rows in spectra.values():
        for name in live.layer_names(rows):
            if name not in layers:
                layers.append(name)
    if not layers:
        st.caption("No spectra logged yet for these runs.")
        return
    if st.session_state.get(state.RUNS_LAYER) not in layers:
        widest = [live.widest_layer(rows) for rows in spectra.values()]
        st.session_state[state.RUNS_LAYER] = next((w for w in widest if w), layers[0])
    layer = st.selectbox("Layer", layers, key=state.RUNS_LAYER)
    final, steps, ranks = tables.overlay(spectra, layer)
    c1, c2 = st.columns(2)
    plot.show(
        charts.layer_spectra_chart(
            {labels[n]: v for n, v in final.items()},
            title=f"Final spectrum of {layer} (σ/σ_max)",
            uirevision=f"cmp-spec-{key}",
            max_points=charts.SHOWN_POINTS,
            legend_below=True,
        ),
        key="runs.chart.spectra",
        where=c1,
    )
    plot.show(
        charts.rank_curves(
            {labels[n]: v for n, v in steps.items()}, {labels[n]: v for n, v in ranks.items()},
            title=f"Effective rank of {layer}", uirevision=f"cmp-rank-{key}", legend_below=True,
        ),
        key="runs.chart.ranks", where=c2,
    )  # fmt: skip
    st.markdown(f"**Effective rank per layer at the last snapshot** ({live.rank_rule()})")
    st.dataframe(tables.ranks_table([summaries[n] for n in picked]), hide_index=True)


@ui.guarded
def main() -> None:
    ui.page_title("Runs")
    deleted = st.session_state.pop(state.RUNS_DELETED, None)
    if deleted:
        st.toast(f"Deleted {deleted}", icon="🗑️")
    _misnamed()
    rows = jobs.list_runs()
    if not rows:
        st.info("No runs yet.")
        st.page_link("pages/train.py", label="Start one on the Train page", icon="🏋️")
        return
    live_rows = [r for r in rows if r.get("state") in jobs.LIVE]
    _training_now(live_rows)
    _failed_starts(rows)
    scores = {c: st.column_config.NumberColumn(format=f)
              for c, f in tables.run_column_formats(rows).items()}  # fmt: skip
    st.dataframe(  # the live runs on top, then the others newest first
        tables.runs_table(live_rows + [r for r in rows if r.get("state") not in jobs.LIVE]),
        hide_index=True,
        column_config={
            **scores,
            "weight decay": st.column_config.NumberColumn(format="%g"),
            "lr": st.column_config.NumberColumn(format="%g"),
        },
    )
    _why_failed(rows)
    made = [r for r in rows if jobs.has_folder(r)]  # a starting run has no folder yet
    names = [r["name"] for r in made]
    if _pick_invalid(names):
        url_pick = _url_pick(names) if state.RUNS_PICK not in st.session_state else None
        st.session_state[state.RUNS_PICK] = _default_pick(made) if url_pick is None else url_pick
    picked = st.multiselect(
        "Compare runs (N=1 against N=3 is the lesson)",
        names,
        key=state.RUNS_PICK,
    )
    state.to_url(state.QUERY_OVERLAY, picked or [""])  # a refresh overlays them again
    if picked:
        _compare(picked, {r["name"]: r for r in made})
    else:
        st.caption("Pick one or more runs to overlay their curves and spectra.")
    st.divider()
    _delete_section([r["name"] for r in made if r.get("state") not in jobs.ACTIVE])


SHOWN_LIVE = 5  # live runs named in the note above the table; the others counted


def _training_now(rows: list[dict]) -> None:
    """One note naming the runs training now first, then those starting or queued, the first
    few of them: a class's thirty queued runs do not push the table off the screen."""
    if not rows:
        return
    rows = sorted(rows, key=lambda r: r.get("state") != "running")  # (stable: newest first)
    lines = []
    for row in rows[:SHOWN_LIVE]:
        total = f"/{row['total_steps']}" if row.get("total_steps") else ""
        lines.append(f"Training now: **{row['name']}** ({row['state']}, step "
                     f"{row.get('step') or 0}{total})")  # fmt: skip
    more = rows[SHOWN_LIVE:]
    if more:
        states = ", ".join(f"{sum(r.get('state') == s for r in more)} {s}"
                           for s in dict.fromkeys(r.get("state") for r in more))  # fmt: skip
        lines.append(f"and {len(more)} more ({states}): at the top of the table")
    st.info("  \n".join(lines), icon="▶️")


def _misnamed() -> None:
    """Run folders whose names no run can have: not listed, so said, with how to fix it."""
    names = jobs.store().misnamed()
    if names:
        shown = ", ".join("`" + repr(n)[:60].replace("`", "'") + "`" for n in names[:5])
        shown += " …" if len(names) > 5 else ""
        st.warning(
            f"Not listed: {shown} in `{jobs.runs_dir()}`. A run's name is 1-100 letters, "
            "digits, '.', '_' or '-', starting with a letter or digit; rename the folder to "
            "see it here.",
            icon="⚠️",
        )


SHOWN_FAILED = 10  # failed runs whose message the note under the table shows


def _why_failed(rows: list[dict]) -> None:
    """Under the table, the failed runs (newest first) with their messages: what happened and
    how to go on with each (resume it from its last checkpoint, train it again, ...)."""
    failed = [r for r in rows if r.get("state") == "failed" and jobs.has_folder(r)]
    if not failed:
        return
    with st.expander(f"Why {len(failed)} run{'' if len(failed) == 1 else 's'} failed"):
        for row in failed[:SHOWN_FAILED]:
            st.text(f"{row['name']}: {row.get('message') or 'no message'}")
        if len(failed) > SHOWN_FAILED:
            st.caption(f"and {len(failed) - SHOWN_FAILED} more: pick one on the Train page")


def _failed_starts(rows: list[dict]) -> None:
    """Runs whose training process ended before it made their folder (a dataset missing and
    no internet, say): each with its message, which says what to do, until dismissed."""
    for row in rows:
        if row.get("state") != "failed" or jobs.has_folder(row):
            continue
        c1, c2 = st.columns([5, 1], vertical_alignment="center")
        c1.error(f"**{row['name']}** failed before it began: {row.get('message') or 'no message'}",
                 icon="🚫")  # fmt: skip
        if c2.button("Dismiss", key=f"runs.dismiss.{row['name']}"):
            jobs.dismiss(row["name"])
            st.rerun()


def _url_pick(names: list[str]) -> list[str] | None:
    """The runs the address overlays (``?overlay=a&overlay=b``; ``?overlay=`` none) that are in
    ``names``; None when it names none of them (no parameter, runs deleted since, a mangled
    link): the page's default pick."""
    given = [n for n in st.query_params.get_all(state.QUERY_OVERLAY) if n != ""]
    if state.QUERY_OVERLAY in st.query_params and not given:
        return []  # none picked
    kept = list(dict.fromkeys(n for n in given if n in names))
    return kept or None


def _pick_invalid(names: list[str]) -> bool:
    picked = st.session_state.get(state.RUNS_PICK)
    return picked is None or any(p not in names for p in picked)


main()
