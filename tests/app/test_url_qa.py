"""The pages opened on addresses nobody picked (hand-edited, mangled, repeated parameters)
and on run folders that change under an open page."""

from __future__ import annotations

import json
import shutil

import pytest
from app_seed import N1, N3, assert_clean, open_page
from streamlit.testing.v1 import AppTest

from app import compress as cz


def url(at: AppTest, param: str):
    return at.query_params.get(param)


# --- the address ------------------------------------------------------------------------------


@pytest.mark.parametrize("page,key", [("train", "train.follow"), ("compress", "compress.run"),
                                      ("export", "export.run")])  # fmt: skip
@pytest.mark.parametrize(
    "name", ["../x", "<script>alert('ü')</script>" + "x" * 200], ids=["path", "markup"]
)
def test_an_address_run_that_cannot_be_a_run_name_is_named(runs_dir, page, key, name):
    """``?run=`` that no run can have (a path, spaces, markup, too long): the page shows
    another run and says why, naming the parameter and what a run name is (before, it
    switched silently, while a valid name of a missing run was explained)."""
    at = open_page(page, run=name)
    assert_clean(at)
    (note,) = [i.value for i in at.info if "?run=" in i.value]
    assert "is not allowed" in note and "letters, digits" in note and "showing another" in note
    shown = at.selectbox(key=key).value
    assert shown in (N3, N1) and url(at, "run") == shown  # the address follows the page
    at.run()  # the note is said once: the address now names the run shown
    assert not any("?run=" in i.value for i in at.info)


@pytest.mark.parametrize("page,key", [("train", "train.follow"), ("compress", "compress.run"),
                                      ("export", "export.run")])  # fmt: skip
def test_a_run_given_twice_in_the_address_is_written_once(runs_dir, page, key):
    """``?run=a&run=b``: the page shows the last one (as Streamlit reads a repeated
    parameter) and the address names that run once (before, it kept both)."""
    at = open_page(page, run=[N3, N1])
    assert_clean(at)
    assert at.selectbox(key=key).value == N1
    assert url(at, "run") == N1


def test_theory_settings_given_twice_are_written_once(empty_runs):
    at = open_page("theory", n=["2", "4"])
    assert_clean(at)
    assert at.slider(key="theory.n_factors").value == 4
    assert url(at, "n") == "4"


@pytest.mark.parametrize("given,shown", [("0.123", 0.12), ("-0", 0.0), ("inf", 0.2)])
def test_theory_a_lambda_off_the_sliders_steps_is_put_on_them(empty_runs, given, shown):
    """``lambda=0.123``: the slider (steps of 0.01) and the fit use 0.12, and the address
    says so (before, the fit used 0.123 under a slider that moves in hundredths, and ``-0``
    was kept as -0); out of range, the default."""
    at = open_page("theory", **{"lambda": given})
    assert_clean(at)
    assert at.slider(key="theory.weight_decay").value == shown
    assert url(at, "lambda") == f"{shown:g}"


def test_export_refresh_keeps_the_checkpoint_of_a_model_as_trained(runs_dir):
    """The Export page exporting the last checkpoint as trained: a refresh comes back to the
    last checkpoint (before, ``which`` left the address with the cut, and a refresh exported
    the best one under the same address)."""
    at = open_page("export", run=N3)
    at.radio(key="export.which").set_value("last").run()
    assert_clean(at)
    assert url(at, "which") == "last"
    fresh = open_page("export", **dict(at.query_params))
    assert_clean(fresh)
    assert fresh.radio(key="export.which").value == "last"
    assert f"{N3}-last" in fresh.get("download_button")[0].proto.label


