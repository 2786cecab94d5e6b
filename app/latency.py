"""Measured latency of a cut on this machine: the Compress page's cut, and the Export page's
model (forms chosen by FLOPs or by measured latency).

FLOPs say what a cut should save; the clock says what it does. On a button press this module
times the session's merged model (the original) and the page's cut model with the library's
:func:`lorita.paired_latency` (whole models, batch 1 and 64, median of repeats, the two timed
in turn round by round so that other work on the cores slows both alike) and
:func:`lorita.layer_latency` (time spent inside each layer, where the time goes), and shows
them beside each other with the form each layer took in the cut (thin two-layer form, dense
rank-r weight, or not cut). A result is kept in the session per cut (the run's checkpoint and
the ranks and forms of the cut), so moving the slider never pays for a measurement, and moving
it back shows the numbers measured before. The chart builder is a pure function (data in,
plotly Figure out) like those in app/charts.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app import compress as cz
from app import state

BATCHES = (1, 64)  # whole-model latency, as `lorita compress` prints it
LAYER_BATCH = 64  # the batch the per-layer times are taken at
REPEATS = 20  # whole-model timings per batch at most (the median is shown)
LAYER_REPEATS = 10  # forward passes the per-layer medians are taken over, at most
MIN_REPEATS = 3
BUDGET_S = 2.0  # about how long each model's timing may take
KEEP = 8  # measured cuts kept per session
CHART_LAYERS = 15  # layers the chart shows at most (the slowest; the table has every layer)
EXPORT_HINT = (
    "On the Export page, choose each layer's form by measured latency so the exported cut is "
    "never slower."
)
# One measurement at a time in this server: two sessions timing at once would slow each other.
_MEASURING = threading.Lock()
FORM_WORDS = {
    "thin": "thin (two layers)",
    "dense": "dense rank-r weight",
    "full": "not cut",
    "left out": "left out of cuts",
}


@dataclass
class Latency:
    """Whole-model and per-layer latency of an original model and its cut (milliseconds)."""

    whole: list[dict[str, Any]]  # per batch: batch, original_ms, cut_ms, cut_pct
    layers: list[dict[str, Any]]  # per layer: layer, form, rank, full, original_ms, cut_ms
    layer_batch: int
    threads: int
    repeats: int  # forward passes per whole-model median
    layer_repeats: int  # forward passes per per-layer median
    seconds: float = 0.0
    deployed: str = ""  # how both models were timed (as they deploy: BatchNorm folded, ...)
    busy: str = ""  # why these numbers are noisy (other work kept the cores busy), if so

    def slower_at(self) -> list[int]:
        """The batch sizes at which the cut measured slower than the original."""
        return [w["batch"] for w in self.whole if w["cut_ms"] > w["original_ms"]]


def cut_token(session: Any, model: Any) -> tuple:
    """The identity of a cut: the run, its checkpoint file, and each layer's rank and form."""
    plan = getattr(model, "lorita_plan", None) or {}
    cut = tuple(sorted((n, int(p["rank"]), str(p["form"])) for n, p in plan.items()))
    mtime = cz.checkpoint_mtime(session.run, session.which) if session.run else None
    return (session.run, session.which, mtime, cut)


def _forms(session: Any, model: Any) -> dict[str, dict[str, Any]]:
    """Each layer of the original: its rank in the cut, full rank and form there."""
    plan = getattr(model, "lorita_plan", None) or {}
    out = {}
    for name, full in session.full_ranks.items():
        p = plan.get(name)
        if p is not None:
            out[name] = {"rank": int(p["rank"]), "full": int(p["full"]), "form": p["form"]}
        else:
            form = "left out" if name in session.left_out else "full"
            out[name] = {"rank": int(full), "full": int(full), "form": form}
    return out


