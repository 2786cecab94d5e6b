"""The run store: one folder per training run, the single source of truth for CLI and app.

This module is the only code that reads or writes ``<root>/<name>/`` (root: ``LORITA_RUNS``,
default ``./runs``); it imports nothing from the training engine. Layout of a run folder::

    config.json       the TrainConfig as a dict
    status.json       state (queued|running|completed|failed|stopped), message, pid, host,
                      heartbeat, created / started / ended (unix seconds), step, total_steps,
                      epoch, device, note (what the run decided for itself: a pretrained
                      output layer for other classes left fresh; null else)
    metrics.jsonl     one line per measurement: step, epoch, split (train|val|test), loss, acc,
                      lr, time
    spectra.jsonl     one line per snapshot: step, epoch, layers {name: [singular values]}
    result.json       the final numbers (best validation accuracy, test accuracy, ...)
    checkpoints/      step-NNNNNNNN/ (one transaction: model, training state, best model and a
                      manifest, made visible by one rename), best.safetensors and
                      last.safetensors (what readers load)
    extra/<key>.json  derived results cached beside the run (e.g. trade-off curves)
    writer.lock       held by the training process for its life (the OS drops it on death)
    STOP              present when a stop was requested

Whole files are written atomically (temporary file, then rename); the ``.jsonl`` files are
append-only and their readers skip a broken or half-written line. A run whose process is gone
reads as ``failed`` with the message ``process died ...``, which says how to go on (the
command that resumes it). A folder whose files are not what they should be (e.g. a
config.json holding ``[1]``) reads as failed and is listed as broken, never an error: every
reader asks :meth:`Run.status`, the one judge of a run's state and message.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import shlex
import shutil
import socket
import stat
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .checks import is_int, is_num
from .io import (
    append_jsonl,
    dead_writers_temp,
    fault,
    process_alive,
    process_identity,
    read_json,
    read_jsonl,
    read_jsonl_from,
    read_last_jsonl,
    read_tail_jsonl,
    recorded_alive,
    remove_dead_temps,
    remove_folder,
    rewrite_jsonl,
    temp_beside,
    write_json,
)
from .scores import task_of_config

__all__ = [
    "ACTIVE",
    "Run",
    "RunStore",
    "STATES",
    "acquire_slot",
    "append_jsonl",
    "checkpoint_folders",
    "load_splits",
    "process_alive",
    "read_json",
    "read_jsonl",
    "read_last_jsonl",
    "validate_name",
    "write_json",
]

STATES = ("queued", "running", "completed", "failed", "stopped")
ACTIVE = ("queued", "running")
#: the message of a queued run: every training slot is taken, or it has one and prepares
WAITING_FOR_SLOT = "waiting for a training slot"
PREPARING = "preparing: loading the data and building the model"
HEARTBEAT_S = 2.0  # how often a live process refreshes status.json
STALE_S = 15.0  # heartbeat older than this and pid gone: the process died
#: the end of metrics.jsonl a table row reads for the last validation line (a finished run's
#: best is in its result.json): a long run's log is not read whole to list it
SUMMARY_TAIL_BYTES = 1024 * 1024
WRITER_LOCK = "writer.lock"
#: a launcher's requests for runs whose folders are not made yet: the app's Start claims a
#: name at once as ``<runs>/.app/<name>.json`` and its child makes the folder seconds later,
#: so a fresh name (:meth:`RunStore.new_name`) is never one claimed there
LAUNCH_DIR = ".app"
#: beside a request ``<name>.json``, ``<name>.owner`` names the process that will make the run
#: folder (the launcher until it starts its child, then the child): a request whose process
#: has gone holds the name no more for others (:func:`live_launch_request`)
LAUNCH_OWNER = ".owner"
#: what a run folder holds (its hidden temp files aside)
RUN_FILES = frozenset({
    "config.json", "status.json", "metrics.jsonl", "spectra.jsonl", "result.json",
    "checkpoints", "extra", "STOP", WRITER_LOCK,
})  # fmt: skip
PAIR_SETTLED_S = 5.0  # a runs folder unchanged this long has every new run's config written
SETUP_KEYS = (
    "dataset", "dataset_kwargs", "model", "model_kwargs", "init", "optimizer", "lr",
    "weight_decay", "schedule", "epochs", "batch_size", "seed", "val_fraction", "split_seed",
    "init_from",
)  # fmt: skip


def setup_of(config: dict) -> dict:
    """The SETUP_KEYS of a run's config, its dataset and model options with their defaults
    filled in: an option given as its default (``--data-arg size=32``) is the same setup as
    the option left out. Options that cannot be read are compared as they are."""
    out = {k: config.get(k) for k in SETUP_KEYS}
    out["dataset_kwargs"] = _with_defaults(_dataset_defaults, config.get("dataset"),
                                           config.get("dataset_kwargs"))  # fmt: skip
    out["model_kwargs"] = _with_defaults(_model_defaults, config.get("model"),
                                         config.get("model_kwargs"))  # fmt: skip
    return out


def _with_defaults(defaults, name, given) -> Any:
    if not isinstance(name, str) or not isinstance(given or {}, dict):
        return given
    try:
        return {**defaults(name), **(given or {})}
    except (ValueError, TypeError, ImportError):  # unknown name, a model that needs a package
        return given


@functools.lru_cache(maxsize=256)
def _model_defaults(name: str) -> dict:
    from .models import model_options  # (torch: only when runs are paired)

    return model_options(name)


@functools.lru_cache(maxsize=256)
def _dataset_defaults(name: str) -> dict:
    from .data import dataset_options

    return {k: o.default for k, o in dataset_options(name).items()}


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_TEMP_DIR_RE = re.compile(r"^\.tmp-.+-(\d+)$")  # checkpoint folders being written
_CKPT_DIR_RE = re.compile(r"^ckpt-(\d{6,})$")  # a checkpoint, numbered in turn
#: the message of a run whose process is gone (:meth:`Run.status`), which then says what to do
PROCESS_DIED = "process died"


# --------------------------------------------------------------------------- names, processes


def validate_name(name: Any) -> str:
    """Return ``name`` if it is a safe run name (letters, digits, ``._-``; no path tricks).

    THE name check: every function that turns a run name into a path calls it.
    """
    if not isinstance(name, str) or not _is_name(name):
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
        raise ValueError(
            f"run name: {shown} is not allowed; use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def _is_name(name: str) -> bool:
    return bool(_NAME_RE.match(name)) and ".." not in name


def _num(v: Any, default: float = 0.0) -> float:
    """A finite float from a value read from a file, else ``default``."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return default
    try:
        v = float(v)
    except OverflowError:  # an int past float's range (JSON holds any number of digits)
        return default
    return v if math.isfinite(v) else default


