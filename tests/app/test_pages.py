"""Every page through Streamlit's AppTest, against a store seeded with real short digits runs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from app_seed import N1, N3, R1, R3, assert_clean, open_page, shown_charts
from streamlit.testing.v1 import AppTest

from app import presets, state


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def download_name(at: AppTest) -> str:
    """The file name the Export page's download button offers (its label names it)."""
    (button,) = at.get("download_button")
    return button.proto.label.removeprefix("Download ")


# --- home / theory ----------------------------------------------------------------------------


def test_home_shows_device_and_run_count(runs_dir):
    at = open_page()
    assert_clean(at)
    m = metrics(at)
    assert m["Runs"] == "2"
    assert m["Active runs"] == "0"
    assert "CPU" in m["Device for training"] or "cuda" in m["Device for training"]
    assert "LoRITa Explorer" in at.title[0].value


def test_theory_identity_and_rank_preference(empty_runs):
    at = open_page("theory")
    assert_clean(at)
    m = metrics(at)
    assert m["Σ‖Wᵢ‖² (learned factors)"] == m["N·Σσ^(2/N) (N=3)"]
    assert int(m["effective rank of W"]) == 3  # the planted rank
    at.slider(key="theory.n_factors").set_value(1).run()
    assert_clean(at)
    m = metrics(at)
    assert int(m["effective rank of W"]) > 3  # N=1 keeps the noise directions
    assert len(shown_charts(at)) == 1


def test_theory_settings_come_back_after_a_refresh_and_bad_ones_fall_back(empty_runs):
    at = open_page("theory")
    at.slider(key="theory.weight_decay").set_value(0.4).run()
    assert_clean(at)
    url = at.query_params["lambda"]
    assert url in ("0.4", ["0.4"])
    again = open_page("theory", n="4", rank="2", seed="7", **{"lambda": "0.4"})
    assert_clean(again)
    assert again.slider(key="theory.n_factors").value == 4
    assert again.slider(key="theory.weight_decay").value == 0.4
    assert again.slider(key="theory.rank").value == 2
    assert again.number_input(key="theory.seed").value == 7
    odd = open_page("theory", n="9", rank="x", seed="-1", **{"lambda": "nan"})
    assert_clean(odd)
    assert odd.slider(key="theory.n_factors").value == 3  # the defaults
    assert odd.slider(key="theory.weight_decay").value == 0.2


def test_theory_says_why_the_two_sides_differ_and_why_the_fit_is_zero(empty_runs):
    """The caption under the identity follows the numbers: equal sides at the default, not
    claimed equal without weight decay; a fit driven to zero says so and suggests a smaller λ."""
    at = open_page("theory")
    captions = " ".join(c.value for c in at.caption)
    assert "the two sides are equal" in captions and not at.warning
    at.slider(key="theory.n_factors").set_value(5)
    at.slider(key="theory.weight_decay").set_value(0.0).run()
    assert_clean(at)
    m = metrics(at)
    assert m["Σ‖Wᵢ‖² (learned factors)"] != m["N·Σσ^(2/N) (N=5)"]
    captions = " ".join(c.value for c in at.caption)
    assert "nothing pulls the factors towards balance" in captions
    assert "need not be equal" in captions and "sides are equal" not in captions
    assert not at.warning
    at.slider(key="theory.weight_decay").set_value(1.0).run()
    assert_clean(at)
    assert metrics(at)["effective rank of W"] == "0"
    (warning,) = [w.value for w in at.warning]
    assert "drive every singular value to zero" in warning and "smaller λ" in warning


# --- train ------------------------------------------------------------------------------------


def test_train_form_presets_fill_the_fields(empty_runs):
    at = open_page("train")
    assert_clean(at)
    assert at.selectbox(key="train.dataset.classroom").value == "digits"
    at.selectbox(key="train.preset").set_value("fashion").run()
    assert at.selectbox(key="train.dataset.fashion").value == "fashion_mnist"
    assert at.number_input(key="train.batch_size.fashion").value == 256
    assert at.number_input(key="train.plain_epochs.fashion").value == 5  # the measured recipe
    at.selectbox(key="train.preset").set_value("planted").run()
    assert at.selectbox(key="train.dataset.planted").value == "lowrank"
    at.selectbox(key="train.preset").set_value("classroom").run()
    assert (
        at.number_input(key="train.epochs.classroom").value == presets.config("classroom")["epochs"]
    )
    assert at.number_input(key="train.plain_epochs.classroom").value == 0
    assert "No runs yet" in " ".join(c.value for c in at.caption)


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("train.lr.classroom", 0.0, "lr"),
        ("train.epochs.classroom", 0, "epochs"),
        ("train.weight_decay.classroom", -1.0, "weight_decay"),
        ("train.plain_epochs.classroom", 15, "plain_epochs"),  # all 15 epochs plain
    ],
)
def test_train_bad_input_names_the_field(empty_runs, key, value, field):
    at = open_page("train")
    at.number_input(key=key).set_value(value)
    at.button(key="FormSubmitter:train.form-Start training").click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert errors and errors[0].startswith(f"Cannot start: {field}:"), errors
    assert not any(p.name[0] != "." for p in empty_runs.iterdir())  # nothing was started


def test_train_start_lists_every_invalid_field(empty_runs):
    at = open_page("train")
    at.number_input(key="train.epochs.classroom").set_value(0)
    at.number_input(key="train.lr.classroom").set_value(-1.0)
    at.number_input(key="train.weight_decay.classroom").set_value(-0.5)
    at.button(key="FormSubmitter:train.form-Start training").click().run()
    assert not at.exception
    fields = {e.value.split(":")[1].strip() for e in at.error}
    assert fields == {"epochs", "lr", "weight_decay"}, [e.value for e in at.error]


START = "FormSubmitter:train.form-Start training"


def test_train_start_lists_field_dataset_and_model_problems_in_one_press(empty_runs, monkeypatch):
    """A bad number, a bad dataset option and an unknown model option are listed together;
    before, each showed only once the ones before it were fixed."""
    from app import jobs

    monkeypatch.setattr(jobs, "start_pair", lambda c, b: pytest.fail("started"))
    at = open_page("train")
    at.number_input(key="train.n_factors.classroom").set_value(0)
    at.number_input(key="train.lr.classroom").set_value(-1.0)
    at.text_input(key="train.dataset_kwargs.classroom").set_value("size=abc")
    at.text_input(key="train.model_kwargs.classroom").set_value("bogus=1")
    at.button(key=START).click().run()
    assert not at.exception
    errors = " | ".join(e.value for e in at.error)
    for said in ("n_factors", "lr", "size", "bogus"):
        assert said in errors, errors


def test_train_the_preset_options_are_not_carried_to_another_model(empty_runs, monkeypatch):
    """Another model family gets an empty options box (the preset's MLP width is no option
    of a ResNet); a model changed inside the form leaves the preset's options out at Start and
    says so; an option typed for the new model is used, and a wrong one refused."""
    from app import jobs

    started = []
    monkeypatch.setattr(jobs, "start_pair", lambda c, b: started.append(c) or ("x", None))
    at = open_page("train")
    assert at.text_input(key="train.model_kwargs.classroom").value == "width=512"
    at.selectbox(key="train.family.classroom").set_value("torchvision").run()
    box = at.text_input(key="train.model_kwargs.classroom.torchvision")
    assert box.value == ""
    at.selectbox(key="train.model.classroom.torchvision").set_value("torchvision:resnet18")
    box.set_value("width=512")
    at.button(key=START).click().run()
    assert not started and any("'width'" in e.value for e in at.error), [e.value for e in at.error]
    at.text_input(key="train.model_kwargs.classroom.torchvision").set_value("")
    at.button(key=START).click().run()
    assert started[-1]["model"].startswith("torchvision:") and not started[-1].get("model_kwargs")

    at = open_page("train")  # the model changed inside the form: shown only at Start
    models = at.selectbox(key="train.model.classroom.built-in").options
    at.selectbox(key="train.model.classroom.built-in").set_value(
        next(m for m in models if m != "mlp")
    )
    at.button(key=START).click().run()
    assert "width" not in (started[-1].get("model_kwargs") or {})
    infos = [i.value for i in at.info]
    assert any("Model options width=512 are mlp's" in i and "left out" in i for i in infos), infos


