"""The training loop: a real short run, reproducibility, divergence, stop, resume, fine-tuning."""

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import lorita as lt
from lorita.engine import TrainConfig, evaluate, finetune, load_splits, train
from lorita.runs import RunStore

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"model_kwargs": {"width": 32, "depth": 2}, "epochs": 2, "spectra_every": 5}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_config_validation_names_field_value_and_allowed():
    cases = [
        ({"lr": 0}, "lr: 0"),
        ({"lr": float("nan")}, "lr"),
        ({"n_factors": 0}, "n_factors: 0"),
        ({"dataset": "imagenet"}, "dataset: .*'imagenet'.*digits"),
        ({"model": "alexnet"}, "model: .*'alexnet'.*mlp"),
        ({"optimizer": "lbfgs"}, "optimizer: 'lbfgs'.*sgd, adam, adamw"),
        ({"schedule": "linear"}, "schedule"),
        ({"epochs": 1.5}, "epochs"),
        ({"weight_decay": -1}, "weight_decay"),
        ({"device": "tpu"}, "device: 'tpu'"),
        ({"model_kwargs": {"colour": 1}}, "model_kwargs"),
        ({"augment": "yes"}, "augment"),
    ]
    for kw, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            TrainConfig(**kw)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['lr_max'\]"):
        TrainConfig.from_dict({"lr_max": 1})
    c = TrainConfig.from_dict({"lr": 1, "weight_decay": 0})  # ints are fine for floats
    assert c.lr == 1.0 and TrainConfig.from_dict(c.to_dict()) == c


def test_short_run_lowers_loss_and_writes_a_complete_folder(tmp_path):
    store = RunStore(tmp_path)
    # snapshots may take as long as the steps here, so a busy machine cannot skip them all
    cfg = TrainConfig(**SMALL, spectra_budget=1.0)
    run = store.create(cfg.to_dict(), name="short")
    events = []
    res = train(cfg, run, callback=events.append)
    assert res["state"] == "completed" and res["step"] == res["total_steps"] == 40
    kinds = {e["event"] for e in events}
    assert {"start", "step", "eval", "spectra", "checkpoint", "end"} <= kinds

    st = run.status()
    assert st["state"] == "completed" and st["ended"] >= st["started"] >= st["created"]
    assert st["step"] == 40 and st["total_steps"] == 40 and st["device"] == "cpu"
    train_rows = run.metrics("train")
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert [r["epoch"] for r in run.metrics("val")] == [0, 1]
    test_rows = run.metrics("test")
    assert {r["which"] for r in test_rows} == {"best", "last"}
    assert res["test_acc"] > 0.8 and res["best_val_acc"] > 0.8
    for r in run.metrics():
        assert {"step", "epoch", "split", "loss", "acc", "lr", "time"} <= set(r)

    spectra = run.spectra()
    assert spectra[0]["step"] == 0 and spectra[-1]["step"] == 40 and len(spectra) >= 3
    assert set(spectra[0]["layers"]) == {"fc1", "fc2", "head"}
    s = spectra[-1]["layers"]["fc2"]
    assert len(s) == 32 and s == sorted(s, reverse=True)
    # the snapshot is the merged weight's spectrum
    model = run.load_model("last")
    torch.testing.assert_close(
        torch.tensor(s), lt.layer_spectra(model)["fc2"], rtol=1e-4, atol=1e-5
    )

    for which in ("best", "last"):
        m = run.load_model(which)
        assert lt.composed_layers(m) and not m.training
    spec = lt.read_spec(run.checkpoint("best"))
    assert spec["metadata"]["val_acc"] == pytest.approx(res["best_val_acc"])
    best = run.load_model("best")
    assert evaluate(best, run.load_splits().val)["acc"] == pytest.approx(res["best_val_acc"])
    assert run.result()["state"] == "completed"
    summ = run.summary()
    assert summ["state"] == "completed" and set(summ["effective_ranks"]) == {"fc1", "fc2", "head"}


