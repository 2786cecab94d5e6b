"""Pure chart functions: plain data in, plotly Figure out. No Streamlit, no torch.

Every figure sets ``layout.uirevision`` to a stable string so that a user's zoom and legend
choices survive when a live page redraws the chart with new data. Figures are built in one
constructor call from plain dicts: plotly validates each property once, which keeps a page
that redraws several charts per slider move fast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from lorita.scores import Score, score_of

PALETTE = qualitative.Plotly
SPLIT_DASH = {"train": "solid", "val": "dash", "test": "dot"}
LOG_FLOOR = -7.0  # log10(σ/σ_max) below this is drawn as the floor colour
HEIGHT = 340
CUT_COLOR = "#d62728"
DROPPED_COLOR = "#bbbbbb"


def _acc_axis(data: list[dict[str, Any]], score: Score | None = None) -> dict[str, Any]:
    """A score axis. Accuracy (fractions shown as percent): its automatic range stays within
    0 % (or the lowest value) and 100 %, where a flat curve or a single point was padded to
    150 % or 200 %. R² (``score`` of a regression): its values as they are, neither in percent
    nor clamped to [0, 1] (R² is negative for a model worse than the targets' mean)."""
    if score is not None and not score.percent:
        return {"hoverformat": ".4f"}
    ys = np.concatenate([np.asarray(t["y"], float).ravel() for t in data if t.get("y") is not None]
                        or [np.zeros(0)])  # fmt: skip
    ys = ys[np.isfinite(ys)]
    low = min(0.0, float(ys.min())) if ys.size else 0.0
    return {"tickformat": ".0%", "autorangeoptions": {"minallowed": low, "maxallowed": 1}}


def _figure(
    data: list[dict[str, Any]],
    *,
    title: str,
    uirevision: str | None,
    xaxis: dict[str, Any] | None = None,
    yaxis: dict[str, Any] | None = None,
    legend_below: bool = False,
    **layout: Any,
) -> go.Figure:
    base = {
        "title": {"text": title, "x": 0.0, "xanchor": "left", "font": {"size": 15}},
        "uirevision": uirevision if uirevision is not None else title,
        "height": HEIGHT,
        "margin": {"l": 10, "r": 10, "t": 40, "b": 10},
        "legend": {"font": {"size": 11}},
        "hovermode": "closest",
        "xaxis": xaxis or {},
        "yaxis": yaxis or {},
    }
    if legend_below:  # long labels (run names): full width under the plot
        base["legend"] = {"font": {"size": 11}, "orientation": "h", "yanchor": "top",
                          "y": -0.3, "x": 0.0}  # fmt: skip
        base["height"] = HEIGHT + 60
    base.update(layout)
    return go.Figure(data=data, layout=base)


def _log_axis(values: Sequence[float], title: str) -> dict[str, Any]:
    """A log axis labelled at whole decades only (no 2/5 minor labels) once the data span
    more than a decade, every second or third decade over a very wide span."""
    pos = [v for v in values if v > 0]
    span = math.log10(max(pos) / min(pos)) if pos else 0.0
    axis: dict[str, Any] = {"type": "log", "title": {"text": title}, "exponentformat": "power"}
    if span > 1.0:
        axis["dtick"] = 1 if span <= 6 else 2 if span <= 12 else 3
    return axis


def _title(text: str) -> dict[str, Any]:
    return {"title": {"text": text}}


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def empty_figure(message: str, *, title: str = "", uirevision: str | None = None) -> go.Figure:
    """A blank chart that says why it is blank (no data yet, layer missing, ...)."""
    note = {
        "text": message,
        "x": 0.5,
        "y": 0.5,
        "xref": "paper",
        "yref": "paper",
        "showarrow": False,
        "font": {"size": 14, "color": "#888"},
    }
    return _figure(
        [],
        title=title,
        uirevision=uirevision,
        xaxis={"visible": False},
        yaxis={"visible": False},
        annotations=[note],
    )


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def training_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    metric: str = "loss",
    *,
    splits: Sequence[str] = ("train", "val"),
    x: str = "step",
    title: str | None = None,
    uirevision: str | None = None,
    task: str | None = None,
) -> go.Figure:
    """Loss or score against step for one or more runs.

    Args:
        runs: label -> metrics rows ({"step", "epoch", "split", "loss", "acc", ...}).
            With one run the legend shows only the split; with several, "label · split".
        metric: the row key to plot ("loss" or "acc": the score, accuracy or R²).
        splits: which splits to draw (line dash tells them apart).
        x: the row key for the x axis ("step" or "epoch").
        task: the runs' task (:data:`lorita.scores.TASKS`; None: classification): names
            the score and formats its axis (R² is not a percentage).
    """
    score = score_of(task)
    title = title or {"loss": "Loss", "acc": _capital(score.name)}.get(metric, metric)
    data = []
    several = len(runs) > 1
    for i, (label, rows) in enumerate(runs.items()):
        for j, split in enumerate(splits):
            pts = [
                (r[x], r[metric])
                for r in rows
                if r.get("split") == split and _finite(r.get(metric)) and r.get(x) is not None
            ]
            if not pts:
                continue
            xs, ys = zip(*pts)
            color = PALETTE[(i if several else j) % len(PALETTE)]
            data.append(
                {
                    "type": "scatter",
                    "x": list(xs),
                    "y": list(ys),
                    "mode": "lines+markers" if len(xs) < 30 else "lines",
                    "name": f"{label} · {split}" if several else split,
                    "legendgroup": label,
                    "line": {"color": color, "dash": SPLIT_DASH.get(split, "solid"), "width": 2},
                    "marker": {"size": 5},
                }
            )
    if not data:
        return empty_figure("no measurements yet", title=title, uirevision=uirevision)
    yaxis = _title(score.short if metric == "acc" else metric)
    if metric == "acc":
        yaxis.update(_acc_axis(data, score))
    return _figure(
        data,
        title=title,
        uirevision=uirevision,
        xaxis=_title(x),
        yaxis=yaxis,
        hovermode="x unified",
        legend_below=several,
    )


