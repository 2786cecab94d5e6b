"""LoRITa against the baselines an engineer would use instead, at the same budget.

For a LoRITa run (N > 1), its plain N=1 twin, and a budget (a share of the parameters or FLOPs):

- ``lorita``: the LoRITa run cut to the budget (:class:`~lorita.truncation.Budget`);
- ``svd``: the N=1 run cut the same way (truncated SVD of a plainly trained network);
- ``prune``: the N=1 run pruned to the budget by Torch-Pruning's magnitude (L1) structured
  pruning (whole channels/neurons removed, the output layer left as is);

each optionally fine-tuned K epochs with one recipe. Every choice (the fine-tuned epoch kept) is
made on validation; the test split only reports. :func:`compare` returns JSON-able rows.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from . import kinds
from .checks import is_int, is_real
from .clone import clone_model
from .compress import Compressor, CompressResult, output_layer
from .convert import iter_layers
from .cost import count_cost
from .runs import setup_of
from .spectra import layer_matrix
from .truncation import Budget

__all__ = ["METHODS", "PruneError", "prune_to_budget", "run_method", "compare"]

#: The methods compared, in table order: name -> label.
METHODS = {
    "lorita": "LoRITa cut",
    "svd": "SVD cut of the N=1 run",
    "prune": "L1 structured pruning of the N=1 run",
}
_SAME_SPLITS = ("dataset", "dataset_kwargs", "val_fraction", "split_seed", "normalize")
_RATIOS = (0.5, 0.75, 0.9, 0.95, 0.98)  # first tries when bracketing the pruning ratio


def _measure_of(measure: str) -> str:
    if measure not in ("params", "flops"):
        raise ValueError(f"measure: expected 'params' or 'flops', got {measure!r}")
    return measure


def _check_percent(percent) -> float:
    if not is_real(percent) or not 0 < percent <= 100:
        raise ValueError(f"budget: expected a percentage with 0 < budget <= 100, got {percent!r}")
    return float(percent)


#: the start of Torch-Pruning's warning on every call for a model with parameters of its own
_UNWRAPPED = "Unwrapped parameters detected"


class PruneError(ValueError):
    """Torch-Pruning could not prune the network (or the pruned network no longer runs)."""


class _Pruner:
    """One model pruned at a given uniform channel ratio, and what that costs."""

    def __init__(self, model: nn.Module, example_input: Tensor, measure: str, ignored) -> None:
        self.model, self.x, self.measure = model, example_input, measure
        self.ignored = list(ignored)

    def __call__(self, ratio: float) -> tuple[nn.Module, int]:
        try:
            import torch_pruning as tp
        except ImportError:  # an optional package (pyproject's extra "prune")
            raise PruneError(
                "prune: L1 structured pruning needs the optional package torch-pruning "
                "(pip install torch-pruning; it is in requirements.txt)"
            ) from None

        work = clone_model(self.model).eval()
        if ratio <= 0:
            return work, getattr(count_cost(work, self.x), self.measure)
        try:
            with warnings.catch_warnings():
                # its note on parameters outside layers (a ViT's position embedding): pruned
                # along their last dimension, which is the default we take
                warnings.filterwarnings("ignore", message=_UNWRAPPED, category=UserWarning)
                tp.pruner.MetaPruner(
                    work,
                    self.x,
                    importance=tp.importance.MagnitudeImportance(p=1),
                    pruning_ratio=ratio,
                    ignored_layers=[work.get_submodule(n) for n in self.ignored],
                ).step()
            return work, getattr(count_cost(work, self.x), self.measure)
        except Exception as e:  # its dependency graph does not follow every network
            raise PruneError(
                f"prune: Torch-Pruning cannot prune this network ({type(e).__name__}: "
                f"{str(e)[:200]})"
            ) from e


def prune_to_budget(
    model: nn.Module,
    example_input: Tensor,
    percent: float,
    *,
    measure: str = "params",
    ignored_layers: Iterable[str] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Torch-Pruning magnitude (L1) structured pruning of ``model`` to at most ``percent`` % of
    its parameters (or FLOPs): the smallest uniform channel ratio that fits, found by bisection
    to one channel of the widest layer. ``ignored_layers`` (default: the output layer) keep all
    their output channels. Returns (pruned copy, facts: ratio, counted cost, target, whether
    the budget is met, and the cost one step less pruned, which exceeds the target)."""
    measure, percent = _measure_of(measure), _check_percent(percent)
    ignored = (
        [output_layer(model, example_input)] if ignored_layers is None else list(ignored_layers)
    )
    prune = _Pruner(model, example_input, measure, [n for n in ignored if n])
    full = getattr(count_cost(model, example_input), measure)
    target = percent / 100.0 * full
    lo, lo_cost = 0.0, full  # the largest ratio known to miss the budget
    best = (0.0, clone_model(model).eval(), full)  # the pruned model nearest the budget
    hi = None
    if full <= target:
        hi = best
    for r in () if hi else _RATIOS:
        m, c = prune(r)
        if c <= target:
            hi = (r, m, c)
            break
        if c < lo_cost:  # pruning really happened (Torch-Pruning refuses ratios that empty a layer)
            lo, lo_cost, best = r, c, (r, m, c)
    if hi is not None:
        # a ratio step this small moves no layer by more than one channel
        step = 1.0 / max(layer_matrix(m).shape[0] for _, m in iter_layers(model))
        while hi[0] - lo > step:
            mid = (lo + hi[0]) / 2
            m, c = prune(mid)
            if c <= target:
                hi = (mid, m, c)
            else:
                lo, lo_cost = mid, c
        best = hi
    ratio, pruned, cost = best
    return pruned, {
        "ratio": float(ratio),
        measure: int(cost),
        "target": float(target),
        "met": bool(cost <= target),
        "above": int(lo_cost),
        "ignored_layers": ignored,
    }


