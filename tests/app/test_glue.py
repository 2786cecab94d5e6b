"""Small pieces of app/: presets, run choice, live spectra helpers, export glue."""

from __future__ import annotations

import time

import pytest
from app_seed import N1, N3, R3

from app import compress as cz
from app import export as ex
from app import jobs, live, options, presets, tables, ui
from lorita.kinds import stages


def test_classroom_preset_is_the_library_default():
    from lorita.engine import TrainConfig

    cfg = presets.config("classroom")
    default = TrainConfig().to_dict()
    assert {k: cfg[k] for k in ("dataset", "model", "n_factors", "lr", "weight_decay")} == {
        k: default[k] for k in ("dataset", "model", "n_factors", "lr", "weight_decay")
    }


def test_build_config_drops_options_of_another_dataset_or_model():
    cfg = presets.build_config("planted", {"dataset": "digits", "epochs": 2})
    assert cfg["dataset"] == "digits" and cfg["epochs"] == 2 and "dataset_kwargs" not in cfg
    cfg = presets.build_config("fashion", {"model": "vgg11"})
    assert "model_kwargs" not in cfg
    assert presets.baseline_config(cfg)["n_factors"] == 1
    with pytest.raises(ValueError, match="preset"):
        presets.build_config("nope", {})


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_every_preset_is_a_valid_training_config(name):
    from lorita.engine import TrainConfig

    TrainConfig.from_dict(presets.config(name))  # raises ValueError naming a bad field


def test_default_run_prefers_the_wanted_then_a_composed_run():
    rows = [
        {"name": "b1", "n_factors": 1},
        {"name": "a3", "n_factors": 3},
        {"name": "c1", "n_factors": 1},
    ]
    assert cz.default_run(rows, "c1") == "c1"
    assert cz.default_run(rows, "gone") == "a3"
    assert cz.default_run([{"name": "b1", "n_factors": 1}]) == "b1"
    assert cz.default_run([]) is None


def test_choice_token_identifies_a_setting():
    a = {"run": "r", "which": "best", "policy": "global", "value": 0.5, "ranks": {"fc1": 3}}
    assert cz.choice_token(a) == cz.choice_token(dict(a))
    assert cz.choice_token(a) != cz.choice_token({**a, "value": 0.6})


def test_live_helpers_shape_the_spectra_log():
    rows = [
        {"step": 0, "layers": {"fc1": [3.0, 2.0, 1.0], "head": [1.0]}},
        {"step": 10, "layers": {"fc1": [3.0, 1.0, 1e-6], "head": [1.0]}},
    ]
    assert live.layer_names(rows) == ["fc1", "head"]
    assert live.widest_layer(rows) == "fc1"
    assert live.layer_series(rows, "fc1") == ([0, 10], [[3.0, 2.0, 1.0], [3.0, 1.0, 1e-6]])
    assert live.latest(rows) == (10, {"fc1": [3.0, 1.0, 1e-6], "head": [1.0]})
    steps, ranks = live.rank_series(rows)
    assert steps == [0, 10] and ranks["fc1"] == [3, 2] and ranks["head"] == [1, 1]
    assert live.layer_names([]) == [] and live.widest_layer([]) is None


def test_export_snippets_name_the_file():
    assert 'lt.load("m.safetensors")' in ex.snippet("low_rank", "m.safetensors")
    assert 'InferenceSession("m.onnx")' in ex.snippet("onnx", "m.onnx")


