"""Rank policies (how many singular values each layer keeps), truncation into a model that is
really smaller, and the accuracy / cost trade-off over a policy's range.

A policy is a small object with ``plan(spectra) -> {layer: rank}``; everything else takes one.
The SVD of every layer is computed once (:class:`SVDCache`) and reused for every cut, which is
what makes a truncation slider fast.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .convert import iter_layers, merge_model, set_module
from .cost import Cost, count_cost
from .layers import LowRankConv2d, LowRankLinear
from .spectra import layer_matrix

__all__ = [
    "Uniform",
    "Global",
    "Energy",
    "Ranks",
    "make_policy",
    "POLICIES",
    "SVDCache",
    "layer_svd",
    "plan_ranks",
    "truncate",
    "tradeoff_curve",
    "smallest_within",
    "iterative_search",
    "default_values",
]


def _number(field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{field}: expected a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Uniform:
    """Keep the top ``floor(ratio * full_rank)`` singular values (at least 1) in every layer."""

    ratio: float

    def __post_init__(self):
        if not 0 < _number("ratio", self.ratio) <= 1:
            raise ValueError(f"ratio: expected 0 < ratio <= 1, got {self.ratio!r}")

    def plan(self, spectra: dict[str, Tensor]) -> dict[str, int]:
        return {n: max(1, math.floor(self.ratio * len(s) + 1e-9)) for n, s in spectra.items()}


@dataclass(frozen=True)
class Global:
    """Normalise each layer's spectrum by its largest value, pool all layers, and drop the
    globally smallest ``fraction`` of singular values (every layer keeps at least one)."""

    fraction: float

    def __post_init__(self):
        if not 0 <= _number("fraction", self.fraction) < 1:
            raise ValueError(f"fraction: expected 0 <= fraction < 1, got {self.fraction!r}")

    def plan(self, spectra: dict[str, Tensor]) -> dict[str, int]:
        names = list(spectra)
        pooled = []  # (normalised value, layer index)
        for i, n in enumerate(names):
            s = spectra[n].double()
            top = float(s[0]) if len(s) else 0.0
            norm = s / top if top > 0 else torch.zeros_like(s)
            pooled += [(float(v), i) for v in norm[1:]]  # the top value is never dropped
        total = sum(len(spectra[n]) for n in names)
        n_drop = min(math.floor(self.fraction * total + 1e-9), len(pooled))
        pooled.sort(key=lambda t: t[0])
        ranks = [len(spectra[n]) for n in names]
        for _, i in pooled[:n_drop]:
            ranks[i] -= 1
        return dict(zip(names, ranks))


@dataclass(frozen=True)
class Energy:
    """Per layer, the smallest rank that keeps ``keep`` of the energy ``sum sigma^2``."""

    keep: float

    def __post_init__(self):
        if not 0 < _number("keep", self.keep) <= 1:
            raise ValueError(f"keep: expected 0 < keep <= 1 (energy share), got {self.keep!r}")

    def plan(self, spectra: dict[str, Tensor]) -> dict[str, int]:
        out = {}
        for n, s in spectra.items():
            e = s.double().pow(2)
            total = float(e.sum())
            if total <= 0:
                out[n] = 1
                continue
            share = torch.cumsum(e, 0) / total
            out[n] = min(len(s), int((share < self.keep - 1e-12).sum()) + 1)
        return out


@dataclass(frozen=True)
class Ranks:
    """Explicit ranks ``{layer_name: rank}``; layers not named keep full rank."""

    ranks: dict

    def __post_init__(self):
        if not isinstance(self.ranks, dict):
            raise ValueError(
                f"ranks: expected a dict {{layer_name: rank}}, got {type(self.ranks).__name__}"
            )

    def plan(self, spectra: dict[str, Tensor]) -> dict[str, int]:
        unknown = [n for n in self.ranks if n not in spectra]
        if unknown:
            raise ValueError(
                f"ranks: unknown layer name(s) {unknown}; layers are: {', '.join(spectra)}"
            )
        out = {n: len(s) for n, s in spectra.items()}
        for n, r in self.ranks.items():
            full = len(spectra[n])
            if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= full:
                raise ValueError(
                    f"ranks[{n!r}]: expected an integer with 1 <= rank <= {full}, got {r!r}"
                )
            out[n] = r
        return out


POLICIES = {"uniform": Uniform, "global": Global, "energy": Energy}


def make_policy(name: str, value: float):
    """``make_policy("global", 0.5)`` -> ``Global(0.5)``."""
    if name not in POLICIES:
        raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, got {name!r}")
    return POLICIES[name](value)


def default_values(name: str, points: int = 25) -> list[float]:
    """A sweep over a policy's range, from the full model to the smallest sensible one."""
    if name == "uniform":
        return [1 - i / points for i in range(points)]  # 1.0 ... 1/points
    if name == "global":
        return [0.99 * i / (points - 1) for i in range(points)]  # 0 ... 0.99
    if name == "energy":
        return [1 - 0.5 * (i / (points - 1)) ** 2 for i in range(points)]  # 1.0 ... 0.5
    raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, got {name!r}")


