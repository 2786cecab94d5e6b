"""The whole path (compose, train, merge, cut, save/load, ONNX) on model forms users write:
other dtypes and memory formats, hooked and parametrized layers, compiled layers, shared
layers and unusual convolutions."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.testing import assert_close

import lorita as lt


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def _conv_net(**first) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(4, 16, **first), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip


def _onnx_outputs(path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _whole_path(build, x, tmp_path, *, tol: float, plain=None, onnx: bool = False):
    """compose -> same function -> a step moves every trainable factor -> merge loads strictly
    into a fresh plain instance -> full rank is the identity -> a real cut costs fewer FLOPs
    -> save/load onto a fresh instance -> (ONNX) same outputs."""
    torch.manual_seed(0)
    net = build()
    with torch.no_grad():
        ref = net(x).float()
    model = lt.overparameterize(net, 3, example_input=x)
    with torch.no_grad():
        assert_close(model(x).float(), ref, rtol=tol, atol=tol)

    step = copy.deepcopy(model).train()
    factors = {n: p.detach().clone() for n, p in step.named_parameters() if ".factors." in n}
    assert factors
    step(x).float().pow(2).sum().backward()
    torch.optim.SGD([p for p in step.parameters() if p.requires_grad], lr=0.1).step()
    params = dict(step.named_parameters())
    stuck = [n for n, p in factors.items() if params[n].requires_grad and torch.equal(params[n], p)]
    assert not stuck

    fresh = (plain or build)()
    fresh.load_state_dict(lt.merge_model(model).state_dict(), strict=True)
    with torch.no_grad():
        assert_close(fresh(x).float(), ref, rtol=tol, atol=tol)
        full = lt.truncate(model, lt.Uniform(1.0), example_input=x)
        assert_close(full(x).float(), ref, rtol=tol, atol=tol)
    cut = lt.truncate(model, lt.Uniform(0.25), example_input=x)
    assert lt.count_cost(cut, x).flops < lt.count_cost(net, x).flops
    back = lt.load(lt.save(cut, tmp_path / "cut.safetensors"), model=build())
    with torch.no_grad():
        assert_close(back(x), cut(x))
    if onnx:
        path = lt.export_onnx(cut, x, tmp_path / "cut.onnx")
        with torch.no_grad():
            assert_close(_onnx_outputs(path, x).float(), cut(x).float(), rtol=1e-3, atol=1e-3)
    return model, cut


# --------------------------------------------------------------------------- bugs found


def _compiled_layer() -> nn.Module:
    net = _mlp()
    net[2] = torch.compile(net[2], backend="eager")  # one layer compiled, not the model
    return net


def _compiled_block() -> nn.Module:
    net = _mlp()
    return nn.Sequential(torch.compile(net[:3], backend="eager"), net[3], net[4])


def test_a_compiled_layer_inside_a_model_runs_its_composed_and_cut_form(tmp_path):
    """A torch.compile wrapper calls the module it was made with: after its layer was
    composed or cut it kept calling the old plain layer (the factors unused: training the
    composed model did not train them; a cut loaded onto a fresh compiled instance ran the
    fresh layer), and the ONNX exporters cannot trace the wrapper (now taken off)."""
    pytest.importorskip("onnxruntime")
    x = torch.randn(4, 16)
    model, cut = _whole_path(_compiled_layer, x, tmp_path, tol=1e-5, onnx=True)
    assert isinstance(model[2]._orig_mod, lt.FactorLinear)
    with torch.no_grad():
        before = model(x)
        for p in model[2]._orig_mod.factors:
            p.zero_()
        assert not torch.allclose(model(x), before)  # the wrapper runs the composed layer


def test_a_compiled_block_is_composed_inside_and_taken_off_for_onnx(tmp_path):
    """The pass that traces which weights are read directly ran the compiled block without
    its hooks: its layers were taken for weights read directly, so every cut of them stayed
    dense; and the ONNX exporters cannot trace the wrapper."""
    pytest.importorskip("onnxruntime")
    x = torch.randn(4, 16)
    model = lt.overparameterize(_compiled_block(), 3, example_input=x)
    assert isinstance(model[0]._orig_mod[2], lt.FactorLinear) and not model.lorita_direct
    cut = lt.truncate(model, lt.Uniform(0.25), example_input=x)
    assert isinstance(cut[0]._orig_mod[2], lt.LowRankLinear)
    deployed = lt.deploy_model(cut)
    assert isinstance(deployed[0], nn.Sequential)  # the wrapper taken off, the cut kept
    path = lt.export_onnx(cut, x, tmp_path / "cut.onnx")
    with torch.no_grad():
        assert_close(_onnx_outputs(path, x), cut(x), rtol=1e-4, atol=1e-4)


def test_onnx_of_a_same_padded_convolution_dilated_with_an_odd_pad_runs(tmp_path):
    """padding="same" whose total pad is odd along one axis (kernel 2, or dilation times an
    odd kernel's reach) stayed "same", which the exporter writes as auto_pad: onnxruntime
    refuses that with dilation; it is written as an explicit pad before the convolution."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = _conv_net(kernel_size=(2, 3), padding="same", dilation=(1, 2)).eval()
    x = torch.randn(2, 4, 9, 9)
    for model in (net, lt.truncate(lt.overparameterize(net, 3), lt.Uniform(0.5))):
        path = lt.export_onnx(model, x, tmp_path / "same.onnx")
        with torch.no_grad():
            assert_close(_onnx_outputs(path, x), model(x), rtol=1e-4, atol=1e-4)
    assert net[0].padding == "same" and net[0].padding_mode == "zeros"  # the model unchanged


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.mid = nn.Linear(12, 12)
        self.again = self.mid  # one layer under two names
        self.out = nn.Linear(12, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.relu(self.again(torch.relu(self.mid(self.emb(x))))))


def test_layers_naming_a_module_no_cut_may_take_say_why():
    """``truncate(..., layers=[...])`` called a parametrized or depthwise layer (listed by
    composition_summary) an unknown name, and cut a tied layer named there: its dense cut
    made the embedding it shares its weight with low-rank too, unsaid."""
    from torch.nn.utils.parametrizations import weight_norm

    net = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(), weight_norm(nn.Conv2d(4, 8, 1)), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 7 * 7, 3),
    )  # fmt: skip
    model = lt.overparameterize(net, 3, example_input=torch.randn(2, 4, 9, 9))
    for name, why in (
        ("0", r"'0' cannot be cut: depthwise convolution"),
        ("2", r"'2' cannot be cut: its weight is computed by a parametrization \(WeightNorm\)"),
        ("1", r"'1' cannot be cut: a ReLU has no matrices"),
    ):
        with pytest.raises(ValueError, match=f"^layers: {why}"):
            lt.truncate(model, lt.Uniform(0.5), layers=["5", name])
    with pytest.raises(ValueError, match=r"^layers: unknown layer name\(s\) \['nope'\]"):
        lt.truncate(model, lt.Uniform(0.5), layers=["nope"])

    # explicit ranks for such a module say the same (not "unknown"), in truncate and Compressor
    with pytest.raises(ValueError, match=r"^ranks: '2' cannot be cut: its weight is computed"):
        lt.truncate(model, lt.Ranks({"2": 2}), example_input=torch.randn(2, 4, 9, 9))
    with pytest.raises(ValueError, match=r"^ranks: unknown layer name\(s\) \['nope'\]"):
        lt.truncate(model, lt.Ranks({"nope": 2}), example_input=torch.randn(2, 4, 9, 9))

    tied = _Tied()
    table = tied.emb.weight.detach().clone()
    for form in ("dense", "low_rank"):
        with pytest.raises(ValueError, match=r"^layers: 'out' cannot be cut: .*tied parameters"):
            lt.truncate(tied, lt.Uniform(0.25), layers=["mid", "out"], form=form)
        with pytest.raises(ValueError, match=r"^layers: 'again' cannot be cut: it is layer 'mid'"):
            lt.truncate(tied, lt.Uniform(0.25), layers=["again"], form=form)
    assert torch.equal(tied.emb.weight, table)
    small = lt.truncate(tied, lt.Uniform(0.25), layers=["mid"], form="dense")
    assert torch.equal(small.emb.weight, table) and small.out.weight is small.emb.weight
    assert small.again is small.mid and sorted(small.lorita_plan) == ["mid"]