def _rows(forms: dict, original: dict[str, float], cut: dict[str, float]) -> list[dict]:
    rows = []
    for name, f in forms.items():
        rows.append(
            {
                "layer": name,
                "form": f["form"],
                "rank": f["rank"],
                "full": f["full"],
                "original_ms": 1000 * original.get(name, 0.0),
                "cut_ms": 1000 * cut.get(name, 0.0),
            }
        )
    return rows


def fit_repeats(model: Any, x: Any, most: int, budget_s: float = BUDGET_S) -> int:
    """Repeats of a forward pass on ``x`` that fit in about ``budget_s`` (one pass timed
    first), between MIN_REPEATS and ``most``: a large model at a large input is timed fewer
    times rather than keeping the page waiting for minutes."""
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        model(x)
        seconds = time.perf_counter() - t0
    return max(MIN_REPEATS, min(int(most), int(budget_s / max(seconds, 1e-9))))


def _timings(
    original: Any, model: Any, x: Any, xb: Any, batches, repeats, layer_repeats, fastest=False
):
    """The three timings, in the order run: both whole models together (paired, round by
    round, so that a training run on the same cores slows them alike), then each model's
    layers. Each gives ``{(which, what): result}``."""
    from lorita.cost import layer_latency, paired_latency

    def whole() -> dict:
        a, b = paired_latency(
            [original, model], x, batches=batches, repeats=repeats, fastest=fastest
        )
        return {("original", "whole"): a, ("cut", "whole"): b}

    return [
        ("both", "whole", whole),
        ("original", "layers", lambda: {("original", "layers"): layer_latency(original, xb, repeats=layer_repeats)}),
        ("cut", "layers", lambda: {("cut", "layers"): layer_latency(model, xb, repeats=layer_repeats)}),
    ]  # fmt: skip


def _whole(got: dict, batches) -> list[dict[str, Any]]:
    return [
        {
            "batch": b,
            "original_ms": 1000 * got["original", "whole"][b],
            "cut_ms": 1000 * got["cut", "whole"][b],
            "cut_pct": 100 * got["cut", "whole"][b] / max(got["original", "whole"][b], 1e-12),
        }
        for b in batches
    ]


def measure(
    session: Any,
    model: Any,
    *,
    batches: tuple[int, ...] = BATCHES,
    layer_batch: int = LAYER_BATCH,
    repeats: int | None = None,
    layer_repeats: int | None = None,
    progress: Callable[[int, int, str], object] | None = None,
) -> Latency:
    """Time ``session``'s merged model and the cut ``model`` on the session's example input
    repeated to each batch size (the library's paired_latency and layer_latency), both as
    they deploy (BatchNorm folded, channels_last for a conv model: ``Latency.deployed``).

    ``repeats`` / ``layer_repeats``: forward passes each median is taken over (default: as
    many as fit in about BUDGET_S, at most REPEATS / LAYER_REPEATS). ``progress(done, total,
    text)`` is called before each of the three timings.
    """
    import torch

    from lorita.convert import deploy_input, deploy_model
    from lorita.cost import timing_threads

    t0 = time.perf_counter()
    x = session.example_input
    xb = x[:1].expand(layer_batch, *x.shape[1:]).contiguous()
    # private copies as they deploy (the library's deploy_model: BatchNorm folded,
    # channels_last for a conv model), both timed the same way; and timing hooks on the
    # cached, shared model would fire in other sessions
    bns = _batchnorms(session.model), _batchnorms(model)
    original, cut = deploy_model(session.model, x), deploy_model(model, x)
    if repeats is None:
        biggest = x[:1].expand(max(batches), *x.shape[1:]).contiguous()
        big = deploy_input(original, biggest)
        repeats = fit_repeats(original, big, REPEATS, BUDGET_S / len(batches))
    if layer_repeats is None:
        layer_repeats = fit_repeats(original, deploy_input(original, xb), LAYER_REPEATS)
    got: dict[tuple[str, str], dict] = {}
    with timing_threads() as busy:  # (one thread on a busy machine, said so)
        threads = torch.get_num_threads()
        steps = _timings(
            original, cut, x, xb, batches, repeats, layer_repeats, fastest=busy is not None
        )
        for i, (which, what, run) in enumerate(steps):
            if progress is not None:
                where = (
                    "the whole original and cut models, in turn"
                    if what == "whole"
                    else f"each layer of the {which} model"
                )
                progress(i, len(steps), f"Timing {where}…")
            got.update(run())
    if progress is not None:
        progress(len(steps), len(steps), "Done.")
    whole = _whole(got, batches)
    rows = _rows(_forms(session, model), got["original", "layers"], got["cut", "layers"])
    return Latency(
        whole=whole,
        layers=rows,
        layer_batch=layer_batch,
        threads=threads,
        repeats=int(repeats),
        layer_repeats=int(layer_repeats),
        seconds=time.perf_counter() - t0,
        deployed=deployed_words(original, cut, bns),
        busy=busy or "",
    )