class SVDCache:
    """The merged plain model and the thin SVD of every chosen layer, computed once.

    Args:
        model: a plain, composed or truncated model; it is merged (copied) first.
        layers: names of the layers to truncate; default every Linear/Conv2d.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str] | None = None) -> None:
        self.model = merge_model(model).eval()
        available = dict(iter_layers(self.model))
        names = list(available) if layers is None else list(layers)
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(
                f"layers: unknown layer name(s) {unknown}; layers are: {', '.join(available)}"
            )
        self.svd: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        with torch.no_grad():
            for n in names:
                w = layer_matrix(available[n])
                u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
                self.svd[n] = (u, s, vh)
        self.spectra = {n: s.float() for n, (_, s, _) in self.svd.items()}
        self.shapes = {n: (u.shape[0], vh.shape[1]) for n, (u, _, vh) in self.svd.items()}
        self._base_costs: dict[tuple, Cost] = {}

    def base_cost(self, example_input: Tensor) -> Cost:
        """Cost of the uncut merged model on inputs shaped like ``example_input`` (counted once)."""
        key = (tuple(example_input.shape), example_input.dtype)
        if key not in self._base_costs:
            self._base_costs[key] = count_cost(self.model, example_input)
        return self._base_costs[key]


def layer_svd(model: nn.Module, layers: Iterable[str] | None = None) -> SVDCache:
    """Compute every layer's SVD once; pass the result as ``svd=`` to plan/truncate."""
    return SVDCache(model, layers)


def _cache(model, svd, layers) -> SVDCache:
    if svd is None:
        return SVDCache(model, layers)
    if not isinstance(svd, SVDCache):
        raise ValueError(f"svd: expected an SVDCache from layer_svd(), got {type(svd).__name__}")
    return svd


def plan_ranks(
    model: nn.Module, policy, *, svd: SVDCache | None = None, layers: Iterable[str] | None = None
) -> dict[str, int]:
    """``{layer_name: rank}`` that ``policy`` keeps for ``model``."""
    if not hasattr(policy, "plan"):
        raise ValueError(f"policy: expected Uniform, Global, Energy or Ranks, got {policy!r}")
    return policy.plan(_cache(model, svd, layers).spectra)


