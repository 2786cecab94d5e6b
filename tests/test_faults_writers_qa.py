"""Crash safety of every writer other than the training loop's checkpoints.

Each case runs the writer in a real process and kills it with SIGKILL at a named instant
(``LORITA_FAULT=<point>:<n>``, :func:`lorita.io.fault`), then checks what a later reader
or the next operation finds: never a half-written or half-deleted file or folder taken as
whole, never an operation that fails or loses data because of the kill, and no temporary
file that nothing ever removes.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lorita.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]


_FORK = multiprocessing.get_context("forkserver")  # its preload: tests/conftest.py
#: the app's modules without ``app/__init__.py``'s one-time server set-up (which writes
#: ``static/`` and warms caches): what a child that runs app code imports first
APP = """
import sys, types
m = types.ModuleType("app")
m.__path__ = [{folder!r}]
sys.modules["app"] = m
""".format(folder=str(ROOT / "app"))


@pytest.fixture(scope="module", autouse=True)
def _fork_server():
    """Start the fork server once for the module (seconds of imports), not in a test."""
    proc = _FORK.Process(target=int, daemon=True)
    proc.start()
    proc.join(120)


def _child(code: str, fault: str, env: dict[str, str]) -> None:
    """Run ``code`` with ``LORITA_FAULT=fault`` (output discarded)."""
    os.environ.update({**env, "LORITA_FAULT": fault})
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    exec(compile(textwrap.dedent(code), "<killed>", "exec"), {})


def killed(code: str, fault: str, *, env: dict[str, str] | None = None, timeout: float = 60):
    """Run ``code`` in a process of its own (forked from a server that has imported torch and
    lorita once) with ``LORITA_FAULT=fault``; assert it died by SIGKILL at that instant (not
    by an error before it, nor by finishing)."""
    proc = _FORK.Process(target=_child, args=(code, fault, env or {}), daemon=True)
    proc.start()
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
    assert proc.exitcode == -signal.SIGKILL, f"{fault}: exit code {proc.exitcode}"


def hidden(folder: Path) -> list[str]:
    """The dot-files and dot-folders in ``folder`` (temporary names)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- CIFAR archive


def _cifar_archive(folder: Path) -> Path:
    """A small CIFAR-10 binary release (5 training files of 4 images, a test file of 6)."""
    rng = np.random.default_rng(0)
    path = folder / "cifar-10-binary.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        files = [*[(f"data_batch_{i}.bin", 4) for i in range(1, 6)], ("test_batch.bin", 6)]
        for name, n in files:
            rec = np.concatenate([np.arange(n)[:, None] % 10, rng.integers(0, 255, (n, 3072))], 1)
            data = rec.astype(np.uint8).tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("at", [1, 3, 6])
def test_cifar_archive_killed_while_unpacking_is_unpacked_again(tmp_path, at):
    """A load killed while it unpacked the CIFAR archive left a half-unpacked folder that
    every later load took as the dataset (a file missing, or cut short)."""
    _cifar_archive(tmp_path)
    killed(
        f"from lorita.data import load_dataset\n"
        f"load_dataset('cifar10', root={str(tmp_path)!r}, download=False)",
        f"cifar_unpack:{at}",
    )
    s = load_dataset("cifar10", root=tmp_path, download=False)
    assert len(s.train) + len(s.val) == 20 and len(s.test) == 6
    assert hidden(tmp_path) == []  # the killed unpacking's folder is gone too


# --------------------------------------------------------------------------- deleting runs

CONFIG = {"dataset": "digits", "model": "mlp", "n_factors": 2, "epochs": 1}


def _finished_run(root: Path, name: str):
    """A run folder as a stopped run leaves it: config, status, logs and a checkpoint."""
    from lorita.runs import RunStore

    run = RunStore(root).create(CONFIG, name=name)
    run.log_metrics({"step": 1, "split": "val", "acc": 0.5})
    (run.checkpoint_dir / "step-1").mkdir()
    (run.checkpoint_dir / "step-1" / "model.safetensors").write_bytes(b"x" * 4096)
    run.update_status(state="stopped", pid=None)
    return run


