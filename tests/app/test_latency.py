"""Measured latency on the Compress page (app/latency.py) and the Export page's choice of each
layer's form by FLOPs or by measured latency (app/export.py), on the seeded tiny digits run."""

from __future__ import annotations

import pytest
from app_seed import N3, ROOT, shown_charts
from streamlit.testing.v1 import AppTest

from app import compress as cz
from app import export as ex
from app import latency, state

APP = str(ROOT / "streamlit_app.py")
TIMEOUT = 300


@pytest.fixture
def session(runs_dir):
    return cz.session(N3, "best", runs_dir)


def _cut(session, value: float = 0.8):
    return cz.apply(session, cz.make_policy("global", value))


def test_measure_numbers_are_positive_and_rows_match_the_cut(session):
    import torch

    import lorita as lt

    res = _cut(session)
    result = latency.measure(session, res["model"], repeats=3, layer_repeats=3)
    assert [w["batch"] for w in result.whole] == [1, 64]
    for w in result.whole:
        assert w["original_ms"] > 0 and w["cut_ms"] > 0
        assert w["cut_pct"] == pytest.approx(100 * w["cut_ms"] / w["original_ms"])
    names = [r["layer"] for r in result.layers]
    assert names == [n for n, _ in lt.iter_layers(res["model"])]
    assert names == list(session.full_ranks)
    plan = res["model"].lorita_plan
    for r in result.layers:
        assert r["original_ms"] > 0 and r["cut_ms"] > 0, r
        if r["layer"] in plan:
            assert (r["form"], r["rank"]) == (plan[r["layer"]]["form"], plan[r["layer"]]["rank"])
        else:  # the output layer: left out of every cut
            assert r["form"] == "left out" and r["rank"] == r["full"]
    assert result.layer_batch == 64
    n_bn = sum(isinstance(m, torch.nn.BatchNorm1d) for m in session.model.modules())
    assert n_bn and result.deployed == (
        f"Both timed as they deploy: BatchNorm folded into the layer before it ({n_bn} of "
        f"{n_bn} in the original, {n_bn} of {n_bn} in the cut), contiguous memory format."
    )
    table = latency.layer_table(result)
    assert [t["layer"] for t in table] == names
    assert sum(t["share of the cut's layer time %"] for t in table) == pytest.approx(100, abs=0.5)


def test_measure_leaves_the_shared_model_alone(session):
    """Timing hooks go on a private copy: the cached session model keeps no hooks."""
    res = _cut(session)
    latency.measure(session, res["model"], repeats=1, layer_repeats=1)
    for m in session.model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_measure_times_both_whole_models_paired_and_warns_on_a_busy_machine(
    runs_dir, session, monkeypatch
):
    import torch

    import lorita.cost as cost

    paired, real = [], cost.paired_latency

    def counted(models, example, **kw):
        paired.append(len(models))
        return real(models, example, **kw)

    monkeypatch.setattr(cost, "paired_latency", counted)
    monkeypatch.setattr(cost, "usable_cores", lambda: 2)
    monkeypatch.setattr(cost.os, "getloadavg", lambda: (0.3, 0.2, 0.1))
    steps = []
    res = _cut(session)
    quiet = latency.measure(
        session, res["model"], repeats=2, layer_repeats=2, progress=lambda d, t, s: steps.append(s)
    )
    assert paired == [2] and quiet.busy == ""  # the original and the cut, in turn
    assert steps[0] == "Timing the whole original and cut models, in turn…" and len(steps) == 4
    monkeypatch.setattr(cost.os, "getloadavg", lambda: (3.5, 2.0, 1.0))
    threads = torch.get_num_threads()
    busy = latency.measure(session, res["model"], repeats=2, layer_repeats=2)
    assert "load average 3.5 on 2 cores" in busy.busy
    assert busy.threads == 1 or threads == 1  # timed on one thread, then given back
    assert torch.get_num_threads() == threads
    at = AppTest.from_function(_render_script, args=(busy,), default_timeout=TIMEOUT).run()
    assert not at.exception
    assert [w.value for w in at.warning][:1] == [busy.busy[0].upper() + busy.busy[1:] + "."]


