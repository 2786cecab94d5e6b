"""Trade-off curves kept in a run folder, so that compressing a finished run opens at once.

A curve is a policy swept over its range (:meth:`lorita.Compressor.curve`, validation only:
it is for looking and choosing; test is for reporting one chosen model). It is stored with
:meth:`lorita.runs.Run.write_extra` under ``tradeoff-<which>-<policy>`` together with the
checkpoint file's modification time, and read back only while that checkpoint is unchanged
(a resumed or retrained run is swept again).

The training process calls :func:`prepare` when a run completes (``lorita train``), so the
curves of the default policies are ready before anyone opens the run; the app reads them
with :func:`stored` and sweeps any other policy on demand with :func:`compute`.

:func:`prepare` also measures every cut the default policy's slider can reach (each value on
its grid, each distinct set of ranks once: cost, validation and test) and keeps them under
``cuts-<which>``; :func:`kept_cuts` reads them back keyed by :func:`ranks_key`, so a slider
move on a finished run only cuts (milliseconds) and reads its numbers. A model whose single
cut takes longer than :data:`GRID_MAX_SECONDS` is not measured ahead.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .compress import Compressor
from .runs import Run
from .truncation import policy_class

__all__ = [
    "DEFAULT_POLICIES",
    "GRID_BUDGET_SECONDS",
    "GRID_MAX_SECONDS",
    "VERSION",
    "compute",
    "grid",
    "kept_cuts",
    "key",
    "measure_grid",
    "prepare",
    "ranks_key",
    "stored",
]

VERSION = 1  # bump when a stored curve's shape changes
DEFAULT_POLICIES = ("global",)  # the Compress page's default policy
GRID_MAX_SECONDS = 0.5  # one cut above this: the slider's grid is not measured ahead
GRID_BUDGET_SECONDS = 15.0  # the grid's measuring stops here (the cuts measured are kept)


def key(which: str, policy: str) -> str:
    """The ``Run.read_extra`` key of a curve: ``tradeoff-<which>-<policy>``."""
    return f"tradeoff-{which}-{policy}"


def stored(run: Run, which: str, policy: str) -> list[dict[str, Any]] | None:
    """The curve kept in ``run``'s folder, if it was swept on the current ``which`` checkpoint."""
    kept = run.read_extra(key(which, policy))
    if not isinstance(kept, dict) or kept.get("version") != VERSION:
        return None
    mtime = run.checkpoint_mtime(which)
    if not mtime or kept.get("checkpoint_mtime") != mtime:
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
    mtime = run.checkpoint_mtime(session.which) if run is not None else 0.0
    points = session.curve(policy, parts=("val",), progress=progress)
    points = [{k: v for k, v in p.items() if k != "ranks"} for p in points]
    if run is not None and mtime and mtime == run.checkpoint_mtime(session.which):
        try:
            run.write_extra(
                key(session.which, policy),
                {"version": VERSION, "checkpoint_mtime": mtime, "policy": policy, "points": points},
            )
        except OSError as e:  # a cache: a read-only or full run folder only loses the keeping
            warnings.warn(f"the {policy} curve is not kept for next time: {e}", stacklevel=2)
    return points


def grid(policy: str) -> list[float]:
    """Every value of ``policy``'s slider (``low`` to ``high`` in steps of ``step``), nearest
    to its default first: where a slider starts is measured first."""
    cls = policy_class(policy)
    lo, step = float(cls.low), float(cls.step)
    n = int(round((float(cls.high) - lo) / step))
    home = round((float(cls.default) - lo) / step)
    return [round(lo + k * step, 10) for k in sorted(range(n + 1), key=lambda k: abs(k - home))]


def ranks_key(ranks: Mapping[str, int]) -> str:
    """A cut's identity for :func:`kept_cuts`: ``"fc1=14,fc2=37"`` (layers sorted)."""
    return ",".join(f"{n}={int(r)}" for n, r in sorted(ranks.items()))


def _cuts_key(which: str) -> str:
    return f"cuts-{which}"


def kept_cuts(run: Run, which: str) -> dict[str, dict[str, Any]]:
    """The cuts measured ahead on the current ``which`` checkpoint: ``{ranks_key: row}``, each
    row ``params, flops, params_pct, flops_pct, val_acc, val_loss, test_acc, test_loss`` of
    the low-rank form ({} when none are kept or the checkpoint changed)."""
    kept = run.read_extra(_cuts_key(which))
    if not isinstance(kept, dict) or kept.get("version") != VERSION:
        return {}
    mtime = run.checkpoint_mtime(which)
    if not mtime or kept.get("checkpoint_mtime") != mtime:
        return {}
    rows = kept.get("cuts")
    return rows if isinstance(rows, dict) else {}


