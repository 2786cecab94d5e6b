"""Training under torchrun, the moments around it: torchrun's environment half-set, a batch
that does not split between the processes, a ragged last batch, a process killed, a resume in
another number of processes. (tests/test_ddp.py has the plain two-process runs.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lorita.engine import TrainConfig, train
from lorita.engine.devices import DistInfo, dist_info
from lorita.engine.evaluate import evaluate
from lorita.engine.loop import _setup
from lorita.engine.preflight import check_model
from lorita.runs import RunStore

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _as_torchrun(monkeypatch, world: int, rank: int = 0) -> None:
    """torchrun's variables for one process of ``world`` (no process group is started)."""
    env = {"WORLD_SIZE": world, "RANK": rank, "LOCAL_RANK": rank, "MASTER_ADDR": "localhost",
           "MASTER_PORT": 29999}  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))


def _cmd(runs: Path, nproc: int | None, *flags: str) -> list[str]:
    run = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [sys.executable, *(run if nproc else []), "-m", "lorita", "train",
            "--runs-dir", str(runs), "--device", "cpu", *flags]  # fmt: skip


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------- torchrun's env


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"RANK": "1"}, "environment variable RANK: 1 is not below WORLD_SIZE (not set)"),
        ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29999"},
         "environment variable RANK: 3 is not below WORLD_SIZE (2)"),
        ({"WORLD_SIZE": "2"}, "environment variable RANK: not set, but WORLD_SIZE is 2"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "environment variable MASTER_ADDR: not set"),
        ({"WORLD_SIZE": "abc"}, "environment variable WORLD_SIZE: 'abc' is not allowed"),
        ({"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE: '0' is not allowed"),
    ],
    ids=["rank alone", "rank outside", "world alone", "no address", "not a number", "zero"],
)  # fmt: skip
def test_torchrun_variables_half_set_are_named(no_torchrun, env, said):
    """Before: RANK=1 alone ended in a TypeError traceback (a process that is not rank 0 of
    a world of one), a rank outside the world waited 30 minutes for its peers (deaf to
    SIGTERM), WORLD_SIZE=abc said "invalid literal for int()"."""
    for k, v in env.items():
        no_torchrun.setenv(k, v)
    with pytest.raises(ValueError, match="torchrun") as e:
        dist_info()
    assert str(e.value).startswith(said)


def test_torchrun_variables_as_torchrun_sets_them(no_torchrun):
    assert dist_info() == DistInfo(1, 0, 0)
    no_torchrun.setenv("LOCAL_RANK", "-1")  # "not distributed", as some launchers say it
    no_torchrun.setenv("RANK", "0")
    assert dist_info() == DistInfo(1, 0, 0)
    _as_torchrun(no_torchrun, 4, rank=3)
    assert dist_info() == DistInfo(4, 3, 3)


