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
