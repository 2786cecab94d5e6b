"""DDP under torchrun: two CPU processes on gloo train like one process with the same batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorita.engine import TrainConfig, train
from lorita.runs import RunStore

ROOT = Path(__file__).resolve().parents[1]
# no BatchNorm and plain SGD: then two processes with half batches each must follow the
# single-process run exactly (same global batches, gradients averaged), up to rounding
FLAGS = [
    "--model-arg",
    "width=32",
    "--model-arg",
    "batchnorm=false",
    "--optimizer",
    "sgd",
    "--lr",
    "0.1",
    "--epochs",
    "2",
    "--spectra-every",
    "10",
    "--device",
    "cpu",
]


def _torchrun(runs: Path, name: str, *flags: str) -> tuple[dict, list[str]]:
    """The environment and command line of ``lorita train`` in two gloo processes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = ["torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return env, [sys.executable, "-m", *run, "-m", "lorita", "train", "--runs-dir", str(runs),
                 "--name", name, *flags]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("plain", [[], ["--plain-epochs", "1"]], ids=["composed", "plain first"])
def test_torchrun_two_gloo_processes_match_one_process(tmp_path, plain):
    """With a plain epoch first, the composed model is wrapped in DDP anew at the switch."""
    env, cmd = _torchrun(tmp_path, "ddp", *FLAGS, *plain)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "ddp")  # rank 0 alone prints
    assert out.stderr.count("run folder:") == 1

    run = RunStore(tmp_path).get("ddp")
    st = run.status()
    assert st["state"] == "completed" and st["world_size"] == 2 and st["step"] == 40
    vals = run.metrics("val")
    assert [r["step"] for r in vals] == [20, 40]  # written once, by rank 0
    train_rows = run.metrics("train")
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert len(run.spectra()) >= 2 and [p.name for p in tmp_path.iterdir()] == ["ddp"]

    torch.set_num_threads(1)
    cfg = TrainConfig.from_dict(json.loads((tmp_path / "ddp" / "config.json").read_text()))
    single = train(cfg)
    assert vals[-1]["loss"] == pytest.approx(single["val"]["loss"], rel=1e-3)
    model = run.load_model("last")
    assert any(".factors." in k for k in model.state_dict())  # composed, plain epoch or not
    x = run.load_splits().val[torch.arange(32)][0]
    torch.testing.assert_close(model(x), single["model"].eval()(x), rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_a_process_killed_under_torchrun_fails_the_run_with_one_line(tmp_path):
    """Rank 1 killed mid-training: rank 0's collective fails; the run is marked failed with
    what happened and how to go on, not the collective library's own text."""
    import signal
    import time

    import psutil

    flags = ["--model-arg", "width=32", "--lr", "0.001", "--epochs", "200", "--spectra-every", "0"]
    env, cmd = _torchrun(tmp_path, "dk", *flags, "--device", "cpu")  # trains on until cut short
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        status, deadline = tmp_path / "dk" / "status.json", time.time() + 180
        while time.time() < deadline:
            try:
                if json.loads(status.read_text()).get("step", 0) > 3:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        ranks = [c for c in psutil.Process(proc.pid).children(recursive=True)
                 if c.environ().get("RANK") == "1"]  # fmt: skip
        assert ranks, "rank 1 not found"
        ranks[0].send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    st = json.loads(status.read_text())
    assert st["state"] == "failed" and "another process of this run" in st["message"], st
    assert "--resume dk" in st["message"]
    assert "lorita: training failed: another process of this run" in err


def test_a_resume_refused_under_torchrun_is_said_by_process_0_alone(tmp_path):
    """Process 0 refuses the resume (the run completed); the other learns that it refused and
    ends silently, not with an error of its own from reading a run it does not hold, nor a
    traceback from a collective left waiting. (torchrun's launcher then reports the exit
    code in its own words.)"""
    done = RunStore(tmp_path).create({"dataset": "digits", "device": "cpu"}, name="done")
    done.update_status(state="completed")
    env, cmd = _torchrun(tmp_path, "done", "--resume")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in out.stderr.splitlines() if "lorita: error" in line]
    assert out.returncode != 0 and "/lorita/" not in out.stderr, out.stderr
    assert errors == ["lorita: error: --resume: run 'done' already completed; nothing "
                      "to resume (its result is kept as it is)"], out.stderr  # fmt: skip