def test_a_layer_whose_bias_alone_is_parametrized_is_left_and_says_bias():
    class Positive(nn.Module):
        def forward(self, b):
            return b.abs()

    net = _mlp()
    parametrize.register_parametrization(net[2], "bias", Positive())
    rows = {r["name"]: r for r in lt.composition_summary(lt.overparameterize(net, 3))["layers"]}
    assert rows["2"]["action"] == "left"
    assert rows["2"]["why"].startswith("its bias is computed by a parametrization (Positive)")


def test_a_composed_or_cut_model_inside_dataparallel_keeps_what_it_records():
    """A composed model wrapped for training (DataParallel) had no composition summary ("not
    made by overparameterize"), and a dense cut so wrapped, cut again, forgot its ranks: a
    full-rank cut of it recorded the full widths, not the ranks it holds."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    model = lt.overparameterize(net, 3)
    assert lt.composition_summary(nn.DataParallel(model)) == lt.composition_summary(model)
    dense = lt.truncate(model, lt.Uniform(0.25), form="dense")
    again = lt.truncate(nn.DataParallel(dense), lt.Uniform(1.0))
    assert (
        again.lorita_ranks == dense.lorita_ranks == lt.truncate(dense, lt.Uniform(1.0)).lorita_ranks
    )
    assert again.lorita_ranks["0"] < 32


# --------------------------------------------------------------------------- checked, fine


class _MixedDtypes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32).double()
        self.b = nn.Linear(32, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x.double())).float())


class _Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).T


def _own_parametrization() -> nn.Module:
    net = _mlp()
    parametrize.register_parametrization(net[2], "weight", _Symmetric())
    return net


def _hooked() -> nn.Module:
    net = _mlp()
    net[2].register_forward_pre_hook(lambda m, args: (args[0] + 1,))
    net[2].register_forward_hook(lambda m, args, kwargs, out: out * 2, with_kwargs=True)
    return net


_SEED = torch.Generator().manual_seed(0)
_X = torch.randn(4, 16, generator=_SEED)
_XI = torch.randn(2, 4, 9, 9, generator=_SEED)
FORMS = {
    "float64": (lambda: _mlp().double(), _X.double(), 1e-9, True),
    "float16": (lambda: _mlp().half(), _X.half(), 2e-2, True),
    "bfloat16 conv": (lambda: _conv_net(kernel_size=3).bfloat16(), _XI.bfloat16(), 6e-2, False),
    "mixed dtypes": (_MixedDtypes, _X, 1e-5, False),
    "channels_last": (
        lambda: _conv_net(kernel_size=3, padding=1).to(memory_format=torch.channels_last),
        _XI.to(memory_format=torch.channels_last),
        1e-5,
        True,
    ),
    "hooks": (_hooked, _X, 1e-5, True),
    "own parametrization": (_own_parametrization, _X, 1e-5, False),
    "circular same 2x3": (
        lambda: _conv_net(kernel_size=(2, 3), padding="same", padding_mode="circular"),
        _XI,
        1e-5,
        True,
    ),
    "reflect 1xk stride": (
        lambda: _conv_net(
            kernel_size=(1, 3), stride=(1, 2), padding=(0, 1), padding_mode="reflect"
        ),
        _XI,
        1e-5,
        False,
    ),
    "grouped dilated no bias": (
        lambda: _conv_net(kernel_size=3, groups=2, dilation=2, padding=2, bias=False),
        _XI,
        1e-5,
        False,
    ),
    "one input": (
        lambda: nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 1)),
        torch.randn(4, 1, generator=_SEED),
        1e-5,
        False,
    ),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_the_whole_path_on_other_model_forms(form, tmp_path):
    build, x, tol, onnx = FORMS[form]
    if onnx:
        pytest.importorskip("onnxruntime")
    model, cut = _whole_path(build, x, tmp_path, tol=tol, onnx=onnx)
    dtypes = {n: p.dtype for n, p in build().named_parameters()}
    merged = lt.merge_model(model)
    assert {n: p.dtype for n, p in merged.named_parameters()} == dtypes
    if form == "hooks":
        assert model[2]._forward_pre_hooks and model[2]._forward_hooks_with_kwargs
    if form == "own parametrization":
        rows = {r["name"]: r for r in lt.composition_summary(model)["layers"]}
        assert rows["2"]["action"] == "left" and parametrize.is_parametrized(cut[2])


def test_a_pruned_layer_merges_into_the_plain_architecture_and_loads_onto_a_pruned_one(tmp_path):
    """torch.nn.utils.prune keeps weight_orig and weight_mask: the merge is the plain
    architecture (the mask baked in), and a cut loads onto a freshly pruned instance."""
    import torch.nn.utils.prune as prune

    def pruned():
        torch.manual_seed(1)
        net = _mlp()
        prune.l1_unstructured(net[2], "weight", 0.5)
        return net

    _whole_path(pruned, _X, tmp_path, tol=1e-5, plain=_mlp)


def test_composing_twice_and_merging_or_cutting_a_plain_model():
    torch.manual_seed(0)
    net = _mlp()
    model = lt.overparameterize(net, 3)
    with pytest.raises(ValueError, match=r"layer '0' is already a FactorLinear; merge_model"):
        lt.overparameterize(model, 3)
    merged = lt.merge_model(net)  # nothing to merge: a copy
    assert merged is not net and torch.equal(merged(_X), net(_X))
    cut = lt.truncate(net, lt.Uniform(0.25))  # a plain model is cut by the SVD of its weights
    assert isinstance(cut[0], lt.LowRankLinear)
    assert lt.count_cost(cut, _X).params < lt.count_cost(net, _X).params
    for layers in (["nope"], ["0", "zz"]):
        with pytest.raises(ValueError, match=r"layers: unknown layer name\(s\).*layers are: 0, 2"):
            lt.truncate(model, lt.Uniform(0.5), layers=layers)
