"""The README's library API on models an engineer writes: layers in ModuleDict / ModuleList
beside a ParameterList, a namedtuple output, a frozen first layer, a float64 model, a
channels_last one, non-square images, a dict output keyed by numbers (what torchvision's
IntermediateLayerGetter returns), and what a bad argument is told."""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torch.utils.data import TensorDataset

import lorita as lt

Out = collections.namedtuple("Out", "logits features")


class _Heads(nn.Module):
    """Layers in a ModuleList and a ModuleDict, a ParameterList read in forward, a frozen
    first layer, and a namedtuple output."""

    def __init__(self):
        super().__init__()
        self.body = nn.ModuleList([nn.Linear(12, 24), nn.Linear(24, 24)])
        self.scale = nn.ParameterList([nn.Parameter(torch.full((24,), 0.5))])
        self.heads = nn.ModuleDict({"cls": nn.Linear(24, 5), "aux": nn.Linear(24, 3)})
        self.body[0].requires_grad_(False)  # a pretrained layer kept as it is

    def forward(self, x):
        for layer in self.body:
            x = torch.relu(layer(x)) * self.scale[0]
        return Out(self.heads["cls"](x), self.heads["aux"](x))


def _frozen(model: nn.Module) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if not p.requires_grad)


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, (3, 1), stride=(2, 1), padding=(1, 0)), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5),
    )  # fmt: skip


def _onnx_outputs(path, feeds: dict) -> list[torch.Tensor]:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return names, [torch.from_numpy(a) for a in session.run(None, feeds)]


# --------------------------------------------------------------------------- found and fixed


def test_deploy_model_names_an_example_that_is_not_a_tensor():
    """Before, a model with no BatchNorm to fold reached ``example_input.dim()`` and raised an
    AttributeError from inside the library."""
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    for bad in ("x", [torch.randn(2, 4)], 3.0):
        with pytest.raises(ValueError, match="^example_input: expected a tensor"):
            lt.deploy_model(net, bad)
    x = torch.randn(2, 4)
    assert_close(lt.deploy_model(net, x)(x), net(x))


def test_a_dict_output_keyed_by_numbers_exports_to_onnx(tmp_path):
    """torchvision's IntermediateLayerGetter (a detection backbone's feature maps) returns
    {"0": ..., "1": ...}; before, the export failed inside TorchScript (``Invalid name: '0'``)."""
    pytest.importorskip("onnxruntime")
    from torchvision.models._utils import IntermediateLayerGetter

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
    backbone = IntermediateLayerGetter(net, return_layers={"1": "0", "2": "1"}).eval()
    x = torch.randn(2, 3, 12, 8)
    small = lt.truncate(lt.overparameterize(backbone, 2), lt.Uniform(0.5), example_input=x)
    path = lt.export_onnx(small, x, tmp_path / "feats.onnx")
    names, got = _onnx_outputs(path, {"input": x.numpy()})
    assert names == ["output_0", "output_1"]
    want = small(x)
    for key, value in zip(("0", "1"), got):
        assert_close(value, want[key], atol=1e-5, rtol=1e-4)
    from lorita.export import onnx_output_names

    out = {"0": x, "stage": {"1": x}, "2a": x, 3: x}
    assert onnx_output_names(out) == ["output_0", "stage_1", "2a", "output_3"]


@pytest.mark.parametrize(
    "call",
    [
        lambda x: lt.count_cost(nn.Linear(6, 3), x),
        lambda x: lt.overparameterize(nn.Linear(6, 3), 3),
        lambda x: lt.truncate(nn.Linear(6, 3), lt.Uniform(0.5)),
    ],
    ids=["count_cost", "overparameterize", "truncate"],
)
def test_a_bare_layer_is_refused_naming_its_class_and_how_to_wrap_it(call):
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match=r"^model: .*bare Linear; wrap it: nn\.Sequential"):
        call(x)
    assert lt.count_cost(nn.Sequential(nn.Linear(6, 3)), x).flops == 2 * 6 * 3 * 2