def test_run_delete_killed_midway_is_gone_and_its_files_are_removed_by_the_next_delete(tmp_path):
    """A delete killed after its rename left the run's files (checkpoints: most of the disk
    a delete is meant to free) in a hidden folder that only a later *create* removed: deleting
    other runs to make room never freed it."""
    from lorita.runs import RunStore

    _finished_run(tmp_path, "a")
    _finished_run(tmp_path, "b")
    killed(
        f"from lorita.runs import RunStore\nRunStore({str(tmp_path)!r}).delete('a')",
        "run_deleting:1",
    )
    store = RunStore(tmp_path)
    assert [r.name for r in store.list()] == ["b"]  # gone at once, never half-listed
    assert store.misnamed() == [] and len(hidden(tmp_path)) == 1
    store.delete("b")
    assert store.list() == [] and hidden(tmp_path) == []


def test_app_delete_killed_midway_leaves_the_name_free(tmp_path, monkeypatch):
    """The app's delete removed the run folder, then its request and log in ``.app/``: killed
    between the two, the request was left, and every later Start under that name was refused
    ("already exists") though no run of that name was anywhere."""
    run = _finished_run(tmp_path, "mine")
    app_dir = tmp_path / ".app"
    app_dir.mkdir()
    (app_dir / "mine.json").write_text(json.dumps(CONFIG))
    (app_dir / "mine.log").write_text("training\n")
    killed(APP + f"from app import jobs\njobs.delete('mine', {str(tmp_path)!r})", "run_deleting:1")
    assert not run.path.exists()
    from app import jobs

    started = []
    monkeypatch.setattr(jobs, "_spawn", lambda name, root, k: started.append(name))
    assert jobs.start(CONFIG, name="mine", root=tmp_path) == "mine"
    assert started == ["mine"]
    assert json.loads((app_dir / "mine.json").read_text())["n_factors"] == 2


# --------------------------------------------------------------------------- app files


def test_upload_killed_while_written_leaves_no_temporary_file(tmp_path):
    """An ``--init-from`` upload killed while written left its whole bytes under a temporary
    name in ``.app/uploads/`` that nothing ever removed (a weights file: megabytes each)."""
    killed(
        APP + f"from app import train_form\n"
        f"train_form.save_upload('w.safetensors', b'x' * 100_000, {str(tmp_path)!r})",
        "write:1",
    )
    from app import train_form

    folder = tmp_path / ".app" / "uploads"
    assert len(hidden(folder)) == 1 and not any(folder.glob("*.safetensors"))
    path = train_form.save_upload("other.pt", b"y" * 1000, tmp_path)  # another file
    assert path.read_bytes() == b"y" * 1000 and train_form.upload_name(path) == "other.pt"
    assert hidden(folder) == []


def test_plotly_js_copy_killed_leaves_no_temporary_file(tmp_path, monkeypatch):
    """The server's copy of plotly.js into ``static/`` (a 4.8 MB file) killed before its
    rename left the copy under a temporary name no later start removed (and served it)."""
    static = tmp_path / "static"
    killed(
        APP + f"from pathlib import Path\nfrom app import plot\n"
        f"plot.STATIC = Path({str(static)!r})\nplot.serve_plotly_js()",
        "write:1",
    )
    assert len(hidden(static)) == 1 and not (static / "plotly.min.js").exists()
    from app import plot

    monkeypatch.setattr(plot, "STATIC", static)
    assert plot.serve_plotly_js()
    assert hidden(static) == []
    assert (static / plot.SCRIPT).stat().st_size == plot.plotly_js_source().stat().st_size


# --------------------------------------------------------------------------- whole files


def test_save_killed_before_its_rename_keeps_the_file_it_replaces(tmp_path):
    import torch

    import lorita as lt

    path = tmp_path / "m.safetensors"
    old = torch.nn.Sequential(torch.nn.Linear(4, 3))
    lt.save(old, path)
    killed(
        f"import torch, lorita as lt\n"
        f"lt.save(torch.nn.Sequential(torch.nn.Linear(4, 3)), {str(path)!r})",
        "write:1",
    )
    assert len(hidden(tmp_path)) == 1  # the new bytes, never published
    torch.testing.assert_close(lt.load(path)[0].weight, old[0].weight)
    new = torch.nn.Sequential(torch.nn.Linear(4, 3))
    lt.save(new, path)  # the next save of that file removes what the killed one left
    assert hidden(tmp_path) == []
    torch.testing.assert_close(lt.load(path)[0].weight, new[0].weight)