@pytest.mark.parametrize("fmt", ["low_rank", "onnx"])
def test_a_downloaded_file_says_how_to_feed_it_and_its_snippet_runs(runs_dir, tmp_path, fmt):
    """Both formats carry the run's preprocessing (input shape, pixels, mean and std): the
    page's snippet, run as written on the downloaded file with inputs prepared as it says,
    gives the model's predictions; so does the export of a run without its data."""
    import numpy as np
    import torch

    session = cz.session(N3, "best", runs_dir)
    model, _ = session.cut(cz.make_policy("global", 0.5))
    meta = ex.metadata(session, None, fmt, model=model)
    built = ex.build(session, model, fmt, base_name="m", meta=meta)
    path = tmp_path / built.file_name
    path.write_bytes(built.data)
    how = session.splits.preprocess()
    scope = {}  # the snippet runs as it is: its random inputs stand in for the user's
    code = built.snippet.replace(f'"{built.file_name}"', f'"{path}"')
    exec(code, scope)  # noqa: S102 - the page's own snippet
    assert scope["how"] == how and how["normalize"]["mean"]
    x = torch.as_tensor(scope["x"])
    assert x.shape[1:] == session.example_input.shape[1:]
    with torch.no_grad():
        want = model.eval()(x).argmax(1).numpy()
    np.testing.assert_array_equal(np.asarray(scope["pred"]), want)
    offline = ex.build_offline(jobs.store(runs_dir).get(N3), "best", fmt)
    (tmp_path / offline.file_name).write_bytes(offline.data)
    if fmt == "onnx":
        import json

        import onnxruntime as ort

        props = ort.InferenceSession(str(tmp_path / offline.file_name)).get_modelmeta()
        assert json.loads(props.custom_metadata_map["preprocess"]) == how
    else:
        import lorita as lt

        assert lt.read_spec(tmp_path / offline.file_name)["metadata"]["preprocess"] == how


@pytest.mark.parametrize("fmt", ["low_rank", "onnx"])
def test_a_regressions_snippet_runs_and_gives_its_outputs(regression_runs, tmp_path, fmt):
    """A regression's file: the page's snippet, run as written (its metadata has no
    normalisation: the inputs go in as they are), gives the model's outputs themselves, not
    an argmax; so does the snippet of the export of a run without its data."""
    import numpy as np
    import torch

    import lorita as lt

    session = cz.session(R3, "best", regression_runs)
    model, _ = session.cut(cz.make_policy("global", 0.5))
    meta = ex.metadata(session, None, fmt, model=model)
    assert meta["preprocess"]["normalize"] is None and meta["preprocess"]["task"] == "regression"
    as_trained = lt.merge_model(jobs.store(regression_runs).get(R3).load_model("best"))
    files = [
        (ex.build(session, model, fmt, base_name="m", meta=meta), model),
        (ex.build_offline(jobs.store(regression_runs).get(R3), "best", fmt), as_trained),
    ]
    for file, exported in files:
        assert "argmax" not in file.snippet and "normalize']['mean" not in file.snippet
        path = tmp_path / file.file_name
        path.write_bytes(file.data)
        scope = {}
        code = file.snippet.replace(f'"{file.file_name}"', f'"{path}"')
        exec(code, scope)  # noqa: S102 - the page's own snippet, as it is
        with torch.no_grad():
            want = exported.eval()(torch.as_tensor(scope["x"])).numpy()
        assert scope["how"]["task"] == "regression"
        np.testing.assert_allclose(np.asarray(scope["out"]), want, rtol=1e-4, atol=1e-5)


def test_a_reloaded_r2_is_the_same_within_a_rounding_and_an_accuracy_exactly():
    """R² is continuous: a runtime's floating-point rounding moves it in its last places, which
    is no difference; an accuracy counts predictions, so any difference is one."""

    def built(task, diff):
        return ex.Built(b"", "m", "onnx", {"val_acc": 0.5, "test_acc": 0.5},
                        {"val_acc": 0.5 + diff, "test_acc": 0.5}, 0.0, "", task)  # fmt: skip

    assert built("regression", 3e-8).same and not built("regression", 1e-4).same
    assert not built("classification", 3e-8).same and built("classification", 0.0).same


def test_the_runs_table_has_a_pair_of_score_columns_per_task():
    rows = [
        {"name": "c", "state": "completed", "task": "classification", "best_val_acc": 0.931,
         "test_acc": 0.92},
        {"name": "r", "state": "completed", "task": "regression", "best_val_acc": -0.25,
         "test_acc": 0.6417},
        {"name": "s", "state": "starting", "task": "regression"},
    ]  # fmt: skip
    table = tables.runs_table(rows).set_index("run")
    assert table.loc["c", "best val acc"] == pytest.approx(93.1)
    assert table.loc["r", "best val R²"] == -0.25 and table.loc["r", "test R²"] == 0.6417
    assert table[["best val R²", "test R²"]].loc["c"].isna().all()
    assert table[["best val acc", "test acc"]].loc[["r", "s"]].isna().all().all()
    assert list(table.columns).index("created") == len(table.columns) - 1
    assert tables.run_column_formats(rows) == {
        "best val acc": "%.1f %%", "test acc": "%.1f %%", "best val R²": "%.3f", "test R²": "%.3f",
    }  # fmt: skip
    only = tables.runs_table(rows[:1])
    assert [c for c in only.columns if "acc" in c or "R²" in c] == ["best val acc", "test acc"]