def test_train_start_refuses_a_rejected_or_unreadable_upload(empty_runs, monkeypatch):
    """A file that is not weights reaches Start (the box filters no type, so the browser does not
    drop it and leave fresh weights): it is listed with the other invalid fields, by the name
    the user gave it, and nothing starts; so is a weights file that cannot be read."""
    from app import jobs

    started = []
    monkeypatch.setattr(jobs, "start_pair", lambda c, b: started.append((c, b)) or ("x", None))
    at = open_page("train")
    uploader = at.file_uploader(key="train.init_from.classroom")
    assert uploader.allowed_type == []
    uploader.set_value(("notes.txt", b"just text\n", "text/plain"))
    at.number_input(key="train.epochs.classroom").set_value(0)
    at.button(key=START).click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert "Cannot start: init_from: 'notes.txt' is not a weights file; allowed: " in errors[0]
    assert {e.split(":")[1].strip() for e in errors} == {"init_from", "epochs"}, errors
    at.number_input(key="train.epochs.classroom").set_value(1)
    at.file_uploader(key="train.init_from.classroom").set_value(
        ("mine.safetensors", b"not weights\n", "application/octet-stream")
    )
    at.button(key=START).click().run()
    assert not at.exception
    (error,) = [e.value for e in at.error]
    assert error.startswith("Cannot start: init_from: 'mine.safetensors' is neither"), error
    assert not started


def test_train_start_refuses_an_image_folder_for_another_dataset(empty_runs, tmp_path, monkeypatch):
    """A path in "Image folder" while the dataset is digits is refused (naming the field and
    both ways out), not ignored for a digits run; listed beside the other invalid fields."""
    from app import jobs

    started = []
    monkeypatch.setattr(jobs, "start_pair", lambda c, b: started.append((c, b)) or ("x", None))
    at = open_page("train")
    assert at.selectbox(key="train.dataset.classroom").value == "digits"
    at.text_input(key="train.dataset_path.classroom").set_value(str(tmp_path / "images"))
    at.number_input(key="train.lr.classroom").set_value(0.0)
    at.button(key=START).click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert {e.split(":")[1].strip() for e in errors} == {"image folder", "lr"}, errors
    (folder,) = [e for e in errors if e.startswith("Cannot start: image folder:")]
    assert "'digits'" in folder and "pick folder" in folder and "clear the image folder" in folder
    assert not started
    at.text_input(key="train.dataset_path.classroom").set_value("  ")  # cleared: digits it is
    at.number_input(key="train.lr.classroom").set_value(1e-3)
    at.button(key=START).click().run()
    assert_clean(at)
    assert started and started[0][0]["dataset"] == "digits"


def test_train_batch_size_help_says_what_0_means(empty_runs):
    at = open_page("train")
    field = at.number_input(key="train.batch_size.classroom")
    assert "0 = automatic" in field.help and "512 on a GPU, 128 on a CPU" in field.help


def test_train_missing_dataset_is_reported_on_start(empty_runs, tmp_path, monkeypatch):
    at = open_page("train")
    at.selectbox(key="train.dataset.classroom").set_value("folder")
    at.text_input(key="train.dataset_path.classroom").set_value(str(tmp_path / "no-such-folder"))
    at.button(key="FormSubmitter:train.form-Start training").click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert errors and errors[0].startswith("Cannot start: dataset"), errors
    assert "no-such-folder" in errors[0]
    assert not any(p.name[0] != "." for p in empty_runs.iterdir())


def test_train_refresh_shows_the_followed_runs_config(runs_dir):
    """A new session opened on ?run= (a browser refresh) fills the form from that run."""
    at = open_page("train", run=N3)
    assert_clean(at)
    seeded = f"classroom.{N3}"
    assert at.number_input(key=f"train.epochs.{seeded}").value == 3  # the tiny run's epochs
    assert at.number_input(key=f"train.batch_size.{seeded}").value == 64
    assert any(N3 in c.value for c in at.caption)


def test_train_starts_from_a_finished_runs_best_checkpoint(runs_dir, monkeypatch):
    """N=3 started from the N=1 run's weights (the plain network trained first)."""
    from app import jobs
    from lorita.runs import RunStore

    started = []

    def start_pair(config, baseline):
        started.append((config, baseline))
        return N3, None

    monkeypatch.setattr(jobs, "start_pair", start_pair)
    at = open_page("train", run=N3)
    pick = at.selectbox(key=f"train.init_run.classroom.{N3}")
    assert pick.value is None and set(pick.options) >= {N1, N3}  # shown by format_func
    pick.set_value(N1)
    at.button(key="FormSubmitter:train.form-Start training").click().run()
    assert_clean(at)
    (config, baseline), best = started[0], RunStore(runs_dir).get(N1).checkpoint("best")
    assert config["init_from"] == str(best.resolve()) and config["n_factors"] == 3
    assert baseline["init_from"] == config["init_from"] and baseline["n_factors"] == 1

    (runs_dir / N1 / "checkpoints" / "best.safetensors").unlink()
    at.run()
    assert N1 not in at.selectbox(key=f"train.init_run.classroom.{N3}").options
    with pytest.raises(ValueError, match=f"init_from: run '{N1}' has no best checkpoint"):
        jobs.start_point(N1)
    with pytest.raises(ValueError, match="init_from: no run named 'gone'"):
        jobs.start_point("gone")


def test_train_starts_with_plain_epochs_first(empty_runs, monkeypatch):
    from app import jobs

    started = []
    monkeypatch.setattr(jobs, "start_pair", lambda c, b: started.append((c, b)) or ("x", None))
    at = open_page("train")
    at.number_input(key="train.plain_epochs.classroom").set_value(4)
    at.button(key="FormSubmitter:train.form-Start training").click().run()
    assert_clean(at)
    ((config, baseline),) = started
    assert config["plain_epochs"] == 4 and config["n_factors"] == 3
    assert baseline["n_factors"] == 1  # its twin: the ordinary network all along


def test_train_options_boxes_pass_the_dataset_and_model_options(empty_runs, tmp_path, monkeypatch):
    """The options boxes show the preset's options; a folder's size and a torchvision model's
    width_mult typed there reach the run's config; the preset's MLP options are dropped once
    another model is picked; a bad item or option names the box or field and starts nothing."""
    from PIL import Image

    from app import jobs

    images = tmp_path / "images"
    for c in ("a", "b"):
        (images / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (20, 20), (60 * i, 0, 0) if c == "a" else (0, 0, 60 * i)).save(
                images / c / f"{i}.png"
            )
    started = []
    monkeypatch.setattr(jobs, "start_pair", lambda c, b: started.append((c, b)) or ("x", None))
    at = open_page("train")
    at.selectbox(key="train.preset").set_value("planted").run()
    assert at.text_input(key="train.model_kwargs.planted").value == "depth=2, width=64"
    assert at.text_input(key="train.dataset_kwargs.planted").value == "rank=5"
    at.selectbox(key="train.family.planted").set_value("torchvision").run()  # outside the form
    at.selectbox(key="train.dataset.planted").set_value("folder")
    at.text_input(key="train.dataset_path.planted").set_value(str(images))
    at.text_input(key="train.dataset_kwargs.planted").set_value("size=16, channels=1")
    at.selectbox(key="train.model.planted.torchvision").set_value("torchvision:mobilenet_v3_small")
    at.button(key="FormSubmitter:train.form-Start training").click().run()
    assert_clean(at)
    ((config, _),) = started
    assert config["dataset_kwargs"] == {"size": 16, "channels": 1}
    assert not config.get("model_kwargs")  # the preset's depth and width were the MLP's
    box = "train.model_kwargs.planted.torchvision"  # the torchvision family's own box
    at.text_input(key=box).set_value("width_mult=0.25, dropout=0.1")
    at.button(key="FormSubmitter:train.form-Start training").click().run()
    assert started[-1][0]["model_kwargs"] == {"width_mult": 0.25, "dropout": 0.1}
    for text, said in (
        ("width_mult", "Cannot start: model options: expected key=value, got 'width_mult'"),
        ("layers=[1, 1]", "Cannot start: model_kwargs: ['layers'] is not allowed"),
    ):
        at.text_input(key=box).set_value(text)
        at.button(key="FormSubmitter:train.form-Start training").click().run()
        assert not at.exception and len(started) == 2
        assert any(e.value.startswith(said) for e in at.error), [e.value for e in at.error]


