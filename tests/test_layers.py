"""Every composed / low-rank layer against the plain layer it replaces."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lorita import (
    FactorConv2d,
    FactorLinear,
    LowRankConv2d,
    LowRankLinear,
    LowRankMultiheadAttention,
)
from lorita.layers import FactorMultiheadAttention

CONVS = [
    dict(in_channels=3, out_channels=8, kernel_size=3),
    dict(in_channels=3, out_channels=5, kernel_size=(3, 1), stride=2, padding=(1, 0)),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding="same", dilation=2, bias=False),
    dict(in_channels=2, out_channels=4, kernel_size=3, padding="valid"),
    dict(in_channels=2, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(
        in_channels=2, out_channels=4, kernel_size=(2, 3), padding=(1, 2), padding_mode="circular"
    ),
    dict(in_channels=2, out_channels=4, kernel_size=3, padding="same", padding_mode="replicate"),
]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_balanced_matches(n, bias, device):
    fc = nn.Linear(12, 7, bias=bias, device=device)
    layer = FactorLinear.from_linear(fc, n)
    x = torch.randn(5, 12, device=device)
    assert_close(layer(x), fc(x), rtol=1e-5, atol=1e-5)
    assert_close(layer.merge()(x), layer(x), rtol=1e-5, atol=1e-5)
    assert len(layer.factors) == n


@pytest.mark.parametrize("kw", CONVS)
@pytest.mark.parametrize("n", [1, 3])
def test_from_conv_balanced_matches(kw, n):
    conv = nn.Conv2d(**kw)
    x = torch.randn(2, kw["in_channels"], 9, 10)
    for order in ("auto", "product", "sequential"):
        layer = FactorConv2d.from_conv(conv, n, order=order)
        assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
        merged = layer.merge()
        assert isinstance(merged, nn.Conv2d) and merged.padding_mode == conv.padding_mode
        assert_close(merged(x), conv(x), rtol=1e-5, atol=1e-5)


def test_fresh_balanced_layer_starts_like_dense_init():
    """A fresh balanced FactorLinear has the spectrum scale of nn.Linear's default init."""
    torch.manual_seed(1)
    a = FactorLinear(64, 64, n_factors=3)
    torch.manual_seed(1)
    b = nn.Linear(64, 64)
    assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)
    assert_close(a.bias, b.bias)
    ind = FactorLinear(64, 64, n_factors=3, init="independent")
    assert ind.weight.norm() < 0.5 * b.weight.norm()  # independent init starts small


@pytest.mark.parametrize(
    "cls_args",
    [
        (FactorLinear, (16, 9), lambda: torch.randn(4, 16)),
        (FactorConv2d, (3, 6, 3), lambda: torch.randn(2, 3, 7, 7)),
    ],
)
def test_evaluation_orders_agree_in_value_and_gradient(cls_args):
    cls, args, make_x = cls_args
    torch.manual_seed(0)
    a = cls(*args, n_factors=3, order="product")
    b = cls(*args, n_factors=3, order="sequential")
    b.load_state_dict(a.state_dict())
    x = make_x()
    ya, yb = a(x), b(x)
    assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5)


def test_auto_order_picks_from_shapes():
    layer = FactorLinear(512, 512, n_factors=3)
    assert not layer.use_product(torch.randn(128, 512))  # sequential: 3 thin matmuls
    assert layer.use_product(torch.randn(20_000, 512))
    conv = FactorConv2d(16, 32, 3, padding=1, n_factors=3)
    assert conv.use_product(torch.randn(128, 16, 28, 28))


