"""A cut layer's ``.weight`` (formed from its two factors only where its values are read)
behaves as the plain product ``second @ first`` it used to be, for the reads a model or a
user makes of it."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

from lorita import kinds, spectra
from lorita.layers import LowRankConv2d, LowRankLinear


def _linear() -> LowRankLinear:
    torch.manual_seed(0)
    return LowRankLinear(12, 10, 3)


def _conv() -> LowRankConv2d:
    torch.manual_seed(0)
    return LowRankConv2d(4, 6, 3, 2, padding=1, groups=2)


def _product(layer) -> torch.Tensor:
    """The formula ``.weight`` used to return (a plain tensor)."""
    if isinstance(layer, LowRankLinear):
        return layer.second.weight @ layer.first.weight
    g, r = layer.groups, layer.rank
    second = layer.second.weight.reshape(g, layer.out_channels // g, r)
    w = second @ layer.first.weight.reshape(g, r, -1)
    return w.reshape(layer.out_channels, layer.in_channels // g, *layer.kernel_size)


LAYERS = [pytest.param(_linear, id="linear"), pytest.param(_conv, id="conv")]

# each read gives the same as on the plain product
READS = {
    "data": lambda w: w.data,
    "detach": lambda w: w.detach(),
    "clone": lambda w: w.clone(),
    "cpu": lambda w: w.cpu(),
    "to64": lambda w: w.to(torch.float64),
    "half": lambda w: w.half(),
    "tolist": lambda w: torch.tensor(w.tolist()),
    "index": lambda w: w[0],
    "flat": lambda w: w.reshape(w.shape[0], -1),
    "T": lambda w: w.reshape(w.shape[0], -1).T,
    "t": lambda w: w.reshape(w.shape[0], -1).t(),
    "matmul": lambda w: w.reshape(w.shape[0], -1) @ torch.ones(w[0].numel(), 2),
    "svd": lambda w: torch.linalg.svdvals(w.reshape(w.shape[0], -1)),
    "matrix_rank": lambda w: torch.linalg.matrix_rank(w.reshape(w.shape[0], -1)),
    "norm": lambda w: w.norm(),
    "deepcopy": lambda w: copy.deepcopy(w),
    "pickle": lambda w: pickle.loads(pickle.dumps(w)),
    "numpy": lambda w: torch.from_numpy(np.asarray(w.detach())),
    "stack": lambda w: torch.stack([w, w]),
}


@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize("read", list(READS))
def test_every_read_of_the_values_gives_the_product(make, read):
    """The same values, or the same error (a deepcopy of a tensor with a graph), with and
    without autograd."""
    for grad in (True, False):
        layer = make()
        with torch.set_grad_enabled(grad):
            got, want = _outcome(READS[read], layer.weight), _outcome(READS[read], _product(layer))
        if isinstance(want, str):
            assert got == want
            continue
        assert type(got) is type(want) is torch.Tensor
        assert_close(got, want)
        assert got.requires_grad == want.requires_grad


def _outcome(read, w):
    try:
        return read(w)
    except Exception as e:
        return f"{type(e).__name__}: {e}"


@pytest.mark.parametrize("make", LAYERS)
def test_metadata_reads_form_nothing_and_agree_with_the_product(make):
    layer, want = make(), None
    with torch.no_grad():
        want = _product(layer)
    with FlopCounterMode(display=False) as counter:
        w = layer.weight
        seen = (w.dtype, w.device, w.shape, w.dim(), w.numel(), w.size(), w.requires_grad)
        x = torch.ones(2, dtype=torch.float64).to(w)
    assert counter.get_total_flops() == 0
    assert seen == (
        want.dtype,
        want.device,
        want.shape,
        want.dim(),
        want.numel(),
        want.size(),
        True,
    )
    assert (x.dtype, type(x)) == (torch.float32, torch.Tensor)
    assert isinstance(w, torch.Tensor) and torch.is_tensor(w)
    assert w.shape == tuple(want.shape) and len(w) == len(want) and str(w.dtype) == "torch.float32"


@pytest.mark.parametrize("make", LAYERS)
def test_gradients_reach_the_factors_as_through_the_product(make):
    layer = make()
    (layer.weight * 3).sum().backward()
    got = [p.grad.clone() for p in (layer.first.weight, layer.second.weight)]
    layer.zero_grad()
    (_product(layer) * 3).sum().backward()
    want = [p.grad for p in (layer.first.weight, layer.second.weight)]
    for g, h in zip(got, want, strict=True):
        assert_close(g, h)


def test_graph_metadata_is_the_products():
    """is_leaf, grad_fn and grad were the zero-stride stand-in's (an AliasBackward0)."""
    layer = _linear()
    w, want = layer.weight, _product(layer)
    assert (w.is_leaf, type(w.grad_fn).__name__) == (False, type(want.grad_fn).__name__)
    with torch.no_grad():
        w = layer.weight
        assert (w.is_leaf, w.grad_fn, w.requires_grad) == (True, None, False)


