import pytest
import torch
from torch import nn
from torch.testing import assert_close

import lorita as lt
from lorita.convert import (
    apply_folds,
    composition_summary,
    deploy_input,
    deploy_model,
    fold_batchnorm,
)
from lorita.kinds import find_direct_reads
from lorita.layers import FactorConv2d, FactorMultiheadAttention


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Sequential(nn.Linear(8 * 4 * 4, 32), nn.ReLU()),
        nn.Linear(32, 10),
    )


def test_overparameterize_keeps_function_names_and_input():
    net = small_cnn().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(3, 1, 8, 8)
    model = lt.overparameterize(net, 3).eval()
    assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)
    assert set(lt.composed_layers(model)) == {"0", "3", "6.0", "7"}
    for k, v in net.state_dict().items():  # input not mutated
        assert torch.equal(v, before[k])
    assert all(type(m) in (nn.Conv2d, nn.Linear) for _, m in lt.iter_layers(net))


def test_listing_layers_multiplies_no_factors(monkeypatch):
    """layer_table only looks at registered weights: a composed layer's .weight multiplies its
    factors (seconds for a VGG classifier), and listing runs on every merge, cut and count."""
    from lorita import layers
    from lorita.kinds import layer_table

    composed = lt.overparameterize(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)), 3
    )
    products = []
    real = layers.chain_product
    monkeypatch.setattr(layers, "chain_product", lambda f: products.append(1) or real(f))
    assert [e.name for e in layer_table(composed)] == ["0", "2"]
    assert not products


def test_merge_model_loads_strict_into_plain_architecture():
    net = small_cnn().eval()
    model = lt.overparameterize(net, 3, init="independent").eval()
    merged = lt.merge_model(model)
    fresh = small_cnn().eval()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    x = torch.randn(2, 1, 8, 8)
    assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-5)


def test_skip_patterns_and_n1():
    net = small_cnn()
    model = lt.overparameterize(net, 2, skip=("7", "6.*"))
    assert set(lt.composed_layers(model)) == {"0", "3"}
    plain = lt.overparameterize(net, 1)
    assert not lt.composed_layers(plain)
    assert plain is not net


def test_training_mode_is_kept():
    net = small_cnn().train()
    model = lt.overparameterize(net, 3)
    assert all(m.training for m in model.modules())


def test_paper_inner_widths():
    model = lt.overparameterize(small_cnn(), 3, inner="paper")
    assert model[0].inner == 8 and model[7].inner == 32


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: lt.overparameterize(small_cnn(), 0), "n_factors"),
        (lambda: lt.overparameterize(small_cnn(), 3, init="zeros"), "init"),
        (lambda: lt.overparameterize(small_cnn(), 3, skip=("head",)), "skip"),
        (lambda: lt.overparameterize(small_cnn(), 3, inner="max"), "inner"),
        (lambda: lt.overparameterize(nn.Sequential(nn.ReLU()), 3), "model"),
        (lambda: lt.overparameterize(small_cnn(), 3, order="fast"), "order"),
        (lambda: lt.overparameterize(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)), 3), "model"),
        (lambda: composition_summary(small_cnn()), "overparameterize"),
        (lambda: lt.overparameterize(lt.overparameterize(small_cnn(), 2), 2), "already"),
    ],
)
def test_bad_arguments(call, field):
    with pytest.raises(ValueError, match=field):
        call()


