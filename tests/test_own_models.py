"""Hand-written models as users write them: hooks on layers, layers kept in plain lists,
weights asked only for their device or dtype, a model cut before, and the errors users see."""

import copy

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn
from torch.testing import assert_close

import lorita as lt
from lorita.layers import FactorLinear, LowRankLinear


class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.handle = self.conv.register_forward_hook(lambda m, i, o: o * 2)
        self.fc.register_forward_pre_hook(lambda m, args: (args[0] + 1,))

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_a_users_hooks_move_to_the_composed_merged_and_cut_layers():
    torch.manual_seed(0)
    net, x = Hooked().eval(), torch.randn(2, 3, 8, 8)
    model = lt.overparameterize(net, 3).eval()
    assert isinstance(model.fc, FactorLinear)
    assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)
    assert_close(lt.merge_model(model)(x), net(x), rtol=1e-5, atol=1e-5)
    full = lt.truncate(model, lt.Uniform(1.0))
    assert_close(full(x), net(x), rtol=1e-5, atol=1e-5)
    cut = lt.truncate(model, lt.Uniform(0.5))
    assert isinstance(cut.fc, LowRankLinear) and cut.fc._forward_pre_hooks
    model.handle.remove()  # the user's handle still removes the hook from the composed layer
    assert not model.conv._forward_hooks


def test_a_pruning_mask_is_baked_in_not_carried_as_a_hook():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    prune.l1_unstructured(net[0], "weight", 0.5)
    x = torch.randn(3, 8)
    model = lt.overparameterize(net, 3)
    assert not model[0]._forward_pre_hooks
    assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)


class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.order = list(self.blocks)  # the forward calls these, not self.blocks
        self._keep = {"first": (self.blocks[0],)}

    @property
    def first(self):
        return self._keep["first"][0]

    def forward(self, x):
        x = self.first(x)
        for b in self.order:
            x = torch.relu(b(x))
        return x


def test_layers_kept_in_plain_lists_are_replaced_there_too(tmp_path):
    torch.manual_seed(0)
    net, x = Aliased(), torch.randn(2, 8)
    model = lt.overparameterize(net, 3)
    assert model.order[0] is model.blocks[0] and model.first is model.blocks[0]
    assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)
    model(x).sum().backward()
    assert all(f.grad is not None for f in model.blocks[0].factors)
    cut = lt.truncate(model, lt.Uniform(0.25))
    assert isinstance(cut.order[1], LowRankLinear) and cut.first is cut.blocks[0]
    assert lt.count_cost(cut, x).flops < lt.count_cost(lt.merge_model(model), x).flops
    lt.save(cut, tmp_path / "a.safetensors")
    again = lt.load(tmp_path / "a.safetensors", model=Aliased())
    assert_close(again(x), cut(x))


class AsksForDevice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 10), nn.Linear(10, 10)

    def forward(self, x):
        x = x.to(next(self.parameters()).device).to(self.fc2.weight.dtype).type_as(self.fc1.weight)
        assert self.fc1.weight.shape[1] == x.shape[1] and self.fc1.weight.dim() == 2
        return self.fc2(torch.relu(self.fc1(x))) @ self.fc3.weight.T  # fc3: read directly


def test_reading_a_weights_device_or_dtype_is_not_reading_it_directly():
    x = torch.randn(1, 64)
    model = lt.overparameterize(AsksForDevice(), 3)
    assert model.lorita_direct == ("fc3",)
    small = lt.truncate(model, lt.Budget(30), example_input=x)
    assert small.lorita_plan["fc1"]["form"] == "thin"
    assert small.lorita_plan["fc3"]["form"] == "full"  # a dense cut saves nothing: kept whole
    assert lt.count_cost(small, x).params <= 0.3 * lt.count_cost(lt.merge_model(model), x).params