def _pruned_ranks(session: Compressor, model: nn.Module) -> dict[str, int]:
    """What is left of each layer after pruning: the full rank of its smaller matrices."""
    return {
        n: min(kinds.matrices(m).shape[-2:])
        for n, m in iter_layers(model)
        if n in session.full_ranks
    }


def run_method(
    method: str, session: Compressor, percent: float, *, measure: str = "params"
) -> CompressResult:
    """One method's cut (no fine-tuning) of ``session``'s model at ``percent`` % of its
    parameters (or FLOPs), measured on val and test. ``lorita`` and ``svd`` are the same cut
    (:class:`Budget`); they differ by the run they are applied to."""
    measure, percent = _measure_of(measure), _check_percent(percent)
    t0 = time.perf_counter()
    if method in ("lorita", "svd"):
        res = session.apply(Budget(percent, measure=measure))
    elif method == "prune":
        model, facts = prune_to_budget(
            session.model,
            session.example_input,
            percent,
            measure=measure,
            ignored_layers=list(session.left_out),
        )
        spec = {"policy": "l1-prune", "value": percent, "ratio": facts["ratio"]}
        res = session.measure(model, policy=spec, ranks=_pruned_ranks(session, model))
        target = facts["target"]
        res.extra["budget"] = {"measure": measure, "percent": percent, "target": target}
        res.extra["budget"]["met"] = facts["met"]
    else:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    res.seconds = time.perf_counter() - t0
    return res


def _session(source, which: str, device) -> Compressor:
    return (
        source if isinstance(source, Compressor) else Compressor(source, which=which, device=device)
    )


def _check_pair(a: Compressor, b: Compressor) -> None:
    ca, cb = a.config, b.config
    if ca and cb:  # options compared with their defaults filled in (size=32 is no size)
        ca, cb = {**ca, **setup_of(ca)}, {**cb, **setup_of(cb)}
        diff = [k for k in _SAME_SPLITS if ca.get(k) != cb.get(k)]
        if diff:
            raise ValueError(
                f"baseline_run: trained on other data than the run ({', '.join(diff)} differ); "
                "a comparison needs the same splits"
            )
        other = [k for k in ("model", "model_kwargs") if (ca.get(k) or None) != (cb.get(k) or None)]
        if other:
            said = ", ".join(f"{k} {cb.get(k)!r} against {ca.get(k)!r}" for k in other)
            raise ValueError(
                f"baseline_run: another network than the run's ({said}); the baseline is the "
                "same network trained with N=1"
            )
    if a.example_input.shape != b.example_input.shape:
        raise ValueError("baseline_run: its inputs are shaped differently from the run's")
    if int(cb.get("n_factors", 1)) != 1:
        raise ValueError(f"baseline_run: expected an N=1 run, got n_factors={cb['n_factors']}")


def _head(method: str, budget: float, measure: str, session) -> dict:
    """The fields that name a row: which budget, method and run."""
    return {
        "budget": float(budget),
        "measure": measure,
        "method": method,
        "label": METHODS[method],
        "run": session.run,
    }