def test_fine_tuning_a_regression_says_its_r2(regression_runs):
    from lorita.scores import score_of

    session = cz.session(R3, "best", regression_runs)
    model, _ = session.cut(cz.make_policy("global", 0.5))
    said = []
    _, got = cz.finetune(session, model, epochs=1, lr=1e-3, progress=lambda t, f: said.append(t))
    (text,) = said
    r2 = score_of("regression").text(got["val_acc"], 1)
    assert text == f"Fine-tuning: epoch 1 of 1 · validation R² {r2}"


def test_an_onnx_download_too_large_for_one_file_says_what_to_do(tmp_path, monkeypatch):
    """Over 2 GiB an ONNX export is two files; a download is one: refused before exporting,
    naming safetensors and the command that writes both."""
    import torch

    import lorita.export as export

    monkeypatch.setattr(export, "ONNX_INLINE_BYTES", 1000)
    model = torch.nn.Sequential(torch.nn.Linear(40, 40), torch.nn.Linear(40, 3))
    with pytest.raises(ValueError, match=r"format onnx: .* more than one ONNX file holds .*"
                       r"download safetensors.*FILE.onnx.data"):  # fmt: skip
        ex._write_and_reload(model, torch.randn(1, 40), tmp_path / "m.onnx", "onnx", None)
    assert not list(tmp_path.iterdir())


def test_a_cut_measured_when_the_run_completed_is_read_not_evaluated(runs_dir):
    from lorita import curves

    run = jobs.store(runs_dir).get(N3)
    assert curves.prepare(run)["cuts-best"] > 1  # what `lorita train` does at completion
    session = cz.session(N3, "best", runs_dir)
    for value in (0.3, 0.77):
        policy = cz.make_policy("global", value)
        kept = cz.apply(session, policy, runs_dir)
        live = cz.result_view(session.apply(policy))
        assert kept["kept"] and "kept" not in live
        for k in ("ranks", "params", "flops", "params_pct", "val_acc", "test_acc", "test_loss"):
            assert kept[k] == live[k], k
        assert kept["policy"] == live["policy"]
        assert kept["model"].lorita_ranks == {n: r for n, r in live["ranks"].items() if n != "head"}
    budget = cz.apply(session, cz.make_policy("budget", 20.0), runs_dir)
    assert "kept" not in budget and budget["budget"]["met"]  # budgets say if they were met


def test_formatting_helpers():
    assert ui.fmt_count(1234) == "1.23 k" and ui.fmt_count(12) == "12"
    assert ui.fmt_duration(75) == "1 min 15 s" and ui.fmt_duration(None) == "—"
    assert ui.fmt_pct(0.9312) == "93.1 %"
    assert ui.one_line(ValueError("lr: bad\nmore")) == "lr: bad"
    assert ui.one_line(KeyError("x")) == "KeyError: 'x'"


def test_session_apply_and_snap_on_a_real_run(runs_dir):
    session = cz.session(N3, "best", runs_dir)
    full = cz.apply(session, cz.make_policy("uniform", 1.0))
    assert full["val_acc"] == pytest.approx(session.base["val_acc"])
    assert full["params_pct"] == pytest.approx(100.0)
    small = cz.apply(session, cz.make_policy("ranks", ranks={"fc1": 1, "fc2": 1}))
    assert small["ranks"]["fc1"] == 1 and small["params"] < full["params"]
    with pytest.raises(ValueError, match="rank"):
        cz.apply(session, cz.make_policy("ranks", ranks={"fc1": 10_000}))
    assert cz.find_baseline(N3, runs_dir) == N1
    assert cz.find_baseline(N1, runs_dir) is None
    # a search result is on the slider's grid: one number on the slider, the chart and Export
    value = cz.smallest_within(session, "global", 5.0)
    assert value == cz.snap("global", value)
    choice = {"run": N3, "which": "best", "policy": "global", "value": value, "ranks": {}}
    assert cz.choice_text(choice).endswith(f"at {value:.2f}")


