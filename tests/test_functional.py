import pytest
import torch
from torch.testing import assert_close

from lorita import functional as Fn


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (5, 5)])
def test_balanced_factors_multiply_back(n, shape):
    w = torch.randn(*shape, dtype=torch.float64)
    factors = Fn.balanced_factors(w, n)
    assert len(factors) == n
    assert_close(Fn.chain_product(factors), w)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_balanced_penalty_identity(n):
    """sum_i ||W_i||_F^2 of the balanced factors equals N * sum sigma^(2/N)."""
    w = torch.randn(7, 5, dtype=torch.float64)
    factors = Fn.balanced_factors(w, n)
    assert_close(Fn.factor_penalty(factors), Fn.balanced_penalty(w, n))


@pytest.mark.parametrize("n", [2, 3])
def test_balanced_is_the_minimum(n):
    """Any other factorisation of the same W pays at least as much weight decay."""
    w = torch.randn(6, 6, dtype=torch.float64)
    factors = Fn.balanced_factors(w, n)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    scale = torch.diag(torch.linspace(0.5, 2.0, 6, dtype=torch.float64))
    # insert (Q scale)(Q scale)^-1 between the first two factors: same product, other norms
    a = q @ scale
    other = [a @ factors[0], factors[1] @ torch.linalg.inv(a)] + factors[2:]
    assert_close(Fn.chain_product(other), w)
    assert Fn.factor_penalty(other) >= Fn.balanced_penalty(w, n) - 1e-9


def test_balanced_factors_wider_inner_pads():
    w = torch.randn(4, 6, dtype=torch.float64)
    factors = Fn.balanced_factors(w, 3, inner=6)
    assert [tuple(f.shape) for f in factors] == [(6, 6), (6, 6), (4, 6)]
    assert_close(Fn.chain_product(factors), w)


def test_schatten_special_cases():
    w = torch.randn(5, 4, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    assert_close(Fn.schatten(w, 2), torch.linalg.norm(w))  # Frobenius
    assert_close(Fn.schatten(w, 1), s.sum())  # nuclear
    n = 3
    assert_close(n * Fn.schatten(w, 2 / n) ** (2 / n), Fn.balanced_penalty(w, n))


def test_low_rank_approx_error_is_eckart_young_tail():
    w = torch.randn(8, 6, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    for r in range(1, 7):
        err = (w - Fn.low_rank_approx(w, r)).pow(2).sum()
        assert_close(err, s[r:].pow(2).sum())


def test_evaluation_order_choice():
    widths = [512, 512, 512, 512]  # square chain: product costs 2*512^3 up front
    assert not Fn.prefer_product(widths, rows=128)
    assert Fn.prefer_product(widths, rows=100_000)
    conv = [27, 16, 16, 16]  # 3x3 conv, small inner: product is cheap, pixels are many
    assert Fn.prefer_product(conv, rows=128 * 28 * 28)


def test_fit_planted_shows_rank_preference():
    r1 = Fn.fit_planted(n_factors=1, steps=600)
    r3 = Fn.fit_planted(n_factors=3, steps=600)
    tail = lambda r: max(r["learned"][3:])  # noqa: E731 - planted rank 3
    assert tail(r3) < 0.1 * tail(r1)
    assert r3["penalty"] == pytest.approx(r3["balanced"], rel=0.05)  # GD finds ~balanced factors
    assert len(r1["true"]) == 24


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_planted_descent_takes_the_steps_autograd_and_sgd_take(n):
    """The planted fit's written-out gradients and momentum: the same factors and losses as
    autograd with torch.optim.SGD(momentum=0.9) on the same loss, step for step."""
    g = torch.Generator().manual_seed(n)
    init = torch.randn(8, 8, generator=g, dtype=torch.float64) / 8
    observed = torch.randn(8, 8, generator=g, dtype=torch.float64) / 3
    ours = [f.clone() for f in Fn.balanced_factors(init, n)]
    history = Fn._descend(ours, observed, 0.3, 40, 0.05)
    theirs = [f.clone().requires_grad_(True) for f in Fn.balanced_factors(init, n)]
    opt, losses = torch.optim.SGD(theirs, lr=0.05, momentum=0.9), []
    for _ in range(40):
        loss = 0.5 * (Fn.chain_product(theirs) - observed).pow(2).sum()
        loss = loss + 0.15 * sum(f.pow(2).sum() for f in theirs)
        losses.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for a, b in zip(ours, theirs, strict=True):
        assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)
    assert history == pytest.approx(losses, rel=1e-10)


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: Fn.balanced_factors(torch.randn(3, 3), 0), "n_factors"),
        (lambda: Fn.schatten(torch.randn(3, 3), 0), "p"),
        (lambda: Fn.low_rank_approx(torch.randn(3, 3), 4), "rank"),
        (lambda: Fn.fit_planted(weight_decay=-1), "weight_decay"),
        (lambda: Fn.chain_product([]), "factors"),
    ],
)
def test_bad_arguments(call, field):
    with pytest.raises(ValueError, match=field):
        call()


@pytest.mark.parametrize(
    "shape", [(300, 1500), (1500, 300), (3, 280, 1200), (64, 64), (200, 900), (400, 900)]
)
def test_svd64_matches_the_full_svd_on_long_narrow_matrices(shape):
    """Wide and tall (the Gram route), batched (grouped convolutions), square and short ones
    (the plain SVD): same singular values, the same matrix back, orthonormal short-side
    singular vectors."""
    from lorita.functional import svd64

    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g) / shape[-1] ** 0.5
    u, s, vh = svd64(w)
    full = torch.linalg.svdvals(w.double())
    assert s.dtype == torch.float64 and s.shape == full.shape
    torch.testing.assert_close(s, full, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close((u * s.unsqueeze(-2)) @ vh, w.double(), rtol=0, atol=1e-12)
    short = u if shape[-2] <= shape[-1] else vh.transpose(-2, -1)
    gram = short.transpose(-2, -1) @ short
    eye = torch.eye(short.shape[-1], dtype=torch.float64).expand_as(gram)
    torch.testing.assert_close(gram, eye, atol=1e-10, rtol=0)


def test_svd64_on_a_rank_deficient_matrix_keeps_it_and_zeroes_the_empty_directions():
    from lorita.functional import svd64

    g = torch.Generator().manual_seed(1)
    w = (torch.randn(300, 7, generator=g) @ torch.randn(7, 1500, generator=g)).double()
    u, s, vh = svd64(w)
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    assert (s[7:] < 1e-6 * s[0]).all()
    torch.testing.assert_close((u * s) @ vh, w, rtol=0, atol=1e-9 * s[0].item())