def test_rank_set_without_world_size_is_one_line_on_the_command_line(no_torchrun, tmp_path,
                                                                      capsys):  # fmt: skip
    from lorita.cli import main

    no_torchrun.setenv("RANK", "1")
    code = main(["train", "--runs-dir", str(tmp_path), "--device", "cpu", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("lorita: error: environment variable RANK: 1 is not below")
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())  # no run folder


# --------------------------------------------------------------------------- the batch


@pytest.mark.parametrize("world", [2, 3])
def test_a_batch_that_does_not_split_between_the_processes_is_refused(world):
    """Before: --batch-size 5 in 2 processes trained with a global batch of 4 (1 in 2: of 2),
    not the global batch the README promises."""
    with pytest.raises(ValueError, match=rf"^batch_size: 5 does not split evenly between the "
                                         rf"{world} processes.*multiple of {world}"):  # fmt: skip
        TrainConfig(batch_size=5).batch_per_process(False, world)
    assert TrainConfig(batch_size=6).batch_per_process(False, world) == 6 // world
    assert TrainConfig(batch_size=5).batch_per_process(False, 1) == 5
    auto = TrainConfig(batch_size=0)  # the automatic batch: rounded down to a multiple
    assert auto.batch_per_process(False, world) == auto.batch_for(False) // world


@pytest.mark.parametrize(("n_train", "world", "batch"), [(70, 2, 32), (70, 4, 32), (71, 3, 33)])
def test_processes_take_the_steps_one_process_takes(no_torchrun, n_train, world, batch):
    """Before: 63 training samples in batches of 32 took 1 step an epoch in one process and 2
    in two (the second padded with a repeated sample): another schedule, another model."""
    cfg = TrainConfig(dataset="lowrank", dataset_kwargs={"n_train": n_train, "n_test": 11},
                      batch_size=batch, device="cpu", epochs=3, model_kwargs={"width": 8})  # fmt: skip
    one = _setup(cfg, None, DistInfo(), None, None, None, epoch=0, resume=False)
    many = _setup(cfg, None, DistInfo(world, world - 1, 0), None, None, None, epoch=0, resume=False)
    if one.worker is not None:
        one.worker.close()
    assert many.per_rank * world == cfg.batch_size
    assert many.steps_per_epoch == one.steps_per_epoch == len(one.splits.train) // cfg.batch_size
    assert many.total_steps == one.total_steps


def test_batchnorm_needs_two_samples_in_every_process(no_torchrun):
    """Before: --batch-size 2 in two processes passed the checks and failed at the first step
    ("Expected more than 1 value per channel"), the run folder left failed."""
    check_model(TrainConfig(batch_size=2, device="cpu"))  # one process: 2 samples a batch
    _as_torchrun(no_torchrun, 2)
    with pytest.raises(ValueError, match=r"^batch_size: 2 cannot train a model with BatchNorm .*"
                                         r"in each of the 2 processes.*use 4 or more"):  # fmt: skip
        check_model(TrainConfig(batch_size=2, device="cpu"))
    small = {"n_train": 4, "n_test": 3}  # 2 samples left for training, 1 a process
    with pytest.raises(ValueError, match="leaves 2 sample.* needs at least 3"):
        check_model(TrainConfig(dataset="lowrank", dataset_kwargs=small, val_fraction=0.5,
                                model_kwargs={"width": 8}, device="cpu"))  # fmt: skip
    check_model(TrainConfig(batch_size=4, device="cpu", model_kwargs={"width": 8}))


# --------------------------------------------------------------------------- under torchrun


@pytest.mark.slow
def test_two_processes_on_a_ragged_split_match_one_and_count_every_sample_once(tmp_path):
    """63 training samples (not a multiple of the batch, nor of the processes), 7 validation
    and 11 test samples: the run takes one process's steps and model; its validation and test
    metrics are those of the whole splits (rank 0 alone evaluates), each line written once."""
    flags = ["--dataset", "lowrank", "--data-arg", "n_train=70", "--data-arg", "n_test=11",
             "--batch-size", "32", "--epochs", "2", "--model-arg", "width=8", "--model-arg",
             "batchnorm=false", "--optimizer", "sgd", "--lr", "0.1", "--spectra-every", "1",
             "--name", "rag"]  # fmt: skip
    out = subprocess.run(_cmd(tmp_path, 2, *flags), env=_env(), capture_output=True, text=True,
                         timeout=240)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    run = RunStore(tmp_path).get("rag")
    st = run.status()
    assert st["state"] == "completed" and st["world_size"] == 2
    assert st["step"] == st["total_steps"] == 2  # 63 // 32 = 1 step an epoch, as one process
    assert [r["step"] for r in run.metrics("val")] == [1, 2]
    assert [r["which"] for r in run.metrics("test")] == ["best", "last"]
    steps = [s["step"] for s in run.spectra()]  # (one is skipped while the last is taken)
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rag"]
    assert not [p for p in run.path.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]

    torch.set_num_threads(1)
    splits, model = run.load_splits(), run.load_model("last")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (63, 7, 11)
    val, test = evaluate(model, splits.val), evaluate(model, splits.test)
    assert run.metrics("val")[-1]["loss"] == pytest.approx(val["loss"], rel=1e-5)
    assert run.metrics("test")[-1]["acc"] == pytest.approx(test["acc"])
    assert run.metrics("test")[-1]["loss"] == pytest.approx(test["loss"], rel=1e-5)

    single = train(TrainConfig.from_dict(run.config))
    assert single["step"] == 2
    x = splits.val[torch.arange(7)][0]
    torch.testing.assert_close(model(x), single["model"](x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_rank_0_killed_leaves_the_run_failed_and_resumable_in_one_process(tmp_path):
    """kill -9 of the writing process (torchrun then ends the other): its status.json still
    says running, but the run reads as failed (its process died) in ``lorita runs``, and goes
    on from its last checkpoint in one process, saying the process count changed."""
    import psutil

    flags = ["--model-arg", "width=16", "--lr", "0.001", "--epochs", "200", "--spectra-every",
             "0", "--name", "k0"]  # fmt: skip
    proc = subprocess.Popen(_cmd(tmp_path, 2, *flags), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    status = tmp_path / "k0" / "status.json"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            try:
                if json.loads(status.read_text()).get("step", 0) > 25:  # a checkpoint is kept
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        rank0 = [c for c in psutil.Process(proc.pid).children(recursive=True)
                 if c.environ().get("RANK") == "0"]  # fmt: skip
        assert rank0, "rank 0 not found"
        rank0[0].send_signal(signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0

    row = RunStore(tmp_path).summaries()[0]  # what ``lorita runs`` lists
    assert row["name"] == "k0" and row["state"] == "failed", row

    run = RunStore(tmp_path).get("k0")
    torch.set_num_threads(1)
    with pytest.warns(UserWarning, match="trained in 2 process.* goes on in 1"):
        out = train(TrainConfig.from_dict(run.config), run, resume=True, stop=lambda: True)
    assert out["state"] == "stopped" and out["step"] > 20
    assert run.status()["state"] == "stopped" and run.status()["world_size"] == 1