@pytest.mark.parametrize("policy", ["budget", "global", "uniform"])
def test_smallest_within_finds_the_smallest_on_every_slider_step(runs_dir, policy):
    """The search sweeps a coarse grid, then every slider step between the best value and its
    infeasible neighbour: here it finds as few parameters as trying every step would."""
    session = cz.session(N3, "best", runs_dir)
    d = cz.scalar_policies()[policy]
    lo, hi, step = float(d["min"]), float(d["max"]), float(d["step"])
    steps = {cz.snap(policy, lo + i * step) for i in range(round((hi - lo) / step) + 1)}
    cut = {v: cz.apply(session, cz.make_policy(policy, v)) for v in steps}
    for drop in (1.0, 5.0, 10.0, 50.0):
        value = cz.smallest_within(session, policy, drop)
        assert value in steps
        floor = session.base["val_acc"] - drop / 100 - 1e-12
        fewest = min(r["params"] for r in cut.values() if r["val_acc"] >= floor)
        assert cut[value]["val_acc"] >= floor and cut[value]["params"] == fewest, drop


def test_snap_puts_values_on_the_slider_grid():
    assert cz.snap("global", 0.946172) == 0.95
    assert cz.snap("global", 5.0) == cz.scalar_policies()["global"]["max"]
    d = cz.scalar_policies()["energy"]
    assert cz.snap("energy", 0.99349) == pytest.approx(0.993 if d["step"] == 0.001 else 0.99)


def test_tradeoff_curve_is_computed_once_and_kept_in_the_run(runs_dir):
    session = cz.session(N3, "best", runs_dir)
    assert cz.stored_curve(N3, "best", "global", runs_dir) is None
    seen = []
    points = cz.compute_curve(
        session, "global", root=runs_dir, progress=lambda d, t, p: seen.append((d, t))
    )
    assert seen[-1][0] == seen[-1][1] == len(points) and len(points) > 5
    assert cz.stored_curve(N3, "best", "global", runs_dir) == points
    # a new checkpoint (a resumed run) makes the kept curve stale
    import os
    import time

    ckpt = jobs.store(runs_dir).get(N3).checkpoint("best")
    os.utime(ckpt, (time.time() + 5, time.time() + 5))
    assert cz.stored_curve(N3, "best", "global", runs_dir) is None


def test_a_page_waits_for_the_curve_the_training_process_is_keeping(runs_dir):
    """Between "completed" and its exit the training process keeps the curve: a page opening
    the run then waits for it instead of sweeping a second time; without that process (or
    once it ends without keeping one) there is nothing to wait for."""
    import threading

    from filelock import FileLock

    from lorita.runs import WRITER_LOCK

    assert not cz.curve_being_kept(N3, runs_dir)
    assert cz.wait_for_curve(N3, "best", "global", runs_dir, timeout=5) is None
    writer = FileLock(str(runs_dir / N3 / WRITER_LOCK), thread_local=False)
    writer.acquire()  # the training process, still alive
    try:
        assert cz.curve_being_kept(N3, runs_dir)
        session = cz.session(N3, "best", runs_dir)
        kept = threading.Timer(0.6, lambda: cz.compute_curve(session, "global", root=runs_dir))
        ticks: list[float] = []
        kept.start()
        points = cz.wait_for_curve(N3, "best", "global", runs_dir, timeout=60, poll=0.05,
                                   tick=ticks.append)  # fmt: skip
        kept.join()
        assert points and points == cz.stored_curve(N3, "best", "global", runs_dir)
        assert ticks and ticks[-1] >= 0.5  # it waited for the other writer
        assert cz.wait_for_curve(N3, "best", "global", runs_dir) == points  # kept: at once
        t0 = time.monotonic()
        assert cz.wait_for_curve(N3, "best", "uniform", runs_dir, timeout=0.3) is None
        assert time.monotonic() - t0 < 5  # gives up after its timeout
    finally:
        writer.release()


