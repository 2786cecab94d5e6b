"""Glue for the Compress and Export pages over the library's compress session.

The session itself (merged model, SVD cache, held splits, base cost and accuracy, apply,
curve, smallest-within, fine-tune) is :class:`lorita.Compressor`; the pages cache one per
(run, checkpoint) with ``st.cache_resource`` (app/cache.py). This module only shapes what
the pages show: the policies' sliders (from the policies' own descriptions), one value on
the slider's grid everywhere, trade-off curves computed once per run and kept in the run
folder (``Run.write_extra``), and the comparison with the baselines.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app import jobs, options
from lorita import curves
from lorita.scores import Score, score_of

CURVE_POINTS = 25
SEARCH_POINTS = 40  # values tried by "smallest within X points" (on the slider's grid)
CURVE_VERSION = 1  # bump when a stored comparison's shape changes


def scalar_policies() -> dict[str, dict[str, Any]]:
    """name -> the library's description of each policy that a slider can set."""
    return {d["name"]: d for d in options.policies() if d.get("kind") == "scalar"}


def policy_labels() -> dict[str, str]:
    """name -> label of every policy (sliders first, then the rank table)."""
    return {d["name"]: d["label"] for d in options.policies()}


def snap(name: str, value: float) -> float:
    """``value`` on the slider's grid of policy ``name``, inside its range.

    The slider, the chart's marker, the Export page and the saved file all show this one
    number (a search that finds 0.946172 is shown, cut and exported as 0.95).
    """
    d = scalar_policies()[name]
    lo, hi, step = float(d["min"]), float(d["max"]), float(d["step"])
    k = round((float(value) - lo) / step)
    digits = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return round(min(hi, max(lo, lo + k * step)), digits + 1)


def url_value(policy: str, text: str | None) -> float | None:
    """A slider value of ``policy`` read from the page address: a number in the slider's
    range, on its grid; None for anything else (the address is user input)."""
    d = scalar_policies().get(policy)
    if d is None or text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return snap(policy, value) if float(d["min"]) <= value <= float(d["max"]) else None


def make_policy(name: str, value: float | None = None, ranks: dict[str, int] | None = None):
    """The library policy object for the page's choice."""
    from lorita import truncation

    if name == "ranks":
        return truncation.Ranks({k: int(v) for k, v in (ranks or {}).items()})
    return truncation.make_policy(name, float(value))


def checkpoint_mtime(name: str, which: str = "best", root: str | Path | None = None) -> float:
    """:meth:`lorita.runs.Run.checkpoint_mtime` of run ``name`` (0.0 for a bad name)."""
    try:
        return jobs.store(root).get(name).checkpoint_mtime(which)
    except ValueError:
        return 0.0


def checkpoints(name: str, root: str | Path | None = None) -> list[str]:
    """The checkpoints of run ``name`` there are to read (of best and last)."""
    return [w for w in ("best", "last") if checkpoint_mtime(name, w, root)]


def finished_runs(root: str | Path | None = None) -> list[dict[str, Any]]:
    """Rows of runs that have a checkpoint to compress (newest first)."""
    return [
        r
        for r in jobs.list_runs(root)
        if checkpoint_mtime(r["name"], "best", root) or checkpoint_mtime(r["name"], "last", root)
    ]


def unavailable_note(wanted: str | None, rows: list[dict[str, Any]], root=None) -> str | None:
    """Why the run a page was asked for (the URL's, or the one it showed) is not among the
    runs with a checkpoint, ``rows``: deleted, or no checkpoint yet; None when it is there."""
    if not wanted or wanted in {r["name"] for r in rows}:
        return None
    try:
        exists = run_exists(wanted, root)
    except ValueError:  # not a run name at all (a hand-edited URL)
        return f"There is no run {wanted[:80]!r}; showing another run."
    if not exists:
        return f"Run {wanted} is not in the runs folder (deleted?); showing another run."
    st = jobs.view(wanted, root).state
    if st in jobs.LIVE:
        return f"Run {wanted} has no checkpoint yet ({st}); showing another run."
    return (
        f"Run {wanted} ({st}) has no checkpoint to read (missing or empty files in its "
        "checkpoints folder); showing another run."
    )


