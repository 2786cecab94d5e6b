import math
import warnings

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
    headless = lt.layer_svd(net, keep_head=True)
    assert lt.plan_ranks(net, lt.Uniform(0.5), svd=headless) == {"0": 8, "2": 6}
    assert "output layer (3 outputs)" in headless.left_out["4"]
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


def test_a_curve_cuts_and_evaluates_each_distinct_cut_once():
    net = mlp()
    x = torch.randn(64, 20)
    calls = []

    def evaluate(model):
        calls.append(dict(model.lorita_ranks))
        return {"acc": 1.0}

    values = [0.5, 0.49, 0.5, 0.1, 0.999, 1.0]  # 16 * 0.49 and 16 * 0.5 round alike
    curve = lt.tradeoff_curve(net, "uniform", values, evaluate=evaluate, example_input=x[:1])
    assert [p["value"] for p in curve] == values
    alone = [lt.tradeoff_curve(net, "uniform", [v], evaluate=evaluate, example_input=x[:1])[0]
             for v in values]  # fmt: skip
    for got, want in zip(curve, alone):
        assert got == want
    distinct = {tuple(sorted(p["ranks"].items())) for p in curve}
    assert len(calls) == len(distinct) + len(values) and len(distinct) < len(values)


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


# --------------------------------------------------------------------------- policy registry


def test_every_policy_describes_itself_and_parses_back():
    import json

    names = [d["name"] for d in lt.list_policies()]
    assert names == list(lt.POLICIES)
    assert {"uniform", "global", "energy", "budget", "flops-budget", "ranks"} <= set(names)
    for cls in lt.POLICIES.values():
        d = json.loads(json.dumps(cls.describe()))
        assert d["label"] and d["help"]
        if cls.value_name is None:
            assert d["kind"] == "table"
            continue
        assert d["min"] <= d["default"] <= d["max"]
        sweep = cls.sweep(9)
        assert len(sweep) == 9 and all(d["min"] <= v <= d["max"] for v in sweep)
        pol = cls(d["default"])
        assert pol.value == d["default"] and pol.spec()["policy"] == cls.name
        assert lt.parse_policy(str(pol)) == pol
    assert lt.parse_policy(" Global:0.25 ") == lt.Global(0.25)
    assert lt.parse_policy("ranks:0=4, 2=8") == lt.Ranks({"0": 4, "2": 8})
    assert lt.truncation.default_values("energy", 5) == lt.Energy.sweep(5)


def test_a_new_policy_is_one_class():
    from dataclasses import dataclass

    from lorita.truncation import Policy

    @dataclass(frozen=True)
    class Halve(Policy):
        factor: float

        name = "test-halve"
        label = "Halve"
        help = "Every layer keeps rank / factor."
        value_name = "factor"
        low, high, default = 1.0, 8.0, 2.0

        @classmethod
        def sweep(cls, points=25):
            return [1.0 + 7.0 * i / (points - 1) for i in range(points)]

        def plan(self, spectra):
            return {n: max(1, int(len(s) / self.factor)) for n, s in spectra.items()}

    try:
        assert lt.parse_policy("test-halve:2") == Halve(2.0)
        assert "test-halve" in [d["name"] for d in lt.list_policies()]
        x = torch.randn(4, 20)
        curve = lt.tradeoff_curve(
            mlp(), "test-halve", [1.0, 4.0], evaluate=lambda m: 0.0, example_input=x
        )
        assert curve[1]["ranks"] == {"0": 4, "2": 3, "4": 1}
    finally:
        del lt.POLICIES["test-halve"]


@pytest.mark.parametrize(
    "text, field",
    [
        ("global", "NAME:VALUE"),
        ("magnitude:0.5", "policy"),
        ("global:abc", "number"),
        ("global:1.5", "fraction"),
        ("budget:0", "percent"),
        ("budget:101", "percent"),
        ("ranks:fc1", "LAYER=RANK"),
        ("ranks:fc1=-2", "LAYER=RANK"),
        (None, "policy"),
    ],
)
def test_parse_policy_refuses(text, field):
    with pytest.raises(ValueError, match=field):
        lt.parse_policy(text)


