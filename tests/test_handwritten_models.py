"""Hand-written networks as engineers write them, through the whole path: compose, merge,
cut, save and load, each keeping the function."""

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import lorita as lt


class KeywordCalls(nn.Module):
    """Calls its layers by keyword, as their forward names the input (``input=``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        img = self.conv(input=self.fc(input=x).view(-1, 1, 4, 4))  # (B, 4, 4, 4)
        return self.head(input=img.mean((2, 3)))


def test_layers_called_by_keyword_are_composed_cut_and_timed(tmp_path):
    torch.manual_seed(0)
    net, x = KeywordCalls().eval(), torch.randn(2, 8)
    want = net(x)
    model = lt.overparameterize(net, 3, example_input=x)
    assert_close(model(x), want, atol=1e-5, rtol=1e-4)
    small = lt.truncate(model, lt.Uniform(0.5), example_input=x)
    assert {p["form"] for p in small.lorita_plan.values()} == {"thin"}
    assert_close(small.fc(input=x), small.fc(x))
    lt.truncate(model, lt.Uniform(0.5), example_input=x, by="latency", batch=4)(x)  # timed
    lt.save(small, tmp_path / "small.safetensors")
    back = lt.load(tmp_path / "small.safetensors", model=KeywordCalls())
    assert_close(back(x), small(x))


def test_a_sequential_whose_child_names_a_file_cannot_hold_loads_onto_an_instance(tmp_path):
    """nn.Sequential takes any child name without a dot ("in-proj"); the file's module tree
    holds only letters, digits and _, so such a model is saved as a class and loads onto a
    fresh instance (before, the file was written and then refused by its own loader)."""

    def make():
        torch.manual_seed(0)
        return nn.Sequential(
            OrderedDict(
                [("in-proj", nn.Linear(8, 16)), ("act", nn.ReLU()), ("out", nn.Linear(16, 4))]
            )
        )

    x = torch.randn(2, 8)
    model = lt.overparameterize(make(), 3)
    path = lt.save(model, tmp_path / "m.safetensors")
    assert_close(lt.load(path, model=make())(x), model(x))
    with pytest.raises(ValueError, match=r"layer name 'in-proj' is not letters, digits and _"):
        lt.load(path)


class Unbatched(nn.Module):
    """Takes one image (C, H, W), no batch axis."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean((1, 2)))


def test_forms_by_latency_name_a_model_that_takes_no_batch():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 6)
    model = lt.overparameterize(Unbatched(), 3, example_input=x)
    with pytest.raises(ValueError, match=r"example_input: by='latency' .* batch=None"):
        lt.truncate(model, lt.Uniform(0.25), example_input=x, by="latency")
    small = lt.truncate(model, lt.Uniform(0.25), example_input=x, by="latency", batch=None)
    small(x)


class LoRALinear(nn.Linear):
    """A Linear with a low-rank adapter beside its weight, zero at the start."""

    def __init__(self, n_in, n_out, rank=2):
        super().__init__(n_in, n_out)
        self.lora_a = nn.Parameter(torch.randn(rank, n_in) * 0.1)
        self.lora_b = nn.Parameter(torch.zeros(n_out, rank))

    def forward(self, x):
        return super().forward(x) + nn.functional.linear(x @ self.lora_a.T, self.lora_b)


class Adapted(nn.Module):
    def __init__(self, patch=False):
        super().__init__()
        self.a, self.b = LoRALinear(8, 16), nn.Linear(16, 4)
        self.c = nn.Linear(4, 4)
        if patch:  # the forward replaced on one instance
            plain = self.c.forward
            self.c.forward = lambda x: plain(x) * 2

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


@pytest.mark.parametrize("patch", [False, True])
def test_a_layer_with_an_adapter_or_a_replaced_forward_is_left_as_it_is(patch, tmp_path):
    """A Linear subclass holding an adapter (zero at first, so a probe cannot tell it from a
    plain Linear) and a forward replaced on the instance are left, not composed without them."""
    torch.manual_seed(0)
    net, x = Adapted(patch).eval(), torch.randn(3, 8)
    model = lt.overparameterize(net, 3)
    rows = {r["name"]: r for r in lt.composition_summary(model)["layers"]}
    assert rows["a"]["action"] == "left" and "lora_a, lora_b" in rows["a"]["why"]
    assert rows["c"]["action"] == ("left" if patch else "composed")
    assert rows["b"]["action"] == "composed"
    with torch.no_grad():
        model.a.lora_b.normal_()  # the adapter trains
        net.a.lora_b.copy_(model.a.lora_b)
    assert_close(model(x), net(x))
    fresh = Adapted(patch)
    fresh.load_state_dict(lt.merge_model(model).state_dict(), strict=True)
    assert_close(fresh(x), net(x))
    small = lt.truncate(model, lt.Uniform(0.5))
    lt.save(small, tmp_path / "m.safetensors")
    assert_close(lt.load(tmp_path / "m.safetensors", model=Adapted(patch))(x), small(x))


def test_a_model_on_the_meta_device_is_named_by_export_onnx(tmp_path):
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"parameter '0.weight' is on the 'meta' device"):
        lt.export_onnx(meta, torch.randn(2, 4), tmp_path / "m.onnx")


class ScaledDirect(nn.Module):
    """Takes two inputs, so no guessed input runs it, and reads ``fc.weight`` itself."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x, scale):
        return self.out(torch.nn.functional.linear(x, self.fc.weight, self.fc.bias) * scale)


def test_weights_read_directly_that_no_guess_traced_are_found_by_the_cuts_input():
    """Composing it says the direct reads were not traced; a cut given an input traces them,
    so ``fc`` stays dense with its rank-r weight and the cut never costs more."""
    torch.manual_seed(0)
    net, x = ScaledDirect().eval(), (torch.randn(8, 64), torch.randn(8, 1))
    with pytest.warns(UserWarning, match="could not trace"):
        model = lt.overparameterize(net, 3)
    cut = lt.truncate(model, lt.Uniform(0.25), example_input=x)
    assert cut.lorita_plan["fc"]["form"] == "dense"
    assert lt.count_cost(cut, x).flops < lt.count_cost(net, x).flops
    assert_close(cut(*x), lt.truncate(model, lt.Uniform(0.25), form="dense")(*x))
    budget = lt.truncate(model, lt.Budget(50), example_input=x)
    assert budget.lorita_plan["fc"]["form"] != "thin"
    assert lt.count_cost(budget, x).flops <= lt.count_cost(net, x).flops