def spectrum_heatmap(
    steps: Sequence[int],
    spectra: Sequence[Sequence[float]],
    *,
    layer: str,
    title: str | None = None,
    uirevision: str | None = None,
    max_rows: int | None = None,
) -> go.Figure:
    """Heatmap of log10(σ_i / σ_max) for one layer: singular value index against step.

    Args:
        steps: the training step of each snapshot.
        spectra: one list of singular values (descending) per snapshot.
        layer: the layer's name (for the title).
        max_rows: draw about this many singular value indices at most (evenly spaced,
            always the first and the last); None draws every one.
    """
    title = title or f"Spectrum of {layer} over training: log10(σ/σ_max)"
    if not steps or not spectra:
        return empty_figure("no spectra yet", title=title, uirevision=uirevision)
    width = max(len(s) for s in spectra)
    z = np.full((width, len(spectra)), np.nan)  # rows: σ index, columns: snapshots
    for t, s in enumerate(spectra):
        vals = np.asarray(s, dtype=float)
        top = float(np.abs(vals).max()) if vals.size else 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.log10(vals / top) if top > 0 else np.full_like(vals, LOG_FLOOR)
        z[: vals.size, t] = np.where(
            (vals > 0) & np.isfinite(ratio), np.maximum(ratio, LOG_FLOOR), LOG_FLOOR
        )
    rows = _shown_indices(width, 0, max_rows)
    heat = {
        "type": "heatmap",
        "x": list(steps),
        "y": [i + 1 for i in rows],
        "z": z[rows].astype(np.float32),  # sent as binary: half the bytes of float64
        "zmin": LOG_FLOOR,
        "zmax": 0.0,
        "colorscale": "Viridis",
        "colorbar": {"title": {"text": "log10 σ/σmax"}, "thickness": 12},
        "hovertemplate": "step %{x}<br>σ index %{y}<br>log10 σ/σmax %{z:.2f}<extra></extra>",
    }
    xaxis = _title("step")
    if len(steps) > 1:  # from the first snapshot's step to the last (cells centred on them
        xaxis["range"] = [min(steps), max(steps)]  # would reach below step 0)
    return _figure(
        [heat],
        title=title,
        uirevision=uirevision,
        xaxis=xaxis,
        yaxis={**_title("singular value index"), "autorange": "reversed"},
    )


