"""Nothing lost on a refresh: each page opened again on the address it wrote comes back to
what it showed (the Train page's half-filled form, the Runs page's overlay, the Export
page's cut), and an address edited by hand falls back quietly, never an error."""

from __future__ import annotations

from app_seed import N1, N3, assert_clean, open_page

from app import presets, train_form, train_url


def refreshed(at, page: str):
    """The page opened again, in a new session, on the address ``at`` shows (a refresh)."""
    fresh = open_page(page, **dict(at.query_params))
    assert_clean(fresh)
    return fresh


def num(at, key: str):
    return at.number_input(key=key).value


# --- Train: a half-filled form ---------------------------------------------------------------


def test_train_a_half_filled_form_survives_a_refresh(empty_runs):
    """Epochs, N, weight decay and an options box edited, not started: the address keeps only
    those fields, and a refresh shows them (before, the form went back to the preset)."""
    at = open_page("train")
    assert_clean(at)
    at.number_input(key="train.epochs.classroom").set_value(7).run()
    at.number_input(key="train.n_factors.classroom").set_value(2).run()
    at.number_input(key="train.weight_decay.classroom").set_value(0.0123).run()
    at.text_input(key="train.model_kwargs.classroom").set_value("depth=3,width=16").run()
    assert_clean(at)
    assert {k: at.query_params[k] for k in at.query_params} == {
        "epochs": "7", "n_factors": "2", "weight_decay": "0.0123",
        "model_kwargs": "depth=3,width=16",
    }  # fmt: skip
    fresh = refreshed(at, "train")
    assert num(fresh, "train.epochs.classroom") == 7
    assert num(fresh, "train.n_factors.classroom") == 2
    assert num(fresh, "train.weight_decay.classroom") == 0.0123
    assert fresh.text_input(key="train.model_kwargs.classroom").value == "depth=3, width=16"
    assert num(fresh, "train.lr.classroom") == num(at, "train.lr.classroom")  # untouched
    at.number_input(key="train.epochs.classroom").set_value(15).run()  # back to the preset's
    assert "epochs" not in at.query_params


def test_train_a_changed_preset_and_its_edits_survive_a_refresh(empty_runs):
    at = open_page("train")
    at.selectbox(key="train.preset").set_value("planted").run()
    at.number_input(key="train.n_factors.planted").set_value(2).run()
    at.selectbox(key="train.device.planted").set_value("cpu").run()
    assert_clean(at)
    assert at.query_params["preset"] == "planted" and at.query_params["device"] == "cpu"
    fresh = refreshed(at, "train")
    assert fresh.selectbox(key="train.preset").value == "planted"
    assert num(fresh, "train.n_factors.planted") == 2
    assert fresh.selectbox(key="train.device.planted").value == "cpu"


def test_train_an_emptied_options_box_and_another_dataset_survive_a_refresh(empty_runs):
    at = open_page("train", preset="planted")
    at.text_input(key="train.dataset_kwargs.planted").set_value("").run()
    at.selectbox(key="train.dataset.planted").set_value("digits").run()
    assert_clean(at)
    assert at.query_params["dataset_kwargs"] == "" and at.query_params["dataset"] == "digits"
    fresh = refreshed(at, "train")
    assert fresh.text_input(key="train.dataset_kwargs.planted").value == ""
    assert fresh.selectbox(key="train.dataset.planted").value == "digits"


def test_train_a_form_shown_from_a_run_keeps_its_edits_over_the_run(runs_dir):
    """A page opened on a run shows its settings; an edit is kept against them, and the
    address needs no preset (a refresh opens on the run again)."""
    at = open_page("train", run=N3)
    assert at.caption and any(N3 in c.value for c in at.caption)
    (key,) = [k for k in at.session_state if str(k).startswith("train.epochs.")]
    at.number_input(key=key).set_value(5).run()
    assert_clean(at)
    assert at.query_params["epochs"] == "5" and "preset" not in at.query_params
    fresh = refreshed(at, "train")
    assert num(fresh, key) == 5


