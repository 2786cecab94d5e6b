"""The pages as a teacher giving a demo uses them, without a browser: what the Train form keeps
after a refresh or a visit to another page, what Start says about the data, what Delete says."""

from __future__ import annotations

import socket
import threading

import pytest
from app_seed import N1, N3, TINY, assert_clean, open_page

from app import jobs, train_form

START = "FormSubmitter:train.form-Start training"


@pytest.fixture
def started(monkeypatch):
    """jobs.start_pair replaced: each Start is recorded and "starts" the seeded N=3 run (with
    its seeded N=1 run as baseline when one is asked for)."""
    calls: list[tuple[dict, dict | None]] = []

    def start_pair(config, baseline):
        calls.append((config, baseline))
        return N3, (N1 if baseline is not None else None)

    monkeypatch.setattr(jobs, "start_pair", start_pair)
    monkeypatch.setattr(train_form, "_STARTED_WITH_BASELINE", {})
    return calls


def _baseline_box(at) -> bool:
    return at.checkbox(key="train.baseline").value


@pytest.mark.parametrize("ticked", [False, True])
def test_a_refresh_after_start_keeps_the_baseline_choice(runs_dir, started, ticked):
    """Start with "also train N=1" unticked, then a refresh (a new session on ``?run=``): the
    box stays unticked, as the user left it (before, it came back ticked, and the next Start
    trained an N=1 run nobody asked for)."""
    at = open_page("train")
    if not ticked:
        at.checkbox(key="train.baseline").uncheck()
    at.button(key=START).click().run()
    assert_clean(at)
    ((config, baseline),) = started
    assert (baseline is not None) is ticked
    again = open_page("train", **dict(at.query_params))
    assert_clean(again)
    assert again.selectbox(key="train.follow").value == N3
    assert _baseline_box(again) is ticked
    second_tab = open_page("train", run=N3)
    assert _baseline_box(second_tab) is ticked


def test_a_visit_to_another_page_keeps_the_baseline_choice(runs_dir, started):
    """Start unticked, Compress, back to Train (the same session): the form shows the run it
    follows, its box unticked; the next Start starts no N=1 run."""
    at = open_page("train")
    at.checkbox(key="train.baseline").uncheck()
    at.button(key=START).click().run()
    at.switch_page("pages/runs.py").run()
    at.switch_page("pages/train.py").run()
    assert_clean(at)
    assert _baseline_box(at) is False
    at.button(key=START).click().run()
    assert [b for _, b in started] == [None, None]


def test_the_box_follows_how_a_run_was_started_after_an_app_restart(runs_dir, monkeypatch):
    """Nothing remembered (the app restarted): a composed run with an N=1 run of its setup
    made beside it was started with it; a composed run alone, without; an N=1 run, or none:
    ticked (the default)."""
    from lorita.runs import RunStore

    monkeypatch.setattr(train_form, "_STARTED_WITH_BASELINE", {})
    assert train_form.ticks_baseline(N3) is True  # its N=1 twin was trained seconds after it
    RunStore(runs_dir).create({**TINY, "seed": 7}, name="alone-n3")
    assert train_form.ticks_baseline("alone-n3") is False
    assert train_form.ticks_baseline(N1) is True
    assert train_form.ticks_baseline(None) is True
    assert _baseline_box(open_page("train", run="alone-n3")) is False


def _images(root, big: str = "") -> str:
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (8, 8), (20 * i, 0, 0) if c == "a" else (0, 0, 20 * i)).save(
                root / c / f"{i}.png"
            )
    if big:
        Image.new("RGB", (16, 16), (9, 9, 9)).save(root / "a" / big)
    return str(root)


def test_start_says_an_image_over_the_pixel_limit_once(empty_runs, tmp_path, monkeypatch):
    """An image over Pillow's pixel limit (a decompression-bomb warning): Start says so once,
    on the page, naming the file (before, the folder was checked twice per Start, and each
    check printed the warning to the server's terminal and nothing to the page)."""
    from PIL import Image

    from lorita import data

    folder = _images(tmp_path / "images", big="huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 16x16 = 256 pixels: warned
    checks = []
    real = data.check_dataset
    monkeypatch.setattr(data, "check_dataset", lambda *a, **k: checks.append(a) or real(*a, **k))
    monkeypatch.setattr(jobs, "start_pair", lambda c, b: ("x", None))
    at = open_page("train")
    at.selectbox(key="train.dataset.classroom").set_value("folder")
    at.text_input(key="train.dataset_path.classroom").set_value(folder)
    at.button(key=START).click().run()
    assert_clean(at)
    said = [w.value for w in at.warning if "exceeds limit" in w.value]
    assert len(said) == 1, [w.value for w in at.warning]
    assert "huge.png" in said[0] and "pixels" in said[0]
    assert len(checks) == 1, checks


def test_start_on_a_plain_folder_says_no_warning(empty_runs, tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "start_pair", lambda c, b: ("x", None))
    at = open_page("train")
    at.selectbox(key="train.dataset.classroom").set_value("folder")
    at.text_input(key="train.dataset_path.classroom").set_value(_images(tmp_path / "images"))
    at.button(key=START).click().run()
    assert_clean(at)
    assert not [w.value for w in at.warning if "limit" in w.value]
    assert any(t.value.startswith("Started x") for t in at.toast)


def test_delete_says_it_deleted(runs_dir):
    """Yes, delete: the page drawn again says so, once. (A toast made just before the page's
    rerun never reached the browser; AppTest keeps it, so the browser test is the one that
    caught that: tests/e2e/test_demo_walk_qa.py.)"""
    at = open_page("runs")
    at.selectbox(key="runs.delete").set_value(N1).run()
    at.button(key="runs.delete_ask").click().run()
    at.button(key="runs.delete_yes").click().run()
    assert_clean(at)
    assert not (runs_dir / N1).exists()
    assert [t.value for t in at.toast] == [f"Deleted {N1}"]
    at.run()
    assert not at.toast  # said once


def test_theory_prewarm_ends_quietly_when_the_server_exits(monkeypatch):
    """Ctrl-C seconds after the server started: the background fit finds the worker pool shut
    down; it ends without a traceback in the terminal (before: 'Exception in thread
    lorita-theory-prewarm ... cannot schedule new futures after interpreter shutdown')."""
    from app import theory

    def shut(*_a, **_k):
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(theory._Worker, "run", shut)
    monkeypatch.setattr(theory._Kept, "results", {})
    monkeypatch.setattr(theory._Kept, "pending", {})
    raised = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))
    theory.prewarm().join(30)
    assert raised == []

    def other(*_a, **_k):
        raise RuntimeError("something else")

    monkeypatch.setattr(theory._Worker, "run", other)
    theory.prewarm().join(30)
    assert [str(e) for e in raised] == ["something else"]  # only the exit is taken quietly


def test_the_runs_page_says_why_each_failed_run_failed_and_what_next(runs_dir):
    """A failed run was only "failed" in the table; its message (what happened, and the
    command that goes on with it) is shown under the table."""
    from lorita.runs import RunStore

    run = RunStore(runs_dir).get(N3)
    run.update_status(state="running", pid=999_999_999, host=socket.gethostname())
    at = open_page("runs")
    assert_clean(at)
    (box,) = [e for e in at.expander if e.label == "Why 1 run failed"]
    (line,) = [t.value for t in box.text]
    assert line.startswith(f"{N3}: process died") and f"--resume {N3}" in line