_STATUS_COUNTS = ("step", "total_steps", "epoch")
_STATUS_TIMES = ("created", "started", "ended", "heartbeat")


def _typed_status(st: dict) -> dict:
    """``st`` (a status.json) with each counter that is not a whole number, and each time
    that is not a finite number, read as None."""
    bad = {k: None for k in _STATUS_COUNTS if st.get(k) is not None and not is_int(st[k])}
    bad |= {k: None for k in _STATUS_TIMES if st.get(k) is not None and not is_num(st[k])}
    return {**st, **bad} if bad else st


#: a parsed JSON number's exact type (never a bool)
_JSON_NUMBERS = (float, int)


def _is_snapshot(row: Any) -> bool:
    """Whether a spectra.jsonl row can be drawn: a whole-number step and each layer's
    singular values a list of numbers (null where one was not finite). Readers skip the
    others, as they skip a broken line. (A parsed JSON number is a float or an int, never a
    bool: its exact type is checked, which is fast enough for a log of thousands of rows.)"""
    layers = row.get("layers") if isinstance(row, dict) else None
    return (
        is_int(row.get("step"))
        and isinstance(layers, dict)
        and all(
            isinstance(s, list) and all(v is None or type(v) in _JSON_NUMBERS for v in s)
            for s in layers.values()
        )
    )


def dataset_kwargs(config: dict) -> dict:
    """The dataset options of a run config (``dataset_kwargs``, {} when unset). A config.json
    is read from disk and may have been edited: options that are not an object are refused
    here, naming the field, rather than failing as ``**options`` in the call they are for."""
    options = config.get("dataset_kwargs") or {}
    if not isinstance(options, dict):
        raise ValueError(
            "config.json dataset_kwargs: expected an object of dataset options (name: value), "
            f"got {type(options).__name__}"
        )
    return options


def load_splits(config: dict):
    """The dataset splits of a run config (dict), with its validation carve-out."""
    from .data import VAL_FRACTION, load_dataset

    return load_dataset(
        config["dataset"],
        val_fraction=config.get("val_fraction", VAL_FRACTION),
        seed=config.get("split_seed", 0),
        augment=config.get("augment", False),
        normalize=config.get("normalize", True),
        **dataset_kwargs(config),
    )


def effective_ranks(layers: dict[str, list[float]], tol: float | None = None) -> dict[str, int]:
    """Effective rank of each layer's singular values (via :func:`lorita.effective_rank`)."""
    import torch

    from .spectra import effective_rank

    out = {}
    for name, s in layers.items() if isinstance(layers, dict) else ():
        if not isinstance(s, list) or not s:
            continue
        try:  # (plain numbers, as the engine writes them: read at once)
            if not all(type(v) in _JSON_NUMBERS for v in s):
                raise TypeError
            t = torch.tensor(s, dtype=torch.float32)
        except (TypeError, OverflowError):  # null, text, a bool, an int past float's range
            t = torch.tensor([_num(v, math.nan) for v in s], dtype=torch.float32)
        # (a damaged row's NaN, inf or negative values read as nothing, not as an error)
        t = torch.nan_to_num(t, 0.0, 0.0, 0.0).clamp_min(0)
        out[name] = int(effective_rank(t) if tol is None else effective_rank(t, tol=tol))
    return out


def _is_val(row: dict) -> bool:
    return row.get("split") == "val" and isinstance(row.get("acc"), int | float)


#: (metrics.jsonl, its inode) -> (the offset read up to, the last validation row, the best):
#: a running run's table row reads only the lines added since it was last listed
_VAL_SCANS: dict[tuple[str, int], tuple[int, dict, dict]] = {}


def _val_scan(path: Path) -> tuple[dict, dict]:
    """(the last validation row of a metrics log, the best one), {} for none."""
    try:
        key = (str(path), path.stat().st_ino)
    except OSError:
        return {}, {}
    offset, last, best = _VAL_SCANS.get(key, (0, {}, {}))
    while True:
        rows, done = read_jsonl_from(path, offset, 4 * 1024 * 1024)  # (a part at a time)
        if done < offset:  # rewritten shorter in place: read again from the start
            last, best = {}, {}
        for row in filter(_is_val, rows):
            last = row
            if not best or row["acc"] > best["acc"]:
                best = row
        if done == offset:
            break
        offset = done
    if len(_VAL_SCANS) > 4096:
        _VAL_SCANS.clear()
    _VAL_SCANS[key] = (offset, last, best)
    return last, best


def _clean_temp_files(folder: Path) -> None:
    """Remove temporary files (and unfinished checkpoint folders) left in ``folder`` by
    processes that died mid-write."""
    with contextlib.suppress(OSError):
        for p in folder.iterdir():
            m = _TEMP_DIR_RE.match(p.name)
            if dead_writers_temp(p.name) or (m and not process_alive(int(m.group(1)))):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- one run


def checkpoint_folders(folder: Path) -> list[tuple[int, Path]]:
    """The checkpoint folders (``ckpt-NNNNNN``) in a run's ``checkpoints/``, oldest first, each
    with its number (none when there is no such folder): what the engine writes and resumes
    from, and what a run's status reads its last step from."""
    out = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = _CKPT_DIR_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


