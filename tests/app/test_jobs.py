"""app/jobs.py with real training children: start, queue, stop, follow, pair, delete."""

from __future__ import annotations

import os
import time

import pytest
from app_seed import N1, N3, TINY

from app import jobs, presets


def wait_for(name, root, states, timeout=240.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = jobs.view(name, root)
        if v.state in states:
            return v
        time.sleep(0.2)
    raise AssertionError(f"{name} stayed {jobs.view(name, root).state}, wanted {states}")


def test_validate_names_the_field():
    with pytest.raises(ValueError, match=r"^lr:"):
        jobs.validate({**TINY, "lr": -1})
    with pytest.raises(ValueError, match=r"^dataset:"):
        jobs.validate({**TINY, "dataset": "nope"})


def test_command_line_is_the_documented_one(tmp_path):
    cmd = jobs.command(tmp_path / "c.json", tmp_path, "r1", 1)
    assert cmd[1:4] == ["-m", "lorita", "train"]
    assert cmd[cmd.index("--max-concurrent") + 1] == "1"
    assert "--quiet" in cmd and cmd[cmd.index("--name") + 1] == "r1"


def test_start_pair_queue_and_stop(tmp_path):
    """One slot: the run asked for trains first, its N=1 baseline waits as queued; Stop ends
    a queued run at once and a running one after its current step, with a checkpoint."""
    root = tmp_path / "runs"
    cfg = {**TINY, "epochs": 200}
    t0 = time.perf_counter()
    first, second = jobs.start_pair(cfg, presets.baseline_config(cfg), root=root, concurrent=1)
    assert time.perf_counter() - t0 < 1.0, "Start must not wait for a child to import torch"
    assert second and second != first
    assert jobs.view(second, root).state == "starting"
    v2 = wait_for(second, root, ("queued", "running", "completed"))
    assert (root / first / "status.json").exists()  # the first child made its folder first
    assert v2.state == "queued", "the baseline must wait for the slot"
    jobs.stop(second, root)
    v2 = wait_for(second, root, ("stopped",))
    assert "queued" in v2.message

    v = wait_for(first, root, ("running",))
    pid = v.status["pid"]
    assert os.getpriority(os.PRIO_PROCESS, pid) >= 10  # training yields the CPU to the server
    deadline = time.time() + 240  # (niced: slow on a loaded machine)
    while v.step == 0 and time.time() < deadline:  # let it take a few steps
        time.sleep(0.2)
        v = jobs.view(first, root)
    assert v.eta is None or v.eta > 0
    jobs.stop(first, root)
    v = wait_for(first, root, ("stopped",))
    assert 0 < v.step < v.total_steps and v.elapsed > 0
    assert (root / first / "checkpoints" / "last.safetensors").exists()

    rows = jobs.list_runs(root)
    assert {r["name"] for r in rows} == {first, second}
    assert jobs.partner(first, root) == second and jobs.partner(second, root) == first
    jobs.delete(second, root)
    assert not (root / second).exists() and not jobs.log_path(second, root).exists()
    jobs.reap()


def test_two_starts_in_the_same_second_get_two_runs(tmp_path, monkeypatch):
    """Automatic names have one-second resolution and a child makes its folder seconds
    later: two Starts at once (two tabs) still get a run each, each with its own config."""
    from concurrent.futures import ThreadPoolExecutor

    import lorita.runs

    monkeypatch.setattr(lorita.runs.time, "strftime", lambda fmt: "20260101-000000")
    root = tmp_path / "runs"
    with ThreadPoolExecutor(4) as pool:
        names = list(pool.map(lambda s: jobs.start({**TINY, "epochs": 1, "seed": s}, root=root),
                              [1, 2, 3, 4]))  # fmt: skip
    assert len(set(names)) == 4
    for name, seed in zip(names, [1, 2, 3, 4], strict=True):
        assert wait_for(name, root, ("completed", "failed")).state == "completed", name
        assert jobs.run_config(name, root)["seed"] == seed
    with pytest.raises(ValueError, match="already exists"):
        jobs.start({**TINY}, name=names[0], root=root)


def test_stop_right_after_start_stops_a_child_still_starting(tmp_path):
    """Stop pressed while the child still imports torch (no run folder yet, as for a baseline
    just after Start): the run starts and stops at once, it does not train on."""
    root = tmp_path / "runs"
    name = jobs.start({**TINY, "epochs": 200}, root=root)
    assert not (root / name).exists()
    jobs.stop(name, root)
    v = wait_for(name, root, ("stopped", "completed", "failed"))
    assert v.state == "stopped" and v.step < v.total_steps


def test_stop_of_a_baseline_not_started_yet_ends_it_stopped(tmp_path):
    """Start then Stop on the N=1 baseline at once, before its child exists (it starts once
    the composed run's child has made its folder): it ends stopped, the composed run trains."""
    root = tmp_path / "runs"
    cfg = {**TINY, "epochs": 200}
    first, second = jobs.start_pair(cfg, presets.baseline_config(cfg), root=root, concurrent=1)
    assert jobs.view(second, root).state == "starting" and not (root / second).exists()
    jobs.stop(second, root)
    v2 = wait_for(second, root, ("stopped", "completed", "failed"))
    assert v2.state == "stopped" and v2.step == 0  # (it waited behind the composed run)
    assert jobs.view(first, root).state in ("running", "queued")
    jobs.stop(first, root)
    assert wait_for(first, root, ("stopped", "completed", "failed")).state == "stopped"


def test_a_run_completes(tmp_path):
    root = tmp_path / "runs"
    name = jobs.start({**TINY, "epochs": 1}, root=root)
    done = wait_for(name, root, ("completed",))
    assert done.fraction == 1.0 and done.step == done.total_steps > 0


def test_failed_child_reports_its_last_line(tmp_path):
    root = tmp_path / "runs"
    # passes TrainConfig validation but the dataset option is rejected when the data loads
    name = jobs.start({**TINY, "dataset": "lowrank", "dataset_kwargs": {"rank": 99}}, root=root)
    v = wait_for(name, root, ("failed",))
    assert "rank" in v.message


def test_view_of_finished_and_missing_runs(runs_dir):
    v = jobs.view(N3)
    assert v.state == "completed" and v.fraction == 1.0 and not v.active and v.finished
    assert v.eta is None
    assert jobs.view("no-such-run").state == "missing"
    assert jobs.partner(N3) == N1
    with pytest.raises(ValueError):
        jobs.start({**TINY}, name="../escape", root=runs_dir)


@pytest.mark.parametrize("bad", ["../../x", "../escape", "/etc/passwd", "a/b", "", ".hidden"])
def test_every_name_is_checked_before_it_touches_a_path(runs_dir, bad):
    for call in (jobs.view, jobs.stop, jobs.log_path, jobs.log_tail, jobs.delete):
        with pytest.raises(ValueError, match="run name"):
            call(bad)


def test_delete_refuses_an_active_run(runs_dir):
    import json

    path = runs_dir / N3 / "status.json"
    st = json.loads(path.read_text())
    st.update(state="running", heartbeat=time.time())
    path.write_text(json.dumps(st))
    with pytest.raises(ValueError, match="running"):
        jobs.delete(N3)


def test_machine_info(runs_dir):
    info = jobs.machine_info()
    assert info["n_runs"] == 2 and info["n_active"] == 0 and info["max_concurrent"] == 1
    assert info["runs_dir"] == str(runs_dir)


def test_training_children_get_the_lowest_priority_unless_told(monkeypatch):
    import subprocess
    import sys

    import psutil

    monkeypatch.delenv(jobs.NICE_ENV, raising=False)
    assert jobs.train_nice() == jobs.DEFAULT_NICE == 19
    for raw, want in (("5", 5), ("0", 0), ("40", 19), ("x", jobs.DEFAULT_NICE)):
        monkeypatch.setenv(jobs.NICE_ENV, raw)
        assert jobs.train_nice() == want, raw
    monkeypatch.setenv(jobs.NICE_ENV, "7")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        jobs.lower_priority(child.pid)
        assert psutil.Process(child.pid).nice() >= 7  # (never raised above the parent)
    finally:
        child.kill()
        child.wait()


def test_a_baseline_still_starting_is_followed_with_its_run(seeded_store, tmp_path, monkeypatch):
    """The composed run can end before its N=1 baseline's child has made its folder (the child
    imports torch at the lowest priority beside a training run): the Train page must still see
    the baseline, starting, and keep following the pair."""
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(seeded_store / N3, root / N3)  # a finished composed run, no N=1 folder yet

    class Starting:  # a child that has not made its folder yet
        def poll(self):
            return None

    def fake_start(config, *, root=None, concurrent=None, name=None):
        return N3

    def fake_claim(root, config, name):
        return "late-n1"

    def fake_spawn(name, root, concurrent):
        jobs._PROCS[(str(root), name)] = Starting()
        return jobs._PROCS[(str(root), name)]

    monkeypatch.setattr(jobs, "start", fake_start)
    monkeypatch.setattr(jobs, "_claim_name", fake_claim)
    monkeypatch.setattr(jobs, "_spawn", fake_spawn)
    monkeypatch.setattr(jobs, "_PROCS", {})
    monkeypatch.setattr(jobs, "_STARTED_BASELINE", {})
    cfg = jobs.run_config(N3, root)
    assert jobs.start_pair(cfg, presets.baseline_config(cfg), root=root) == (N3, "late-n1")
    assert jobs.view(N3, root).state == "completed"
    assert jobs.baseline_of(N3, root) == "late-n1"
    assert jobs.view("late-n1", root).state == "starting"
    assert jobs.pair_active(N3, root)


def test_a_new_session_follows_the_composed_run_not_its_queued_baseline():
    """A second person opens Train while the N=3 run trains and its N=1 baseline waits behind
    it (newer): the page follows the N=3 run, whose panel shows both."""
    rows = [  # newest first, as list_runs gives them
        {"name": "b-n1", "state": "queued", "n_factors": 1},
        {"name": "b-n3", "state": "running", "n_factors": 3},
        {"name": "a-n3", "state": "completed", "n_factors": 3},
    ]
    assert jobs.default_follow(rows) == "b-n3"
    rows[1]["state"] = "completed"  # the baseline trains now: follow it
    rows[0]["state"] = "running"
    assert jobs.default_follow(rows) == "b-n1"
    assert jobs.default_follow([{**r, "state": "completed"} for r in rows]) == "b-n3"
    assert jobs.default_follow([{"name": "x", "state": "completed", "n_factors": 1}]) is None


def test_start_in_a_runs_folder_it_cannot_write_in_says_so_and_leaves_nothing(
    tmp_path, monkeypatch
):
    """Read-only or full: Start names the runs folder before any child is launched, and a
    request that cannot be written leaves no empty file holding the name."""
    import tempfile

    root = tmp_path / "runs"
    real = tempfile.TemporaryFile

    def refused(*a, **kw):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    with pytest.raises(OSError, match=r"runs folder '.*runs': cannot write in it \(Operation"):
        jobs.start_pair(TINY, presets.baseline_config(TINY), root=root)
    assert not jobs._PROCS or all(r != str(root) for r, _ in jobs._PROCS)
    monkeypatch.setattr(tempfile, "TemporaryFile", real)

    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jobs, "write_json", full)
    with pytest.raises(OSError, match="No space left"):
        jobs.start(TINY, root=root)
    assert list((root / jobs.APP_DIR).glob("*.json")) == []