def test_parse_policy_reads_underscores_as_hyphens():
    assert lt.parse_policy("flops_budget:10") == lt.FlopBudget(10.0)
    assert lt.parse_policy(" Budget : 5") == lt.Budget(5.0)


# --------------------------------------------------------------------------- budgets


def wide_mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(),
        nn.Linear(40, 10),
    ).eval()  # fmt: skip


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, stride=2),
        nn.ReLU(), nn.Flatten(), nn.Linear(24 * 7 * 7, 10),
    ).eval()  # fmt: skip


def grouped_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, groups=4),
        nn.ReLU(), nn.Conv2d(32, 32, 3, groups=32), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    ).eval()  # fmt: skip


def tiny_vit():
    torch.manual_seed(0)
    return lt.create_model(
        "vit", in_channels=3, image_size=8, num_classes=10, dim=32, depth=1, heads=2
    ).eval()


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x):  # (B, T, 6)
        h = self.embed(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def mha_model():
    torch.manual_seed(0)
    return _Attn().eval()


def encoder_model():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.Linear(6, 32), nn.TransformerEncoder(layer, 2)).eval()


@pytest.mark.parametrize(
    "make, shape",
    [
        (mha_model, (1, 5, 6)),
        (encoder_model, (2, 5, 6)),
        (wide_mlp, (1, 64)),
        (small_cnn, (1, 3, 16, 16)),
        (grouped_cnn, (1, 4, 8, 8)),
        (tiny_vit, (1, 3, 8, 8)),
    ],
)
def test_layer_costs_predict_the_counted_cost(make, shape):
    net = make()
    x = torch.randn(*shape)
    cache = lt.layer_svd(net, example_input=x)
    costs = cache.costs()
    assert costs.total({n: len(s) for n, s in cache.spectra.items()}) == costs.base
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        ranks = {
            n: int(torch.randint(1, len(s) + 1, (1,), generator=g))
            for n, s in cache.spectra.items()
        }
        got = lt.count_cost(lt.truncate(net, lt.Ranks(ranks), svd=cache), x)
        assert costs.total(ranks) == {"params": got.params, "flops": got.flops}


@pytest.mark.parametrize("measure", ["params", "flops"])
@pytest.mark.parametrize(
    "make, shape", [(wide_mlp, (1, 64)), (small_cnn, (1, 3, 16, 16)), (grouped_cnn, (1, 4, 8, 8))]
)
def test_budget_is_the_largest_global_cut_within_budget(make, shape, measure):
    net = make()
    x = torch.randn(*shape)
    cache = lt.layer_svd(net, example_input=x)
    base = getattr(cache.base_cost(x), measure)
    total = sum(len(s) for s in cache.spectra.values())
    floor = cache.costs().total({n: 1 for n in cache.spectra})[measure]
    for pct in (15, 30, 60, 100):
        pol = lt.Budget(pct, measure=measure)
        ranks = lt.plan_ranks(net, pol, svd=cache)
        if floor > pct / 100 * base:  # not reachable: every layer keeps one singular value
            assert set(ranks.values()) == {1}
            continue
        small = lt.truncate(net, pol, svd=cache)
        assert small.lorita_ranks == ranks
        assert getattr(lt.count_cost(small, x), measure) <= pct / 100 * base  # met
        dropped = total - sum(ranks.values())
        assert ranks == lt.Global(dropped / total).plan(cache.spectra)  # Global's order
        if dropped:  # one singular value fewer dropped would exceed the budget
            bigger = lt.Global((dropped - 1) / total).plan(cache.spectra)
            over = getattr(lt.count_cost(lt.truncate(net, lt.Ranks(bigger), svd=cache), x), measure)
            assert over > pct / 100 * base
    assert lt.FlopBudget(30).measure == "flops" and str(lt.FlopBudget(30)) == "flops-budget:30"