def test_a_budget_that_cannot_be_met_warns_and_says_what_it_kept():
    net = nn.Sequential(nn.Embedding(50, 16), nn.Flatten(), nn.Linear(64, 32), nn.Linear(32, 4))
    x = torch.zeros(2, 4, dtype=torch.long)
    model = lt.overparameterize(net, 3, example_input=x)
    with pytest.warns(UserWarning, match=r"budget: 10% of the parameters cannot be reached"):
        small = lt.truncate(model, lt.Budget(10), example_input=x)
    facts = small.lorita_budget
    assert facts["met"] is False and facts["kept_pct"] > 10 and facts["percent"] == 10
    fits = lt.truncate(model, lt.Budget(80), example_input=x).lorita_budget
    assert fits["met"] is True and fits["kept_pct"] <= 80


def test_a_cut_model_cut_again_keeps_at_most_its_ranks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    x = torch.randn(3, 64)
    small = lt.truncate(lt.overparameterize(net, 3), lt.Uniform(0.25))
    assert small.lorita_ranks == {"0": 16, "2": 2}
    same = lt.truncate(small, lt.Uniform(1.0))
    assert same.lorita_ranks == {"0": 16, "2": 2}
    assert_close(same(x), small(x), rtol=1e-5, atol=1e-5)
    assert lt.count_cost(same, x).params == lt.count_cost(small, x).params
    half = lt.truncate(small, lt.Uniform(0.5))
    assert half.lorita_ranks == {"0": 8, "2": 1}
    assert lt.count_cost(half, x).params < lt.count_cost(small, x).params
    with pytest.raises(
        ValueError, match=r"layer '0' is already cut \(LowRankLinear\).*merge_model"
    ):
        lt.overparameterize(small, 3)
    again = lt.overparameterize(lt.merge_model(small), 3)  # the advised way: same function
    assert_close(again(x), small(x), rtol=1e-5, atol=1e-5)


def test_a_layer_cut_to_a_dense_rank_r_weight_is_cut_again_within_r(tmp_path):
    """A layer whose cut kept the dense form (rank 8 of 16 saves no FLOPs thin) is bound by
    its rank too when cut again, in memory and after save/load; fine-tuned past it (its
    weight no longer rank 8), it is not."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    small = lt.truncate(lt.overparameterize(net, 3), lt.Uniform(0.5))
    assert small.lorita_plan["2"]["form"] == "dense" and small.lorita_ranks["2"] == 8
    lt.save(small, tmp_path / "s.safetensors")
    for model in (small, lt.load(tmp_path / "s.safetensors")):
        assert lt.truncate(model, lt.Uniform(0.5)).lorita_ranks["2"] == 4
        with pytest.raises(ValueError, match=r"ranks\['2'\].*1 <= rank <= 8, got 12"):
            lt.truncate(model, lt.Ranks({"2": 12}))
    with torch.no_grad():
        small[2].weight.add_(0.01 * torch.randn(16, 16))  # as fine-tuning moves it
    assert lt.truncate(small, lt.Ranks({"2": 12})).lorita_ranks["2"] == 12


def test_policies_given_as_text_and_clear_errors_for_wrong_arguments():
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    model = lt.overparameterize(net, 3)
    assert (
        lt.truncate(model, "uniform:0.5").lorita_ranks
        == lt.truncate(model, lt.Uniform(0.5)).lorita_ranks
    )
    with pytest.raises(ValueError, match=r"policy: pass an instance .*Uniform\(\.\.\.\)"):
        lt.truncate(model, lt.Uniform)
    with pytest.raises(ValueError, match="policy: expected a policy"):
        lt.truncate(model, 0.5)
    with pytest.raises(ValueError, match="policy: expected NAME:VALUE"):
        lt.truncate(model, "uniform")
    with pytest.raises(ValueError, match="skip: expected a layer name or pattern"):
        lt.overparameterize(net, 3, skip=0)
    with pytest.raises(ValueError, match="model: expected a torch nn.Module, got function"):
        lt.overparameterize(lambda x: x, 3)
    with pytest.raises(ValueError, match=r"model: pass an instance \(Linear\(\.\.\.\)\)"):
        lt.overparameterize(nn.Linear, 3)


def test_an_input_the_model_refuses_is_named_in_the_error(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    net(torch.randn(1, 3, 8, 8))
    model = lt.overparameterize(net, 3)
    bad = torch.randn(1, 4, 8, 8)
    for call in (
        lambda: lt.count_cost(model, bad),
        lambda: lt.truncate(model, lt.Budget(30), example_input=bad),
        lambda: lt.export_onnx(model, bad, tmp_path / "m.onnx"),
    ):
        with pytest.raises(ValueError, match=r"example_input: the model refused it \(RuntimeError"):
            call()
    assert not list(tmp_path.iterdir())


def test_a_folder_as_the_file_and_a_torchscript_module_are_named(tmp_path):
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="path: .* is a folder"):
        lt.save(net, tmp_path)
    with pytest.raises(ValueError, match="path: .* is a folder"):
        lt.export_onnx(net, torch.randn(1, 4), tmp_path)
    assert not list(tmp_path.iterdir())
    traced = torch.jit.trace(net, torch.randn(1, 4))
    with pytest.raises(ValueError, match="model: a TorchScript module"):
        lt.overparameterize(traced, 3)
    with pytest.raises(ValueError, match="path: .* is a folder; give the file"):
        lt.load(tmp_path)


def test_a_model_on_the_meta_device_or_one_that_cannot_be_copied_is_named():
    """Weights without values (built on the meta device) and an attribute deepcopy refuses (a
    lock) get a one-line error naming them, not torch's own from deep inside."""
    import threading

    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 4))
    for call in (lambda: lt.overparameterize(meta, 3), lambda: lt.save_bytes(meta)):
        with pytest.raises(ValueError, match=r"parameter '0.weight' is on the 'meta' device"):
            call()

    class Locked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.guard = threading.Lock()

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(ValueError, match=r"model: it cannot be copied \(attribute 'guard'"):
        lt.overparameterize(Locked(), 3)