class Mixed(nn.Module):
    """Every kind at once: a conv, a grouped conv, a depthwise conv, an attention and a Linear
    whose weight is read directly (as torchvision's Swin does with F.linear(x, qkv.weight))."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.read = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.depthwise(self.grouped(self.stem(x))).flatten(2).transpose(1, 2)  # (B, T, 8)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = torch.nn.functional.linear(x, self.read.weight, self.read.bias)
        return self.head(x.mean(1))


def test_every_kind_composed_or_left_with_a_reason():
    torch.manual_seed(0)
    net = Mixed().eval()
    x = torch.randn(2, 2, 4, 4)
    model = lt.overparameterize(net, 3).eval()  # no options: input guessed and traced
    assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)
    rows = {r["name"]: r for r in composition_summary(model)["layers"]}
    kinds = {n: r["kind"] for n, r in rows.items()}
    assert kinds == {
        "stem": "conv",
        "grouped": "grouped_conv",
        "depthwise": "depthwise",
        "attn": "attention",
        "attn.out_proj": "direct",
        "read": "direct",
        "head": "linear",
    }
    assert rows["depthwise"]["action"] == "left" and "depthwise" in rows["depthwise"]["why"]
    assert all(r["action"] == "composed" for n, r in rows.items() if n != "depthwise")
    assert isinstance(model.grouped, FactorConv2d) and model.grouped.groups == 2
    assert isinstance(model.attn, FactorMultiheadAttention)
    assert set(model.lorita_direct) == {"attn.out_proj", "read"}
    merged = lt.merge_model(model)
    fresh = Mixed()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    assert_close(fresh.eval()(x), model(x), rtol=1e-5, atol=1e-5)


class _StdConv(nn.Conv2d):
    """Weight standardisation in its own forward (timm's ScaledStdConv2d)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class _SameLinear(nn.Linear):
    """Its own forward, computing what nn.Linear does (timm's Linear)."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


def test_a_subclass_whose_forward_does_more_is_left_and_never_cut():
    torch.manual_seed(0)
    net = nn.Sequential(
        _StdConv(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
        _SameLinear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    from lorita import kinds

    kinds._OWN_FORWARD.pop(_StdConv, None)
    state = torch.get_rng_state()
    assert "its own forward" in kinds._own_forward(net[0])
    assert torch.equal(torch.get_rng_state(), state)  # the check draws from its own generator
    model = lt.overparameterize(net, 3, example_input=x).eval()
    assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)
    rows = {r["name"]: r for r in composition_summary(model)["layers"]}
    assert rows["0"]["action"] == "left" and rows["0"]["kind"] == "own_forward"
    assert "_StdConv has its own forward" in rows["0"]["why"]
    assert [rows[n]["action"] for n in ("2", "4", "6")] == ["composed"] * 3
    assert type(model[0]) is _StdConv and "0" not in dict(lt.iter_layers(model))
    small = lt.truncate(model, lt.Uniform(0.25), example_input=x)
    assert type(small[0]) is _StdConv  # a cut would change its function too
    assert_close(small[0].weight, net[0].weight)
    assert lt.count_cost(small, x).flops < lt.count_cost(net, x).flops


def test_find_direct_reads_needs_no_composed_model():
    assert find_direct_reads(Mixed(), torch.randn(1, 2, 4, 4)) == ["attn.out_proj", "read"]
    assert find_direct_reads(small_cnn(), torch.randn(1, 1, 8, 8)) == []


def test_tied_weights_are_left():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    net[2].weight = net[0].weight
    rows = composition_summary(lt.overparameterize(net, 3))["layers"]
    assert [r["action"] for r in rows] == ["left", "left"]
    assert "shared" in rows[0]["why"]
    # each of the two calls its own (shared) weight: neither is a weight read directly
    assert [r["kind"] for r in rows] == ["linear", "linear"]
    assert find_direct_reads(net, torch.randn(2, 4)) == []


def test_a_weight_shared_by_two_layers_and_read_outside_both_is_read_directly_for_both():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x)) + nn.functional.linear(x, self.a.weight)

    assert find_direct_reads(Net(), torch.randn(2, 4)) == ["a", "b"]


def test_an_embedding_is_listed_as_left_with_why():
    net = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(8 * 5, 4))
    rows = composition_summary(lt.overparameterize(net, 3, example_input=torch.zeros(2, 5).long()))
    (emb,) = [r for r in rows["layers"] if r["type"] == "Embedding"]
    assert emb["action"] == "left" and "looked up" in emb["why"]


def test_a_shared_bias_keeps_both_layers_as_they_are():
    """Two Linears holding one bias Parameter: composing either would copy the bias and untie
    it (after training, a merged model loaded into a fresh one differs); both are left."""
    net = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    net[2].bias = net[0].bias
    model = lt.overparameterize(net, 3)
    rows = composition_summary(model)["layers"]
    assert [r["action"] for r in rows] == ["left", "left"]
    assert "shared" in rows[0]["why"]
    assert model[0].bias is model[2].bias


def test_a_layer_tied_to_an_embedding_is_left_out_of_every_cut():
    """An output layer sharing the embedding's weight: no policy cuts it (a cut would make the
    embedding table low-rank too, saving nothing); the plan says why."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 12)
            self.mid = nn.Linear(12, 12)
            self.out = nn.Linear(12, 20, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(torch.relu(self.mid(self.emb(x))))

    torch.manual_seed(0)
    net = Tied().eval()
    x = torch.randint(0, 20, (2, 5))
    table = net.emb.weight.detach().clone()
    for policy in (lt.Uniform(0.3), lt.Energy(0.5), lt.Global(0.5), lt.Budget(60)):
        small = lt.truncate(lt.overparameterize(net, 3, example_input=x), policy, example_input=x)
        assert small.out.weight is small.emb.weight
        assert torch.equal(small.emb.weight, table), policy
        assert small.lorita_plan["out"]["form"] == "left out"
        assert "shared" in small.lorita_plan["out"]["why"]
        assert small.lorita_plan["mid"]["rank"] < 12 or isinstance(policy, lt.Budget)


def test_a_parametrized_weight_is_left_kept_in_training_and_baked_when_deployed(tmp_path):
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), weight_norm(nn.Linear(16, 12)), nn.ReLU(),
        spectral_norm(nn.Linear(12, 12)), nn.ReLU(), nn.Linear(12, 4),
    ).eval()  # fmt: skip
    x = torch.randn(3, 1, 4, 4)
    model = lt.overparameterize(net, 3, example_input=x).eval()
    rows = {r["name"]: r for r in composition_summary(model)["layers"]}
    assert rows["1"]["kind"] == rows["3"]["kind"] == "parametrized"
    assert rows["1"]["action"] == "left" and "WeightNorm" in rows["1"]["why"]
    assert "SpectralNorm" in rows["3"]["why"] and rows["5"]["action"] == "composed"
    assert parametrize.is_parametrized(model[1]) and parametrize.is_parametrized(model[3])
    assert_close(model(x), net(x))
    fresh = nn.Sequential(
        nn.Flatten(), weight_norm(nn.Linear(16, 12)), nn.ReLU(),
        spectral_norm(nn.Linear(12, 12)), nn.ReLU(), nn.Linear(12, 4),
    )  # fmt: skip
    fresh.load_state_dict(lt.merge_model(model).state_dict(), strict=True)
    small = lt.truncate(model, lt.Uniform(0.5), example_input=x)
    assert sorted(small.lorita_plan) == ["5"]  # the parametrized layers are never cut
    deploy = deploy_model(small, x)
    assert deploy.lorita_deploy["baked"] == ["1.weight", "3.weight"]
    assert not any(parametrize.is_parametrized(m) for m in deploy.modules())
    assert_close(deploy(x), small(x))
    assert parametrize.is_parametrized(small[1])  # the model itself keeps them
    lt.save(small, tmp_path / "s.safetensors")
    back = lt.load(tmp_path / "s.safetensors", model=fresh).eval()
    assert_close(back(x), small(x))
    with pytest.raises(ValueError, match=r"Sequential \(its layer '1' is a ParametrizedLinear"):
        lt.load(tmp_path / "s.safetensors")  # a file describes plain layers only


