"""Pure tensor maths behind LoRITa: chain products, evaluation order, balanced factors, SVD
truncation, Schatten norms, and a tiny in-process fit used to teach the idea.

Convention: a chain of factors is listed in the order it is *applied* to an input,
``factors = [W_1, W_2, ..., W_N]``, and its product is ``W = W_N @ ... @ W_2 @ W_1``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "chain_product",
    "chain_shapes",
    "sequential_flops",
    "product_flops",
    "prefer_product",
    "balanced_factors",
    "at_rounding_level",
    "svd64",
    "schatten",
    "factor_penalty",
    "balanced_penalty",
    "truncate_svd",
    "low_rank_approx",
    "fit_planted",
]


def chain_product(factors: list[Tensor]) -> Tensor:
    """Return ``W_N @ ... @ W_1`` for ``factors = [W_1, ..., W_N]`` (2-D tensors)."""
    if not factors:
        raise ValueError("factors: expected at least one matrix, got an empty list")
    w = factors[0]
    for f in factors[1:]:
        w = f @ w
    return w


def chain_shapes(factors: list[Tensor]) -> list[int]:
    """Widths along the chain: ``[d_in, d_1, ..., d_out]``."""
    return [factors[0].shape[1]] + [f.shape[0] for f in factors]


def sequential_flops(widths: list[int], rows: int) -> int:
    """Multiply-adds to push ``rows`` vectors through the chain one factor at a time."""
    return rows * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def product_flops(widths: list[int], rows: int) -> int:
    """Multiply-adds to form the product first (right to left), then apply it once."""
    d_in = widths[0]
    form = sum(widths[i] * widths[i + 1] * d_in for i in range(1, len(widths) - 1))
    return form + rows * d_in * widths[-1]


def prefer_product(widths: list[int], rows: int) -> bool:
    """True when forming the merged weight first is cheaper than applying factors in turn.

    Forward and backward costs scale the same way for both orders (each matmul has two
    matmuls in its backward), so comparing forward multiply-adds decides.
    """
    return product_flops(widths, rows) <= sequential_flops(widths, rows)


#: A matrix whose long side is at least GRAM_RATIO times its short side, and whose short side
#: is at least GRAM_MIN, is decomposed through its small Gram matrix (see :func:`svd64`).
GRAM_RATIO, GRAM_MIN = 4, 256


def svd64(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD in float64 of ``w`` (..., m, k): U (..., m, p), S (..., p) descending and
    Vh (..., p, k), with p = min(m, k).

    A long, narrow matrix (a 3x3 convolution's C_out x 9 C_in, a classifier's 4096 x 25088)
    goes through the eigendecomposition of its p x p Gram matrix, 5-7x faster than the full
    SVD (2048 x 12544: 4.4 s against 30 s): the short side's singular vectors come out orthonormal and complete, so
    U diag(S) Vh reproduces ``w`` to float64 rounding; a singular value below about 1e-6 of
    the largest loses relative accuracy (in a float32 weight it is rounding noise anyway), and
    one that rounds to zero gets a zero singular vector on the long side.
    """
    w = w.double()
    m, k = w.shape[-2:]
    short, long = min(m, k), max(m, k)
    if short < GRAM_MIN or long < GRAM_RATIO * short:
        return torch.linalg.svd(w, full_matrices=False)
    if m > k:  # tall: decompose the transpose (wide) and swap the sides back
        u_t, s, vh_t = svd64(w.transpose(-2, -1))
        return vh_t.transpose(-2, -1), s, u_t.transpose(-2, -1)
    ev, u = torch.linalg.eigh(w @ w.transpose(-2, -1))  # ascending
    ev, u = ev.flip(-1), u.flip(-1)
    s = ev.clamp_min(0).sqrt()
    scaled = u.transpose(-2, -1) @ w  # diag(S) Vh
    nonzero = (s > 0).unsqueeze(-1)
    vh = torch.where(nonzero, scaled / torch.where(nonzero, s.unsqueeze(-1), 1.0), 0.0)
    return u, s, vh


