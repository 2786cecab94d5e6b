"""A run that ended badly: every place that shows it (``lorita runs``, ``lorita train
--resume``, the library's Run.status, the app's job layer) says what happened and what to do
next, and they agree. The commands a message names are run here, as a user would."""

import errno
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lorita.runs as runs_mod
from app import jobs
from lorita.cli import main
from lorita.engine import train
from lorita.runs import RunStore

pytestmark = pytest.mark.usefixtures("one_thread", "plain_process")

TINY = {"dataset": "digits", "model": "mlp", "model_kwargs": {"width": 16}, "epochs": 1,
        "device": "cpu", "spectra_every": 0}  # fmt: skip


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _killed(run, **fields) -> None:
    """status.json as a trainer killed with kill -9 leaves it: running, its pid gone."""
    run.update_status(state="running", pid=_dead_pid(), **fields)


def _everywhere(root: Path, name: str, capsys) -> dict[str, tuple[str, str]]:
    """(state, message) of run ``name`` as each place shows it."""
    st = RunStore(root).get(name).status()
    row = {r["name"]: r for r in RunStore(root).summaries()}[name]
    app_row = {r["name"]: r for r in jobs.list_runs(root)}[name]
    v = jobs.view(name, root)
    capsys.readouterr()
    assert main(["runs", "--runs-dir", str(root)]) == 0
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if line.startswith(f"  {name}: ")]
    assert len(said) == 1, out
    return {
        "status": (st["state"], st["message"]),
        "summary": (row["state"], row["message"]),
        "app list": (app_row["state"], app_row["message"]),
        "app view": (v.state, v.message),
        "cli runs": ("failed", said[0].split(": ", 1)[1]),
    }


def _command_in(message: str) -> list[str]:
    """The ``lorita ...`` command a message names, as arguments of lorita.cli.main."""
    inside = "(lorita " in message  # (a command in brackets)
    cmd = message.split("lorita ", 1)[1]
    cmd = cmd.split(")", 1)[0] if inside else cmd.split(" (", 1)[0]  # (a note after it)
    return shlex.split(cmd)


# --------------------------------------------------------------------------- 1: killed


def test_a_killed_run_with_a_checkpoint_says_to_resume_and_that_command_works(tmp_path, capsys):
    """Before: ``lorita runs`` said "process died" and nothing more; the app's Train page
    "the training process died: no output"."""
    run = RunStore(tmp_path).create(TINY, name="k")
    assert train(TINY, run, stop=lambda: True)["state"] == "stopped"  # one step, a checkpoint
    _killed(run, step=1)
    places = _everywhere(tmp_path, "k", capsys)
    for where, (state, message) in places.items():
        assert state == "failed", where
        assert "process died at step 1" in message, (where, message)
        assert "resume it from its last checkpoint (step 1): lorita train --resume k" in message
    assert places["app view"][1].startswith("the training process died")

    capsys.readouterr()
    assert main(_command_in(places["cli runs"][1]) + ["--quiet"]) == 0
    assert run.status()["state"] == "completed"


def test_a_killed_run_without_a_checkpoint_says_to_train_it_again(tmp_path, capsys):
    run = RunStore(tmp_path).create(TINY, name="k0")
    _killed(run, step=0)
    places = _everywhere(tmp_path, "k0", capsys)
    for where, (state, message) in places.items():
        assert state == "failed", where
        assert "it kept no checkpoint: train it again from the start with lorita train " \
               "--resume k0" in message, (where, message)  # fmt: skip
        assert "checkpoint (step" not in message
    capsys.readouterr()
    assert main(_command_in(places["status"][1]) + ["--quiet"]) == 0  # (from the start)
    assert run.status()["state"] == "completed"


