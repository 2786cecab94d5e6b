"""Training under torchrun with a model and images of one's own: a torchvision network on a
folder whose image count does not split between the processes, started from a weights file,
plain epochs then composed; the run the two processes wrote compressed by the one-process
command line, loaded back and listed by the app; a queue wait longer than a collective's
timeout; the warnings of the checks said once. (tests/test_ddp.py and
tests/test_ddp_moments_qa.py have the runs on the built-in models.)"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import lorita as lt
from lorita.cli import main
from lorita.runs import RunStore

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT")  # fmt: skip

# ``lorita train`` as ``python -m lorita`` runs it, with the collectives' timeout (30 minutes on
# gloo) shortened when a test asks for it through the environment (the trade-off curves a
# finished run keeps are off in the tests: LORITA_CURVES, tests/conftest.py)
WRAPPER = """
import os, sys
from datetime import timedelta
if os.environ.get("QA_PG_TIMEOUT"):
    import torch.distributed.distributed_c10d as c10d
    c10d.default_pg_timeout = timedelta(seconds=float(os.environ["QA_PG_TIMEOUT"]))
from lorita.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _images(root: Path, per_class: int = 13, side: int = 20, stray: bool = True) -> Path:
    """3 classes of ``per_class`` PNG images (39: an odd count), each class a brightness of
    its own; ``stray``: one more image beside the class folders (in no class)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(("cat", "dog", "emu")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.random((side, side, 3)) * 80 + 60 * k
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    if stray:
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(root / "stray.png")
    return root


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and k != "LORITA_RUNS"}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _torchrun(tmp_path: Path, *flags: str) -> list[str]:
    wrapper = tmp_path / "lorita_main.py"
    wrapper.write_text(WRAPPER)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(wrapper), "train", "--device", "cpu", "--spectra-every", "0", *flags]  # fmt: skip


# --------------------------------------------------------------------------- said once


def test_a_check_warning_is_said_by_the_first_process_alone(tmp_path, monkeypatch, capsys):
    """Before: the folder check's warning (an image beside the class folders is left out)
    came once per torchrun process, as every process checks the command line before the
    group starts; errors there were already said by the first process alone."""
    import lorita.cli

    images = _images(tmp_path / "images", per_class=2, side=8)
    for name in TORCHRUN_VARS + ("LORITA_RUNS",):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(lorita.cli, "_TORCHRUN_LINGER_S", 0.0)
    monkeypatch.setenv("LORITA_DATA", str(tmp_path / "data"))
    argv = ["train", "--runs-dir", str(tmp_path / "runs"), "--device", "cpu", "--dataset",
            f"folder:{images}", "--data-arg", "size=8", "--batch-size", "5"]  # fmt: skip
    said = {}
    for rank in (1, 0):  # a batch of 5 does not split between 2: refused before the group
        env = {"WORLD_SIZE": 2, "RANK": rank, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": 2,
               "MASTER_ADDR": "localhost", "MASTER_PORT": 29999}  # fmt: skip
        for k, v in env.items():
            monkeypatch.setenv(k, str(v))
        assert main(argv) == 2
        said[rank] = capsys.readouterr().err.splitlines()
    warned = [line for line in said[0] if line.startswith("lorita: warning:")]
    assert any("stray.png" in line and "left out" in line for line in warned), said[0]
    assert said[0][-1].startswith("lorita: error: batch_size: 5 does not split evenly")
    assert said[1] == []  # neither the warning nor the error a second time
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# --------------------------------------------------------------------------- under torchrun


@pytest.mark.slow
def test_queued_past_the_collective_timeout_then_logs_the_whole_batch(tmp_path):
    """Two bugs of one run, an MLP without BatchNorm on a folder of images:

    * Before: with ``--max-concurrent``, process 0 waited for a slot while the other waited
      in a collective; a wait longer than its timeout (30 minutes on gloo, 3 s here) ended
      that process, and torchrun then ended the run ("stopped while queued").
    * Before: the training-loss lines (loss and accuracy) were process 0's half of each
      batch; they are now the whole batch's, those one process writes."""
    images = _images(tmp_path / "images", stray=False)
    slots = tmp_path / "runs" / ".slots"
    slots.mkdir(parents=True)
    holder = subprocess.Popen(  # the slot taken by another run until told to let it go
        [sys.executable, "-c", "import sys; from filelock import FileLock; "
         "l = FileLock(sys.argv[1], thread_local=False); l.acquire(); print('held', flush=True);"
         " sys.stdin.read()", str(slots / "slot-0.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    flags = ["--runs-dir", str(tmp_path / "runs"), "--name", "q", "--max-concurrent", "1",
             "--dataset", f"folder:{images}", "--data-arg", "size=8", "--model-arg", "width=16",
             "--model-arg", "batchnorm=false", "--optimizer", "sgd", "--lr", "0.05",
             "--epochs", "2", "--batch-size", "8", "--log-every", "1"]  # fmt: skip
    proc = subprocess.Popen(_torchrun(tmp_path, *flags), env=_env(QA_PG_TIMEOUT="3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        status, queued_at, deadline = (
            tmp_path / "runs" / "q" / "status.json",
            None,
            time.time() + 120,
        )
        while time.time() < deadline and proc.poll() is None:
            try:
                if "waiting for a training slot" in json.loads(status.read_text())["message"]:
                    queued_at = queued_at or time.time()
            except (OSError, ValueError, KeyError):
                pass
            if queued_at and time.time() - queued_at > 6:  # twice the collectives' timeout
                break
            time.sleep(0.2)
        assert queued_at, "the run was not queued"
        holder.stdin.close()  # the slot is free
        out, err = proc.communicate(timeout=180)
    finally:
        for p in (proc, holder):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert proc.returncode == 0, err[-3000:]
    run = RunStore(tmp_path / "runs").get("q")
    assert run.status()["state"] == "completed" and run.status()["world_size"] == 2
    rows = run.metrics("train")

    torch.set_num_threads(1)
    one = RunStore(tmp_path / "one").create(run.config, name="one")
    assert lt.train(run.config, one)["state"] == "completed"
    ones = one.metrics("train")
    assert [r["step"] for r in rows] == [r["step"] for r in ones] == list(range(1, 7))
    assert [r["acc"] for r in rows] == [r["acc"] for r in ones]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ones], rel=1e-4)


@pytest.mark.slow
def test_a_torchvision_model_on_an_odd_folder_from_a_file_then_compressed_and_listed(
    tmp_path, monkeypatch
):
    """torchvision:mobilenet_v3_small (BatchNorm, dropout) in two processes on 39 images (an
    odd count) with one beside the class folders, started from a weights file with a head of
    another size, one plain epoch then composed at half the learning rate: every note said
    once, the same step count as one process; the checkpoint's BatchNorms counted every step;
    then `lorita compress` in one process writes a file that loads back, and the app's Runs
    page lists the run."""
    images = _images(tmp_path / "images")
    monkeypatch.setenv("LORITA_DATA", str(tmp_path / "data"))
    torch.manual_seed(1)
    import torchvision

    start = torchvision.models.mobilenet_v3_small(num_classes=5)
    torch.save(start.state_dict(), tmp_path / "start.pt")
    runs = tmp_path / "runs"
    flags = ["--runs-dir", str(runs), "--name", "mb", "--dataset", f"folder:{images}",
             "--data-arg", "size=16", "--model", "torchvision:mobilenet_v3_small", "--epochs",
             "2", "--plain-epochs", "1", "--composed-lr-scale", "0.5", "--schedule", "none",
             "--lr", "0.002", "--batch-size", "8", "--log-every", "1", "--init-from",
             str(tmp_path / "start.pt")]  # fmt: skip
    out = subprocess.run(_torchrun(tmp_path, *flags), env=_env(LORITA_DATA=str(tmp_path / "data")),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    err = out.stderr.splitlines()
    assert sum("stray.png" in line for line in err) == 1, out.stderr  # the warning, once
    assert sum("classifier.3" in line and "fresh init" in line for line in err) == 1, err
    assert sum("composed into N=3 factors" in line for line in err) == 1, err
    assert out.stdout.strip().splitlines()[-1] == str(runs / "mb")

    run = RunStore(runs).get("mb")
    st = run.status()
    assert st["state"] == "completed" and st["world_size"] == 2
    splits = run.load_splits()
    assert len(splits.train) % 8 != 0  # a ragged last batch, dropped as one process drops it
    steps = 2 * (len(splits.train) // 8)
    assert st["step"] == st["total_steps"] == steps
    lrs = [r["lr"] for r in run.metrics("train")]
    assert lrs == [0.002] * (steps // 2) + [0.001] * (steps // 2)
    from safetensors.torch import load_file

    last = load_file(str(run.checkpoint_dir / "last.safetensors"))
    counted = {k: int(v) for k, v in last.items() if k.endswith("num_batches_tracked")}
    assert counted and set(counted.values()) == {steps}  # every step's batch, both phases
    assert any(".factors." in k for k in last)

    torch.set_num_threads(1)
    monkeypatch.delenv("LORITA_RUNS", raising=False)
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    cut = tmp_path / "cut.safetensors"
    assert main(["compress", "--runs-dir", str(runs), "mb", "--uniform", "0.5", "--out",
                 str(cut)]) == 0  # fmt: skip
    model = lt.load(str(cut)).eval()
    x = splits.test[torch.arange(len(splits.test))][0]
    assert model(x).shape == (len(x), 3) and torch.isfinite(model(x)).all()

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LORITA_RUNS", str(runs))
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=300).run()
    at.switch_page("pages/runs.py").run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    table = at.dataframe[0].value
    assert list(table["run"]) == ["mb"] and list(table["state"]) == ["completed"]