def test_other_weight_layers_are_listed_as_left_and_lazy_ones_refused():
    class Net(nn.Module):
        def __init__(self, lazy: bool = False):
            super().__init__()
            self.c1 = nn.Conv1d(1, 4, 3)
            self.lstm = nn.LSTM(4, 8, batch_first=True)
            self.att = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)
            self.fc = nn.LazyLinear(5) if lazy else nn.Linear(8, 5)

        def forward(self, x):
            z = self.c1(x).transpose(1, 2)  # (B, L, 4)
            h, _ = self.lstm(z)
            a, _ = self.att(h, z, z)
            return self.fc(a.mean(1))

    x = torch.randn(2, 1, 10)
    rows = composition_summary(lt.overparameterize(Net(), 3, example_input=x))["layers"]
    got = {r["name"]: (r["kind"], r["action"]) for r in rows}
    assert got == {
        "fc": ("linear", "composed"),
        "att.out_proj": ("direct", "composed"),
        "c1": ("other", "left"),
        "lstm": ("other", "left"),
        "att": ("other", "left"),
    }
    why = {r["name"]: r["why"] for r in rows}
    assert why["c1"].startswith("Conv1d is not a kind") and "separate q, k, v" in why["att"]
    with pytest.raises(ValueError, match=r"layer 'fc' has uninitialised \(lazy\) param"):
        lt.overparameterize(Net(lazy=True), 3, example_input=x)
    lazy = Net(lazy=True)
    lazy(x)  # one batch gives the lazy layer its shape
    composed = lt.overparameterize(lazy, 3, example_input=x)
    assert composed.fc.__class__.__name__ == "FactorLinear"