def test_compress_opens_on_the_address_checkpoint_and_keeps_it(runs_dir):
    """The Compress page reads and writes ``?which=`` like the Export page, so the two pages
    and a refresh show one checkpoint; a checkpoint that is neither is ignored quietly."""
    at = open_page("compress", run=N3, which="last")
    assert_clean(at)
    assert at.radio(key="compress.which").value == "last"
    at.radio(key="compress.which").set_value("best").run()
    assert_clean(at)
    assert url(at, "which") == "best"
    at.switch_page("pages/export.py").run()
    assert at.radio(key="export.which").value == "best"
    for bad in ("../x", "LAST", "", "best\x00"):
        page = open_page("compress", run=N3, which=bad)
        assert_clean(page)
        assert page.radio(key="compress.which").value == "best"
        assert url(page, "which") == "best"


@pytest.mark.parametrize("value", ["-inf", "1e309", "-1", "0.123456"])
def test_compress_an_odd_slider_value_in_the_address_keeps_the_address_true(runs_dir, value):
    """Whatever ``?value=`` holds, the slider is in its range and on its grid, and the
    address then holds the slider's value (a refresh shows what the page shows)."""
    d = cz.scalar_policies()["global"]
    at = open_page("compress", run=N3, policy="global", value=value)
    assert_clean(at)
    shown = at.slider(key="compress.value.global").value
    assert float(d["min"]) <= shown <= float(d["max"])
    assert shown == pytest.approx(cz.snap("global", shown))
    assert url(at, "value") == f"{shown:g}"


@pytest.mark.parametrize("policy", ["", "GLOBAL", "ranks\n"])
def test_compress_an_unknown_policy_in_the_address_falls_back_to_global(runs_dir, policy):
    at = open_page("compress", run=N3, policy=policy, value="0.3")
    assert_clean(at)
    assert at.radio(key="compress.policy").value == "global"
    assert url(at, "policy") == "global"


# --- run folders that change under an open page -----------------------------------------------


def _empty(path) -> None:
    path.write_bytes(b"")


def test_an_empty_best_checkpoint_opens_the_last_and_two_are_not_offered(runs_dir):
    """A best checkpoint left empty (a copy that ran out of disk) or a folder in its place:
    the Compress and Export pages open the run's last checkpoint instead (before, they opened
    the empty one and showed only an error); with both unreadable the run is not offered."""
    ckpt = runs_dir / N3 / "checkpoints"
    _empty(ckpt / "best.safetensors")
    for page in ("compress", "export"):
        at = open_page(page, run=N3)
        assert_clean(at)
        assert at.selectbox(key=f"{page}.run").value == N3
        assert at.radio(key=f"{page}.which").value == "last"
    (ckpt / "best.safetensors").unlink()
    (ckpt / "best.safetensors").mkdir()
    _empty(ckpt / "last.safetensors")
    for page in ("compress", "export"):
        at = open_page(page, run=N3)
        assert_clean(at)
        assert at.selectbox(key=f"{page}.run").value == N1
        assert any(f"Run {N3} (completed) has no checkpoint to read" in i.value for i in at.info)
    from lorita.runs import RunStore

    run = RunStore(runs_dir).get(N3)
    assert run.checkpoint_mtime("best") == 0.0 and run.checkpoint_mtime("last") == 0.0


def _cut_metrics(run) -> None:
    data = (run / "metrics.jsonl").read_bytes()
    (run / "metrics.jsonl").write_bytes(data[: len(data) // 2])  # mid-line


def _bad_config(run) -> None:
    (run / "config.json").write_text("{garbage")


def _dead_pid(run) -> None:
    st = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**st, "state": "running", "pid": 2**22 + 7}))


@pytest.mark.parametrize("damage", [_cut_metrics, _bad_config, _dead_pid])
@pytest.mark.parametrize("page", ["train", "runs", "compress", "export"])
def test_a_run_folder_damaged_under_an_open_page(runs_dir, page, damage):
    """The folder of the run shown changes between two reruns: the page draws again, and
    says in one line what is wrong where it cannot read the run (never a traceback)."""
    at = open_page(page, run=N3)
    assert_clean(at)
    damage(runs_dir / N3)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    for e in at.error:
        assert "Traceback" not in e.value and "\n" not in e.value.strip()
        assert "config.json" in e.value or "process died" in e.value, e.value