def test_train_start_warns_when_a_folder_is_too_small_to_measure_on(
    empty_runs, tmp_path, monkeypatch
):
    from PIL import Image

    from app import jobs

    for c in ("a", "b"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(tmp_path / "images" / c / f"{i}.png")
    monkeypatch.setattr(jobs, "start_pair", lambda c, b: ("x", None))
    at = open_page("train")
    at.selectbox(key="train.dataset.classroom").set_value("folder")
    at.text_input(key="train.dataset_path.classroom").set_value(str(tmp_path / "images"))
    at.button(key="FormSubmitter:train.form-Start training").click().run()
    assert_clean(at)
    (warning,) = [w.value for w in at.warning]
    assert "too few to measure accuracy on" in warning and "val/ and test/" in warning


def test_train_follows_finished_run_from_the_url(runs_dir):
    at = open_page("train", run=N3)
    assert_clean(at)
    assert at.selectbox(key="train.follow").value == N3
    assert any("Completed" in s.value for s in at.success)
    charts = shown_charts(at)
    assert len(charts) == 5  # loss, accuracy, heatmap, spectra of every layer, effective rank
    layer = at.selectbox(key="train.layer")
    assert layer.options[0] == "fc1"
    layer.set_value(layer.options[-1]).run()
    assert_clean(at)


def test_a_run_still_starting_is_seen_by_a_refreshed_page_and_the_runs_page(runs_dir, monkeypatch):
    """Seconds after Start the child has no run folder yet: a refreshed Train page following
    an older run says another one is starting, and the Runs page lists it (not in its
    pickers: it has no folder to read)."""
    import json

    from app import jobs

    class Starting:  # a child still importing torch
        def poll(self):
            return None

    name = "digits-mlp-N3-20990101-000000"
    (runs_dir / jobs.APP_DIR).mkdir(exist_ok=True)
    jobs.app_file(name, ".json", runs_dir).write_text(json.dumps({"n_factors": 3, "epochs": 9}))
    monkeypatch.setitem(jobs._PROCS, (str(runs_dir), name), Starting())
    row = jobs.list_runs(runs_dir)[0]
    assert (row["name"], row["state"], row["n_factors"]) == (name, "starting", 3)

    at = open_page("train", run=N3)
    assert_clean(at)
    assert at.selectbox(key="train.follow").value == N3
    assert any(f"{name}** (starting)" in i.value for i in at.info)
    runs = open_page("runs")
    assert_clean(runs)
    assert any(f"Training now: **{name}** (starting" in i.value for i in runs.info)
    assert name not in runs.multiselect[0].options
    assert metrics(open_page())["Active runs"] == "1"


def test_train_a_refresh_while_the_run_is_starting_shows_its_settings(empty_runs, monkeypatch):
    """A refresh in the seconds before the child makes the run folder: the form shows the
    run's settings (from its request), not the preset's, and keeps following it (before, the
    form came back as the preset for the rest of the session)."""
    import json

    from app import jobs

    class Starting:  # a child still importing torch
        def poll(self):
            return None

    name = "digits-mlp-N3-20990101-000000"
    (empty_runs / jobs.APP_DIR).mkdir()
    config = {**presets.config("classroom"), "epochs": 9, "model_kwargs": {"width": 48}}
    jobs.app_file(name, ".json", empty_runs).write_text(json.dumps(config))
    monkeypatch.setitem(jobs._PROCS, (str(empty_runs), name), Starting())
    at = open_page("train", run=name)
    assert_clean(at)
    assert at.number_input(key=f"train.epochs.classroom.{name}").value == 9
    assert at.text_input(key=f"train.model_kwargs.classroom.{name}").value == "width=48"
    assert any(f"settings of run **{name}**" in c.value for c in at.caption)
    assert at.selectbox(key="train.follow").value == name


@pytest.mark.parametrize("page", ["compress", "export", "train"])
def test_a_page_asked_for_a_deleted_run_or_one_without_checkpoint_says_so(runs_dir, page):
    """The URL's run deleted (another tab) or without a checkpoint yet (queued): the page
    shows another run and says why, instead of switching silently."""
    import shutil

    if page != "train":
        shutil.rmtree(runs_dir / N3 / "checkpoints")
        (runs_dir / N3 / "checkpoints").mkdir()
        at = open_page(page, run=N3)
        assert_clean(at)
        # (a finished run: its checkpoint files are gone, not still to come)
        assert any(f"Run {N3} (completed) has no checkpoint to read" in i.value for i in at.info)
    shutil.rmtree(runs_dir / N3)
    at = open_page(page, run=N3)
    assert_clean(at)
    assert any(f"Run {N3} is not in the runs folder" in i.value for i in at.info), page
    if page != "train":  # the run shown deleted in another tab, then a click here
        shutil.copytree(runs_dir / N1, runs_dir / "other-n1")
        at = open_page(page, run="other-n1")
        shutil.rmtree(runs_dir / "other-n1")
        at.run()
        assert_clean(at)
        assert any("Run other-n1 is not in the runs folder" in i.value for i in at.info), page


def _failed(root: Path, name: str, message: str) -> None:
    """Mark run ``name`` failed with ``message``, as its training process would."""
    import json

    path = root / name / "status.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "state": "failed",
                                "message": message}))  # fmt: skip


def test_train_shows_a_failed_run_message(runs_dir):
    _failed(runs_dir, N1, "DatasetUnavailable: put the files in /somewhere")
    at = open_page("train", run=N1)
    assert not at.exception
    assert any("DatasetUnavailable: put the files" in e.value for e in at.error)
    # a run started from the command line has no app log: no pointer to a missing file
    assert not any("Full output of the training process" in c.value for c in at.caption)
    from app import jobs

    jobs.log_path(N1, runs_dir).parent.mkdir(exist_ok=True)
    jobs.log_path(N1, runs_dir).write_text("Traceback ...\nDatasetUnavailable: put the files\n")
    at = open_page("train", run=N1)
    assert any("Full output of the training process" in c.value for c in at.caption)


def test_train_says_why_the_n1_baseline_failed_after_making_its_folder(runs_dir):
    """The N=1 baseline crashed mid-run (its folder made): the page following the N=3 run
    says why, not only "failed" in the baseline's progress line."""
    _failed(runs_dir, N1, "NameError: name 'is_int' is not defined")
    at = open_page("train", run=N3)
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any(N1 in e and "NameError: name 'is_int'" in e for e in errors), errors


