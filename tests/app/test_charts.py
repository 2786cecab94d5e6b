"""app/charts.py: data in, plotly Figure out, with a stable uirevision."""

import math

import plotly.graph_objects as go
import pytest

from app import charts

METRICS = [
    {"step": 0, "epoch": 0, "split": "train", "loss": 2.3, "acc": 0.1},
    {"step": 10, "epoch": 0, "split": "train", "loss": 1.2, "acc": 0.6},
    {"step": 10, "epoch": 1, "split": "val", "loss": 1.3, "acc": 0.55},
    {"step": 20, "epoch": 1, "split": "train", "loss": float("nan"), "acc": 0.7},
    {"step": 20, "epoch": 2, "split": "val", "loss": 0.9, "acc": 0.8},
    {"step": 20, "epoch": 2, "split": "test", "loss": 0.95, "acc": 0.79},
]


def test_training_curves_one_run_one_trace_per_split_and_skips_nan():
    fig = charts.training_curves({"r": METRICS}, "loss", uirevision="keep")
    assert isinstance(fig, go.Figure)
    names = [t.name for t in fig.data]
    assert names == ["train", "val"]
    assert list(fig.data[0].y) == [2.3, 1.2]  # the NaN row is dropped
    assert fig.layout.uirevision == "keep"


def test_training_curves_overlay_labels_runs_and_formats_accuracy():
    fig = charts.training_curves({"N=1": METRICS, "N=3": METRICS}, "acc")
    assert {t.name for t in fig.data} == {"N=1 · train", "N=1 · val", "N=3 · train", "N=3 · val"}
    assert fig.layout.yaxis.tickformat == ".0%"
    assert fig.layout.uirevision  # defaults to a stable string


def test_accuracy_axes_range_within_0_and_100_percent_unless_a_value_is_below_0():
    """A flat curve or one point was padded to 150-200 %: accuracy axes stop at 100 % (and
    at 0 %, or at a regression's negative R²)."""
    flat = [{"step": s, "epoch": 0, "split": "val", "loss": 1.0, "acc": 0.5} for s in (0, 5)]
    fig = charts.training_curves({"r": flat}, "acc")
    opts = fig.layout.yaxis.autorangeoptions
    assert (opts.minallowed, opts.maxallowed) == (0, 1)
    one = [{"value": 1.0, "flops_pct": 100.0, "params_pct": 100.0, "val_acc": 0.33}]
    assert charts.tradeoff_chart({"N=3": one}).layout.yaxis.autorangeoptions.maxallowed == 1
    r2 = [{**flat[0], "acc": -0.4}, flat[1]]
    assert charts.training_curves({"r": r2}, "acc").layout.yaxis.autorangeoptions.minallowed == -0.4


def test_a_regressions_r2_axis_is_not_a_percentage_nor_clamped_to_0_and_1():
    """task="regression": the score is R², named so, with plain ticks and a range that takes
    in a negative R² (a model worse than the targets' mean) and needs no padding rule."""
    r2 = [{**row, "acc": a} for row, a in zip(METRICS, (-0.8, 0.2, 0.1, 0.5, 0.6, 0.58))]
    fig = charts.training_curves({"r": r2}, "acc", task="regression")
    assert fig.layout.title.text == "R²" and fig.layout.yaxis.title.text == "R²"
    assert fig.layout.yaxis.tickformat is None
    opts = fig.layout.yaxis.autorangeoptions
    assert opts.minallowed is None and opts.maxallowed is None
    assert charts.training_curves({"r": r2}, "acc", task="classification").layout.title.text == (
        "Accuracy"
    )
    pts = [{"value": v, "flops_pct": 10.0 * v, "params_pct": 10.0 * v, "val_acc": a}
           for v, a in ((10, 0.9), (5, 0.88), (2, 0.85), (1, -0.41))]  # fmt: skip
    fig = charts.tradeoff_chart({"N=3": pts}, current=pts[1], task="regression")
    assert fig.layout.title.text.startswith("Trade-off: validation R² against FLOPs")
    assert fig.layout.yaxis.title.text == "validation R²" and fig.layout.yaxis.tickformat is None
    assert fig.layout.yaxis.autorangeoptions.minallowed is None
    assert all("R² %{y:.4f}" in t.hovertemplate and "%{y:.2%}" not in t.hovertemplate
               for t in fig.data)  # fmt: skip
    assert fig.layout.yaxis.range[0] == pytest.approx(0.7)  # 20 hundredths below the best
    (note,) = fig.layout.annotations
    assert "N=3: 1 point at 10.0 % of FLOPs, R² down to -0.410" in note.text
    low = [{**p, "val_acc": a} for p, a in zip(pts, (0.1, 0.05, -0.2, -0.5), strict=True)]
    fig = charts.tradeoff_chart({"N=3": low, "N=1": low[:3]}, task="regression")
    assert fig.layout.yaxis.range[0] == pytest.approx(-0.1)  # below 0: R² has no floor
    tests = [{**p, "test_acc": p["val_acc"]} for p in pts]
    compare = charts.tradeoff_chart({"a": tests}, y="test_acc", task="regression")
    assert compare.layout.yaxis.title.text == "test R²"