def _no_data_no_network(monkeypatch, data) -> None:
    """MNIST not on this machine (an empty data folder) and no download possible: a child's
    download goes to a closed local port, so it fails at once, with or without internet."""
    monkeypatch.setenv("LORITA_DATA", str(data))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_a_child_that_ends_before_making_its_folder_stays_listed_as_failed(tmp_path, monkeypatch):
    """A dataset missing and no internet: both children exit (2) before making a run folder.
    They stay listed, failed, with the line of their output that says what to do, after the
    server reaps them too, until dismissed or another run is started; none is offered to
    start from."""
    data, root = tmp_path / "no-data", tmp_path / "runs"
    data.mkdir()
    _no_data_no_network(monkeypatch, data)
    cfg = {**TINY, "dataset": "mnist"}
    first, second = jobs.start_pair(cfg, presets.baseline_config(cfg), root=root)
    for name in (first, second):
        assert jobs.wait(name, root, timeout=120) == 2
    jobs.reap()  # (the live panel reaps every second)
    rows = {r["name"]: r for r in jobs.list_runs(root)}
    assert set(rows) == {first, second} and not (root / first).exists()
    for name, row in rows.items():
        assert row["state"] == "failed" and not jobs.has_folder(row), row
        assert "IDX files" in row["message"] and str(data) in row["message"], row["message"]
        assert not row["message"].startswith("lorita: error")
        v = jobs.view(name, root)
        assert (v.state, v.message, v.made, v.active) == ("failed", row["message"], False, False)
    assert rows[first]["n_factors"] == 3 and rows[second]["n_factors"] == 1
    assert jobs.start_points(list(rows.values()), root) == []

    jobs.dismiss(second, root)
    assert [r["name"] for r in jobs.list_runs(root)] == [first]
    assert jobs.view(second, root).state == "missing" and not jobs.log_path(second, root).exists()
    other = jobs.start({**TINY, "epochs": 1}, root=root)  # another run: no longer listed
    assert first not in [r["name"] for r in jobs.list_runs(root)]
    assert jobs.view(first, root).state == "failed"  # (a page that follows it still says why)
    done = wait_for(other, root, ("completed", "failed"))
    assert done.state == "completed", (done.message, jobs.log_tail(other, root))
    with pytest.raises(ValueError, match="only a run that failed to start"):
        jobs.dismiss(other, root)