def test_kept_curve_killed_while_written_reads_as_the_one_before(tmp_path):
    run = _finished_run(tmp_path, "r")
    run.write_extra("tradeoff-best-global", {"points": [1]})
    killed(
        f"from lorita.runs import RunStore\n"
        f"RunStore({str(tmp_path)!r}).get('r').write_extra('tradeoff-best-global', "
        f"{{'points': [2]}})",
        "write:1",
    )
    assert run.read_extra("tradeoff-best-global") == {"points": [1]}
    assert len(hidden(run.path / "extra")) == 1
    run.write_extra("cuts-best", {"cuts": {}})  # another key: the leftover goes all the same
    assert hidden(run.path / "extra") == []


def test_folder_dataset_cache_killed_while_written_is_decoded_again(tmp_path):
    from PIL import Image

    images, data = tmp_path / "images", tmp_path / "data"
    for k, label in enumerate(("cat", "dog")):
        (images / label).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (8, 8), (20 * i, 100 * k, 7)).save(images / label / f"{i}.png")
    name = f"folder:{images}"
    code = (
        f"from lorita.data import load_dataset\nload_dataset({name!r}, root={str(data)!r}, size=8)"
    )
    killed(code, "write:1")
    cache = data / "folder-cache"
    assert len(hidden(cache)) == 1 and not any(cache.glob("*.npz"))
    s = load_dataset(name, root=data, size=8)
    assert len(s.train) + len(s.val) + len(s.test) == 20
    assert hidden(cache) == [] and len(list(cache.glob("*.npz"))) == 1


def test_cifar_file_cut_short_is_refused_by_name(tmp_path):
    """A CIFAR file cut short (an unpacking or copy killed before this release) was read into
    an error about reshaping arrays, or, cut at a record's end, as fewer images."""
    from lorita.data import DatasetUnavailable

    folder = tmp_path / "cifar-10-batches-bin"
    with tarfile.open(_cifar_archive(tmp_path)) as t:
        t.extractall(tmp_path, filter="data")
    test_file = folder / "test_batch.bin"
    test_file.write_bytes(test_file.read_bytes()[:5000])
    with pytest.raises(DatasetUnavailable, match=r"test_batch.bin holds 5000 bytes, not a whole"):
        load_dataset("cifar10", root=tmp_path, download=False)


# --------------------------------------------------------------------------- run logs


def test_log_truncation_killed_between_its_files_is_readable_and_done_again(tmp_path):
    """A resume rewrites metrics.jsonl, then spectra.jsonl, then removes result.json: killed
    after the first, the folder still reads (listing, summary) and the next resume's
    truncation ends where an uninterrupted one does."""
    from lorita.io import dead_writers_temp

    run = _finished_run(tmp_path, "r")
    (run.path / "metrics.jsonl").write_text("")
    for step in range(1, 7):
        run.log_metrics({"step": step, "split": "train", "loss": 1.0 / step})
        if step % 2 == 0:
            run.log_spectra({"step": step, "layers": {}})
    run.log_metrics({"step": 6, "split": "test", "acc": 0.9})
    run.write_result({"state": "stopped", "step": 6})
    killed(
        f"from lorita.runs import RunStore\nRunStore({str(tmp_path)!r}).get('r').truncate_logs(4)",
        "write:2",
    )
    assert [r["step"] for r in run.metrics()] == [1, 2, 3, 4]
    assert [r["step"] for r in run.spectra()] == [2, 4, 6]  # not rewritten yet
    from lorita.runs import RunStore

    assert [r["name"] for r in RunStore(tmp_path).summaries()] == ["r"]
    assert not run.summary().get("broken")
    run.truncate_logs(4)
    assert [r["step"] for r in run.metrics()] == [1, 2, 3, 4]
    assert [r["step"] for r in run.spectra()] == [2, 4]
    assert run.result() == {}
    assert not [p.name for p in run.path.iterdir() if dead_writers_temp(p.name)]
