"""The app and the command line on the same runs folder at the same moments: a run started in
a terminal followed and stopped by the app, a run stopped in the app resumed in a terminal, a
run deleted in a terminal under an open page, a server restarted beside its training child,
and two Starts of one name."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from app_seed import N1, N3, ROOT, TINY, assert_clean, open_page

from app import jobs, live

LONG = {**TINY, "epochs": 5000}  # minutes of training: every run here is stopped


def wait_for(name, root, states, timeout=240.0, step=0):
    """The run's view once its state is in ``states`` (and past ``step`` steps)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = jobs.view(name, root)
        if v.state in states and v.step >= step:
            return v
        time.sleep(0.2)
    raise AssertionError(f"{name} stayed {jobs.view(name, root)}, wanted {states}")


def terminal(root, *args) -> subprocess.Popen:
    """``python -m lorita train ...`` as typed in a terminal (not a child of the app)."""
    return subprocess.Popen(
        [sys.executable, "-m", "lorita", "train", "--runs-dir", str(root), "--quiet", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def config_file(tmp_path, cfg) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_a_terminal_run_is_followed_listed_and_stopped_by_the_app(tmp_path):
    root = tmp_path / "runs"
    proc = terminal(root, "--config", config_file(tmp_path, LONG), "--name", "term")
    try:
        v = wait_for("term", root, ("running",), step=1)
        assert v.status["pid"] == proc.pid and v.eta is not None
        (row,) = jobs.list_runs(root)
        assert row["name"] == "term" and row["state"] == "running"
        assert jobs.default_follow(jobs.list_runs(root)) == "term"
        assert jobs.pair_active("term", root)
        with pytest.raises(ValueError, match="stop it before deleting"):
            jobs.delete("term", root)
        jobs.stop("term", root)
        v = wait_for("term", root, ("stopped",))
        assert proc.wait(60) == 130  # (a stopped run's exit code)
    finally:
        proc.kill()
        proc.wait()
    assert 0 < v.step < v.total_steps
    assert (root / "term" / "checkpoints" / "last.safetensors").is_file()
    assert jobs.list_runs(root)[0]["state"] == "stopped"


def test_a_restarted_server_finds_its_child_stops_it_and_follows_a_terminal_resume(
    tmp_path, monkeypatch
):
    """The server restarts (its module state fresh) while its child trains: the run is found,
    followed and stopped from the folder alone; resumed in a terminal, the page's follower
    reads the rewritten logs' new lines once each."""
    root = tmp_path / "runs"
    name = jobs.start(LONG, name="app-run", root=root, concurrent=1)
    child = jobs._PROCS[(str(root), name)]
    try:
        wait_for(name, root, ("running",), step=1)
        for table in ("_PROCS", "_ROWS", "_STARTED_BASELINE", "_FAILED_STARTS"):
            monkeypatch.setattr(jobs, table, type(getattr(jobs, table))())
        assert jobs.view(name, root).state == "running"
        assert [r["state"] for r in jobs.list_runs(root)] == ["running"]
        run = jobs.store(root).get(name)
        follower = live.RunFollower(run)
        follower.update()
        jobs.stop(name, root)
        stopped = wait_for(name, root, ("stopped",))
        assert child.wait(60) == 130
        assert (root / name / "checkpoints" / "last.safetensors").is_file()

        follower.update()
        resumed = terminal(root, "--resume", name)
        try:
            v = wait_for(name, root, ("running",), step=stopped.step + 2)
            assert v.status["pid"] == resumed.pid
            follower.update()  # (the page's second, mid-run)
            jobs.stop(name, root)
            wait_for(name, root, ("stopped",))
            assert resumed.wait(60) == 130
        finally:
            resumed.kill()
            resumed.wait()
    finally:
        child.kill()
        child.wait()
    follower.update()
    on_disk = [(r["split"], r["step"]) for r in run.metrics()]
    held = [(r["split"], r["step"]) for r in follower.metric_rows()]
    assert len(set(held)) == len(held), "a line shown twice"
    assert sorted(held) == sorted(on_disk)
    assert max(s for _, s in held) > stopped.step  # the resumed run's new lines are there


def test_a_start_whose_name_a_terminal_run_took_first_says_it_did_not_run(tmp_path):
    """The app's Start claims a name, its child imports torch for seconds, and meanwhile a
    terminal's ``lorita train --name`` makes that run: the app's child is refused, and the
    page says this Start did not run, instead of following the terminal's run as its own."""
    from lorita.runs import RunStore

    root = tmp_path / "runs"
    jobs.start({**TINY, "epochs": 7}, name="same", root=root, concurrent=1)
    RunStore(root).create({**TINY, "n_factors": 1}, name="same")  # the terminal's, first
    assert jobs.wait("same", root, timeout=90) == 2
    for _ in range(2):  # before and after the page reaps the child
        v = jobs.view("same", root)
        assert v.state == "failed", v
        assert "'same' already exists" in v.message and "did not run" in v.message
        jobs.reap()
    (row,) = jobs.list_runs(root)  # the terminal's run is listed as it is
    assert row["state"] == "queued" and row["n_factors"] == 1


def test_a_terminal_start_of_a_name_the_app_took_is_refused_in_one_line(tmp_path):
    root = tmp_path / "runs"
    name = jobs.start(LONG, name="mine", root=root, concurrent=1)
    try:
        wait_for(name, root, ("queued", "running"))
        cli = terminal(root, "--config", config_file(tmp_path, TINY), "--name", "mine")
        out = cli.communicate(timeout=90)[0]
        assert cli.returncode == 2
        assert out.strip().splitlines() == [f"lorita: error: run: 'mine' already exists in {root}"]
        assert jobs.view(name, root).state in ("queued", "running")
        jobs.stop(name, root)
        wait_for(name, root, ("stopped",))
    finally:
        jobs.wait(name, root, timeout=60)


@pytest.mark.parametrize("page", ["compress", "export"])
def test_a_run_deleted_in_a_terminal_under_an_open_page_is_said(runs_dir, page):
    """``lorita runs --delete`` while the page has the run open and its slider moved: the next
    rerun says the run is gone and shows another, with no exception."""
    at = open_page(page, run=N3, policy="uniform", value="3")
    assert_clean(at)
    out = subprocess.run(
        [sys.executable, "-m", "lorita", "runs", "--runs-dir", str(runs_dir), "--delete", N3],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert not (runs_dir / N3).exists()
    if page == "compress":
        (slider,) = at.slider
        slider.set_value(slider.min).run()
    else:
        at.run()
    assert_clean(at)
    assert any(f"Run {N3} is not in the runs folder" in i.value for i in at.info), page
    assert N1 in str(at.query_params.get("run"))


def test_the_follower_of_a_killed_run_resumed_while_nobody_looked_shows_each_line_once(
    tmp_path,
):
    """A run killed at step 10 whose last checkpoint is step 5 (the page stops following a
    failed run), then resumed in a terminal: its logs are rewritten up to step 5 and grow
    past their old length before the page looks again. The follower starts over on the new
    file: every step once, the dead attempt's lines after step 5 gone."""
    from lorita.runs import RunStore

    run = RunStore(tmp_path / "runs").create(TINY, name="killed")
    for step in range(1, 11):
        run.log_metrics({"step": step, "split": "train", "loss": 2.0, "time": 0.5})
    follower = live.follower(run)
    assert len(follower.metrics["train"]) == 10
    run.truncate_logs(5)  # what a resume does first
    for step in range(6, 15):  # the resumed attempt's lines (longer: more digits)
        run.log_metrics({"step": step, "split": "train", "loss": 1.23456789, "time": 12.3456789})
    follower = live.follower(run)
    assert [r["step"] for r in follower.metrics["train"]] == list(range(1, 15))
    assert all(r["loss"] == 1.23456789 for r in follower.metrics["train"][5:])