def test_a_failed_childs_message_is_its_last_meaningful_line():
    said = ("dataset 'mnist': put the four IDX files (train-images-idx3-ubyte[.gz], ...) in "
            "one of /d/MNIST/raw")  # fmt: skip
    log = (
        "dataset 'mnist': not on this machine: will download into /d (needs internet)\n"
        f"lorita: error: {said}\n"
        "/usr/lib/python3/x.py:12: ResourceWarning: unclosed file\n"
        "  warnings.warn(\n\n"
    )
    assert jobs._last_line(log) == said
    trace = 'Traceback (most recent call last):\n  File "x.py", line 1\n    f()\nOSError: boom\n'
    assert jobs._last_line(trace) == "OSError: boom"
    assert jobs._last_line("\n  \n") == ""


def test_a_run_resumed_elsewhere_after_the_servers_child_ended_reads_as_running(tmp_path):
    """The server's child was stopped, then `lorita resume` took the run over: the page reads
    the run's own status (running), not "failed" from the child that ended; while the run
    names the ended child itself, it failed."""
    import socket
    import subprocess
    import sys

    from lorita.io import write_json
    from lorita.runs import RunStore, _me

    root = tmp_path / "runs"
    run = RunStore(root).create({**TINY, "n_factors": 3}, name="taken-over")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    jobs._PROCS[(str(root), run.name)] = child
    try:
        st = {**run.raw_status(), "state": "running", "step": 3, "total_steps": 10}
        write_json(run.path / "status.json", {**st, **_me()})  # this process: alive
        assert jobs.view(run.name, root).state == "running"
        write_json(run.path / "status.json", {**st, "pid": child.pid, "host": socket.gethostname()})
        assert jobs.view(run.name, root).state == "failed"
    finally:
        jobs._PROCS.pop((str(root), run.name), None)