def truncate(
    model: nn.Module,
    policy,
    *,
    form: str = "low_rank",
    svd: SVDCache | None = None,
    layers: Iterable[str] | None = None,
) -> nn.Module:
    """A new model whose layers keep only the singular values ``policy`` chooses.

    form="dense": the original architecture with each weight replaced by its best rank-r
    approximation (structure-preserving). form="low_rank": each cut layer becomes a
    LowRankLinear / LowRankConv2d (two thin layers) wherever r*(m+n) < m*n, so the savings are
    real at run time; elsewhere it stays dense with the rank-r weight. Uncut layers are kept.
    The chosen ranks are recorded as ``model.lorita_ranks``.
    """
    if form not in ("low_rank", "dense"):
        raise ValueError(f"form: expected 'low_rank' or 'dense', got {form!r}")
    cache = _cache(model, svd, layers)
    ranks = plan_ranks(model, policy, svd=cache)
    new = copy.deepcopy(cache.model)
    for name, r in ranks.items():
        u, s, vh = cache.svd[name]
        if r >= len(s):
            continue
        module = new.get_submodule(name)
        m, n = cache.shapes[name]
        if form == "low_rank" and r * (m + n) < m * n:
            make = (
                LowRankLinear.from_linear
                if isinstance(module, nn.Linear)
                else LowRankConv2d.from_conv
            )
            low = make(module, r, svd=(u, s, vh))
            low.train(module.training)
            set_module(new, name, low)
        else:
            with torch.no_grad():
                w = (u[:, :r] * s[:r]) @ vh[:r]  # (m, n)
                module.weight.copy_(w.reshape(module.weight.shape).to(module.weight.dtype))
    new.lorita_ranks = dict(ranks)
    return new


def _metric_value(result, key: str) -> float:
    if isinstance(result, dict):
        if key not in result:
            raise ValueError(f"key: evaluate() returned {sorted(result)}, no {key!r}")
        return float(result[key])
    return float(result)


def tradeoff_curve(
    model: nn.Module,
    policy_name: str,
    values: Sequence[float] | None = None,
    *,
    evaluate: Callable[[nn.Module], dict | float],
    example_input: Tensor,
    form: str = "low_rank",
    svd: SVDCache | None = None,
    layers: Iterable[str] | None = None,
) -> list[dict]:
    """Evaluate the truncated model at each policy value.

    Returns one dict per value: ``value, ranks, params, flops, params_pct, flops_pct, metric``
    (whatever ``evaluate(model)`` returned), percentages relative to the merged model.
    """
    cache = _cache(model, svd, layers)
    values = default_values(policy_name) if values is None else list(values)
    base = cache.base_cost(example_input)
    out = []
    for v in values:
        small = truncate(model, make_policy(policy_name, v), form=form, svd=cache)
        cost = count_cost(small, example_input)
        out.append(
            {
                "value": float(v),
                "ranks": small.lorita_ranks,
                "params": cost.params,
                "flops": cost.flops,
                "params_pct": 100.0 * cost.params / max(1, base.params),
                "flops_pct": 100.0 * cost.flops / max(1, base.flops),
                "metric": evaluate(small),
            }
        )
    return out


