"""Singular values of every layer's (merged) weight, and the ranks that summarise them."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from . import kinds
from .checks import check_names, is_real
from .convert import check_initialised, iter_layers

__all__ = [
    "layer_matrix",
    "layer_spectra",
    "effective_rank",
    "stable_rank",
    "entropy_rank",
    "energy_rank",
    "rank_summary",
]

#: Default relative threshold for :func:`effective_rank`: singular values below 1% of the
#: largest are counted as gone.
EFFECTIVE_RANK_TOL = 1e-2

#: Default share of the energy ``sum sigma^2`` that :func:`energy_rank` keeps.
ENERGY_KEEP = 0.99


def layer_matrix(module: nn.Module) -> Tensor:
    """The layer's merged weight as a detached matrix: (out, in) for a Linear,
    (C_out, C_in/groups*kh*kw) for a conv. For a layer's matrices one by one (a grouped conv's
    groups, attention's q/k/v) see :func:`lorita.kinds.matrices`."""
    kind = kinds.kind_of(module)  # attention has no .weight: its packed (3E, E) projection
    with torch.no_grad():
        w = module.weight if kind is None else kind.weight(module)
        return w.detach().reshape(w.shape[0], -1)


def _select(model: nn.Module, names: Iterable[str] | None) -> dict[str, nn.Module]:
    check_initialised(model)  # a meta model has no singular values
    layers = dict(iter_layers(model))
    names = check_names(names, "names")
    if names is None:
        return layers
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise ValueError(f"names: unknown layer(s) {unknown}; layers are: {', '.join(layers)}")
    return {n: layers[n] for n in names}


def layer_spectra(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Tensor]:
    """``{layer_name: singular values (descending, float32, CPU)}`` of each merged weight.

    Works for plain, composed and truncated models alike; computed without gradients. A layer
    of several matrices (a grouped conv, attention's q/k/v) gives one spectrum, the root mean
    square over its matrices (:func:`lorita.kinds.pooled_spectrum`), as it is cut at one rank.
    """
    with torch.no_grad():
        return {name: module_spectrum(m, name) for name, m in _select(model, names).items()}


def module_spectrum(module: nn.Module, name: str = "") -> Tensor:
    """One layer's singular values (descending, float32, CPU): the RMS over its matrices."""
    kinds.check_finite(module, name)
    s = torch.linalg.svdvals(kinds.matrices(module).float().cpu())  # (G, k)
    return kinds.pooled_spectrum(s)


def _check_1d(s: Tensor) -> Tensor:
    try:
        s = torch.as_tensor(s, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"s: expected singular values (numbers), got {type(s).__name__}") from None
    if s.dim() != 1 or s.numel() == 0:
        raise ValueError(
            f"s: expected a non-empty 1-D tensor of singular values, got shape {tuple(s.shape)}"
        )
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("s: singular values are finite and >= 0; these hold a NaN, inf or < 0")
    return s


def _unit(s: Tensor) -> Tensor:
    """The checked spectrum divided by its largest value (every rank here is scale-free), so
    that squares and sums of values near float64's range neither overflow nor vanish."""
    s = _check_1d(s)
    top = float(s.max())
    return s / top if top > 0 else s


def effective_rank(s: Tensor, tol: float = EFFECTIVE_RANK_TOL) -> int:
    """Number of singular values above ``tol * sigma_max``."""
    s = _check_1d(s)
    if not is_real(tol) or not 0 < tol < 1:
        raise ValueError(f"tol: expected 0 < tol < 1, got {tol!r}")
    top = float(s.max())
    return int((s > tol * top).sum()) if top > 0 else 0


def stable_rank(s: Tensor) -> float:
    """``sum sigma^2 / sigma_max^2``: a smooth rank that ignores tiny singular values."""
    s = _unit(s)
    return float(s.pow(2).sum()) if s.max() > 0 else 0.0


def entropy_rank(s: Tensor) -> float:
    """``exp(entropy of sigma / sum sigma)`` (Roy & Vetterli's effective rank)."""
    s = _unit(s)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def energy_rank(s: Tensor, keep: float = ENERGY_KEEP) -> int:
    """The smallest rank whose top singular values hold ``keep`` of the energy ``sum sigma^2``.

    This predicts compressibility better than :func:`effective_rank`: cutting a weight to its
    energy rank leaves a relative Frobenius error of at most ``sqrt(1 - keep)`` (10% at 0.99),
    whereas a long tail of values just above ``tol * sigma_max`` keeps the effective rank high
    while holding little of the weight. 0 for an all-zero spectrum.
    """
    s = _unit(s)
    if not is_real(keep) or not 0 < keep <= 1:
        raise ValueError(f"keep: expected 0 < keep <= 1 (energy share), got {keep!r}")
    e = s.pow(2)
    total = float(e.sum())
    if total <= 0:
        return 0
    share = torch.cumsum(e, 0) / total
    return min(len(s), int((share < keep - 1e-12).sum()) + 1)


def rank_summary(spectra: dict[str, Tensor], tol: float = EFFECTIVE_RANK_TOL) -> dict[str, dict]:
    """Per layer: full rank, effective rank, energy rank (99% of sum sigma^2), stable rank and
    entropy rank."""
    if not isinstance(spectra, dict):
        raise ValueError(
            f"spectra: expected a dict {{layer_name: singular values}} (layer_spectra(model)), "
            f"got {type(spectra).__name__}"
        )
    return {
        name: {
            "full": int(_check_1d(s).numel()),  # checked first: a 0-d tensor has no len
            "effective": effective_rank(s, tol),
            "energy": energy_rank(s),
            "stable": stable_rank(s),
            "entropy": entropy_rank(s),
        }
        for name, s in spectra.items()
    }