def default_run(rows: list[dict[str, Any]], wanted: str | None = None) -> str | None:
    """``wanted`` if it is among ``rows``, else the newest composed (N>1) run, else the newest."""
    names = [r["name"] for r in rows]
    if wanted in names:
        return wanted
    for row in rows:
        if (row.get("n_factors") or 1) > 1:
            return row["name"]
    return names[0] if names else None


def session(name: str, which: str = "best", root: str | Path | None = None):
    """A :class:`lorita.Compressor` on run ``name``'s checkpoint."""
    import lorita as lt

    run = jobs.store(root).get(name)
    if not checkpoint_mtime(name, which, root):
        raise ValueError(f"checkpoint: run {name!r} has no {which!r} checkpoint yet")
    return lt.Compressor(run, which=which)


def result_view(res: Any) -> dict[str, Any]:
    """What the page shows of a :class:`lorita.CompressResult` (plus the model, for export)."""
    out = res.to_dict()
    out.pop("plan", None)
    out["ranks"] = dict(res.ranks)
    out["model"] = res.model
    return out


def every_rank(cz: Any, small: Any) -> dict[str, int]:
    """The rank of every layer of the session's model in the cut ``small`` (uncut: full)."""
    return {n: int(small.lorita_ranks.get(n, f)) for n, f in cz.full_ranks.items()}


def apply(cz: Any, policy: Any, root: str | Path | None = None) -> dict[str, Any]:
    """The work behind one slider move as the page's dict: the session's apply, or, for a cut
    measured ahead when the run completed (:func:`lorita.curves.kept_cuts`), the cut alone
    with its kept numbers (``res["kept"]`` True). Budget policies are always applied (their
    result carries whether the budget was met)."""
    t0 = time.perf_counter()
    try:
        kept = curves.kept_cuts(jobs.store(root).get(cz.run), cz.which) if cz.run else {}
    except ValueError:  # the session's run is not in this store
        kept = {}
    if kept and policy.name not in MEASURES:
        small, _ = cz.cut(policy)
        row = kept.get(curves.ranks_key(small.lorita_ranks))
        if row is not None:
            return {
                "policy": {**policy.spec(), "form": "low_rank"},
                **row,
                "seconds": time.perf_counter() - t0,
                "finetune_epochs": 0,
                "ranks": every_rank(cz, small),
                "model": small,
                "kept": True,
            }
    return result_view(cz.apply(policy))


def smallest_within(cz: Any, name: str, max_drop: float) -> float | None:
    """The slider value of the smallest model within ``max_drop`` points of validation
    accuracy, searched on the slider's grid (so it is shown and exported as found): a sweep
    of :data:`SEARCH_POINTS` values, then every slider step between the best of them and the
    infeasible one beside it on the smaller-model side."""
    d = scalar_policies()[name]
    lo, hi = float(d["min"]), float(d["max"])
    grid = sorted(
        {snap(name, lo + (hi - lo) * i / (SEARCH_POINTS - 1)) for i in range(SEARCH_POINTS)}
    )
    res = cz.smallest_within(float(max_drop), name, values=grid, refine=1, step=float(d["step"]))
    value = (res.extra.get("search") or {}).get("value")
    return None if value is None else snap(name, value)


def curve_key(which: str, policy: str) -> str:
    return curves.key(which, policy)


def stored_curve(name: str, which: str, policy: str, root: str | Path | None = None):
    """The trade-off curve kept in the run folder, if it was computed for this checkpoint
    (by the training process when the run completed, or by an earlier visit)."""
    return curves.stored(jobs.store(root).get(name), which, policy)


def curve_being_kept(name: str, root: str | Path | None = None) -> bool:
    """Whether run ``name`` is completed and its training process still alive: it keeps the
    default policy's curve (and the slider's cuts) after marking the run completed, so a page
    that opens the run in those seconds waits for them instead of sweeping a second time. A
    run still training is not waited for: its checkpoint is cut as it is now."""
    run = jobs.store(root).get(name)
    return run.status().get("state") == "completed" and run.held_elsewhere()


def score_of_run(name: str, root: str | Path | None = None) -> Score:
    """How run ``name``'s score is named and written (:attr:`lorita.runs.Run.task`): accuracy,
    or R² for a regression; accuracy for a run that is not there."""
    try:
        return score_of(jobs.store(root).get(name).task)
    except ValueError:
        return score_of(None)


