"""Small pieces of app/: presets, run choice, live spectra helpers, export glue."""

from __future__ import annotations

import pytest
from app_seed import N1, N3

from app import compress as cz
from app import export as ex
from app import live, presets, ui


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
    rows = [{"name": "b1", "N": 1}, {"name": "a3", "N": 3}, {"name": "c1", "N": 1}]
    assert cz.default_run(rows, "c1") == "c1"
    assert cz.default_run(rows, "gone") == "a3"
    assert cz.default_run([{"name": "b1", "N": 1}]) == "b1"
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


def test_formatting_helpers():
    assert ui.fmt_count(1234) == "1.23 k" and ui.fmt_count(12) == "12"
    assert ui.fmt_duration(75) == "1 min 15 s" and ui.fmt_duration(None) == "—"
    assert ui.fmt_pct(0.9312) == "93.1 %"
    assert ui.one_line(ValueError("lr: bad\nmore")) == "lr: bad"
    assert ui.one_line(KeyError("x")) == "KeyError: 'x'"


def test_context_and_apply_on_a_real_run(runs_dir):
    ctx = cz.load_context(N3, "best", runs_dir)
    assert set(ctx.parts) == {"val", "test"} and ctx.n_factors == 3
    full = cz.apply(ctx, cz.make_policy("uniform", 1.0))
    assert full["val_acc"] == pytest.approx(ctx.base["val_acc"])
    assert full["params_pct"] == pytest.approx(100.0)
    small = cz.apply(ctx, cz.make_policy("ranks", ranks={"fc1": 1, "fc2": 1}))
    assert small["ranks"]["fc1"] == 1 and small["params"] < full["params"]
    with pytest.raises(ValueError, match="ranks"):
        cz.apply(ctx, cz.make_policy("ranks", ranks={"fc1": 10_000}))
    assert cz.find_baseline(N3, runs_dir) == N1
    assert cz.find_baseline(N1, runs_dir) is None
