"""Every layer kind on real torchvision classification models at a small input size: plain
``overparameterize(model, 3)`` keeps the function, a training step updates every factor, the
merge loads strictly into a fresh instance, a full-rank cut is the identity, a real cut lowers
the measured FLOPs, and ``save`` -> ``load(model=...)`` and ONNX give the same outputs.

The set covers every kind: conv, linear, depthwise and squeeze-excitation
(mobilenet_v3_small, shufflenet), grouped convs (regnet), MultiheadAttention's packed q, k, v
and its out_proj read directly (a small ViT), weights read directly by F.linear (a small Swin),
depthwise 7x7 with Linear blocks (a small ConvNeXt).
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torch.testing import assert_close
from torchvision.models.convnext import CNBlockConfig

import lorita as lt
from lorita.convert import composition_summary
from lorita.layers import FactorConv2d, FactorLinear, FactorMultiheadAttention


def _vit():
    return tvm.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    )  # fmt: skip


def _swin():
    return tvm.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
        num_classes=10,
    )  # fmt: skip


def _convnext():
    return tvm.ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10)


#: name -> (constructor of a fresh instance, input side, kinds it must contain)
ZOO = {
    "mobilenet_v3_small": (
        lambda: tvm.mobilenet_v3_small(num_classes=10),
        32,
        {"conv", "depthwise", "linear"},
    ),
    "shufflenet_v2_x0_5": (lambda: tvm.shufflenet_v2_x0_5(num_classes=10), 32, {"depthwise"}),
    "regnet_x_400mf": (lambda: tvm.regnet_x_400mf(num_classes=10), 32, {"grouped_conv"}),
    "vit (small)": (_vit, 32, {"attention", "direct", "linear"}),
    "swin (small)": (_swin, 32, {"direct", "linear"}),
    "convnext (small)": (_convnext, 32, {"depthwise", "linear"}),
}
COMPOSED = (FactorLinear, FactorConv2d, FactorMultiheadAttention)


def _fresh(name: str) -> nn.Module:
    torch.manual_seed(0)
    return ZOO[name][0]().eval()


def _x(name: str, batch: int = 2) -> torch.Tensor:
    side = ZOO[name][1]
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))


@functools.cache
def _composed(name: str) -> nn.Module:
    model = _fresh(name)
    model.lorita_input_shape = (3, ZOO[name][1], ZOO[name][1])  # the size these tests use
    return lt.overparameterize(model, 3).eval()


@functools.cache
def _svd(name: str) -> lt.SVDCache:
    return lt.layer_svd(_composed(name))  # every cut below reuses these SVDs


def _close(a, b, tol=1e-4):
    scale = max(1.0, float(b.abs().max()))
    assert_close(a, b, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("name", list(ZOO))
def test_plain_overparameterize_keeps_the_function(name):
    model, x = _composed(name), _x(name)
    with torch.no_grad():
        _close(model(x), _fresh(name)(x))
    rows = composition_summary(model)["layers"]
    assert {r["kind"] for r in rows} >= ZOO[name][2]
    for r in rows:  # every kind but depthwise is composed; depthwise is left, with the reason
        assert r["action"] == ("left" if r["kind"] == "depthwise" else "composed"), r
        assert r["why"] or r["action"] == "composed"


@pytest.mark.parametrize("name", list(ZOO))
def test_a_training_step_updates_every_factor(name):
    model = copy.deepcopy(_composed(name)).train()
    factors = {
        f"{n}.{k}": p for n, m in lt.composed_layers(model).items()
        for k, p in m.named_parameters() if "factors" in k
    }  # fmt: skip
    before = {k: p.detach().clone() for k, p in factors.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=1e-3)
    loss = nn.functional.cross_entropy(model(_x(name, 4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    unchanged = [k for k, p in factors.items() if torch.equal(p.detach(), before[k])]
    assert factors and not unchanged


@pytest.mark.parametrize("name", list(ZOO))
def test_merge_loads_strictly_and_full_rank_cut_is_identity(name):
    model, x = _composed(name), _x(name)
    fresh = _fresh(name)
    fresh.load_state_dict(lt.merge_model(model).state_dict(), strict=True)
    with torch.no_grad():
        want = model(x)
        _close(fresh(x), want)
        full = lt.truncate(model, lt.Uniform(1.0), svd=_svd(name))
        assert {p["form"] for p in full.lorita_plan.values()} == {"full"}
        _close(full(x), want)


@pytest.mark.parametrize("name", list(ZOO))
def test_a_real_cut_lowers_the_measured_flops(name):
    model, x = _composed(name), _x(name)
    small = lt.truncate(model, lt.Uniform(0.25), svd=_svd(name))
    base, cut = lt.count_cost(model, x), lt.count_cost(small, x)
    assert cut.flops < base.flops and cut.params < base.params
    forms = {p["form"] for p in small.lorita_plan.values()}
    assert "thin" in forms
    for n, p in small.lorita_plan.items():  # a thin form only where the model calls the layer
        if p["kind"] in ("attention", "direct"):
            assert p["form"] == "dense" and p["why"], n


@pytest.mark.parametrize("name", list(ZOO))
def test_save_load_onto_a_fresh_instance_and_onnx_agree(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    small = lt.truncate(_composed(name), lt.Uniform(0.5), svd=_svd(name))
    x = _x(name)
    with torch.no_grad():
        want = small(x)
    path = lt.save(small, tmp_path / "m.safetensors")
    back = lt.load(path, model=_fresh(name))
    with torch.no_grad():
        _close(back(x), want, 1e-5)
    assert back.lorita_direct == small.lorita_direct
    onnx = lt.export_onnx(small, x, tmp_path / "m.onnx")
    x3 = _x(name, 3)  # another batch size: the batch axis is dynamic
    (out,) = ort.InferenceSession(str(onnx)).run(None, {"input": x3.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, small(x3).numpy(), rtol=1e-3, atol=1e-4)


def test_load_onto_the_wrong_architecture_names_the_layer(tmp_path):
    name = "mobilenet_v3_small"
    small = lt.truncate(_composed(name), lt.Uniform(0.5), svd=_svd(name))
    path = lt.save(small, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="layer 'classifier.3"):
        lt.load(path, model=tvm.mobilenet_v3_small(num_classes=7))
    with pytest.raises(ValueError, match="not in this model"):
        lt.load(path, model=tvm.shufflenet_v2_x0_5(num_classes=10))