def _render_script(result) -> None:
    from app import latency

    latency.render(result)


def test_repeats_fit_the_time_budget(session):
    x = session.example_input
    assert latency.fit_repeats(session.model, x, 20, budget_s=10.0) == 20  # a tiny MLP: all
    assert latency.fit_repeats(session.model, x, 20, budget_s=0.0) == latency.MIN_REPEATS
    res = _cut(session)
    result = latency.measure(session, res["model"])  # repeats chosen by the time budget
    assert latency.MIN_REPEATS <= result.repeats <= latency.REPEATS
    assert latency.MIN_REPEATS <= result.layer_repeats <= latency.LAYER_REPEATS


def test_chart_shows_the_slowest_layers_in_model_order():
    rows = [
        {"layer": f"l{i}", "form": "thin", "rank": 1, "full": 2, "original_ms": float(i % 7),
         "cut_ms": float(i % 5)}
        for i in range(40)
    ]  # fmt: skip
    result = latency.Latency(whole=[], layers=rows, layer_batch=64, threads=1, repeats=3,
                             layer_repeats=3)  # fmt: skip
    shown = latency.slowest(result, 10)
    assert len(shown) == 10
    assert [r["layer"] for r in shown] == sorted((r["layer"] for r in shown), key=names_order)
    slowest_time = min(max(r["original_ms"], r["cut_ms"]) for r in shown)
    assert all(max(r["original_ms"], r["cut_ms"]) <= slowest_time for r in rows if r not in shown)
    fig = latency.layer_chart(result, 10)
    assert list(fig.data[0].y) == [r["layer"] for r in shown][::-1]
    assert "the 10 slowest layers" in fig.layout.title.text


def names_order(name: str) -> int:
    return int(name[1:])


def test_cut_token_names_the_cut(session):
    a, b = _cut(session, 0.8), _cut(session, 0.8)
    c = _cut(session, 0.5)
    assert latency.cut_token(session, a["model"]) == latency.cut_token(session, b["model"])
    assert latency.cut_token(session, a["model"]) != latency.cut_token(session, c["model"])


def test_remember_keeps_the_newest():
    kept: dict = {}
    for i in range(latency.KEEP + 3):
        latency.remember(kept, (i,), i)
    assert list(kept) == [(i,) for i in range(3, latency.KEEP + 3)]
    latency.remember(kept, (3,), "again")  # measured again: now the newest
    assert list(kept)[-1] == (3,) and len(kept) == latency.KEEP


def _show_script(root: str, run: str, value: float) -> None:
    from app import cache, latency
    from app import compress as cz

    session = cache.session(root, run, "best")
    latency.show(session, cz.apply(session, cz.make_policy("global", value)))


def _metric_labels(at: AppTest) -> list[str]:
    return [m.label for m in at.metric]