def test_a_run_killed_under_torchrun_says_how_to_go_on_as_it_was(tmp_path, capsys):
    """status.json as rank 0 of two processes leaves it when killed (world_size 2)."""
    run = RunStore(tmp_path).create(TINY, name="t2")
    (run.checkpoint_dir / "ckpt-000003").mkdir()  # (numbered in turn; its manifest: the step)
    (run.checkpoint_dir / "ckpt-000003" / "manifest.json").write_text('{"step": 30, "files": {}}')
    _killed(run, step=34, world_size=2)
    for where, (state, message) in _everywhere(tmp_path, "t2", capsys).items():
        assert state == "failed", where
        assert "resume it from its last checkpoint (step 30): lorita train --resume t2" in message
        assert "torchrun --nproc_per_node=2 -m lorita train --resume" in message, where


def test_a_run_on_another_machine_whose_heartbeat_stopped_says_what_to_do(tmp_path):
    run = RunStore(tmp_path).create(TINY, name="far")
    run.update_status(state="running", host="elsewhere", pid=1, step=3)
    status = json.loads((run.path / "status.json").read_text())
    status["heartbeat"] -= 3600
    (run.path / "status.json").write_text(json.dumps(status))
    msg = run.status()["message"]
    assert run.status()["state"] == "failed"
    assert msg.startswith("process died at step 3") and "lorita train --resume far" in msg


def test_the_command_names_the_runs_folder_only_when_it_is_not_the_default(tmp_path, monkeypatch):
    run = RunStore(tmp_path / "r").create(TINY, name="d")
    _killed(run)
    assert f"--resume d --runs-dir {tmp_path / 'r'}" in run.status()["message"]
    monkeypatch.setenv("LORITA_RUNS", str(tmp_path / "r"))
    assert run.status()["message"].endswith("lorita train --resume d")
    monkeypatch.delenv("LORITA_RUNS")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").symlink_to(tmp_path / "r")
    assert RunStore().get("d").status()["message"].endswith("lorita train --resume d")


def test_an_unknown_state_says_what_to_do(tmp_path):
    run = RunStore(tmp_path).create(TINY, name="u")
    run.update_status(state="paused")
    st = run.status()
    assert st["state"] == "failed"
    assert st["message"].startswith("unknown state 'paused' in status.json; ")
    assert "lorita train --resume u" in st["message"]


# --------------------------------------------------------------------------- 2: broken


@pytest.mark.parametrize("when", ["before", "after the row was kept"])
def test_a_broken_config_reads_alike_in_the_listing_the_view_and_the_library(
    tmp_path, capsys, when
):
    """Before: app.jobs.view said "completed" (nothing wrong) for a run whose config.json was
    broken while list_runs said failed; once list_runs had kept a finished row, it went on
    saying "completed" after the file broke."""
    run = RunStore(tmp_path).create(TINY, name="b")
    run.update_status(state="completed")
    if when != "before":
        assert [r["state"] for r in jobs.list_runs(tmp_path)] == ["completed"]
    (run.path / "config.json").write_text("[1]")
    places = _everywhere(tmp_path, "b", capsys)
    said = "broken run folder: config.json is not a readable JSON object; put that file back"
    for where, (state, message) in places.items():
        assert state == "failed", where
        assert message.startswith(said), (where, message)
        assert "lorita runs --delete b" in message
    assert len({m for _, m in places.values()}) == 1, places
    assert not jobs.view("b", tmp_path).active
    capsys.readouterr()
    assert main(_command_in(places["status"][1])) == 0  # the delete it names works
    assert not run.path.exists()


def test_a_broken_config_of_a_live_run_keeps_it_running(tmp_path):
    """A run whose process still trains is not called failed (it can still be stopped)."""
    run = RunStore(tmp_path).create(TINY, name="live")
    run.update_status(state="running", pid=os.getpid())
    (run.path / "config.json").write_text("{")
    assert run.status()["state"] == "running"
    assert jobs.view("live", tmp_path).active


# --------------------------------------------------------------------------- 3: resume checks


def _as_torchrun(monkeypatch, world: int) -> None:
    env = {"WORLD_SIZE": world, "RANK": 0, "LOCAL_RANK": 0, "MASTER_ADDR": "localhost",
           "MASTER_PORT": 29999}  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"/"
            for p in sorted(folder.rglob("*"))}  # fmt: skip