def test_train_a_run_that_ends_before_making_its_folder_keeps_its_failure(
    runs_dir, tmp_path, monkeypatch
):
    """MNIST not on this machine and no internet: Start says it will download, and the
    children exit (2) seconds later without a run folder. The page following the run then
    shows the line of its output that says what to do, as an error, never another run's
    "Completed"; so do a refresh and the Runs page, until Dismiss."""
    from app import jobs

    data = tmp_path / "no-data"
    data.mkdir()
    monkeypatch.setenv("LORITA_DATA", str(data))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # a download fails at once, offline
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    at = open_page("train")
    at.selectbox(key="train.dataset.classroom").set_value("mnist")
    at.button(key=START).click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("will download" in i.value for i in at.info)
    name = at.selectbox(key="train.follow").value
    baseline = jobs.baseline_of(name, runs_dir)
    assert name not in (N3, N1) and baseline
    for run in (name, baseline):
        assert jobs.wait(run, runs_dir, timeout=120) == 2
    assert not (runs_dir / name).exists()

    def says_what_to_do(page: AppTest) -> None:
        assert not page.exception
        errors = " ".join(e.value for e in page.error)
        assert "IDX files" in errors and str(data) in errors, errors
        assert "lorita: error" not in errors
        assert not any("Completed" in s.value for s in page.success)

    at.run()  # the live panel's next second, then the whole page
    assert at.selectbox(key="train.follow").value == name
    says_what_to_do(at)
    assert any(e.value.startswith("The run failed: dataset 'mnist'") for e in at.error)
    again = open_page("train", run=name)  # a refresh
    assert again.selectbox(key="train.follow").value == name
    says_what_to_do(again)
    runs = open_page("runs")
    says_what_to_do(runs)
    assert any(f"**{name}** failed before it began" in e.value for e in runs.error)
    table = runs.dataframe[0].value.set_index("run")
    assert table.loc[name, "state"] == table.loc[baseline, "state"] == "failed"
    assert name not in runs.multiselect(key="runs.pick").options
    assert name not in runs.selectbox(key="runs.delete").options

    at.button(key="train.dismiss").click().run()
    assert_clean(at)
    assert name not in at.selectbox(key="train.follow").options
    assert {r["name"] for r in jobs.list_runs(runs_dir)} == {N3, N1}
    assert not jobs.log_path(name, runs_dir).exists()


# --- runs -------------------------------------------------------------------------------------


def test_runs_table_overlay_and_delete(runs_dir):
    at = open_page("runs")
    assert_clean(at)
    table = at.dataframe[0].value
    assert set(table["run"]) == {N3, N1}
    pick = at.multiselect(key="runs.pick")
    pick.set_value([N3, N1]).run()
    assert_clean(at)
    assert len(shown_charts(at)) == 4
    ranks = at.dataframe[1].value
    assert list(ranks["N"]) == [3, 1]

    at.selectbox(key="runs.delete").set_value(N1).run()
    at.button(key="runs.delete_ask").click().run()
    assert any("cannot be undone" in w.value for w in at.warning)
    at.button(key="runs.delete_no").click().run()
    assert (runs_dir / N1).exists()
    at.selectbox(key="runs.delete").set_value(N1).run()
    at.button(key="runs.delete_ask").click().run()
    at.button(key="runs.delete_yes").click().run()
    assert_clean(at)
    assert not (runs_dir / N1).exists()
    assert set(at.dataframe[0].value["run"]) == {N3}


def test_a_run_that_trains_is_not_offered_for_deletion_and_a_refusal_is_drawn_whole(
    runs_dir, monkeypatch
):
    """A running run is not in the delete picker; one that started training again between
    the question and Yes is refused with its reason, and the confirmation goes away."""
    import json

    from app import jobs

    at = open_page("runs")
    at.selectbox(key="runs.delete").set_value(N1).run()
    at.button(key="runs.delete_ask").click().run()
    real = jobs.delete
    monkeypatch.setattr(jobs, "delete", lambda name: (_ for _ in ()).throw(
        ValueError(f"run {name!r} is running; stop it before deleting it")))  # fmt: skip
    at.button(key="runs.delete_yes").click().run()
    assert not at.exception
    assert any("is running; stop it before deleting it" in e.value for e in at.error)
    assert not any("cannot be undone" in w.value for w in at.warning)
    assert [b for b in at.button if b.key == "runs.delete_yes"] == []
    monkeypatch.setattr(jobs, "delete", real)

    status = runs_dir / N1 / "status.json"  # training in this process: its heartbeat goes on
    status.write_text(
        json.dumps({**json.loads(status.read_text()), "state": "running", "heartbeat": time.time()})
    )
    at = open_page("runs")
    assert N1 not in at.selectbox(key="runs.delete").options
    assert N3 in at.selectbox(key="runs.delete").options


def test_a_broken_run_folder_is_listed_beside_the_others(runs_dir):
    import shutil

    """A folder whose config.json is not JSON has no creation time; the table still shows
    every run, the broken one with its state."""
    (runs_dir / "broken").mkdir()
    (runs_dir / "broken" / "config.json").write_text("{garbage")
    at = open_page("runs")
    assert_clean(at)
    table = at.dataframe[0].value
    assert set(table["run"]) == {N3, N1, "broken"}
    created = dict(zip(table["run"], table["created"], strict=True))
    assert created["broken"] == "" and created[N3].startswith("20")
    # the newest folders broken (status.json unreadable: dated by their config's mtime, now):
    # the overlay opens on runs it can draw, not on them
    for name in ("broken2", "broken3"):
        shutil.copytree(runs_dir / N3, runs_dir / name)
        (runs_dir / name / "status.json").write_text("\x00garbage")
    at = open_page("runs")
    assert_clean(at)
    assert at.dataframe[0].value["run"][0].startswith("broken")  # the newest rows
    assert set(at.multiselect(key="runs.pick").value) == {N3, N1}


def test_runs_empty(empty_runs):
    at = open_page("runs")
    assert_clean(at)
    assert "No runs yet" in at.info[0].value


# --- compress ---------------------------------------------------------------------------------


def _folder_run(runs: Path, tmp_path: Path, monkeypatch, name: str):
    """(image folder, finished run) of a tiny MLP trained on two classes of 8x8 images."""
    import numpy as np
    from PIL import Image

    import lorita as lt
    from lorita.runs import RunStore

    monkeypatch.setenv("LORITA_DATA", str(tmp_path / "data"))  # the decoded folder's cache
    root = tmp_path / "imgs"
    for k, c in enumerate(("a", "b")):
        (root / c).mkdir(parents=True)
        for i in range(8):
            arr = np.full((8, 8, 3), 60 * k + 5 * i, dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    cfg = lt.TrainConfig(
        dataset=f"folder:{root}", dataset_kwargs={"size": 8}, model_kwargs={"width": 8},
        epochs=1, spectra_every=0,
    ).to_dict()  # fmt: skip
    run = RunStore(runs).create(cfg, name=name)
    assert lt.train(cfg, run)["state"] == "completed"
    return root, run


def test_compress_and_export_say_when_the_runs_folder_changed_since_it_trained(
    runs_dir, tmp_path, monkeypatch
):
    import numpy as np
    from PIL import Image

    root, _ = _folder_run(runs_dir, tmp_path, monkeypatch, "pics")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "b" / "new.png")
    for page in ("compress", "export"):
        at = open_page(page, run="pics")
        assert not at.exception and not at.error
        assert any("the folder changed since run 'pics'" in w.value for w in at.warning), page


def test_export_of_a_run_whose_images_are_gone_offers_it_as_trained(
    empty_runs, tmp_path, monkeypatch
):
    """A run copied without its images: the Export page says so and still writes the model as
    trained (no cut needs data), checked against the checkpoint's model on one input."""
    import torch

    import lorita as lt
    from app import export as ex

    root, run = _folder_run(empty_runs, tmp_path, monkeypatch, "away")
    root.rename(tmp_path / "elsewhere")
    at = open_page("export", run="away")
    assert not at.exception and not at.error
    assert any("does not exist" in w.value and "as trained" in w.value for w in at.warning)
    assert any("Reloaded from the file" in m.value for m in at.success)
    assert at.get("download_button")  # the file is offered
    for fmt in ("low_rank", "onnx"):
        built = ex.build_offline(run, "best", fmt)
        assert built.max_diff < 1e-5 and built.file_name.startswith("away")
    built = ex.build_offline(run, "best", "low_rank")
    path = tmp_path / built.file_name
    path.write_bytes(built.data)
    x = torch.randn(3, 3, 8, 8)
    want = lt.merge_model(run.load_model("best")).eval()(x)
    torch.testing.assert_close(lt.load(path).eval()(x), want, rtol=1e-4, atol=1e-5)


