"""The run store: one folder per training run, the single source of truth for CLI and app.

Layout of ``<root>/<name>/`` (root: ``LORITA_RUNS``, default ``./runs``)::

    config.json       the TrainConfig as a dict
    status.json       state (queued|running|completed|failed|stopped), message, pid, heartbeat,
                      created / started / ended (unix seconds), step, total_steps, epoch, device
    metrics.jsonl     one line per measurement: step, epoch, split (train|val|test), loss, acc,
                      lr, time
    spectra.jsonl     one line per snapshot: step, epoch, layers {name: [singular values]}
    result.json       the final numbers (best validation accuracy, test accuracy, ...)
    checkpoints/      best.safetensors, last.safetensors (lorita.save), train_state.safetensors
    STOP              present when a stop was requested

JSON files are written atomically (temporary file, then rename); the ``.jsonl`` files are
append-only and their readers skip a half-written last line. A run whose process is gone and
whose heartbeat is stale reads as ``failed`` with the message ``process died``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .export import atomic_write_bytes

__all__ = [
    "Run",
    "RunStore",
    "acquire_slot",
    "append_jsonl",
    "read_jsonl",
    "validate_name",
    "write_json",
]

STATES = ("queued", "running", "completed", "failed", "stopped")
ACTIVE = ("queued", "running")
HEARTBEAT_S = 2.0  # how often a live process refreshes status.json
STALE_S = 15.0  # heartbeat older than this and pid gone: the process died
STALE_ANY_S = (
    180.0  # heartbeat older than this: dead even if the pid exists (reused pid, other host)
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


# --------------------------------------------------------------------------- files


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe run name (letters, digits, ``._-``; no path tricks)."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ValueError(
            f"run name: {name!r} is not allowed; use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def _json_default(o: Any):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, tuple | set):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o: Any) -> Any:
    """Replace non-finite floats (not valid JSON) by None."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_clean(v) for v in o]
    return o


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically: a temporary file in the same folder, then ``os.replace``."""
    text = json.dumps(_clean(obj), indent=1, default=_json_default) + "\n"
    atomic_write_bytes(path, text.encode(), sync=False)


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line (one ``write`` call, so a reader sees it whole or not at all)."""
    line = json.dumps(_clean(obj), separators=(",", ":"), default=_json_default) + "\n"
    with open(path, "a") as f:
        f.write(line)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All complete JSON lines of a file; a half-written or broken line is skipped."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # being written right now
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return out


def read_last_jsonl(path: str | os.PathLike) -> dict | None:
    """The last complete JSON line, read from the end (cheap for large files)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            chunk, pos, buf = 65536, end, b""
            while pos > 0:
                pos = max(0, pos - chunk)
                f.seek(pos)
                buf = f.read(end - pos)
                lines = buf.split(b"\n")
                # lines[-1] is the unterminated tail; lines[0] may be cut unless pos == 0
                complete = lines[:-1] if pos == 0 else lines[1:-1]
                for line in reversed(complete):
                    try:
                        return json.loads(line)
                    except json.JSONDecodeError:
                        continue
                chunk *= 4
    except FileNotFoundError:
        pass
    return None


def rewrite_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Replace a ``.jsonl`` file atomically (used when a resumed run drops lost lines)."""
    text = "".join(
        json.dumps(_clean(r), separators=(",", ":"), default=_json_default) + "\n" for r in rows
    )
    atomic_write_bytes(path, text.encode(), sync=False)