def at_rounding_level(s: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """Which singular values ``s`` (of a matrix whose larger side is ``size``, held in
    ``dtype``) are zero up to rounding: at most size x dtype's epsilon x the largest, the
    numerical rank's rule (a weight cut to rank r keeps its dropped values near 1e-8 in
    float32, not 0)."""
    return s <= size * torch.finfo(dtype).eps * s.max()


def balanced_factors(w: Tensor, n: int, inner: int | None = None) -> list[Tensor]:
    """Split ``w`` (m x k) into ``n`` factors whose product is ``w`` and whose Frobenius norms
    are balanced: ``W_1 = S^(1/n) V^T``, middle factors ``S^(1/n)``, ``W_n = U S^(1/n)``.

    This factorisation minimises ``sum_i ||W_i||_F^2`` over all factorisations of ``w``, and the
    minimum is ``n * sum_j sigma_j^(2/n)`` (see :func:`balanced_penalty`).

    Args:
        w: the matrix to split, shape (m, k).
        n: number of factors, >= 1.
        inner: width of the inner dimensions; default ``min(m, k)``. Must be >= rank(w) for
            the product to equal ``w``; extra width beyond ``min(m, k)`` is padded with zeros.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n_factors: expected an integer >= 1, got {n!r}")
    if w.dim() != 2:
        raise ValueError(f"w: expected a 2-D matrix, got shape {tuple(w.shape)}")
    if n == 1:
        return [w.clone()]
    m, k = w.shape
    full = min(m, k)
    r = full if inner is None else int(inner)
    if r < 1:
        raise ValueError(f"inner: expected a width >= 1, got {inner!r}")
    u, s, vh = svd64(w)  # (m, p), (p,), (p, k)
    if r < full:  # truncating: only exact when rank(w) <= r
        u, s, vh = u[:, :r], s[:r], vh[:r]
    root = s.pow(1.0 / n)
    first = root[:, None] * vh  # (p, k)
    last = u * root[None, :]  # (m, p)
    mid = torch.diag(root)  # (p, p)
    p = s.shape[0]
    if r > p:  # zero-pad to the requested inner width
        first = torch.cat([first, first.new_zeros(r - p, k)], 0)
        last = torch.cat([last, last.new_zeros(m, r - p)], 1)
        mid = torch.block_diag(mid, mid.new_zeros(r - p, r - p))
    out = [first] + [mid.clone() for _ in range(n - 2)] + [last]
    return [f.to(w.dtype).contiguous() for f in out]


def schatten(w: Tensor, p: float) -> Tensor:
    """Schatten p-(quasi-)norm ``(sum_j sigma_j^p)^(1/p)`` of a matrix (p > 0).

    ``schatten(W, 2/N) ** (2/N) * N`` is the penalty that weight decay on N balanced factors
    places on W: p = 2 is Frobenius (N=1), p = 1 nuclear (N=2), p < 1 a quasi-norm (N>=3).
    """
    if not p > 0:
        raise ValueError(f"p: expected p > 0, got {p!r}")
    s = torch.linalg.svdvals(w.double())
    return s.pow(p).sum().pow(1.0 / p).to(w.dtype)


def factor_penalty(factors: list[Tensor]) -> Tensor:
    """``sum_i ||W_i||_F^2``: what ordinary weight decay sees on a chain of factors."""
    return sum(f.double().pow(2).sum() for f in factors)


def balanced_penalty(w: Tensor, n: int) -> Tensor:
    """``n * sum_j sigma_j(w)^(2/n)``: the smallest factor penalty any n-factor split of w has."""
    s = torch.linalg.svdvals(w.double())
    return n * s.pow(2.0 / n).sum()


def truncate_svd(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the top ``rank`` singular triplets of a thin SVD."""
    full = s.shape[0]
    if not 1 <= rank <= full:
        raise ValueError(f"rank: expected 1 <= rank <= {full}, got {rank!r}")
    return u[:, :rank], s[:rank], vh[:rank]


def low_rank_approx(w: Tensor, rank: int) -> Tensor:
    """Best rank-``rank`` approximation of ``w`` in Frobenius norm (Eckart-Young)."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    u, s, vh = truncate_svd(u, s, vh, rank)
    return (u * s) @ vh


def _descend(
    factors: list[Tensor], observed: Tensor, weight_decay: float, steps: int, lr: float
) -> list[float]:
    """Full-batch gradient descent with momentum 0.9 (``torch.optim.SGD``'s rule) on
    ``0.5 * ||W_N...W_1 - Y||^2 + 0.5 * weight_decay * sum_i ||W_i||^2``; ``factors`` (CPU
    tensors) are updated in place.

    The gradients are written out rather than taken by autograd: for ``W = S_i W_i P_i``
    (``P_i = W_{i-1}...W_1``, ``S_i = W_N...W_{i+1}``) the gradient of ``W_i`` is
    ``S_i^T (W - Y) P_i^T + weight_decay * W_i``. The same numbers (to rounding), many times
    faster on these small matrices, on NumPy arrays that share the tensors' memory: the
    Theory page fits one per slider move. Returns the loss every ``steps // 100`` steps and at
    the last."""
    mats, target = [f.numpy() for f in factors], observed.numpy()
    n, buffers, history = len(mats), [None] * len(mats), []
    every = max(1, steps // 100)
    with np.errstate(all="ignore"):  # a diverged fit (a large lr) turns to inf/NaN quietly
        for step in range(steps):
            prefixes = [mats[0]]  # prefixes[i] = W_{i+1}...W_1
            for m in mats[1:]:
                prefixes.append(m @ prefixes[-1])
            residual = prefixes[-1] - target
            if step % every == 0 or step == steps - 1:
                decay = sum(float((m * m).sum()) for m in mats)
                history.append(
                    0.5 * float((residual * residual).sum()) + 0.5 * weight_decay * decay
                )
            grads, back = [None] * n, residual  # back = S_i^T (W - Y), from the last factor
            for i in range(n - 1, -1, -1):
                grads[i] = back if i == 0 else back @ prefixes[i - 1].T
                if i:
                    back = mats[i].T @ back
            for i, (m, g) in enumerate(zip(mats, grads, strict=True)):
                g = g + weight_decay * m
                if buffers[i] is None:
                    buffers[i] = g
                else:
                    buffers[i] *= 0.9
                    buffers[i] += g
                m -= lr * buffers[i]
    return history


def fit_planted(
    *,
    size: int = 24,
    rank: int = 3,
    n_factors: int = 3,
    weight_decay: float = 0.2,
    noise: float = 0.3,
    steps: int = 1500,
    lr: float = 0.05,
    seed: int = 0,
) -> dict:
    """Fit a noisy planted low-rank matrix by a product of ``n_factors`` with weight decay.

    Minimises ``0.5 * ||W_N...W_1 - Y||_F^2 + 0.5 * weight_decay * sum_i ||W_i||_F^2`` with
    full-batch gradient descent, where ``Y = M + noise * G / sqrt(size)``, M has rank ``rank``
    and G is Gaussian. With N=1 the answer is ``Y / (1 + weight_decay)``: every singular value
    shrinks by the same factor and the noise stays (no rank preference). With N=2 small
    singular values are soft-thresholded to zero; N>=3 cuts them harder still.

    Returns a dict with the true, observed and learned spectra (descending, lists of floats),
    ``penalty`` = sum_i ||W_i||^2 of the learned factors, ``balanced`` = N * sum sigma^(2/N) of
    their product, ``residual`` = ||W - M||_F / ||M||_F, and ``loss_history``.
    """
    if not isinstance(n_factors, int) or n_factors < 1:
        raise ValueError(f"n_factors: expected an integer >= 1, got {n_factors!r}")
    if not 1 <= rank <= size:
        raise ValueError(f"rank: expected 1 <= rank <= size ({size}), got {rank!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay: expected >= 0, got {weight_decay!r}")
    if not lr > 0:
        raise ValueError(f"lr: expected > 0, got {lr!r}")
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(size, rank, generator=g, dtype=torch.float64)
    b = torch.randn(rank, size, generator=g, dtype=torch.float64)
    target = a @ b / math.sqrt(rank)  # (size, size), singular values ~ sqrt(size)
    target = target * (3.0 / torch.linalg.svdvals(target)[0])  # top singular value 3
    observed = target + noise * torch.randn(
        size, size, generator=g, dtype=torch.float64
    ) / math.sqrt(size)
    # Start from a small balanced split of a random matrix: all factors the same scale.
    init = 0.3 * torch.randn(size, size, generator=g, dtype=torch.float64) / math.sqrt(size)
    factors = [f.clone() for f in balanced_factors(init, n_factors)]
    history = _descend(factors, observed, weight_decay, steps, lr)
    with torch.no_grad():
        w = chain_product(factors)
        return {
            "true": torch.linalg.svdvals(target).tolist(),
            "observed": torch.linalg.svdvals(observed).tolist(),
            "learned": torch.linalg.svdvals(w).tolist(),
            "penalty": float(factor_penalty(factors)),
            "balanced": float(balanced_penalty(w, n_factors)),
            "residual": float((w - target).norm() / target.norm()),
            "loss_history": history,
        }