def run_exists(name: str, root: str | Path | None = None) -> bool:
    """Whether run ``name`` is still in the runs folder (another tab may have deleted it)."""
    return jobs.store(root).exists(name)


def wait_for_curve(
    name: str,
    which: str,
    policy: str,
    root: str | Path | None = None,
    *,
    timeout: float = 120.0,
    poll: float = 0.25,
    tick: Callable[[float], object] | None = None,
) -> list[dict[str, Any]] | None:
    """The curve the training process of ``name`` is keeping, once it is kept; None when
    that process ends (or ``timeout`` seconds pass) without keeping it. ``tick(elapsed)``
    is called on every poll."""
    t0 = time.monotonic()
    while True:
        points = stored_curve(name, which, policy, root)
        if points is not None:
            return points
        elapsed = time.monotonic() - t0
        if elapsed > timeout or not curve_being_kept(name, root):
            return stored_curve(name, which, policy, root)
        if tick is not None:
            tick(elapsed)
        time.sleep(poll)


def compute_curve(
    cz: Any,
    policy: str,
    *,
    root: str | Path | None = None,
    progress: Callable[[int, int, dict], object] | None = None,
) -> list[dict[str, Any]]:
    """Sweep ``policy`` over its range once (validation only: the chart plots it, and test is
    for reporting a chosen model) and keep the curve in the run folder."""
    run = jobs.store(root).get(cz.run) if cz.run else None
    return curves.compute(cz, policy, run, progress=progress)


def find_baseline(name: str, root: str | Path | None = None) -> str | None:
    """The N=1 run started beside composed run ``name`` (the run store's pairing), if it has
    a checkpoint."""
    base = jobs.baseline_of(name, root)
    return base if base and checkpoint_mtime(base, "best", root) else None


def choice_token(choice: dict[str, Any]) -> tuple:
    """A hashable identity of a Compress page setting (run, checkpoint, policy, value, ranks)."""
    ranks = tuple(sorted((choice.get("ranks") or {}).items()))
    return (choice["run"], choice["which"], choice["policy"], choice.get("value"), ranks)


def choice_text(choice: dict[str, Any] | None) -> str:
    """How a Compress page setting is named on the Export page (the slider's own number)."""
    if not choice:
        return "as trained (factors merged, nothing cut)"
    if choice["policy"] == "ranks":
        ranks = choice["ranks"]
        if len(ranks) > 6:
            return f"per-layer ranks ({len(ranks)} layers)"
        return "per-layer ranks " + ", ".join(f"{k}={v}" for k, v in ranks.items())
    d = scalar_policies().get(choice["policy"], {})
    fmt = d.get("format", "%g")
    return f"{policy_labels().get(choice['policy'], choice['policy'])} at {fmt % choice['value']}"


def still_training(name: str, which: str, root: str) -> str | None:
    """'Run R is still running (step s of t): this page uses its best checkpoint as it is
    now', or None for a run that no longer trains (the Compress and Export pages say it)."""
    view = jobs.view(name, root)
    if not view.active:
        return None
    return (
        f"Run {name} is still {view.state} (step {view.step} of {view.total_steps}): this page "
        f"uses its {which} checkpoint as it is now"
    )


def finetune(
    cz: Any,
    model: Any,
    *,
    epochs: int,
    lr: float,
    progress: Callable[[str, float], Any] | None = None,
) -> tuple[Any, dict[str, float]]:
    """Fine-tune a cut model with the session's recipe; returns (model, val/test metrics).
    ``progress(text, fraction)`` after each epoch: 'epoch k of n · validation v · about t left'
    (v in the session's score: an accuracy, or R² for a regression)."""
    from app.ui import fmt_duration, score_text

    t0 = time.monotonic()
    score = score_of(cz.task)

    def said(ev: dict) -> None:
        k = int(ev["epoch"])
        left = (time.monotonic() - t0) / k * (int(epochs) - k)
        tail = f" · about {fmt_duration(left)} left" if k < int(epochs) else ""
        val = score_text(score, ev["val_acc"], 1)
        text = f"Fine-tuning: epoch {k} of {int(epochs)} · validation {val}"
        progress(text + tail, k / int(epochs))

    res = cz.finetune(model, int(epochs), lr=float(lr), callback=said if progress else None)
    return res.model, {"val_acc": res.val_acc, "test_acc": res.test_acc}