def pid_alive(pid: Any) -> bool:
    """Whether a process with this id exists on this machine."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- one run


class Run:
    """A run folder. Reading methods never raise on a run that is still being written."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self._lock = threading.Lock()
        self._status_cache: dict | None = None
        self._hb_stop: threading.Event | None = None
        self._hb_thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Run({self.name!r})"

    # -- files
    @property
    def config(self) -> dict:
        return read_json(self.path / "config.json", {}) or {}

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, which: str = "best") -> Path:
        if which not in ("best", "last"):
            raise ValueError(f"which: {which!r}; allowed: best, last")
        return self.checkpoint_dir / f"{which}.safetensors"

    def raw_status(self) -> dict:
        """status.json as written (no liveness check)."""
        return read_json(self.path / "status.json", {}) or {}

    def is_alive(self) -> bool:
        """Whether the process behind a queued/running run still lives.

        On the machine that runs it, the pid decides at once; elsewhere (a shared folder) a
        heartbeat older than STALE_S seconds means dead. A heartbeat older than STALE_ANY_S
        means dead in any case (the pid may have been reused).
        """
        st = self.raw_status()
        if st.get("state") not in ACTIVE:
            return False
        age = time.time() - float(st.get("heartbeat") or st.get("created") or 0)
        if age > STALE_ANY_S:
            return False
        if st.get("host") == socket.gethostname():
            return pid_alive(st.get("pid"))
        return age <= STALE_S

    def status(self) -> dict:
        """status.json; an active run whose process died reads as failed ("process died")."""
        st = self.raw_status()
        if not st:
            return {"state": "failed", "message": "status.json missing"}
        if st.get("state") in ACTIVE and not self.is_alive():
            st = {**st, "state": "failed", "message": "process died", "ended": st.get("heartbeat")}
        return st

    def metrics(self, split: str | None = None) -> list[dict]:
        rows = read_jsonl(self.path / "metrics.jsonl")
        return rows if split is None else [r for r in rows if r.get("split") == split]

    def spectra(self) -> list[dict]:
        return read_jsonl(self.path / "spectra.jsonl")

    def last_spectra(self) -> dict | None:
        return read_last_jsonl(self.path / "spectra.jsonl")

    def result(self) -> dict:
        return read_json(self.path / "result.json", {}) or {}

    def request_stop(self) -> None:
        """Ask the training process to stop after its current step (it writes a checkpoint)."""
        (self.path / "STOP").touch()

    def stop_requested(self) -> bool:
        return (self.path / "STOP").exists()

    def summary(self, tol: float | None = None) -> dict:
        """One row for tables: state, setup, accuracies and effective ranks of the last snapshot."""
        cfg, st, res = self.config, self.status(), self.result()
        vals = self.metrics("val")
        best = max(vals, key=lambda r: r.get("acc") or -1.0) if vals else {}
        ranks = {}
        snap = self.last_spectra()
        if snap:
            ranks = effective_ranks(snap.get("layers", {}), tol=tol)
        return {
            "name": self.name,
            "state": st.get("state"),
            "message": st.get("message", ""),
            "dataset": cfg.get("dataset"),
            "model": cfg.get("model"),
            "n_factors": cfg.get("n_factors"),
            "optimizer": cfg.get("optimizer"),
            "lr": cfg.get("lr"),
            "weight_decay": cfg.get("weight_decay"),
            "epochs": cfg.get("epochs"),
            "seed": cfg.get("seed"),
            "step": st.get("step"),
            "total_steps": st.get("total_steps"),
            "created": st.get("created"),
            "started": st.get("started"),
            "ended": st.get("ended"),
            "best_val_acc": res.get("best_val_acc", best.get("acc")),
            "best_step": res.get("best_step", best.get("step")),
            "val_acc": vals[-1].get("acc") if vals else None,
            "test_acc": res.get("test_acc"),
            "spectra_step": snap.get("step") if snap else None,
            "effective_ranks": ranks,
        }

    # -- loading
    def load_model(self, which: str = "best"):
        """The composed model of a checkpoint, on CPU, in eval mode."""
        import lorita

        path = self.checkpoint(which)
        if not path.is_file():
            raise ValueError(f"run {self.name!r}: no {which} checkpoint at {path}")
        return lorita.load(str(path)).eval()

    def load_splits(self):
        """The dataset splits this run trained on (same validation carve-out)."""
        from .train import TrainConfig, load_splits

        return load_splits(TrainConfig.from_dict(self.config))

    # -- writing (the training process only)
    def update_status(self, **fields) -> dict:
        """Merge fields into status.json (atomic) and refresh the heartbeat."""
        with self._lock:
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

        def beat(stop=self._hb_stop):
            while not stop.wait(interval):
                with contextlib.suppress(OSError):
                    self.update_status()

        self._hb_thread = threading.Thread(target=beat, name=f"heartbeat-{self.name}", daemon=True)
        self._hb_thread.start()

    def stop_heartbeat(self) -> None:
        if self._hb_stop is not None:
            self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=5)
        self._hb_thread = None

    def log_metrics(self, row: dict) -> None:
        append_jsonl(self.path / "metrics.jsonl", row)

    def log_spectra(self, row: dict) -> None:
        append_jsonl(self.path / "spectra.jsonl", row)