def test_show_measures_on_the_button_only_and_keeps_it_for_the_cut(runs_dir, monkeypatch):
    calls = []
    real = latency.measure

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **{**kwargs, "repeats": 3, "layer_repeats": 3})

    monkeypatch.setattr(latency, "measure", counted)
    at = AppTest.from_function(
        _show_script, args=(str(runs_dir), N3, 0.8), default_timeout=TIMEOUT
    ).run()
    assert not at.exception and not calls
    assert "Latency, batch 1" not in _metric_labels(at)
    at.button(key="compress.latency.go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(calls) == 1
    assert _metric_labels(at) == ["Latency, batch 1", "Latency, batch 64"]
    for m in at.metric:
        assert float(m.value.split()[0]) > 0 and "% of original" in m.delta
    assert len(shown_charts(at)) == 1 and len(at.dataframe) == 1
    at.run()  # a rerun (a widget elsewhere moved) with the same cut: kept, not measured again
    assert len(calls) == 1 and _metric_labels(at) == ["Latency, batch 1", "Latency, batch 64"]
    # another cut: nothing kept for it
    at2 = AppTest.from_function(
        _show_script, args=(str(runs_dir), N3, 0.5), default_timeout=TIMEOUT
    )
    at2.session_state[state.LATENCY] = at.session_state[state.LATENCY]
    at2.run()
    assert "Latency, batch 1" not in _metric_labels(at2) and len(calls) == 1


# --- Export: each layer's form by FLOPs or by measured latency ---------------------------------


def test_decide_options_are_the_librarys():
    from lorita.kinds import DECIDE_BY

    assert tuple(ex.decide_options()) == DECIDE_BY


@pytest.mark.parametrize("bad", [{"by": "speed"}, {"batch": 0}, {"batch": 5000}, {"batch": 2.0}])
def test_choose_model_refuses_bad_options(session, bad):
    choice = {"run": N3, "which": "best", "policy": "global", "value": 0.8,
              "ranks": _cut(session)["ranks"]}  # fmt: skip
    with pytest.raises(ValueError, match=next(iter(bad))):
        ex.choose_model(session, choice, "low_rank", **bad)


@pytest.mark.parametrize("fmt", ["low_rank", "dense", "onnx"])
def test_a_per_layer_rank_table_cut_is_exported_in_every_format(session, fmt):
    """The rank table lists every layer, the left-out head too (at its full rank): each
    format exports the cut, the head left as it is."""
    table = {n: max(1, f // 4) if n in session.layers else f for n, f in session.full_ranks.items()}
    assert set(table) - set(session.layers)  # the head is in the table
    choice = {"run": N3, "which": "best", "policy": "ranks", "value": None, "ranks": table}
    model = ex.choose_model(session, choice, fmt)
    cut = {n: r for n, r in table.items() if n in session.layers}
    if fmt == "dense":  # the original architecture, each weight of its cut rank
        import torch

        for n, r in cut.items():
            assert torch.linalg.matrix_rank(model.get_submodule(n).weight) <= r
    else:
        assert model.lorita_ranks == cut
        assert sum(p.numel() for p in model.parameters()) < session.base_cost.params


@pytest.mark.parametrize("batch", [1, 64])
def test_choose_model_by_latency_keeps_ranks_and_says_each_form(session, batch):
    import torch

    res = _cut(session)
    choice = {"run": N3, "which": "best", "policy": "global", "value": 0.8, "ranks": res["ranks"]}
    by_flops = ex.choose_model(session, choice, "low_rank")
    timed = ex.choose_model(session, choice, "low_rank", by="latency", batch=batch)
    assert timed.lorita_ranks == by_flops.lorita_ranks
    plan = timed.lorita_plan
    assert set(plan) == set(session.layers) | set(session.left_out)  # the head: left out
    for n, p in plan.items():
        assert p["form"] in (("left out",) if n in session.left_out else ("thin", "dense", "full"))
        if p["form"] == "dense":  # each dense layer says why
            assert "measured slower" in p["why"] or "more FLOPs" in p["why"], p
    x = session.example_input.expand(16, *session.example_input.shape[1:])
    with torch.no_grad():  # same ranks, same function, whichever form each layer took
        torch.testing.assert_close(timed(x), by_flops(x), atol=1e-4, rtol=1e-4)
    rows = ex.layer_forms(session, timed)
    assert [r["layer"] for r in rows] == list(session.full_ranks)
    for r in rows:
        if r["layer"] in plan:
            assert r["form"] == latency.FORM_WORDS[plan[r["layer"]]["form"]]
            assert r["rank"] == f"{plan[r['layer']]['rank']}/{plan[r['layer']]['full']}"
    note = ex.params_note(session, timed)
    dense = [n for n, p in plan.items() if p["form"] == "dense" and p.get("timed")]
    assert (note is None) == (not dense) and ex.params_note(session, by_flops) is None
    if note:  # the dense layers' whole weights, against the uncut model
        params = sum(p.numel() for p in timed.parameters())
        assert (
            f"{100 * params / session.base_cost.params:.1f}%" in note
            and f"{len(dense)} cut" in note
        )
    meta = ex.metadata(session, choice, "low_rank", model=timed, by="latency", batch=batch)
    assert meta["truncation"]["forms_by"] == "latency"
    assert meta["truncation"]["latency_batch"] == batch
    cut = {n: p["form"] for n, p in plan.items() if n not in session.left_out}
    assert meta["truncation"]["forms"] == cut  # the cut layers' forms


def test_choose_model_by_latency_on_a_finetuned_model(session):
    import torch

    res = _cut(session)
    choice = {"run": N3, "which": "best", "policy": "global", "value": 0.8, "ranks": res["ranks"]}
    tuned, _ = cz.finetune(session, res["model"], epochs=1, lr=1e-3)
    timed = ex.choose_model(session, choice, "low_rank", tuned, by="latency", batch=8)
    assert {n: p["rank"] for n, p in timed.lorita_plan.items() if n in session.layers} == {
        n: r for n, r in res["ranks"].items() if n in session.layers
    }
    x = session.example_input.expand(16, *session.example_input.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(timed(x), tuned.eval()(x), atol=1e-4, rtol=1e-4)


def _open(page: str, **query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for k, v in query.items():
        at.query_params[k] = v
    at.run()
    at.switch_page(f"pages/{page}.py").run()
    return at


def test_export_page_forms_by_latency(runs_dir):
    at = _open("compress", run=N3)
    at.slider(key="compress.value.global").set_value(0.8).run()
    at.switch_page("pages/export.py").run()
    assert not at.exception and not at.error
    by = at.radio(key="export.by")
    assert by.value == "flops" and tuple(by.options) == tuple(ex.decide_options().values())
    assert at.number_input(key="export.batch").disabled
    by.set_value("latency").run()
    at.number_input(key="export.batch").set_value(1).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    m = {x.label: x.value for x in at.metric}
    assert m["Test accuracy before saving"] == m["Test accuracy after reloading"]
    forms = [e for e in at.expander if e.label.startswith("Each layer's form")]
    assert forms and "chosen by latency measured at batch 1" in forms[0].label
    rows = forms[0].dataframe[0].value
    assert list(rows["layer"]) == list(cz.session(N3, "best", runs_dir).full_ranks)
    at.button(key="export.latency.go").click().run()  # this model's latency against the original
    assert not at.exception, [e.value for e in at.exception]
    assert {"Latency, batch 1", "Latency, batch 64"} <= set(_metric_labels(at))
    at.radio(key="export.format").set_value("dense").run()
    assert not at.exception
    assert not [r for r in at.radio if r.key == "export.by"]  # no thin layers: nothing to choose
    forms = [e for e in at.expander if e.label.startswith("Each layer's form")]
    assert "0 of" in forms[0].label and "dense format" in forms[0].label


def test_compress_page_measures_on_the_button_and_keeps_it_per_cut(runs_dir):
    at = _open("compress", run=N3)
    slider = at.slider(key="compress.value.global")
    first = slider.value
    assert "Latency, batch 1" not in _metric_labels(at)
    at.button(key="compress.latency.go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert {"Latency, batch 1", "Latency, batch 64"} <= set(_metric_labels(at))
    other = 0.5 if first != 0.5 else 0.8
    at.slider(key="compress.value.global").set_value(other).run()  # another cut: not measured
    assert "Latency, batch 1" not in _metric_labels(at)
    at.slider(key="compress.value.global").set_value(first).run()  # back: kept for that cut
    assert {"Latency, batch 1", "Latency, batch 64"} <= set(_metric_labels(at))
    assert len(at.session_state[state.LATENCY]) == 1


def test_params_note_says_what_the_dense_layers_weigh(session, monkeypatch):
    from lorita import kinds

    monkeypatch.setattr(kinds, "_thin_is_faster", lambda dense, layer, args: False)
    res = _cut(session)
    choice = {"run": N3, "which": "best", "policy": "global", "value": 0.8, "ranks": res["ranks"]}
    timed = ex.choose_model(session, choice, "low_rank", by="latency", batch=4)
    cut = [n for n, p in timed.lorita_plan.items() if p["form"] == "dense"]
    assert cut and all(timed.lorita_plan[n]["timed"] for n in cut)
    params = sum(p.numel() for p in timed.parameters())
    note = ex.params_note(session, timed)
    assert f"{100 * params / session.base_cost.params:.1f}% of the original" in note
    assert ex.params_note(session, ex.choose_model(session, choice, "low_rank")) is None
