"""A model with several inputs (``forward(img, meta)``): every library step takes
``example_input=(img, meta)`` where a one-input model takes a tensor, and a model with
keyword-only inputs (``forward(x, *, mask)``) takes ``example_input={"x": x, "mask": m}``."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lorita as lt
from lorita import inputs
from lorita.baselines import prune_to_budget


class TwoInputs(nn.Module):
    """An image branch (conv + BatchNorm) and a metadata branch summed into one head; the
    head's weight is read by ``F.linear`` (a direct read the trace must see)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.meta = nn.Linear(5, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, img, meta):
        h = F.relu(self.bn(self.conv(img))).mean((2, 3)) + self.meta(meta)
        return F.linear(F.relu(self.mid(h)), self.head.weight, self.head.bias)


def _pair(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 12, 12, generator=g), torch.randn(batch, 5, generator=g)


@pytest.fixture()
def net() -> nn.Module:
    torch.manual_seed(0)
    model = TwoInputs()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_compose_trace_merge_and_fold_take_a_tuple(net):
    x = _pair()
    composed = lt.overparameterize(net, 3, example_input=x)
    assert composed.lorita_summary["direct_reads"] == "traced"
    assert composed.lorita_direct == ("head",)
    torch.testing.assert_close(composed.eval()(*x), net(*x), rtol=1e-4, atol=1e-5)
    folded = lt.fold_batchnorm(lt.merge_model(composed), x)
    assert folded.lorita_folded == {"bn": "conv"}
    torch.testing.assert_close(folded(*x), net(*x), rtol=1e-4, atol=1e-5)


def test_a_guess_that_cannot_run_the_model_says_to_pass_a_tuple(net):
    with pytest.raises(ValueError, match="tuple of tensors"):
        lt.fold_batchnorm(net)


def test_cost_cut_latency_save_load_and_onnx_take_a_tuple(net, tmp_path):
    x = _pair()
    composed = lt.overparameterize(net, 3, example_input=x)
    small = lt.truncate(composed, lt.Budget(60), example_input=x)
    base, cut = lt.count_cost(net, x), lt.count_cost(small, x)
    assert cut.params <= 0.6 * base.params and cut.flops < base.flops
    assert set(cut.per_layer) == {"conv", "meta", "mid", "head"}
    assert small.lorita_plan["head"]["form"] == "full"  # read directly: a cut saves nothing
    timed = lt.truncate(composed, lt.Budget(60), example_input=x, by="latency", batch=4)
    assert {p["form"] for p in timed.lorita_plan.values()} <= {"thin", "dense", "full"}
    assert set(lt.latency_profile(small, x, batches=(1, 3), repeats=1, warmup=0)) == {1, 3}
    per_layer = lt.layer_latency(small, x, repeats=1, warmup=0, batch=3)
    assert set(per_layer) == {"conv", "meta", "mid", "head"}
    assert lt.measure_latency(small, x, repeats=1, warmup=0) > 0

    path = lt.save(small, tmp_path / "two.safetensors", fold_bn=True, example_input=x)
    assert list(lt.read_spec(path)["folded"]) == ["bn"]
    back = lt.load(path, model=TwoInputs())
    torch.testing.assert_close(back(*x), small.eval()(*x), rtol=1e-5, atol=1e-6)

    ort = pytest.importorskip("onnxruntime")
    onnx = lt.export_onnx(small, x, tmp_path / "two.onnx")
    session = ort.InferenceSession(str(onnx))
    assert [i.name for i in session.get_inputs()] == ["input", "input_1"]
    img, meta = _pair(batch=5, seed=1)  # another batch size: the batch axis is dynamic
    out = session.run(None, {"input": img.numpy(), "input_1": meta.numpy()})[0]
    np.testing.assert_allclose(out, small(img, meta).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_structured_pruning_takes_a_tuple(net):
    x = _pair()
    pruned, facts = prune_to_budget(net, x, 50)
    assert facts["met"] and facts["params"] <= facts["target"]
    assert pruned(*x).shape == (2, 4)


@pytest.mark.parametrize(
    "bad, words",
    [
        ([torch.zeros(1, 2)], "got list"),
        ((torch.zeros(1, 2), 3), "something else than tensors"),
        ((), "empty tuple"),
        ({}, "empty dict"),
        ({"x": torch.zeros(1, 2), "m": 1}, "dict holding something else than tensors"),
        ({"1x": torch.zeros(1, 2)}, "keys are not argument names"),
        ({"x": torch.tensor(1.0)}, "batch dimension"),
        (torch.tensor(1.0), "batch dimension"),
        ("x", "got str"),
    ],
)
def test_an_example_that_is_not_a_tensor_or_a_tuple_of_them_is_named(bad, words):
    with pytest.raises(ValueError, match="example_input") as err:
        inputs.check_example(bad)
    assert words in str(err.value)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="example_input"):
        lt.count_cost(model, bad)
    with pytest.raises(ValueError, match="example_input"):
        lt.overparameterize(model, 3, example_input=bad)


class KeywordOnly(nn.Module):
    """Token features and a mask passed by keyword only, as many sequence models take them."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc, self.head = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x, *, mask):
        h = torch.relu(self.emb(x)) * mask[..., None]
        return self.head(torch.relu(self.fc(h)).mean(1))


def test_keyword_inputs_go_through_every_step_as_a_dict(tmp_path):
    torch.manual_seed(0)
    net = KeywordOnly().eval()
    x = {"x": torch.randn(2, 5, 8), "mask": torch.ones(2, 5)}
    model = lt.overparameterize(net, 3, example_input=x).eval()
    assert torch.allclose(model(**x), net(**x), atol=1e-5)
    small = lt.truncate(model, lt.Budget(40), example_input=x)
    assert small.lorita_plan["fc"]["form"] == "thin"
    assert lt.count_cost(small, x).params <= 0.4 * lt.count_cost(model, x).params
    timed = lt.truncate(model, lt.Uniform(0.25), example_input=x, by="latency")
    assert set(timed.lorita_plan) == {"emb", "fc", "head"}
    assert lt.measure_latency(small, x, repeats=2) > 0
    lt.save(small, tmp_path / "s.safetensors", fold_bn=True, example_input=x)
    again = lt.load(tmp_path / "s.safetensors", model=KeywordOnly()).eval()
    assert torch.allclose(again(**x), small(**x))
    ort = pytest.importorskip("onnxruntime")
    lt.export_onnx(small, x, tmp_path / "s.onnx")
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"))
    assert [i.name for i in sess.get_inputs()] == ["x", "mask"]
    xb = {"x": torch.randn(4, 5, 8), "mask": torch.ones(4, 5)}  # another batch size
    out = sess.run(None, {k: v.numpy() for k, v in xb.items()})[0]
    np.testing.assert_allclose(out, small(**xb).detach().numpy(), atol=1e-5)