def layer_spectra_chart(
    layers: Mapping[str, Sequence[float]],
    *,
    normalize: bool = True,
    title: str = "Singular values of every layer (σ/σ_max, log scale)",
    uirevision: str | None = None,
    legend_below: bool = False,
    max_points: int | None = None,
) -> go.Figure:
    """The current spectrum of each layer (or each run), one line each, on a log y axis;
    ``max_points`` thins each line as :func:`spectra_cut` does (None: every value)."""
    data = []
    all_y: list[float] = []
    for i, (name, s) in enumerate(layers.items()):
        vals = [float(v) for v in s]
        if not vals:
            continue
        top = max(vals) if normalize else 1.0
        # log axes cannot draw zeros: clip to 1e-12 so the line stays visible.
        ys = [max(v / top if top > 0 else 0.0, 1e-12) for v in vals]
        all_y += ys
        idx = _shown_indices(len(vals), 0, max_points)
        data.append(
            {
                "type": "scatter",
                "x": [j + 1 for j in idx],
                "y": [ys[j] for j in idx],
                "mode": "lines+markers" if len(ys) <= 40 else "lines",
                "name": name,
                "line": {"color": PALETTE[i % len(PALETTE)], "width": 2},
                "marker": {"size": 4},
                "customdata": [vals[j] for j in idx],
                "hovertemplate": f"{name}<br>index %{{x}}<br>σ = %{{customdata:.4g}}<extra></extra>",
            }
        )
    if not data:
        return empty_figure("no spectra yet", title=title, uirevision=uirevision)
    return _figure(
        data,
        title=title,
        uirevision=uirevision,
        xaxis=_title("singular value index"),
        yaxis=_log_axis(all_y, "σ / σ_max" if normalize else "σ"),
        legend_below=legend_below,
    )


def rank_curves(
    steps: Sequence[int] | Mapping[str, Sequence[int]],
    ranks: Mapping[str, Sequence[float]],
    *,
    title: str = "Effective rank of every layer",
    y_title: str = "effective rank",
    uirevision: str | None = None,
    legend_below: bool = False,
) -> go.Figure:
    """One line per layer (or per run): a rank measure against step.

    Args:
        steps: the steps shared by every series, or name -> that series' own steps (runs
            snapshot at different steps: each is drawn against its own).
        ranks: name -> values, one per step.
    """
    data = []
    for i, (name, ys) in enumerate(ranks.items()):
        if not ys:
            continue
        xs = steps.get(name, []) if isinstance(steps, Mapping) else steps
        n = min(len(xs), len(ys))
        data.append(
            {
                "type": "scatter",
                "x": list(xs)[:n],
                "y": list(ys)[:n],
                "mode": "lines+markers",
                "name": name,
                "line": {"color": PALETTE[i % len(PALETTE)], "width": 2},
                "marker": {"size": 4},
            }
        )
    if not data:
        return empty_figure("no spectra yet", title=title, uirevision=uirevision)
    return _figure(
        data,
        title=title,
        uirevision=uirevision,
        xaxis=_title("step"),
        yaxis={**_title(y_title), "rangemode": "tozero"},
        hovermode="closest" if isinstance(steps, Mapping) else "x unified",
        legend_below=legend_below,
    )