def test_seeded_runs_are_reproducible_on_cpu():
    cfg = TrainConfig(**{**SMALL, "epochs": 1, "spectra_every": 2})  # helper thread busy too
    losses = []
    for _ in range(2):
        ev = []
        res = train(cfg, callback=ev.append)
        losses.append(([e["loss"] for e in ev if e["event"] == "step"], res["val"]))
    assert losses[0] == losses[1]
    other = train(TrainConfig(**{**SMALL, "epochs": 1, "spectra_every": 0, "seed": 1}))
    assert other["val"] != losses[0][1]


def test_divergence_fails_the_run_with_the_step_and_reason(tmp_path):
    store = RunStore(tmp_path)
    cfg = TrainConfig(
        model_kwargs={"width": 32, "batchnorm": False}, optimizer="sgd", lr=9.0, epochs=3
    )
    run = store.create(cfg.to_dict(), name="div")
    res = train(cfg, run)
    assert res["state"] == "failed"
    st = run.status()
    assert st["state"] == "failed" and "diverged at step" in st["message"]
    assert "not finite" in st["message"] and "no checkpoint was written yet" in st["message"]
    assert not run.checkpoint("last").exists()


def test_divergence_after_a_checkpoint_keeps_it(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    cfg = TrainConfig(**{**SMALL, "epochs": 3})
    run = store.create(cfg.to_dict(), name="late")
    import lorita.engine.loop as loop

    real = loop.loss_fn

    def poisoned(task, ls=0.0):
        f = real(task, ls)
        calls = {"n": 0}

        def g(out, y):
            calls["n"] += 1
            loss = f(out, y)
            return loss * float("nan") if calls["n"] == 25 else loss  # mid second epoch

        return g

    monkeypatch.setattr(loop, "loss_fn", poisoned)
    res = train(cfg, run)
    assert res["state"] == "failed" and res["step"] == 24
    assert "diverged at step 25" in run.status()["message"]
    assert "checkpoint is kept" in run.status()["message"]
    assert lt.read_spec(run.checkpoint("last"))["metadata"]["step"] == 20
    m = run.load_model("last")
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_stop_file_then_resume_continues_to_the_end(tmp_path):
    store = RunStore(tmp_path)
    cfg = TrainConfig(**{**SMALL, "epochs": 3})
    run = store.create(cfg.to_dict(), name="stopme")

    def stopper(ev):
        if ev["event"] == "step" and ev["step"] == 27:
            run.request_stop()

    res = train(cfg, run, callback=stopper)
    assert res["state"] == "stopped" and res["step"] == 28  # the step under way finishes
    assert run.status()["state"] == "stopped"
    assert lt.read_spec(run.checkpoint("last"))["metadata"]["step"] == 28
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same number of processes: nothing to say
        res2 = train(cfg, run, resume=True)
    assert res2["state"] == "completed" and res2["step"] == 60
    steps = [r["step"] for r in run.metrics("train")]
    assert steps == sorted(steps) and len(steps) == len(set(steps))
    assert run.status()["state"] == "completed" and not run.stop_requested()
    with pytest.raises(ValueError, match="already completed"):
        train(cfg, run, resume=True)

    # the resumed run ends where an uninterrupted one ends
    ref = train(cfg)
    got = run.load_model("last")
    want = ref["model"].eval()
    x = run.load_splits().val[torch.arange(16)][0]
    torch.testing.assert_close(got(x), want(x), rtol=1e-4, atol=1e-4)


def test_a_resume_from_a_damaged_checkpoint_is_refused_and_changes_nothing(tmp_path):
    """A checkpoint file truncated after it was written (a disk fault, a bad copy), no other
    whole: resume refuses, naming it, instead of starting over and deleting the best model."""
    store = RunStore(tmp_path)
    cfg = TrainConfig(**{**SMALL, "epochs": 2})
    run = store.create(cfg.to_dict(), name="hurt")
    train(cfg, run, callback=lambda ev: ev["event"] == "step" and ev["step"] >= 5
          and run.request_stop())  # fmt: skip
    (ckpt,) = run.checkpoint_dir.glob("ckpt-*")
    state = next(f for f in ckpt.iterdir() if f.suffix == ".safetensors")
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 3])
    before = sorted(p.name for p in run.checkpoint_dir.iterdir())
    status = run.raw_status()
    with pytest.raises(ValueError, match=r"resume: checkpoint .*ckpt-\d+' is damaged"):
        train(cfg, run, resume=True)
    assert sorted(p.name for p in run.checkpoint_dir.iterdir()) == before
    assert run.raw_status()["state"] == status["state"] == "stopped"