def evaluate(cz: Any, model: Any) -> dict[str, float]:
    """Validation and test accuracy of any model built from the session's (for reporting)."""
    return cz.data.metrics(model)


# --- LoRITa against the baselines (lorita.baselines) ----------------------------------------

COMPARE_BUDGETS = (5.0, 10.0, 20.0, 35.0, 50.0)
MEASURES = {"budget": "params", "flops-budget": "flops"}  # budget policy -> what it counts


def compare_key(which: str, measure: str) -> str:
    return f"compare-{which}-{measure}"


def stored_comparison(
    name: str, base: str, which: str, measure: str, root: str | Path | None = None
) -> list[dict[str, Any]] | None:
    """The three methods' rows kept in run ``name``'s folder, if both checkpoints are the same."""
    kept = jobs.store(root).get(name).read_extra(compare_key(which, measure))
    if not isinstance(kept, dict) or kept.get("version") != CURVE_VERSION:
        return None
    stamps = [checkpoint_mtime(name, which, root), checkpoint_mtime(base, which, root)]
    if kept.get("baseline") != base or kept.get("checkpoint_mtimes") != stamps:
        return None
    rows = kept.get("rows")
    return rows if isinstance(rows, list) else None


def compute_comparison(
    ours: Any,
    theirs: Any,
    measure: str,
    *,
    root: str | Path | None = None,
    progress: Callable[[int, int, dict], object] | None = None,
) -> list[dict[str, Any]]:
    """LoRITa's cut, the SVD cut and L1 pruning of the N=1 run at COMPARE_BUDGETS
    (lorita.baselines.compare; selection on validation, test reported), kept in the run."""
    from lorita import baselines

    rows = baselines.compare(ours, theirs, COMPARE_BUDGETS, 0, measure=measure, progress=progress)
    rows = [{k: v for k, v in r.items() if k != "ranks"} for r in rows]
    if ours.run and theirs.run:
        stamps = [
            checkpoint_mtime(ours.run, ours.which, root),
            checkpoint_mtime(theirs.run, theirs.which, root),
        ]
        try:
            jobs.store(root).get(ours.run).write_extra(
                compare_key(ours.which, measure),
                {"version": CURVE_VERSION, "baseline": theirs.run, "checkpoint_mtimes": stamps,
                 "rows": rows},
            )  # fmt: skip
        except OSError as e:  # a cache: a full or read-only run folder only loses the keeping
            warnings.warn(f"the comparison is not kept for next time: {e}", stacklevel=2)
    return rows


def comparison_curves(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """label -> points (one per budget) for the trade-off chart."""
    from lorita.baselines import METHODS

    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("error"):  # a method that could not cut (at_budget's table says why)
            continue
        out.setdefault(METHODS.get(r["method"], r["method"]), []).append(
            {**r, "value": r["budget"]}
        )
    return out


def at_budget(ours: Any, theirs: Any, percent: float, measure: str) -> list[dict[str, Any]]:
    """The three methods at one budget: method, share of params/FLOPs kept, val and test
    scores (accuracy in percent: "val acc %"; R² as it is: "val R²"), and a note: why a
    method could not cut (its numbers None), or that the budget is below its smallest model."""
    from lorita import baselines

    score = score_of(ours.task)
    unit = " %" if score.percent else ""
    places = 2 if score.percent else 4  # 93.12 (percent) or 0.6417 (R²), as Score.text has them

    out = []
    for method, label in baselines.METHODS.items():
        session = ours if method == "lorita" else theirs
        try:
            res = baselines.run_method(method, session, float(percent), measure=measure)
        except baselines.PruneError as e:
            out.append(
                {"method": label, "params %": None, "FLOPs %": None,
                 f"val {score.short}{unit}": None, f"test {score.short}{unit}": None,
                 "note": f"failed: {str(e).partition(': ')[2]}"}
            )  # fmt: skip
            continue
        met = res.extra.get("budget", {}).get("met", True)
        out.append(
            {
                "method": label,
                "params %": round(res.params_pct, 1),
                "FLOPs %": round(res.flops_pct, 1),
                f"val {score.short}{unit}": score.number(res.val_acc, places),
                f"test {score.short}{unit}": score.number(res.test_acc, places),
                "note": "" if met else "budget not met: this is the smallest model it makes",
            }
        )
    return out
