"""Glue for the Theory page: the planted-matrix fit and the numbers the page shows."""

from __future__ import annotations

from typing import Any


def fit(n_factors: int, weight_decay: float, rank: int, seed: int, noise: float = 0.3) -> dict:
    """The library's planted fit (lorita.functional.fit_planted) plus the effective rank of
    the learned matrix (lorita.spectra.effective_rank)."""
    import torch

    from lorita.functional import fit_planted
    from lorita.spectra import effective_rank

    res: dict[str, Any] = fit_planted(
        n_factors=n_factors, weight_decay=weight_decay, rank=rank, noise=noise, seed=seed
    )
    res["effective_rank"] = int(effective_rank(torch.tensor(res["learned"])))
    return res