def _batchnorms(model: Any) -> int:
    from torch import nn

    return sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())


def deployed_words(original: Any, cut: Any, bns: tuple[int, int]) -> str:
    """How both models were timed: as they deploy (from their ``lorita_deploy``)."""
    a, b = original.lorita_deploy, cut.lorita_deploy
    folds = (
        f"BatchNorm folded into the layer before it ({len(a['folded'])} of {bns[0]} in the "
        f"original, {len(b['folded'])} of {bns[1]} in the cut)"
        if any(bns)
        else "no BatchNorm to fold"
    )
    return f"Both timed as they deploy: {folds}, {b['memory_format']} memory format."


def remember(kept: dict, token: tuple, result: Latency, keep: int = KEEP) -> None:
    """Keep ``result`` for ``token`` in ``kept``, dropping the oldest beyond ``keep``."""
    kept.pop(token, None)
    kept[token] = result
    while len(kept) > keep:
        kept.pop(next(iter(kept)))


def layer_table(result: Latency) -> list[dict[str, Any]]:
    """The per-layer rows as the page's table (milliseconds, share of the layers' time)."""
    total = sum(r["cut_ms"] for r in result.layers) or 1.0
    return [
        {
            "layer": r["layer"],
            "form in the cut": FORM_WORDS.get(r["form"], r["form"]),
            "rank": f"{r['rank']}/{r['full']}",
            "original ms": round(r["original_ms"], 3),
            "cut ms": round(r["cut_ms"], 3),
            "cut / original %": round(100 * r["cut_ms"] / max(r["original_ms"], 1e-9), 1),
            "share of the cut's layer time %": round(100 * r["cut_ms"] / total, 1),
        }
        for r in result.layers
    ]


def slowest(result: Latency, most: int = CHART_LAYERS) -> list[dict[str, Any]]:
    """The ``most`` layers that take the most time (original or cut), in the model's order."""
    if len(result.layers) <= most:
        return list(result.layers)
    by_time = sorted(result.layers, key=lambda r: -max(r["original_ms"], r["cut_ms"]))
    keep = {r["layer"] for r in by_time[:most]}
    return [r for r in result.layers if r["layer"] in keep]


def layer_chart(result: Latency, most: int = CHART_LAYERS):
    """Horizontal bars: milliseconds inside each layer, original beside cut (the ``most``
    slowest layers when there are more: the table lists them all)."""
    import plotly.graph_objects as go

    rows = slowest(result, most)[::-1]
    names = [r["layer"] for r in rows]
    which = "each layer" if len(rows) == len(result.layers) else f"the {len(rows)} slowest layers"
    fig = go.Figure()
    fig.add_bar(y=names, x=[r["original_ms"] for r in rows], name="original", orientation="h")
    fig.add_bar(
        y=names,
        x=[r["cut_ms"] for r in rows],
        name="cut",
        orientation="h",
        text=[FORM_WORDS.get(r["form"], r["form"]) for r in rows],
        textposition="outside",  # beside the bar at a readable size ("auto" shrank it inside)
        cliponaxis=False,
    )
    fig.update_layout(
        barmode="group",
        title=f"Where the time goes: ms inside {which} at batch {result.layer_batch}",
        xaxis_title="milliseconds (median)",
        height=max(260, 60 + 34 * len(names)),
        margin={"l": 10, "r": 10, "t": 50, "b": 40},
        legend={"orientation": "h", "y": -0.15},
        uniformtext={"minsize": 11, "mode": "show"},
    )
    # room on the right for the form written beside the longest cut bar
    longest = max((max(r["original_ms"], r["cut_ms"]) for r in rows), default=0.0)
    fig.update_xaxes(range=[0, 1.25 * longest] if longest > 0 else None)
    return fig


