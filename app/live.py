"""Shape a run's logged spectra for the charts (no maths here: ranks come from the library)."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any


def rank_rule() -> str:
    """How the effective rank counts, for chart titles: 'σ > 1% of σ_max'."""
    from lorita.spectra import EFFECTIVE_RANK_TOL

    return f"σ > {100 * EFFECTIVE_RANK_TOL:g}% of σ_max"


def layer_names(spectra_rows: Sequence[dict[str, Any]]) -> list[str]:
    """Layer names in the order of the latest snapshot."""
    for row in reversed(spectra_rows):
        layers = row.get("layers") or {}
        if layers:
            return list(layers)
    return []


def widest_layer(spectra_rows: Sequence[dict[str, Any]]) -> str | None:
    """The layer with the most singular values (where a rank drop shows best)."""
    for row in reversed(spectra_rows):
        layers = row.get("layers") or {}
        if layers:
            return max(layers, key=lambda n: len(layers[n] or []))
    return None


def layer_series(
    spectra_rows: Sequence[dict[str, Any]], layer: str
) -> tuple[list[int], list[list[float]]]:
    """Steps and singular values of one layer over the run (snapshots without it skipped)."""
    steps, values = [], []
    for row in spectra_rows:
        s = (row.get("layers") or {}).get(layer)
        if s:
            steps.append(int(row.get("step", len(steps))))
            values.append([float(v) if v is not None else 0.0 for v in s])
    return steps, values


def latest(spectra_rows: Sequence[dict[str, Any]]) -> tuple[int | None, dict[str, list[float]]]:
    """The last snapshot: its step and {layer: singular values}."""
    for row in reversed(spectra_rows):
        if row.get("layers"):
            return row.get("step"), dict(row["layers"])
    return None, {}


def rank_series(
    spectra_rows: Sequence[dict[str, Any]],
) -> tuple[list[int], dict[str, list[int]]]:
    """Effective rank of every layer at every snapshot (lorita.runs.effective_ranks; a
    :class:`RunFollower`'s snapshots carry theirs)."""
    from lorita.runs import effective_ranks

    steps: list[int] = []
    out: dict[str, list[int]] = {}
    for row in spectra_rows:
        layers = row.get("layers") or {}
        if not layers:
            continue
        steps.append(int(row.get("step", len(steps))))
        ranks = row.get("ranks")  # (a follower's snapshot has them already)
        for name, r in (ranks if isinstance(ranks, dict) else effective_ranks(layers)).items():
            out.setdefault(name, []).append(r)
    return steps, out


# --- following a run cheaply ----------------------------------------------------------------

MAX_METRIC_POINTS = 600  # per split; older points are thinned to every second one
MAX_SNAPSHOTS = 120  # spectra snapshots held for the heatmap and the rank curves


def thin(rows: list, limit: int) -> list:
    """Halve ``rows`` (every second one, the newest always kept) until at most ``limit``."""
    while len(rows) > limit:
        last = rows[-1]
        rows = rows[::2]
        if rows[-1] is not last:
            rows.append(last)
    return rows


READ_BYTES = 4 * 1024 * 1024  # a log is read in parts of about this size, thinned after each


class RunFollower:
    """A run's metrics and spectra logs, read incrementally for the live panel and overlays.

    Each :meth:`update` reads only the lines appended since the last one (the run store's
    byte-offset reader, :data:`READ_BYTES` at a time), keeps at most ``MAX_METRIC_POINTS``
    points per split and ``MAX_SNAPSHOTS`` spectra snapshots (thinned evenly, the newest
    always kept) and works out the effective ranks of the snapshots it keeps, once each. A run
    with thousands of snapshots costs the same per second as a short one, and opening it
    holds one part of its logs at a time, never the whole.
    """

    def __init__(self, run: Any) -> None:
        self.run = run
        self.offsets = {"metrics": 0, "spectra": 0}
        self.files: dict[str, tuple[int, int] | None] = {"metrics": None, "spectra": None}
        self.metrics: dict[str, list[dict[str, Any]]] = {}
        self.snapshots: list[dict[str, Any]] = []  # {"step", "layers", "ranks"}
        self.last_snapshot: dict[str, Any] | None = None
        self._lock = threading.Lock()  # (one follower may serve several sessions)

    def update(self) -> bool:
        """Read what is new; True if anything was."""
        with self._lock:
            new_m = self._drain("metrics", self._take_metrics)
            new_s = self._drain("spectra", self._take_spectra)
            if new_s:
                from lorita.runs import effective_ranks

                for snap in self.snapshots:  # (the kept ones only: at most MAX_SNAPSHOTS)
                    if snap["ranks"] is None:
                        snap["ranks"] = effective_ranks(snap["layers"])
            return new_m or new_s

    def _drain(self, kind: str, take) -> bool:
        """Read ``kind``'s new lines part by part, handing each part to ``take``."""
        got = False
        # A resumed run rewrites its logs (a new file, renamed into place) and appends to
        # them at once: however long since the last read, the file's identity tells.
        try:
            st = os.stat(self.run.path / f"{kind}.jsonl")
            file = (st.st_dev, st.st_ino)
        except (OSError, AttributeError, TypeError):
            file = None
        if file is not None and file != self.files[kind]:
            if self.files[kind] is not None:  # read anew from the start
                self.offsets[kind] = 0
                self._forget(kind)
                got = True
            self.files[kind] = file
        while True:
            before = self.offsets[kind]
            rows, self.offsets[kind] = read_new(self.run, kind, before, READ_BYTES)
            if self.offsets[kind] < before:  # rewritten (a resumed run dropped lost lines)
                self._forget(kind)
            if rows:
                take(rows)
                got = True
            if self.offsets[kind] <= before:
                return got

    def _forget(self, kind: str) -> None:
        if kind == "metrics":
            self.metrics = {}
        else:
            self.snapshots = []

    def _take_metrics(self, rows: list[dict[str, Any]]) -> None:
        by_split: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_split.setdefault(str(row.get("split")), []).append(row)
        held = dict(self.metrics)
        for split, new in by_split.items():
            held[split] = thin([*held.get(split, []), *new], MAX_METRIC_POINTS)
        self.metrics = held

    def _take_spectra(self, rows: list[dict[str, Any]]) -> None:
        snaps = [{"step": int(row.get("step", 0)), "layers": row["layers"], "ranks": None}
                 for row in rows if isinstance(row.get("layers"), dict) and row["layers"]]  # fmt: skip
        if snaps:
            self.snapshots = thin([*self.snapshots, *snaps], MAX_SNAPSHOTS)
            self.last_snapshot = snaps[-1]

    def metric_rows(self) -> list[dict[str, Any]]:
        """Every held metrics row (all splits), for training_curves."""
        return [r for rows in self.metrics.values() for r in rows]

    def spectra_rows(self) -> list[dict[str, Any]]:
        """The held snapshots in the spectra log's row shape ({"step", "layers"})."""
        return self.snapshots

    def rank_series(self) -> tuple[list[int], dict[str, list[int]]]:
        """Effective rank of every layer at every held snapshot (computed once each)."""
        steps: list[int] = []
        out: dict[str, list[int]] = {}
        for snap in self.snapshots:
            if snap["ranks"] is None:  # (kept a moment ago by another session's update)
                continue
            steps.append(snap["step"])
            for name, r in snap["ranks"].items():
                out.setdefault(name, []).append(r)
        return steps, out


def read_new(
    run: Any, kind: str, offset: int, max_bytes: int | None = None
) -> tuple[list[dict[str, Any]], int]:
    """The complete rows of a run's ``kind`` log ("metrics" or "spectra") after ``offset``
    (about ``max_bytes`` of them when given: a long log is read in parts).

    Uses the run store's incremental reader when it has one; a half-written last line is left
    for the next call. Returns the rows and the offset to pass next time.
    """
    reader = getattr(run, "read_new", None)
    if reader is not None:
        return reader(kind, offset, max_bytes)
    import json
    import os

    path = run.path / f"{kind}.jsonl"
    try:
        size = os.path.getsize(path)
    except OSError:
        return [], 0
    if size < offset:  # rewritten (a resumed run dropped lost lines): start again
        offset = 0
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size - offset)
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, offset + end