def test_budget_needs_costs_and_the_low_rank_form():
    net = wide_mlp()
    with pytest.raises(ValueError, match="example_input"):
        lt.truncate(net, lt.Budget(20))
    x = torch.randn(1, 64)
    small = lt.truncate(net, lt.Budget(20), example_input=x)
    assert lt.count_cost(small, x).params <= 0.2 * lt.count_cost(net, x).params
    with pytest.raises(ValueError, match="form"):
        lt.truncate(net, lt.Budget(20), example_input=x, form="dense")
    with pytest.raises(ValueError, match="costs"):
        lt.Budget(20).plan(lt.layer_svd(net).spectra)
    with pytest.raises(ValueError, match="measure"):
        lt.Budget(20, measure="latency")


def _bn_mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )  # fmt: skip


def _whole_model_times(monkeypatch, thin_s: float, dense_s: float) -> None:
    """Every layer measured faster thin; the whole model then times ``thin_s`` with its thin
    layers and ``dense_s`` with all of them dense."""
    from lorita import kinds

    monkeypatch.setattr(kinds, "_thin_is_faster", lambda *a: True)
    calls = iter([thin_s, dense_s])
    monkeypatch.setattr(
        kinds, "paired_medians", lambda fns, **kw: [(f(), next(calls))[1] for f in fns]
    )


def test_cut_by_latency_falls_back_to_dense_when_the_whole_model_is_slower(monkeypatch):
    """Layers timed alone may each be faster thin, yet the whole model slower: then every cut
    layer stays dense (rank-r weight, the uncut model's cost) and the plan says why."""
    model, x = _bn_mlp().train(), torch.randn(8, 32)
    _whole_model_times(monkeypatch, 2.0, 1.0)
    stats = model[1].running_mean.clone()
    small = lt.truncate(model, lt.Uniform(0.25), example_input=x, by="latency", batch=16)
    cut = {n: p for n, p in small.lorita_plan.items() if p["form"] != "full"}
    assert cut and all(p["form"] == "dense" for p in cut.values())
    assert all("whole model measured slower" in p["why"] for p in cut.values())
    assert not any(isinstance(m, (lt.LowRankLinear, lt.LowRankConv2d)) for m in small.modules())
    assert model.training  # the model given is left as it was
    torch.testing.assert_close(model[1].running_mean, stats)  # timing moved no BN statistics
    dense = lt.truncate(model, lt.Uniform(0.25), form="dense")
    small.eval(), dense.eval()
    torch.testing.assert_close(small(x), dense(x))


def test_cut_by_latency_keeps_dense_layers_on_a_near_tie(monkeypatch):
    """Thin layers 2% faster in the whole model is within the noise of a shared machine: the
    cut stays dense (it costs no more) instead of swapping forms on a timing's jitter."""
    from lorita import kinds

    model, x = _bn_mlp().eval(), torch.randn(8, 32)
    _whole_model_times(monkeypatch, 0.98, 1.0)
    small = lt.truncate(model, lt.Uniform(0.25), example_input=x, by="latency", batch=16)
    cut = {n: p for n, p in small.lorita_plan.items() if p["form"] != "full"}
    assert cut and all(p["form"] == "dense" for p in cut.values())
    assert kinds.is_faster(0.9, 1.0) and not kinds.is_faster(0.97, 1.0)


def test_cut_by_latency_keeps_thin_layers_when_the_whole_model_is_faster(monkeypatch):
    model, x = _bn_mlp().eval(), torch.randn(8, 32)
    _whole_model_times(monkeypatch, 1.0, 2.0)
    small = lt.truncate(model, lt.Uniform(0.25), example_input=x, by="latency", batch=16)
    assert any(p["form"] == "thin" for p in small.lorita_plan.values())
    assert any(isinstance(m, lt.LowRankLinear) for m in small.modules())


