"""Engineers' own models through the whole library path: compose (same function), a training
step, merge (same function, strict load), a full-rank cut (the merged function), Budget and
FlopBudget cuts (counted cost at or below the original's and within a met budget), save/load
onto a fresh instance (exact) and ONNX (onnxruntime agrees).

The rows come from bench/models_sweep.py, which runs about fifty models; these are a subset
that covers its forms (grouped, depthwise-separable and squeeze-excitation convolutions, tied
weights, several inputs and outputs, a dict output, buffers, weights read by F.linear /
F.conv2d, recurrent and attention layers, and small timm models of each family).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import lorita as lt

_PATH = Path(__file__).resolve().parents[1] / "bench" / "models_sweep.py"
_spec = importlib.util.spec_from_file_location("models_sweep", _PATH)
sweep = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("models_sweep", sweep)
_spec.loader.exec_module(sweep)

HANDWRITTEN = [
    "Sequential(Flatten, Linear...)",
    "grouped conv + BN",
    "depthwise-separable",
    "squeeze-excitation",
    "weight-tied LM head",
    "tied autoencoder (W^T)",
    "two inputs (image, meta)",
    "two outputs (tuple)",
    "dict output",
    "buffers (mean/std, counter)",
    "own Parameters via F.conv2d/F.linear",
    "layer weights via F.conv2d/F.linear",
    "GRU tagger",
    "TransformerEncoder",
    "MultiheadAttention pool (kdim)",
]
TIMM = ["timm:edgenext_xx_small", "timm:vit (small)", "timm:swin (small)", "timm:mixer (small)"]


@pytest.mark.parametrize("name", HANDWRITTEN + TIMM)
def test_the_whole_path_keeps_the_function_and_never_costs_more(name):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    pytest.importorskip("onnxruntime")
    row = sweep.check(name)
    assert not row["errors"], row["errors"]
    assert row["compose"] < sweep.TOL and row["merge"] < sweep.TOL and row["full"] < sweep.TOL
    assert row["load"] == 0
    for key in ("budget", "flop_budget"):
        assert row[key]["pct"] <= 100
        if row[key]["met"]:
            assert row[key]["pct"] <= 50
    assert row["onnx"] == "ok" and row["onnx_diff"] < 1e-3


def test_the_sweep_names_a_failed_step_and_goes_on(monkeypatch):
    """A step that raises is a row's error naming the step, not the end of the sweep."""

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(sweep.lt, "merge_model", broken)
    row = sweep.check("dict output", onnx=False)
    assert any(e.startswith("merge: RuntimeError: boom") for e in row["errors"])
    assert "budget" in row and "load" in row


class AsksForDtype(nn.Module):
    """Asks its first layer's weight for its dtype at every call (as EdgeNeXt's positional
    encoding asks its 1x1 conv for device and dtype)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 1)
        self.fc1, self.fc2 = nn.Linear(64, 256), nn.Linear(256, 10)

    def forward(self, x):  # (B, 3, H, W)
        x = x.to(self.conv.weight.dtype).type_as(self.fc1.weight)
        assert self.fc1.weight.shape == (256, 64) and self.conv.weight.dim() == 4
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


def test_a_thin_layer_asked_for_its_dtype_does_not_multiply_its_factors_back(tmp_path):
    """Asking a thin layer's weight for its dtype, device or shape formed the dense product
    at every call: a Uniform(0.25) cut of this model cost 24x the original's FLOPs at batch
    1 and a FlopBudget(50) cut counted far more than it reported."""
    torch.manual_seed(0)
    net, x = AsksForDtype().eval(), torch.randn(1, 3, 4, 4)
    model = lt.overparameterize(net, 3, example_input=x)
    base = lt.count_cost(net, x)
    small = lt.truncate(model, lt.Uniform(0.25), example_input=x)
    assert small.lorita_plan["fc1"]["form"] == "thin"
    assert lt.count_cost(small, x).flops < base.flops
    budget = lt.truncate(model, lt.FlopBudget(50), example_input=x)
    counted = 100 * lt.count_cost(budget, x).flops / base.flops
    assert budget.lorita_budget["met"] and counted <= 50
    assert counted == pytest.approx(budget.lorita_budget["kept_pct"], abs=0.5)
    # the weight still reads as the product wherever its values are used, with gradients
    thin = small.fc1
    product = thin.second.weight @ thin.first.weight
    w = thin.weight
    assert (w.shape, w.dtype, w.device, w.requires_grad) == (
        (256, 64),
        torch.float32,
        x.device,
        True,
    )
    assert_close(w + 0, product)
    assert_close(nn.functional.linear(torch.ones(2, 64), w), torch.ones(2, 64) @ product.T)
    assert torch.equal(lt.merge_model(small).fc1.weight, product.detach())
    small.train()
    small(x).sum().backward()
    (w * w).sum().backward()
    assert thin.first.weight.grad.abs().sum() > 0
    small.eval()
    with torch.no_grad():
        assert type(thin.weight.clone()) is torch.Tensor
        assert_close(thin.weight.double(), product.detach().double())
    ort = pytest.importorskip("onnxruntime")
    path = lt.export_onnx(small, x, tmp_path / "m.onnx")
    (out,) = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})
    assert_close(torch.from_numpy(out), small(x).detach(), rtol=1e-4, atol=1e-5)
