"""Runs on disk when the storage misbehaves: a write refused with ENOSPC, EDQUOT or EIO at each
writer (checkpoint, published model, status, logs, exports, uploads, kept curves), a run folder
removed while it trains, a runs folder reached through a link whose path has spaces and
non-ASCII letters, and files of a run edited by hand into garbage. Each failure is said in one
line naming the file, leaves no part-written file in place of a good one, and keeps the earlier
checkpoint so that ``--resume`` works once there is room again. (Kills at named instants are
tests/test_faults.py's, tests/test_faults_writers_qa.py's and tests/test_moments.py's.)"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lorita.engine.loop as loop
from app import compress as app_compress
from app import jobs, train_form
from lorita import baselines, curves
from lorita.cli import main
from lorita.compress import Compressor
from lorita.engine import checkpoint, train
from lorita.runs import RunStore

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "dataset": "digits",
    "model": "mlp",
    "model_kwargs": {"depth": 2, "width": 16},
    "n_factors": 3,
    "epochs": 1,
    "batch_size": 64,
    "seed": 0,
    "device": "cpu",
    "spectra_every": 5,
}
TRAIN = ["--epochs", "2", "--quiet", "--model-arg", "width=16", "--model-arg", "depth=2",
         "--threads", "1", "--spectra-every", "5"]  # fmt: skip


@pytest.fixture(autouse=True)
def _data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LORITA_DATA", str(tmp_path / "data"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished composed run (its checkpoints, logs and result), copied by each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = RunStore(tmp_path_factory.mktemp("storage")).create(TINY, name="done")
    assert train(TINY, run)["state"] == "completed"
    torch.set_num_threads(threads)
    return run


def _copy(run, root: Path, name: str):
    shutil.copytree(run.path, root / name)
    return RunStore(root).get(name)


def _refuse_writes(monkeypatch, match, err: int, after=lambda: True) -> list[str]:
    """Make every ``open`` for writing of a file whose name holds ``match`` raise ``err`` (once
    ``after()`` is true); returns the names refused."""
    real = builtins.open
    refused: list[str] = []

    def fake(file, mode="r", *a, **kw):
        name = os.path.basename(str(file))
        if any(c in mode for c in "wax+") and match in name and after():
            refused.append(name)
            raise OSError(err, os.strerror(err))
        return real(file, mode, *a, **kw)

    monkeypatch.setattr(builtins, "open", fake)
    return refused


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if p.name != ".app")


# --------------------------------------------------------------------------- the writers


@pytest.mark.parametrize(("log", "err"), [("metrics.jsonl", errno.EDQUOT),
                                          ("spectra.jsonl", errno.EIO)])  # fmt: skip
def test_a_log_that_cannot_be_appended_to_fails_the_run_saying_so_and_it_resumes(
    tmp_path, monkeypatch, capsys, log, err
):
    """After the first checkpoint, the log's next line is refused: one line naming the log
    and the cause (exit 1), the run failed with that message, its checkpoint whole; once the
    disk takes writes again, --resume completes it."""
    ckpts = tmp_path / "a" / "checkpoints"
    refused = _refuse_writes(monkeypatch, log, err, after=lambda: any(ckpts.glob("ckpt-*")))
    assert main(["train", "--runs-dir", str(tmp_path), "--name", "a", *TRAIN]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    why = os.strerror(err)
    assert lines == [f"lorita: training failed: [Errno {err}] cannot write "
                     f"'{tmp_path / 'a' / log}': {why}"]  # fmt: skip
    assert refused
    run = RunStore(tmp_path).get("a")
    assert run.status()["state"] == "failed" and why in run.status()["message"]
    assert checkpoint.latest(run.checkpoint_dir) is not None and not _leftovers(tmp_path)
    monkeypatch.undo()
    assert main(["train", "--runs-dir", str(tmp_path), "--resume", "a", "--quiet"]) == 0
    assert run.status()["state"] == "completed" and run.result()["test_acc"] is not None


def test_a_status_that_cannot_be_written_mid_run_is_a_training_failure(
    tmp_path, monkeypatch, capsys
):
    """status.json refused once the run trains (the heartbeat's writes pass over it; the
    loop's own fail it): exit 1 with one line naming status.json, as every other writer's
    failure is said, not exit 2 (the code of bad input)."""
    metrics = tmp_path / "a" / "metrics.jsonl"
    _refuse_writes(monkeypatch, "status.json", errno.EIO,
                   after=lambda: metrics.exists() and metrics.stat().st_size > 0)  # fmt: skip
    assert main(["train", "--runs-dir", str(tmp_path), "--name", "a", *TRAIN]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorita: training failed:")
    assert f"cannot write '{tmp_path / 'a' / 'status.json'}': Input/output error" in lines[0]
    assert not _leftovers(tmp_path)


def test_a_checkpoint_that_cannot_be_written_is_named_and_the_one_before_is_kept(tmp_path):
    """The error names the checkpoint being written (not its temporary folder, removed at
    once); the checkpoint before it stays the one a resume takes."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    folder = tmp_path / "checkpoints"
    kw = {"counters": {"step": 1}, "rng": {}, "meta": {}}
    first = checkpoint.save(folder, model, opt, None, **kw)
    fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    os.fsync = full
    try:
        with pytest.raises(OSError) as e:
            checkpoint.save(folder, model, opt, None, **kw)
    finally:
        os.fsync = fsync
    assert e.value.errno == errno.ENOSPC
    assert str(e.value) == (f"[Errno 28] cannot write checkpoint '{folder / 'ckpt-000002'}': "
                            "No space left on device")  # fmt: skip
    assert checkpoint.latest(folder) == first
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-000001", "last.safetensors"]


def test_a_full_disk_while_publishing_a_model_leaves_no_part_of_it_and_names_it(
    tmp_path, monkeypatch
):
    """last.safetensors is published as a hard link, or a copy where links are refused: a
    copy that fills the disk leaves no part-written file beside the old one, and says which
    file it could not write."""
    src, dst = tmp_path / "model.safetensors", tmp_path / "last.safetensors"
    src.write_bytes(b"new" * 100)
    dst.write_bytes(b"old")

    def no_link(a, b, **kw):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    def half_copy(a, b, **kw):
        Path(b).write_bytes(b"ne")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(shutil, "copyfile", half_copy)
    with pytest.raises(OSError, match=f"cannot write '{dst}': No space left") as e:
        checkpoint._link(src, dst)
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors", "model.safetensors"]
    assert dst.read_bytes() == b"old"


@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
def test_an_export_refused_by_the_disk_names_the_file_and_keeps_the_old_one(
    finished, tmp_path, monkeypatch, capsys, fmt
):
    out = tmp_path / f"m.{fmt}"
    out.write_bytes(b"the file from before")

    def quota(*a, **kw):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(os, "replace", quota)
    argv = ["export", "--runs-dir", str(finished.path.parent), "done", "--out", str(out)]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"lorita: error: --out: cannot write '{out}': Disk quota exceeded"
    )
    assert out.read_bytes() == b"the file from before"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_an_upload_cut_short_since_it_was_kept_is_written_again(tmp_path):
    """Uploads are kept under their content's hash: one cut short since (a full disk, a file
    emptied by hand) was passed to every later run as it was."""
    data = b"weights" * 50
    path = train_form.save_upload("mine.safetensors", data, root=tmp_path)
    path.write_bytes(b"")
    assert train_form.save_upload("mine.safetensors", data, root=tmp_path) == path
    assert path.read_bytes() == data
    path.write_bytes(data[:10])
    train_form.save_upload("mine.safetensors", data, root=tmp_path)
    assert path.read_bytes() == data