class Run:
    """A run folder. Reading methods never raise, whatever the folder holds."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self._lock = threading.Lock()
        self._status_cache: dict | None = None
        self._hb_stop: threading.Event | None = None
        self._hb_thread: threading.Thread | None = None
        self._writer: FileLock | None = None

    def __repr__(self) -> str:
        return f"Run({self.name!r})"

    # -- reading
    @property
    def config(self) -> dict:
        cfg = read_json(self.path / "config.json", {})
        return cfg if isinstance(cfg, dict) else {}

    def problem(self) -> str | None:
        """Why this folder is broken (config.json or status.json missing or not a JSON
        object), or None."""
        for fname in ("config.json", "status.json"):
            p = self.path / fname
            if not p.exists():
                return f"{fname} missing"
            if not isinstance(read_json(p, None), dict):
                return f"{fname} is not a readable JSON object"
        return None

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, which: str = "best") -> Path:
        """The model file readers load: ``best`` (best validation accuracy) or ``last``."""
        if which not in ("best", "last"):
            raise ValueError(f"which: {which!r} is not allowed; expected best or last")
        return self.checkpoint_dir / f"{which}.safetensors"

    def start_file(self) -> str:
        """The file a run started from this one loads (its ``init_from``): the best
        checkpoint, as an absolute path. ValueError naming init_from when there is none yet."""
        best = self.checkpoint("best")
        if not best.is_file():
            state = self.status()["state"]
            raise ValueError(
                f"init_from: run {self.name!r} has no best checkpoint yet (it is {state}); "
                "wait for its first evaluation or start from a weights file"
            )
        return str(best.resolve())

    def checkpoint_mtime(self, which: str = "best") -> float:
        """Modification time of :meth:`checkpoint` (0.0 if there is none: nothing there, or
        not a file with something in it, a folder or an empty file left by a copy that ran
        out of disk): what the kept curves and every cache of a checkpoint are keyed on, so a
        resumed run is not stale."""
        try:
            st = self.checkpoint(which).stat()
        except OSError:
            return 0.0
        return st.st_mtime if stat.S_ISREG(st.st_mode) and st.st_size > 0 else 0.0

    def raw_status(self) -> dict:
        """status.json as written (no liveness check); {} if missing or broken."""
        st = read_json(self.path / "status.json", {})
        return st if isinstance(st, dict) else {}

    def is_alive(self) -> bool:
        """Whether the process behind a queued/running run still lives.

        On the machine that runs it, the pid (and its start time) decides at once, however old
        its heartbeat: a paused process (Ctrl-Z) still holds the run, and reads as alive until
        it ends. Elsewhere (a shared folder) a heartbeat older than STALE_S seconds means dead.
        """
        st = self.raw_status()
        if st.get("state") not in ACTIVE:
            return False
        if st.get("host") == socket.gethostname():
            return recorded_alive(st) and not self._let_go()
        return time.time() - _num(st.get("heartbeat") or st.get("created")) <= STALE_S

    def _let_go(self) -> bool:
        """Whether a run that reads running is held by no process: its trainer, alive, ended
        the training (it gives the writer lock back and stops its heartbeat then) without
        writing how (status.json could not be written: a full disk), STALE_S seconds ago or
        more. A notebook's process lives on for hours after."""
        lock = self.path / WRITER_LOCK
        st = self.raw_status()
        if st.get("state") != "running" or not lock.is_file():
            return False  # (queued: made by one process, trained by another, maybe later)
        if time.time() - _num(st.get("heartbeat")) <= STALE_S:
            return False  # its heartbeat goes on (or just stopped): taken as training
        if self._writer is not None and self._writer.is_locked:  # held here (a resume):
            return st.get("pid") != os.getpid()  # given up by the process it names
        probe = FileLock(str(lock), thread_local=False)
        try:
            probe.acquire(timeout=0)
        except (Timeout, OSError):  # held (by any process, this one too), or cannot tell
            return False
        probe.release()
        # the writer marks the run finished before it lets go: running still means it did not
        return self.raw_status().get("state") == "running"

    def status(self) -> dict:
        """status.json; an active run whose process died reads as failed ("process died"), and
        a broken folder (:meth:`problem`) as failed unless its process still trains it, each
        with a message that says what to do next. Its counters and times are numbers or None
        (an edited file's ``"step": "a"`` reads as None: every reader does arithmetic with
        them)."""
        st = _typed_status(self.raw_status())
        if not st:
            return {"state": "failed", "message": self._broken_message(self.problem())}
        if st.get("state") not in STATES:
            said = f"unknown state {st.get('state')!r} in status.json; {self._next_step(st)}"
            return {**st, "state": "failed", "message": said}
        alive = st.get("state") in ACTIVE and self.is_alive()
        if st.get("state") in ACTIVE and not alive:
            st = {**st, "state": "failed", "message": self._ended_message(st),
                  "ended": st.get("heartbeat")}  # fmt: skip
        problem = None if alive else self.problem()  # (a live run: said once it ends)
        if problem:
            st = {**st, "state": "failed", "message": self._broken_message(problem)}
        elif st.get("state") == "stopped":
            st = {**st, "message": self._stopped_message(st)}
        return st

    def _stopped_message(self, st: dict) -> str:
        """A stopped run's message, with the command that goes on from its last checkpoint
        when it kept one (and its message does not already say how to resume)."""
        said = str(st.get("message") or "stopped")
        if "resume" in said or self.last_checkpoint_step() is None:
            return said
        return f"{said}; {self._next_step(st)}"

    def _broken_message(self, problem: str | None) -> str:
        """What is wrong with a broken folder (:meth:`problem`), and what to do."""
        problem = problem or "status.json missing"
        return (
            f"broken run folder: {problem}; put that file back, or delete the run "
            f"({self.command('runs --delete')})"
        )

    def _ended_message(self, st: dict) -> str:
        """Why a run that reads queued or running has failed (:meth:`status`), and what to do."""
        step = st.get("step")
        at = f" at step {step}" if step else ""
        if st.get("host") == socket.gethostname() and recorded_alive(st) and self._let_go():
            why = (
                f"training ended{at} without recording why (its process, pid {st.get('pid')}, "
                "gave the run up but could not write status.json: is the disk full?)"
            )
        else:
            why = f"{PROCESS_DIED}{at} (killed, crashed, or its machine restarted)"
        return f"{why}; {self._next_step(st)}"

    def _next_step(self, st: dict) -> str:
        """How to go on with a run that ended before its end: resume it (from its last
        checkpoint, or from the start when it kept none), as it was started."""
        world = st.get("world_size")
        cmd = self.command("train --resume")
        if is_int(world) and world > 1:
            cmd += (
                f" (it trained in {world} processes: torchrun --nproc_per_node={world} -m "
                "lorita train --resume ... goes on as it was)"
            )
        step = self.last_checkpoint_step()
        if step is None:
            return f"it kept no checkpoint: train it again from the start with {cmd}"
        return f"resume it from its last checkpoint (step {step}): {cmd}"

    def command(self, verb: str) -> str:
        """``lorita <verb> NAME``, with ``--runs-dir`` when the run is not in the runs folder
        a command finds by default (``$LORITA_RUNS``, else ./runs)."""
        cmd = f"lorita {verb} {self.name}"
        try:
            default = Path(os.environ.get("LORITA_RUNS") or "runs").resolve()
            here = self.path.parent.resolve()
        except (OSError, RuntimeError):
            return cmd
        return cmd if here == default else f"{cmd} --runs-dir {shlex.quote(str(here))}"

    def last_checkpoint_step(self) -> int | None:
        """The step of the newest checkpoint (what a resume goes on from, its manifest says
        which step), or None when it kept none."""
        try:
            folders = checkpoint_folders(self.checkpoint_dir)
        except OSError:
            return None
        for _, folder in reversed(folders):
            step = read_json(folder / "manifest.json", {})
            step = step.get("step") if isinstance(step, dict) else None
            if is_int(step):
                return step
        return None

    def metrics(self, split: str | None = None) -> list[dict]:
        rows = read_jsonl(self.path / "metrics.jsonl")
        return rows if split is None else [r for r in rows if r.get("split") == split]

    def spectra(self) -> list[dict]:
        return [r for r in read_jsonl(self.path / "spectra.jsonl") if _is_snapshot(r)]

    def read_new(
        self, kind: str, offset: int = 0, max_bytes: int | None = None
    ) -> tuple[list[dict], int]:
        """New complete lines of ``metrics`` or ``spectra`` after byte ``offset``, about
        ``max_bytes`` of them when given (see :func:`lorita.io.read_jsonl_from`):
        ``rows, offset = run.read_new("metrics", offset)``."""
        if kind not in ("metrics", "spectra"):
            raise ValueError(f"kind: {kind!r} is not allowed; expected metrics or spectra")
        rows, offset = read_jsonl_from(self.path / f"{kind}.jsonl", offset, max_bytes)
        return (rows if kind == "metrics" else [r for r in rows if _is_snapshot(r)]), offset

    def last_spectra(self) -> dict | None:
        row = read_last_jsonl(self.path / "spectra.jsonl")
        if row is None or _is_snapshot(row):
            return row
        return (self.spectra() or [None])[-1]  # (an edited last line: the one before it)

    def result(self) -> dict:
        res = read_json(self.path / "result.json", {})
        return res if isinstance(res, dict) else {}

    @property
    def task(self) -> str:
        """The task its configuration poses (lorita.scores): how its scores are read."""
        return task_of_config(self.config)

    def stop_requested(self) -> bool:
        return (self.path / "STOP").exists()

    def request_stop(self) -> None:
        """Ask the training process to stop after its current step (it writes a checkpoint)."""
        (self.path / "STOP").touch()

    def read_extra(self, key: str, default: Any = None) -> Any:
        """A derived result cached beside the run (``extra/<key>.json``), or ``default``."""
        return read_json(self.path / "extra" / f"{validate_name(key)}.json", default)

    def write_extra(self, key: str, obj: Any) -> None:
        """Cache a derived JSON result beside the run (atomic)."""
        self._require_folder()
        remove_dead_temps(self.path / "extra")  # of a writer killed while it wrote, any key
        write_json(self.path / "extra" / f"{validate_name(key)}.json", obj)

    def summary(self, tol: float | None = None) -> dict:
        """One row for tables: state, setup, accuracies and effective ranks of the last snapshot.

        Never raises: a broken folder gives a row with ``broken`` set to the reason.
        """
        cfg, st, res = self.config, self.status(), self.result()
        last, best = self._last_vals(res)
        snap = self.last_spectra() or {}
        layers = snap.get("layers")
        broken = self.problem()  # (its state and message: status() says it)
        return {
            "name": self.name,
            "state": st.get("state"),
            "message": str(st.get("message") or ""),
            "broken": broken,
            **config_row(cfg),
            **{k: st.get(k) for k in ("step", "total_steps", "created", "started", "ended")},
            "task": self.task,  # its scores ("acc") are R² for a regression
            "best_val_acc": res.get("best_val_acc", best.get("acc")),
            "best_step": res.get("best_step", best.get("step")),
            "val_acc": last.get("acc"),
            "test_acc": res.get("test_acc"),
            "spectra_step": snap.get("step"),
            "effective_ranks": effective_ranks(layers, tol=tol) if layers else {},
        }

    def _last_vals(self, res: dict) -> tuple[dict, dict]:
        """(the last validation row, the best one) for :meth:`summary`. With the best already
        in ``res`` (result.json) only the log's end is read; else (a run still training, or
        one that ended without a result) the lines added since the last call are."""
        window = 16 * 1024  # (a few hundred lines; wider while no validation line is in it)
        while "best_val_acc" in res and "best_step" in res and window <= SUMMARY_TAIL_BYTES:
            tail, whole = read_tail_jsonl(self.path / "metrics.jsonl", window)
            vals = [r for r in tail if _is_val(r)]
            if vals or whole:
                return (vals[-1] if vals else {}), {}
            window *= 4
        return _val_scan(self.path / "metrics.jsonl")

    # -- loading
    def load_model(self, which: str = "best"):
        """The composed model of a checkpoint, on CPU, in eval mode. ValueError when it is
        missing, or holds inf or NaN (training keeps its last good checkpoint, so the file was
        changed since: nothing computed from it would mean anything)."""
        from .export import load
        from .layers import nonfinite_parameter

        path = self.checkpoint(which)
        if not path.is_file():
            raise ValueError(f"run {self.name!r}: no {which} checkpoint at {path}")
        model = load(str(path)).eval()
        pname = nonfinite_parameter(model)
        if pname is not None:
            raise ValueError(
                f"run {self.name!r}: its {which} checkpoint's {pname!r} holds inf or NaN; "
                "use the other checkpoint (best or last), or train the run again"
            )
        return model

    def as_trained(self, which: str = "best"):
        """(merged model, one example input, the checkpoint's validation accuracy or None) of a
        checkpoint as trained, read without the run's dataset: the model records its input
        shape. ValueError when the checkpoint is missing or its model records no input shape."""
        import torch

        from .convert import merge_model
        from .export import read_spec

        model = merge_model(self.load_model(which)).eval()
        shape = getattr(model, "lorita_input_shape", None)
        if shape is None:
            raise ValueError(f"run {self.name!r}: its model does not record its input shape")
        val_acc = read_spec(self.checkpoint(which))["metadata"].get("val_acc")
        val_acc = float(val_acc) if is_num(val_acc) else None  # (a file edited since: unknown)
        return model, torch.zeros(1, *shape), val_acc

    def preprocess(self, which: str = "best") -> dict | None:
        """How to feed the checkpoint's model (:meth:`lorita.data.Splits.preprocess`), as its
        training recorded it; None for a checkpoint written before that was recorded (or whose
        record is not an object)."""
        from .export import read_spec

        how = read_spec(self.checkpoint(which))["metadata"].get("preprocess")
        return how if isinstance(how, dict) else None  # (a file edited since: not recorded)

    def as_trained_metadata(self, which: str = "best", val_acc: float | None = None) -> dict:
        """The metadata of a file written from the checkpoint as trained (nothing cut): the
        run, ``policy`` "none", the validation accuracy (``val_acc``, as :meth:`as_trained`
        gives it) and how to feed the model where its training recorded that."""
        meta = {"run": self.name, "policy": "none", "val_acc": val_acc}
        how = self.preprocess(which)
        return meta if how is None else {**meta, "preprocess": how}

    def record_data(self) -> None:
        """Keep the digest of the run's dataset as it is now (a folder's files), so that a later
        read can tell whether it changed (:meth:`data_changed`); nothing for a fixed dataset."""
        digest = self._data_digest()
        if digest is not None:
            self.write_extra("data", {"dataset": self.config["dataset"], "digest": digest})

    def data_changed(self) -> str | None:
        """What changed when the run's dataset (a folder) no longer holds what the run trained
        on, else None (the same files, a fixed dataset, or nothing recorded)."""
        kept = self.read_extra("data")
        cfg = self.config
        if not isinstance(kept, dict) or not isinstance(cfg.get("dataset"), str):
            return None  # nothing kept, or a config without a dataset: nothing to compare
        if kept.get("dataset") != cfg["dataset"]:
            return None
        try:
            now = self._data_digest()
        except ValueError:  # gone or unreadable: the load that follows says so
            return None
        if now is None or now == kept.get("digest"):
            return None
        return (
            f"dataset {cfg['dataset']!r}: the folder changed since run {self.name!r} trained "
            "on it (images added, removed or modified), so its validation and test images are "
            "drawn anew and may include images the run trained on"
        )

    def _data_digest(self) -> str | None:
        from .data import dataset_digest

        cfg = self.config
        return dataset_digest(cfg["dataset"], **dataset_kwargs(cfg))

    def load_splits(self):
        """The dataset splits this run trained on (same validation carve-out)."""
        cfg = self.config
        if "dataset" not in cfg:
            broken = self.problem()  # (config.json missing or unreadable, rather)
            why = broken if broken and broken.startswith("config.json") else None
            raise ValueError(f"run {self.name!r}: {why or 'config.json has no dataset'}")
        splits = load_splits(cfg)
        self._check_classes(getattr(splits, "classes", None))
        return splits

    def _check_classes(self, now: list[str] | None) -> None:
        """DatasetUnavailable when the dataset's classes (a folder's class sub-folders, ``now``)
        are no longer those the run's checkpoints were trained on: the model's outputs are
        those classes in their order, so the folder's labels would mean other classes."""
        was = None
        for which in ("best", "last"):
            try:
                was = (self.preprocess(which) or {}).get("classes")
                break
            except (ValueError, OSError):  # no such checkpoint (yet)
                continue
        if not isinstance(was, list) or now is None or list(now) == was:
            return
        from .data import DatasetUnavailable

        def names(classes: list) -> str:
            shown = ", ".join(map(str, classes[:8]))
            return f"{shown}, ... ({len(classes)})" if len(classes) > 8 else shown

        raise DatasetUnavailable(
            f"dataset {self.config['dataset']!r}: its classes are now {names(list(now))}, but run "
            f"{self.name!r} was trained on {names(was)} (the model's outputs, in that order); "
            "put the class folders back as they were to evaluate or cut it"
        )

    # -- the writer (the training process only)
    def hold(self, timeout: float = 1.0) -> None:
        """Take the writer lock for the life of this process (re-entrant for this object).

        ValueError when another live process holds it. The OS releases it when the holder
        dies, however it dies.
        """
        if self._writer is None:
            self._writer = FileLock(str(self.path / WRITER_LOCK), thread_local=False)
        try:
            self._writer.acquire(timeout=timeout)
        except Timeout:
            pid = self.raw_status().get("pid")
            raise ValueError(
                f"run {self.name!r} is in use by another process (pid {pid}); "
                "stop it first or wait for it to end"
            ) from None
        except OSError as e:  # a read-only folder, say: the run cannot be written to
            raise ValueError(
                f"run {self.name!r}: cannot write in its folder {str(self.path)!r} "
                f"({e.strerror or e}); resume it where its folder can be written"
            ) from None

    def release(self) -> None:
        """Give one hold of the writer lock back."""
        if self._writer is not None and self._writer.is_locked:
            self._writer.release()

    def held_elsewhere(self) -> bool:
        """Whether another process holds the writer lock right now."""
        probe = FileLock(str(self.path / WRITER_LOCK), thread_local=False)
        try:
            probe.acquire(timeout=0)
        except Timeout:
            return not (self._writer is not None and self._writer.is_locked)
        except OSError:
            return False
        probe.release()
        return False

    def check_resumable(self) -> None:
        """ValueError (and nothing written) unless this run may be resumed now."""
        st = self.raw_status()
        # (a status.json that cannot be read: its result.json says whether it completed)
        if st.get("state") == "completed" or (
            not st.get("state") and self.result().get("state") == "completed"
        ):
            raise ValueError(
                f"run {self.name!r} already completed; nothing to resume "
                "(its result is kept as it is)"
            )
        if self.is_alive() or self.held_elsewhere():
            raise ValueError(
                f"run {self.name!r} is still {st.get('state')} (pid {st.get('pid')}); stop it "
                f"({self.command('stop')}) and resume it once it has stopped, or let it end"
            )

    def begin_resume(self) -> None:
        """Check the run may be resumed, take the writer lock, drop a stale STOP request and
        mark it queued (resuming)."""
        self.check_resumable()
        self.hold()
        self.check_resumable()  # checked again under the lock
        self.consume_stop()  # a stop asked of an earlier attempt (the run was not live)
        self.update_status(state="queued", message="resuming", ended=None, **_me())

    def mark_owner(self, **fields) -> dict:
        """:meth:`update_status` naming this process as the run's (pid, start, host): a run
        made by one process and trained by another reads live while the other trains it."""
        return self.update_status(**fields, **_me())

    def _require_folder(self) -> None:
        """FileNotFoundError when the run folder is gone: a writer never brings back a folder
        removed or renamed while it was in use (it would hold no config.json, be listed
        nowhere and still block its name)."""
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"run {self.name!r}: its folder {str(self.path)!r} is gone "
                "(removed or renamed while in use)"
            )

    def update_status(self, **fields) -> dict:
        """Merge fields into status.json (atomic) and refresh the heartbeat."""
        with self._lock:
            self._require_folder()
            st = self._status_cache if self._status_cache is not None else self.raw_status()
            st = {**st, **fields, "heartbeat": time.time()}
            write_json(self.path / "status.json", st)
            self._status_cache = st
            return dict(st)

    def start_heartbeat(self, interval: float = HEARTBEAT_S) -> None:
        """Refresh status.json's heartbeat from a background thread (idempotent)."""
        if self._hb_thread is not None and self._hb_thread.is_alive():
            return
        self._hb_stop = threading.Event()
        self._hb_thread = threading.Thread(
            target=self._beat, args=(self._hb_stop, interval), name="heartbeat", daemon=True
        )
        self._hb_thread.start()

    def _beat(self, stop: threading.Event, interval: float) -> None:
        while not stop.wait(interval):
            with contextlib.suppress(OSError):
                self.update_status()

    def stop_heartbeat(self) -> None:
        if self._hb_stop is not None:
            self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=5)
        self._hb_thread = None

    def write_config(self, config: dict) -> None:
        write_json(self.path / "config.json", config, sync=True)

    def write_result(self, result: dict) -> None:
        self._require_folder()
        write_json(self.path / "result.json", result, sync=True)

    def log_metrics(self, row: dict) -> None:
        self._append("metrics.jsonl", row)

    def log_spectra(self, row: dict) -> None:
        self._append("spectra.jsonl", row)

    def _append(self, fname: str, row: dict) -> None:
        try:
            append_jsonl(self.path / fname, row)
        except FileNotFoundError:
            self._require_folder()  # says the folder is gone, if it is
            raise

    def consume_stop(self) -> None:
        """Remove the STOP request once it has been acted on."""
        (self.path / "STOP").unlink(missing_ok=True)

    def clean_temp(self) -> None:
        """Remove temporary files left by a killed writer (run folder and checkpoints/)."""
        _clean_temp_files(self.path)
        _clean_temp_files(self.checkpoint_dir)

    def start_over(self) -> None:
        """Forget everything a previous attempt wrote (logs, result, checkpoints); keep config,
        status and a pending STOP request."""
        for fname in ("metrics.jsonl", "spectra.jsonl", "result.json"):
            (self.path / fname).unlink(missing_ok=True)
        gone = self.path / f".tmp-checkpoints-{os.getpid()}"  # killed meanwhile, no half-
        with contextlib.suppress(FileNotFoundError):  # deleted checkpoint is left under
            remove_folder(self.checkpoint_dir, gone)  # checkpoints/
        self.checkpoint_dir.mkdir(exist_ok=True)
        for fname in ("metrics.jsonl", "spectra.jsonl"):
            (self.path / fname).touch()

    def truncate_logs(self, step: int) -> None:
        """Keep the log lines of steps up to ``step`` (the checkpoint a run resumes from)."""

        def upto(r: dict) -> bool:
            s = r.get("step")
            return isinstance(s, int) and not isinstance(s, bool) and s <= step

        rows = [r for r in self.metrics() if upto(r) and r.get("split") != "test"]
        rewrite_jsonl(self.path / "metrics.jsonl", rows)
        rewrite_jsonl(self.path / "spectra.jsonl", [r for r in self.spectra() if upto(r)])
        (self.path / "result.json").unlink(missing_ok=True)


