"""Glue for the Theory page: the planted-matrix fit and the numbers the page shows.

The fit (1500 small gradient steps) runs in one worker process, not in the server: a long
stretch of tiny array calls in the server's own process competes with every session's script
and the server's event loop for the interpreter lock, and was many times slower there than on
its own. Results come back as plain lists and numbers, kept per setting for every session
(:func:`fit`). The server starts the worker and fits the page's default setting in the
background when it starts (:func:`prewarm`), so the first visitor does not wait for a fresh
interpreter to import torch.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import threading
import types
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

# The page's starting setting: N, λ, true rank, seed (the sliders read these).
DEFAULTS = {"n_factors": 3, "weight_decay": 0.2, "rank": 3, "seed": 0}
_KEPT = 64  # settings kept in memory (each a few kB)
# The two sides of Σ‖Wᵢ‖² ≥ N·Σσ^(2/N) count as equal within this relative difference (a
# converged fit is within 1e-5 at every slider setting; λ = 0 leaves gaps of 10 % and more).
EQUAL_RTOL = 1e-3
# The learned matrix counts as zero when its largest singular value is below this fraction of
# the observed matrix's.
ZERO_RTOL = 1e-6


class _Worker:
    """One lazily started worker process (spawned: no copy of the server's threads), started
    again if it dies (killed for memory, say): one fit is retried once on a fresh worker."""

    pool: ProcessPoolExecutor | None = None
    lock = threading.Lock()

    @classmethod
    def get(cls) -> ProcessPoolExecutor:
        with cls.lock:
            if cls.pool is None:
                ctx = multiprocessing.get_context("spawn")
                cls.pool = ProcessPoolExecutor(
                    max_workers=1, mp_context=ctx, initializer=_one_thread
                )
            return cls.pool

    @classmethod
    def run(cls, fn, *args) -> Any:
        """``fn(*args)`` in the worker; a broken worker is replaced and the call made again."""
        for attempt in (1, 2):
            pool = cls.get()
            try:
                with _plain_main():  # the worker process starts on the first submit
                    future = pool.submit(fn, *args)
                return future.result()
            except BrokenProcessPool:
                with cls.lock:
                    if cls.pool is pool:
                        cls.pool = None
                pool.shutdown(wait=False, cancel_futures=True)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def _plain_main() -> Iterator[None]:
    """While the worker process starts: a ``__main__`` with no file.

    Streamlit leaves the last page script it ran as ``sys.modules["__main__"]``, and a spawned
    process runs its parent's ``__main__`` file first: the worker would run a page script
    without a session (dozens of "missing ScriptRunContext" warnings in the server's terminal,
    and the page's work for nothing). A module without a file makes it run nothing.
    """
    saved = sys.modules.get("__main__")
    plain = types.ModuleType("__main__")
    sys.modules["__main__"] = plain
    try:
        yield
    finally:
        if sys.modules.get("__main__") is plain and saved is not None:
            sys.modules["__main__"] = saved


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
    learned = torch.nan_to_num(torch.tensor(res["learned"]), 0.0, 0.0, 0.0).clamp_min(0)
    res["effective_rank"] = int(effective_rank(learned))  # (a diverged fit: its finite part)
    return res


class _Kept:
    """Fits already made, shared by every session; one lock per setting so that two
    sessions asking for the same one at once wait for a single fit."""

    lock = threading.Lock()
    results: dict[tuple, dict] = {}
    pending: dict[tuple, threading.Lock] = {}


def fit(n_factors: int, weight_decay: float, rank: int, seed: int, noise: float = 0.3) -> dict:
    """:func:`fit_here`, computed in the worker process once per setting (then kept)."""
    key = (int(n_factors), round(float(weight_decay), 6), int(rank), int(seed), float(noise))
    with _Kept.lock:
        if key in _Kept.results:
            return _Kept.results[key]
        one = _Kept.pending.setdefault(key, threading.Lock())
    with one:
        if key not in _Kept.results:
            res = _Worker.run(fit_here, *key)
            with _Kept.lock:
                if len(_Kept.results) >= _KEPT:
                    _Kept.results.pop(next(iter(_Kept.results)))
                _Kept.results[key] = res
                _Kept.pending.pop(key, None)
    return _Kept.results[key]


def prewarm() -> threading.Thread:
    """Start the worker and fit :data:`DEFAULTS` in a background thread."""
    t = threading.Thread(target=_prewarm_fit, name="lorita-theory-prewarm", daemon=True)
    t.start()
    return t


def _prewarm_fit() -> None:
    """:func:`fit` of :data:`DEFAULTS`; ended quietly when the server exits meanwhile (Ctrl-C
    seconds after it started): nothing waits for it, and no traceback ends the terminal."""
    try:
        fit(**DEFAULTS)
    except RuntimeError as exc:  # "cannot schedule new futures after interpreter shutdown"
        if "shutdown" not in str(exc):
            raise


def is_zero(res: dict) -> bool:
    """Whether the learned matrix of a fit is (numerically) zero."""
    top = max(res["observed"], default=0.0)
    return max(res["learned"], default=0.0) <= ZERO_RTOL * top


def identity_note(res: dict, weight_decay: float) -> str:
    """What the page says under Σ‖Wᵢ‖² ≥ N·Σσ^(2/N): whether the two sides are equal, and why."""
    left, right = res["penalty"], res["balanced"]
    gap = left - right
    scale = max(abs(left), abs(right))
    rel = abs(gap) / scale if scale > 0 else 0.0
    head = f"Difference {gap:.2e}"
    if is_zero(res):
        return (
            f"{head}: both sides are zero, because the learned product is zero (see the note "
            "below)."
        )
    if rel <= EQUAL_RTOL:
        return (
            f"{head}: the factors are balanced and the two sides are equal, so the weight "
            "decay on the factors *is* the penalty on the right acting on the product."
        )
    if weight_decay == 0:
        return (
            f"{head} ({rel:.1%} of the left side): without weight decay (λ = 0) nothing pulls "
            "the factors towards balance, so the two sides need not be equal. The right side is "
            "the smallest the left can be over all factorisations of the same product; the fit "
            "keeps whichever factorisation gradient descent reached."
        )
    return (
        f"{head} ({rel:.1%} of the left side): the fit has not converged to balance. At the "
        "optimum of the weight-decayed loss the factors are balanced and the two sides are equal."
    )


def zero_note(res: dict, n_factors: int, weight_decay: float) -> str | None:
    """Why the learned matrix is zero, when it is (None otherwise)."""
    if not is_zero(res):
        return None
    return (
        f"At N = {n_factors}, λ = {weight_decay:g} the weight decay is strong enough to drive "
        "every singular value to zero: near zero the penalty N·Σσ^(2/N) outweighs what the fit "
        "gains, so from its small starting factors the fit shrinks them all and settles at "
        "W = 0 (effective rank 0, relative error 1). Try a smaller λ."
    )