def test_compress_slider_changes_the_numbers(runs_dir):
    at = open_page("compress", run=N3)
    assert_clean(at)
    assert at.selectbox(key="compress.run").value == N3
    m0 = metrics(at)
    assert m0["Original validation accuracy"].endswith("%")
    slider = at.slider(key="compress.value.global")
    slider.set_value(0.9).run()
    assert_clean(at)
    m1 = metrics(at)
    assert m1["Parameters"] != m0["Parameters"]
    assert "% of original" in at.metric[6].delta
    # the trade-off chart (with the N=1 baseline's curve) and one chart of every cut layer's
    # spectrum (the output layer is left out of cuts, as the page says)
    charts = shown_charts(at)
    assert [c.key for c in charts] == ["compress.tradeoff", "compress.cut"]
    cut = charts[1].figure
    assert [t["name"] for t in cut["data"] if t["showlegend"]][0].startswith("fc1: keep ")
    assert len(cut["data"]) == 2 * 2  # kept and dropped of fc1 and fc2
    assert any("head" in c.value and "left out" in c.value for c in at.caption)

    at.radio(key="compress.policy").set_value("uniform").run()
    assert_clean(at)
    at.slider(key="compress.value.uniform").set_value(0.1).run()
    assert_clean(at)
    choice = at.session_state["compress_choice"]
    assert choice["policy"] == "uniform" and choice["ranks"]["fc1"] == 3


def test_the_run_picked_on_compress_and_export_comes_back_after_a_refresh(runs_dir):
    """The run picker writes ``?run=``: a refresh (a new session on the address) opens the
    run picked, not the newest one, and the other pages open on it too."""
    for page, key in (("compress", "compress.run"), ("export", "export.run")):
        at = open_page(page)
        assert at.selectbox(key=key).value == N3  # the newest composed run
        at.selectbox(key=key).set_value(N1).run()
        assert_clean(at)
        assert at.query_params["run"] == N1
        again = open_page(page, run=at.query_params["run"])
        assert_clean(again)
        assert again.selectbox(key=key).value == N1
        other = "export" if page == "compress" else "compress"
        at.switch_page(f"pages/{other}.py").run()
        assert at.selectbox(key=f"{other}.run").value == N1


def test_compress_on_a_run_still_training_opens_at_once_and_says_so(runs_dir):
    """A run still training is cut as its checkpoint is now, at once: the page waits for a
    trade-off curve only in the seconds after a run completes, while its process keeps it."""
    import time

    from filelock import FileLock

    from app import compress as cz
    from lorita.io import read_json, write_json
    from lorita.runs import WRITER_LOCK

    status = runs_dir / N3 / "status.json"
    done = read_json(status)
    training = {**done, "state": "running", "host": "elsewhere", "heartbeat": time.time(),
                "step": 5, "total_steps": 40}  # fmt: skip
    write_json(status, training)
    writer = FileLock(str(runs_dir / N3 / WRITER_LOCK), thread_local=False)
    writer.acquire()  # its training process, alive
    try:
        assert not cz.curve_being_kept(N3, runs_dir)
        t0 = time.perf_counter()
        at = open_page("compress", run=N3)
        assert_clean(at)
        assert time.perf_counter() - t0 < 60  # it waited up to 120 s for the process
        assert any("still running (step 5 of 40)" in i.value for i in at.info)
        assert "Original validation accuracy" in metrics(at)
        at = open_page("export", run=N3)  # the Export page says so too
        assert_clean(at)
        assert any("still running" in i.value and "not the run's final" in i.value
                   for i in at.info)  # fmt: skip
        write_json(status, {**done, "host": "elsewhere"})
        assert cz.curve_being_kept(N3, runs_dir)  # completed, its process keeping curves
    finally:
        writer.release()


def test_compress_policy_and_slider_come_back_after_a_refresh(runs_dir):
    from app import compress as cz

    at = open_page("compress", run=N3)
    at.radio(key="compress.policy").set_value("uniform").run()
    at.slider(key="compress.value.uniform").set_value(0.3).run()
    assert_clean(at)
    url = {k: at.query_params[k] for k in ("run", "policy", "value")}
    assert url == {"run": N3, "policy": "uniform", "value": "0.3"}
    again = open_page("compress", **url)  # a refresh: a new session on the same URL
    assert_clean(again)
    assert again.radio(key="compress.policy").value == "uniform"
    assert again.slider(key="compress.value.uniform").value == pytest.approx(0.3)
    assert (
        again.session_state["compress_choice"]["ranks"]
        == at.session_state["compress_choice"]["ranks"]
    )
    default = cz.snap("global", cz.scalar_policies()["global"]["default"])
    for bad in ({"policy": "evil", "value": "0.3"}, {"policy": "global", "value": "nan"},
                {"policy": "global", "value": "1e9"}, {"policy": "global", "value": "x"}):  # fmt: skip
        page = open_page("compress", run=N3, **bad)
        assert_clean(page)
        assert page.radio(key="compress.policy").value == "global"
        assert page.slider(key="compress.value.global").value == pytest.approx(default)


def test_compress_smallest_within_moves_the_slider(runs_dir):
    from app import compress as cz

    at = open_page("compress", run=N3)
    at.slider(key="compress.value.global").set_value(0.97).run()
    at.number_input(key="compress.max_drop").set_value(5.0).run()
    at.button[0].click().run()  # "Smallest model within X points"
    assert_clean(at)
    want = cz.smallest_within(cz.session(N3, "best", runs_dir), "global", 5.0)
    assert at.slider(key="compress.value.global").value == pytest.approx(want)
    m = metrics(at)
    drop = float(m["Original validation accuracy"][:-2]) - float(m["Validation accuracy"][:-2])
    assert drop <= 5.0 + 1e-6


def test_compress_rank_table(runs_dir):
    at = open_page("compress", run=N3, policy="global", value="0.5")
    at.radio(key="compress.policy").set_value("ranks").run()
    assert_clean(at)
    assert at.query_params["policy"] == "ranks" and "value" not in at.query_params
    assert [c.key for c in shown_charts(at)] == ["compress.cut"]  # no trade-off curve
    assert any("sweeps a policy's range" in i.value for i in at.info)


def test_compress_a_run_without_a_best_checkpoint_opens_its_last(runs_dir):
    # a run stopped before its first validation has a last checkpoint and no best
    (runs_dir / N3 / "checkpoints" / "best.safetensors").unlink()
    at = open_page("compress", run=N3)
    assert_clean(at)
    assert at.radio(key="compress.which").value == "last"
    assert not at.warning and "compress.tradeoff" in [c.key for c in shown_charts(at)]


def test_compress_without_runs_points_to_train(empty_runs):
    at = open_page("compress")
    assert_clean(at)
    assert "No run with a checkpoint yet" in at.info[0].value


# --- export -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["low_rank", "dense", "onnx"])
def test_export_reloads_to_the_same_accuracy(runs_dir, fmt):
    at = open_page("export", run=N3)
    assert_clean(at)
    at.radio(key="export.format").set_value(fmt).run()
    assert_clean(at)
    m = metrics(at)
    assert m["Test accuracy before saving"] == m["Test accuracy after reloading"]
    assert at.get("download_button")
    assert "lt.load" in at.code[0].value or "onnxruntime" in at.code[0].value