def _row(method: str, budget: float, measure: str, res: CompressResult, session) -> dict:
    return {
        **_head(method, budget, measure, session),
        "policy": dict(res.policy),
        "finetune_epochs": res.finetune_epochs,
        "params": int(res.params),
        "flops": int(res.flops),
        "params_pct": float(res.params_pct),
        "flops_pct": float(res.flops_pct),
        "met": bool(res.extra.get("budget", {}).get("met", True)),
        "task": session.task,  # its "val_acc" / "test_acc" are R² for a regression
        **{k: float(v) for k, v in res.metrics.items()},
        "ranks": res.ranks,
        "selected_on": "val",
        "reported_on": "test",
        "seconds": float(res.seconds),
        "error": None,
    }


def _failed_row(method: str, budget: float, measure: str, epochs: int, session, error) -> dict:
    """A method that could not cut at this budget: the row says why, its numbers are None."""
    scores = [k for k in session.base if k not in ("params", "flops")]
    return {
        **_head(method, budget, measure, session),
        "policy": {},
        "finetune_epochs": int(epochs),
        **dict.fromkeys(("params", "flops", "params_pct", "flops_pct")),
        "met": False,
        "task": session.task,
        **dict.fromkeys(scores),
        "ranks": {},
        "selected_on": "val",
        "reported_on": "test",
        "seconds": 0.0,
        "error": str(error),
    }


def compare(
    run,
    baseline_run,
    budgets: Sequence[float] = (5, 10, 20, 35, 50),
    finetune_epochs: int = 0,
    *,
    measure: str = "params",
    methods: Sequence[str] = tuple(METHODS),
    which: str = "best",
    device: str = "cpu",
    progress: Callable[[int, int, dict], object] | None = None,
    finetune_lr: float | None = None,
    **recipe,
) -> list[dict[str, Any]]:
    """LoRITa's cut of ``run`` against the SVD cut and the L1 structured pruning of its N=1
    ``baseline_run``, at each budget (percent of params or FLOPs).

    ``run`` and ``baseline_run`` are Runs, run folders or :class:`Compressor` sessions. With
    ``finetune_epochs`` K > 0 every cut is also fine-tuned K epochs with the same recipe (the
    run's, see :meth:`Compressor.recipe`; ``finetune_lr`` and ``recipe`` keywords lr, optimizer,
    batch_size, weight_decay, seed override it). One row per
    (budget, method, fine-tuned or not), JSON-able; ``progress(done, total, row)`` after each.
    A row's ``error`` is None, or why the method could not cut (a network Torch-Pruning cannot
    prune): then its numbers are None.
    """
    measure = _measure_of(measure)
    if isinstance(budgets, (str, bytes)) or not isinstance(budgets, Iterable):
        raise ValueError(f"budgets: expected a list of percentages, e.g. [10, 50], got {budgets!r}")
    budgets = [_check_percent(b) for b in budgets]
    if not budgets:
        raise ValueError("budgets: expected at least one percentage, got none")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods: expected some of {', '.join(METHODS)}, got {list(methods)}")
    if not is_int(finetune_epochs):
        raise ValueError(f"finetune_epochs: expected an integer >= 0, got {finetune_epochs!r}")
    if finetune_epochs < 0:
        raise ValueError(f"finetune_epochs: expected an integer >= 0, got {finetune_epochs!r}")
    ours = _session(run, which, device)
    theirs = _session(baseline_run, which, device)
    _check_pair(ours, theirs)
    recipe = ours.recipe(**{"lr": finetune_lr, **recipe})  # one recipe for every method
    sessions = {"lorita": ours, "svd": theirs, "prune": theirs}
    total = len(budgets) * len(methods) * (2 if finetune_epochs else 1)
    rows: list[dict] = []
    for b in budgets:
        for method in methods:
            for row in _method_rows(method, sessions[method], b, measure, finetune_epochs, recipe):
                rows.append(row)
                if progress is not None:
                    progress(len(rows), total, row)
    return rows


def _method_rows(method, session, budget, measure, finetune_epochs, recipe):
    """The row of one method's cut at one budget, then (K > 0) the row of it fine-tuned; a
    network that Torch-Pruning cannot prune gets rows that say so, and the others go on."""
    try:
        res = run_method(method, session, budget, measure=measure)
    except PruneError as e:
        for epochs in (0, finetune_epochs) if finetune_epochs else (0,):
            yield _failed_row(method, budget, measure, epochs, session, e)
        return
    yield _row(method, budget, measure, res, session)
    if finetune_epochs:
        tuned = session.finetune(res, finetune_epochs, **recipe)
        yield _row(method, budget, measure, tuned, session)