def spectra_cut(
    spectra: Mapping[str, Sequence[float]],
    ranks: Mapping[str, int],
    *,
    title: str = "Spectrum of every layer (σ/σ_max, log scale): kept solid, dropped faint",
    uirevision: str | None = None,
    hover: bool = True,
    max_points: int | None = None,
) -> go.Figure:
    """Every layer's singular values on one chart with its cut: the kept ones in the layer's
    colour, the dropped ones faint, a dashed line of the same colour after the last kept one.

    One figure for all layers: a slider move redraws one chart, not one per layer.

    Args:
        spectra: layer -> singular values, descending.
        ranks: layer -> rank kept (a layer missing keeps everything).
        hover: carry each σ for hovering (leave out for a static picture: less to send).
        max_points: draw at most about this many values per layer (evenly spaced, always
            the first, the last and both sides of the cut); None draws them all.
    """
    data, shapes, all_y = [], [], []
    for i, (layer, s) in enumerate(spectra.items()):
        vals = [float(v) for v in s]
        if not vals:
            continue
        top = max(vals) if max(vals) > 0 else 1.0
        ys = [max(v / top, 1e-12) for v in vals]  # a log axis cannot draw zeros
        all_y += ys
        r = max(0, min(int(ranks.get(layer, len(vals))), len(vals)))
        color = PALETTE[i % len(PALETTE)]
        name = f"{layer}: keep {r} of {len(vals)}"
        idx = _shown_indices(len(vals), r, max_points)
        for part, lo, hi in (("kept", 0, r), ("dropped", r, len(vals))):
            at = [i for i in idx if lo <= i < hi]
            trace = {
                "type": "scatter",
                "x": [i + 1 for i in at],
                "y": [ys[i] for i in at],
                # markers are one SVG node each: only for short spectra (each slider move
                # redraws the chart, and hundreds of markers made that the slow part)
                "mode": "lines+markers" if len(vals) <= 40 else "lines",
                "name": name,
                "legendgroup": layer,
                "showlegend": part == "kept",
                "opacity": 1.0 if part == "kept" else 0.3,
                "line": {"color": color, "width": 2 if part == "kept" else 1},
                "marker": {"color": color, "size": 4},
            }
            if hover:
                trace["customdata"] = [vals[i] for i in at]
                trace["hovertemplate"] = (
                    f"{layer}<br>index %{{x}}<br>σ = %{{customdata:.4g}} ({part})<extra></extra>"
                )
            else:
                trace["hoverinfo"] = "skip"
            data.append(trace)
        if 0 < r < len(vals):
            shapes.append(
                {
                    "type": "line", "x0": r + 0.5, "x1": r + 0.5, "y0": 0, "y1": 1,
                    "yref": "paper", "line": {"color": color, "dash": "dash", "width": 2},
                }
            )  # fmt: skip
    if not data:
        return empty_figure("no singular values", title=title, uirevision=uirevision)
    return _figure(
        data,
        title=title,
        uirevision=uirevision,
        xaxis=_title("singular value index"),
        yaxis=_log_axis(all_y, "σ / σ_max"),
        shapes=shapes,
        legend_below=len(spectra) > 3,
    )


# Values drawn per spectrum line (or heatmap column) on pages that redraw often: the shape
# of a spectrum survives, the bytes sent and drawn do not grow with the layer's width.
SHOWN_POINTS = 128