def test_export_compressed_choice_from_compress_page(runs_dir):
    at = open_page("compress", run=N3)
    at.slider(key="compress.value.global").set_value(0.8).run()
    at.switch_page("pages/export.py").run()
    assert_clean(at)
    assert at.radio(key="export.model").value == "compressed"
    assert "Global" in at.radio(key="export.model").options[1]
    names = {}  # (model, format) -> the downloaded file's name
    for model in ("compressed", "full"):
        at.radio(key="export.model").set_value(model).run()
        for fmt in ("low_rank", "dense", "onnx"):
            at.radio(key="export.format").set_value(fmt).run()
            assert_clean(at)
            names[model, fmt] = download_name(at)
    assert names["full", "low_rank"] == f"{N3}-lowrank.safetensors"
    assert names["compressed", "low_rank"] == f"{N3}-global0.80-lowrank.safetensors"
    assert names["compressed", "dense"] == f"{N3}-global0.80-dense.safetensors"
    assert names["compressed", "onnx"] == f"{N3}-global0.80.onnx"
    assert len(set(names.values())) == len(names)  # one name per file


def test_a_budget_cut_and_its_fine_tuned_model_export_in_every_format(runs_dir):
    """A budget counts thin layers, but the dense format is the original architecture: it is
    written with the cut's own ranks (it was refused with a library message about form=)."""
    at = open_page("compress", run=N3)
    at.radio(key="compress.policy").set_value("budget").run()
    at.slider(key="compress.value.budget").set_value(20.0).run()
    at.number_input(key="compress.ft_epochs").set_value(1).run()
    at.button(key="compress.ft_go").click().run()
    at.switch_page("pages/export.py").run()
    for model in ("compressed", "finetuned"):
        at.radio(key="export.model").set_value(model).run()
        for fmt in ("dense", "low_rank", "onnx"):
            at.radio(key="export.format").set_value(fmt).run()
            assert_clean(at)
            assert download_name(at).startswith(f"{N3}-budget20.0"), (model, fmt)


def test_a_refreshed_export_page_still_exports_the_cut(runs_dir):
    """The cut chosen on the Compress page is in the Export page's address: a refresh (a new
    session) offers and builds the same cut; a hostile address is ignored."""
    at = open_page("compress", run=N3)
    at.slider(key="compress.value.global").set_value(0.8).run()
    at.switch_page("pages/export.py").run()
    ranks = at.session_state["compress_choice"]["ranks"]
    url = dict(at.query_params)
    assert (url["run"], url["policy"], url["value"], url["which"]) == (N3, "global", "0.8", "best")
    fresh = open_page("export", **url)  # what a refresh sends
    assert_clean(fresh)
    assert fresh.radio(key="export.model").value == "compressed"
    assert fresh.session_state["compress_choice"]["ranks"] == ranks
    assert metrics(fresh) == metrics(at)  # the same file: accuracy and size
    for bad in ({"policy": "global", "value": "7"}, {"policy": "evil", "value": "0.5"},
                {"policy": "global", "value": "0.5", "which": "../x"}):  # fmt: skip
        page = open_page("export", run=N3, **bad)
        assert_clean(page)
        assert len(page.radio(key="export.model").options) == 1  # as trained only


def test_pages_show_errors_not_tracebacks(tmp_path, monkeypatch):
    bad = tmp_path / "not-a-folder"
    bad.write_text("x")
    monkeypatch.setenv("LORITA_RUNS", str(bad))
    for page in ("runs", "compress", "export", "train"):
        at = open_page(page)
        assert not at.exception, page
        assert at.error, page
        assert "Traceback" not in at.error[0].value


def test_compress_finetune_then_export_the_tuned_model(runs_dir):
    at = open_page("compress", run=N3)
    at.slider(key="compress.value.global").set_value(0.9).run()
    at.number_input(key="compress.ft_epochs").set_value(1).run()
    at.button(key="compress.ft_go").click().run()
    assert_clean(at)
    assert any("Fine-tuned" in s.value for s in at.success)
    at.switch_page("pages/export.py").run()
    assert_clean(at)
    models = at.radio(key="export.model")
    assert "Compressed and fine-tuned on the Compress page" in models.options
    models.set_value("finetuned").run()
    assert_clean(at)
    m = metrics(at)
    assert m["Test accuracy before saving"] == m["Test accuracy after reloading"]
    assert download_name(at) == f"{N3}-global0.90-finetuned-lowrank.safetensors"
    models.set_value("compressed").run()
    assert download_name(at) == f"{N3}-global0.90-lowrank.safetensors"


def test_train_live_panel_stop_button(runs_dir):
    """A run that is training shows progress with a Stop button; Stop asks the run to stop."""
    import json
    import os
    import time

    path = runs_dir / N3 / "status.json"
    st = json.loads(path.read_text())
    now = time.time()
    st.update(state="running", pid=os.getpid(), heartbeat=now, started=now - 10, ended=None,
              step=50, total_steps=200)  # fmt: skip
    path.write_text(json.dumps(st))
    at = open_page("train", run=N3)
    assert_clean(at)
    bar = at.get("progress")[0]
    assert "step 50/200" in bar.proto.text and "left" in bar.proto.text
    at.button(key="train.stop").click().run()
    assert not at.exception
    assert (runs_dir / N3 / "STOP").exists()
    assert [t.value for t in at.toast] == [
        "Stop requested: a run ends after its current step, with a checkpoint."
    ]


def test_stop_clicked_as_the_run_ends_says_it_had_ended(runs_dir):
    """The Stop button drawn while the run trained, clicked after it completed: the click
    was lost without a word (the redrawn panel has no button); it says the run had ended and
    asks nothing of it."""
    import json
    import os
    import time

    path = runs_dir / N3 / "status.json"
    done = json.loads(path.read_text())
    now = time.time()
    path.write_text(json.dumps({**done, "state": "running", "pid": os.getpid(), "heartbeat": now,
                                "started": now - 10, "ended": None}))  # fmt: skip
    at = open_page("train", run=N3)
    stop = at.button(key="train.stop")
    path.write_text(json.dumps(done))  # it completes meanwhile
    stop.click().run()
    assert_clean(at)
    assert [t.value for t in at.toast] == [f"{N3} had already ended: nothing to stop."]
    assert not (runs_dir / N3 / "STOP").exists()
    assert [b for b in at.button if b.key == "train.stop"] == []


def test_compress_budget_axis_and_the_baselines(runs_dir):
    """The Budget policy's slider, and the three methods (LoRITa cut, SVD cut and L1 pruning
    of the N=1 run) at 5-50 % and at the slider's budget."""
    at = open_page("compress", run=N3)
    at.radio(key="compress.policy").set_value("budget").run()
    assert_clean(at)
    at.slider(key="compress.value.budget").set_value(20.0).run()
    assert_clean(at)
    assert "% of original" in at.metric[6].delta
    pct = float(at.metric[6].delta.split()[0])
    assert pct <= 20.0 + 1e-6  # the budget is met
    at.toggle(key="compress.compare").set_value(True).run()
    assert_clean(at)
    table = at.dataframe[-1].value
    assert len(table) == 3 and all(table["params %"] <= 20.0 + 0.5)
    (chart,) = [c.figure for c in shown_charts(at) if c.key == "compress.compare_chart"]
    low = min(v for trace in chart["data"] for v in trace["y"])
    shown = chart["layout"]["yaxis"].get("range")
    assert shown is None or shown[0] <= low or chart["layout"].get("annotations")
    from app import compress as cz

    assert cz.stored_comparison(N3, N1, "best", "params", runs_dir) is not None
    url = at.query_params["compare"]
    assert url == "1" or url == ["1"]  # a refresh comes back to the comparison:
    again = open_page("compress", run=N3, policy="budget", value="20", compare="1")
    assert_clean(again)
    assert again.toggle(key="compress.compare").value


