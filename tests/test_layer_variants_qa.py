"""Layer variants and model states of a hand-written model, through the whole path: compose,
train a step, merge, cut, save/load, ONNX. Convolution options other tests do not run end to
end, layers LoRITa leaves (other convolutions, lazy ones, parametrized ones), frozen layers
under fine-tuning, and Sequential models a file cannot rebuild on its own (hooks, weights a
hook computes)."""

import copy

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn
from torch.nn.utils import parametrizations
from torch.testing import assert_close

import lorita as lt


def _onnx_outputs(path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _whole_path(build, x, tmp_path, *, cut: float = 0.25, onnx: bool = False, alone=True):
    """compose keeps the function -> one step moves every trainable factor -> the merge loads
    strictly into a fresh instance -> full rank is the identity -> the cut costs no more
    FLOPs -> save/load onto a fresh instance (and, for a Sequential, from the file alone)."""
    torch.manual_seed(0)
    net = build().eval()
    with torch.no_grad():
        ref = net(x)
    model = lt.overparameterize(net, 3, example_input=x)
    with torch.no_grad():
        assert_close(model(x), ref, rtol=1e-5, atol=1e-5)

    step = copy.deepcopy(model).train()
    factors = {n: p.detach().clone() for n, p in step.named_parameters() if ".factors." in n}
    assert factors
    step(x).pow(2).sum().backward()
    torch.optim.SGD([p for p in step.parameters() if p.requires_grad], lr=0.1).step()
    params = dict(step.named_parameters())
    assert not [n for n, p in factors.items() if torch.equal(params[n], p)]

    fresh = build().eval()
    fresh.load_state_dict(lt.merge_model(model).state_dict(), strict=True)
    with torch.no_grad():
        assert_close(fresh(x), ref, rtol=1e-5, atol=1e-5)
        full = lt.truncate(model, lt.Uniform(1.0), example_input=x)
        assert_close(full(x), ref, rtol=1e-5, atol=1e-5)
    small = lt.truncate(model, lt.Uniform(cut), example_input=x)
    assert lt.count_cost(small, x).flops <= lt.count_cost(net, x).flops
    path = lt.save(small, tmp_path / "cut.safetensors")
    with torch.no_grad():
        assert_close(lt.load(path, model=build())(x), small(x))
        if alone and isinstance(net, nn.Sequential):
            assert_close(lt.load(path)(x), small(x))
    if onnx:
        onnx_path = lt.export_onnx(small, x, tmp_path / "cut.onnx")
        with torch.no_grad():
            assert_close(_onnx_outputs(onnx_path, x), small(x), rtol=1e-4, atol=1e-4)
    return model, small


def _summary(model) -> dict[str, tuple[str, str, str]]:
    rows = lt.composition_summary(model)["layers"]
    return {r["name"]: (r["kind"], r["action"], r["why"]) for r in rows}


# --------------------------------------------------------------------------- bugs found


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )  # fmt: skip


def _old_weight_norm():
    net = _mlp()
    torch.nn.utils.weight_norm(net[2])
    return net


def _old_spectral_norm():
    net = _mlp()
    torch.nn.utils.spectral_norm(net[2])
    return net


def _pruned():
    net = _mlp()
    prune.l1_unstructured(net[2], "weight", 0.5)
    return net


def _extra_buffer():
    net = _mlp()
    net[2].register_buffer("scale", torch.ones(32))
    return net


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(
    "build, held",
    [
        (_old_weight_norm, "weight_g, weight_v"),
        (_old_spectral_norm, "weight_orig, weight_u, weight_v"),
        (_pruned, "weight_mask, weight_orig"),
        (_extra_buffer, "scale"),
    ],
)
def test_a_sequential_whose_layer_holds_other_tensors_names_it_when_loaded_alone(
    build, held, tmp_path
):
    """A Sequential whose Linear keeps its weight under other names (an old-style
    weight_norm / spectral_norm hook, a pruning mask) or holds another tensor was saved as
    a plain tree; ``load(path)`` of that very file then failed with "'2.weight' is missing
    from the file". The file now says what it holds and that load needs the model."""
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    composed = lt.overparameterize(build(), 3)
    for model in (build(), composed):
        path = lt.save(model, tmp_path / "m.safetensors")
        with torch.no_grad():
            assert_close(lt.load(path, model=build())(x), model.eval()(x))
        if model is composed and build is _pruned:  # the mask is baked in: a plain tree
            assert_close(lt.load(path)(x), model(x))
            continue
        arch = lt.read_spec(path)["arch"]
        assert "tree" not in arch and arch["why"] == f"its layer '2' is a Linear holding {held}"
        with pytest.raises(ValueError, match=r"^model: .*\(its layer '2' is a Linear holding "):
            lt.load(path)


