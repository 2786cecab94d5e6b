"""Trade-off curves kept in a run folder, so that compressing a finished run opens at once.

A curve is a policy swept over its range (:meth:`lorita.Compressor.curve`, validation only:
it is for looking and choosing; test is for reporting one chosen model). It is stored with
:meth:`lorita.runs.Run.write_extra` under ``tradeoff-<which>-<policy>`` together with the
checkpoint file's modification time, and read back only while that checkpoint is unchanged
(a resumed or retrained run is swept again).

The training process calls :func:`prepare` when a run completes (``lorita train``), so the
curves of the default policies are ready before anyone opens the run; the app reads them
with :func:`stored` and sweeps any other policy on demand with :func:`compute`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .compress import Compressor
from .runs import Run

__all__ = ["DEFAULT_POLICIES", "VERSION", "compute", "key", "prepare", "stored"]

VERSION = 1  # bump when a stored curve's shape changes
DEFAULT_POLICIES = ("global",)  # the Compress page's default policy


def key(which: str, policy: str) -> str:
    """The ``Run.read_extra`` key of a curve: ``tradeoff-<which>-<policy>``."""
    return f"tradeoff-{which}-{policy}"


def _mtime(run: Run, which: str) -> float:
    try:
        return run.checkpoint(which).stat().st_mtime
    except (OSError, ValueError):
        return 0.0


def stored(run: Run, which: str, policy: str) -> list[dict[str, Any]] | None:
    """The curve kept in ``run``'s folder, if it was swept on the current ``which`` checkpoint."""
    kept = run.read_extra(key(which, policy))
    if not isinstance(kept, dict) or kept.get("version") != VERSION:
        return None
    if kept.get("checkpoint_mtime") != _mtime(run, which) or not _mtime(run, which):
        return None
    points = kept.get("points")
    return points if isinstance(points, list) else None


def compute(
    session: Compressor,
    policy: str,
    run: Run | None = None,
    *,
    progress: Callable[[int, int, dict], object] | None = None,
) -> list[dict[str, Any]]:
    """Sweep ``policy`` on ``session`` (validation only) and keep it in ``run``'s folder.

    Points are :meth:`Compressor.curve`'s without the per-layer ranks: ``policy, value,
    params, flops, params_pct, flops_pct, val_acc, val_loss``.
    """
    mtime = _mtime(run, session.which) if run is not None else 0.0
    points = session.curve(policy, parts=("val",), progress=progress)
    points = [{k: v for k, v in p.items() if k != "ranks"} for p in points]
    if run is not None and mtime and mtime == _mtime(run, session.which):
        run.write_extra(
            key(session.which, policy),
            {"version": VERSION, "checkpoint_mtime": mtime, "policy": policy, "points": points},
        )
    return points


def prepare(
    run: Run,
    splits=None,
    *,
    which: Iterable[str] = ("best",),
    policies: Iterable[str] = DEFAULT_POLICIES,
) -> dict[str, int]:
    """Sweep and keep the curves of ``policies`` on each ``which`` checkpoint of ``run`` that
    are not kept yet; returns ``{key: number of points}`` of those swept now.

    ``splits``: the run's data splits when the caller holds them (the training process does),
    else they are loaded from the run's config. Evaluation runs on the CPU, as the app does, so
    the kept numbers are the ones the app would compute.
    """
    policies = list(policies)
    done: dict[str, int] = {}
    for w in which:
        todo = [p for p in policies if stored(run, w, p) is None]
        if not todo or not _mtime(run, w):
            continue
        session = Compressor(run, splits, which=w)
        for policy in todo:
            done[key(w, policy)] = len(compute(session, policy, run))
    return done