def test_a_frozen_batchnorm_stays_frozen_and_a_dataparallel_model_keeps_its_function(tmp_path):
    """Fine-tuning often keeps a BatchNorm in eval mode inside a model that trains. Composing
    (which traces a forward pass), counting costs and evaluating run the model in eval mode,
    then give each module back its own mode, not the root's."""
    from lorita.data import TensorDataset
    from lorita.engine.evaluate import evaluate

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)
    ).train()
    net[1].eval()
    x = torch.randn(4, 3, 8, 8)
    model = lt.overparameterize(net, 3)
    modes = [m.training for m in model]
    assert modes == [True, False, True, True, True]
    lt.count_cost(model, x)
    evaluate(model, TensorDataset(x, torch.tensor([0, 1, 2, 3])))
    assert [m.training for m in model] == modes

    plain = nn.Sequential(*[m for m in net]).eval()  # the same layers, all in eval mode
    wrapped = nn.DataParallel(plain)  # the wrapper itself is made in training mode
    assert wrapped.training and not plain[1].training
    composed = lt.overparameterize(wrapped, 3)  # the model it holds, as for torch.compile
    assert not isinstance(composed, nn.DataParallel) and not composed[1].training
    assert_close(composed(x), plain(x))
    assert list(lt.layer_spectra(wrapped)) == ["0", "4"]  # its layers, without "module."
    cut = lt.truncate(wrapped, lt.Uniform(0.5))
    lt.save(cut, tmp_path / "cut.safetensors")  # loads into the plain model, not a wrapper
    again = lt.load(
        tmp_path / "cut.safetensors", model=nn.Sequential(*[copy.deepcopy(m) for m in net])
    )
    assert_close(again.eval()(x), cut.eval()(x))