def test_policy_options_are_the_librarys():
    from lorita import truncation

    assert [d["name"] for d in options.policies()] == list(truncation.POLICIES)
    assert set(cz.scalar_policies()) <= set(truncation.POLICIES)


def test_option_lists_come_from_the_library():
    from lorita.data import list_datasets
    from lorita.layers import INITS
    from lorita.models import list_models

    assert options.inits() == list(INITS)
    assert options.datasets()[: len(list_datasets())] == list_datasets()
    assert options.models() == list(list_models())
    assert options.devices()[0] == "auto" and "cpu" in options.devices()
    assert "torchvision:resnet18" in options.models("torchvision")
    assert options.family_of("torchvision:resnet18") == "torchvision"
    assert options.family_of("mlp") == options.BUILT_IN


def test_live_follower_reads_only_new_lines(runs_dir):
    run = jobs.store(runs_dir).get(N3)
    f = live.RunFollower(run)
    assert f.update()
    n_metrics, n_snaps = len(f.metric_rows()), len(f.snapshots)
    assert n_metrics == len(run.metrics()) and n_snaps == len(run.spectra())
    assert not f.update()  # nothing new: nothing read
    with open(run.path / "spectra.jsonl", "a") as fh:  # a line being written: not read yet
        fh.write('{"step": 999, "layers": {"fc1": [1.0, 0.5]')
    assert not f.update()
    with open(run.path / "spectra.jsonl", "a") as fh:
        fh.write("}}\n")
    assert f.update() and f.snapshots[-1]["step"] == 999 and f.snapshots[-1]["ranks"]["fc1"] == 2
    steps, ranks = f.rank_series()
    assert steps[-1] == 999 and len(ranks["fc1"]) == len(steps)


def test_live_follower_keeps_a_bounded_number_of_points():
    rows = list(range(5000))
    thinned = live.thin(rows, 600)
    assert len(thinned) <= 600 and thinned[0] == 0 and thinned[-1] == 4999
    names = [f"layer{i // 4}.{i % 4}.conv" for i in range(53)]
    picked = live.pick_layers(names)
    assert len(picked) == live.MAX_LAYERS_SHOWN and picked[0] == names[0]
    assert picked[-1] == names[-1]
    assert stages(["layer2.0.conv1", "fc"])["layer2.0.conv1"] == "layer2"
    mobilenet = [f"features.{i}.block.{j}.0" for i in range(1, 12) for j in range(3)]
    grouped = stages(["features.0.0", *mobilenet, "classifier.0", "classifier.3"])
    assert (
        grouped["features.3.block.1.0"] == "features.3" and grouped["classifier.3"] == "classifier"
    )
    assert len(set(grouped.values())) == 13  # features.0 ... features.11, classifier


def test_tables_group_many_layers_by_stage():
    ranks = {f"layer{i // 5}.{i % 5}": 10 + i for i in range(20)}
    full = {n: 64 for n in ranks}
    kept = tables.kept_table(ranks, full)
    assert list(kept["stage"]) == ["layer0", "layer1", "layer2", "layer3"]
    assert kept["ranks kept"].sum() == sum(ranks.values()) and kept["of"].sum() == 64 * 20
    small = tables.kept_table({"fc1": 3}, {"fc1": 8})
    assert list(small["layer"]) == ["fc1"]


def test_init_from_upload_is_kept_once_and_named_by_its_content(tmp_path):
    import torch
    from safetensors.torch import save

    from app import train_form

    data = save({"fc.weight": torch.zeros(2, 2)})
    a = train_form.save_upload("mine.safetensors", data, root=tmp_path)
    b = train_form.save_upload("copy.safetensors", data, root=tmp_path)
    assert a == b and a.read_bytes() == data and a.parent.parent.name == ".app"
    with pytest.raises(ValueError, match="init_from: .model.pkl. is not a weights file"):
        train_form.save_upload("model.pkl", data, root=tmp_path)
    with pytest.raises(ValueError, match="empty"):
        train_form.save_upload("w.pt", b"", root=tmp_path)
    form = {**presets.form_values("classroom"), "dataset_path": "", "init_from": a}
    cfg = train_form.build("classroom", form)
    assert cfg["init_from"] == str(a)
    assert train_form.field_errors("classroom", cfg) == []
    # the check before a run starts reads the file against the model: these weights are not its
    (message,) = train_form.check("classroom", cfg)
    assert message.startswith("init_from: the weights do not match the model (missing")
    assert "'fc1.weight'" in message and "not in the model: 'fc.weight'" in message
    import lorita as lt

    plain = lt.build_model(lt.TrainConfig.from_dict({**cfg, "init_from": None, "n_factors": 1}),
                           lt.load_splits(cfg))  # fmt: skip
    good = train_form.save_upload("good.pt", _state_bytes(plain.state_dict()), root=tmp_path)
    assert train_form.check("classroom", {**cfg, "init_from": str(good)}) == []
    huge = {**cfg, "init_from": None, "model_kwargs": {"width": 10**9}}
    assert "needs more than this machine" in train_form.check("classroom", huge)[0]


