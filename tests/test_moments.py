"""The moments around training a user meets: a damaged decoding cache, a run folder removed
while its writer runs, a disk that is full or read-only, a --runs-dir inside a file, and an
interrupt while a finished run's trade-off curves are being kept."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading

import numpy as np
import pytest
import torch

import lorita as lt
from lorita import curves
from lorita.cli import main
from lorita.engine import checkpoint, train
from lorita.io import atomic_write_bytes, temp_beside
from lorita.runs import Run, RunStore

TINY = {
    "dataset": "digits",
    "model": "mlp",
    "model_kwargs": {"depth": 2, "width": 16},
    "n_factors": 3,
    "epochs": 1,
    "batch_size": 64,
    "seed": 0,
    "device": "cpu",
    "spectra_every": 50,
}


@pytest.fixture(autouse=True)
def _data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LORITA_DATA", str(tmp_path / "data"))


def _images(root, classes=("a", "b"), per_class=4):
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
            arr[..., 0] = 100 * k
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


# --------------------------------------------------------------------------- decoding cache


def _damage(path, how: str) -> None:
    good = path.read_bytes()
    if how == "empty":  # what a power cut after the rename can leave
        path.write_bytes(b"")
    elif how == "cut short":
        path.write_bytes(good[: len(good) // 2])
    elif how == "bit rot":
        bad = bytearray(good)
        for i in range(200, 260):
            bad[i] ^= 0xFF
        path.write_bytes(bytes(bad))
    elif how == "other shapes":
        with open(path, "wb") as f:  # a readable archive, but not of these images
            np.savez(f, train_x=np.zeros((1, 3, 2, 2), np.uint8), train_y=np.zeros(1, np.int64))


@pytest.mark.parametrize("how", ["empty", "cut short", "bit rot", "other shapes"])
def test_a_damaged_decoding_cache_is_decoded_again_and_replaced(tmp_path, how):
    root = _images(tmp_path / "imgs")
    first = lt.load_dataset(f"folder:{root}", size=6)
    (cache,) = (tmp_path / "data" / "folder-cache").glob("*.npz")
    good = cache.read_bytes()
    _damage(cache, how)
    again = lt.load_dataset(f"folder:{root}", size=6)
    assert torch.equal(again.train.x, first.train.x) and torch.equal(again.test.y, first.test.y)
    assert cache.read_bytes() == good


def test_a_killed_decodings_temporary_file_is_removed_whatever_its_key(tmp_path):
    root = _images(tmp_path / "imgs")
    folder = tmp_path / "data" / "folder-cache"
    folder.mkdir(parents=True)
    dead = folder / ".0123456789abcdef.npz.999999999.1.tmp"  # a pid no process has
    dead.write_bytes(b"PK\x03\x04half")
    lt.load_dataset(f"folder:{root}", size=6)
    assert sorted(p.suffix for p in folder.iterdir()) == [".npz"]


# --------------------------------------------------------------------------- runs started together


def test_runs_started_together_without_a_name_each_get_one(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    store.create({"dataset": "digits"}, name="digits-run")
    names = iter(["digits-run", "digits-run-2"])  # the first one taken since it was chosen
    monkeypatch.setattr(RunStore, "new_name", lambda self, config, suffix="": next(names))
    assert store.create({"dataset": "digits"}).name == "digits-run-2"
    with pytest.raises(ValueError, match="run name: 'digits-run' already exists"):
        store.create({"dataset": "digits"}, name="digits-run")  # a name asked for is kept
    monkeypatch.undo()
    start, made = threading.Barrier(6), []

    def create():
        start.wait()
        made.append(RunStore(tmp_path / "together").create({"dataset": "digits"}).name)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 6


# --------------------------------------------------------------------------- a run folder removed


def test_a_writer_never_brings_back_a_removed_run_folder(tmp_path):
    store = RunStore(tmp_path)
    run = store.create({"dataset": "digits"}, name="gone")
    shutil.rmtree(run.path)
    for write in (
        lambda: run.update_status(state="running"),
        lambda: run.log_metrics({"step": 1}),
        lambda: run.log_spectra({"step": 1}),
        lambda: run.write_result({"state": "completed"}),
        lambda: run.write_extra("tradeoff-best-global", {}),
    ):
        with pytest.raises(FileNotFoundError, match="'gone'.*gone .removed or renamed"):
            write()
    with pytest.raises(FileNotFoundError):
        checkpoint.publish_best(run.checkpoint_dir, torch.nn.Sequential(), {})
    with pytest.raises(FileNotFoundError):
        checkpoint.save(run.checkpoint_dir, None, None, None, counters={}, rng={}, meta={})
    assert not run.path.exists()
    assert store.list() == [] and not store.exists("gone")


def test_training_stops_with_a_clear_error_when_its_folder_is_renamed(tmp_path):
    store = RunStore(tmp_path)
    run = store.create(TINY, name="a")
    moved = []

    def event(ev):
        if ev.get("event") == "step" and not moved:
            moved.append(run.path.rename(tmp_path / "b"))

    with pytest.raises(OSError, match="'a'"):
        train({**TINY, "epochs": 2}, run, callback=event)
    assert not (tmp_path / "a").exists()
    assert [r.name for r in store.list()] == ["b"]  # resumable under its new name, once
    # this process is gone (here it lives on, so the run still reads as running)


# --------------------------------------------------------------------------- disk full, read-only


def test_the_error_that_ended_a_run_is_raised_even_when_its_status_cannot_be_written(
    tmp_path, monkeypatch
):
    run = RunStore(tmp_path).create(TINY, name="a")
    write = Run.update_status

    def full_disk(self, **fields):
        if fields.get("state") == "failed":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, **fields)

    def event(ev):
        if ev.get("event") == "step":
            raise RuntimeError("the run's own failure")

    monkeypatch.setattr(Run, "update_status", full_disk)
    with pytest.raises(RuntimeError, match="the run's own failure"):
        train(TINY, run, callback=event)


def test_a_disk_that_fills_during_a_checkpoint_fails_the_run_saying_so_and_it_resumes(
    tmp_path, monkeypatch, capsys
):
    """The half-written checkpoint is removed (it holds the last free bytes), the status says
    the disk is full, the command exits 1 (a training failure, not bad input), and once there
    is room again the run resumes from its last whole checkpoint."""
    write = checkpoint._write_synced
    calls = []

    def fills(path, data):
        calls.append(path.name)
        if path.name == "state.safetensors" and calls.count("state.safetensors") == 2:
            raise checkpoint.cannot_write(path, OSError(errno.ENOSPC, "No space left on device"))
        return write(path, data)

    monkeypatch.setattr(checkpoint, "_write_synced", fills)
    argv = ["train", "--runs-dir", str(tmp_path), "--name", "a", "--epochs", "3", "--quiet",
            "--model-arg", "width=16", "--model-arg", "depth=2", "--threads", "1"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "lorita: training failed:" in err and "No space left on device" in err
    run = RunStore(tmp_path).get("a")
    assert run.status()["state"] == "failed" and "No space left" in run.status()["message"]
    assert not [p for p in run.checkpoint_dir.iterdir() if p.name.startswith(".tmp")]
    monkeypatch.setattr(checkpoint, "_write_synced", write)
    assert main(["train", "--runs-dir", str(tmp_path), "--resume", "a", "--quiet"]) == 0
    assert run.status()["state"] == "completed"


def test_a_failed_write_names_the_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match=f"cannot write '{target}': No space left") as e:
        atomic_write_bytes(target, b"new")
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert target.read_bytes() == b"old"


def test_a_temporary_file_that_cannot_be_removed_does_not_hide_the_error(tmp_path, monkeypatch):
    def read_only(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "fsync", read_only)
    monkeypatch.setattr(type(temp_beside(tmp_path / "x")), "unlink", read_only)
    with pytest.raises(OSError, match="cannot write .*x.json': Read-only"):
        atomic_write_bytes(tmp_path / "x.json", b"{}")


def test_runs_dir_inside_a_file_is_refused_naming_the_flag(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    below = tmp_path / "afile" / "sub" / "runs"
    for argv in (["runs", "--runs-dir", str(below)], ["train", "--runs-dir", str(below)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lorita: error: argument --runs-dir:") and "is a file" in err
    with pytest.raises(ValueError, match="runs folder: cannot make"):
        RunStore(below).create({"dataset": "digits"}, name="r")


# --------------------------------------------------------------------------- curves interrupted


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished composed run whose curves were not kept (training called nothing after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = RunStore(tmp_path_factory.mktemp("moments")).create(TINY, name="tiny")
    assert train(TINY, run)["state"] == "completed"
    torch.set_num_threads(threads)
    return run


def test_an_interrupt_while_the_curves_are_kept_ends_that_at_once(finished, tmp_path):
    run = Run(shutil.copytree(finished.path, tmp_path / "tiny"))
    assert curves.prepare(run, stop=lambda: True) == {}
    asked = iter([False] * 3 + [True] * 1000)
    assert curves.prepare(run, stop=lambda: next(asked)) == {}  # stopped inside the sweep
    assert not (run.path / "extra").exists() or not list((run.path / "extra").iterdir())
    assert curves.stored(run, "best", "global") is None


def test_the_cuts_measured_before_an_interrupt_are_kept(finished, tmp_path):
    run = Run(shutil.copytree(finished.path, tmp_path / "tiny"))
    session = lt.Compressor(run, which="best")
    asked = iter([False] * 2 + [True] * 1000)
    rows = curves.measure_grid(session, "global", run, stop=lambda: next(asked))
    assert 1 <= len(rows) <= 3 and curves.kept_cuts(run, "best") == rows


def test_a_killed_writers_temporary_file_beside_the_curves_is_removed(tmp_path):
    run = RunStore(tmp_path).create({"dataset": "digits"}, name="r")
    (run.path / "extra").mkdir()
    dead = run.path / "extra" / ".cuts-best.json.999999999.1.tmp"  # a pid no process has
    dead.write_text('{"half')
    run.write_extra("tradeoff-best-global", {"points": []})
    assert sorted(p.name for p in (run.path / "extra").iterdir()) == ["tradeoff-best-global.json"]


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_while_a_file_is_written_leaves_nothing_behind(finished, tmp_path, monkeypatch):
    def ignore(signum, frame):  # without the command's own handler: a plain failure
        pass

    before = signal.signal(signal.SIGTERM, ignore)
    fsync = os.fsync

    def term(fd):  # SIGTERM arrives while the file is half written
        os.kill(os.getpid(), signal.SIGTERM)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", term)
    out = tmp_path / "out"
    out.mkdir()
    try:
        assert main(["export", str(finished.path), "--out", str(out / "m.safetensors")]) == 130
        assert signal.getsignal(signal.SIGTERM) is ignore
    finally:
        signal.signal(signal.SIGTERM, before)
    assert list(out.iterdir()) == []