def test_a_runs_folder_with_other_things_in_it_lists_only_runs(runs_dir):
    """Files, empty folders, a folder whose name no run can have, a link to itself and a
    dangling link beside the runs: every page draws, and lists the runs."""
    (runs_dir / "notes.txt").write_text("hello")
    (runs_dir / "config.json").write_text("{}")
    (runs_dir / "empty").mkdir()
    shutil.copytree(runs_dir / N1, runs_dir / "has space")
    (runs_dir / "loop").symlink_to(runs_dir / "loop")
    (runs_dir / "dangling").symlink_to(runs_dir / "nowhere")
    for page in ("train", "compress", "export"):
        at = open_page(page)
        assert_clean(at)
        picker = at.selectbox(key=f"{page}.run" if page != "train" else "train.follow")
        assert {o.split()[0] for o in picker.options} == {N3, N1}, page
    home = open_page()
    assert_clean(home)
    assert {m.label: m.value for m in home.metric}["Runs"] == "2"
    runs = open_page("runs")
    assert not runs.exception and not runs.error
    assert set(runs.dataframe[0].value["run"]) == {N3, N1}


def test_a_run_folder_whose_name_no_run_can_have_is_named_not_hidden(runs_dir):
    """A run folder renamed ``my run`` (a space) is not a run the app can open: the Runs page
    names it and says how to fix it (before, it vanished from every page without a word)."""
    from lorita.runs import RunStore

    shutil.move(runs_dir / N1, runs_dir / "my run")
    (runs_dir / "notes and more").mkdir()  # not a run folder: nothing to say
    (runs_dir / ".app").mkdir()
    at = open_page("runs")
    assert not at.exception and not at.error
    (warning,) = [w.value for w in at.warning]
    assert "'my run'" in warning and "rename the folder" in warning and "letters, digits" in warning
    assert set(at.dataframe[0].value["run"]) == {N3}
    assert RunStore(runs_dir).misnamed() == ["my run"]
    shutil.rmtree(runs_dir / N3)  # the only run folder left is the misnamed one
    at = open_page("runs")
    assert any("No runs yet" in i.value for i in at.info)
    assert any("'my run'" in w.value for w in at.warning)


def test_a_run_folder_whose_files_hold_values_of_the_wrong_kind_is_drawn(runs_dir):
    """An edited run folder: JSON that parses, holding text where numbers belong (status
    counters and times, a spectra row, the config's N, epochs and model options). Every page
    draws it or another run (before, the Train page failed on the form and on the status,
    the Runs page on the spectra, Compress and Export on the status of the run asked for)."""
    from lorita.runs import RunStore

    run = runs_dir / "edited"
    shutil.copytree(runs_dir / N1, run)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    st = json.loads((run / "status.json").read_text())
    st.update(step="a", total_steps="b", started="c", ended="d")
    (run / "status.json").write_text(json.dumps(st))
    cfg = json.loads((run / "config.json").read_text())
    cfg.update(n_factors="x", epochs="y", model_kwargs="no")
    (run / "config.json").write_text(json.dumps(cfg))
    with open(run / "spectra.jsonl", "a") as fh:
        fh.write('{"step": 99, "layers": {"fc1": [1, "a", null]}}\n')
        fh.write('{"step": "x", "layers": {"fc1": [1.0]}}\n{"step": 100, "layers": [1]}\n')
    for page in ("train", "runs", "compress", "export"):
        at = open_page(page, run="edited")
        assert not at.exception and not at.error, (page, [e.value for e in at.error])
    at.switch_page("pages/runs.py").run()
    at.multiselect(key="runs.pick").set_value(["edited", N3]).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    stored = RunStore(runs_dir).get("edited")
    assert stored.status()["step"] is None and stored.status()["ended"] is None
    assert all(isinstance(r["step"], int) for r in stored.spectra())
    assert stored.last_spectra() == stored.spectra()[-1]