def test_evaluate_takes_a_module_like_callable():
    """evaluate runs anything with training, eval() and train(mode), as the app's wrapper of
    an onnxruntime session."""
    from lorita.data import TensorDataset
    from lorita.engine.evaluate import evaluate

    class Callable:
        training = True

        def __call__(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()

        def eval(self):
            self.training = False
            return self

        def train(self, mode: bool = True):
            self.training = mode
            return self

    f = Callable()
    x = torch.tensor([0.0, 1.0, 2.0, 1.0]).view(4, 1, 1, 1)
    assert evaluate(f, TensorDataset(x, torch.tensor([0, 1, 2, 0])))["acc"] == 0.75
    assert f.training


def test_a_budget_cut_with_forms_chosen_by_latency_says_what_it_really_keeps(monkeypatch):
    """Forms chosen by latency: a layer whose thin form is not faster stays dense at full
    cost, so the budget can be missed; ``lorita_budget`` counts the model returned, and the
    warning says why (here no thin form is ever faster)."""
    import lorita.kinds as kinds

    monkeypatch.setattr(kinds, "is_faster", lambda t_thin, t_dense: False)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64),
                        nn.ReLU(), nn.Linear(64, 4))  # fmt: skip
    x = torch.randn(2, 1, 8, 8)
    model = lt.overparameterize(net, 3)
    with pytest.warns(UserWarning, match=r"not met by the cut whose forms were chosen by latency"):
        small = lt.truncate(model, lt.Budget(30), example_input=x, by="latency")
    kept = 100 * lt.count_cost(small, x).params / lt.count_cost(net, x).params
    assert small.lorita_budget["met"] is False
    assert small.lorita_budget["kept_pct"] == pytest.approx(kept)
    by_flops = lt.truncate(model, lt.Budget(30), example_input=x)
    assert by_flops.lorita_budget["met"] is True
    assert 100 * lt.count_cost(by_flops, x).params / lt.count_cost(net, x).params <= 30


class _Alias(nn.Module):
    """One layer registered under two names (``self.b = self.a``) and called at both."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = self.a
        self.h = nn.Linear(64, 3)

    def forward(self, x):
        return self.h(torch.relu(self.b(torch.relu(self.a(x)))))


def test_a_layer_under_two_names_is_composed_and_cut_once_for_both(tmp_path):
    """The same module under two names is one layer (not tied weights of two modules): it
    is composed and cut once and stays one layer under both names, so the cut is smaller
    and the call sites share its weights; save/load and merging keep it so."""
    net, x = _Alias(), torch.randn(4, 64)
    model = lt.overparameterize(net, 3)
    assert model.a is model.b and isinstance(model.a, lt.FactorLinear)
    torch.testing.assert_close(model(x), net(x), rtol=1e-5, atol=1e-6)
    small = lt.truncate(model, lt.Uniform(0.25))
    assert small.a is small.b and isinstance(small.a, lt.LowRankLinear)
    assert lt.count_cost(small, x).params < lt.count_cost(net, x).params
    fresh = _Alias()
    fresh.load_state_dict(lt.merge_model(model).state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), net(x), rtol=1e-5, atol=1e-6)
    back = lt.load(lt.save(small, tmp_path / "s.safetensors"), model=_Alias())
    assert back.a is back.b
    torch.testing.assert_close(back(x), small(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_composes_to_the_same_function(dtype):
    """The null directions of a weight are decided at float32's precision at least: with
    bfloat16's own epsilon the rule (256 x 2^-8 > 1) took every direction of a 256-wide layer
    as null and zeroed its product."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).to(dtype)
    model = lt.overparameterize(net, 3)
    for i in (0, 2):
        w, merged = net[i].weight.float(), model[i].weight.float()
        assert (merged - w).norm() / w.norm() < 0.02
        assert bool(model[i].factors[-1].float().abs().sum(0).gt(0).all())  # no zeroed column


def test_a_partly_frozen_layer_keeps_which_part_is_frozen():
    """A frozen bias (or a frozen weight) stays frozen when the layer is composed, merged and
    cut; before, only a layer frozen whole stayed so."""
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    net[0].bias.requires_grad_(False)
    net[2].weight.requires_grad_(False)
    model = lt.overparameterize(net, 3)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags == {
        "0.bias": False, "0.factors.0": True, "0.factors.1": True, "0.factors.2": True,
        "2.bias": True, "2.factors.0": False, "2.factors.1": False, "2.factors.2": False,
    }  # fmt: skip
    merged = {n: p.requires_grad for n, p in lt.merge_model(model).named_parameters()}
    assert merged == {"0.weight": True, "0.bias": False, "2.weight": False, "2.bias": True}
    cut = {n: p.requires_grad for n, p in lt.truncate(model, lt.Uniform(0.5)).named_parameters()}
    assert cut["0.second.bias"] is False and cut["0.first.weight"] is True
    assert cut["2.second.bias"] is True and cut["2.first.weight"] is False