MAX_FOLLOWERS = 8  # runs whose thinned logs this process keeps (the live panel, overlays)
_FOLLOWERS: OrderedDict[tuple[str, tuple[int, int]], RunFollower] = OrderedDict()
_FOLLOWERS_LOCK = threading.Lock()


def follower(run: Any) -> RunFollower:
    """The process's follower of ``run`` (a :class:`lorita.runs.Run`), brought up to date:
    every session and page that shows the run reads its logs' new lines once, together. A
    run folder made anew under the same name gets a new follower."""
    try:  # (a folder's inode may be reused: its config.json's time tells the runs apart)
        made = (run.path.stat().st_ino, (run.path / "config.json").stat().st_mtime_ns)
    except OSError:
        made = (0, 0)
    key = (str(run.path), made)
    with _FOLLOWERS_LOCK:
        f = _FOLLOWERS.pop(key, None) or RunFollower(run)
        _FOLLOWERS[key] = f  # (the newest used last)
        while len(_FOLLOWERS) > MAX_FOLLOWERS:
            _FOLLOWERS.popitem(last=False)
    f.update()
    return f


MAX_LAYERS_SHOWN = 12  # lines on one chart before it stops being readable


def pick_layers(layers: Sequence[str] | dict[str, Any], limit: int = MAX_LAYERS_SHOWN) -> list[str]:
    """At most ``limit`` layer names spread evenly over the network (first and last kept).

    A 50-layer ResNet's spectra on one chart are a tangle; every k-th layer shows the trend.
    """
    names = list(layers)
    if len(names) <= limit:
        return names
    step = (len(names) - 1) / (limit - 1)
    return [names[round(i * step)] for i in range(limit)]