def test_training_curves_without_data_says_so():
    fig = charts.training_curves({"r": []}, "loss")
    assert len(fig.data) == 0
    assert "no measurements" in fig.layout.annotations[0].text


def test_spectrum_heatmap_is_log_ratio_to_largest():
    fig = charts.spectrum_heatmap([0, 5], [[4.0, 2.0, 0.0], [10.0, 1.0, 0.1]], layer="fc1")
    hm = fig.data[0]
    assert isinstance(hm, go.Heatmap)
    z = [list(row) for row in hm.z]  # rows: σ index, columns: snapshots
    assert len(z) == 3 and len(z[0]) == 2
    assert z[0] == [0.0, 0.0]
    assert math.isclose(z[1][0], math.log10(0.5), rel_tol=1e-6)  # sent as float32
    assert math.isclose(z[2][1], -2.0, rel_tol=1e-6)
    assert z[2][0] == charts.LOG_FLOOR  # an exact zero sits on the floor, not at -inf
    assert "fc1" in fig.layout.title.text
    assert tuple(fig.layout.xaxis.range) == (0, 5)  # steps, not half a cell before step 0


def test_spectrum_heatmap_thinned_rows_keep_first_last_and_true_indices():
    spectra = [[1.0 / (i + 1) ** k for i in range(300)] for k in (0.5, 1.0, 2.0)]
    fig = charts.spectrum_heatmap([0, 10, 20], spectra, layer="fc1", max_rows=50)
    hm = fig.data[0]
    ys = list(hm.y)
    assert ys[0] == 1 and ys[-1] == 300 and len(ys) <= 52 and ys == sorted(ys)
    z = [list(row) for row in hm.z]
    assert len(z) == len(ys) and len(z[0]) == 3
    i = ys[7]  # the row drawn for σ index i is that index's value
    assert math.isclose(z[7][2], math.log10(1.0 / i**2), rel_tol=1e-5)


def test_spectrum_heatmap_empty():
    assert len(charts.spectrum_heatmap([], [], layer="x").data) == 0


def test_layer_spectra_chart_normalises_and_uses_log_axis():
    fig = charts.layer_spectra_chart({"a": [2.0, 1.0, 0.0], "b": [5.0]}, uirevision="u")
    assert fig.layout.yaxis.type == "log"
    assert list(fig.data[0].y)[:2] == [1.0, 0.5]
    assert fig.data[0].y[2] > 0  # zeros are clipped so the log axis can draw them
    assert [t.name for t in fig.data] == ["a", "b"]