def _me(pid: int | None = None) -> dict:
    """Status fields naming this process (or process ``pid``)."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, **process_identity(pid), "host": socket.gethostname()}


# --------------------------------------------------------------------------- launch requests


def write_launch_owner(root: str | Path, name: str, pid: int | None = None) -> None:
    """Name process ``pid`` (default: this one) as the one that will make the folder of run
    ``name``, whose launcher's request is ``<root>/.app/<name>.json``."""
    path = Path(root) / LAUNCH_DIR / f"{validate_name(name)}{LAUNCH_OWNER}"
    write_json(path, _me(pid))


def live_launch_request(root: str | Path, name: str) -> Path | None:
    """The launcher's request ``<root>/.app/<name>.json`` while it holds the name ``name``: no
    run folder of that name yet, and the process that will make it (:func:`write_launch_owner`)
    alive; one on another machine is honoured, as liveness cannot be told from here, and one
    whose owner is not written yet holds for STALE_S seconds. None when no request holds it."""
    request = Path(root) / LAUNCH_DIR / f"{validate_name(name)}.json"
    try:
        age = time.time() - request.stat().st_mtime
    except OSError:
        return None
    if (Path(root) / name).exists():
        return None  # the folder itself holds the name now
    owner = read_json(request.with_name(name + LAUNCH_OWNER), None)
    if not isinstance(owner, dict):
        return request if age <= STALE_S else None
    if owner.get("host") != socket.gethostname():
        return request
    return request if recorded_alive(owner) else None