def test_paper_inner_width():
    layer = FactorLinear(10, 4, n_factors=3, inner=10)
    assert [tuple(f.shape) for f in layer.factors] == [(10, 10), (10, 10), (4, 10)]
    fc = nn.Linear(10, 4)
    assert_close(
        FactorLinear.from_linear(fc, 3, inner=10)(torch.ones(2, 10)), fc(torch.ones(2, 10))
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_device_and_dtype_preserved(dtype, device):
    fc = nn.Linear(6, 4, device=device, dtype=dtype)
    layer = FactorLinear.from_linear(fc, 3)
    assert all(p.dtype == dtype and p.device.type == device.type for p in layer.parameters())
    merged = layer.merge()
    assert merged.weight.dtype == dtype and merged.weight.device.type == device.type
    conv = nn.Conv2d(2, 3, 3, dtype=dtype, device=device)
    fconv = FactorConv2d.from_conv(conv, 2)
    assert fconv.merge().weight.dtype == dtype
    low = LowRankLinear.from_linear(fc, 2)
    assert low.first.weight.dtype == dtype


def test_low_rank_linear_full_rank_is_identity_and_counts_params():
    fc = nn.Linear(10, 6)
    x = torch.randn(3, 10)
    assert_close(LowRankLinear.from_linear(fc, 6)(x), fc(x), rtol=1e-5, atol=1e-5)
    r = 2
    low = LowRankLinear.from_linear(fc, r)
    assert sum(p.numel() for p in low.parameters()) == r * (10 + 6) + 6
    assert_close(low.to_dense()(x), low(x), rtol=1e-5, atol=1e-5)


def test_low_rank_error_is_eckart_young_tail():
    fc = nn.Linear(9, 7)
    s = torch.linalg.svdvals(fc.weight.detach().double())
    for r in range(1, 7):
        low = LowRankLinear.from_linear(fc, r)
        err = (low.weight.double() - fc.weight.double()).pow(2).sum()
        assert_close(err, s[r:].pow(2).sum(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kw", CONVS)
def test_low_rank_conv(kw):
    conv = nn.Conv2d(**kw)
    x = torch.randn(2, kw["in_channels"], 9, 10)
    full = min(conv.out_channels, conv.weight[0].numel())
    assert_close(LowRankConv2d.from_conv(conv, full)(x), conv(x), rtol=1e-4, atol=1e-5)
    low = LowRankConv2d.from_conv(conv, 1)
    assert low(x).shape == conv(x).shape
    assert sum(p.numel() for p in low.parameters()) == conv.weight[
        0
    ].numel() + conv.out_channels + (conv.out_channels if conv.bias is not None else 0)
    assert_close(low.to_dense()(x), low(x), rtol=1e-4, atol=1e-5)


def test_extra_repr_shows_only_non_defaults():
    assert "init" not in repr(FactorLinear(4, 3))
    assert "order='sequential'" in repr(FactorLinear(4, 3, order="sequential"))
    assert "bias=False" in repr(FactorConv2d(2, 3, 3, bias=False))


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: FactorLinear(4, 3, n_factors=0), "n_factors"),
        (lambda: FactorLinear(4, 3, n_factors=1.5), "n_factors"),
        (lambda: FactorLinear(4, 3, init="orthogonal"), "init"),
        (lambda: FactorLinear(4, 3, order="fast"), "order"),
        (lambda: FactorLinear(4, 3, inner=0), "inner"),
        (lambda: FactorLinear.from_linear(nn.Conv2d(1, 1, 1)), "linear"),
        (lambda: FactorConv2d(4, 6, 3, groups=4), "groups"),
        (lambda: LowRankConv2d(4, 4, 3, 1, groups=3), "groups"),
        (lambda: FactorConv2d.from_conv(nn.Linear(2, 2)), "conv"),
        (lambda: FactorConv2d(2, 2, 3, padding="full"), "padding"),
        (lambda: FactorConv2d(2, 2, 3, padding_mode="mirror"), "padding_mode"),
        (lambda: LowRankLinear(4, 3, 0), "rank"),
        (lambda: LowRankLinear(4, 3, 4), "rank"),
        (lambda: LowRankConv2d(2, 3, 1, rank=3), "rank"),
    ],
)
def test_bad_arguments(call, field):
    with pytest.raises(ValueError, match=field):
        call()


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("order", ["auto", "product", "sequential"])
def test_grouped_conv_composes_per_group(n, order):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 9, 3, padding=1, stride=2, groups=3)
    x = torch.randn(2, 6, 7, 8)
    layer = FactorConv2d.from_conv(conv, n, order=order)
    assert layer.groups == 3 and layer.widths == [2 * 9] + [3] * (n - 1) + [3]
    assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
    assert_close(layer.weight, conv.weight, rtol=1e-5, atol=1e-6)
    merged = layer.merge()
    assert isinstance(merged, nn.Conv2d) and merged.groups == 3
    assert_close(merged(x), conv(x), rtol=1e-5, atol=1e-5)
    if n > 1:  # every factor after the first is a grouped 1x1 conv: g blocks of (inner, inner)
        assert layer.factors[1].shape == (3 * layer.inner, layer.inner)


