"""Whole-model passes: compose every layer LoRITa can compose (overparameterize), multiply the
factors back (merge_model). Which module becomes what is decided by the table in
:mod:`lorita.kinds`. Layer names are those that ``model.named_modules()`` gives the plain
model, so a composed model and its merge agree.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from fnmatch import fnmatchcase

from torch import Tensor, nn

from .kinds import INITS, INNER_CHOICES, ORDERS, LayerEntry, detect_direct, layer_table
from .kinds import iter_layers as iter_layers
from .kinds import set_module as set_module
from .layers import FactorConv2d, FactorLinear, FactorMultiheadAttention

__all__ = [
    "iter_layers",
    "composed_layers",
    "overparameterize",
    "merge_model",
    "set_module",
    "composition_summary",
]

_COMPOSED = (FactorLinear, FactorConv2d, FactorMultiheadAttention)


def composed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` for every composed layer (FactorLinear, FactorConv2d, attention)."""
    return {n: m for n, m in iter_layers(model) if isinstance(m, _COMPOSED)}


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


def _check_skip(skip, names: list[str]) -> tuple[str, ...]:
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    for p in skip:
        if not isinstance(p, str) or not any(_matches(n, (p,)) for n in names):
            raise ValueError(
                f"skip: pattern {p!r} matches no layer; layers are: {', '.join(names[:12])}"
                + (" ..." if len(names) > 12 else "")
            )
    return skip


def _check_options(n_factors, init, inner, order) -> None:
    if isinstance(n_factors, bool) or not isinstance(n_factors, int) or n_factors < 1:
        raise ValueError(f"n_factors: expected an integer >= 1, got {n_factors!r}")
    if init not in INITS:
        raise ValueError(f"init: expected one of {', '.join(INITS)}, got {init!r}")
    if inner not in INNER_CHOICES:
        raise ValueError(f"inner: expected one of None, 'min', 'paper', got {inner!r}")
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {', '.join(ORDERS)}, got {order!r}")


def _why_left(e: LayerEntry, skip: tuple[str, ...], n_factors: int) -> str | None:
    if not e.kind.composable:
        return e.kind.why_left
    if _matches(e.name, skip):
        return "skipped (skip=...)"
    if e.shared:
        return "its weight is shared with another module (tied weights)"
    if n_factors == 1:
        return "n_factors=1: the ordinary network"
    return None


def overparameterize(
    model: nn.Module,
    n_factors: int = 3,
    *,
    init: str = "balanced",
    skip: Iterable[str] | str = (),
    inner: str | None = None,
    order: str = "auto",
    example_input: Tensor | None = None,
) -> nn.Module:
    """Return a copy of ``model`` with every layer that has a kind written as N factors.

    Linear, Conv2d (grouped too), MultiheadAttention's packed q, k, v and layers whose weight
    is read directly are composed; depthwise convolutions and tied weights are left as they are.
    The copy carries ``lorita_summary`` (see :func:`composition_summary`) and
    ``lorita_direct`` (the layers whose weight the model reads itself: their cut stays dense).

    Args:
        model: any module; it is not changed.
        n_factors: N >= 1. N=1 returns a plain copy (the ordinary network).
        init: "balanced" (the copy computes the same function) or "independent" (every factor
            gets PyTorch's default init, as in the paper).
        skip: layer names or shell-style patterns ("head", "blocks.*.fc1") left as they are.
        inner: inner width of the factors: None/"min" for min(in, out), "paper" for the
            authors' (Linear input width, conv output channels).
        order: evaluation order of the composed layers ("auto", "product", "sequential").
        example_input: one batch the model accepts, used to trace which weights are read
            directly; default a small input guessed from the model.
    """
    _check_options(n_factors, init, inner, order)
    new = copy.deepcopy(model)
    table = layer_table(new, direct=())
    if not any(e.kind.composable for e in table):
        raise ValueError("model: it has no nn.Linear or nn.Conv2d layer to compose")
    skip = _check_skip(skip, [e.name for e in table])
    for e in table:
        if e.kind.composable and isinstance(e.module, _COMPOSED):
            raise ValueError(
                f"model: layer {e.name!r} is already a {type(e.module).__name__}; "
                "merge_model() first"
            )
    direct, how = detect_direct(new, example_input)
    new.lorita_direct = tuple(direct)
    summary = []
    for e in layer_table(new):
        why = _why_left(e, skip, n_factors)
        row = {"name": e.name, "kind": e.kind.name, "type": type(e.module).__name__}
        if why is not None:
            summary.append({**row, "action": "left", "why": why})
            continue
        width = e.kind.paper_inner(e.module) if inner == "paper" else None
        layer = e.kind.compose(e.module, n_factors, init=init, inner=width, order=order)
        layer.train(e.module.training)
        set_module(new, e.name, layer)
        summary.append({**row, "action": "composed", "why": ""})
    new.lorita_summary = {"n_factors": n_factors, "direct_reads": how, "layers": summary}
    return new


def composition_summary(model: nn.Module) -> dict:
    """What :func:`overparameterize` did: ``{"n_factors", "direct_reads", "layers": [{"name",
    "kind", "type", "action": "composed" | "left", "why"}]}`` (never printed)."""
    summary = getattr(model, "lorita_summary", None)
    if summary is None:
        raise ValueError("model: it was not made by overparameterize (no lorita_summary)")
    return summary


def merge_model(model: nn.Module) -> nn.Module:
    """Return a copy with every composed layer multiplied back into one plain layer and every
    low-rank layer made dense: the original architecture, whose ``state_dict()`` loads with
    ``strict=True`` into the un-composed model."""
    new = copy.deepcopy(model)
    for e in layer_table(new):
        plain = e.kind.merge(e.module)
        if plain is e.module:
            continue
        plain.train(e.module.training)
        set_module(new, e.name, plain)
    return new
