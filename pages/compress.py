"""Compress: pick a finished run, choose a rank policy, slide the truncation."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import cache, charts, jobs, state, ui
from app import compress as cz


def _slider_key(policy: str) -> str:
    return f"{state.COMPRESS_VALUE}.{policy}"


def _pick_smallest(root: str, name: str, which: str, policy: str) -> None:
    """Button callback: move the slider to the smallest model within X points (validation)."""
    try:
        drop = float(st.session_state[state.COMPRESS_MAX_DROP])
        res = cz.smallest_within(cache.context(root, name, which), policy, drop)
        if res.get("value") is None:
            st.session_state[state.LAST_ERROR] = (
                f"No {policy} setting keeps validation accuracy within {drop:g} points."
            )
            return
        ui_cfg = cz.POLICY_UI[policy]
        value = min(ui_cfg["max"], max(ui_cfg["min"], float(res["value"])))
        st.session_state[_slider_key(policy)] = value
        st.session_state[state.LAST_ERROR] = None
    except Exception as exc:  # noqa: BLE001 - shown as one line on the next run
        ui.report_later(exc, "Smallest model")


def _run_label(row: dict) -> str:
    acc = row.get("val_acc")
    acc = f", val {ui.fmt_pct(acc)}" if acc is not None else ""
    return f"{row['name']}  (N={row.get('N')}{acc})"


@ui.guarded
def main() -> None:
    st.title("Compress")
    st.caption(
        "Merge the factors, take each layer's SVD once, then cut. Every slider move truncates "
        "from the cached SVD, evaluates validation and test in large batches and counts the cost."
    )
    root = str(jobs.runs_dir())
    rows = cz.finished_runs(root)
    if not rows:
        st.info("No run with a checkpoint yet. Train one first (the classroom preset takes ~15 s).")
        st.page_link("pages/train.py", label="Go to Train", icon="🏋️")
        return
    by_name = {r["name"]: r for r in rows}
    names = list(by_name)
    wanted = state.current_run()
    if st.session_state.get(state.COMPRESS_RUN) not in names:
        st.session_state[state.COMPRESS_RUN] = cz.default_run(rows, wanted)
    c1, c2 = st.columns([3, 1])
    name = c1.selectbox(
        "Run", names, key=state.COMPRESS_RUN, format_func=lambda n: _run_label(by_name[n])
    )
    state.setdefault(state.COMPRESS_WHICH, "best")
    which = c2.radio(
        "Checkpoint", ["best", "last"], key=state.COMPRESS_WHICH, horizontal=True,
        help="best: highest validation accuracy during training; last: the final weights.",
    )  # fmt: skip
    if not cz.checkpoint_mtime(name, which, root):
        st.warning(f"Run {name} has no {which} checkpoint yet.")
        return
    ctx = cache.context(root, name, which)

    b = ctx.base
    m = st.columns(4)
    m[0].metric("Original validation accuracy", ui.fmt_pct(b["val_acc"]))
    m[1].metric("Original test accuracy", ui.fmt_pct(b["test_acc"]))
    m[2].metric("Original parameters", ui.fmt_count(ctx.base_cost.params))
    m[3].metric("Original FLOPs / input", ui.fmt_count(ctx.base_cost.flops))

    ui.show_pending_error()

    state.setdefault(state.COMPRESS_POLICY, "global")
    policy = st.radio(
        "Rank policy", list(cz.POLICY_NAMES), key=state.COMPRESS_POLICY, horizontal=True,
        format_func=cz.POLICY_NAMES.get,
    )  # fmt: skip

    value = None
    ranks_in: dict[str, int] | None = None
    if policy in cz.POLICY_UI:
        cfg = cz.POLICY_UI[policy]
        key = _slider_key(policy)
        state.setdefault(key, cfg["default"])
        value = st.slider(
            cfg["label"], cfg["min"], cfg["max"], step=cfg["step"], key=key, help=cfg["help"],
            format=cfg["format"],
        )  # fmt: skip
        s1, s2 = st.columns([1, 3], vertical_alignment="bottom")
        state.setdefault(state.COMPRESS_MAX_DROP, 1.0)
        s1.number_input(
            "within X points of validation accuracy", 0.0, 50.0, step=0.5,
            key=state.COMPRESS_MAX_DROP,
        )  # fmt: skip
        s2.button(
            "Smallest model within X points",
            on_click=_pick_smallest, args=(root, name, which, policy),
            help="Searches the policy's range on the validation split and moves the slider.",
        )  # fmt: skip
        policy_obj = cz.make_policy(policy, value)
    else:
        full = ctx.full_ranks()
        prev = st.session_state.get(state.COMPRESS_CHOICE) or {}
        start = prev.get("ranks") if prev.get("run") == name and prev.get("ranks") else full
        table = pd.DataFrame(
            {"layer": list(full), "full rank": list(full.values()),
             "rank": [int(start.get(n, full[n])) for n in full]}
        )  # fmt: skip
        edited = st.data_editor(
            table, key=f"{state.COMPRESS_RANKS}.{name}.{which}", hide_index=True,
            disabled=["layer", "full rank"],
            column_config={"rank": st.column_config.NumberColumn("rank", min_value=1, step=1)},
        )  # fmt: skip
        ranks_in = {}
        for _, row in edited.iterrows():
            r = row["rank"]
            if pd.isna(r):
                st.error(
                    f"rank of {row['layer']}: empty; enter an integer from 1 to {row['full rank']}"
                )
                return
            ranks_in[str(row["layer"])] = int(r)
        policy_obj = cz.make_policy("ranks", ranks=ranks_in)

    res = cz.apply(ctx, policy_obj)
    st.session_state[state.COMPRESS_CHOICE] = {
        "run": name, "which": which, "policy": policy, "value": value, "ranks": res["ranks"],
    }  # fmt: skip

    r = st.columns(4)
    r[0].metric(
        "Validation accuracy", ui.fmt_pct(res["val_acc"]),
        delta=f"{100 * (res['val_acc'] - b['val_acc']):+.1f} pts",
    )  # fmt: skip
    r[1].metric(
        "Test accuracy", ui.fmt_pct(res["test_acc"]),
        delta=f"{100 * (res['test_acc'] - b['test_acc']):+.1f} pts",
    )  # fmt: skip
    r[2].metric(
        "Parameters", ui.fmt_count(res["params"]),
        delta=f"{res['params_pct']:.1f} % of original",
        delta_color="off", delta_arrow="off",
    )  # fmt: skip
    r[3].metric(
        "FLOPs / input", ui.fmt_count(res["flops"]),
        delta=f"{res['flops_pct']:.1f} % of original",
        delta_color="off", delta_arrow="off",
    )  # fmt: skip
    st.caption(f"This setting was computed in {1000 * res['seconds']:.0f} ms.")

    left, right = st.columns([3, 2])
    with left:
        state.setdefault(state.COMPRESS_X, "flops_pct")
        x_axis = st.radio(
            "Cost axis", ["flops_pct", "params_pct"], key=state.COMPRESS_X, horizontal=True,
            format_func={"flops_pct": "FLOPs %", "params_pct": "parameters %"}.get,
        )  # fmt: skip
        if policy in cz.POLICY_UI:
            curves = {f"this run (N={ctx.n_factors})": cache.curve(root, name, which, policy)}
            base_run = cz.find_baseline(name, root)
            if base_run and cz.checkpoint_mtime(base_run, which, root):
                curves["N=1 baseline"] = cache.curve(root, base_run, which, policy)
            st.plotly_chart(
                charts.tradeoff_chart(
                    curves, x=x_axis, y="val_acc", current=res, uirevision=f"tradeoff-{name}"
                ),
                key="compress.tradeoff",
            )
            st.caption("The chart opens on the top 20 points; double-click it to see all.")
            if not base_run and ctx.n_factors > 1:
                st.caption(
                    "No N=1 baseline with the same setup found. Tick “also train N=1” on the "
                    "Train page to get its curve here."
                )
        else:
            st.info("The trade-off curve sweeps a policy's range; pick Uniform, Global or Energy.")
    with right:
        st.markdown("**Ranks kept**")
        st.dataframe(
            pd.DataFrame(
                {"layer": list(res["ranks"]),
                 "rank": list(res["ranks"].values()),
                 "of": [len(ctx.spectra[n]) for n in res["ranks"]]}
            ),
            hide_index=True,
        )  # fmt: skip

    st.subheader("Spectrum of every layer, with the cut")
    layer_names = list(ctx.spectra)
    cols = st.columns(3)
    for i, layer in enumerate(layer_names):
        with cols[i % 3]:
            st.plotly_chart(
                charts.spectrum_cut(
                    ctx.spectra[layer], res["ranks"].get(layer, len(ctx.spectra[layer])),
                    layer=layer, uirevision=f"cut-{name}-{layer}",
                ),
                key=f"compress.cut.{i}",
            )  # fmt: skip

    with st.expander("Fine-tune after the cut (optional)"):
        f1, f2, f3 = st.columns([1, 1, 2], vertical_alignment="bottom")
        state.setdefault(state.COMPRESS_FT_EPOCHS, 2)
        state.setdefault(state.COMPRESS_FT_LR, 1e-3)
        epochs = f1.number_input("epochs", 1, 50, key=state.COMPRESS_FT_EPOCHS)
        lr = f2.number_input("learning rate", 1e-6, 1.0, key=state.COMPRESS_FT_LR, format="%.0e")
        token = cz.choice_token(st.session_state[state.COMPRESS_CHOICE])
        if f3.button("Fine-tune this model", key="compress.ft_go"):
            with st.spinner("Fine-tuning…"):
                tuned, metrics = cz.finetune(ctx, res["model"], epochs=int(epochs), lr=float(lr))
            st.session_state[state.FINETUNED] = {"key": token, "model": tuned, "metrics": metrics}
        ft = st.session_state.get(state.FINETUNED)
        if ft and ft["key"] == token:
            st.success(
                f"Fine-tuned: validation {ui.fmt_pct(ft['metrics']['val_acc'])}, "
                f"test {ui.fmt_pct(ft['metrics']['test_acc'])}. The Export page can save it."
            )
    st.page_link("pages/export.py", label="Export this model", icon="📦")


main()
