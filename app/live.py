"""Shape a run's logged spectra for the charts (no maths here: ranks come from the library)."""

from __future__ import annotations

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
    """Effective rank of every layer at every snapshot (lorita.runs.effective_ranks)."""
    from lorita.runs import effective_ranks

    steps: list[int] = []
    out: dict[str, list[int]] = {}
    for row in spectra_rows:
        layers = row.get("layers") or {}
        if not layers:
            continue
        steps.append(int(row.get("step", len(steps))))
        for name, r in effective_ranks(layers).items():
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


class RunFollower:
    """A run's metrics and spectra logs, read incrementally for the live panel.

    Each :meth:`update` reads only the lines appended since the last one (the run store's
    byte-offset reader), keeps at most ``MAX_METRIC_POINTS`` points per split and
    ``MAX_SNAPSHOTS`` spectra snapshots (thinned evenly, the newest always kept), and works
    out the effective ranks of each new snapshot once. A run with thousands of snapshots costs
    the same per second as a short one.
    """

    def __init__(self, run: Any) -> None:
        self.run = run
        self.offsets = {"metrics": 0, "spectra": 0}
        self.metrics: dict[str, list[dict[str, Any]]] = {}
        self.snapshots: list[dict[str, Any]] = []  # {"step", "layers", "ranks"}
        self.last_snapshot: dict[str, Any] | None = None

    def update(self) -> bool:
        """Read what is new; True if anything was."""
        new_m = self._read("metrics")
        for row in new_m:
            split = str(row.get("split"))
            self.metrics[split] = thin([*self.metrics.get(split, []), row], MAX_METRIC_POINTS)
        new_s = self._read("spectra")
        if new_s:
            from lorita.runs import effective_ranks

            for row in new_s:
                layers = row.get("layers") or {}
                if not layers:
                    continue
                snap = {"step": int(row.get("step", 0)), "layers": layers,
                        "ranks": effective_ranks(layers)}  # fmt: skip
                self.snapshots.append(snap)
                self.last_snapshot = snap
            self.snapshots = thin(self.snapshots, MAX_SNAPSHOTS)
        return bool(new_m or new_s)

    def _read(self, kind: str) -> list[dict[str, Any]]:
        rows, self.offsets[kind] = read_new(self.run, kind, self.offsets[kind])
        return rows

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
            steps.append(snap["step"])
            for name, r in snap["ranks"].items():
                out.setdefault(name, []).append(r)
        return steps, out


def read_new(run: Any, kind: str, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The complete rows of a run's ``kind`` log ("metrics" or "spectra") after ``offset``.

    Uses the run store's incremental reader when it has one; a half-written last line is left
    for the next call. Returns the rows and the offset to pass next time.
    """
    reader = getattr(run, "read_new", None)
    if reader is not None:
        return reader(kind, offset)
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


def thin_metrics(rows: Sequence[dict[str, Any]], limit: int = MAX_METRIC_POINTS) -> list[dict]:
    """A run's metrics rows with at most ``limit`` points per split (for overlays)."""
    by_split: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_split.setdefault(str(row.get("split")), []).append(row)
    return [r for split_rows in by_split.values() for r in thin(split_rows, limit)]