# --------------------------------------------------------------------------- the store


def _created(run: Run) -> float:
    created = _num(run.raw_status().get("created"), math.nan)
    if math.isnan(created):
        try:
            return (run.path / "config.json").stat().st_mtime
        except OSError:
            return 0.0
    return created


#: (runs folder, run, window) -> (its pair's name or None, the folder's listing stamp then).
#: Pairing reads every run's config; the Compress page asks on every slider move, so a pair
#: found is kept (setup and creation time never change), and "no pair" is kept while the
#: folder's listing is unchanged and settled (older than PAIR_SETTLED_S: a run is created as
#: its folder, then its config a moment later).
_PAIRS: dict[tuple[str, str, float], tuple[str | None, int | None]] = {}


def _listing_stamp(root: Path) -> int | None:
    """When runs were last added to or removed from ``root`` (its mtime, ns)."""
    try:
        return root.stat().st_mtime_ns
    except OSError:
        return None


def config_row(cfg: dict) -> dict:
    """The settings columns of a run's table row (:meth:`Run.summary`), from its config."""
    keys = ("dataset", "model", "n_factors", "init", "optimizer", "lr", "weight_decay")
    return {**{k: cfg.get(k) for k in (*keys, "epochs", "seed")},
            "plain_epochs": cfg.get("plain_epochs", 0)}  # fmt: skip


