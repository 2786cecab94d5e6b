import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import lorita as lt


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)
    ).eval()


def test_full_rank_truncation_is_identity():
    net = lt.overparameterize(mlp(), 3).eval()
    x = torch.randn(7, 20)
    for form in ("low_rank", "dense"):
        for policy in (lt.Uniform(1.0), lt.Global(0.0), lt.Energy(1.0), lt.Ranks({})):
            assert_close(lt.truncate(net, policy, form=form)(x), net(x), rtol=1e-4, atol=1e-5)


def test_rank_r_error_is_eckart_young_tail():
    net = mlp()
    s = torch.linalg.svdvals(net[2].weight.detach().double())
    for form in ("low_rank", "dense"):
        for r in (1, 3, 8):
            small = lt.truncate(net, lt.Ranks({"2": r}), form=form)
            w = lt.spectra.layer_matrix(small.get_submodule("2")).double()
            err = (w - net[2].weight.detach().double()).pow(2).sum()
            assert_close(err, s[r:].pow(2).sum(), rtol=1e-4, atol=1e-6)


def test_low_rank_form_only_where_cheaper_and_dense_form_keeps_architecture():
    net = mlp()
    small = lt.truncate(net, lt.Ranks({"0": 4, "2": 10}), form="low_rank")
    assert isinstance(small[0], lt.LowRankLinear) and small[0].rank == 4  # 4*36 < 320
    assert type(small[2]) is nn.Linear  # 10*28 > 192: dense is cheaper, weight is rank 10
    assert lt.effective_rank(lt.layer_spectra(small)["2"], tol=1e-4) == 10
    dense = lt.truncate(net, lt.Ranks({"0": 4}), form="dense")
    fresh = mlp()
    fresh.load_state_dict(dense.state_dict(), strict=True)
    assert small.lorita_ranks == {"0": 4, "2": 10, "4": 3}


def test_policies_plan():
    spectra = {"a": torch.tensor([10.0, 5.0, 1.0, 0.1]), "b": torch.tensor([2.0, 1.9, 1.8])}
    assert lt.Uniform(0.5).plan(spectra) == {"a": 2, "b": 1}
    assert lt.Uniform(0.01).plan(spectra) == {"a": 1, "b": 1}
    # normalised: a -> .5 .1 .01, b -> .95 .9 ; 7 values, drop floor(0.43*7)=3 smallest
    assert lt.Global(0.43).plan(spectra) == {"a": 1, "b": 3}
    assert lt.Global(0.0).plan(spectra) == {"a": 4, "b": 3}
    e = lt.Energy(0.99).plan(spectra)
    assert e["a"] == 2  # (100+25)/126.01 = 0.992
    assert lt.Energy(1.0).plan(spectra) == {"a": 4, "b": 3}
    assert lt.Ranks({"b": 2}).plan(spectra) == {"a": 4, "b": 2}


def test_plan_and_truncate_reuse_svd_cache():
    net = lt.overparameterize(mlp(), 3)
    cache = lt.layer_svd(net)
    ranks = lt.plan_ranks(net, lt.Uniform(0.5), svd=cache)
    assert ranks == {"0": 8, "2": 6, "4": 1}
    a = lt.truncate(net, lt.Uniform(0.5), svd=cache)
    b = lt.truncate(net, lt.Uniform(0.5))
    x = torch.randn(3, 20)
    assert_close(a(x), b(x))
    only = lt.layer_svd(net, layers=["0"])
    assert lt.plan_ranks(net, lt.Uniform(0.5), svd=only) == {"0": 8}


def _acc_eval(x, y):
    def evaluate(model):
        with torch.no_grad():
            return {"acc": float((model(x).argmax(1) == y).float().mean())}

    return evaluate


def test_tradeoff_curve_and_smallest_within():
    net = mlp()
    x = torch.randn(64, 20)
    with torch.no_grad():
        y = net(x).argmax(1)  # the full model is 100% accurate on its own labels
    evaluate = _acc_eval(x, y)
    curve = lt.tradeoff_curve(
        net, "uniform", [1.0, 0.5, 0.1], evaluate=evaluate, example_input=x[:1]
    )
    assert [p["value"] for p in curve] == [1.0, 0.5, 0.1]
    assert curve[0]["params_pct"] == pytest.approx(100.0) and curve[0]["metric"]["acc"] == 1.0
    assert curve[2]["params"] < curve[1]["params"] < curve[0]["params"]
    best = lt.smallest_within(net, "global", evaluate=evaluate, max_drop=10, example_input=x[:1])
    assert best["metric"]["acc"] >= 0.9 - 1e-9
    assert best["params"] <= curve[0]["params"]
    assert evaluate(best["model"])["acc"] == best["metric"]["acc"]
    it = lt.iterative_search(net, evaluate=evaluate, max_drop=10, example_input=x[:1])
    assert it["metric"] >= 0.9 - 1e-9 and it["params"] <= curve[0]["params"]


def test_conv_truncation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 1)).eval()
    small = lt.truncate(net, lt.Ranks({"0": 4}))
    assert isinstance(small[0], lt.LowRankConv2d)
    x = torch.randn(2, 16, 6, 6)
    assert small(x).shape == net(x).shape
    full = lt.truncate(net, lt.Uniform(1.0))
    assert_close(full(x), net(x))


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: lt.Uniform(0), "ratio"),
        (lambda: lt.Uniform(1.5), "ratio"),
        (lambda: lt.Global(1.0), "fraction"),
        (lambda: lt.Global(-0.1), "fraction"),
        (lambda: lt.Energy(0), "energy|keep"),
        (lambda: lt.Energy(1.01), "keep"),
        (lambda: lt.Energy(math.nan), "keep"),
        (lambda: lt.truncate(mlp(), lt.Ranks({"9": 2})), "unknown layer"),
        (lambda: lt.truncate(mlp(), lt.Ranks({"0": 0})), "rank"),
        (lambda: lt.truncate(mlp(), lt.Ranks({"0": 17})), "rank"),
        (lambda: lt.truncate(mlp(), lt.Uniform(0.5), form="sparse"), "form"),
        (lambda: lt.make_policy("magnitude", 0.5), "policy"),
        (lambda: lt.layer_svd(mlp(), layers=["1"]), "layers"),
    ],
)
def test_bad_arguments(call, field):
    with pytest.raises(ValueError, match=field):
        call()