def test_save_and_load_onto_a_lazy_model_that_saw_no_batch_say_so(tmp_path):
    def net():
        return nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))

    with pytest.raises(ValueError, match=r"model: layer '0' has uninitialised \(lazy\) param"):
        lt.save(net(), tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()
    trained = net()
    x = torch.randn(3, 5)
    trained(x)
    small = lt.truncate(lt.overparameterize(trained, 3), lt.Uniform(0.5)).eval()
    lt.save(small, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"model: layer '0' has uninitialised \(lazy\) param"):
        lt.load(tmp_path / "m.safetensors", model=net())
    fresh = net()
    fresh(x)  # one batch gives it its shapes; then the file loads onto it
    assert_close(lt.load(tmp_path / "m.safetensors", model=fresh)(x), small(x))


class _CachesBias(nn.Module):
    """Keeps a tensor computed from its parameters between calls in eval mode, as timm's
    LeViT does with its attention biases: ``copy.deepcopy`` refuses such a module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.ones(6))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x):
        if self.training or "s" not in self.cache:
            self.cache["s"] = self.scale * 2  # not a leaf: made with autograd
        return self.head(torch.relu(self.fc(x)) * self.cache["s"])


def test_a_model_caching_autograd_tensors_is_copied_everywhere(tmp_path):
    torch.manual_seed(0)
    net, x = _CachesBias().eval(), torch.randn(4, 6)
    ref = net(x)  # fills the cache with a non-leaf tensor
    with pytest.raises(RuntimeError):
        import copy

        copy.deepcopy(net)
    model = lt.overparameterize(net, 3, example_input=x)
    assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    assert net.cache["s"].grad_fn is not None  # the original is left as it was
    merged = lt.merge_model(model)
    small = lt.truncate(model, lt.Uniform(0.5), example_input=x)
    assert lt.count_cost(small, x).flops < lt.count_cost(merged, x).flops
    lt.save(small, tmp_path / "s.safetensors")
    again = lt.load(tmp_path / "s.safetensors", model=_CachesBias().eval())
    assert_close(again(x), small(x))
    assert_close(lt.deploy_model(small, x)(x), small(x), rtol=1e-5, atol=1e-6)


class _Only224(nn.Module):
    """Accepts 224 px inputs only and reads its head's weight itself (F.linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 2, 32, stride=32)  # 224 px -> 7 x 7
        self.head = nn.Linear(2 * 7 * 7, 10)

    def forward(self, x):
        return nn.functional.linear(self.stem(x).flatten(1), self.head.weight, self.head.bias)


def test_direct_reads_are_traced_on_the_first_guessed_side_the_model_accepts():
    torch.manual_seed(0)
    model = _Only224().eval()
    composed = lt.overparameterize(model, 3)
    assert composed.lorita_direct == ("head",)
    assert composed.lorita_summary["direct_reads"] == "traced"
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(composed(x), model(x), rtol=1e-4, atol=1e-5)
    small = lt.truncate(composed, lt.Ranks({"head": 2}))
    assert small.lorita_plan["head"]["form"] == "dense"  # read directly: the cut stays dense


def test_a_model_no_guessed_side_fits_is_still_composed_and_says_why():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 5 * 5, 4))  # 7 px
    composed = lt.overparameterize(model, 3)
    note = composed.lorita_summary["direct_reads"]
    assert "could not trace" in note and "(2, 3, 299, 299)" in note and "example_input=" in note
    composed = lt.overparameterize(model, 3, example_input=torch.randn(2, 3, 7, 7))
    assert composed.lorita_summary["direct_reads"] == "traced"


