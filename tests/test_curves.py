"""Trade-off curves kept in a run folder (lorita.curves) and the training process's hook
that sweeps them when a run completes (lorita.engine.train(on_complete=...))."""

from __future__ import annotations

import os

import pytest

import lorita as lt
from lorita import curves
from lorita.engine import train
from lorita.runs import RunStore

TINY = {
    "dataset": "digits",
    "model": "mlp",
    "model_kwargs": {"depth": 2, "width": 32},
    "n_factors": 3,
    "epochs": 1,
    "batch_size": 64,
    "seed": 0,
    "device": "cpu",
    "spectra_every": 50,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished run whose training process kept its default curves (and its result)."""
    store = RunStore(tmp_path_factory.mktemp("curves"))
    run = store.create(TINY, name="tiny")
    result = train(TINY, run, on_complete=curves.prepare)
    assert result["state"] == "completed" and "on_complete_error" not in result
    return run


def test_the_kept_curve_is_what_a_compress_session_sweeps(done):
    kept = curves.stored(done, "best", "global")
    assert kept is not None and len(kept) == len(lt.truncation.Global.sweep())
    fresh = lt.Compressor(done, which="best").curve("global", parts=("val",))
    assert kept == [{k: v for k, v in p.items() if k != "ranks"} for p in fresh]
    assert {"value", "params_pct", "flops_pct", "val_acc"} <= set(kept[0])
    assert "test_acc" not in kept[0]  # selection data only: test reports a chosen model
    cuts = curves.kept_cuts(done, "best")  # every distinct cut of the slider, measured once
    res = lt.Compressor(done, which="best").apply(lt.Global(0.42))
    row = cuts[curves.ranks_key(res.model.lorita_ranks)]
    assert row == {"params": res.params, "flops": res.flops, "params_pct": res.params_pct,
                   "flops_pct": res.flops_pct, **res.metrics}  # fmt: skip


def test_a_curve_that_cannot_be_kept_is_still_returned(done, monkeypatch):
    """A read-only or full run folder: another policy's curve is computed and shown, only not
    kept (a warning says so), instead of failing the Compress page."""
    monkeypatch.setattr(type(done), "write_extra", lambda self, k, v: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))  # fmt: skip
    with pytest.warns(UserWarning, match="energy curve is not kept for next time"):
        points = curves.compute(lt.Compressor(done, which="best"), "energy", done)
    assert len(points) == len(lt.truncation.Energy.sweep())


def test_a_changed_checkpoint_makes_the_curve_stale(done):
    assert curves.prepare(done) == {}  # already kept: nothing swept again
    ckpt = done.checkpoint("best")
    st = ckpt.stat()
    os.utime(ckpt, (st.st_atime, st.st_mtime + 5))
    try:
        assert curves.stored(done, "best", "global") is None
        done_now = curves.prepare(done, policies=("global", "uniform"))
        assert done_now["tradeoff-best-global"] == done_now["tradeoff-best-uniform"] == 25
        assert done_now["cuts-best"] == len(curves.kept_cuts(done, "best")) > 25
        assert curves.stored(done, "best", "uniform") is not None
    finally:
        os.utime(ckpt, (st.st_atime, st.st_mtime))


def test_an_error_after_completion_leaves_the_run_completed(tmp_path):
    run = RunStore(tmp_path).create(TINY, name="tiny")

    def broken(run, splits):
        raise RuntimeError("disk full")

    result = train(TINY, run, on_complete=broken)
    assert result["state"] == "completed"
    assert result["on_complete_error"] == "RuntimeError: disk full"
    assert run.status()["state"] == "completed"
    assert curves.stored(run, "best", "global") is None


def test_train_keeps_the_curves_unless_told_not_to(tmp_path, monkeypatch, capsys):
    """`lorita train` keeps the default curve and the slider's cuts of a composed run when it
    completes; --no-curves or LORITA_CURVES=0 keep none (the page sweeps them when opened),
    --curves wins over the variable, and any other value of it is refused by name."""
    from lorita.cli import main

    flags = ["--runs-dir", str(tmp_path), "--quiet", "--threads", "1", "--epochs", "1",
             "--model-arg", "width=16", "--spectra-every", "0"]  # fmt: skip

    def kept(name: str, *extra: str) -> list[str]:
        assert main(["train", "--name", name, *flags, *extra]) == 0
        return sorted(p.name for p in (tmp_path / name / "extra").glob("*.json"))

    monkeypatch.setenv("LORITA_CURVES", "1")
    assert kept("on") == ["cuts-best.json", "tradeoff-best-global.json"]
    assert kept("off", "--no-curves") == []
    monkeypatch.setenv("LORITA_CURVES", "0")
    assert kept("env-off") == []
    assert kept("flag-on", "--curves") == ["cuts-best.json", "tradeoff-best-global.json"]
    monkeypatch.setenv("LORITA_CURVES", "yes")
    capsys.readouterr()
    assert main(["train", "--name", "bad", *flags]) == 2
    assert "LORITA_CURVES" in capsys.readouterr().err and not (tmp_path / "bad").exists()