def test_in_place_changes_stick_to_the_weight_taken():
    """w.add_(1) / w.zero_() changed a product formed for that call only: w read unchanged."""
    layer = _linear()
    with torch.no_grad():
        want = _product(layer)
        w = layer.weight
        w.add_(1)
        assert_close(w, want + 1)
        assert_close(w.sum(), (want + 1).sum())
        w.zero_()
        assert float(w.abs().sum()) == 0.0
        w[0] = 5.0
        assert float(w[0].sum()) == 5.0 * w.shape[1]
    assert_close(layer.weight, _product(layer))  # the layer itself is untouched


def test_retain_grad_and_hooks_see_the_backward():
    layer = _linear()
    w = layer.weight
    w.retain_grad()
    seen = []
    w.register_hook(lambda g: seen.append(g.clone()))
    (w * 2).sum().backward()
    assert_close(w.grad, torch.full((10, 12), 2.0))
    assert len(seen) == 1 and layer.first.weight.grad is not None


def test_a_weight_taken_without_autograd_stays_without():
    """Taken under no_grad, it was formed (with a graph) where it was used."""
    layer = _linear()
    with torch.no_grad():
        w = layer.weight
    y = (w * torch.ones(10, 12)).sum()
    assert not y.requires_grad
    with torch.inference_mode():
        w = layer.weight
        assert not w.requires_grad
    assert w.is_inference()  # formed as it would have been when taken


def test_a_weight_used_after_its_factors_changed_is_refused():
    """Taken, then an optimizer step: it read the new values instead of those it had."""
    layer = _linear()
    w, kept = layer.weight, layer.weight.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(torch.ones(2, 12)).sum().backward()
    opt.step()
    with pytest.raises(RuntimeError, match="factors changed in place.*layer.weight again"):
        w.sum()
    assert not torch.equal(layer.weight.detach(), kept)  # a weight taken now is the new one
    assert_close(kept, layer.weight.detach(), rtol=10, atol=10)
    used = layer.weight
    used.sum()  # formed, then kept: later changes leave it as it was
    before = used.detach().clone()
    with torch.no_grad():
        layer.first.weight.mul_(2)
    assert torch.equal(used.detach(), before)


def test_layout_reads_are_the_products():
    """stride() and is_contiguous() were the stand-in's (0, 0) and False: safetensors
    refused to save it as 'non contiguous'."""
    st = pytest.importorskip("safetensors.torch")
    layer = _linear()
    w = layer.weight
    assert w.is_contiguous() and w.stride() == (12, 1) and w.storage_offset() == 0
    with torch.no_grad():
        want = _product(layer)
        assert_close(st.load(st.save({"w": layer.weight}))["w"], want)
    assert w.data_ptr() == w.data_ptr() == w.untyped_storage().data_ptr()


@pytest.mark.parametrize("make", LAYERS)
def test_torch_save_loads_with_weights_only_as_the_values(make):
    layer = make()
    buf = io.BytesIO()
    torch.save({"w": layer.weight}, buf)
    buf.seek(0)
    got = torch.load(buf, weights_only=True)["w"]
    assert type(got) is torch.Tensor
    assert_close(got, _product(layer).detach())


def test_a_parameter_made_from_it_is_refused_with_what_to_write():
    layer = _linear()
    with pytest.raises(TypeError, match=r"nn\.Parameter\(w\.detach\(\)\)"):
        nn.Parameter(layer.weight)
    p = nn.Parameter(layer.weight.detach())
    assert isinstance(p, nn.Parameter) and p.requires_grad
    assert_close(p.detach(), _product(layer).detach())


class _ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.conv = _linear(), _conv()

    def forward(self, x, img):
        x = x.to(self.fc.weight.dtype)
        y = F.conv2d(
            img.to(self.conv.weight), self.conv.weight, self.conv.bias, padding=1, groups=2
        )
        return F.linear(x, self.fc.weight, self.fc.bias).sum(-1) + y.mean((1, 2, 3))


def test_tracers_and_hooks_see_the_values():
    """torch.fx raised 'symbolically traced variables cannot be used as inputs to control
    flow' on a model reading a cut layer's weight."""
    model = _ReadsWeight().eval()
    args = (torch.randn(2, 12), torch.randn(2, 4, 5, 5))
    want = model(*args)
    assert_close(torch.fx.symbolic_trace(model)(*args), want)
    assert_close(torch.jit.trace(model, args)(*args), want)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    torch.func.functional_call(model, params, args).sum().backward()
    assert all(v.grad is not None for k, v in params.items() if "bias" not in k)
    seen = []
    model.fc.register_forward_hook(lambda m, i, o: seen.append(m.weight.sum()))
    model.fc(args[0])
    assert_close(seen[0], _product(model.fc).sum())


def test_the_librarys_readers_get_the_values():
    layer, conv = _linear(), _conv()
    with torch.no_grad():
        want, want_conv = _product(layer), _product(conv)
    assert_close(layer.to_dense().weight, want)
    assert_close(conv.to_dense().weight, want_conv)
    assert_close(spectra.layer_matrix(layer), want)
    assert_close(spectra.layer_matrix(conv), want_conv.reshape(6, -1))
    assert_close(kinds.matrices(layer)[0], want)
    assert_close(kinds.matrices(conv), want_conv.reshape(2, 3, -1))


def test_repr_and_printing():
    layer = _linear()
    assert repr(layer.weight) == repr(_product(layer))
    assert "rank=3" in repr(layer)