@pytest.mark.parametrize(
    ("batch", "said"),
    [(2, r"batch_size: 2 cannot train a model with BatchNorm .*in each of the 2 processes"),
     (5, r"batch_size: 5 does not split evenly between the 2 processes")],
    ids=["batchnorm", "split"],
)  # fmt: skip
def test_a_resume_in_more_processes_is_checked_as_a_new_run_is(
    tmp_path, capsys, monkeypatch, batch, said
):
    """Before: ``torchrun --nproc_per_node=2 -m lorita train --resume NAME`` of a run with
    batch 2 and BatchNorm skipped the checks, marked the run resuming and failed at its first
    step; batch 5 was refused only after torchrun's group was up, in words for a new run."""
    cfg = {**TINY, "batch_size": batch}
    run = RunStore(tmp_path).create(cfg, name="bn")
    run.update_status(state="stopped", message="stopped", step=3)
    before = _snapshot(run.path)
    _as_torchrun(monkeypatch, 2)

    def no_group(*a, **k):
        raise AssertionError("reached torchrun's process group: the resume was not checked")

    monkeypatch.setattr("lorita.engine.init_distributed", no_group)
    capsys.readouterr()
    assert main(["train", "--resume", "bn", "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "--resume: run 'bn' cannot go on: " in err
    assert re.search(said, err), err
    assert "resume it in fewer than 2 processes" in err and "nothing was changed" in err
    assert _snapshot(run.path) == before


def test_a_resume_in_one_process_is_not_refused_for_a_start_file_gone(tmp_path, capsys):
    """The checks a resume gets leave out init_from: the checkpoint replaces those weights,
    and the run they came from may be deleted since."""
    src = RunStore(tmp_path).create(TINY, name="src")
    assert train(TINY, src)["state"] == "completed"
    cfg = {**TINY, "init_from": src.start_file()}
    run = RunStore(tmp_path).create(cfg, name="child")
    assert train(cfg, run, stop=lambda: True)["state"] == "stopped"
    RunStore(tmp_path).delete("src")
    capsys.readouterr()
    assert main(["train", "--resume", "child", "--runs-dir", str(tmp_path), "--quiet"]) == 0
    assert run.status()["state"] == "completed"


# --------------------------------------------------------------------------- 4: in a notebook


def test_an_in_process_run_whose_status_cannot_be_written_reads_failed(tmp_path, monkeypatch,
                                                                      capsys):  # fmt: skip
    """``lt.train(cfg, run)`` in a notebook, the disk full: before, the run read "running"
    for as long as the notebook's process lived (its pid alive), in every listing."""
    run = RunStore(tmp_path).create(TINY, name="nb")
    real = runs_mod.write_json
    full = {"on": False}
    seen = []

    def write_json(path, obj, **kw):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, obj, **kw)

    def callback(event):
        if event.get("event") == "step" and event.get("step") == 2:
            other = RunStore(tmp_path).get("nb")  # read as another reader would, mid-run
            seen.append((other.status()["state"], other.is_alive()))
            full["on"] = True
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs_mod, "write_json", write_json)
    with pytest.raises(OSError, match="No space"):
        train(TINY, run, callback=callback)
    monkeypatch.setattr(runs_mod, "write_json", real)
    assert seen == [("running", True)]  # while it trained: running, not failed
    assert run.raw_status()["state"] == "running"  # what the file still says
    assert run.status()["state"] == "running"  # (its heartbeat only just stopped)
    _heartbeat_ago(run, runs_mod.STALE_S + 5)  # some seconds later
    places = _everywhere(tmp_path, "nb", capsys)
    for where, (state, message) in places.items():
        assert state == "failed", where
        assert "could not write status.json" in message and f"pid {os.getpid()}" in message
        assert "lorita train --resume nb" in message
    assert not run.is_alive()
    # resumable at once, from a terminal, while the notebook's process lives on
    cmd = [sys.executable, "-m", "lorita", *_command_in(places["status"][1]), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert run.status()["state"] == "completed"


def _heartbeat_ago(run, seconds: float) -> None:
    status = json.loads((run.path / "status.json").read_text())
    status["heartbeat"] = time.time() - seconds
    (run.path / "status.json").write_text(json.dumps(status))


def test_a_run_held_by_a_live_trainer_reads_running_even_with_its_lock_probed(tmp_path):
    """The lock probe never takes a live run for one given up: a run marked running whose
    writer lock this process holds (another Run object) reads running."""
    run = RunStore(tmp_path).create(TINY, name="held")
    run.hold()
    try:
        run.update_status(state="running", pid=os.getpid())
        _heartbeat_ago(run, 3600)  # a paused trainer (Ctrl-Z) still holds its run
        assert RunStore(tmp_path).get("held").status()["state"] == "running"
    finally:
        run.release()
    assert RunStore(tmp_path).get("held").status()["state"] == "failed"
    run.update_status(state="running", pid=os.getpid())  # a fresh heartbeat: running still
    assert RunStore(tmp_path).get("held").status()["state"] == "running"


def test_a_resume_of_a_run_still_training_says_how_to_stop_it(tmp_path, capsys):
    """Before: "--resume: run 'live' is still running (pid N)", and nothing to do."""
    run = RunStore(tmp_path).create(TINY, name="live")
    trainer = RunStore(tmp_path).get("live")
    trainer.hold()
    try:
        trainer.update_status(state="running", pid=os.getpid())
        capsys.readouterr()
        assert main(["train", "--resume", "live", "--runs-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"is still running (pid {os.getpid()}); stop it (lorita stop live" in err, err
        assert main(_command_in(err.split("; stop it ", 1)[1])) == 0  # the stop it names
        assert run.stop_requested()
    finally:
        trainer.release()


# --------------------------------------------------------------------------- compress / export


def test_export_of_a_killed_run_says_to_resume_it_first_and_that_command_works(tmp_path, capsys):
    """Before: the export of the model as trained said nothing of the run not finished (a cut
    export said "this is its best checkpoint so far", and not how to get the run's end)."""
    run = RunStore(tmp_path).create(TINY, name="e")
    assert train(TINY, run)["state"] == "completed"
    _killed(run, step=5, total_steps=36)  # (as if killed at step 5: its best kept)
    capsys.readouterr()
    out = tmp_path / "e.safetensors"
    assert main(["export", "e", "--runs-dir", str(tmp_path), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "run 'e' is failed at step 5/36: this is its best checkpoint so far (to cut the run " \
           "trained to its end, resume it first: lorita train --resume e --runs-dir" in err, err  # fmt: skip
    assert out.is_file()


@pytest.mark.parametrize(("state", "said"), [
    ("failed", "it is failed and wrote none: train it again or resume it, lorita train --resume n"),
    ("completed", "it is completed and wrote none: train it again)"),
])  # fmt: skip
def test_compress_of_a_run_without_its_checkpoint_names_a_next_step_that_works(
    tmp_path, capsys, state, said
):
    """Before: a completed run whose best checkpoint was removed was told to resume, which
    is refused for a completed run."""
    run = RunStore(tmp_path).create(TINY, name="n")
    run.update_status(state=state)
    capsys.readouterr()
    assert main(["compress", "n", "--runs-dir", str(tmp_path), "--uniform", "0.5"]) == 2
    err = capsys.readouterr().err
    assert said in err, err


def test_a_stopped_training_names_the_command_that_goes_on(tmp_path):
    """`lorita train` stopped on request ended with "stopped at step N on request" and the
    run's folder, but no next step; it now names the resume command (which completes it)."""
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": "1", "LORITA_RUNS": str(runs)}  # fmt: skip
    cmd = [sys.executable, "-m", "lorita", "train", "--name", "s", "--epochs", "200",
           "--model-arg", "width=16", "--model-arg", "depth=2", "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not ((runs / "s").is_dir() and RunStore(runs).get("s").last_checkpoint_step()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        RunStore(runs).get("s").request_stop()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert out.rstrip().endswith("to go on from its last checkpoint: lorita train --resume s")