def made_by_store(path: Path) -> bool:
    """A folder :meth:`RunStore.create` made: checkpoints/ and status.json are in it from the
    start (a folder that only holds a config.json, a model's download say, is not one)."""
    return (path / "checkpoints").is_dir() and (path / "status.json").is_file()


def run_folder_of(path: Path) -> Path | None:
    """The run folder ``path`` is in (itself or a folder above it), or None."""
    try:
        path = Path(path).resolve()
    except (OSError, RuntimeError):
        return None
    for p in (path, *path.parents):
        if made_by_store(p) and (p / "config.json").is_file():
            return p
    return None


def _is_run_folder(path: Path) -> bool:
    """A run's folder: its config.json, or (a damaged run, listed as broken so that it can
    be deleted) its status.json."""
    return (path / "config.json").is_file() or (path / "status.json").is_file()


class RunStore:
    """All runs under one folder (``root``, else ``$LORITA_RUNS``, else ``./runs``)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root if root is not None else os.environ.get("LORITA_RUNS", "runs"))
        try:  # checkpoints are read by name through safetensors, which takes UTF-8 paths only
            str(self.root).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"runs folder: {str(self.root)!r} holds bytes that are not UTF-8 text: its runs "
                "could be written but not read back; use a folder whose path is UTF-8"
            ) from None

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    def path(self, name: str) -> Path:
        """The folder of run ``name`` (the name is checked first)."""
        return self.root / validate_name(name)

    def list(self) -> list[Run]:
        """Every run, newest first; broken folders too (see :meth:`Run.problem`)."""
        try:
            entries = list(self.root.iterdir()) if self.root.is_dir() else []
        except OSError:
            return []
        runs = []
        for p in entries:
            with contextlib.suppress(OSError):
                if _is_name(p.name) and p.is_dir() and _is_run_folder(p):
                    runs.append(Run(p))
        return sorted(runs, key=_created, reverse=True)

    def misnamed(self) -> list[str]:
        """Folders that hold a run's files under a name no run can have (a run folder copied
        or renamed as ``my run``, say): :meth:`list` leaves them out, so a page says so.
        Hidden folders (drafts, folders being deleted, the app's own) are not counted."""
        try:
            entries = list(self.root.iterdir()) if self.root.is_dir() else []
        except OSError:
            return []
        out = []
        for p in entries:
            with contextlib.suppress(OSError):
                if p.name[:1] != "." and not _is_name(p.name) and p.is_dir():
                    if _is_run_folder(p):
                        out.append(p.name)
        return sorted(out)

    def get(self, name: str) -> Run:
        path = self.path(name)
        if not _is_run_folder(path):
            raise ValueError(f"run: no run named {name!r} in {self.root}")
        return Run(path)

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def new_name(self, config: dict, suffix: str = "") -> str:
        """A fresh readable name: dataset-model-N<n>-YYYYmmdd-HHMMSS[-k][suffix], with no run
        folder of that name and no launcher's request for it (:data:`LAUNCH_DIR`)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg = config if isinstance(config, dict) else {}
        parts = [cfg.get("dataset", "run"), cfg.get("model", "model")]
        base = f"{parts[0]}-{parts[1]}-N{cfg.get('n_factors', 1)}-{stamp}"
        base = re.sub(r"[^A-Za-z0-9._-]", "_", base).strip("._-")[:80] or "run"
        suffix = re.sub(r"[^A-Za-z0-9._-]", "_", str(suffix))[:16]
        name, k = base + suffix, 1
        while (self.root / name).exists() or (self.root / LAUNCH_DIR / f"{name}.json").exists():
            k += 1
            name = f"{base}-{k}{suffix}"
        return validate_name(name)

    def create(self, config: dict, name: str | None = None) -> Run:
        """Make a new run folder with config.json and a queued status.json."""
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
            raise ValueError(
                f"config: expected a TrainConfig or its dict, got {type(config).__name__}"
            )
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"runs folder: {str(self.root)!r} exists and is not a folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(
                f"runs folder: cannot make {str(self.root)!r} ({e.strerror or e})"
            ) from None
        chosen = name is not None
        name = validate_name(name) if chosen else self.new_name(config)
        remove_dead_temps(self.root)  # drafts of run folders whose process died
        while not self._publish(name, config):
            if chosen:
                raise ValueError(f"run name: {name!r} already exists in {self.root}")
            name = self.new_name(config)  # taken since new_name looked (runs started together)
        fault("created")
        return Run(self.root / name)

    def _publish(self, name: str, config: dict) -> bool:
        """Make run folder ``name`` whole or not at all: its config.json, a queued status.json
        and checkpoints/ are written in a hidden draft folder, which is then renamed into
        place, so a process killed meanwhile leaves no half-made run (an empty folder that
        would hold the name). False if a run of that name exists (made by another process)."""
        draft = temp_beside(self.root / name, ".draft")  # .<name>.<pid>.<thread>.draft
        try:
            (draft / "checkpoints").mkdir(parents=True)
            write_json(draft / "config.json", config, sync=True)
            Run(draft).update_status(
                state="queued",
                message="",
                created=time.time(),
                started=None,
                ended=None,
                step=0,
                total_steps=None,
                epoch=0,
                device=None,
                **_me(),
            )
            fault("draft")
            os.rename(draft, self.root / name)  # over nothing, or an empty folder
        except OSError as e:
            shutil.rmtree(draft, ignore_errors=True)
            if (self.root / name).exists():
                return False
            raise ValueError(
                f"runs folder: cannot make a run folder in {str(self.root)!r} ({e.strerror or e})"
            ) from None
        return True

    def delete(self, name: str) -> None:
        """Remove a run folder (refused while its process is alive); a run folder that is a
        symbolic link loses the link only, the folder it points to is left as it is."""
        run = self.get(name)
        if not made_by_store(run.path) and any(
            p.name not in RUN_FILES and not p.name.startswith(".") for p in run.path.iterdir()
        ):  # a folder with a config.json and other files: maybe not a run at all
            raise ValueError(
                f"run: {name!r} holds files no run has and no status.json or checkpoints/; it "
                "may not be a run folder, so nothing was deleted"
            )
        if run.is_alive() or run.held_elsewhere():
            raise ValueError(
                f"run: {name!r} is still {run.raw_status().get('state')}; stop it first"
            )
        if run.path.is_symlink():  # a run linked in from elsewhere: the link goes, not its files
            run.path.unlink()
            return
        # Renamed aside first (a hidden name: no longer a run), so that a file that cannot be
        # removed leaves no half-deleted run still listed with its results. What a delete
        # killed meanwhile left aside (any run's) is removed now: deleting frees the disk.
        remove_dead_temps(self.root)
        aside = temp_beside(run.path, ".deleting")
        try:
            failed = remove_folder(run.path, aside, killed_at="run_deleting")
        except OSError as e:
            raise OSError(e.errno, f"cannot delete {str(run.path)!r}: {e.strerror or e}") from None
        if failed:
            warnings.warn(
                f"run {name!r} is deleted, but {len(failed)} of its files or folders could not be "
                f"removed from {str(aside)!r}, e.g. {failed[0]}",
                stacklevel=2,
            )

    def summaries(self) -> list[dict]:
        return [r.summary() for r in self.list()]

    def compare(self, names: list[str]) -> list[dict]:
        """Summaries of the named runs, in the order given (one name alone will do)."""
        names = [names] if isinstance(names, str) else names
        return [self.get(n).summary() for n in names]

    def pair(self, run: Run | str, window_s: float | None = None) -> Run | None:
        """The run with the same setup as ``run`` and the other N, created closest to it.

        For a composed run (N > 1): its N=1 baseline; for an N=1 run: the composed run it was
        started with. Found from the folders alone (the same :func:`setup_of`, created within
        ``window_s`` seconds of it when given), so a restart finds the pair again.
        """
        me = self.get(run) if isinstance(run, str) else run
        key = (str(self.root), me.name, window_s)
        known = _PAIRS.get(key)
        if known is not None and known[0] is not None:
            with contextlib.suppress(ValueError):  # gone since: look again
                return self.get(known[0])  # a pair, once found, stays one
        listing = _listing_stamp(self.root)
        if known is not None and known[0] is None and known[1] == listing:
            return None  # no pair, and no run added or removed since
        best = self._find_pair(me, window_s)
        settled = listing is not None and time.time() - listing / 1e9 > PAIR_SETTLED_S
        if best is not None or settled:
            if len(_PAIRS) > 4096:
                _PAIRS.clear()
            _PAIRS[key] = (best.name if best else None, listing)
        return best

    def _find_pair(self, me: Run, window_s: float | None) -> Run | None:
        cfg, born = me.config, _created(me)
        mine_n1 = cfg.get("n_factors", 1) == 1
        mine = None
        best: tuple[float, Run] | None = None
        for other in self.list():
            ocfg = other.config
            if other.name == me.name or (ocfg.get("n_factors", 1) == 1) == mine_n1:
                continue
            if any(cfg.get(k) != ocfg.get(k) for k in ("dataset", "model", "seed", "epochs")):
                continue  # (cheap first: most runs differ here)
            mine = mine or setup_of(cfg)
            if setup_of(ocfg) != mine:
                continue
            gap = abs(_created(other) - born)
            if (window_s is None or gap <= window_s) and (best is None or gap < best[0]):
                best = (gap, other)
        return best[1] if best else None


# --------------------------------------------------------------------------- concurrency


class Slot:
    """One held training slot; :meth:`close` gives it back (so does the process's death)."""

    def __init__(self, lock: FileLock) -> None:
        self._lock = lock

    def close(self) -> None:
        if self._lock.is_locked:
            self._lock.release()


def acquire_slot(root: str | os.PathLike, k: int, *, poll: float = 0.5, should_stop=None):
    """Block until one of ``k`` slots under ``<root>/.slots`` is free; return it (a Slot).

    Each slot is a file lock (``filelock``: flock on POSIX, msvcrt on Windows), held until
    ``close()`` or the process's exit (the OS drops it even on a crash), so a queue survives
    restarts of whoever started the runs. Waiters are served in the order they came: each
    leaves a ticket in ``.slots/queue`` and tries the locks only while fewer than ``k`` live
    tickets are older than its own (a dead process's ticket is passed over and removed).
    Returns None if ``should_stop()`` becomes true.
    """
    if not is_int(k) or k < 1:
        raise ValueError(f"max_concurrent: expected an integer >= 1, got {k!r}")
    folder = Path(root) / ".slots"
    queue = folder / "queue"
    queue.mkdir(parents=True, exist_ok=True)
    ticket = temp_beside(queue / f"{time.time_ns():020d}", ".ticket")  # ordered by the time
    ticket.touch()
    try:
        while True:
            if _ahead(queue, ticket) < k:
                for i in range(k):
                    lock = FileLock(str(folder / f"slot-{i}.lock"), thread_local=False)
                    try:
                        lock.acquire(timeout=0)
                    except Timeout:
                        continue
                    return Slot(lock)
            if should_stop is not None and should_stop():
                return None
            time.sleep(poll)
    finally:
        ticket.unlink(missing_ok=True)


def _ahead(queue: Path, ticket: Path) -> int:
    """How many live waiters came before ``ticket`` (the tickets of dead ones removed)."""
    remove_dead_temps(queue)
    with contextlib.suppress(OSError):
        return sum(t.name < ticket.name for t in queue.iterdir())
    return 0