def test_a_resume_in_another_number_of_processes_says_it_will_differ(tmp_path):
    store = RunStore(tmp_path)
    cfg = TrainConfig(**{**SMALL, "epochs": 2})
    run = store.create(cfg.to_dict(), name="ddp")
    train(cfg, run, callback=lambda ev: ev["event"] == "step" and run.request_stop())
    run.update_status(world_size=2)  # as a torchrun run with 2 processes leaves it
    with pytest.warns(UserWarning, match="trained in 2 process.*goes on in 1"):
        assert train(cfg, run, resume=True)["state"] == "completed"


def test_resume_after_a_killed_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "lorita",
        "train",
        "--runs-dir",
        str(tmp_path),
        "--name",
        "k",
        "--quiet",
        "--model-arg",
        "width=32",
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--spectra-every",
        "0",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path)
    ckpt = tmp_path / "k" / "checkpoints" / "last.safetensors"
    deadline = time.time() + 300  # torch's import and an epoch, on a loaded machine
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    if not ckpt.exists():
        proc.kill()
        raise AssertionError("no checkpoint written in 300 s")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = RunStore(tmp_path).get("k")
    st = run.status()
    assert st["state"] == "failed" and st["message"].startswith("process died")
    step_killed = st["step"]
    assert 0 < step_killed < 3 * 80
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorita",
            "train",
            "--runs-dir",
            str(tmp_path),
            "--name",
            "k",
            "--resume",
            "--quiet",
            "--threads",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    st = run.status()
    assert st["state"] == "completed" and st["step"] == st["total_steps"] == 3 * 80
    steps = [r["step"] for r in run.metrics("val")]
    assert steps == sorted(set(steps)) and len(steps) == 3


def test_regression_task_trains():
    cfg = TrainConfig(
        dataset="lowrank",
        dataset_kwargs={"task": "regression", "n_train": 1000},
        model_kwargs={"width": 32},
        epochs=10,
        spectra_every=0,
        lr=1e-2,
    )
    res = train(cfg)
    assert res["state"] == "completed" and res["test"]["acc"] > 0.9  # R^2


def test_evaluate_and_finetune():
    cfg = TrainConfig(**{**SMALL, "spectra_every": 0})
    splits = load_splits(cfg)
    model = train(cfg)["model"].train()  # (train returns it in eval mode)
    before = evaluate(model, splits.val)
    assert set(before) == {"loss", "acc"} and 0 <= before["acc"] <= 1
    assert model.training  # evaluate restored the mode
    small = lt.truncate(model, lt.Uniform(0.1))
    cut = evaluate(small, splits.val)["acc"]
    tuned = finetune(small, splits, epochs=2, lr=1e-3)
    after = evaluate(tuned, splits.val)["acc"]
    assert after >= cut and not tuned.training
    assert type(tuned.get_submodule("fc2")).__name__ == "LowRankLinear"
    with pytest.raises(ValueError, match="epochs"):
        finetune(small, splits, epochs=-1)


def test_checkpoints_record_how_to_feed_the_model(tmp_path):
    """Every checkpoint carries the splits' preprocessing recipe, so a run exported without
    its data still says how to feed the model; the compress session gives the same."""
    store = RunStore(tmp_path)
    cfg = {**SMALL, "epochs": 1}
    run = store.create(cfg)
    assert train(cfg, run)["state"] == "completed"
    want = load_splits(TrainConfig.from_dict(cfg)).preprocess()
    assert run.preprocess("best") == run.preprocess("last") == want
    assert want["normalize"] is not None and want["input_shape"] == [1, 8, 8]
    assert lt.Compressor(run).preprocess == want