def test_rank_curves_draw_each_run_against_its_own_steps():
    """Runs snapshot at different steps: N=1 at 0, 10, 20, 30, 60, 100 must end at 100."""
    steps = {"N=1": [0, 10, 20, 30, 60, 100], "N=3": [0, 10, 20, 30, 40, 50, 60, 70]}
    ranks = {"N=1": [9, 9, 8, 8, 8, 8], "N=3": [9, 7, 5, 4, 3, 3, 3, 3]}
    fig = charts.rank_curves(steps, ranks)
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["N=1"].x) == steps["N=1"] and list(by_name["N=1"].y) == ranks["N=1"]
    assert list(by_name["N=3"].x) == steps["N=3"]


def test_rank_curves_one_line_per_layer():
    fig = charts.rank_curves([0, 10, 20], {"fc1": [30, 12, 5], "fc2": [10, 8, 6]})
    assert [t.name for t in fig.data] == ["fc1", "fc2"]
    assert list(fig.data[0].x) == [0, 10, 20]


def test_spectra_cut_marks_each_layers_rank_on_one_chart():
    fig = charts.spectra_cut({"fc1": [5.0, 3.0, 1.0, 0.1], "fc2": [2.0, 1.0]}, {"fc1": 2})
    kept, dropped, kept2, dropped2 = fig.data
    assert list(kept.y) == [1.0, 0.6] and list(dropped.x) == [3, 4]  # σ/σ_max
    assert list(dropped.customdata) == [1.0, 0.1]  # hover shows σ itself
    assert kept.opacity > dropped.opacity and kept.line.color == dropped.line.color
    assert kept.name == "fc1: keep 2 of 4" and not dropped.showlegend
    assert list(kept2.x) == [1, 2] and list(dropped2.x) == []  # fc2 not in ranks: kept whole
    assert [sh.x0 for sh in fig.layout.shapes] == [2.5]  # no cut line for a full rank
    assert fig.layout.yaxis.type == "log"
    wide = charts.spectra_cut({"fc1": [1.0 / (i + 1) for i in range(256)]}, {"fc1": 20})
    assert {t.mode for t in wide.data} == {"lines"}  # no marker per value on a long spectrum


def test_tradeoff_chart_sorts_by_cost_and_marks_current():
    pts = [
        {"value": 1.0, "flops_pct": 100.0, "params_pct": 100.0, "val_acc": 0.95},
        {"value": 0.2, "flops_pct": 20.0, "params_pct": 25.0, "val_acc": 0.80},
        {"value": 0.5, "flops_pct": 50.0, "params_pct": 55.0, "val_acc": 0.94},
    ]
    fig = charts.tradeoff_chart({"N=3": pts, "N=1": pts[:2]}, current=pts[2])
    assert list(fig.data[0].x) == [20.0, 50.0, 100.0]
    assert fig.data[-1].name == "current" and list(fig.data[-1].x) == [50.0]
    fig2 = charts.tradeoff_chart({"N=3": pts}, x="params_pct", y="val_acc")
    assert list(fig2.data[0].x) == [25.0, 55.0, 100.0]
    assert fig2.layout.yaxis.range is None  # spread below the focus: the whole range
    low = [*pts, {"value": 0.01, "flops_pct": 1.0, "params_pct": 1.0, "val_acc": 0.1}]
    fig3 = charts.tradeoff_chart({"N=3": low})
    assert fig3.layout.yaxis.range[0] == pytest.approx(0.75)  # opens on 20 points below the best
    (note,) = fig3.layout.annotations  # and names what it leaves below
    assert "Below the axis" in note.text
    assert "N=3: 1 point at 1.0 % of FLOPs, accuracy down to 10.0%" in note.text
    assert not fig.layout.annotations  # nothing below: no note