def _calls(model: nn.Module, name: str) -> list[int]:
    seen = [0]
    model.get_submodule(name).register_forward_hook(lambda *a: seen.__setitem__(0, seen[0] + 1))
    return seen


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_a_cut_encoder_calls_its_thin_layers_in_inference_and_matches_the_dense_cut(tmp_path):
    # eval + no_grad: nn.TransformerEncoderLayer's fused path would pass linear1.weight (a
    # product of the thin factors, recomputed per call) to one kernel instead of calling it
    net, x = encoder_model(), torch.randn(3, 5, 6)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[:, 3:] = True  # padded positions: the stack would pack them as nested tensors
    thin = lt.truncate(net, lt.Uniform(0.25), example_input=x)
    dense = lt.truncate(net, lt.Uniform(0.25), example_input=x, form="dense")
    assert {p["form"] for p in thin.lorita_plan.values()} >= {"thin"}
    attn = thin.get_submodule("1.layers.0.self_attn")
    assert isinstance(attn, lt.LowRankMultiheadAttention)
    calls = _calls(thin, "1.layers.1.linear1.first")
    with torch.no_grad():
        assert_close(thin(x), dense(x), atol=1e-5, rtol=1e-5)
        got = thin[1](thin[0](x), src_key_padding_mask=pad)
        want = dense[1](dense[0](x), src_key_padding_mask=pad)
    assert calls[0] == 2
    keep = ~pad  # the fused path zeroes padded rows of its nested output: compare the rest
    assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)
    back = lt.load(lt.save(thin, tmp_path / "enc.safetensors"), model=encoder_model())
    calls = _calls(back, "1.layers.1.linear1.first")
    with torch.no_grad():
        assert_close(back(x), thin(x), atol=1e-6, rtol=1e-6)
    assert calls[0] == 1


def test_only_encoder_layers_with_a_thin_part_leave_the_fused_path():
    net, x = encoder_model(), torch.randn(3, 5, 6)
    ranks = {"1.layers.1.linear1": 4}  # layer 0 untouched, layer 1's attention not cut
    cut = lt.truncate(net, lt.Ranks(ranks), example_input=x)
    assert isinstance(cut.get_submodule("1.layers.1.linear1"), lt.LowRankLinear)
    hooked = [len(layer._forward_pre_hooks) for layer in cut[1].layers]
    assert hooked == [0, 1]
    calls = _calls(cut, "1.layers.1.linear1.first")
    with torch.no_grad():
        cut(x)
    assert calls[0] == 1
    same = lt.truncate(net, lt.Ranks(ranks), example_input=x, form="dense")
    assert all(len(layer._forward_pre_hooks) == 0 for layer in same[1].layers)


def test_an_attention_out_proj_cut_alone_is_thin_in_an_unpacked_attention(tmp_path):
    # nn.MultiheadAttention reads out_proj.weight itself: to call a thin out_proj the
    # attention becomes LowRankMultiheadAttention with dense q, k, v ("unpacked")
    net, x = mha_model(), torch.randn(2, 5, 6)
    cut = lt.truncate(net, lt.Ranks({"attn.out_proj": 3}), example_input=x)
    dense = lt.truncate(net, lt.Ranks({"attn.out_proj": 3}), example_input=x, form="dense")
    assert cut.lorita_plan["attn.out_proj"]["form"] == "thin"
    assert isinstance(cut.attn, lt.LowRankMultiheadAttention) and cut.attn.rank is None
    assert isinstance(cut.attn.out_proj, lt.LowRankLinear)
    assert isinstance(dense.attn, nn.MultiheadAttention)  # dense: nothing to unpack
    with torch.no_grad():
        assert_close(cut(x), dense(x), atol=1e-6, rtol=1e-6)
    assert lt.count_cost(cut, x).params < lt.count_cost(dense, x).params
    path = lt.save(cut, tmp_path / "m.safetensors")
    assert lt.read_spec(path)["layers"]["attn"] == {"kind": "unpacked"}
    back = lt.load(path, model=mha_model())
    with torch.no_grad():
        assert_close(back(x), cut(x), atol=1e-6, rtol=1e-6)


def test_forms_chosen_by_latency_pack_an_attention_again_when_its_out_proj_goes_dense(
    monkeypatch,
):
    from lorita import kinds

    monkeypatch.setattr(kinds, "is_faster", lambda thin, dense: False)  # every thin form loses
    net, x = mha_model(), torch.randn(2, 5, 6)
    cut = lt.truncate(net, lt.Ranks({"attn.out_proj": 3}), example_input=x, by="latency")
    assert cut.lorita_plan["attn.out_proj"]["form"] == "dense"
    assert type(cut.attn) is nn.MultiheadAttention  # not left unpacked
    dense = lt.truncate(net, lt.Ranks({"attn.out_proj": 3}), example_input=x, form="dense")
    with torch.no_grad():
        assert_close(cut(x), dense(x), atol=1e-6, rtol=1e-6)