def test_grouped_low_rank_conv_is_per_group_eckart_young():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    x = torch.randn(2, 4, 5, 5)
    w = conv.weight.detach().reshape(2, 3, -1).double()
    s = torch.linalg.svdvals(w)  # (2, 3)
    full = LowRankConv2d.from_conv(conv, 3)
    assert_close(full(x), conv(x), rtol=1e-4, atol=1e-5)
    low = LowRankConv2d.from_conv(conv, 1)
    assert low.first.groups == 2 and low.second.groups == 2
    err = (low.weight.double() - conv.weight.double()).pow(2).sum()
    assert_close(err, s[:, 1:].pow(2).sum(), rtol=1e-4, atol=1e-7)
    assert_close(low.to_dense()(x), low(x), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in low.parameters()) == 2 * (2 * 9) + 6 * 1 + 6


@pytest.mark.parametrize("n", [1, 3])
def test_factor_multihead_attention_matches_and_merges(n):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(3, 5, 8)
    comp = FactorMultiheadAttention.from_mha(mha, n).eval()
    assert "in_proj_weight" not in dict(comp.named_parameters())
    assert len(comp.in_proj) == 3 and comp.in_proj[0].n_factors == n
    want = mha(x, x, x)[0]
    assert_close(comp(x, x, x)[0], want, rtol=1e-5, atol=1e-5)
    merged = comp.merge()
    assert type(merged) is nn.MultiheadAttention
    merged.load_state_dict(mha.state_dict(), strict=True)  # same keys as the plain layer
    comp.train()
    comp(x, x, x)[0].square().sum().backward()
    assert all(p.grad is not None for p in comp.in_proj.parameters())


@pytest.mark.parametrize("n", [2, 3])
def test_zero_weight_composes_to_factors_that_can_learn(n):
    """A zero-initialised layer (torchvision's ViT head) keeps computing 0 but trains."""
    fc = nn.Linear(6, 4)
    nn.init.zeros_(fc.weight)
    layer = FactorLinear.from_linear(fc, n)
    x = torch.randn(5, 6)
    assert_close(layer(x), fc(x))
    layer(x).square().sum().backward()
    assert layer.factors[-1].grad.abs().sum() > 0
    conv = nn.Conv2d(2, 4, 3)
    nn.init.zeros_(conv.weight)
    fconv = FactorConv2d.from_conv(conv, n)
    y = torch.randn(1, 2, 5, 5)
    assert_close(fconv(y), conv(y))
    fconv(y).square().sum().backward()
    assert fconv.factors[-1].grad.abs().sum() > 0


def test_a_weight_cut_before_regains_rank_when_composed_again():
    """A float32 weight cut to rank 1 (its other singular values at rounding level, ~1e-8, not
    0), composed again as the README's retrain path does: the composed layer learns the
    directions back, as the plain layer does, instead of staying rank 1."""
    torch.manual_seed(0)
    fc = nn.Linear(16, 4)
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(fc.weight, full_matrices=False)
        fc.weight.copy_(s[0] * torch.outer(u[:, 0], vh[0]))
    assert 0 < torch.linalg.svdvals(fc.weight)[1] < 1e-6  # rounding, not zero
    layer = FactorLinear.from_linear(fc, 3)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    assert_close(layer(x), fc(x))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(layer(x), y).backward()
        opt.step()
    assert torch.linalg.svdvals(layer.weight.detach())[1] > 1e-2