def _state_bytes(state: dict) -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_build_keeps_a_followed_runs_other_settings():
    from app import train_form

    base = {**presets.config("fashion"), "epochs": 3, "spectra_every": 7}
    form = {k: base[k] for k in presets.FORM_FIELDS}
    form["dataset_path"] = ""
    cfg = train_form.build("fashion", {**form, "lr": 0.01}, base)
    assert cfg["spectra_every"] == 7 and cfg["lr"] == 0.01 and cfg["epochs"] == 3
    assert train_form.split_dataset("folder:/data/x") == ("folder", "/data/x")
    assert train_form.split_dataset("digits") == ("digits", "")


def test_a_quoted_image_folder_is_the_folder_inside_the_quotes(tmp_path):
    """A path pasted with its quotes (a file manager's "copy as path", a shell's) names the
    folder inside them, not a folder called "'/data/x'" under the server's folder."""
    folder = tmp_path / "my images"
    folder.mkdir()
    for quoted in (f"'{folder}'", f'"{folder}" ', f" {folder}"):
        assert options.dataset_name("folder", quoted) == f"folder:{folder}"
    assert options.dataset_name("folder", '""') == "folder:"  # the check says it is missing


def test_is_local_tells_this_machine_from_the_rest():
    from app.serve import is_local

    for url in ("http://127.0.0.1:8501/_stcore/health", "http://localhost:8501/", "data:x",
                "blob:http://127.0.0.1/1", "ws://[::1]:8501/_stcore/stream"):  # fmt: skip
        assert is_local(url), url
    for url in ("https://fonts.gstatic.com/s/i/x.svg", "http://example.com/", "https://1.2.3.4/"):
        assert not is_local(url), url


def test_theory_worker_fits_runs_no_page_script_and_is_replaced_when_it_dies(monkeypatch, tmp_path):
    """The fit in the worker is :func:`fit_here`'s. Streamlit leaves the last page script as
    ``__main__``: the spawned worker must not run it (no session there). A worker that dies
    (killed for memory) is started again."""
    import os
    import signal
    import sys
    import types

    from app import theory

    marker = tmp_path / "ran"
    page = tmp_path / "page.py"
    page.write_text(f"open({str(marker)!r}, 'w').close()\n")
    fake_main = types.ModuleType("__main__")
    fake_main.__file__ = str(page)
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    if theory._Worker.pool is not None:  # a worker started by an earlier test: start afresh
        theory._Worker.pool.shutdown(wait=True)
        theory._Worker.pool = None
    monkeypatch.setattr(theory._Kept, "results", {})
    monkeypatch.setattr(theory._Kept, "pending", {})
    first = theory.fit(2, 0.3, 2, 1)
    here = theory.fit_here(2, 0.3, 2, 1)
    assert first["learned"] == pytest.approx(here["learned"], rel=1e-9, abs=1e-12)
    assert first["effective_rank"] == here["effective_rank"]
    assert not marker.exists(), "the worker ran the page script"
    assert sys.modules["__main__"] is fake_main  # put back after the worker started
    os.kill(theory._Worker.run(os.getpid), signal.SIGKILL)
    again = theory.fit(2, 0.31, 2, 1)  # not BrokenProcessPool
    assert len(again["learned"]) == len(first["learned"])
    # the new worker stays for the Theory page's tests (starting one imports torch: seconds)