def test_old_style_weight_and_spectral_norm_are_left_as_they_are(tmp_path):
    """The hook-based torch.nn.utils.weight_norm / spectral_norm recompute the weight at every
    call, as a parametrization does: composing the layer would drop them from training, so
    it is left as it is, with the reason (as the parametrizations are)."""
    from torch.nn.utils import spectral_norm, weight_norm

    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            weight_norm(nn.Linear(8, 16)), nn.ReLU(), spectral_norm(nn.Linear(16, 16)),
            nn.ReLU(), nn.Linear(16, 4),
        )  # fmt: skip

    with pytest.warns(FutureWarning):
        net = build()
    model = lt.overparameterize(net, 3)
    rows = {r["name"]: r for r in model.lorita_summary["layers"]}
    assert rows["0"]["action"] == rows["2"]["action"] == "left"
    assert "WeightNorm" in rows["0"]["why"] and "SpectralNorm" in rows["2"]["why"]
    assert rows["4"]["action"] == "composed"
    assert any(type(h).__name__ == "WeightNorm" for h in model[0]._forward_pre_hooks.values())
    x = torch.randn(3, 8)
    lt.save(model.eval(), tmp_path / "m.safetensors")
    with pytest.warns(FutureWarning):
        back = lt.load(tmp_path / "m.safetensors", model=build()).eval()
    assert_close(back(x), model(x))


def test_weights_that_diverged_are_named_not_an_svd_error():
    """inf or NaN in a layer has no SVD: spectra, cuts and composing name the layer and the
    likely cause instead of torch's linalg error."""
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model = lt.overparameterize(net, 3)
    with torch.no_grad():
        model[2].factors[0][0, 0] = float("inf")
    for call in (lambda: lt.layer_spectra(model), lambda: lt.truncate(model, lt.Uniform(0.5))):
        with pytest.raises(ValueError, match=r"layer '2'.*inf or NaN.*diverged"):
            call()
    with torch.no_grad():
        net[4].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer '4': its parameter 'weight' holds inf or NaN"):
        lt.overparameterize(net, 3)


def test_the_compressor_takes_splits_of_features_or_token_ids():
    """Splits built by hand from torch TensorDatasets of features (N, F) or token ids (N, T)
    compress and fine-tune: the ids stay integers, and the preprocess records the input's own
    shape (it was a square image's before)."""
    from torch.utils.data import TensorDataset

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc, self.head = nn.Embedding(50, 16), nn.Linear(16, 32), nn.Linear(32, 3)

        def forward(self, ids):
            return self.head(torch.relu(self.fc(self.emb(ids).mean(1))))

    torch.manual_seed(0)
    for make, net in (
        (lambda n: (torch.randn(n, 20),), nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))),
        (lambda n: (torch.randint(0, 50, (n, 7)),), Tokens()),
    ):  # fmt: skip
        parts = [TensorDataset(*make(n), torch.randint(0, 3, (n,))) for n in (64, 32, 32)]
        splits = lt.Splits(*parts, in_channels=1, image_size=1, num_classes=3, name="mine")
        cz = lt.Compressor(lt.overparameterize(net, 3), splits)
        res = cz.finetune(cz.apply(lt.Budget(40)), epochs=1)
        assert (
            res.params_pct < 100 and res.finetune_epochs == 1 and 0 <= res.metrics["test_acc"] <= 1
        )
        assert cz.preprocess["input_shape"] == list(parts[0].tensors[0].shape[1:])


def test_lorita_datasets_of_other_inputs_refuse_what_needs_images():
    from lorita.data import TensorDataset

    with pytest.raises(ValueError, match=r"y: expected 4 targets"):
        TensorDataset(torch.zeros(4, 3, 8, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x: augmentation .* need images"):
        TensorDataset(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long), augment=True)
    ids = TensorDataset(torch.arange(8).view(4, 2), torch.zeros(4, dtype=torch.long))
    assert ids[torch.arange(4)][0].dtype == torch.long


def test_ranks_are_checked_when_the_policy_is_made():
    for bad in ({"fc": 0}, {"fc": 2.5}, {"fc": -3}, {"fc": True}):
        with pytest.raises(ValueError, match=r"ranks\['fc'\]: expected an integer >= 1"):
            lt.Ranks(bad)
    with pytest.raises(ValueError, match=r"ranks: expected layer names as keys"):
        lt.Ranks({0: 2})
