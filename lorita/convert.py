"""Whole-model passes: compose every Linear/Conv2d (overparameterize), multiply the factors back
(merge_model), and find the layers LoRITa works on. Layer names are those that
``model.named_modules()`` gives the plain model, so a composed model and its merge agree.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from fnmatch import fnmatchcase

from torch import nn

from .layers import LAYER_TYPES, FactorConv2d, FactorLinear, LowRankConv2d, LowRankLinear

__all__ = ["iter_layers", "composed_layers", "overparameterize", "merge_model", "set_module"]

_INNER_CHOICES = (None, "min", "paper")


def iter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every layer with a weight matrix LoRITa can read: Linear,
    Conv2d, composed and low-rank layers (not the pieces inside a composed or low-rank layer)."""
    inside: str | None = None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(module, LAYER_TYPES):
            if name == "":
                raise ValueError("model: expected a container of layers, got a bare layer")
            if isinstance(module, (FactorLinear, FactorConv2d, LowRankLinear, LowRankConv2d)):
                inside = name + "."
            yield name, module


def composed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` for every FactorLinear / FactorConv2d in ``model``."""
    return {n: m for n, m in iter_layers(model) if isinstance(m, (FactorLinear, FactorConv2d))}


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


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


def _inner_for(module: nn.Module, inner) -> int | None:
    if inner in (None, "min"):
        return None
    if inner == "paper":  # the authors' widths: Linear input width, conv output channels
        return module.in_features if isinstance(module, nn.Linear) else module.out_channels
    raise ValueError(f"inner: expected one of None, 'min', 'paper', got {inner!r}")


def overparameterize(
    model: nn.Module,
    n_factors: int = 3,
    *,
    init: str = "balanced",
    skip: Iterable[str] | str = (),
    inner: str | None = None,
    order: str = "auto",
) -> nn.Module:
    """Return a copy of ``model`` with every nn.Linear / nn.Conv2d written as N factors.

    Args:
        model: any module; it is not changed.
        n_factors: N >= 1. N=1 returns a plain copy (the ordinary network).
        init: "balanced" (the copy computes the same function) or "independent" (every factor
            gets PyTorch's default init, as in the paper).
        skip: layer names or shell-style patterns ("head", "blocks.*.fc1") left as they are.
        inner: inner width of the factors: None/"min" for min(in, out), "paper" for the
            authors' (Linear input width, conv output channels).
        order: evaluation order of the composed layers ("auto", "product", "sequential").
    """
    if isinstance(n_factors, bool) or not isinstance(n_factors, int) or n_factors < 1:
        raise ValueError(f"n_factors: expected an integer >= 1, got {n_factors!r}")
    if init not in ("balanced", "independent"):
        raise ValueError(f"init: expected 'balanced' or 'independent', got {init!r}")
    if inner not in _INNER_CHOICES:
        raise ValueError(f"inner: expected one of None, 'min', 'paper', got {inner!r}")
    new = copy.deepcopy(model)
    layers = list(iter_layers(new))
    if not layers:
        raise ValueError("model: it has no nn.Linear or nn.Conv2d layer to compose")
    skip = _check_skip(skip, [n for n, _ in layers])
    for name, module in layers:
        if _matches(name, skip):
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise ValueError(
                f"model: layer {name!r} is already a {type(module).__name__}; merge_model() first"
            )
        if n_factors == 1:
            continue
        kw = {"init": init, "inner": _inner_for(module, inner), "order": order}
        if isinstance(module, nn.Linear):
            new_layer = FactorLinear.from_linear(module, n_factors, **kw)
        else:
            if module.groups != 1:
                raise ValueError(
                    f"model: layer {name!r} is a grouped convolution (groups={module.groups}); "
                    f"composed layers support groups=1 only, add it to skip"
                )
            new_layer = FactorConv2d.from_conv(module, n_factors, **kw)
        new_layer.train(module.training)
        set_module(new, name, new_layer)
    return new


def merge_model(model: nn.Module) -> nn.Module:
    """Return a copy with every composed layer multiplied back into one plain layer and every
    low-rank layer made dense: the original architecture, whose ``state_dict()`` loads with
    ``strict=True`` into the un-composed model."""
    new = copy.deepcopy(model)
    for name, module in list(iter_layers(new)):
        if isinstance(module, (FactorLinear, FactorConv2d)):
            plain = module.merge()
        elif isinstance(module, (LowRankLinear, LowRankConv2d)):
            plain = module.to_dense()
        else:
            continue
        plain.train(module.training)
        set_module(new, name, plain)
    return new