def _hook_on_layer():
    net = _mlp()
    net[2].register_forward_hook(lambda module, args, out: out * 2)
    return net, "its layer '2' is a Linear with a forward hook"


def _hook_on_model():
    net = _mlp()
    net.register_forward_pre_hook(lambda module, args: (args[0] + 1,))
    return net, "it is a Sequential with a forward hook"


def _hook_inside():
    net = nn.Sequential(nn.Linear(16, 32), nn.Sequential(nn.ReLU(), nn.Linear(32, 4)))
    net[1][0].register_forward_hook(lambda module, args, out: out - 1)
    return net, "its layer '1.0' is a ReLU with a forward hook"


@pytest.mark.parametrize("build", [_hook_on_layer, _hook_on_model, _hook_inside])
def test_a_sequential_with_a_forward_hook_is_not_rebuilt_without_it(build, tmp_path):
    """A hook changes what the model computes, and a file cannot hold one: ``load(path)``
    rebuilt the tree without it and silently returned another function. It now asks for
    the model (whose hooks a load onto it keeps); a backward hook alone changes nothing."""
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    net, why = build()
    for model in (net, lt.truncate(lt.overparameterize(net, 3), lt.Uniform(0.5))):
        path = lt.save(model, tmp_path / "h.safetensors")
        assert lt.read_spec(path)["arch"]["why"] == why
        with pytest.raises(ValueError, match=r"with a forward hook, which a file cannot describe"):
            lt.load(path)
        with torch.no_grad():
            assert_close(lt.load(path, model=build()[0])(x), model.eval()(x))

    plain = _mlp()
    plain[2].register_full_backward_hook(lambda module, gin, gout: None)
    assert "tree" in lt.read_spec(lt.save(plain, tmp_path / "b.safetensors"))["arch"]


def test_a_composed_file_loads_onto_a_pruned_instance_under_no_grad(tmp_path):
    """Under torch.no_grad() a pruned layer's weight (an attribute its hook computes) is a
    leaf the meta copy that checks the file kept on the CPU, and the check failed with
    "Cannot copy out of meta tensor; no data!" instead of loading."""
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    model = lt.overparameterize(_pruned(), 3)
    path = lt.save(model, tmp_path / "p.safetensors")
    with torch.no_grad():
        back = lt.load(path, model=_pruned())
        assert_close(back(x), model(x))
    assert isinstance(back[2], lt.FactorLinear)


class _ReadsLayerBuffer(nn.Module):
    """A plain Linear given a buffer (and a parameter) the model reads beside calling it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.fc.register_buffer("scale", torch.linspace(0.5, 2.0, 8))
        self.fc.shift = nn.Parameter(torch.full((8,), 0.1))
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x) * self.fc.scale + self.fc.shift))


def test_a_plain_layer_holding_tensors_the_model_reads_is_left_with_why(tmp_path):
    """A plain nn.Linear with a buffer or parameter hung on it was composed into a layer
    without them: the model's forward failed ("'FactorLinear' object has no attribute
    'scale'"), and so did every cut. It is now left as it is, named, as a subclass holding
    more than its weight is; a pruned layer (weight_orig, weight_mask) is still composed."""
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    net = _ReadsLayerBuffer()
    model, small = _whole_path(_ReadsLayerBuffer, x, tmp_path)
    assert _summary(model)["fc"] == (
        "own_forward", "left",
        "it holds shift, scale beside its weight and bias, which the model may read: composing "
        "or cutting it would drop them",
    )  # fmt: skip
    assert type(model.fc) is nn.Linear and isinstance(model.out, lt.FactorLinear)
    assert sorted(small.lorita_plan) == ["out"]
    with pytest.raises(ValueError, match=r"^layers: 'fc' cannot be cut: it holds shift, scale"):
        lt.truncate(net, lt.Uniform(0.5), layers=["fc"])
    assert_close(lt.truncate(net, lt.Uniform(1.0))(x), net(x))

    pruned = _pruned()
    assert _summary(lt.overparameterize(pruned, 3))["2"][:2] == ("linear", "composed")


class _ReadsLayerAttribute(nn.Module):
    """Plain Linears given plain attributes the model reads beside calling them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.fc.temperature = 3.0
        self.fc._offset = 0.25
        self.out = nn.Linear(32, 2)
        self.out.labels = ("cat", "dog")

    def forward(self, x):
        h = torch.relu(self.fc(x) / self.fc.temperature + self.fc._offset)
        return self.out(h) * len(self.out.labels)


