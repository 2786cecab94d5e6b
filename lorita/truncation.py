"""Rank policies (how many singular values each layer keeps), truncation into a model that is
really smaller, and the accuracy / cost trade-off over a policy's range.

A policy is a small object with ``plan(spectra) -> {layer: rank}``; everything else takes one.
Each policy class (a :class:`Policy` subclass) also carries its CLI spelling, label, value range
and default sweep, and registers itself in :data:`POLICIES`, the one list the CLI and the app
read (:func:`parse_policy`, :func:`list_policies`): a new policy is one class plus its tests.
:class:`Budget` plans by cost ("the largest model within 10% of the parameters").

The SVD of every layer is computed once (:class:`SVDCache`) and reused for every cut, which is
what makes a truncation slider fast. The compress session over all this is
:class:`lorita.compress.Compressor`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from . import inputs, kinds
from .checks import check_flag, check_names, is_int, is_real
from .clone import clone_model, unwrap
from .convert import check_initialised, iter_layers, merge_model
from .cost import Cost, attention_projection_flops, count_cost
from .functional import at_rounding_level
from .kinds import detect_direct
from .layers import is_thin
from .spectra import energy_rank

__all__ = [
    "Policy",
    "Uniform",
    "Global",
    "Energy",
    "Budget",
    "FlopBudget",
    "Ranks",
    "LayerCosts",
    "make_policy",
    "parse_policy",
    "policy_class",
    "list_policies",
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
    if not is_real(value):
        raise ValueError(f"{field}: expected a number, got {value!r}"[:200])
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range (10**400)
        number = math.inf if value > 0 else -math.inf
    if math.isnan(number):
        raise ValueError(f"{field}: expected a number, got {value!r}")
    return number


def _set_number(policy: Policy, field: str) -> float:
    """``policy``'s number ``field`` checked and stored as a plain float (a NumPy scalar or a
    huge int would leak into the spec, which must stay JSON-able)."""
    number = _number(field, getattr(policy, field)) + 0.0  # (+ 0.0: -0.0 is 0, "global:0")
    object.__setattr__(policy, field, number)  # (frozen dataclass)
    return number


#: Every rank policy by its CLI spelling; a subclass of :class:`Policy` with a ``name`` adds
#: itself. The CLI and the app list policies from here (see :func:`list_policies`).
POLICIES: dict[str, type[Policy]] = {}


class Policy:
    """A rank policy: ``plan(spectra) -> {layer: rank}``.

    A scalar policy is a frozen dataclass with one number (``value_name``); the class itself
    says how to show and sweep it: ``name`` (CLI spelling, ``"global:0.5"``), ``label`` and
    ``help`` (a UI's words), ``low``/``high``/``step``/``default``/``fmt``/``unit`` (a slider),
    :meth:`sweep` (a trade-off curve from the full model to the smallest sensible one).
    ``needs_costs`` policies are planned with ``plan(spectra, costs)``, costs being the
    :class:`LayerCosts` of the model being cut.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    help: ClassVar[str] = ""
    value_name: ClassVar[str | None] = None
    low: ClassVar[float] = 0.0
    high: ClassVar[float] = 1.0
    step: ClassVar[float] = 0.01
    default: ClassVar[float] = 0.5
    fmt: ClassVar[str] = "%.2f"
    unit: ClassVar[str] = ""
    needs_costs: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and cls.name:
            POLICIES[cls.name] = cls

    @property
    def value(self) -> float | None:
        return None if self.value_name is None else getattr(self, self.value_name)

    def __str__(self) -> str:
        return f"{self.name}:{self.value:g}"

    def spec(self) -> dict:
        """JSON-able description: ``{"policy": name, "value": number}``."""
        return {"policy": self.name, "value": self.value}

    @classmethod
    def sweep(cls, points: int = 25) -> list[float]:
        """Values for a trade-off curve, from the full model to the smallest sensible one."""
        raise NotImplementedError

    @classmethod
    def describe(cls) -> dict:
        """What a UI needs to offer this policy (JSON-able)."""
        return {
            "name": cls.name,
            "label": cls.label,
            "help": cls.help,
            "kind": "scalar" if cls.value_name else "table",
            "field": cls.value_name,
            "min": cls.low,
            "max": cls.high,
            "step": cls.step,
            "default": cls.default,
            "format": cls.fmt,
            "unit": cls.unit,
        }

    def plan(self, spectra: dict[str, Tensor]) -> dict[str, int]:
        raise NotImplementedError


MAX_SWEEP_POINTS = 10_000  # a curve's points: each is a cut (and an evaluation) of its own


def _points(points: int) -> int:
    if not is_int(points) or not 2 <= points <= MAX_SWEEP_POINTS:
        raise ValueError(
            f"points: expected an integer in [2, {MAX_SWEEP_POINTS}], got {points!r}"[:200]
        )
    return int(points)


def _pooled_order(spectra: dict[str, Tensor]) -> list[str]:
    """Layer names, one per droppable singular value, smallest normalised value first.

    Each spectrum is divided by its largest value and all are pooled; a layer's top value is
    never dropped. Ties keep layer order (a stable sort), so the order is deterministic.
    """
    pooled = []  # (normalised value, layer index)
    names = list(spectra)
    for i, n in enumerate(names):
        s = spectra[n].double()
        top = float(s[0]) if len(s) else 0.0
        norm = s / top if top > 0 else torch.zeros_like(s)
        pooled += [(float(v), i) for v in norm[1:]]
    pooled.sort(key=lambda t: t[0])
    return [names[i] for _, i in pooled]


@dataclass(frozen=True)
class Uniform(Policy):
    """Keep the top ``floor(ratio * full_rank)`` singular values (at least 1) in every layer."""

    ratio: float

    name = "uniform"
    label = "Uniform ratio"
    help = "Every layer keeps the top ⌊ratio·rank⌋ singular values."
    value_name = "ratio"
    low, high, step, default, fmt = 0.01, 1.0, 0.01, 0.5, "%.2f"

    def __post_init__(self):
        if not 0 < _set_number(self, "ratio") <= 1:
            raise ValueError(f"ratio: expected 0 < ratio <= 1, got {self.ratio!r}")

    @classmethod
    def sweep(cls, points: int = 25) -> list[float]:
        points = _points(points)
        return [1 - i / points for i in range(points)]  # 1.0 ... 1/points

    def plan(self, spectra: dict[str, Tensor]) -> dict[str, int]:
        return {n: max(1, math.floor(self.ratio * len(s) + 1e-9)) for n, s in spectra.items()}


@dataclass(frozen=True)
class Global(Policy):
    """Normalise each layer's spectrum by its largest value, pool all layers, and drop the
    globally smallest ``fraction`` of singular values (every layer keeps at least one)."""

    fraction: float

    name = "global"
    label = "Global (pooled spectra)"
    help = (
        "Spectra normalised by their largest value, pooled over layers, and the globally "
        "smallest fraction dropped."
    )
    value_name = "fraction"
    low, high, step, default, fmt = 0.0, 0.99, 0.01, 0.5, "%.2f"

    def __post_init__(self):
        if not 0 <= _set_number(self, "fraction") < 1:
            raise ValueError(f"fraction: expected 0 <= fraction < 1, got {self.fraction!r}")

    @classmethod
    def sweep(cls, points: int = 25) -> list[float]:
        points = _points(points)
        return [0.99 * i / (points - 1) for i in range(points)]  # 0 ... 0.99

    def plan(self, spectra: dict[str, Tensor]) -> dict[str, int]:
        order = _pooled_order(spectra)
        total = sum(len(s) for s in spectra.values())
        n_drop = min(math.floor(self.fraction * total + 1e-9), len(order))
        ranks = {n: len(s) for n, s in spectra.items()}
        for n in order[:n_drop]:
            ranks[n] -= 1
        return ranks


@dataclass(frozen=True)
class Energy(Policy):
    """Per layer, the smallest rank that keeps ``keep`` of the energy ``sum sigma^2``."""

    keep: float

    name = "energy"
    label = "Energy per layer"
    help = "Per layer, the smallest rank that keeps this share of Σσ²."
    value_name = "keep"
    low, high, step, default, fmt = 0.5, 1.0, 0.001, 0.99, "%.3f"

    def __post_init__(self):
        if not 0 < _set_number(self, "keep") <= 1:
            raise ValueError(f"keep: expected 0 < keep <= 1 (energy share), got {self.keep!r}")

    @classmethod
    def sweep(cls, points: int = 25) -> list[float]:
        points = _points(points)
        return [1 - 0.5 * (i / (points - 1)) ** 2 for i in range(points)]  # 1.0 ... 0.5

    def plan(self, spectra: dict[str, Tensor]) -> dict[str, int]:
        return {n: max(1, energy_rank(s, self.keep)) for n, s in spectra.items()}


@dataclass(frozen=True)
class LayerCosts:
    """What each cut layer costs at a given rank, and what the rest of the model costs.

    A layer of ``G`` matrices of shape ``(m, n)`` (G > 1: a grouped conv, attention's q/k/v)
    costs ``G*m*n`` parameters at full rank and, where its thin form can be used (``thin``),
    ``G*r*(m+n)`` wherever ``r*(m+n) < m*n`` (the rule :func:`truncate` uses by FLOPs); its
    FLOPs scale the same way (both thin layers run at the layer's output positions). Biases,
    norms and layers left out are ``fixed``. Built by :meth:`SVDCache.costs`.
    """

    shapes: dict[str, tuple[int, int]]  # layer -> (m, n) of each of its matrices
    flops_full: dict[str, int]  # layer -> its FLOPs uncut
    fixed: dict[str, int]  # {"params", "flops"} of everything that is not a cut weight
    base: dict[str, int]  # {"params", "flops"} of the uncut model
    form: str = "low_rank"
    groups: dict[str, int] = field(default_factory=dict)  # layer -> G (default 1)
    thin: dict[str, bool] = field(default_factory=dict)  # layer -> thin form usable (default)

    def layer(self, name: str, rank: int) -> dict[str, int]:
        m, n = self.shapes[name]
        g = self.groups.get(name, 1)
        full = g * m * n
        thin = self.form == "low_rank" and self.thin.get(name, True) and rank * (m + n) < m * n
        params = g * rank * (m + n) if thin else full
        return {"params": params, "flops": self.flops_full[name] * params // full}

    def total(self, ranks: dict[str, int]) -> dict[str, int]:
        out = dict(self.fixed)
        for name, r in ranks.items():
            c = self.layer(name, r)
            out["params"] += c["params"]
            out["flops"] += c["flops"]
        return out


@dataclass(frozen=True)
class Budget(Policy):
    """The largest model within ``percent`` % of the uncut model's parameters (or FLOPs with
    ``measure="flops"``): singular values are dropped in :class:`Global`'s order (smallest
    sigma/sigma_max first, pooled over layers) until the cost fits. This is the smallest
    ``Global`` fraction that meets the budget, found exactly instead of by bisection. A layer
    whose cut must stay dense (its weight read by the model itself) saves nothing and is not
    cut. When even rank 1 everywhere does not fit, every layer keeps rank 1 (the cut model's
    ``lorita_budget`` says so)."""

    percent: float
    measure: str = "params"

    name = "budget"
    label = "Budget (share of the parameters)"
    help = "The largest model (Global order) with at most this share of the parameters."
    value_name = "percent"
    low, high, step, default, fmt, unit = 1.0, 100.0, 0.5, 20.0, "%.1f", "%"
    needs_costs = True

    def __post_init__(self):
        if not 0 < _set_number(self, "percent") <= 100:
            raise ValueError(f"percent: expected 0 < percent <= 100, got {self.percent!r}")
        if self.measure not in ("params", "flops"):
            raise ValueError(f"measure: expected 'params' or 'flops', got {self.measure!r}")
        if self.percent < 1:  # Budget(0.1) for "10%" would keep a tenth of a percent
            warnings.warn(
                f"percent: {self.percent:g} keeps {self.percent:g}% of the uncut model's "
                f"{self.measure}, not {100 * self.percent:g}%: the budget is in percent "
                f"(Budget({100 * self.percent:g}) for {100 * self.percent:g}%)",
                stacklevel=3,
            )

    def __str__(self) -> str:
        return f"{self.spec()['policy']}:{self.percent:g}"

    def spec(self) -> dict:
        # Budget(p, measure="flops") is spelled as the FlopBudget it is, so it reads back as one
        name = FlopBudget.name if self.measure == "flops" else self.name
        return {"policy": name, "value": self.percent}

    @classmethod
    def sweep(cls, points: int = 25) -> list[float]:
        points = _points(points)  # 100% ... 2%, denser at the small end
        return [round(100 * 0.02 ** (i / (points - 1)), 3) for i in range(points)]

    def target(self, costs: LayerCosts) -> float:
        """The budget in parameters (or FLOPs) of the uncut model."""
        return self.percent / 100.0 * costs.base[self.measure]

    def plan(self, spectra: dict[str, Tensor], costs: LayerCosts | None = None) -> dict[str, int]:
        if costs is None:
            raise ValueError(
                f"costs: {type(self).__name__} needs the model's layer costs; use plan_ranks() "
                "or truncate() with example_input=, or lorita.Compressor"
            )
        if costs.form != "low_rank":
            raise ValueError(
                f"form: a budget needs form='low_rank' (the dense form keeps every weight's "
                f"size), got {costs.form!r}; for the budget's ranks written dense, cut with "
                "low_rank, then Ranks(cut.lorita_ranks) with form='dense' (what `lorita export "
                "--form dense` does)"
            )
        target = self.target(costs)
        ranks = {n: len(s) for n, s in spectra.items()}
        total = costs.total(ranks)[self.measure]
        for n in _pooled_order(spectra):
            if total <= target:
                break
            if not costs.thin.get(n, True):
                continue  # a layer that stays dense saves nothing when cut: keep it whole
            before = costs.layer(n, ranks[n])[self.measure]
            ranks[n] -= 1
            total += costs.layer(n, ranks[n])[self.measure] - before
        return ranks


@dataclass(frozen=True)
class FlopBudget(Budget):
    """:class:`Budget` on FLOPs: the largest model within ``percent`` % of the FLOPs."""

    percent: float
    measure: str = "flops"

    name = "flops-budget"
    label = "Budget (share of the FLOPs)"
    help = "The largest model (Global order) with at most this share of the FLOPs."

    def __post_init__(self):
        super().__post_init__()
        if self.measure != "flops":
            raise ValueError(
                "measure: a FlopBudget budgets FLOPs; for parameters use Budget(percent)"
            )


@dataclass(frozen=True)
class Ranks(Policy):
    """Explicit ranks ``{layer_name: rank}``; layers not named keep full rank."""

    ranks: dict

    name = "ranks"
    label = "Per-layer ranks (table)"
    help = "Each named layer keeps the given rank; the others keep full rank."

    def __post_init__(self):
        if not isinstance(self.ranks, dict):
            raise ValueError(
                f"ranks: expected a dict {{layer_name: rank}}, got {type(self.ranks).__name__}"
            )
        for n, r in self.ranks.items():  # the upper bound (the layer's full rank) at the cut
            if not isinstance(n, str):
                raise ValueError(f"ranks: expected layer names as keys, got {n!r}")
            if not is_int(r) or r < 1:
                raise ValueError(f"ranks[{n!r}]: expected an integer >= 1, got {r!r}")
        # (frozen) plain ints, as the spec and the plans store them
        object.__setattr__(self, "ranks", {n: int(r) for n, r in self.ranks.items()})

    def __str__(self) -> str:
        return "ranks:" + ",".join(f"{n}={r}" for n, r in self.ranks.items())

    def spec(self) -> dict:
        return {"policy": self.name, "ranks": dict(self.ranks)}

    @classmethod
    def sweep(cls, points: int = 25) -> list[float]:
        raise ValueError("policy: 'ranks' has no range to sweep; choose a scalar policy")

    def plan(self, spectra: dict[str, Tensor]) -> dict[str, int]:
        unknown = [n for n in self.ranks if n not in spectra]
        if unknown:
            raise ValueError(
                f"ranks: unknown layer name(s) {unknown}; layers are: {', '.join(spectra)}"
            )
        out = {n: len(s) for n, s in spectra.items()}
        for n, r in self.ranks.items():
            full = len(spectra[n])
            if not is_int(r) or not 1 <= r <= full:
                raise ValueError(
                    f"ranks[{n!r}]: expected an integer with 1 <= rank <= {full}, got {r!r}"
                )
            out[n] = r
        return out


def policy_class(policy: str | type[Policy]) -> type[Policy]:
    """The policy class for a name (``"global"``, in any case and spacing, as
    :func:`parse_policy` reads it; an underscore may stand for a hyphen, ``"flops_budget"``)
    or a class."""
    if isinstance(policy, type) and issubclass(policy, Policy):
        return policy
    if isinstance(policy, str):
        plain = policy.strip().lower()
        for name in (plain, plain.replace("_", "-")):
            if name in POLICIES:
                return POLICIES[name]
    raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, got {policy!r}")


def make_policy(name: str | type[Policy], value: float) -> Policy:
    """``make_policy("global", 0.5)`` -> ``Global(0.5)``."""
    cls = policy_class(name)
    if cls.value_name is None:
        raise ValueError(f"policy: {cls.name!r} takes no single value; build it directly")
    return cls(value)


def _parse_ranks(text: str) -> Ranks:
    ranks = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        layer, sep, r = item.partition("=")
        if not sep or not r.strip().isdecimal():  # what int() reads (not "²")
            raise ValueError(f"policy: expected ranks:LAYER=RANK,LAYER=RANK, got item {item!r}")
        if layer.strip() in ranks:
            raise ValueError(f"policy: layer {layer.strip()!r} is given two ranks")
        ranks[layer.strip()] = int(r)
    if not ranks:
        raise ValueError("policy: ranks needs at least one LAYER=RANK, e.g. ranks:fc1=4,fc2=8")
    return Ranks(ranks)


def parse_policy(text: str) -> Policy:
    """A policy from its CLI spelling: ``"global:0.9"``, ``"budget:10"``,
    ``"ranks:fc1=4,fc2=8"``. Bad text raises ValueError naming the policy and what is allowed."""
    if not isinstance(text, str):
        raise ValueError(f"policy: expected text like 'global:0.5', got {text!r}")
    name, sep, value = text.strip().partition(":")
    name = name.strip().lower()
    if not sep:
        raise ValueError(f"policy: expected NAME:VALUE (e.g. global:0.5), got {text!r}")
    cls = policy_class(name)
    if cls is Ranks:
        return _parse_ranks(value)
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"policy: {name} needs a number after ':', got {value!r}") from None
    return cls(number)


def list_policies() -> list[dict]:
    """Every policy's :meth:`Policy.describe` (JSON-able), in registration order."""
    return [cls.describe() for cls in POLICIES.values()]


def default_values(name: str | type[Policy], points: int = 25) -> list[float]:
    """A sweep over a policy's range, from the full model to the smallest sensible one."""
    return policy_class(name).sweep(points)


def _vector_dtype(model: nn.Module) -> torch.dtype:
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return torch.float64 if torch.float64 in floats else torch.float32


def _rank_at_most(sv: Tensor, r: int, size: int) -> bool:
    """Whether singular values ``sv`` (..., p) of (m, k) matrices, ``size`` = max(m, k), are at
    rounding level beyond the r-th, as in a float32 weight of rank r."""
    return bool(at_rounding_level(sv, size, torch.float32)[..., r:].all())


class SVDCache:
    """The merged plain model and the thin SVD of every chosen layer, computed once.

    Args:
        model: a plain, composed or truncated model; it is merged (copied) first. A layer
            cut before to rank r in its thin form keeps at most its r singular values.
        layers: names of the layers to truncate; default every Linear/Conv2d (but the output
            layer with ``keep_head``).
        example_input: an input batch, for policies that plan by cost (:class:`Budget`); also
            finds the output layer for ``keep_head`` (without it, a guessed input does).
        keep_head: with ``layers`` not given, leave the output layer (the last layer to run, a
            classifier's head) out of every cut, as the paper and the :class:`Compressor` do:
            cutting it below its number of outputs merges them. ``left_out`` says so, and so
            does the plan of a cut made with this cache.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str] | None = None,
        *,
        example_input: Tensor | None = None,
        keep_head: bool = False,
    ) -> None:
        check_initialised(model)  # a meta model has no singular values to cut by
        source = _fingerprint(model)
        held = {  # a model cut before: its thin layers' ranks bound what a new cut keeps
            n: m.rank for n, m in iter_layers(model) if is_thin(m)
        }
        # and so do the ranks its dense rank-r layers were cut to (recorded by truncate and
        # load), where the weight still has that rank (fine-tuning a dense layer raises it)
        recorded = {
            n: int(r)
            for n, r in (getattr(unwrap(model), "lorita_ranks", None) or {}).items()
            if n not in held and isinstance(r, int)
        }
        self.model = merge_model(model).eval()
        #: the models this cache describes: the one given and its merged copy, as they are now
        self.sources = (source, _fingerprint(self.model))
        self.example_input = example_input
        self.model.lorita_direct = _direct_reads(self.model, example_input)
        available = dict(iter_layers(self.model))
        #: layers left out of every cut, with why (with keep_head: the output layer)
        self.left_out: dict[str, str] = {}
        if layers is None and keep_head:
            self.left_out = _head_left_out(self.model, example_input)
        if layers is None:  # a cut of a tied layer would change the other module too
            for e in kinds.layer_table(self.model):
                if e.shared and e.name in available:
                    self.left_out.setdefault(e.name, kinds.TIED)
        layers = check_names(layers, "layers")
        names = [n for n in available if n not in self.left_out] if layers is None else layers
        if layers is not None:  # a module of the model that no cut may take: say why
            for n, why in kinds.why_not_cut(self.model, names).items():
                raise ValueError(f"layers: {n!r} cannot be cut: {why}")
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(
                f"layers: unknown layer name(s) {unknown}; layers are: {', '.join(available)}"
            )
        self.svd: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        # The singular vectors are kept in the weights' precision (float32 unless the model
        # is float64), half the memory of the float64 they are computed in: the cache of a
        # large model is otherwise three times the model (vit_h_14: 7 GB). The singular values
        # stay float64 for the policies' sums.
        vectors = _vector_dtype(self.model)
        with torch.no_grad():
            for n in names:  # (G, m, n) per layer: G groups / q, k, v share one rank
                u, sv, vh = kinds.layer_svd(available[n], n)
                r = held.get(n, sv.shape[-1])  # beyond a held rank the values are zero
                size = max(u.shape[-2], vh.shape[-1])
                if n in recorded and recorded[n] < r and _rank_at_most(sv, recorded[n], size):
                    r = recorded[n]
                self.svd[n] = (u[..., :r].to(vectors), sv[..., :r], vh[..., :r, :].to(vectors))
                del u, vh
        self.spectra = {n: kinds.pooled_spectrum(s).float() for n, (_, s, _) in self.svd.items()}
        self.shapes = {n: (u.shape[-2], vh.shape[-1]) for n, (u, _, vh) in self.svd.items()}
        self.groups = {n: u.shape[0] for n, (u, _, _) in self.svd.items()}  # matrices per layer
        self._base_costs: dict[tuple, Cost] = {}
        self._projections: dict[tuple, dict[str, int]] = {}  # attention layer -> q, k, v FLOPs
        self._costs: dict[tuple, LayerCosts] = {}  # (input key, form) -> the layers' costs

    def left_out_plan(self) -> dict[str, dict]:
        """Plan rows like :func:`lorita.kinds.cut_model`'s for the left-out layers (form
        "left out", ``why`` the reason)."""
        kind = {e.name: e.kind.name for e in kinds.layer_table(self.model)}
        rows = {}
        for n, why in self.left_out.items():
            full = int(min(kinds.matrices(self.model.get_submodule(n)).shape[-2:]))
            rows[n] = {
                "rank": full,
                "full": full,
                "kind": kind.get(n, ""),
                "form": "left out",
                "why": why,
            }
        return rows

    def base_cost(self, example_input: Tensor) -> Cost:
        """Cost of the uncut merged model on inputs shaped like ``example_input`` (counted once)."""
        example_input = inputs.check_example(example_input)
        key = inputs.key(example_input)
        if key not in self._base_costs:
            self._base_costs[key] = count_cost(self.model, example_input)
        return self._base_costs[key]

    def _projection_flops(self, example_input: inputs.Example, names: list[str]) -> dict:
        key = inputs.key(inputs.check_example(example_input))
        if key not in self._projections:
            self._projections[key] = attention_projection_flops(self.model, example_input, names)
        return self._projections[key]

    def costs(self, example_input: Tensor | None = None, form: str = "low_rank") -> LayerCosts:
        """Each cached layer's cost as a function of its rank (see :class:`LayerCosts`),
        worked out once per input shape and form."""
        x = self.example_input if example_input is None else example_input
        if x is None:
            raise ValueError(
                "example_input: planning by cost needs one input batch; pass example_input= "
                "(or build the SVD cache with one)"
            )
        key = (inputs.key(inputs.check_example(x)), form)
        if key not in self._costs:
            self._costs[key] = self._layer_costs(x, form)
        return self._costs[key]

    def _layer_costs(self, x: inputs.Example, form: str) -> LayerCosts:
        base = self.base_cost(x)
        flops_full = {n: int(base.per_layer[n]["flops"]) for n in self.svd}
        table = [e for e in kinds.layer_table(self.model) if e.name in self.svd]
        attention = [e.name for e in table if e.kind.name == "attention"]
        if attention:  # counted, their FLOPs hold the products and out_proj: q, k, v only
            flops = self._projection_flops(x, attention)
            flops_full.update({n: f for n, f in flops.items() if n in self.svd})
        weights = sum(self.groups[n] * m * k for n, (m, k) in self.shapes.items())
        thin = {e.name: kinds.can_be_thin(self.model, e) for e in table}
        return LayerCosts(
            shapes=dict(self.shapes),
            flops_full=flops_full,
            fixed={"params": base.params - weights, "flops": base.flops - sum(flops_full.values())},
            base={"params": base.params, "flops": base.flops},
            form=form,
            groups=dict(self.groups),
            thin=thin,
        )


def _head_left_out(model: nn.Module, example_input: Tensor | None) -> dict[str, str]:
    """``{output layer: why it is left out}`` (empty when the model runs no layer)."""
    head, how = kinds.find_output_layer(model, example_input)
    if head is None:
        return {}
    outputs = kinds.matrices(model.get_submodule(head)).shape[-2]
    found = f"; found as {how}" if how else ""
    return {
        head: f"output layer ({outputs} outputs): left out, as cutting it below its number of "
        f"outputs merges them{found}"
    }


def layer_svd(
    model: nn.Module,
    layers: Iterable[str] | None = None,
    *,
    example_input: Tensor | None = None,
    keep_head: bool = False,
) -> SVDCache:
    """Compute every layer's SVD once; pass the result as ``svd=`` to plan/truncate
    (``keep_head=True`` leaves the output layer out of their cuts, see :class:`SVDCache`)."""
    check_flag(keep_head, "keep_head")
    return SVDCache(model, layers, example_input=example_input, keep_head=keep_head)


def as_policy(policy) -> Policy:
    """A policy object, or its text (``"budget:10"``, see :func:`parse_policy`)."""
    if isinstance(policy, str):
        return parse_policy(policy)
    if isinstance(policy, type) and issubclass(policy, Policy):
        raise ValueError(
            f"policy: pass an instance with its value, e.g. {policy.__name__}(...) or "
            f"'{policy.name}:VALUE', got the class {policy.__name__}"
        )
    if not isinstance(policy, Policy):
        raise ValueError(
            f"policy: expected a policy ({', '.join(p.__name__ for p in POLICIES.values())}) "
            f"or its text like 'global:0.5', got {type(policy).__name__}"
        )
    return policy


def _fingerprint(model: nn.Module) -> tuple:
    """Which model, holding which tensors at which in-place version and storage (a training
    step, a load_state_dict, a fine-tuning, ``weight.data = ...`` changes it; eval-mode calls
    do not)."""
    tensors = [*model.parameters(), *model.buffers()]
    return id(model), tuple(
        (id(t), t._version, t.data_ptr() if t.layout == torch.strided else 0) for t in tensors
    )


def _cache(model, svd, layers, example_input=None) -> SVDCache:
    if svd is None:
        return SVDCache(model, layers, example_input=example_input)
    if not isinstance(svd, SVDCache):
        raise ValueError(f"svd: expected an SVDCache from layer_svd(), got {type(svd).__name__}")
    if not isinstance(model, nn.Module) or _fingerprint(model) not in svd.sources:
        raise ValueError(
            "svd: the cache was computed from another model, or from this one before its "
            "weights changed; compute it again with layer_svd(model)"
        )
    return svd


def check_left_out(
    policy: Policy, left_out: dict[str, str], model: nn.Module | None = None
) -> None:
    """Refuse explicit ranks for a layer left out of cuts (the output layer, say), or, given
    the ``model``, for a module of it that no cut may take (parametrized, depthwise, tied),
    saying why: such a name is not "unknown"."""
    if isinstance(policy, Ranks):
        out = [n for n in policy.ranks if n in left_out]
        if out:
            raise ValueError(f"ranks: layer(s) {out} are left out of cuts ({left_out[out[0]]})")
        blocked = kinds.why_not_cut(model, list(policy.ranks)) if model is not None else {}
        if blocked:
            n, why = next(iter(blocked.items()))
            raise ValueError(f"ranks: {n!r} cannot be cut: {why}")


def plan_ranks(
    model: nn.Module,
    policy,
    *,
    svd: SVDCache | None = None,
    layers: Iterable[str] | None = None,
    example_input: Tensor | None = None,
    form: str = "low_rank",
) -> dict[str, int]:
    """``{layer_name: rank}`` that ``policy`` keeps for ``model``.

    Policies that plan by cost (``needs_costs``, e.g. :class:`Budget`) need ``example_input``
    (or an SVD cache built with one) and the ``form`` the model will be cut to.
    """
    if form not in kinds.FORMS:
        raise ValueError(f"form: expected one of {', '.join(kinds.FORMS)}, got {form!r}")
    policy = as_policy(policy)
    cache = _cache(model, svd, layers, example_input)
    check_left_out(policy, cache.left_out, cache.model)
    if getattr(policy, "needs_costs", False):
        return policy.plan(cache.spectra, cache.costs(example_input, form))
    return policy.plan(cache.spectra)


def _direct_reads(model: nn.Module, example_input) -> tuple[str, ...]:
    """The layers whose weight ``model`` reads itself (their cut must stay dense): the ones
    found when it was composed, and, when that found none by tracing (no input the model
    took) and ``example_input`` is given, the ones a pass over that input reads."""
    known = getattr(model, "lorita_direct", None)
    traced = (getattr(model, "lorita_summary", None) or {}).get("direct_reads") == "traced"
    if known is not None and (traced or example_input is None):
        return tuple(known)
    found = detect_direct(model, example_input)[0]
    return tuple(dict.fromkeys([*(known or ()), *found]))


def truncate(
    model: nn.Module,
    policy,
    *,
    form: str = "low_rank",
    svd: SVDCache | None = None,
    layers: Iterable[str] | None = None,
    example_input: Tensor | None = None,
    by: str = "flops",
    batch: int | None = 64,
) -> nn.Module:
    """A new model whose layers keep only the singular values ``policy`` chooses, in eval
    mode, ready to run (call ``.train()`` on it before fine-tuning).

    form="dense": the original architecture with each weight replaced by its best rank-r
    approximation (structure-preserving). form="low_rank": each cut layer becomes a
    LowRankLinear / LowRankConv2d (two thin layers) where that is what the model calls and it
    is cheaper, by FLOPs (``by="flops"``, r*(m+n) < m*n) or by latency measured on this machine
    (``by="latency"``, on ``example_input`` repeated to ``batch`` rows); elsewhere it stays
    dense with the rank-r weight, so a cut never costs more. Uncut layers are kept.
    ``layers`` defaults to every layer; ``svd=layer_svd(model, keep_head=True)`` leaves the
    output layer (a classifier's head) whole, as the paper and the :class:`Compressor` do, and
    the plan says so.
    The chosen ranks are recorded as ``model.lorita_ranks`` and the form of every layer as
    ``model.lorita_plan`` (see :func:`lorita.kinds.cut_model`). ``example_input`` is also
    needed by policies that plan by cost (:class:`Budget`) when ``svd`` was built without one.
    A Budget cut records ``model.lorita_budget`` (``percent``, ``kept_pct``, ``met``) and warns
    when the budget cannot be met, unless ``svd`` is given (callers that sweep budgets on a
    shared cache, like the trade-off curves, report the shares themselves).
    """
    kinds.check_cut_options(form, by, example_input)
    policy = as_policy(policy)
    cache = _cache(model, svd, layers, example_input)
    ranks = plan_ranks(model, policy, svd=cache, example_input=example_input, form=form)
    new = clone_model(cache.model)
    plan = kinds.cut_model(
        new, ranks, cache.svd, form=form, by=by, example_input=example_input, batch=batch
    )
    new.lorita_ranks = dict(ranks)
    new.lorita_plan = {**plan, **cache.left_out_plan()}
    if isinstance(policy, Budget):
        kept = None
        if by != "flops" and form == "low_rank":  # layers the timing kept dense keep their cost
            from .cost import count_cost

            cost = count_cost(new, example_input)
            kept = {"params": cost.params, "flops": cost.flops}
        facts = _budget_facts(
            policy, cache.costs(example_input), ranks, warn=svd is None, kept=kept
        )
        new.lorita_budget = facts
    return new


def _budget_facts(
    policy: Budget,
    costs: LayerCosts,
    ranks: dict[str, int],
    *,
    warn: bool,
    kept: dict[str, int] | None = None,
) -> dict:
    """How a budget cut's cost compares with the budget: the planned cost, or ``kept``, the
    cut model's counted cost (``warn``: say so when it does not fit)."""
    got = (kept or costs.total(ranks))[policy.measure]
    target = policy.target(costs)
    facts = {
        "measure": policy.measure,
        "percent": float(policy.percent),
        "kept_pct": 100.0 * got / max(1, costs.base[policy.measure]),
        "met": bool(got <= target),
    }
    if warn and not facts["met"]:
        what = "parameters" if policy.measure == "params" else "FLOPs"
        if kept is not None and costs.total(ranks)[policy.measure] <= target:
            text = (
                f"budget: {policy.percent:g}% of the {what} is not met by the cut whose forms "
                f"were chosen by latency: it keeps {facts['kept_pct']:.1f}% (the layers whose "
                "thin form was not faster on this machine stay dense, at full cost); "
                "by='flops' keeps the budget"
            )
        else:
            text = (
                f"budget: {policy.percent:g}% of the {what} cannot be reached; the smallest cut "
                f"(each cut layer at rank 1, or whole where a cut saves nothing) keeps "
                f"{facts['kept_pct']:.1f}%"
            )
        warnings.warn(text, stacklevel=3)
    return facts


def _check_evaluate(evaluate) -> None:
    if not callable(evaluate):
        raise ValueError(
            "evaluate: expected a function model -> metric (a number, or a dict of them), got "
            f"{type(evaluate).__name__}"
        )


def _metric_value(result, key: str) -> float:
    value = result
    if isinstance(result, dict):
        if key not in result:
            raise ValueError(f"key: evaluate() returned {sorted(result)}, no {key!r}")
        value = result[key]
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        got = f"{value!r}"[:100]
        raise ValueError(
            f"evaluate: expected it to return a number or a dict holding {key!r}, got {got}"
        ) from None


def tradeoff_curve(
    model: nn.Module,
    policy_name: str | type[Policy],
    values: Sequence[float] | None = None,
    *,
    evaluate: Callable[[nn.Module], dict | float],
    example_input: Tensor,
    form: str = "low_rank",
    svd: SVDCache | None = None,
    layers: Iterable[str] | None = None,
    progress: Callable[[int, int, dict], object] | None = None,
) -> list[dict]:
    """Evaluate the truncated model at each policy value (a name like ``"global"`` or a class).

    Returns one dict per value: ``value, ranks, params, flops, params_pct, flops_pct, metric``
    (whatever ``evaluate(model)`` returned), percentages relative to the merged model.
    ``progress(done, total, point)`` is called after each point (e.g. to fill in a chart).
    """
    cls = policy_class(policy_name)
    _check_evaluate(evaluate)
    if values is not None and (isinstance(values, (str, dict)) or not hasattr(values, "__iter__")):
        raise ValueError(f"values: expected a list of {cls.name} values, got {values!r}"[:200])
    cache = _cache(model, svd, layers, example_input)
    values = cls.sweep() if values is None else list(values)
    base = cache.base_cost(example_input)
    out, seen = [], {}
    for v in values:
        policy = cls(v)
        ranks = plan_ranks(model, policy, svd=cache, example_input=example_input, form=form)
        key = tuple(sorted(ranks.items()))  # the ranks truncate keeps for this policy
        if key in seen:  # another value, the same cut: cut and evaluated once
            out.append({**seen[key], "value": float(v), "ranks": dict(seen[key]["ranks"])})
        else:
            small = truncate(model, policy, form=form, svd=cache, example_input=example_input)
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
            seen[key] = out[-1]
        if progress is not None:
            progress(len(out), len(values), out[-1])
    return out


def _refinement(curve: list[dict], ok: Callable[[dict], bool], step: float | None) -> list:
    """The values :func:`smallest_within` tries next: between the best feasible point and the
    infeasible one nearest in value to it on the smaller-model side, their midpoint, or with
    ``step`` every multiple of it; empty when there is nothing left to refine."""
    feasible = [p for p in curve if ok(p)]
    if not feasible:
        return []
    best = min(feasible, key=lambda p: p["params"])
    smaller = [p for p in curve if not ok(p) and p["params"] < best["params"]]
    if not smaller:
        return []
    nxt = min(smaller, key=lambda p: abs(p["value"] - best["value"]))
    if step is not None:
        lo, hi = sorted((best["value"], nxt["value"]))
        return [round(lo + i * step, 10) for i in range(1, round((hi - lo) / step))]
    mid = (best["value"] + nxt["value"]) / 2
    return [] if abs(mid - best["value"]) < 1e-6 else [mid]


def smallest_within(
    model: nn.Module,
    policy_name: str | type[Policy] = "global",
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
    step: float | None = None,
) -> dict:
    """The smallest truncation (fewest params) whose metric stays within ``max_drop``
    percentage points of the uncompressed model's. Metrics are fractions in [0, 1].

    Sweeps ``values`` (default :func:`default_values`), then bisects ``refine`` times between
    the best feasible value and its infeasible neighbour on the smaller-model side; with
    ``step`` (values on a grid, a slider's), it tries instead every multiple of ``step``
    between those two, so the value found stays on the grid. Returns the curve point plus
    ``policy``, ``base_metric``, ``model`` (the truncated model) and ``curve`` (all points).
    """
    if _number("max_drop", max_drop) < 0:
        raise ValueError(f"max_drop: expected >= 0 percentage points, got {max_drop!r}")
    if step is not None and not _number("step", step) > 0:
        raise ValueError(f"step: expected a number > 0, got {step!r}")
    cls = policy_class(policy_name)
    if step is not None and (cls.high - cls.low) / step > MAX_SWEEP_POINTS:  # each a cut
        raise ValueError(
            f"step: expected at most {MAX_SWEEP_POINTS} steps over {cls.name}'s range "
            f"[{cls.low:g}, {cls.high:g}], got {step!r}"
        )
    if not is_int(refine) or refine < 0:
        raise ValueError(f"refine: expected an integer >= 0 (bisection steps), got {refine!r}")
    _check_evaluate(evaluate)
    cache = _cache(model, svd, layers, example_input)
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

    curve = point(cls.sweep() if values is None else values)

    def ok(p):
        return _metric_value(p["metric"], key) >= floor

    for _ in range(refine if step is None else min(1, refine)):
        between = _refinement(curve, ok, step)
        if not between:
            break
        curve += point(between)
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
        chosen = clone_model(cache.model)
    else:  # the curve point already holds the chosen model's cost
        best = min(feasible, key=lambda p: (p["params"], -_metric_value(p["metric"], key)))
        chosen = truncate(
            model,
            make_policy(policy_name, best["value"]),
            form=form,
            svd=cache,
            example_input=example_input,
        )
    curve.sort(key=lambda p: p["params"])
    return {
        **best,
        "policy": cls.name,
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
    if not is_int(max_evals) or max_evals < 0:
        raise ValueError(f"max_evals: expected an integer >= 0, got {max_evals!r}")
    _check_evaluate(evaluate)
    cache = _cache(model, svd, layers, example_input)
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