# --------------------------------------------------------------------------- thin attention


def _mha_call_args(batch_first: bool, batched: bool, masks: str, g: torch.Generator):
    e, b, lq, lk = 16, 3, 5, 7
    lead = (b,) if batched else ()
    shape = (lambda n: (*lead, n, e)) if batch_first or not batched else (lambda n: (n, b, e))
    q, k, v = (torch.randn(*shape(n), generator=g) for n in (lq, lk, lk))
    kw = {}
    if "attn" in masks:
        kw["attn_mask"] = torch.rand(lq, lk, generator=g) < 0.3
    if "float" in masks:
        kw["attn_mask"] = torch.randn(lq, lk, generator=g)
    if "per-head" in masks:
        kw["attn_mask"] = (
            torch.rand(b if batched else 1, 4, lq, lk, generator=g).flatten(0, 1) < 0.3
        )
    if "padding" in masks:
        kw["key_padding_mask"] = torch.rand(*lead, lk, generator=g) < 0.3
    return (q, k, v), kw


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("masks", ["", "attn", "float", "per-head+padding", "attn+padding"])
@pytest.mark.parametrize("need_weights, average", [(False, True), (True, True), (True, False)])
def test_thin_attention_at_full_rank_is_the_attention_it_replaces(
    batch_first, batched, masks, need_weights, average
):
    g = torch.Generator().manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    thin = LowRankMultiheadAttention.from_mha(mha, 16).eval()
    args, kw = _mha_call_args(batch_first, batched, masks, g)
    kw.update(need_weights=need_weights, average_attn_weights=average)
    with torch.no_grad():
        want, got = mha(*args, **kw), thin(*args, **kw)
    for w, o in zip(want, got, strict=True):
        if w is None:
            assert o is None
            continue
        assert o.shape == w.shape
        assert torch.equal(torch.isfinite(o), torch.isfinite(w))  # fully masked rows: NaN alike
        assert_close(o[torch.isfinite(o)], w[torch.isfinite(w)], atol=1e-5, rtol=1e-5)