def test_theory_fits_are_kept_and_concurrent_asks_fit_once(monkeypatch):
    import threading

    from app import theory

    calls = []

    class Pool:
        def submit(self, fn, *args):
            calls.append(args)
            done = threading.Event()

            class Job:
                def result(self):
                    done.wait(0.2)  # slow enough that the other asks arrive meanwhile
                    return {"args": args}

            return Job()

    monkeypatch.setattr(theory._Worker, "get", classmethod(lambda cls: Pool()))
    monkeypatch.setattr(theory._Kept, "results", {})
    monkeypatch.setattr(theory._Kept, "pending", {})
    out = []
    threads = [threading.Thread(target=lambda: out.append(theory.fit(3, 0.25, 2, 7)))
               for _ in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(out) == 4 and all(o is out[0] for o in out)
    assert theory.fit(3, 0.25, 2, 7) is out[0] and len(calls) == 1
    theory.fit(3, 0.26, 2, 7)
    assert len(calls) == 2
    t = theory.prewarm()
    t.join(5)
    assert calls[-1] == (3, 0.2, 3, 0, 0.3) == (*theory.DEFAULTS.values(), 0.3)


def test_theory_identity_note_follows_the_numbers():
    from app import theory

    res = {"penalty": 10.0, "balanced": 10.0 * (1 - 1e-6), "observed": [3.0], "learned": [2.0]}
    assert "the two sides are equal" in theory.identity_note(res, 0.2)
    assert theory.zero_note(res, 3, 0.2) is None
    apart = {**res, "balanced": 8.0}
    assert "need not be equal" in theory.identity_note(apart, 0.0)
    assert "has not converged to balance" in theory.identity_note(apart, 0.2)
    zero = {**res, "penalty": 1e-60, "balanced": 0.9e-60, "learned": [1e-170]}
    assert "both sides are zero" in theory.identity_note(zero, 1.0)
    assert "N = 5, λ = 1 " in theory.zero_note(zero, 5, 1.0)


def test_every_export_of_a_run_has_its_own_file_name():
    cut = {"run": "r", "which": "best", "policy": "global", "value": 0.8, "ranks": {"fc1": 3}}
    budget = {**cut, "policy": "budget", "value": 20.0}
    table = {**cut, "policy": "ranks", "value": None}
    names = [
        ex.file_base("r"), ex.file_base("r", "last"), ex.file_base("r", "best", cut),
        ex.file_base("r", "best", cut, finetuned=True), ex.file_base("r", "last", budget),
        ex.file_base("r", "best", table),
        ex.file_base("r", "best", {**table, "ranks": {"fc1": 4}}),
    ]  # fmt: skip
    assert names[:5] == ["r", "r-last", "r-global0.80", "r-global0.80-finetuned",
                         "r-last-budget20.0"]  # fmt: skip
    assert names[5].startswith("r-ranks-") and len(set(names)) == len(names)


def test_fine_tuning_says_its_epoch_validation_and_time_left():
    from app import compress as cz_app

    class Session:
        task = "classification"

        def finetune(self, model, epochs, lr, callback=None):
            for k in range(1, epochs + 1):
                callback({"event": "finetune", "epoch": k, "val_acc": 0.5 + k / 10})
            return type("R", (), {"model": model, "val_acc": 0.8, "test_acc": 0.7})()

    said = []
    model, metrics = cz_app.finetune(Session(), "m", epochs=3, lr=1e-3,
                                     progress=lambda text, done: said.append((text, done)))  # fmt: skip
    assert model == "m" and metrics == {"val_acc": 0.8, "test_acc": 0.7}
    assert [d for _, d in said] == [1 / 3, 2 / 3, 1.0]
    assert said[0][0].startswith("Fine-tuning: epoch 1 of 3 · validation 60.0 %")
    assert "left" in said[0][0] and "left" not in said[-1][0]


def test_a_note_shown_as_a_sentence_keeps_the_field_it_starts_with():
    assert ui.sentence("init_from: the output layer 'fc' starts fresh") == (
        "init_from: the output layer 'fc' starts fresh."
    )
    assert ui.sentence("the preset's options were left out.") == (
        "The preset's options were left out."
    )