def test_an_upload_the_disk_refuses_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    _refuse_writes(monkeypatch, ".tmp", errno.ENOSPC)
    with pytest.raises(OSError, match="cannot write '.*uploads/[0-9a-f]{64}.pt': No space"):
        train_form.save_upload("mine.pt", b"weights", root=tmp_path)
    assert list((tmp_path / jobs.APP_DIR / train_form.UPLOAD_DIR).iterdir()) == []


def test_the_comparison_is_shown_when_the_run_folder_cannot_keep_it(tmp_path, monkeypatch):
    """The app's comparison with the baselines, computed (minutes on a large model), is
    returned when the run folder is full or read-only: only keeping it for next time is lost,
    as for the trade-off curves."""
    store = RunStore(tmp_path)
    for name in ("ours", "base"):
        store.create({"dataset": "digits"}, name=name).checkpoint("best").write_bytes(b"x")
    rows = [{"method": "lorita", "budget": 5, "test_acc": 0.5, "ranks": {}}]
    monkeypatch.setattr(baselines, "compare", lambda *a, **kw: rows)
    _refuse_writes(monkeypatch, "compare", errno.ENOSPC)
    ours = SimpleNamespace(run="ours", which="best")
    theirs = SimpleNamespace(run="base", which="best")
    with pytest.warns(UserWarning, match="not kept for next time: .*No space left"):
        got = app_compress.compute_comparison(ours, theirs, "params", root=tmp_path)
    assert got == [{"method": "lorita", "budget": 5, "test_acc": 0.5}]
    assert not (tmp_path / "ours" / "extra").exists() or not _leftovers(tmp_path / "ours")