def test_a_model_loaded_from_a_file_is_not_a_view_of_it(tmp_path):
    """``load(path)`` gave the model the file's tensors as safetensors maps them: views of the
    file. Overwritten in place (``cp``, ``open(path, "wb")``), the file changed the loaded
    model's weights (truncated, the next forward ended the process with a bus error), and
    a view's unaligned offset rounded a float64 layer differently from the saved one."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    other = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(3, 64)
    path, other_path = tmp_path / "net.safetensors", tmp_path / "other.safetensors"
    lt.save(net, path)
    lt.save(other, other_path)
    assert path.stat().st_size == other_path.stat().st_size
    for loaded in (lt.load(path), lt.load(path, model=_meta_sequential())):
        path.write_bytes(other_path.read_bytes())  # in place: same file, other weights
        assert torch.equal(loaded(x), net(x))
        lt.save(net, path)
    for p in lt.load(path).parameters():
        assert p.data_ptr() % 16 == 0
    x64 = torch.randn(2, 3, 20, 12, dtype=torch.float64)
    model = lt.overparameterize(_cnn().double().eval(), 3).eval()
    small = lt.truncate(model, lt.FlopBudget(50), example_input=x64)  # a rank-1 head
    lt.save(small, path)
    assert torch.equal(lt.load(path)(x64), small(x64))


def _meta_sequential() -> nn.Sequential:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


# --------------------------------------------------------------------------- checked, fine


def test_module_dicts_lists_and_a_namedtuple_output_take_the_whole_path(tmp_path):
    """Compose (same function, frozen layer frozen), train (it stays unchanged), merge
    (strict load into the plain class), every policy in both forms, save and load onto a fresh
    instance (exact, frozen again), ONNX (one output per field)."""
    x = torch.randn(4, 12)
    net = _Heads()
    model = lt.overparameterize(net, 3, example_input=x)
    assert_close(model(x), net(x))
    assert _frozen(model) == ["body.0.bias", *(f"body.0.factors.{i}" for i in range(3))]
    frozen_before = [p.clone() for p in model.body[0].parameters()]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, weight_decay=1e-2)
    for _ in range(3):
        opt.zero_grad()
        out = model(x)
        (out.logits.pow(2).mean() + out.features.pow(2).mean()).backward()
        opt.step()
    for before, after in zip(frozen_before, model.body[0].parameters()):
        assert torch.equal(before, after)
    merged = lt.merge_model(model)
    assert isinstance(merged(x), Out) and _frozen(merged) == ["body.0.bias", "body.0.weight"]
    assert_close(merged(x), model(x), atol=1e-5, rtol=1e-4)
    _Heads().load_state_dict(merged.state_dict(), strict=True)

    base = lt.count_cost(model, x)
    policies = [lt.Uniform(0.5), lt.Global(0.6), lt.Energy(0.9), lt.Budget(50), lt.FlopBudget(50)]
    policies.append(lt.Ranks({"heads.cls": 2, "body.1": 3}))
    for policy in policies:
        for form in ("low_rank", "dense"):
            if isinstance(policy, lt.Budget) and form == "dense":
                with pytest.raises(ValueError, match="^form: a budget needs form='low_rank'"):
                    lt.truncate(model, policy, form=form, example_input=x)
                continue
            small = lt.truncate(model, policy, form=form, example_input=x)
            assert isinstance(small(x), Out) and not small.training
            cost = lt.count_cost(small, x)
            assert cost.params <= base.params and cost.flops <= base.flops
            assert set(cost.per_layer) == {"body.0", "body.1", "heads.cls", "heads.aux"}
            path = tmp_path / "heads.safetensors"
            lt.save(small, path)
            again = lt.load(path, model=_Heads())
            assert _frozen(again) == _frozen(small) and _frozen(small)  # body.0 kept frozen
            for a, b in zip(again(x), small(x)):
                assert torch.equal(a, b)
    small = lt.truncate(model, lt.Budget(50), example_input=x)
    names, got = _onnx_outputs(lt.export_onnx(small, x, tmp_path / "h.onnx"), {"input": x.numpy()})
    assert names == ["logits", "features"]  # the namedtuple's fields, as a dict's keys
    for a, b in zip(got, small(x)):
        assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_a_float64_model_keeps_its_dtype_through_cut_save_and_load(tmp_path):
    x = torch.randn(2, 3, 20, 12, dtype=torch.float64)
    net = _cnn().double().eval()
    model = lt.overparameterize(net, 3).eval()
    assert_close(model(x), net(x))
    for policy in (lt.Uniform(0.5), lt.Budget(50), lt.FlopBudget(50)):
        small = lt.truncate(model, policy, example_input=x)
        assert {p.dtype for p in small.parameters()} == {torch.float64}
        path = tmp_path / "f64.safetensors"
        lt.save(small, path)
        for again in (lt.load(path), lt.load(path, model=_cnn().double())):
            assert {p.dtype for p in again.parameters()} == {torch.float64}
            assert torch.equal(again(x), small(x))
    full = lt.truncate(model, lt.Uniform(1.0), example_input=x)
    assert_close(full(x), net(x), atol=1e-10, rtol=1e-9)  # float64's precision, not float32's


def test_a_model_moved_after_composing_cuts_in_its_new_dtype():
    x = torch.randn(2, 3, 20, 12)
    model = lt.overparameterize(_cnn().eval(), 3).to(torch.float64).eval()
    small = lt.truncate(model, lt.Budget(50), example_input=x.double())
    assert {p.dtype for p in small.parameters()} == {torch.float64}
    assert {p.dtype for p in lt.merge_model(model).parameters()} == {torch.float64}
    assert small(x.double()).dtype == torch.float64


def test_non_square_images_through_the_compressor_and_onnx_at_another_batch(tmp_path):
    """3x40x24 images in splits built by hand: the example input, cost and the cut keep the
    shape, and the ONNX file runs a batch of another size."""

    def part(n: int) -> TensorDataset:
        g = torch.Generator().manual_seed(n)
        return TensorDataset(torch.randn(n, 3, 40, 24, generator=g), torch.arange(n) % 5)

    splits = lt.Splits(
        train=part(24), val=part(16), test=part(12),
        in_channels=3, image_size=40, num_classes=5, name="mine",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no guessed input fits 40x24: the Compressor has one
        comp = lt.Compressor(lt.overparameterize(_cnn(), 3), splits)
    assert tuple(comp.example_input.shape) == (1, 3, 40, 24)
    assert comp.preprocess["input_shape"] == [3, 40, 24]
    result = comp.apply(lt.Budget(50))
    assert result.params_pct <= 50 and set(result.metrics) >= {"val_acc", "test_acc"}
    assert result.flops == lt.count_cost(result.model, comp.example_input).flops
    path = lt.export_onnx(result.model, comp.example_input, tmp_path / "ns.onnx")
    x = torch.randn(5, 3, 40, 24)
    _, (got,) = _onnx_outputs(path, {"input": x.numpy()})
    assert_close(got, result.model(x), atol=1e-5, rtol=1e-4)


def test_a_channels_last_model_is_cut_saved_and_deployed(tmp_path):
    x = torch.randn(2, 3, 20, 12).contiguous(memory_format=torch.channels_last)
    net = _cnn().eval().to(memory_format=torch.channels_last)
    model = lt.overparameterize(net, 3, example_input=x).eval()
    assert_close(model(x), net(x), atol=1e-5, rtol=1e-4)
    small = lt.truncate(model, lt.Uniform(0.5), example_input=x)
    path = tmp_path / "cl.safetensors"
    lt.save(small, path, fold_bn=True, example_input=x)
    assert_close(lt.load(path, model=_cnn())(x), small(x), atol=1e-5, rtol=1e-4)
    deployed = lt.deploy_model(small, x)
    assert deployed.lorita_deploy["folded"] == ["1"]
    assert_close(deployed(x), small(x), atol=1e-5, rtol=1e-4)


class _Twice(nn.Module):
    """One convolution called twice, with a BatchNorm after its first call only."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return self.head(self.conv(self.bn(self.conv(x))).mean((2, 3)))


def test_a_layer_called_twice_keeps_its_batchnorm_and_one_cut_serves_both_calls(tmp_path):
    x = torch.randn(2, 4, 10, 6)
    net = _Twice().eval()
    folded = lt.fold_batchnorm(net, x)
    assert folded.lorita_folded == {} and "more than once" in folded.lorita_unfolded["bn"]
    assert torch.equal(folded(x), net(x))
    model = lt.overparameterize(net, 3, example_input=x).eval()
    full = lt.truncate(model, lt.Uniform(1.0), example_input=x)
    assert_close(full(x), net(x), atol=1e-5, rtol=1e-4)
    small = lt.truncate(model, lt.Ranks({"conv": 2}), example_input=x)
    macs = (3 * 3 * 4 * 2 + 2 * 4) * 10 * 6 * 2  # the two thin convolutions, batch 2
    assert lt.count_cost(small, x).per_layer["conv"]["flops"] == 2 * 2 * macs  # run twice
    lt.save(small, tmp_path / "t.safetensors", fold_bn=True, example_input=x)
    assert torch.equal(lt.load(tmp_path / "t.safetensors", model=_Twice())(x), small(x))