class _LeNet(nn.Module):
    """Built for 28 px (a flatten of a fixed size), with its head read by F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc, self.head = nn.Linear(16 * 4 * 4, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.c1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.c2(x)), 2)
        h = torch.relu(self.fc(x.flatten(1)))
        return nn.functional.linear(h, self.head.weight, self.head.bias)


def test_a_network_built_for_mnist_sized_inputs_needs_no_example_input():
    composed = lt.overparameterize(_LeNet(), 3)
    assert composed.lorita_summary["direct_reads"] == "traced"
    assert composed.lorita_direct == ("head",)
    assert lt.fold_batchnorm(lt.merge_model(composed).eval()) is not None


class _TokenModel(nn.Module):
    """Token ids in, an Embedding first, a head read by F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc(self.emb(x).mean(1)))
        return nn.functional.linear(h, self.head.weight, self.head.bias)


def test_guessed_inputs_follow_the_model_token_ids_and_float64():
    composed = lt.overparameterize(_TokenModel(), 3)
    assert composed.lorita_summary["direct_reads"] == "traced"
    assert composed.lorita_direct == ("head",)
    double = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    composed = lt.overparameterize(double, 3)
    assert composed.lorita_summary["direct_reads"] == "traced"
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(composed(x), double(x))


# --------------------------------------------------------------------------- BatchNorm folding