def smallest_within(
    model: nn.Module,
    policy_name: str = "global",
    *,
    evaluate: Callable[[nn.Module], dict | float],
    max_drop: float,
    example_input: Tensor,
    key: str = "acc",
    values: Sequence[float] | None = None,
    refine: int = 4,
    form: str = "low_rank",
    svd: SVDCache | None = None,
    layers: Iterable[str] | None = None,
) -> dict:
    """The smallest truncation (fewest params) whose metric stays within ``max_drop``
    percentage points of the uncompressed model's. Metrics are fractions in [0, 1].

    Sweeps ``values`` (default :func:`default_values`), then bisects ``refine`` times between
    the best feasible value and its infeasible neighbour. Returns the curve point plus
    ``policy``, ``base_metric``, ``model`` (the truncated model) and ``curve`` (all points).
    """
    if _number("max_drop", max_drop) < 0:
        raise ValueError(f"max_drop: expected >= 0 percentage points, got {max_drop!r}")
    cache = _cache(model, svd, layers)
    base_result = evaluate(cache.model)
    base_metric = _metric_value(base_result, key)
    floor = base_metric - max_drop / 100.0 - 1e-12

    def point(vals):
        return tradeoff_curve(
            model,
            policy_name,
            vals,
            evaluate=evaluate,
            example_input=example_input,
            form=form,
            svd=cache,
        )

    curve = point(default_values(policy_name) if values is None else values)

    def ok(p):
        return _metric_value(p["metric"], key) >= floor

    for _ in range(max(0, refine)):
        feasible = [p for p in curve if ok(p)]
        if not feasible:
            break
        best = min(feasible, key=lambda p: p["params"])
        # the infeasible point nearest in value on the "smaller model" side
        smaller = [p for p in curve if not ok(p) and p["params"] < best["params"]]
        if not smaller:
            break
        nxt = min(smaller, key=lambda p: abs(p["value"] - best["value"]))
        mid = (best["value"] + nxt["value"]) / 2
        if abs(mid - best["value"]) < 1e-6:
            break
        curve += point([mid])
    feasible = [p for p in curve if ok(p)]
    if not feasible:  # even the first value fails: keep the full model
        base = cache.base_cost(example_input)
        best = {
            "value": None,
            "ranks": {n: len(s) for n, s in cache.spectra.items()},
            "params": base.params,
            "flops": base.flops,
            "params_pct": 100.0,
            "flops_pct": 100.0,
            "metric": base_result,
        }
        chosen = copy.deepcopy(cache.model)
    else:  # the curve point already holds the chosen model's cost
        best = min(feasible, key=lambda p: (p["params"], -_metric_value(p["metric"], key)))
        chosen = truncate(model, make_policy(policy_name, best["value"]), form=form, svd=cache)
    curve.sort(key=lambda p: p["params"])
    return {
        **best,
        "policy": policy_name,
        "base_metric": base_metric,
        "model": chosen,
        "curve": curve,
    }


def iterative_search(
    model: nn.Module,
    *,
    evaluate: Callable[[nn.Module], dict | float],
    max_drop: float,
    example_input: Tensor,
    key: str = "acc",
    step: float = 0.25,
    max_evals: int = 400,
    form: str = "low_rank",
    svd: SVDCache | None = None,
    layers: Iterable[str] | None = None,
) -> dict:
    """The paper's iterative search: repeatedly cut the rank of the one layer whose cut hurts
    the metric least, while the metric stays within ``max_drop`` points of the full model.

    Each round tries, for every layer, keeping ``(1 - step)`` of its current rank (at least one
    fewer) and accepts the best candidate. Stops when no cut fits or after ``max_evals``
    evaluations. Returns ``ranks``, ``metric``, ``base_metric``, ``model``, ``params``, ``flops``.
    """
    if not 0 < _number("step", step) < 1:
        raise ValueError(f"step: expected 0 < step < 1, got {step!r}")
    if _number("max_drop", max_drop) < 0:
        raise ValueError(f"max_drop: expected >= 0 percentage points, got {max_drop!r}")
    cache = _cache(model, svd, layers)
    base_metric = _metric_value(evaluate(cache.model), key)
    floor = base_metric - max_drop / 100.0 - 1e-12
    ranks = {n: len(s) for n, s in cache.spectra.items()}
    metric = base_metric
    evals = 0
    while evals < max_evals:
        best = None
        for n, r in ranks.items():
            if r <= 1 or evals >= max_evals:
                continue
            trial = dict(ranks, **{n: max(1, min(r - 1, math.floor(r * (1 - step))))})
            m = _metric_value(evaluate(truncate(model, Ranks(trial), form=form, svd=cache)), key)
            evals += 1
            if m >= floor and (best is None or m > best[0]):
                best = (m, trial)
        if best is None:
            break
        metric, ranks = best
    chosen = truncate(model, Ranks(ranks), form=form, svd=cache)
    cost = count_cost(chosen, example_input)
    return {
        "policy": "iterative",
        "ranks": ranks,
        "metric": metric,
        "base_metric": base_metric,
        "model": chosen,
        "params": cost.params,
        "flops": cost.flops,
        "evaluations": evals,
    }