def effective_ranks(layers: dict[str, list[float]], tol: float | None = None) -> dict[str, int]:
    """Effective rank of each layer's singular values (via :func:`lorita.effective_rank`)."""
    import torch

    import lorita

    out = {}
    for name, s in layers.items():
        if not s:
            continue
        t = torch.tensor([v if v is not None else float("nan") for v in s], dtype=torch.float32)
        t = torch.nan_to_num(t, nan=0.0)
        r = lorita.effective_rank(t) if tol is None else lorita.effective_rank(t, tol=tol)
        out[name] = int(r)
    return out


# --------------------------------------------------------------------------- the store


class RunStore:
    """All runs under one folder (``root``, else ``$LORITA_RUNS``, else ``./runs``)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root if root is not None else os.environ.get("LORITA_RUNS", "runs"))

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    def list(self) -> list[Run]:
        """Every run, newest first."""
        if not self.root.is_dir():
            return []
        runs = []
        for p in self.root.iterdir():
            if p.is_dir() and _NAME_RE.match(p.name) and (p / "config.json").is_file():
                runs.append(Run(p))

        def created(r: Run) -> float:
            return float(r.raw_status().get("created") or (r.path / "config.json").stat().st_mtime)

        return sorted(runs, key=created, reverse=True)

    def get(self, name: str) -> Run:
        validate_name(name)
        path = self.root / name
        if not (path / "config.json").is_file():
            raise ValueError(f"run: no run named {name!r} in {self.root}")
        return Run(path)

    def exists(self, name: str) -> bool:
        validate_name(name)
        return (self.root / name).exists()

    def new_name(self, config: dict) -> str:
        """A fresh readable name: dataset-model-N<n>-YYYYmmdd-HHMMSS[-k]."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = f"{config.get('dataset', 'run')}-{config.get('model', 'model')}-N{config.get('n_factors', 1)}-{stamp}"
        base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[:90]
        name, k = base, 1
        while (self.root / name).exists():
            k += 1
            name = f"{base}-{k}"
        return name

    def create(self, config: dict, name: str | None = None) -> Run:
        """Make a new run folder with config.json and a queued status.json."""
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        self.root.mkdir(parents=True, exist_ok=True)
        name = validate_name(name) if name is not None else self.new_name(config)
        path = self.root / name
        try:
            path.mkdir()
        except FileExistsError:
            raise ValueError(f"run name: {name!r} already exists in {self.root}") from None
        (path / "checkpoints").mkdir()
        write_json(path / "config.json", config)
        now = time.time()
        run = Run(path)
        run.update_status(
            state="queued",
            message="",
            pid=os.getpid(),
            host=socket.gethostname(),
            created=now,
            started=None,
            ended=None,
            step=0,
            total_steps=None,
            epoch=0,
            device=None,
        )
        return run

    def delete(self, name: str) -> None:
        """Remove a run folder (refused while its process is alive)."""
        run = self.get(name)
        if run.is_alive():
            raise ValueError(
                f"run: {name!r} is still {run.raw_status().get('state')}; stop it first"
            )
        shutil.rmtree(run.path)

    def summaries(self) -> list[dict]:
        return [r.summary() for r in self.list()]

    def compare(self, names: list[str]) -> list[dict]:
        """Summaries of the named runs, in the order given."""
        return [self.get(n).summary() for n in names]


# --------------------------------------------------------------------------- concurrency


def acquire_slot(root: str | os.PathLike, k: int, *, poll: float = 0.5, should_stop=None):
    """Block until one of ``k`` slots under ``<root>/.slots`` is free; return its open file.

    The slot is an ``fcntl.flock`` lock, held until the file is closed or the process exits
    (the kernel drops it even on a crash), so a queue survives restarts of whoever started the
    runs. Returns None if ``should_stop()`` becomes true while waiting.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"max_concurrent: expected an integer >= 1, got {k!r}")
    folder = Path(root) / ".slots"
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for i in range(k):
            f = open(folder / f"slot-{i}.lock", "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            return f
        if should_stop is not None and should_stop():
            return None
        time.sleep(poll)