def test_train_start_run_again_by_a_rerun_starts_nothing_twice(empty_runs, monkeypatch):
    """Streamlit runs the page again with Start still pressed when a rerun cuts the run that
    started a pair; the same settings within seconds start nothing more, and say so; a
    further press starts another run."""
    from app import jobs

    started = []
    monkeypatch.setattr(jobs, "start_pair",
                        lambda c, b: started.append(c) or (f"r{len(started)}", None))  # fmt: skip
    at = open_page("train")
    start = "FormSubmitter:train.form-Start training"
    at.button(key=start).click().run()
    at.button(key=start).click().run()
    assert_clean(at)
    assert len(started) == 1
    assert any("r1 was started with these settings" in i.value for i in at.info)
    at.button(key=start).click().run()
    assert len(started) == 2


def test_train_start_says_when_a_pretrained_head_starts_fresh(empty_runs, tmp_path):
    """Weights for another number of classes load into every layer but the output layer:
    Start says so at once (before, only a caption once the run trained)."""
    import torch

    import lorita as lt
    from app import presets, train_form

    config = presets.config("classroom")
    other = lt.create_model("mlp", in_channels=1, image_size=8, num_classes=5,
                            **config["model_kwargs"])  # fmt: skip
    torch.save(other.state_dict(), tmp_path / "five.pt")
    notes: list[str] = []
    assert (
        train_form.check("classroom", {**config, "init_from": str(tmp_path / "five.pt")}, notes)
        == []
    )
    (note,) = notes
    assert "has 5 outputs in the file and 10 in this model" in note and "fresh init" in note


def test_compress_says_the_baseline_has_no_checkpoint_yet(runs_dir):
    """A baseline that was started (and stopped before its first checkpoint) is named, not
    "tick also train N=1", which was ticked."""
    import shutil

    shutil.rmtree(runs_dir / N1 / "checkpoints")
    (runs_dir / N1 / "checkpoints").mkdir()
    at = open_page("compress", run=N3)
    assert_clean(at)
    captions = " ".join(c.value for c in at.caption)
    assert f"Its N=1 baseline **{N1}** has no checkpoint yet" in captions, captions
    assert "Tick" not in captions


def test_train_a_form_filled_from_a_run_says_which_weights_it_started_from(runs_dir):
    """The upload box cannot be put back: the form says the followed run started from a file
    and that Start would start fresh."""
    import json

    config = json.loads((runs_dir / N3 / "config.json").read_text())
    (runs_dir / N3 / "config.json").write_text(json.dumps({**config, "init_from": "/x/mine.pt"}))
    at = open_page("train", run=N3)
    assert_clean(at)
    captions = " ".join(c.value for c in at.caption)
    assert "started from the weights `mine.pt`" in captions and "fresh weights" in captions


def test_train_a_refreshed_form_names_an_uploaded_file_as_the_user_did(runs_dir):
    """A run started from an upload: after a refresh the caption names the file as uploaded
    (``my resnet.pt``), not as the runs folder keeps it (its SHA-256)."""
    import json

    from app import train_form

    kept = train_form.save_upload("my resnet.pt", b"weights", runs_dir)
    config = json.loads((runs_dir / N3 / "config.json").read_text())
    (runs_dir / N3 / "config.json").write_text(json.dumps({**config, "init_from": str(kept)}))
    at = open_page("train", run=N3)
    assert_clean(at)
    captions = " ".join(c.value for c in at.caption)
    assert "started from the weights `my resnet.pt`" in captions and kept.stem not in captions


def test_train_start_says_where_the_weights_come_from(empty_runs, tmp_path, monkeypatch):
    """A file over the upload limit is refused by the browser alone, and Start would start
    fresh without a word: the box's help says the limit and the way past it, and Start's
    toast says which weights the run starts from."""
    import io

    import torch

    import lorita as lt
    from app import jobs

    monkeypatch.setattr(jobs, "start_pair", lambda c, b: ("x", "x1"))
    at = open_page("train")
    uploader = at.file_uploader(key="train.init_from.classroom")
    assert "At most 100 MB" in uploader.help and "--init-from FILE" in uploader.help
    at.button(key=START).click().run()
    assert_clean(at)
    assert [t.value for t in at.toast] == ["Started x and its N=1 baseline x1 from fresh weights"]
    config = presets.config("classroom")
    plain = lt.create_model("mlp", in_channels=1, image_size=8, num_classes=10,
                            **config["model_kwargs"])  # fmt: skip
    buf = io.BytesIO()
    torch.save(plain.state_dict(), buf)
    at = open_page("train")
    at.file_uploader(key="train.init_from.classroom").set_value(
        ("mine.pt", buf.getvalue(), "application/octet-stream")
    )
    at.button(key=START).click().run()
    assert_clean(at)
    assert at.toast[0].value.endswith("from the weights `mine.pt`"), at.toast[0].value


def test_train_a_url_run_name_that_names_no_run_is_ignored(runs_dir):
    """``?run=../../etc`` cannot name a run: the page follows another run, as for a name
    that is not in the runs folder (before, an error replaced the follow panel)."""
    at = open_page("train", run="../../etc")
    assert_clean(at)
    assert not any("run name" in e.value for e in at.error)


def test_train_a_refused_upload_is_not_kept_and_uploads_do_not_race(empty_runs, tmp_path):
    """A file whose Start was refused leaves the runs folder; the same file uploaded by
    several sessions at once is kept once, without a failed rename."""
    import threading

    from app import train_form

    at = open_page("train")
    at.file_uploader(key="train.init_from.classroom").set_value(
        ("mine.pt", b"not weights at all\n", "application/octet-stream")
    )
    at.button(key=START).click().run()
    assert any("init_from" in e.value for e in at.error)
    uploads = empty_runs / ".app" / train_form.UPLOAD_DIR
    assert not uploads.exists() or not any(uploads.iterdir())
    data, errors = b"x" * 5_000_000, []

    def save():
        try:
            train_form.save_upload("a.pt", data, empty_runs)
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=save) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sha = __import__("hashlib").sha256(data).hexdigest()
    assert not errors and sorted(p.name for p in uploads.iterdir()) == [
        f"{sha}.pt",
        f"{sha}.pt.name",
    ]


def test_start_refuses_more_children_than_the_slots_and_the_waiting_room(empty_runs, monkeypatch):
    """Each waiting child holds torch in memory: Start presses cannot add up without end."""
    from app import jobs

    class Alive:
        def poll(self):
            return None

    monkeypatch.setattr(jobs, "_PROCS", {("r", str(i)): Alive() for i in range(jobs.MAX_WAITING)})
    config = presets.config("classroom")
    with pytest.raises(ValueError, match=r"Start: 8 runs started here are still"):
        jobs.start_pair(config, presets.baseline_config(config), root=empty_runs)
    assert not any(p.name[0] != "." for p in empty_runs.iterdir())


def test_compress_says_when_a_budget_cannot_be_met(runs_dir):
    """A 1 % budget below what no cut shrinks keeps more than 1 %: the page says so."""
    at = open_page("compress", run=N3, policy="budget", value="1")
    assert_clean(at)
    warned = [w.value for w in at.warning if "budget cannot be met" in w.value]
    assert warned and "every layer at rank 1" in warned[0], [w.value for w in at.warning]


def test_export_format_comes_back_after_a_refresh(runs_dir):
    at = open_page("export", run=N3)
    at.radio(key=state.EXPORT_FORMAT).set_value("onnx").run()
    assert at.query_params["format"] == ["onnx"] or at.query_params["format"] == "onnx"
    again = open_page("export", run=N3, format="onnx")  # the refreshed page's URL
    assert_clean(again)
    assert again.radio(key=state.EXPORT_FORMAT).value == "onnx"


# --- a regression run: its score is R², never a percentage accuracy ----------------------------


def _no_percent_axis(figure: dict) -> None:
    """An R² axis: no percent ticks, and not clamped to [0, 1] (R² can be negative)."""
    yaxis = figure["layout"]["yaxis"]
    assert "%" not in yaxis.get("tickformat", ""), yaxis
    assert "autorangeoptions" not in yaxis, yaxis
    assert "R²" in yaxis["title"]["text"], yaxis