def test_the_cuts_measured_are_returned_when_the_run_folder_cannot_keep_them(
    finished, tmp_path, monkeypatch
):
    run = _copy(finished, tmp_path, "r")
    session = Compressor(run, which="best")
    monkeypatch.setattr(curves, "GRID_BUDGET_SECONDS", 0.0)  # the first cut only
    _refuse_writes(monkeypatch, "cuts-best", errno.EIO)
    with pytest.warns(UserWarning, match="cuts are not kept for next time: .*Input/output"):
        rows = curves.measure_grid(session, "global", run)
    assert len(rows) == 1 and curves.kept_cuts(run, "best") == {}


# --------------------------------------------------------------------------- folders


def test_the_run_folder_removed_while_it_trains_ends_the_command_saying_so(
    tmp_path, monkeypatch, capsys
):
    emit = loop._emit

    def remove(s, event, **kw):
        if event == "step" and kw.get("step") == 3:
            shutil.rmtree(tmp_path / "a")
        return emit(s, event, **kw)

    monkeypatch.setattr(loop, "_emit", remove)
    assert main(["train", "--runs-dir", str(tmp_path), "--name", "a", *TRAIN]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lorita: error: run 'a': its folder '{tmp_path / 'a'}' is gone (removed or renamed "
        "while in use)"
    )
    assert list(tmp_path.iterdir()) == [] and jobs.list_runs(tmp_path) == []


def test_a_runs_folder_reached_through_a_link_with_spaces_and_accents(tmp_path, capsys):
    real = tmp_path / "real runs" / "é ü 名"
    real.mkdir(parents=True)
    root = tmp_path / "my runs"
    root.symlink_to(real, target_is_directory=True)
    assert main(["train", "--runs-dir", str(root), "--name", "a", *TRAIN]) == 0
    out = tmp_path / "modèle à.onnx"
    assert main(["export", "--runs-dir", str(root), "a", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert main(["runs", "--runs-dir", str(root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.split(str(out), 1)[1])
    assert [(r["name"], r["state"]) for r in rows] == [("a", "completed")]
    assert [(r["name"], r["state"]) for r in jobs.list_runs(root)] == [("a", "completed")]
    assert main(["runs", "--runs-dir", str(root), "--delete", "a"]) == 0
    assert root.is_symlink() and list(real.iterdir()) == []


def test_a_runs_folder_files_cannot_be_made_in_is_said_by_name(tmp_path, monkeypatch, capsys):
    """Run as root, permissions block nothing: a refused create stands in for them."""
    _refuse_writes(monkeypatch, "", errno.EACCES)
    os_open = os.open

    def no_create(path, flags, *a, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied")
        return os_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", no_create)
    assert main(["train", "--runs-dir", str(tmp_path), "--name", "a", *TRAIN]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lorita: error: runs folder: cannot make a run folder in '{tmp_path}'")
    assert "Permission denied" in err and list(tmp_path.iterdir()) == []
    with pytest.raises(PermissionError, match=f"runs folder '{tmp_path}': cannot write in it"):
        jobs.start({**TINY, "model_kwargs": {}}, root=tmp_path)


# --------------------------------------------------------------------------- files edited by hand


GARBAGE = {
    "status.json": b"",
    "metrics.jsonl": b"\x00\xff{not json\n[1]\n" + b'{"split": "val", "acc": "high"}\n',
    "spectra.jsonl": b'{"step": 1, "layers": {"fc1": [1, "x"]}}\n{"step": 2, "layers": []}\n',
    "result.json": b'{"best_val_acc": "x", "test_acc": [1]}',
}


def test_runs_with_files_edited_into_garbage_are_listed_beside_the_others(
    finished, tmp_path, capsys
):
    """One run per damaged file beside a whole one: the CLI's listing and the app's list
    it, naming the file where the run's state depends on it, and the others read as they
    are."""
    _copy(finished, tmp_path, "whole")
    for fname, data in GARBAGE.items():
        (_copy(finished, tmp_path, fname.replace(".", "-")).path / fname).write_bytes(data)
    rows = {r["name"]: r for r in jobs.list_runs(tmp_path)}
    assert rows["status-json"]["state"] == "failed"
    assert rows["status-json"]["broken"] == "status.json is not a readable JSON object"
    assert "status.json is not a readable JSON object; " in jobs.view("status-json",
                                                                      tmp_path).message  # fmt: skip
    for name in ("whole", "metrics-jsonl", "spectra-jsonl", "result-json"):
        assert rows[name]["state"] == "completed" and not rows[name]["broken"]
    assert rows["spectra-jsonl"]["effective_ranks"] == {}
    assert rows["result-json"]["test_acc"] == [1]  # (as the file says; the table shows it)
    assert main(["runs", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "status-json: broken run folder: status.json is not a readable JSON object" in out
    assert sorted(jobs.start_points(list(rows.values()), tmp_path)) == sorted(
        n for n in rows if n != "status-json"
    )


def test_compress_of_a_run_whose_status_cannot_be_read_names_the_file(finished, tmp_path, capsys):
    """Not "run 'x' is failed at step 0": its status is what cannot be read."""
    run = _copy(finished, tmp_path, "x")
    (run.path / "status.json").write_bytes(b"")
    argv = ["compress", "--runs-dir", str(tmp_path), "x", "--policy", "energy:0.9"]
    with warnings.catch_warnings():
        assert main(argv) == 0
    err = capsys.readouterr().err
    assert "lorita: warning: run 'x': status.json is not a readable JSON object" in err
    assert "failed at step" not in err


@pytest.mark.parametrize(
    "manifest",
    [b"", b"[]", json.dumps({"step": 20, "files": {"model.safetensors\u0000": 1}}).encode()],
    ids=["empty", "a list", "a name with a NUL"],
)
def test_a_resume_past_a_manifest_edited_into_garbage_names_it_and_changes_nothing(
    finished, tmp_path, capsys, manifest
):
    """The checkpoint is damaged, said by name; the run's status stays what it was (its
    message, why it failed), not "queued, resuming" and then "process died"."""
    run = _copy(finished, tmp_path, "a")
    (run.path / "result.json").unlink()
    st = {**run.raw_status(), "state": "failed", "message": "OSError: No space left on device"}
    (run.path / "status.json").write_text(json.dumps(st))
    (ckpt,) = run.checkpoint_dir.glob("ckpt-*")
    (ckpt / "manifest.json").write_bytes(manifest)
    assert main(["train", "--runs-dir", str(tmp_path), "--resume", "a", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lorita: error: resume: checkpoint '{ckpt}' is damaged (a file is not the size it was "
        "written with) and no other is whole; nothing was changed: move that folder aside to "
        "train the run again from the start"
    )
    after = run.raw_status()
    assert (after["state"], after["message"], after["pid"]) == (st["state"], st["message"],
                                                                st["pid"])  # fmt: skip
    assert run.status()["message"] == "OSError: No space left on device"