def _shown_indices(n: int, r: int, max_points: int | None) -> list[int]:
    """Indices of a length-``n`` spectrum to draw: all of them, or about ``max_points``
    evenly spaced ones plus the first, the last and both sides of the cut at ``r``."""
    if max_points is None or n <= max_points:
        return list(range(n))
    step = -(-n // max(2, max_points))  # ceil
    keep = set(range(0, n, step)) | {0, n - 1} | {i for i in (r - 1, r) if 0 <= i < n}
    return sorted(keep)


def tradeoff_chart(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    x: str = "flops_pct",
    y: str = "val_acc",
    current: Mapping[str, Any] | None = None,
    title: str | None = None,
    uirevision: str | None = None,
    focus: float | None = 0.2,
    task: str | None = None,
) -> go.Figure:
    """Score (accuracy, or R²) against cost (% of the uncompressed model), one line per curve.

    The y axis opens on the ``focus`` (a fraction: 0.2 = 20 points) below the best score,
    where the curves differ, and a note in the corner names the points left below it;
    double-clicking the chart shows the whole range. When a whole line (or the current point)
    would be below it, the axis shows the whole range instead (:func:`_focus_range`).

    Args:
        curves: label -> points, each a flat dict with at least ``x``, ``y`` and "value".
        x: "flops_pct" or "params_pct" (percent, 0-100).
        y: the score key to plot ("val_acc" or "test_acc": accuracy as fractions 0-1, or R²).
        current: the point the slider is on, marked with a star.
        task: the runs' task (:data:`lorita.scores.TASKS`; None: classification): names the
            score and formats its axis and hover (R² is not a percentage).
    """
    score = score_of(task)
    x_name = {"flops_pct": "FLOPs (% of original)", "params_pct": "parameters (% of original)"}
    y_name = {"val_acc": f"validation {score.name}", "test_acc": f"test {score.name}"}
    title = title or f"Trade-off: {y_name.get(y, y)} against {x_name.get(x, x)}"
    y_hover = f"{score.short} %{{y:{'.2%' if score.percent else '.4f'}}}"
    data = []
    for i, (label, pts) in enumerate(curves.items()):
        good = sorted(
            (p for p in pts if _finite(p.get(x)) and _finite(p.get(y))), key=lambda p: p[x]
        )
        if not good:
            continue
        data.append(
            {
                "type": "scatter",
                "x": [p[x] for p in good],
                "y": [p[y] for p in good],
                "mode": "lines+markers",
                "name": label,
                "line": {"color": PALETTE[i % len(PALETTE)], "width": 2},
                "marker": {"size": 6},
                "customdata": [p.get("value") for p in good],
                "hovertemplate": f"setting %{{customdata:.3g}}<br>%{{x:.1f}} %<br>{y_hover}"
                + f"<extra>{label}</extra>",
            }
        )
    if current is not None and _finite(current.get(x)) and _finite(current.get(y)):
        data.append(
            {
                "type": "scatter",
                "x": [current[x]],
                "y": [current[y]],
                "mode": "markers",
                "name": "current",
                "marker": {
                    "symbol": "star",
                    "size": 16,
                    "color": CUT_COLOR,
                    "line": {"color": "white", "width": 1},
                },
                "hovertemplate": f"current<br>%{{x:.1f}} %<br>{y_hover}<extra></extra>",
            }
        )
    if not data:
        return empty_figure("no trade-off points", title=title, uirevision=uirevision)
    yaxis: dict[str, Any] = {**_title(y_name.get(y, y)), **_acc_axis(data, score)}
    below = []
    span = _focus_range(data, focus, score)
    if span is not None:
        yaxis["range"] = span
        of = "FLOPs" if x == "flops_pct" else "the parameters"
        below = _below_note(data, span[0], of, score)
    room = {}
    if below:  # the note goes under the axis title, not over the curves
        extra = 16 * (below[0]["text"].count("<br>") + 1)
        room = {
            "margin": {"l": 10, "r": 10, "t": 40, "b": 60 + extra},
            "height": HEIGHT + extra + 50,
        }
    return _figure(
        data,
        title=title,
        uirevision=uirevision,
        xaxis={**_title(x_name.get(x, x)), "ticksuffix": " %"},
        yaxis=yaxis,
        annotations=below,
        **room,
    )


def _focus_range(
    data: list[dict[str, Any]], focus: float | None, score: Score | None = None
) -> list[float] | None:
    """The y range ``focus`` below the best point, or None for the whole range: when the points
    spread less than that, or when a whole line (or the current point) would be below it, which
    would leave a legend entry with nothing drawn. Accuracy's floor is never below 0; R² has
    none (it is negative for a model worse than the targets' mean)."""
    ys = [v for trace in data for v in trace["y"]]
    if focus is None or not ys or max(ys) - min(ys) <= focus:
        return None
    floor = max(ys) - focus
    if score is None or score.percent:
        floor = max(0.0, floor)
    if any(max(trace["y"]) < floor for trace in data):
        return None
    return [floor, min(1.0, max(ys)) + 0.01]


def _below_note(
    data: list[dict[str, Any]], floor: float, of: str, score: Score | None = None
) -> list[dict[str, Any]]:
    """An annotation naming each line's points below ``floor`` (where, in % of ``of``, and
    how low their score goes), if any."""
    score = score or score_of(None)
    lines = []
    for trace in data:
        below = [(x, y) for x, y in zip(trace["x"], trace["y"], strict=True) if y < floor]
        if not below:
            continue
        xs, low = [x for x, _ in below], min(y for _, y in below)
        where = f"{min(xs):.1f}–{max(xs):.1f} %" if len(xs) > 1 else f"{xs[0]:.1f} %"
        count = f"{len(xs)} points" if len(xs) > 1 else "1 point"
        low_text = score.text(low, 1, sep="")
        lines.append(
            f"{trace['name']}: {count} at {where} of {of}, {score.name} down to {low_text}"
        )
    if not lines:
        return []
    text = "<br>".join(["Below the axis (double-click to see all):", *lines])
    return [
        {"text": text, "xref": "paper", "yref": "paper", "x": 0.0, "y": 0.0, "yshift": -52,
         "xanchor": "left", "yanchor": "top", "align": "left", "showarrow": False,
         "font": {"size": 11}}
    ]  # fmt: skip


def theory_spectrum(
    learned: Sequence[float],
    true: Sequence[float],
    *,
    n_factors: int,
    observed: Sequence[float] | None = None,
    uirevision: str | None = "theory",
    floor: float = 1e-6,
) -> go.Figure:
    """Learned singular values of the product against the planted (and observed) ones, log y.

    Values below ``floor`` times the largest are drawn on the floor (a log axis has no zero);
    the planted matrix's exact zeros are not drawn.
    """
    title = f"Singular values: learned product (N={n_factors}) against the planted matrix"
    top = max([float(v) for v in (*learned, *true, *(observed or []))] or [1.0])
    low = top * floor
    k = max(len(learned), len(true), len(observed or []))
    xs = list(range(1, k + 1))
    planted = [(x, float(v)) for x, v in zip(xs, true) if float(v) > low]
    data = [
        {
            "type": "bar",
            "x": [x for x, _ in planted],
            "y": [v for _, v in planted],
            "name": "planted (true; the rest are 0)",
            "marker": {"color": DROPPED_COLOR},
        }
    ]
    if observed is not None:
        data.append(
            {
                "type": "scatter",
                "x": xs[: len(observed)],
                "y": [max(float(v), low) for v in observed],
                "mode": "lines",
                "name": "observed (planted + noise)",
                "line": {"color": "#888888", "width": 1, "dash": "dot"},
            }
        )
    data.append(
        {
            "type": "scatter",
            "x": xs[: len(learned)],
            "y": [max(float(v), low) for v in learned],
            "customdata": [float(v) for v in learned],
            "mode": "lines+markers",
            "name": f"learned, N={n_factors}",
            "line": {"color": PALETTE[0], "width": 2},
            "marker": {"size": 7},
            "hovertemplate": "index %{x}<br>σ = %{customdata:.3g}<extra></extra>",
        }
    )
    yaxis = _log_axis([low, top], "σ")
    yaxis["range"] = [math.log10(low) - 0.2, math.log10(top) + 0.3]
    return _figure(
        data,
        title=title,
        uirevision=uirevision,
        xaxis=_title("singular value index"),
        yaxis=yaxis,
        barmode="overlay",
    )
