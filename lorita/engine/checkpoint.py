"""Checkpoints that are one transaction: wholly there or wholly absent, at every instant.

A checkpoint is a folder ``checkpoints/ckpt-NNNNNN/`` holding

    model.safetensors   the composed model (a lorita.save file, loadable on its own)
    state.safetensors   optimizer and scheduler state, RNG states, the loop's counters
    best.safetensors    the best model so far (a hard link to the published one), if any
    manifest.json       step and the size of every file above, written last

It is built under a temporary name (``.tmp-...``), every file flushed to disk, then made
visible by one rename; older checkpoints are pruned only after that rename is durable. A
resume takes the newest folder whose manifest matches its files. Readers load the published
``best.safetensors`` and ``last.safetensors`` beside the folders (each replaced by one rename).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn

from ..export import read_header, save_bytes
from ..io import (
    atomic_write_bytes,
    cannot_write,
    fault,
    fsync_dir,
    read_json,
    remove_folder,
    temp_beside,
)
from ..runs import checkpoint_folders

__all__ = [
    "counters",
    "damaged",
    "drop_best",
    "latest",
    "load",
    "prune",
    "publish_best",
    "restore_best",
    "save",
    "sweep",
]

MANIFEST = "manifest.json"
STATE_KEY = "lorita_train_state"


# --------------------------------------------------------------------------- files


def _write_synced(path: Path, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise cannot_write(path, e) from e


def _why(e: OSError) -> str:
    """The cause of a failed write, without the file name :func:`cannot_write` put in it."""
    return os.strerror(e.errno) if e.errno is not None else str(e)


def _link(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src``'s content by one rename (a hard link where possible)."""
    if dst.exists() and os.path.samefile(src, dst):
        return  # already that file (a rename between two links of one file does nothing)
    tmp = temp_beside(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:  # a full disk while copying: no part of a copy is left beside dst
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise cannot_write(dst, e) from e


def _jsonable(o: Any):
    if torch.is_tensor(o) or isinstance(o, np.generic):
        return o.item()
    if isinstance(o, tuple | set):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _complete(path: Path) -> dict | None:
    """The manifest of a checkpoint folder whose files all have their recorded sizes."""
    man = read_json(path / MANIFEST)
    if not isinstance(man, dict) or not isinstance(man.get("files"), dict):
        return None
    for name, size in man["files"].items():
        try:
            if (path / name).stat().st_size != size:
                return None
        except (OSError, ValueError):  # (ValueError: an edited manifest's name with a NUL)
            return None
    return man


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint folder under ``folder``, or None."""
    for _, path in reversed(checkpoint_folders(folder)):
        if _complete(path) is not None:
            return path
    return None


def damaged(folder: Path) -> Path | None:
    """The newest checkpoint folder under ``folder`` that is no longer complete (a file of it
    truncated or changed since it was written: a checkpoint only ever appears whole, by one
    rename), when no complete one is left; else None."""
    if latest(folder) is not None:
        return None
    folders = checkpoint_folders(folder)
    return folders[-1][1] if folders else None


def sweep(folder: Path) -> None:
    """Remove temporary folders of checkpoints a killed process did not finish."""
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".tmp-ckpt-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- state


def _state_bytes(opt, sched, counters: dict, rng: dict[str, torch.Tensor]) -> bytes:
    """Optimizer/scheduler/RNG state as safetensors (tensors) + JSON metadata (the rest)."""
    sd = opt.state_dict()
    tensors = {f"rng.{k}": v.contiguous() for k, v in rng.items()}
    plain_state: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                plain_state.setdefault(str(idx), {})[k] = v
    info = {
        "param_groups": sd["param_groups"],
        "plain_state": plain_state,
        "scheduler": sched.state_dict() if sched is not None else None,
        "counters": counters,
    }
    return st_save(tensors, metadata={STATE_KEY: json.dumps(info, default=_jsonable)})


def save(
    folder: Path,
    model: nn.Module,
    opt,
    sched,
    *,
    counters: dict,
    rng: dict[str, torch.Tensor],
    meta: dict,
) -> Path:
    """Write one checkpoint transaction under ``folder``; publish last.safetensors; prune.

    ``folder``'s parent (the run folder) must exist: a run folder removed or renamed while
    its training runs is not brought back (FileNotFoundError)."""
    folder.mkdir(exist_ok=True)
    existing = checkpoint_folders(folder)
    seq = existing[-1][0] + 1 if existing else 1
    final = folder / f"ckpt-{seq:06d}"
    tmp = folder / f".tmp-ckpt-{seq:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_synced(tmp / "model.safetensors", save_bytes(model, metadata=meta))
        fault("ckpt_between_files")
        _write_synced(tmp / "state.safetensors", _state_bytes(opt, sched, counters, rng))
        best = folder / "best.safetensors"
        if best.is_file():
            _link(best, tmp / "best.safetensors")
        files = {p.name: p.stat().st_size for p in tmp.iterdir()}
        manifest = {"step": counters["step"], "files": files}
        _write_synced(tmp / MANIFEST, json.dumps(manifest).encode())
        fsync_dir(tmp)
    except OSError as e:  # a full disk: the half-written files go, so the run can say why
        shutil.rmtree(tmp, ignore_errors=True)  # it ended, naming the checkpoint (not the
        if e.errno is None:  # temporary folder, gone now)
            raise
        raise OSError(e.errno, f"cannot write checkpoint {str(final)!r}: {_why(e)}") from e
    fault("ckpt_before_rename")
    os.rename(tmp, final)
    fsync_dir(folder)
    fault("ckpt_after_rename")
    _link(final / "model.safetensors", folder / "last.safetensors")
    fault("ckpt_before_prune")
    prune(folder, keep=final)
    return final


def prune(folder: Path, keep: Path) -> None:
    """Remove every checkpoint folder but ``keep`` (call only once ``keep`` is durable).

    Each goes by one rename to a temporary name first, so a process killed while it deletes
    leaves no half-deleted ``ckpt-`` folder (``sweep`` removes what the rename left)."""
    for seq, old in checkpoint_folders(folder):
        if old != keep:
            gone = folder / f".tmp-ckpt-{seq:06d}-old-{os.getpid()}"
            with suppress(OSError):  # (one that cannot be renamed stays a whole checkpoint)
                remove_folder(old, gone, killed_at="ckpt_prune_renamed")


def load(path: Path, model: nn.Module, opt, sched) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model, optimizer and scheduler from checkpoint folder ``path``.

    Returns the loop's counters and the saved RNG states (without their ``rng.`` prefix).
    """
    device = next(model.parameters()).device
    read_header(path / "model.safetensors")  # (a tensor named twice is refused, as by load)
    read_header(path / "state.safetensors")
    model.load_state_dict(
        {k: v.to(device) for k, v in load_file(path / "model.safetensors").items()}
    )
    with safe_open(str(path / "state.safetensors"), framework="pt") as f:
        info = json.loads(f.metadata()[STATE_KEY])
        # copies: a tensor read so is a view of the mapped file, and the optimizer keeps
        # (and updates) its moments as given; the file rewritten in place would change them
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for idx, st in info["plain_state"].items():
        state.setdefault(int(idx), {}).update(st)
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in info["param_groups"]
    ]  # JSON has no tuples
    opt.load_state_dict({"state": state, "param_groups": groups})
    if sched is not None and info["scheduler"] is not None:
        sched.load_state_dict(info["scheduler"])
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    return info["counters"], rng


def counters(path: Path) -> dict:
    """The loop's counters saved in checkpoint folder ``path`` (what it holds, before loading:
    a run with plain epochs builds the plain or the composed model from them)."""
    read_header(path / "state.safetensors")
    with safe_open(str(path / "state.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()[STATE_KEY])["counters"]


def publish_best(folder: Path, model: nn.Module, meta: dict) -> None:
    """Replace the published best.safetensors (atomic, flushed); as :func:`save`, never
    brings back a removed run folder."""
    folder.mkdir(exist_ok=True)
    atomic_write_bytes(folder / "best.safetensors", save_bytes(model, metadata=meta))


def drop_best(folder: Path) -> None:
    """Unpublish the best model (a run whose plain epochs are over chooses its best anew); the
    next checkpoint holds none until a new best is published."""
    (folder / "best.safetensors").unlink(missing_ok=True)
    fsync_dir(folder)


def restore_best(folder: Path, path: Path) -> None:
    """Make the published best and last files those of checkpoint ``path``."""
    best = path / "best.safetensors"
    if best.is_file():
        _link(best, folder / "best.safetensors")
    else:
        (folder / "best.safetensors").unlink(missing_ok=True)
    _link(path / "model.safetensors", folder / "last.safetensors")
