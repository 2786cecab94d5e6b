"""Every layer kind on real torchvision classification models at a small input size: plain
``overparameterize(model, 3)`` keeps the function, a training step updates every factor, the
merge loads strictly into a fresh instance, a full-rank cut is the identity, a real cut lowers
the measured FLOPs, and ``save`` -> ``load(model=...)`` and ONNX give the same outputs.

One small member of every torchvision family, built with the family's own classes at reduced
widths where its builders are large: ResNet (BasicBlock) and ResNeXt (Bottleneck, grouped 3x3),
MobileNet v2 / v3, EfficientNet (MBConv and FusedMBConv), ShuffleNet, SqueezeNet, MNASNet,
RegNet (grouped, squeeze-excitation), DenseNet (concatenations), GoogLeNet (auxiliary heads, transform_input),
Inception v3, AlexNet and VGG (adaptive pool to 6x6 / 7x7: ONNX through torch.export),
ConvNeXt, Swin and Swin v2 (weights read by F.linear, cpb_mlp, logit_scale), ViT
(MultiheadAttention, class token and position Parameters), MaxViT (its own attention, relative
position bias). bench/zoo_sweep.py runs the same checks on every torchvision builder. Three timm
models (when timm is installed) handle their weights their own way: weight standardisation,
cached attention biases, a class token passed to a module.
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
from torchvision.models.efficientnet import FusedMBConvConfig, MBConvConfig
from torchvision.models.regnet import BlockParams
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2
from torchvision.models.vgg import make_layers

import lorita as lt
from lorita.convert import composition_summary
from lorita.layers import FactorConv2d, FactorLinear, FactorMultiheadAttention


def _vit():
    return tvm.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    )  # fmt: skip


def _swin(v2: bool = False):
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return tvm.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
        num_classes=10, **extra,
    )  # fmt: skip


def _convnext():
    return tvm.ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10)


def _maxvit():
    return tvm.MaxVit(
        input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16],
        block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=10,
    )  # fmt: skip


def _efficientnet():
    blocks = [FusedMBConvConfig(1, 3, 1, 16, 16, 1), MBConvConfig(4, 3, 2, 16, 32, 1)]
    return tvm.EfficientNet(blocks, dropout=0.2, last_channel=64, num_classes=10)


def _small_head(model: nn.Module, at: tuple[int, ...]) -> nn.Module:
    """The model with its classifier's Linear layers (indices ``at``) 32 wide: the 4096-wide
    heads of AlexNet and VGG cost minutes of SVDs and test nothing the 32-wide ones do not."""
    first = model.classifier[at[0]].in_features
    widths = [first] + [32] * (len(at) - 1) + [10]
    for i, j in enumerate(at):
        model.classifier[j] = nn.Linear(widths[i], widths[i + 1])
    return model


def _vgg():
    features = make_layers([16, "M", 32, "M", 512, "M"], batch_norm=True)
    return _small_head(tvm.VGG(features, num_classes=10), (0, 3, 6))


def _regnet():  # grouped 3x3 convs and squeeze-excitation, as regnet_y
    params = BlockParams.from_init_params(3, 16, 8.0, 2.0, group_width=8, se_ratio=0.25)
    return tvm.RegNet(params, num_classes=10)


def _googlenet():  # both auxiliary heads (their fc1 32 wide, not 1024) and transform_input
    model = tvm.googlenet(
        weights=None, num_classes=10, aux_logits=True, transform_input=True, init_weights=True
    )
    for aux in (model.aux1, model.aux2):
        aux.fc1, aux.fc2 = nn.Linear(2048, 32), nn.Linear(32, 10)
    return model


def _tv(name: str, **kw):
    return lambda: tvm.get_model(name, weights=None, num_classes=10, **kw)


#: name -> (constructor of a fresh instance, input side, kinds it must contain)
ZOO = {
    "resnet (BasicBlock)": (
        lambda: tvm.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10), 32, {"conv", "linear"},
    ),
    "resnext (Bottleneck)": (
        lambda: tvm.ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4, num_classes=10),
        32, {"grouped_conv"},
    ),
    "mobilenet_v2": (_tv("mobilenet_v2", width_mult=0.25), 32, {"depthwise"}),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), 32, {"conv", "depthwise", "linear"}),
    "efficientnet (MBConv, FusedMBConv)": (_efficientnet, 32, {"conv", "depthwise"}),
    "shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), 32, {"depthwise"}),
    "squeezenet1_1": (_tv("squeezenet1_1"), 32, {"conv"}),
    "mnasnet0_5": (_tv("mnasnet0_5"), 32, {"depthwise"}),
    "regnet (small, SE)": (_regnet, 32, {"grouped_conv", "conv"}),
    "densenet (small)": (
        lambda: tvm.DenseNet(8, (2, 2), 16, bn_size=2, num_classes=10), 32, {"conv", "linear"},
    ),
    "googlenet (aux heads)": (_googlenet, 32, {"conv", "linear"}),
    "inception_v3": (_tv("inception_v3", aux_logits=False, init_weights=True), 75, {"conv"}),
    "alexnet (small head)": (lambda: _small_head(_tv("alexnet")(), (1, 4, 6)), 64, {"conv"}),
    "vgg (small)": (_vgg, 32, {"conv", "linear"}),
    "convnext (small)": (_convnext, 32, {"depthwise", "linear"}),
    "swin (small)": (_swin, 32, {"direct", "linear"}),
    "swin_v2 (small)": (lambda: _swin(v2=True), 32, {"direct", "linear"}),
    "vit (small)": (_vit, 32, {"attention", "direct", "linear"}),
    "maxvit (small)": (_maxvit, 32, {"conv", "depthwise", "linear"}),
}  # fmt: skip
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


def _two_steps(model: nn.Module, name: str) -> set[str]:
    """Two SGD steps (train mode, no weight decay: gradients only, every output head in the
    loss); the names of the parameters that got a gradient other than zero. (A gradient too
    small to move a float32 weight still counts: what matters is that it reaches it.)"""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    torch.manual_seed(0)  # dropout and stochastic depth
    reached = set()
    for _ in range(2):  # a zero-initialised head (ViT's) passes gradients from the second step
        out = model(_x(name, 4))
        heads = [out] if isinstance(out, torch.Tensor) else [h for h in out if h is not None]
        target = torch.tensor([0, 1, 2, 3])
        sum(nn.functional.cross_entropy(h, target) for h in heads).backward()
        reached |= {
            k for k, p in model.named_parameters() if p.grad is not None and bool(p.grad.any())
        }
        opt.step()
        opt.zero_grad()
    return reached


@pytest.mark.parametrize("name", list(ZOO))
def test_training_steps_update_every_factor(name):
    """Gradients reach every factor of every layer whose plain weight they reach over the
    same steps (a squeeze-excitation whose few ReLU units are all off on this batch passes
    none to the weight after them, composed or not), and the steps move the factors."""
    model = copy.deepcopy(_composed(name))
    layers = lt.composed_layers(model)
    plain = _two_steps(lt.merge_model(model), name)
    learning = [n for n in layers if {f"{n}.weight", f"{n}.in_proj_weight"} & plain]
    assert len(learning) >= 0.75 * len(layers)
    before = {k: p.detach().clone() for k, p in model.named_parameters() if "factors" in k}
    reached = _two_steps(model, name)
    factors = [f"{n}.{k}" for n in learning for k, _ in layers[n].named_parameters()]
    factors = [k for k in factors if "factors" in k]
    assert factors and not [k for k in factors if k not in reached]
    now = dict(model.named_parameters())
    moved = [k for k in factors if not torch.equal(now[k], before[k])]
    assert len(moved) >= 0.9 * len(factors)  # a few may get gradients under float32 rounding


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
        if p["kind"] == "direct":
            assert p["form"] == "dense" and p["why"], n
        if p["kind"] == "attention":  # q, k, v thin (LowRankMultiheadAttention), called
            assert p["form"] == "thin", n
            assert isinstance(small.get_submodule(n), lt.LowRankMultiheadAttention)


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


def _random_bn_stats(model: nn.Module) -> None:
    """BatchNorm statistics far from the identity (a fold of fresh ones would prove little)."""
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.running_var is not None:
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("name", list(ZOO))
def test_a_file_saved_with_batchnorm_folded_keeps_the_function(name, tmp_path):
    small = lt.truncate(_composed(name), lt.Uniform(0.5), svd=_svd(name)).eval()
    _random_bn_stats(small)
    x = _x(name)
    with torch.no_grad():
        want = small(x)
    shape = (3, ZOO[name][1], ZOO[name][1])
    path = lt.save(small, tmp_path / "m.safetensors", input_shape=shape, fold_bn=True)
    folded = lt.read_spec(path)["folded"]
    back = lt.load(path, model=_fresh(name))
    with torch.no_grad():
        _close(back(x), want, 1e-4)

    def bns(m):
        return sum(isinstance(b, (nn.BatchNorm1d, nn.BatchNorm2d)) for b in m.modules())

    assert bns(back) == bns(small) - len(folded)
    assert bool(folded) == (bns(small) > 0)  # every family with BatchNorm has some after a conv


def test_load_onto_the_wrong_architecture_names_the_layer(tmp_path):
    name = "mobilenet_v3_small"
    small = lt.truncate(_composed(name), lt.Uniform(0.5), svd=_svd(name))
    path = lt.save(small, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="layer 'classifier.3"):
        lt.load(path, model=tvm.mobilenet_v3_small(num_classes=7))
    with pytest.raises(ValueError, match="not in this model"):
        lt.load(path, model=tvm.shufflenet_v2_x0_5(num_classes=10))


@pytest.mark.parametrize(
    "name, side",
    [
        ("nf_resnet26", 32),  # ScaledStdConv2d: weight standardised in its own forward
        ("levit_128s", 224),  # attention biases cached in eval mode (deepcopy refuses them)
        ("pit_ti_224", 224),  # the class token's view passed to a module (FLOP counting)
    ],
)
def test_timm_models_that_handle_their_weights_their_own_way(name, side, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, side, side)
    ref = net(x)  # in eval mode: caches fill
    model = lt.overparameterize(net, 3, example_input=x).eval()
    _close(model(x).detach(), ref.detach())
    rows = composition_summary(model)["layers"]
    left = {r["why"].split(" has ")[0] for r in rows if r["action"] == "left"}
    assert left <= {
        "ScaledStdConv2d",
        "depthwise convolution (one input channel per group): nothing to gain",
    }
    small = lt.truncate(model, lt.Uniform(0.25), example_input=x)
    assert lt.count_cost(small, x).flops < lt.count_cost(net, x).flops
    lt.save(small, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    again = lt.load(tmp_path / "m.safetensors", model=timm.create_model(name, num_classes=10))
    _close(again(x).detach(), small(x).detach())