def test_runs_page_shows_a_regressions_r2_as_it_is(regression_runs, seeded_store):
    """The table's score columns of a regression are R² as it is ('0.874', not '87.40 %'),
    beside the accuracy columns of classification runs; the overlay draws R² on its own axis."""
    import json
    import shutil

    from lorita.runs import RunStore

    best = {n: RunStore(regression_runs).get(n).summary()["best_val_acc"] for n in (R3, R1)}
    at = open_page("runs")
    assert_clean(at)
    table = at.dataframe[0].value
    assert "best val acc" not in table.columns and "test acc" not in table.columns
    got = dict(zip(table["run"], table["best val R²"], strict=True))
    assert got == pytest.approx(best)  # not in percent
    formats = json.loads(at.dataframe[0].proto.columns)
    assert formats["best val R²"]["type_config"]["format"] == "%.3f"
    assert formats["test R²"]["type_config"]["format"] == "%.3f"
    charts = {c.key: c.figure for c in shown_charts(at)}
    acc = charts["runs.chart.acc"]
    assert acc["layout"]["title"]["text"] == "Validation R²"
    _no_percent_axis(acc)

    for name in (N3, N1):  # beside classification runs: a pair of columns each
        shutil.copytree(seeded_store / name, regression_runs / name)
    at = open_page("runs")
    assert_clean(at)
    table = at.dataframe[0].value.set_index("run")
    assert table.loc[N3, "best val acc"] > 1 and table.loc[R3, "best val R²"] == pytest.approx(
        best[R3]
    )
    assert table[["best val R²", "test R²"]].loc[[N3, N1]].isna().all().all()
    assert table[["best val acc", "test acc"]].loc[[R3, R1]].isna().all().all()
    formats = json.loads(at.dataframe[0].proto.columns)
    assert formats["best val acc"]["type_config"]["format"] == "%.1f %%"
    at.multiselect(key="runs.pick").set_value([N3, R3]).run()
    assert_clean(at)
    charts = {c.key: c.figure for c in shown_charts(at)}
    assert charts["runs.chart.acc.classification"]["layout"]["yaxis"]["tickformat"] == ".0%"
    _no_percent_axis(charts["runs.chart.acc.regression"])


def test_compress_page_shows_a_regressions_r2_as_it_is(regression_runs):
    """Metrics, deltas, the run picker, "within X points" (a point of R² is 0.01), the
    trade-off and comparison charts, the at-budget table and the fine-tuned model: R², with
    no percent sign anywhere."""
    from app import compress as cz
    from lorita.scores import score_of

    at = open_page("compress", run=R3)
    assert_clean(at)
    session = cz.session(R3, "best", regression_runs)
    r2 = score_of("regression")
    m = metrics(at)
    assert m["Original validation R²"] == r2.text(session.base["val_acc"], 1)
    assert "Original validation accuracy" not in m and not any("%" in m[k] for k in m if "R²" in k)
    deltas = {x.label: x.delta for x in at.metric}
    assert "pts" not in deltas["Validation R²"] and "%" not in deltas["Validation R²"]
    pick = at.selectbox(key="compress.run")
    assert pick.format_func(R3).endswith(f"val {r2.short} {r2.text(session.base['val_acc'], 1)})")
    drop = at.number_input(key="compress.max_drop")
    assert "R²" in drop.label and "0.01" in drop.label and "accuracy" not in drop.label
    (chart,) = [c.figure for c in shown_charts(at) if c.key == "compress.tradeoff"]
    assert chart["layout"]["title"]["text"].startswith("Trade-off: validation R² against")
    assert all("%{y:.2%}" not in t["hovertemplate"] for t in chart["data"])
    _no_percent_axis(chart)

    drop.set_value(5.0).run()
    at.button[0].click().run()  # "Smallest model within X points": 5 hundredths of R²
    assert_clean(at)
    m = metrics(at)
    assert float(m["Original validation R²"]) - float(m["Validation R²"]) <= 0.05 + 1e-3

    at.radio(key="compress.policy").set_value("budget").run()
    at.slider(key="compress.value.budget").set_value(35.0).run()
    at.toggle(key="compress.compare").set_value(True).run()
    assert_clean(at)
    (chart,) = [c.figure for c in shown_charts(at) if c.key == "compress.compare_chart"]
    assert chart["layout"]["title"]["text"].startswith("Test R² of each method")
    _no_percent_axis(chart)
    table = at.dataframe[-1].value
    assert {"val R²", "test R²"} <= set(table.columns) and "val acc %" not in table.columns
    assert (table["test R²"] <= 1).all()

    at.number_input(key="compress.ft_epochs").set_value(1).run()
    at.button(key="compress.ft_go").click().run()
    assert_clean(at)
    (done,) = [s.value for s in at.success if "Fine-tuned" in s.value]
    assert "validation R² " in done and "test R² " in done and "%" not in done, done


@pytest.mark.parametrize("fmt", ["low_rank", "dense", "onnx"])
def test_export_of_a_regression_reloads_to_the_same_r2(regression_runs, fmt):
    """R² as it is, and the same after reloading (it is continuous: within a rounding, not
    "differs by 0.00 points ... borderline predictions"); the shown code gives the outputs."""
    at = open_page("export", run=R3)
    at.radio(key="export.format").set_value(fmt).run()
    assert_clean(at)
    m = metrics(at)
    assert m["Test R² before saving"] == m["Test R² after reloading"]
    assert "%" not in m["Test R² before saving"]
    assert not at.warning, [w.value for w in at.warning]
    (said,) = [s.value for s in at.success]
    assert said.startswith("Reloaded from the file: validation R² 0.") and "%" not in said
    code = at.code[0].value
    assert "argmax" not in code and "out = " in code


def test_train_page_shows_a_regressions_r2(regression_runs):
    at = open_page("train", run=R3)
    assert_clean(at)
    (done,) = [s.value for s in at.success]
    assert done.startswith("Completed. Best validation R² 0.") and "%" not in done, done
    assert "test R² of that checkpoint 0." in done
    (acc,) = [c.figure for c in shown_charts(at) if c.key == "train.chart.acc"]
    assert acc["layout"]["title"]["text"] == "R²"
    _no_percent_axis(acc)


# --- the app's settings -----------------------------------------------------------------------


@pytest.mark.parametrize("page", ["home", "train", "runs", "compress", "export"])
def test_a_runs_folder_that_is_a_file_is_named_on_every_page(page, tmp_path, monkeypatch):
    """$LORITA_RUNS naming a file: each page says so and what to do, never a traceback."""
    path = tmp_path / "runs.txt"
    path.write_text("notes")
    monkeypatch.setenv("LORITA_RUNS", str(path))
    at = open_page(page)
    assert not at.exception, [e.value for e in at.exception]
    (error,) = [e.value for e in at.error]
    assert str(path) in error and "is a file, not a folder" in error and "LORITA_RUNS" in error
    assert path.read_text() == "notes"


def test_the_theory_page_needs_no_runs_folder(tmp_path, monkeypatch):
    path = tmp_path / "runs.txt"
    path.write_text("notes")
    monkeypatch.setenv("LORITA_RUNS", str(path))
    at = open_page("theory")
    assert_clean(at)


def test_a_setting_that_is_not_a_number_is_named_and_the_app_goes_on(runs_dir, monkeypatch):
    monkeypatch.setenv("LORITA_MAX_CONCURRENT", "two")
    monkeypatch.setenv("LORITA_TRAIN_NICE", "40")
    at = open_page("runs")
    assert not at.exception and not at.error
    said = [w.value for w in at.warning]
    assert "$LORITA_MAX_CONCURRENT='two' is not a whole number ≥ 1; using 1" in said
    assert "$LORITA_TRAIN_NICE='40' is not a whole number from 0 to 19; using 19" in said
    assert at.dataframe[0].value.shape[0] == 2