def test_thin_attention_causal_hint_and_no_bias_and_training_dropout():
    mha = nn.MultiheadAttention(16, 2, bias=False, batch_first=True, dropout=0.5)
    thin = LowRankMultiheadAttention.from_mha(mha, 16)
    x = torch.randn(2, 6, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    mha.eval(), thin.eval()
    with torch.no_grad():
        for need in (True, False):
            kw = {"attn_mask": causal, "is_causal": True, "need_weights": need}
            assert_close(thin(x, x, x, **kw)[0], mha(x, x, x, **kw)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="attn_mask"):
        thin(x, x, x, is_causal=True)
    mha.train(), thin.train()
    torch.manual_seed(3)  # the same dropout mask: outputs and returned weights agree
    want = mha(x, x, x)
    torch.manual_seed(3)
    got = thin(x, x, x)
    for w, o in zip(want, got, strict=True):
        assert_close(o, w, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    a = thin(x, x, x, need_weights=False)[0]
    torch.manual_seed(1)
    b = thin(x, x, x, need_weights=False)[0]
    assert not torch.equal(a, b)  # dropout on the attention weights in training mode
    a.sum().backward()
    assert all(p.grad is not None for p in thin.parameters())


def test_thin_attention_is_the_eckart_young_cut_of_each_projection():
    mha = nn.MultiheadAttention(24, 4)
    thin = LowRankMultiheadAttention.from_mha(mha, 5)
    assert thin.rank == 5 and thin.out_proj is mha.out_proj
    for part, layer in zip(mha.in_proj_weight.detach().chunk(3, 0), thin.in_proj, strict=True):
        s = torch.linalg.svdvals(part.double())
        err = torch.linalg.matrix_norm((layer.weight - part).double())
        assert_close(err, s[5:].norm(), atol=1e-4, rtol=1e-4)
    assert_close(thin.in_proj_bias, mha.in_proj_bias)
    dense = thin.to_dense()
    assert isinstance(dense, nn.MultiheadAttention)
    assert_close(dense.in_proj_weight, thin.in_proj_weight)
    assert thin.layer_spec() == {"kind": "low_rank", "rank": 5}


def test_thin_attention_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="add_bias_kv"):
        LowRankMultiheadAttention.from_mha(nn.MultiheadAttention(8, 2, add_bias_kv=True), 2)
    with pytest.raises(ValueError, match="packed"):
        LowRankMultiheadAttention.from_mha(nn.MultiheadAttention(8, 2, kdim=4, vdim=4), 2)


@pytest.mark.parametrize("side", [1, 2, 4, 5, 8])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_thin_pointwise_pair_runs_as_products_on_small_channels_last_inputs(side, channels_last):
    """A thin 1x1 pair on a channels-last batch of at most 16 pixels an image and 64 in all
    runs as two matrix products over the channels: the same outputs (values and memory format)
    and gradients as its two convolutions, which every other input still runs."""
    from lorita.layers import POINTWISE_MATMUL_PIXELS, POINTWISE_MATMUL_ROWS

    conv = nn.Conv2d(12, 20, 1)
    thin = LowRankConv2d.from_conv(conv, 3)
    x = torch.randn(16, 12, side, side)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    small = side * side <= POINTWISE_MATMUL_PIXELS and 16 * side * side >= POINTWISE_MATMUL_ROWS
    assert thin._as_products(x) == (small and (channels_last or side == 1))
    assert thin._as_products(x) == (channels_last and side in (2, 4))
    got = thin(x)
    ref = thin.second(thin.first(x))
    assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert got.is_contiguous(memory_format=torch.channels_last) == ref.is_contiguous(
        memory_format=torch.channels_last
    )
    g_got = torch.autograd.grad(got.square().sum(), [x, thin.first.weight, thin.second.bias])
    g_ref = torch.autograd.grad(ref.square().sum(), [x, thin.first.weight, thin.second.bias])
    for a, b in zip(g_got, g_ref, strict=True):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_only_a_plain_pointwise_pair_runs_as_products():
    """Stride, padding, groups or a kernel larger than 1x1 keep the two convolutions."""
    x = torch.randn(4, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    plain = LowRankConv2d(8, 8, 1, rank=2)
    assert plain._as_products(x) and not plain._as_products(x[:1])  # (16 pixels in all)
    for other in (
        LowRankConv2d(8, 8, 3, rank=2, padding=1),
        LowRankConv2d(8, 8, 1, rank=2, stride=2),
        LowRankConv2d(8, 8, 1, rank=2, padding=1),
        LowRankConv2d(8, 8, 1, rank=2, groups=2),
    ):
        assert not other._as_products(x)
        assert_close(other(x), other.second(other.first(x)))


def test_a_thin_pair_reading_its_own_parts_is_no_direct_read():
    """Run as products, a thin pair reads its parts' weights itself: tracing a model that holds
    one finds no layer read directly, and a cut model cut again keeps its thin form."""
    import lorita as lt
    from lorita.kinds import find_direct_reads

    net = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.Flatten(),
                        nn.Linear(64, 3)).to(memory_format=torch.channels_last)  # fmt: skip
    x = torch.randn(16, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    cut = lt.truncate(net, lt.Uniform(0.25), example_input=x)
    assert isinstance(cut[2], LowRankConv2d) and cut[2]._as_products(torch.relu(cut[0](x)))
    assert find_direct_reads(cut, x) == []
    again = lt.truncate(cut, lt.Uniform(0.5), example_input=x)
    assert isinstance(again[2], LowRankConv2d)
    assert_close(again(x), again[4](again[3](again[2](again[1](again[0](x))))))