def _random_stats(model: nn.Module) -> nn.Module:
    """Give every BatchNorm running statistics and an affine map far from the identity."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            if m.affine:
                m.weight.data.copy_(torch.randn(c, generator=g) * 0.5 + 1)
                m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()


def conv_bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise, with a bias
        nn.BatchNorm2d(8, affine=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16),
        nn.BatchNorm1d(16),
        nn.Linear(16, 5),
    )


def test_fold_batchnorm_keeps_the_function_of_a_conv_bn_net():
    net = _random_stats(conv_bn_net())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 3, 4, 4)
    folded = fold_batchnorm(net, x)
    assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
    assert folded.lorita_folded == {"1": "0", "4": "3", "8": "7"}
    assert folded.lorita_unfolded == {}
    assert all(isinstance(folded[i], nn.Identity) for i in (1, 4, 8))
    assert folded[0].bias is not None  # the conv without a bias gained one
    for k, v in net.state_dict().items():  # the input model is not changed
        assert torch.equal(v, before[k])
    assert isinstance(net[1], nn.BatchNorm2d)


class _Branches(nn.Module):
    """BatchNorms that must not fold: input also used elsewhere, not a layer's output, a layer
    that runs twice, an output the model returns; and one that folds."""

    def __init__(self) -> None:
        super().__init__()
        self.shared_out = nn.Conv2d(4, 4, 1)
        self.bn_shared = nn.BatchNorm2d(4)
        self.bn_after_relu = nn.BatchNorm2d(4)
        self.twice = nn.Conv2d(4, 4, 1)
        self.bn_twice = nn.BatchNorm2d(4)
        self.returned = nn.Conv2d(4, 4, 1)
        self.bn_returned = nn.BatchNorm2d(4)
        self.ok = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_ok = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.shared_out(x)
        x = self.bn_shared(y) + y  # the conv's output has a second consumer
        x = self.bn_after_relu(torch.relu(x))
        x = self.bn_twice(self.twice(self.twice(x)))
        r = self.returned(x)
        x = self.bn_returned(r)
        return self.bn_ok(self.ok(x)), r


def test_fold_batchnorm_leaves_a_batchnorm_whose_input_is_not_only_a_layer_output():
    net = _random_stats(_Branches())
    x = torch.randn(2, 4, 5, 5)
    folded = fold_batchnorm(net, x)
    assert folded.lorita_folded == {"bn_ok": "ok"}
    assert set(folded.lorita_unfolded) == {
        "bn_shared", "bn_after_relu", "bn_twice", "bn_returned"
    }  # fmt: skip
    assert "also used" in folded.lorita_unfolded["bn_shared"]
    assert "not the output" in folded.lorita_unfolded["bn_after_relu"]
    assert "more than once" in folded.lorita_unfolded["bn_twice"]
    assert "also used" in folded.lorita_unfolded["bn_returned"]
    for a, b in zip(folded(x), net(x), strict=True):
        assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_refuses_a_model_in_training_mode():
    net = conv_bn_net().train()
    with pytest.raises(ValueError, match="training mode.*eval"):
        fold_batchnorm(net, torch.randn(4, 3, 4, 4))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_fold_batchnorm_on_torchvision_models(name):
    model = _random_stats(lt.create_model(f"torchvision:{name}", num_classes=10, image_size=32))
    x = torch.randn(2, 3, 32, 32)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded = fold_batchnorm(model, x)
    assert len(folded.lorita_folded) == n_bn  # every BatchNorm follows its conv alone
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


def test_fold_batchnorm_on_thin_cut_and_composed_models():
    model = _random_stats(
        lt.create_model("torchvision:mobilenet_v3_small", num_classes=10, image_size=32)
    )
    x = torch.randn(2, 3, 32, 32)
    cut = lt.truncate(model, lt.Uniform(0.25)).eval()
    folded_cut = fold_batchnorm(cut, x)
    assert_close(folded_cut(x), cut(x), rtol=1e-4, atol=1e-5)
    thin = [b for b, layer in folded_cut.lorita_folded.items() if layer.endswith(".second")]
    assert thin  # thin pairs fold into their last factor
    composed = lt.overparameterize(model, 3).eval()  # merged first
    assert_close(fold_batchnorm(composed, x)(x), model(x), rtol=1e-4, atol=1e-5)
    small = _random_stats(conv_bn_net())
    small_cut = lt.truncate(small, lt.Ranks({"0": 2, "7": 3})).eval()
    xs = torch.randn(4, 3, 4, 4)
    folded_small = fold_batchnorm(small_cut, xs)
    assert folded_small.lorita_folded == {"1": "0.second", "4": "3", "8": "7.second"}
    assert_close(folded_small(xs), small_cut(xs), rtol=1e-5, atol=1e-5)


def test_apply_folds_rebuilds_the_structure_and_names_a_bad_entry():
    net = _random_stats(conv_bn_net())
    x = torch.randn(4, 3, 4, 4)
    folded = fold_batchnorm(net, x)
    fresh = apply_folds(conv_bn_net(), folded.lorita_folded)
    fresh.load_state_dict(folded.state_dict(), strict=True)
    assert_close(fresh.eval()(x), net(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"folded\['2'\].*ReLU, not a BatchNorm"):
        apply_folds(conv_bn_net(), {"2": "0"})
    with pytest.raises(ValueError, match="not Linear/Conv2d"):
        apply_folds(conv_bn_net(), {"1": "2"})
    with pytest.raises(ValueError, match="not in this model"):
        apply_folds(conv_bn_net(), {"nope": "0"})


def test_deploy_model_folds_and_uses_channels_last_for_conv_models():
    net = _random_stats(conv_bn_net())
    x = torch.randn(4, 3, 4, 4)
    deploy = deploy_model(net, x)
    want = {"folded": ["1", "4", "8"], "baked": [], "memory_format": "channels_last"}
    assert deploy.lorita_deploy == want
    assert deploy[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_close(deploy(deploy_input(deploy, x)), net(x), rtol=1e-5, atol=1e-5)
    mlp = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).train()
    plain = deploy_model(mlp, torch.randn(3, 6), fold_bn=False)
    assert plain.lorita_deploy == {"folded": [], "baked": [], "memory_format": "contiguous"}
    assert not plain.training and mlp.training  # a copy in eval mode; the input is unchanged


def test_a_frozen_layer_stays_frozen_when_composed_merged_and_cut():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    net[0].requires_grad_(False)  # a frozen backbone layer

    def frozen(model):
        return {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}

    composed = lt.overparameterize(net, 3)
    assert frozen(composed) == {"0"} and frozen(lt.merge_model(composed)) == {"0"}
    cut = lt.truncate(composed, lt.Uniform(0.25))
    assert type(cut[0]).__name__ == "LowRankLinear" and frozen(cut) == {"0"}
    x = torch.randn(5, 8)
    cut(x).sum().backward()
    assert all(p.grad is None for p in cut[0].parameters())
    assert all(p.grad is not None for p in cut[2].parameters())


def test_a_torch_compile_wrapper_is_taken_off_everywhere(tmp_path):
    def plain():
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))

    torch.manual_seed(0)
    net, x = plain(), torch.randn(3, 1, 4, 4)
    compiled = torch.compile(net)  # compiles lazily: nothing below runs the wrapper
    assert [n for n, _ in lt.iter_layers(compiled)] == ["1", "3"]
    model = lt.overparameterize(compiled, 3, example_input=x)
    assert isinstance(model, nn.Sequential)
    assert [r["name"] for r in composition_summary(model)["layers"]] == ["1", "3"]
    assert isinstance(lt.merge_model(torch.compile(model)), nn.Sequential)
    small = lt.truncate(torch.compile(model), lt.Uniform(0.5), example_input=x)
    assert isinstance(small, nn.Sequential) and sorted(small.lorita_plan) == ["1", "3"]
    assert lt.count_cost(torch.compile(small), x) == lt.count_cost(small, x)
    lt.save(torch.compile(small), tmp_path / "s.safetensors")
    assert_close(lt.load(tmp_path / "s.safetensors")(x), small.eval()(x))
    back = lt.load(tmp_path / "s.safetensors", model=torch.compile(plain()))
    assert isinstance(back, nn.Sequential)
    assert_close(back(x), small(x))


def test_batchnorm_is_not_folded_where_folding_would_change_the_function(tmp_path):
    """Left unfolded, with the reason: a forward hook on the layer (it would see the folded
    output) or on the BatchNorm (it would be dropped), a BatchNorm in training mode inside an
    eval model, a layer whose bias another layer shares; a BatchNorm without running
    statistics still exports to ONNX."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 12, 12)

    def net():
        m = nn.Sequential(nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16))
        with torch.no_grad():
            m[1].running_mean.normal_(), m[1].running_var.uniform_(0.5, 2), m[1].weight.normal_()
        return m.eval()

    hooked_conv, hooked_bn, training = net(), net(), net()
    hooked_conv[0].register_forward_hook(lambda mod, a, out: out * 2 + 1)
    hooked_bn[1].register_forward_hook(lambda mod, a, out: out * 2 + 1)
    training[1].train()
    for m, why in (
        (hooked_conv, "'0' has forward hooks"),
        (hooked_bn, "it has forward hooks"),
        (training, "training mode"),
    ):
        folded = lt.fold_batchnorm(m, x)
        assert why in folded.lorita_unfolded["1"] and not folded.lorita_folded
    with torch.no_grad():
        assert_close(lt.deploy_model(hooked_conv, x)(x), hooked_conv(x))

    class SharedBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 1)
            self.c2.bias, self.bn = self.c1.bias, nn.BatchNorm2d(16)

        def forward(self, x):
            return torch.cat([self.bn(self.c1(x)), self.c2(x)], 1)

    shared = SharedBias().eval()
    with torch.no_grad():
        shared.bn.running_mean.normal_()
        assert_close(lt.deploy_model(shared, x)(x), shared(x))
    assert "shared" in lt.fold_batchnorm(shared, x).lorita_unfolded["bn"]
    pytest.importorskip("onnxruntime")
    stats_free = nn.Sequential(nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16, track_running_stats=False))
    lt.export_onnx(stats_free.eval(), x, tmp_path / "m.onnx")