def _metrics(result: Latency) -> None:
    import streamlit as st

    cols = st.columns(len(result.whole))
    for col, w in zip(cols, result.whole, strict=True):
        col.metric(
            f"Latency, batch {w['batch']}",
            f"{w['cut_ms']:.3f} ms",
            delta=f"{w['cut_pct']:.0f} % of original ({w['original_ms']:.3f} ms)",
            delta_color="off",
            delta_arrow="off",
        )


def render(
    result: Latency, *, key: str = "compress.latency", slower_hint: str | None = None
) -> None:
    """The measured numbers: whole-model metrics, where the time goes (chart and table)."""
    import streamlit as st

    _metrics(result)
    threads = f"{result.threads} thread{'' if result.threads == 1 else 's'}"
    threads += ": the machine was busy" if result.busy else ", the server's setting"
    st.caption(
        f"{'Fastest' if result.busy else 'Median'} of {result.repeats} forward passes per "
        f"batch size (per layer: median of "
        f"{result.layer_repeats} at batch {result.layer_batch}) on this machine's CPU "
        f"({threads}), "
        f"measured in {result.seconds:.1f} s; other work on the machine (a training run) "
        f"makes these numbers noisy. {result.deployed}"
    )
    if result.busy:
        st.warning(result.busy[0].upper() + result.busy[1:] + ".")
    slower = result.slower_at()
    if slower:
        st.warning(
            "This cut measured slower than the original at batch "
            + " and ".join(map(str, slower))
            + ": small thin layers can cost more than one dense layer. "
            + (slower_hint or EXPORT_HINT)
        )
    from app import plot

    plot.show(layer_chart(result), key=f"{key}.chart")
    st.dataframe(layer_table(result), hide_index=True)
    st.caption(
        "Per layer: the time inside each layer (timed with hooks around it, so compare layers "
        "with each other rather than their sum with the whole model). A thin layer's original "
        "time is what its dense form costs."
    )


def show(
    session: Any,
    res: dict[str, Any],
    *,
    key: str = "compress.latency",
    slower_hint: str | None = None,
) -> None:
    """The latency section for the cut ``res`` (a dict with its ``"model"``, as
    app.compress.apply returns): the Compress page's cut, or the Export page's model.

    Measures only when the button is pressed; the result is kept for this cut in the session.
    ``slower_hint``: what to advise when the cut measured slower (default: the Export page's
    choice of forms by latency).
    """
    import streamlit as st

    model = res["model"]
    token = cut_token(session, model)
    kept = st.session_state.setdefault(state.LATENCY, {})
    result = kept.get(token)
    if st.button(
        "Measure latency on this machine", key=f"{key}.go",
        help="Times the original and this cut on this CPU (again, if measured before).",
    ):  # fmt: skip
        bar = st.progress(0.0, text="Timing…")
        with st.spinner("Measuring latency on this machine…"), _MEASURING:
            result = measure(
                session, model, progress=lambda d, t, text: bar.progress(d / t, text=text)
            )
        bar.empty()
        remember(kept, token, result)
    if result is None:
        st.caption(
            "Times the original and this cut at batch 1 and 64 (median of repeats) and each "
            "layer's share, on this machine's CPU. Kept for this cut while the session lasts."
        )
        return
    render(result, key=key, slower_hint=slower_hint)