def test_tradeoff_chart_never_leaves_a_line_out_of_view():
    """The three methods at 5-50 % budgets: a line wholly below the zoom (L1 pruning at 25 %)
    makes the axis take in every point; a line partly below it is named in the note."""

    def line(accs):
        return [{"value": b, "params_pct": b, "test_acc": a}
                for b, a in zip((5, 10, 20, 50), accs, strict=True)]  # fmt: skip

    curves = {"LoRITa cut": line([0.90, 0.93, 0.95, 0.96]),
              "SVD cut": line([0.84, 0.90, 0.94, 0.96]),
              "L1 pruning": line([0.25, 0.26, 0.30, 0.41])}  # fmt: skip
    fig = charts.tradeoff_chart(curves, x="params_pct", y="test_acc")
    assert fig.layout.yaxis.range is None and not fig.layout.annotations
    curves["L1 pruning"] = line([0.25, 0.30, 0.88, 0.95])
    fig = charts.tradeoff_chart(curves, x="params_pct", y="test_acc")
    assert fig.layout.yaxis.range[0] == pytest.approx(0.76)
    (note,) = fig.layout.annotations
    assert (
        "L1 pruning: 2 points at 5.0–10.0 % of the parameters, accuracy down to 25.0%" in note.text
    )
    assert "LoRITa" not in note.text and "SVD" not in note.text
    star = {"value": 5, "params_pct": 5.0, "test_acc": 0.5}
    fig = charts.tradeoff_chart({"LoRITa cut": curves["LoRITa cut"]}, current=star,
                                x="params_pct", y="test_acc")  # fmt: skip
    assert fig.layout.yaxis.range is None  # the current point is never out of view


def test_theory_spectrum_has_true_and_learned():
    fig = charts.theory_spectrum([3.0, 2.0, 1e-9], [3.0, 2.0], n_factors=3)
    assert [t.name for t in fig.data][1] == "learned, N=3"
    assert fig.layout.yaxis.type == "log"
    assert min(fig.data[1].y) == pytest.approx(3e-6)  # drawn on the floor, 1e-6 of the top
    fig = charts.theory_spectrum([3.0, 0.0], [3.0, 0.0], n_factors=1, observed=[3.1, 0.1])
    assert len(fig.data) == 3 and list(fig.data[0].x) == [1]  # exact zeros are not drawn


def test_log_axis_ticks_whole_decades_only_over_a_wide_range():
    wide = charts.layer_spectra_chart({"a": [1.0, 1e-4]})
    narrow = charts.layer_spectra_chart({"a": [1.0, 0.5]})
    assert wide.layout.yaxis.dtick == 1 and narrow.layout.yaxis.dtick is None


@pytest.mark.parametrize(
    "make",
    [
        lambda: charts.training_curves({"r": METRICS}),
        lambda: charts.spectrum_heatmap([0], [[1.0]], layer="a"),
        lambda: charts.layer_spectra_chart({"a": [1.0]}),
        lambda: charts.rank_curves([0], {"a": [1]}),
        lambda: charts.spectra_cut({"a": [1.0]}, {"a": 1}),
        lambda: charts.tradeoff_chart({"a": [{"flops_pct": 1, "val_acc": 0.5, "value": 1}]}),
        lambda: charts.theory_spectrum([1.0], [1.0], n_factors=1),
    ],
)
def test_every_chart_serialises_and_has_uirevision(make):
    fig = make()
    assert fig.layout.uirevision is not None
    fig.to_json()  # what app.plot.show sends to the browser


def test_spectra_cut_thinned_keeps_ends_and_both_sides_of_the_cut():
    vals = [1.0 / (i + 1) for i in range(500)]
    fig = charts.spectra_cut({"fc1": vals}, {"fc1": 137}, hover=False, max_points=50)
    kept, dropped = fig.data
    assert kept.x[0] == 1 and kept.x[-1] == 137 and dropped.x[0] == 138 and dropped.x[-1] == 500
    assert len(kept.x) + len(dropped.x) <= 54
    assert list(dropped.y) == [vals[x - 1] for x in dropped.x]  # σ/σ_max at the drawn indices
    assert kept.customdata is None and kept.hoverinfo == "skip"
    assert [sh.x0 for sh in fig.layout.shapes] == [137.5]
    full = charts.spectra_cut({"fc1": vals}, {"fc1": 137})
    assert len(full.data[0].x) + len(full.data[1].x) == 500 and full.data[1].customdata
