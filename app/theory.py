"""Glue for the Theory page: the planted-matrix fit and the numbers the page shows.

The fit (1500 small autograd steps) runs in one worker process, not in the server: a long
stretch of tiny torch calls in the server's own process competes with every session's script
and the server's event loop for the interpreter lock, and was many times slower there than on
its own. Results come back as plain lists and numbers; the page caches them per setting.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any


class _Worker:
    """One lazily started worker process (spawned: no copy of the server's threads)."""

    pool: ProcessPoolExecutor | None = None

    @classmethod
    def get(cls) -> ProcessPoolExecutor:
        if cls.pool is None:
            ctx = multiprocessing.get_context("spawn")
            cls.pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_one_thread)
        return cls.pool


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def fit_here(n_factors: int, weight_decay: float, rank: int, seed: int, noise: float = 0.3) -> dict:
    """The library's planted fit (lorita.functional.fit_planted) plus the effective rank of
    the learned matrix (lorita.spectra.effective_rank), in this process."""
    import torch

    from lorita.functional import fit_planted
    from lorita.spectra import effective_rank

    res: dict[str, Any] = fit_planted(
        n_factors=n_factors, weight_decay=weight_decay, rank=rank, noise=noise, seed=seed
    )
    res["effective_rank"] = int(effective_rank(torch.tensor(res["learned"])))
    return res


def fit(n_factors: int, weight_decay: float, rank: int, seed: int, noise: float = 0.3) -> dict:
    """:func:`fit_here`, computed in the worker process."""
    job = _Worker.get().submit(fit_here, n_factors, weight_decay, rank, seed, noise)
    return job.result()
