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


@pytest.mark.slow
@pytest.mark.parametrize("plain", [[], ["--plain-epochs", "1"]], ids=["composed", "plain first"])
def test_torchrun_two_gloo_processes_match_one_process(tmp_path, plain):
    """With a plain epoch first, the composed model is wrapped in DDP anew at the switch."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "lorita",
        "train",
        "--runs-dir",
        str(tmp_path),
        "--name",
        "ddp",
        *FLAGS,
        *plain,
    ]
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