def test_train_an_edited_preset_form_is_not_replaced_by_the_followed_runs_settings(runs_dir):
    """Opened with no run, the form shows the classroom preset while the page follows a run of
    other settings: untouched, a refresh shows the run's settings (as always); edited, the
    address names the preset, and a refresh shows the preset with the edit."""
    at = open_page("train")
    assert at.query_params["run"] in (N3, N1) and "preset" not in at.query_params
    preset_box = presets.form_values("classroom")["model_kwargs"]
    at.number_input(key="train.epochs.classroom").set_value(4).run()
    assert_clean(at)
    assert at.query_params["preset"] == "classroom" and at.query_params["epochs"] == "4"
    fresh = refreshed(at, "train")
    assert num(fresh, "train.epochs.classroom") == 4
    shown = fresh.text_input(key="train.model_kwargs.classroom").value
    assert shown == train_form.option_text({"model_kwargs": preset_box}, "model_kwargs")
    assert shown != "depth=2, width=32"  # (the followed run's)


def test_train_a_hand_edited_address_falls_back_to_the_preset_quietly(empty_runs):
    """Every field wrong in its own way: each shows the preset's value, no error, and the
    address drops what the form does not show (a valid field is kept)."""
    at = open_page(
        "train", epochs="x", n_factors="99", lr="nan", seed="1_000", batch_size="1e3",
        model="nope", dataset="../x", device="tpu", init="random", plain_epochs="-1",
        model_kwargs="a b", weight_decay="0.5", preset="nope",
    )  # fmt: skip
    assert_clean(at)
    assert num(at, "train.epochs.classroom") == 15 and num(at, "train.n_factors.classroom") == 3
    assert num(at, "train.seed.classroom") == 0 and num(at, "train.weight_decay.classroom") == 0.5
    assert at.selectbox(key="train.init.classroom").value == "balanced"
    assert {k: at.query_params[k] for k in at.query_params} == {"weight_decay": "0.5"}


def test_train_url_text_reads_back_exactly():
    """A float is kept to its last digit; an int, options and a folder as the form holds them."""
    start = presets.form_values("classroom")
    form = {**start, "lr": 0.000123456789, "epochs": 3, "dataset": "folder:/data/my images",
            "model_kwargs": "width=8"}  # fmt: skip
    kept = train_url.changed(form, start)
    assert train_url.read(kept, "classroom") == {
        "lr": 0.000123456789, "epochs": 3, "dataset": "folder:/data/my images",
        "model_kwargs": {"width": 8},
    }  # fmt: skip


# --- Runs: the overlaid runs -----------------------------------------------------------------


def test_runs_the_overlaid_runs_survive_a_refresh(runs_dir):
    """One run picked of the two: a refresh overlays that one (before, the default pick of
    two came back); none picked stays none."""
    at = open_page("runs")
    assert set(at.multiselect(key="runs.pick").value) == {N3, N1}
    at.multiselect(key="runs.pick").set_value([N1]).run()
    assert_clean(at)
    assert at.query_params["overlay"] == N1
    assert refreshed(at, "runs").multiselect(key="runs.pick").value == [N1]
    at.multiselect(key="runs.pick").set_value([]).run()
    assert refreshed(at, "runs").multiselect(key="runs.pick").value == []


def test_runs_an_overlay_of_runs_not_there_falls_back_to_the_default(runs_dir):
    at = open_page("runs", overlay=["gone", "../x", N3, N3])
    assert_clean(at)
    assert at.multiselect(key="runs.pick").value == [N3]  # the one there, once
    at = open_page("runs", overlay=["gone"])
    assert_clean(at)
    assert set(at.multiselect(key="runs.pick").value) == {N3, N1}


# --- Export: the chosen cut ------------------------------------------------------------------


def test_export_the_cut_chosen_on_compress_survives_a_refresh(runs_dir):
    at = open_page("compress", run=N3)
    at.slider(key="compress.value.global").set_value(0.7).run()
    at.switch_page("pages/export.py").run()
    assert_clean(at)
    assert at.radio(key="export.model").value == "compressed"
    fresh = refreshed(at, "export")
    model = fresh.radio(key="export.model")
    assert model.value == "compressed"
    assert "0.7" in model.options[model.index]