def test_plain_attributes_the_model_reads_stay_on_the_layer_through_every_form(tmp_path):
    """A plain attribute on a layer (fc.temperature = 3.0) was lost by compose: the model's
    forward raised AttributeError on 'FactorLinear'. It is kept by compose, merge and the
    thin and dense cuts."""
    x = torch.randn(4, 16)
    model, small = _whole_path(_ReadsLayerAttribute, x, tmp_path)
    assert "fc" in small.lorita_plan
    for m in (
        model,
        small,
        lt.merge_model(model),
        lt.truncate(model, lt.Uniform(0.25), form="dense"),
    ):
        assert (m.fc.temperature, m.fc._offset, m.out.labels) == (3.0, 0.25, ("cat", "dog"))
        with torch.no_grad():
            m(x)


# --------------------------------------------------------------------------- checked, fine


def _conv_net(cin: int = 4, mid: int = 16, **first) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, mid, **first), nn.ReLU(), nn.Conv2d(mid, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip


CONVS = {
    "stride and dilation": dict(kernel_size=3, stride=2, dilation=2, padding=2),
    "same reflect": dict(kernel_size=3, padding="same", padding_mode="reflect"),
    "replicate stride 2": dict(kernel_size=3, padding=1, stride=2, padding_mode="replicate"),
    "1x1 no bias": dict(kernel_size=1, bias=False),
    "stride over kernel": dict(kernel_size=2, stride=3),
    "groups, 2 in 6 out each": dict(kernel_size=3, padding=1, groups=2, mid=12),
    "groups, 2 in 1 out each": dict(kernel_size=3, padding=1, groups=2, mid=2),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_convolution_options_take_the_whole_path(name, tmp_path):
    pytest.importorskip("onnxruntime")
    kw = dict(CONVS[name])
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(0))
    model, _ = _whole_path(lambda: _conv_net(**kw), x, tmp_path, onnx=name == "same reflect")
    kind = "grouped_conv" if kw.get("groups", 1) > 1 else "conv"
    assert _summary(model)["0"][:2] == (kind, "composed")


def test_a_channel_multiplier_convolution_is_left_as_depthwise_with_why(tmp_path):
    x = torch.randn(2, 4, 9, 9)
    build = lambda: _conv_net(kernel_size=3, padding=1, groups=4)  # noqa: E731
    model, small = _whole_path(build, x, tmp_path)
    assert _summary(model)["0"] == (
        "depthwise", "left", "depthwise convolution (one input channel per group): nothing to gain"
    )  # fmt: skip
    assert type(small[0]) is nn.Conv2d and "0" not in small.lorita_plan


class _OtherConvs(nn.Module):
    """Conv3d, ConvTranspose2d and Conv1d beside the layers LoRITa composes."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv3d(1, 2, 3, padding=1)
        self.up = nn.ConvTranspose2d(2, 4, 2, stride=2)
        self.c2 = nn.Conv2d(4, 16, 3, padding=1)
        self.c1 = nn.Conv1d(4, 8, 3, padding=1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):  # (B, 1, 4, 6, 6)
        h = self.up(self.c3(x).mean(2))  # (B, 4, 12, 12)
        a = self.c2(h).mean((2, 3))  # (B, 16)
        b = self.c1(h.mean(3)).mean(2)  # (B, 8)
        return self.fc(torch.cat([a, b], 1))


def test_other_convolutions_are_left_named_and_survive_cut_save_and_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    x = torch.randn(2, 1, 4, 6, 6)
    model, small = _whole_path(_OtherConvs, x, tmp_path, onnx=True)
    rows = _summary(model)
    for name, cls in (("c3", "Conv3d"), ("up", "ConvTranspose2d"), ("c1", "Conv1d")):
        assert rows[name][:2] == ("other", "left") and rows[name][2].startswith(cls)
        assert type(getattr(small, name)).__name__ == cls
    assert sorted(small.lorita_plan) == ["c2", "fc"]
    with pytest.raises(ValueError, match=r"^layers: 'up' cannot be cut"):
        lt.truncate(model, lt.Uniform(0.5), layers=["up"])


def test_very_thin_and_very_wide_linear_layers(tmp_path):
    """A 1 -> 4096 -> 1 network is rank 1 everywhere: nothing to cut, the plan says so and
    the cut costs the same; a 4096 -> 64 layer is cut below its cost."""
    model, small = _whole_path(
        lambda: nn.Sequential(nn.Linear(1, 4096), nn.ReLU(), nn.Linear(4096, 1)),
        torch.randn(3, 1),
        tmp_path,
    )
    assert {n: (p["rank"], p["why"]) for n, p in small.lorita_plan.items()} == {
        "0": (1, "full rank: not cut"), "2": (1, "full rank: not cut"),
    }  # fmt: skip
    x = torch.randn(3, 4096)
    build = lambda: nn.Sequential(nn.Linear(4096, 64), nn.ReLU(), nn.Linear(64, 1))  # noqa: E731
    _, small = _whole_path(build, x, tmp_path)
    assert lt.count_cost(small, x).flops < lt.count_cost(build(), x).flops / 2


def test_a_lazy_convolution_that_saw_no_batch_is_named_by_every_call():
    def net():
        return nn.Sequential(nn.LazyConv2d(8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))

    lazy = r"^model: layer '0' has uninitialised \(lazy\) parameters; run one batch"
    for call in (
        lambda: lt.overparameterize(net(), 3),
        lambda: lt.truncate(net(), lt.Uniform(0.5)),
        lambda: lt.layer_spectra(net()),
    ):
        with pytest.raises(ValueError, match=lazy):
            call()
    ready = net()
    x = torch.randn(2, 3, 6, 6)
    ready(x)
    model = lt.overparameterize(ready, 3, example_input=x)
    assert [r[:2] for r in _summary(model).values()] == [("conv", "composed")] * 1 + [
        ("linear", "composed")
    ]
    assert_close(model(x), ready(x), rtol=1e-5, atol=1e-5)


def _orthogonal():
    net = _mlp()
    parametrizations.orthogonal(net[2])
    return net


def test_an_orthogonal_parametrization_is_left_and_kept_through_the_path(tmp_path):
    model, small = _whole_path(_orthogonal, torch.randn(4, 16), tmp_path, alone=False)
    kind, action, why = _summary(model)["2"]
    assert (kind, action) == ("parametrized", "left") and "(Orthogonal)" in why
    assert torch.nn.utils.parametrize.is_parametrized(small[2])


def test_a_frozen_layer_stays_unchanged_by_fine_tuning_with_weight_decay():
    """Weight decay touches only what has a gradient: the frozen layer's factors and its cut
    form stay as they were, under an optimizer over every parameter and under finetune."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    net[1].requires_grad_(False)
    model = lt.overparameterize(net, 3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("1.")}
    assert frozen and not any(p.requires_grad for p in model[1].parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    x = torch.randn(8, 1, 8, 8)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    assert not torch.equal(params["3.factors.0"], lt.overparameterize(net, 3)[3].factors[0])

    splits = lt.load_dataset("digits")
    small = lt.truncate(model, lt.Uniform(0.5))
    tuned = lt.finetune(small, splits, epochs=1, optimizer="sgd", lr=0.05, weight_decay=0.5)
    before, after = dict(small.named_parameters()), dict(tuned.named_parameters())
    for n, p in after.items():
        assert p.requires_grad == (not n.startswith("1."))
        assert torch.equal(p, before[n]) == n.startswith("1.")


def test_composing_a_wrapped_composed_model_again_is_refused_not_stacked():
    model = lt.overparameterize(_mlp(), 3)
    for wrapped in (nn.DataParallel(model), torch.compile(model)):
        with pytest.raises(ValueError, match=r"layer '0' is already a FactorLinear; merge_model"):
            lt.overparameterize(wrapped, 3)
    again = lt.overparameterize(lt.merge_model(model), 2)
    assert [len(again[i].factors) for i in (0, 2, 4)] == [2, 2, 2]


def test_no_call_changes_the_users_model_or_its_modes(tmp_path):
    """A model in training mode with BatchNorm and Dropout (one block in eval mode): every
    call leaves its weights, running statistics and modes as they were."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).train()  # fmt: skip
    net[3].eval()
    x = torch.randn(4, 3, 8, 8)
    model = lt.overparameterize(net, 3, example_input=x)
    modes = {n: m.training for n, m in net.named_modules()}
    for kept in (model, lt.merge_model(model)):
        assert {n: m.training for n, m in kept.named_modules() if n in modes} == modes
    for m in (net, model):
        state = {k: v.clone() for k, v in m.state_dict().items()}
        modes = [c.training for c in m.modules()]
        lt.truncate(m, lt.Uniform(0.5), example_input=x, by="latency")
        lt.count_cost(m, x)
        lt.save(m, tmp_path / "f.safetensors", fold_bn=True, example_input=x)
        lt.export_onnx(m, x, tmp_path / "m.onnx")
        lt.deploy_model(m, x)
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
        assert [c.training for c in m.modules()] == modes