def measure_grid(
    session: Compressor,
    policy: str,
    run: Run | None = None,
    *,
    stop: Callable[[], bool] | None = None,
) -> dict[str, dict]:
    """Cut at every value of ``policy``'s slider, measure each distinct cut once (cost,
    validation and test, as :meth:`Compressor.apply` reports them) and keep them in ``run``'s
    folder beside those kept before, the slider's default first. Nothing is measured if that
    first cut (cutting, counting and evaluating) takes longer than :data:`GRID_MAX_SECONDS`;
    the cuts measured within :data:`GRID_BUDGET_SECONDS` are kept (the page evaluates the
    others when a slider reaches them); so are those measured before ``stop()`` turned true."""
    mtime = run.checkpoint_mtime(session.which) if run is not None else 0.0
    rows = dict(kept_cuts(run, session.which)) if run is not None else {}
    make = policy_class(policy)
    start = time.perf_counter()
    for i, value in enumerate(grid(policy)):
        t0 = time.perf_counter()
        cut_by = make(value)
        planned = session.ranks(cut_by)  # many values give the same cut: planned once
        if planned is not None and ranks_key(planned) in rows:
            continue
        small, _ = session.cut(cut_by)
        k = ranks_key(small.lorita_ranks)
        if k not in rows:
            res = session.measure(small)
            rows[k] = {
                "params": res.params, "flops": res.flops, "params_pct": res.params_pct,
                "flops_pct": res.flops_pct, **res.metrics,
            }  # fmt: skip
        now = time.perf_counter()
        if i == 0 and now - t0 > GRID_MAX_SECONDS:
            return {}
        if now - start > GRID_BUDGET_SECONDS or (stop is not None and stop()):
            break
    if run is not None and mtime and mtime == run.checkpoint_mtime(session.which):
        try:
            run.write_extra(
                _cuts_key(session.which),
                {"version": VERSION, "checkpoint_mtime": mtime, "cuts": rows},
            )
        except OSError as e:  # a cache, as the curves are (compute)
            warnings.warn(f"the measured cuts are not kept for next time: {e}", stacklevel=2)
    return rows


class _Stopped(Exception):
    """Raised out of a sweep when :func:`prepare`'s ``stop`` turns true."""


def prepare(
    run: Run,
    splits=None,
    *,
    which: Iterable[str] = ("best",),
    policies: Iterable[str] = DEFAULT_POLICIES,
    stop: Callable[[], bool] | None = None,
) -> dict[str, int]:
    """Sweep and keep the curves of ``policies`` on each ``which`` checkpoint of ``run`` that
    are not kept yet, and, for a composed run (``n_factors`` > 1: the one a class slides on;
    its N=1 baseline is drawn as a curve), measure their sliders' cuts (:func:`measure_grid`);
    returns ``{key: number of points or cuts}`` of what was done now.

    ``splits``: the run's data splits when the caller holds them (the training process does),
    else they are loaded from the run's config. Evaluation runs on the CPU with one thread, as
    the app's server computes, so the kept numbers are the ones the app would compute (and
    small evaluations do not stall on a busy machine's other cores).

    ``stop``: checked between the points of a sweep (and the cuts of a grid); once it is
    true nothing more is swept (``lorita train`` interrupted while it keeps the curves): a
    curve cut short is not kept, the cuts measured so far are.
    """
    policies = list(policies)
    done: dict[str, int] = {}
    stopped = stop if stop is not None else (lambda: False)

    def halt(*_) -> None:
        if stopped():
            raise _Stopped

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for w in which:
            todo = [p for p in policies if stored(run, w, p) is None]
            if not todo or not run.checkpoint_mtime(w):
                continue
            halt()
            session = Compressor(run, splits, which=w)
            for policy in todo:
                halt()
                done[key(w, policy)] = len(compute(session, policy, run, progress=halt))
                if int((run.config or {}).get("n_factors") or 1) > 1:
                    done[_cuts_key(w)] = len(measure_grid(session, policy, run, stop=stopped))
    except _Stopped:
        pass
    finally:
        torch.set_num_threads(threads)
    return done