def test_a_baseline_still_waiting_when_the_server_exits_is_started_not_lost(tmp_path, monkeypatch):
    """Ctrl-C on the server seconds after Start: the N=1 baseline waiting for its run's folder
    is started at exit (its child outlives the server), once; one stopped meanwhile is
    dropped with its request."""
    import threading

    started = []

    class Child:
        pid = 0

        def poll(self):
            return None  # importing torch: no folder yet

    def spawn(name, root, concurrent):
        started.append((name, concurrent))
        jobs._PROCS[(str(root), name)] = Child()
        return jobs._PROCS[(str(root), name)]

    monkeypatch.setattr(jobs, "_spawn", spawn)
    root = tmp_path / "runs"
    try:
        first, base = jobs.start_pair(TINY, presets.baseline_config(TINY), root=root,
                                      concurrent=2, wait_s=0.5)  # fmt: skip
        assert started == [(first, 2)]
        jobs.start_pending_now()  # the server exits while the baseline waits
        assert started == [(first, 2), (base, 2)]
        for t in threading.enumerate():
            if t.name == f"start {base}":
                t.join()
        assert started == [(first, 2), (base, 2)]  # the waiting thread did not start it again

        first, base = jobs.start_pair(TINY, presets.baseline_config(TINY), root=root, wait_s=30)
        jobs._PENDING[(str(root), base)]["stop"] = True  # Stop pressed before it began
        jobs.start_pending_now()
        assert [n for n, _ in started].count(base) == 0
        assert not jobs.app_file(base, ".json", root).exists()
        assert jobs.view(base, root).state == "missing"
    finally:
        for key in [k for k in jobs._PROCS if k[0] == str(root)]:
            jobs._PROCS.pop(key)