class _HeadFirst(nn.Module):
    """A classifier whose head is registered before its body (the last layer to run is not
    the last one registered)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 4)
        self.body = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 16))

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_a_cache_that_keeps_the_head_leaves_it_whole_for_every_policy_and_the_plan_says_so():
    x = torch.randn(5, 20)
    for net, head in ((lt.overparameterize(mlp(), 3), "4"), (_HeadFirst().eval(), "head")):
        svd = lt.layer_svd(net, example_input=x, keep_head=True)
        for policy in (lt.Uniform(0.1), lt.Global(0.9), lt.Energy(0.5), lt.Budget(90)):
            small = lt.truncate(net, policy, svd=svd, example_input=x)
            assert head not in small.lorita_ranks
            row = small.lorita_plan[head]
            assert row["form"] == "left out" and row["rank"] == row["full"] == 4 - (head == "4")
            assert "output layer" in row["why"] and "merges them" in row["why"]
            assert type(small.get_submodule(head)) is nn.Linear
            merged = lt.merge_model(net)
            assert_close(small.get_submodule(head).weight, merged.get_submodule(head).weight)
        assert lt.truncate(net, lt.Uniform(0.1)).lorita_plan[head]["form"] != "left out"  # default
    # found by a forward pass on a guessed input (each Linear's width) when none is given
    assert "head" in lt.layer_svd(_HeadFirst(), keep_head=True).left_out
    first = _HeadFirst()
    with pytest.raises(ValueError, match=r"ranks: layer\(s\) \['head'\] are left out.*output"):
        lt.truncate(first, lt.Ranks({"head": 2}), svd=lt.layer_svd(first, keep_head=True))
    with pytest.raises(ValueError, match="example_input: the model refused it"):
        lt.layer_svd(_HeadFirst(), example_input=torch.randn(2, 7), keep_head=True)


def test_output_layer_guessed_from_registration_when_no_input_runs():
    class Odd(nn.Module):  # takes two inputs: no guessed input runs it
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x, y):
            return self.b(self.a(x) + y)

    cache = lt.layer_svd(Odd(), keep_head=True)
    assert list(cache.left_out) == ["b"] and "last layer registered" in cache.left_out["b"]
    assert list(cache.spectra) == ["a"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_svd_cache_keeps_its_vectors_in_the_weights_precision(dtype):
    """Singular vectors computed in float64 are kept in the weights' precision (half the
    memory for a float32 model), the values in float64; cuts from the cache, thin and dense,
    match the best rank-r approximation computed in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5)).to(dtype)
    cache = lt.layer_svd(model)
    u, s, vh = cache.svd["0"]
    assert (u.dtype, vh.dtype, s.dtype) == (dtype, dtype, torch.float64)
    w = model[0].weight.detach().double()
    u64, s64, vh64 = torch.linalg.svd(w, full_matrices=False)
    best = (u64[:, :7] * s64[:7]) @ vh64[:7]
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for form in ("low_rank", "dense"):
        cut = lt.truncate(model, lt.Ranks({"0": 7}), svd=cache, form=form)
        layer = cut[0]
        got = layer.weight if form == "dense" else layer.second.weight @ layer.first.weight
        assert got.dtype == dtype
        assert torch.allclose(got.double(), best, atol=tol * float(s64[0]))


@pytest.mark.parametrize("policy", [lt.Uniform(0.5), lt.Energy(0.9), lt.Global(0.5)])
def test_a_meta_model_is_refused_by_name(policy):
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="'meta' device"):
        lt.truncate(net, policy)


def test_a_budget_under_one_percent_warns_that_it_is_in_percent():
    """Budget(0.1) written for "10%" keeps a tenth of a percent: said at once, with the
    spelling that was meant; 1% and up are quiet."""
    with pytest.warns(UserWarning, match=r"percent: 0\.1 keeps 0\.1% .*\(Budget\(10\) for 10%\)"):
        lt.Budget(0.1)
    with pytest.warns(UserWarning, match="of the uncut model's flops"):
        lt.FlopBudget(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lt.Budget(1)
        lt.Budget(10)
