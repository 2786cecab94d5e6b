"""Composed layers (a weight written as a product of N factors) and the thin low-rank layers
that truncation produces. Each converts to and from the plain layer it replaces.

Shapes use PyTorch's conventions: a Linear weight is (out, in); a conv weight is
(C_out, C_in/g, kh, kw) and its matrix view, one matrix per group g, is
(g, C_out/g, C_in/g*kh*kw). Which module gets which layer is decided in :mod:`lorita.kinds`.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import is_int
from .functional import at_rounding_level, balanced_factors, chain_product, prefer_product

__all__ = [
    "FactorLinear",
    "FactorConv2d",
    "FactorMultiheadAttention",
    "LowRankLinear",
    "LowRankConv2d",
    "LowRankMultiheadAttention",
    "THIN_LAYERS",
    "is_thin",
    "LAYER_TYPES",
    "INITS",
    "ORDERS",
]

#: How composed factors start: "balanced" keeps the function, "independent" is the paper's.
INITS = ("balanced", "independent")
#: How a composed layer is evaluated (see :class:`FactorLinear`).
ORDERS = ("auto", "product", "sequential")
_INITS, _ORDERS = INITS, ORDERS


#: Tensor attributes and functions that read a tensor's metadata, not its values: a model
#: that asks a layer's weight for its device or dtype (``x.to(self.fc.weight.dtype)``,
#: ``next(self.parameters()).device``) does not compute with it.
METADATA_PROPERTIES = frozenset(
    "device dtype shape layout ndim is_cuda is_cpu is_meta is_mps is_xpu is_sparse is_quantized "
    "is_leaf requires_grad grad grad_fn names itemsize nbytes output_nr _version".split()
)
METADATA_FUNCTIONS = frozenset(
    "size dim ndimension numel nelement stride element_size storage_offset data_ptr get_device "
    "is_floating_point is_complex is_contiguous is_signed __len__ new_zeros new_ones new_empty "
    "new_full zeros_like ones_like empty_like full_like rand_like randn_like".split()
)
#: Of those, the ones about the memory that holds the values or the graph that made them:
#: a stand-in's (zero strides, no storage or graph of its own) would be wrong, so a
#: :class:`_ProductWeight` forms its values for them.
FORMED_METADATA = frozenset(
    "stride storage_offset data_ptr is_contiguous is_leaf grad grad_fn output_nr _version".split()
)
NOTHING = object()


def values_read(func, args: tuple):
    """Which tensor argument ``func`` reads the values of: None for all of them, ``args[0]``
    alone for ``x.to(w)`` / ``x.type_as(w)`` (``w`` gives only a dtype and device), and
    nothing (:data:`NOTHING`) for metadata reads."""
    name = getattr(func, "__name__", "")
    if name == "__get__":
        prop = getattr(getattr(func, "__self__", None), "__name__", "")
        return NOTHING if prop in METADATA_PROPERTIES else None
    if name in METADATA_FUNCTIONS:
        return NOTHING
    if name in ("to", "type_as") and args:
        return args[0]
    return None


class _ProductWeight(Tensor):
    """The ``.weight`` of a thin layer, formed only when its values are read.

    A model that asks a layer's weight for its device, dtype or shape (timm's EdgeNeXt,
    ``x.to(self.fc.weight.dtype)``) would otherwise multiply the thin factors back into the
    dense weight at every call: FLOPs the cut was meant to save (more than the dense layer
    costs at a small batch). Metadata reads are answered by a zero-stride stand-in of the
    right shape, dtype, device and ``requires_grad``; any other use (its strides and storage
    included) forms the product, once, and runs on it, so the weight behaves as the plain
    tensor it used to be:

    * formed with the autograd and inference mode of the moment it was taken (a weight taken
      under ``torch.no_grad()`` stays without a graph), with autograd, so gradients reach
      the factors; later uses, in-place ones (``w.zero_()``, ``w.retain_grad()``) included,
      share that one tensor, and once formed its metadata is that tensor's;
    * its values are those of the factors when it was taken: if they changed in place before
      it is first used (an optimizer step, ``load_state_dict``), using it raises a
      RuntimeError instead of returning the new values (take ``layer.weight`` again, or keep
      ``layer.weight.detach().clone()``); a change made through ``.data`` is not seen;
    * what differs from a plain tensor: ``type(w)`` is this class (``isinstance(w, Tensor)``
      holds, and everything it returns is a plain Tensor), and ``nn.Parameter(w)`` is refused
      with a TypeError: ``nn.Parameter(w.detach())`` makes the same parameter. Taking the
      weight costs a few microseconds (an empty stand-in), less than the product from about
      a 128 x 128 rank-8 layer up.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        reads = values_read(func, args)
        if reads is NOTHING:
            asked = getattr(func.__self__, "__name__", "") if name == "__get__" else name
            if asked not in FORMED_METADATA and not any(
                getattr(a, "_lorita_formed", None) is not None for a in args
            ):  # a stand-in's metadata, answered without forming anything
                with torch._C.DisableTorchFunctionSubclass():
                    return func(*args, **kwargs)
        if name == "detach" and _called_by_parameter():
            raise TypeError(
                "nn.Parameter(w): w is a cut layer's .weight, formed from its two factors, "
                "not a tensor of its own; use nn.Parameter(w.detach()) (a copy of its values)"
            )

        def real(a):
            if not isinstance(a, _ProductWeight):
                return a
            if reads is NOTHING or reads is None or a is reads:
                return a._lorita_form()
            return a.as_subclass(Tensor)  # x.to(w) / x.type_as(w): only its dtype and device

        args, kwargs = torch.utils._pytree.tree_map(real, (args, kwargs))
        return func(*args, **kwargs)

    def _lorita_form(self) -> Tensor:
        """The product (formed at the first call, then kept)."""
        if self._lorita_formed is None:
            self._lorita_formed = self._lorita_product()
        return self._lorita_formed

    # the reads a model makes at every call, answered without the __torch_function__ round
    @property
    def dtype(self) -> torch.dtype:
        formed = self._lorita_formed
        return self._lorita_meta[0] if formed is None else formed.dtype

    @property
    def device(self) -> torch.device:
        formed = self._lorita_formed
        return self._lorita_meta[1] if formed is None else formed.device

    @property
    def shape(self) -> torch.Size:
        formed = self._lorita_formed
        return self._lorita_meta[2] if formed is None else formed.shape


def _called_by_parameter() -> bool:
    """Whether the ``detach()`` being handled is ``nn.Parameter(w)``'s."""
    try:
        frame = sys._getframe(2)  # this <- __torch_function__ <- the caller of detach()
    except ValueError:  # no Python frame called it
        return False
    return frame.f_code is nn.Parameter.__new__.__code__


def _versions(factors: tuple[Tensor, ...]) -> list[int] | None:
    try:
        return [f._version for f in factors]
    except RuntimeError:  # an inference tensor keeps no version counter
        return None


def product_weight(shape: tuple[int, ...], factors: tuple[Tensor, ...], product) -> Tensor:
    """A weight of ``shape`` whose values ``product()`` forms when they are read (see
    :class:`_ProductWeight`); ``factors`` give its dtype, device and ``requires_grad``."""
    ref = factors[0]
    if torch.compiler.is_compiling() or not isinstance(ref, Tensor):
        return product()  # a graph keeps only the ops whose values are used (fx: proxies)
    dtype, device = ref.dtype, ref.device
    grad_mode, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    grad = grad_mode and any(f.requires_grad for f in factors)
    try:  # one element, never read: an empty tensor of zero strides
        stand_in = torch.empty_strided(shape, (0,) * len(shape), dtype=dtype, device=device)
        w = Tensor._make_subclass(_ProductWeight, stand_in, grad)
    except RuntimeError:  # fake tensors of torch.export, which take no subclass
        return product()
    taken = _versions(factors)

    def form() -> Tensor:
        if _versions(factors) != taken or (ref.dtype, ref.device) != (dtype, device):
            raise RuntimeError(
                "a cut layer's .weight was used after its factors changed in place (an "
                "optimizer step, load_state_dict, .to()): its values would not be those it had "
                "when taken. Take layer.weight again, or keep layer.weight.detach().clone()"
            )
        if torch.is_grad_enabled() == grad_mode and (
            torch.is_inference_mode_enabled() == inference
        ):
            return product()
        with torch.inference_mode(inference), torch.set_grad_enabled(grad_mode):
            return product()

    w._lorita_product, w._lorita_formed = form, None
    w._lorita_meta = (dtype, device, torch.Size(shape))
    return w


#: the most factors a layer is written as (a file says at most this many too)
MAX_FACTORS = 64


def check_n_factors(n_factors) -> int:
    """``n_factors`` as an int, or a ValueError: an integer in [1, MAX_FACTORS]."""
    if not is_int(n_factors) or not 1 <= n_factors <= MAX_FACTORS:
        raise ValueError(f"n_factors: expected an integer in [1, {MAX_FACTORS}], got {n_factors!r}")
    return int(n_factors)


def _check_choice(field: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{field}: expected one of {', '.join(allowed)}, got {value!r}")
    return value


def _resolve_inner(inner, full: int) -> int:
    if inner is None:
        return full
    if not is_int(inner) or inner < 1:
        raise ValueError(f"inner: expected None or an integer >= 1, got {inner!r}")
    return int(inner)


def _size(field: str, v) -> int:
    """A layer's width (features or channels): an integer >= 1, else a ValueError naming it
    (torch's own error for -1 is 'negative dimension', and True is 1)."""
    if not is_int(v) or v < 1:
        raise ValueError(f"{field}: expected an integer >= 1, got {v!r}"[:200])
    return int(v)


def _check_rank(rank, full: int) -> int:
    if not is_int(rank) or not 1 <= rank <= full:
        raise ValueError(f"rank: expected an integer with 1 <= rank <= {full}, got {rank!r}")
    return int(rank)


def _default_init_(w: Tensor) -> Tensor:
    """PyTorch's default Linear/Conv init: kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in))."""
    return nn.init.kaiming_uniform_(w, a=math.sqrt(5))


def _default_bias_(b: Tensor, fan_in: int) -> Tensor:
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return nn.init.uniform_(b, -bound, bound)


def _balanced_svd_split(w: Tensor, rank: int, svd=None) -> tuple[Tensor, Tensor]:
    """Best rank-r split ``w ~ second @ first`` with both halves carrying sqrt(S).

    ``svd``: a precomputed thin SVD ``(U, S, Vh)`` of ``w`` (saves the decomposition)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False) if svd is None else svd
    root = s[..., :rank].sqrt()
    first = root[..., :, None] * vh[..., :rank, :]  # (..., r, n)
    second = u[..., :, :rank] * root[..., None, :]  # (..., m, r)
    return first.to(w.dtype), second.to(w.dtype)


def _split(w: Tensor, n: int, inner: int) -> list[Tensor]:
    """Balanced factors of ``w`` (m, k) whose null directions can still learn.

    A direction with singular value 0 is 0 in every balanced factor, a point where gradient
    descent never moves (a zero-initialised head would stay zero for ever); one with a
    singular value at rounding level (a weight cut to rank r before, in float32: about 1e-8)
    is as stuck, its factors' entries being its n-th root. Such directions (singular value
    at most max(m, k) x epsilon x the largest, the numerical rank's rule, with float32's
    epsilon for a half-precision weight) get a
    small random row in the first factor and 1 on the middle diagonals, the last factor
    keeping a zero column: the product changes by no more than rounding and the last
    factor's gradient is not zero."""
    mats = balanced_factors(w, n, inner)
    if n == 1:
        return mats
    sigma = mats[0].double().norm(dim=1).pow(n)  # row i of W_1 is sigma_i^(1/n) v_i
    # at float32's precision at least: bfloat16's rule (256 x 2^-8) would call every
    # direction of a 256-wide weight null and zero the product
    rule = torch.promote_types(w.dtype, torch.float32)
    null = at_rounding_level(sigma, max(w.shape), rule)  # (inner,)
    if bool(null.any()):
        fan_in = w.shape[1]
        fill = _default_init_(mats[0].new_empty(int(null.sum()), fan_in))
        mats[0][null] = fill
        for mid in mats[1:-1]:
            mid[null, null] = 1.0
        mats[-1][:, null] = 0.0
    return mats


class _Composed:
    """What FactorLinear and FactorConv2d share: merging, the spec for saving, the repr."""

    def layer_spec(self) -> dict:
        """JSON description used by :func:`lorita.save` to rebuild this layer."""
        return {
            "kind": "factor",
            "n_factors": self.n_factors,
            "inner": self.inner,
            "order": self.order,
        }

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """The plain layer (``nn.Linear`` / ``nn.Conv2d``) computing the same function, on the
        same device and dtype."""
        out = self._plain()
        out.weight.copy_(self.weight)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def _options_repr(self) -> str:
        s = f", n_factors={self.n_factors}"
        if self.inner != self._default_inner:
            s += f", inner={self.inner}"
        if self.bias is None:
            s += ", bias=False"
        if self.init != "balanced":
            s += f", init={self.init!r}"
        if self.order != "auto":
            s += f", order={self.order!r}"
        return s


class FactorLinear(_Composed, nn.Module):
    """``nn.Linear`` whose weight is a product of ``n_factors`` bias-free factors.

    ``weight = W_N @ ... @ W_1`` with ``W_1`` (inner, in), middle factors (inner, inner) and
    ``W_N`` (out, inner); the bias is added once at the end. Weight decay on the factors then
    acts on the merged weight like a Schatten-(2/N) penalty, which favours low rank.

    Args:
        in_features, out_features, bias: as for ``nn.Linear``.
        n_factors: N >= 1. N=1 is an ordinary linear layer.
        init: "balanced" draws the usual dense init and splits it into balanced factors, so the
            layer starts as the same function as a fresh ``nn.Linear``; "independent" gives
            every factor PyTorch's default init (the paper's choice; the product starts small).
        inner: width of the inner dimensions; default ``min(in, out)`` (enough for any rank).
            ``inner=in_features`` is the paper's choice.
        order: how to evaluate. "auto" picks, per call, the cheaper of forming the product
            first or applying the factors one after another, from the shapes; "product" and
            "sequential" force one. Results and gradients agree up to rounding.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        n_factors: int = 3,
        bias: bool = True,
        init: str = "balanced",
        inner: int | None = None,
        order: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features = _size("in_features", in_features)
        self.out_features = _size("out_features", out_features)
        self.n_factors = check_n_factors(n_factors)
        self.init = _check_choice("init", init, _INITS)
        self.order = _check_choice("order", order, _ORDERS)
        self._default_inner = min(self.in_features, self.out_features)
        self.inner = _resolve_inner(inner, self._default_inner)
        w = self.widths
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.empty(w[i + 1], w[i], **kw)) for i in range(self.n_factors)]
        )
        self.bias = nn.Parameter(torch.empty(self.out_features, **kw)) if bias else None
        self.reset_parameters()

    @property
    def widths(self) -> list[int]:
        """``[in, inner, ..., inner, out]``: the widths along the chain."""
        return [self.in_features] + [self.inner] * (self.n_factors - 1) + [self.out_features]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "balanced":
                dense = _default_init_(
                    self.factors[0].new_empty(self.out_features, self.in_features)
                )
                self._set_factors(balanced_factors(dense, self.n_factors, self.inner))
            else:
                for f in self.factors:
                    _default_init_(f)
            if self.bias is not None:
                _default_bias_(self.bias, self.in_features)

    def _set_factors(self, mats: list[Tensor]) -> None:
        for p, m in zip(self.factors, mats):
            p.copy_(m)

    @property
    def weight(self) -> Tensor:
        """The merged weight (out, in); differentiable with respect to the factors."""
        return chain_product(list(self.factors))

    def use_product(self, x: Tensor) -> bool:
        if self.order != "auto":
            return self.order == "product"
        rows = x.numel() // self.in_features
        return prefer_product(self.widths, rows)

    def forward(self, input: Tensor) -> Tensor:  # (..., in) -> (..., out)
        x = input  # named as nn.Linear's, for a model that calls self.fc(input=x)
        if self.n_factors == 1 or self.use_product(x):
            return F.linear(x, self.weight, self.bias)
        for f in list(self.factors)[:-1]:
            x = F.linear(x, f)
        return F.linear(x, self.factors[-1], self.bias)

    def _plain(self) -> nn.Linear:
        p = self.factors[0]
        return nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=p.device,
            dtype=p.dtype,
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        n_factors: int = 3,
        *,
        init: str = "balanced",
        inner: int | None = None,
        order: str = "auto",
    ) -> FactorLinear:
        """Compose ``linear``. With init="balanced" the result computes the same function."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        _check_weight("linear", linear, 2, values=init == "balanced")
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            n_factors=n_factors,
            bias=linear.bias is not None,
            init="independent",
            inner=inner,
            order=order,
            device=w.device,
            dtype=w.dtype,
        )
        layer.init = _check_choice("init", init, _INITS)
        with torch.no_grad():
            if init == "balanced":
                layer._set_factors(_split(w.detach(), layer.n_factors, layer.inner))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}{self._options_repr()}"


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _check_groups(groups, c_in: int, c_out: int) -> int:
    if not is_int(groups) or groups < 1:
        raise ValueError(f"groups: expected an integer >= 1, got {groups!r}")
    if c_in % groups or c_out % groups:
        raise ValueError(
            f"groups: {groups} must divide in_channels {c_in} and out_channels {c_out}"
        )
    return int(groups)


class _ConvGeometry:
    """The Conv2d options shared by the composed and low-rank convolutions."""

    groups: int = 1

    def _init_geometry(self, kernel_size, stride, padding, dilation, padding_mode) -> None:
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        if isinstance(padding, str):
            _check_choice("padding", padding, ("same", "valid"))
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError("padding: 'same' is not supported for strided convolutions")
            self.padding = padding
        else:
            self.padding = _pair(padding)
        self.padding_mode = _check_choice(
            "padding_mode", padding_mode, ("zeros", "reflect", "replicate", "circular")
        )
        # F.pad order: (left, right, top, bottom), as nn.Conv2d computes it.
        rpad = []
        for i in (1, 0):
            if self.padding == "same":
                total = self.dilation[i] * (self.kernel_size[i] - 1)
                rpad += [total // 2, total - total // 2]
            elif self.padding == "valid":
                rpad += [0, 0]
            else:
                rpad += [self.padding[i], self.padding[i]]
        self._pad = tuple(rpad)

    def _conv(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _out_pixels(self, x: Tensor) -> int:
        """Batch x H_out x W_out for input ``x`` (B, C, H, W) or (C, H, W)."""
        batch = x.shape[0] if x.dim() == 4 else 1
        n = batch
        for i, size in enumerate(x.shape[-2:]):
            pad = self._pad[2 * (1 - i)] + self._pad[2 * (1 - i) + 1]
            span = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            n *= max(0, (size + pad - span) // self.stride[i] + 1)
        return n

    def _geometry_repr(self) -> str:
        s = f"kernel_size={self.kernel_size}"
        if self.stride != (1, 1):
            s += f", stride={self.stride}"
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s

    def _plain_conv(self, c_in: int, c_out: int, bias: bool, ref: Tensor) -> nn.Conv2d:
        return nn.Conv2d(
            c_in,
            c_out,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias=bias,
            padding_mode=self.padding_mode,
            device=ref.device,
            dtype=ref.dtype,
        )


def _check_conv(conv, *, values: bool = True) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"conv: expected an nn.Conv2d, got {type(conv).__name__}")
    _check_weight("conv", conv, 4, values=values)


def _check_weight(field: str, layer, dims: int, *, values: bool = True) -> None:
    """A ValueError naming ``field`` unless ``layer`` has a ``dims``-D weight, and, where the
    conversion computes from it (``values``), one holding values (not on the meta device, no
    inf or NaN: :func:`check_finite`). A loader composes meta layers with fresh factors
    (init="independent"); a cut given the layer's SVD has checked it already."""
    w = getattr(layer, "weight", None) if isinstance(layer, nn.Module) else None
    if not isinstance(w, Tensor) or w.dim() != dims:
        kind = "nn.Linear" if dims == 2 else "nn.Conv2d"
        raise ValueError(
            f"{field}: expected an {kind} (a {dims}-D weight), got {type(layer).__name__}"
        )
    if not values:
        return
    if w.is_meta:
        raise ValueError(
            f"{field}: its weight is on the 'meta' device (a shape without values); "
            "materialise it first (to_empty, then load its weights)"
        )
    check_finite(layer, field)


def nonfinite_parameter(module: nn.Module) -> str | None:
    """The name of ``module``'s first parameter that holds inf or NaN (None when none does)."""
    for pname, p in module.named_parameters():
        if p.is_floating_point() and not p.is_meta and not bool(torch.isfinite(p).all()):
            return pname
    return None


def check_finite(module: nn.Module, name: str = "") -> None:
    """Refuse a layer whose parameters hold inf or NaN: it has no singular values, and
    composing it would spread them (the usual cause: training diverged)."""
    pname = nonfinite_parameter(module)
    if pname is not None:
        raise ValueError(
            f"layer {name or type(module).__name__!r}: its parameter {pname!r} holds inf "
            "or NaN (training diverged?); use a checkpoint from before, or train again "
            "with a lower learning rate"
        )


def _grouped(mats: list[Tensor], groups: int) -> list[Tensor]:
    """Stack per-group factor lists ``[[W_1, ..., W_N] per group]`` into (g*rows, cols) each."""
    return [torch.cat([m[i] for m in mats], 0) for i in range(len(mats[0]))]


class FactorConv2d(_Composed, _ConvGeometry, nn.Module):
    """``nn.Conv2d`` written as the k x k conv to ``inner`` channels followed by N-1 1x1 factors.

    Per group: ``weight_g = D_{N-1} @ ... @ D_1 @ W_0g.reshape(inner, -1)``, reshaped to
    (C_out, C_in/g, kh, kw); the bias is added once at the end. With groups > 1 the k x k conv
    and every 1x1 factor are grouped convolutions (one matrix chain per group). Options as
    :class:`FactorLinear`; every ``nn.Conv2d`` option is kept. Default inner width (per group)
    ``min(C_out/g, C_in/g*kh*kw)``; the paper uses C_out. Evaluating the product first is
    almost always cheaper for convolutions, since 1x1 factors would otherwise run at every pixel.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        n_factors: int = 3,
        init: str = "balanced",
        inner: int | None = None,
        order: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_channels = _size("in_channels", in_channels)
        self.out_channels = _size("out_channels", out_channels)
        self.groups = _check_groups(groups, self.in_channels, self.out_channels)
        self._init_geometry(kernel_size, stride, padding, dilation, padding_mode)
        self.n_factors = check_n_factors(n_factors)
        self.init = _check_choice("init", init, _INITS)
        self.order = _check_choice("order", order, _ORDERS)
        kh, kw_ = self.kernel_size
        g = self.groups
        self._fan_in = self.in_channels // g * kh * kw_
        self._default_inner = min(self.out_channels // g, self._fan_in)
        self.inner = _resolve_inner(inner, self._default_inner)
        first_out = self.out_channels if self.n_factors == 1 else g * self.inner
        params = [nn.Parameter(torch.empty(first_out, self.in_channels // g, kh, kw_, **kw))]
        w = self.widths
        params += [
            nn.Parameter(torch.empty(g * w[i + 1], w[i], **kw)) for i in range(1, self.n_factors)
        ]
        self.factors = nn.ParameterList(params)
        self.bias = nn.Parameter(torch.empty(self.out_channels, **kw)) if bias else None
        self.reset_parameters()

    @property
    def widths(self) -> list[int]:
        """``[C_in/g*kh*kw, inner, ..., inner, C_out/g]``: widths of each group's chain."""
        return (
            [self._fan_in]
            + [self.inner] * (self.n_factors - 1)
            + [self.out_channels // self.groups]
        )

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "balanced":
                dense = _default_init_(
                    self.factors[0].new_empty(
                        self.out_channels, self.in_channels // self.groups, *self.kernel_size
                    )
                )
                self._set_matrix_factors(dense)
            else:
                for f in self.factors:
                    _default_init_(f)
            if self.bias is not None:
                _default_bias_(self.bias, self._fan_in)

    def _set_matrix_factors(self, dense: Tensor) -> None:
        g = self.groups
        per_group = dense.reshape(g, self.out_channels // g, -1)  # (g, C_out/g, fan_in)
        mats = _grouped([_split(m, self.n_factors, self.inner) for m in per_group], g)
        self.factors[0].copy_(mats[0].reshape(self.factors[0].shape))
        for p, m in zip(list(self.factors)[1:], mats[1:]):
            p.copy_(m)

    def _matrices(self) -> list[Tensor]:
        """Each factor as a batch of per-group matrices (g, rows, cols)."""
        g = self.groups
        first = self.factors[0].reshape(-1, self._fan_in)
        if g == 1:  # plain 2-D matmuls: the common case stays as fast as it was
            return [first] + list(self.factors)[1:]
        return [first.reshape(g, -1, self._fan_in)] + [
            f.reshape(g, -1, f.shape[1]) for f in list(self.factors)[1:]
        ]

    @property
    def weight(self) -> Tensor:
        """The merged weight (C_out, C_in/g, kh, kw); differentiable."""
        w = chain_product(self._matrices())  # (g, C_out/g, fan_in)
        return w.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def use_product(self, x: Tensor) -> bool:
        if self.order != "auto":
            return self.order == "product"
        return prefer_product(self.widths, self._out_pixels(x))

    def forward(self, input: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H', W')
        x = input  # named as nn.Conv2d's, for a model that calls self.conv(input=x)
        if self.n_factors == 1 or self.use_product(x):
            return self._conv(x, self.weight, self.bias)
        y = self._conv(x, self.factors[0], None)  # (B, g*inner, H', W')
        rest = list(self.factors)[1:]
        for i, d in enumerate(rest):
            b = self.bias if i == len(rest) - 1 else None
            y = F.conv2d(y, d[:, :, None, None], b, groups=self.groups)
        return y

    def _plain(self) -> nn.Conv2d:
        return self._plain_conv(
            self.in_channels, self.out_channels, self.bias is not None, self.factors[0]
        )

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        n_factors: int = 3,
        *,
        init: str = "balanced",
        inner: int | None = None,
        order: str = "auto",
    ) -> FactorConv2d:
        """Compose ``conv``. With init="balanced" the result computes the same function."""
        _check_conv(conv, values=init == "balanced")
        w = conv.weight
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            n_factors=n_factors,
            init="independent",
            inner=inner,
            order=order,
            device=w.device,
            dtype=w.dtype,
        )
        layer.init = _check_choice("init", init, _INITS)
        with torch.no_grad():
            if init == "balanced":
                layer._set_matrix_factors(w.detach())
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, {self._geometry_repr()}{self._options_repr()}"


class FactorMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose packed q, k, v projection is three composed matrices.

    ``in_proj_weight`` (3E, E) is served, wherever the attention reads it, as the concatenation
    of three bias-free :class:`FactorLinear` chains ``in_proj[0..2]`` (q, k, v). ``out_proj`` is
    an ordinary sub-layer (composed on its own). Build it with :meth:`from_mha`.
    """

    in_proj: nn.ModuleList

    @property
    def in_proj_weight(self) -> Tensor:  # (3E, E)
        return torch.cat([c.weight for c in self.in_proj], 0)

    @property
    def n_factors(self) -> int:
        return self.in_proj[0].n_factors

    @property
    def inner(self) -> int:
        return self.in_proj[0].inner

    @property
    def order(self) -> str:
        return self.in_proj[0].order

    @classmethod
    def from_mha(
        cls,
        mha: nn.MultiheadAttention,
        n_factors: int = 3,
        *,
        init: str = "balanced",
        inner: int | None = None,
        order: str = "auto",
    ) -> FactorMultiheadAttention:
        """Compose the packed projection of ``mha`` (same function with init="balanced")."""
        if not isinstance(mha, nn.MultiheadAttention) or not mha._qkv_same_embed_dim:
            raise ValueError("mha: expected an nn.MultiheadAttention with packed q, k, v")
        new = copy.deepcopy(mha)
        w = new.in_proj_weight.detach()  # (3E, E)
        chains = []
        for part in w.chunk(3, 0):
            fc = nn.Linear(part.shape[1], part.shape[0], bias=False, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                fc.weight.copy_(part)
            chains.append(
                FactorLinear.from_linear(fc, n_factors, init=init, inner=inner, order=order)
            )
        delattr(new, "in_proj_weight")
        new.__class__ = cls
        new.in_proj = nn.ModuleList(chains)
        return new

    def layer_spec(self) -> dict:
        return {
            "kind": "factor",
            "n_factors": self.n_factors,
            "inner": self.inner,
            "order": self.order,
        }

    @torch.no_grad()
    def merge(self) -> nn.MultiheadAttention:
        """The plain ``nn.MultiheadAttention`` computing the same function."""
        w = self.in_proj_weight.detach().clone()
        plain = copy.deepcopy(self)
        delattr(plain, "in_proj")
        plain.__class__ = nn.MultiheadAttention
        plain.in_proj_weight = nn.Parameter(w)
        return plain


class LowRankLinear(nn.Module):
    """A rank-r linear map stored as two thin layers: ``second(first(x))``.

    ``first``: in -> r without bias, ``second``: r -> out with the bias; r*(in+out) (+out)
    parameters instead of in*out, and the same saving in FLOPs at run time.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = (
            _size("in_features", in_features),
            _size("out_features", out_features),
        )
        self.rank = _check_rank(rank, min(self.in_features, self.out_features))
        kw = {"device": device, "dtype": dtype}
        self.first = nn.Linear(self.in_features, self.rank, bias=False, **kw)
        self.second = nn.Linear(self.rank, self.out_features, bias=bias, **kw)

    @property
    def weight(self) -> Tensor:  # (out, in), formed when its values are read
        first, second = self.first.weight, self.second.weight
        return product_weight(
            (self.out_features, self.in_features), (first, second), lambda: second @ first
        )

    @property
    def bias(self) -> Tensor | None:
        return self.second.bias

    def forward(self, input: Tensor) -> Tensor:  # (..., in) -> (..., out), named as nn.Linear's
        return self.second(self.first(input))

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int, *, svd=None) -> LowRankLinear:
        """Best rank-r approximation of ``linear`` (any layer with a 2-D ``weight``).

        ``svd``: the thin SVD ``(U, S, Vh)`` of its weight, when already known."""
        _check_weight("linear", linear, 2, values=svd is None)
        w = linear.weight.detach()
        layer = cls(
            w.shape[1],
            w.shape[0],
            rank,
            bias=linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            first, second = _balanced_svd_split(w, layer.rank, svd)
            layer.first.weight.copy_(first.reshape(layer.first.weight.shape))
            layer.second.weight.copy_(second.reshape(layer.second.weight.shape))
            if linear.bias is not None:
                layer.second.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        w = self.first.weight
        out = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        out.weight.copy_(self.weight)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def layer_spec(self) -> dict:
        return {"kind": "low_rank", "rank": self.rank}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True = not attended) as 0 / -inf; a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    return mask.to(dtype)


def _merged_mask(
    attn_mask: Tensor | None, padding: Tensor | None, shape: tuple, dtype: torch.dtype
) -> Tensor | None:
    """``attn_mask`` ((L, S) or (B*H, L, S)) plus ``key_padding_mask`` ((B, S)), additive,
    broadcastable to the scores' ``shape`` (B, H, L, S)."""
    b, h, n_q, n_k = shape
    mask = _additive_mask(attn_mask, dtype)
    if mask is not None and mask.dim() == 3:
        mask = mask.reshape(b, h, n_q, n_k)
    pad = _additive_mask(padding, dtype)
    if pad is not None:
        pad = pad.reshape(b, 1, 1, n_k)
        mask = pad if mask is None else mask + pad
    return mask


class LowRankMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` whose q, k and v projections are thin rank-r layers.

    Called as the attention it replaces (same arguments, masks, ``batch_first``, unbatched
    inputs, ``need_weights``, dropout in training) and computing the same function at full
    rank; ``in_proj`` holds the three :class:`LowRankLinear` (q, k, v) and ``out_proj`` is
    called as a layer, so it can be thin too. With ``rank=None`` the projections are dense
    ``nn.Linear`` ("unpacked"): the form an attention takes when only its out_proj is cut
    thin. Its packed ``in_proj_weight`` is served for code that reads it, but
    ``_qkv_same_embed_dim`` is False: PyTorch's fused inference kernels
    (MultiheadAttention's, TransformerEncoderLayer's), which read the packed weight instead
    of calling the projections, are not taken. Supports the packed attention without
    ``add_bias_kv`` / ``add_zero_attn``; build it with :meth:`from_mha`.
    """

    _qkv_same_embed_dim = False  # no fused path: it would read in_proj_weight, not the layers
    bias_k = bias_v = None
    add_zero_attn = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        rank: int | None,
        *,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _size("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide embed_dim {embed_dim}")
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.head_dim = self.embed_dim // self.num_heads
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        kw = {"device": device, "dtype": dtype}
        e = self.embed_dim
        self.in_proj = nn.ModuleList(
            nn.Linear(e, e, bias=bias, **kw)
            if rank is None
            else LowRankLinear(e, e, rank, bias=bias, **kw)
            for _ in range(3)
        )
        self.out_proj = nn.Linear(e, e, bias=bias, **kw)

    @property
    def rank(self) -> int | None:
        """The q, k, v projections' rank (None: dense, the unpacked form)."""
        return getattr(self.in_proj[0], "rank", None)

    @property
    def in_proj_weight(self) -> Tensor:  # (3E, E), for code that reads it
        return torch.cat([p.weight for p in self.in_proj], 0)

    @property
    def in_proj_bias(self) -> Tensor | None:
        biases = [p.bias for p in self.in_proj]
        return None if biases[0] is None else torch.cat(biases, 0)

    @staticmethod
    def supports(mha: nn.Module) -> str:
        """Why ``mha`` cannot take this form ("" when it can)."""
        if isinstance(mha, LowRankMultiheadAttention):
            return ""
        if not isinstance(mha, nn.MultiheadAttention) or not mha._qkv_same_embed_dim:
            return "not an nn.MultiheadAttention with packed q, k, v"
        if mha.bias_k is not None or mha.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not supported by the thin form"
        return ""

    @classmethod
    def from_mha(cls, mha: nn.Module, rank: int | None, *, svd=None) -> LowRankMultiheadAttention:
        """The best rank-r approximation of each of ``mha``'s q, k, v projections (``rank=None``:
        the same projections, dense).

        ``mha``: an ``nn.MultiheadAttention`` (or its composed form); ``svd``: the thin SVD of
        its three (E, E) matrices stacked, ``(U (3,E,k), S (3,k), Vh (3,k,E))``. The new
        attention takes ``mha.out_proj`` itself (not a copy)."""
        why = cls.supports(mha)
        if why:
            raise ValueError(f"mha: {why}")
        w = mha.in_proj_weight.detach()
        b = mha.in_proj_bias
        biases = (None,) * 3 if b is None else b.detach().chunk(3, 0)
        new = cls.empty_like(mha, rank)
        for i, (part, bias) in enumerate(zip(w.chunk(3, 0), biases, strict=True)):
            layer = nn.Linear(part.shape[1], part.shape[0], bias=bias is not None, device="meta")
            layer.weight = nn.Parameter(part.clone())  # own tensors, not views of mha's
            if bias is not None:
                layer.bias = nn.Parameter(bias.clone())
            if rank is not None:
                one = None if svd is None else tuple(t[i] for t in svd)
                layer = LowRankLinear.from_linear(layer, rank, svd=one)
            new.in_proj[i] = layer.train(new.training)
        return new

    @classmethod
    def empty_like(cls, mha: nn.Module, rank: int | None) -> LowRankMultiheadAttention:
        """Shaped as ``mha`` at ``rank`` (weights to be loaded), holding ``mha.out_proj``."""
        ref = mha.out_proj.weight
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            rank,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            batch_first=mha.batch_first,
            device=ref.device,
            dtype=ref.dtype,
        )
        new.out_proj = mha.out_proj
        return new.train(mha.training)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, n_q, e = query.shape
        n_k, h, d = key.shape[1], self.num_heads, self.head_dim
        q, k, v = (
            proj(t).reshape(b, -1, h, d).transpose(1, 2)  # (B, H, L, d)
            for proj, t in zip(self.in_proj, (query, key, value), strict=True)
        )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)"
            )
        mask = None
        if not (is_causal and key_padding_mask is None and not need_weights):
            is_causal = False  # the mask given says it all
            mask = _merged_mask(attn_mask, key_padding_mask, (b, h, n_q, n_k), q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * d**-0.5) @ k.transpose(-2, -1)  # (B, H, L, S)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(-1)
            if p > 0:  # the weights returned are the dropped-out ones, as nn.MultiheadAttention's
                weights = F.dropout(weights, p)
            out = weights @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal
            )
        out = self.out_proj(out.transpose(1, 2).reshape(b, n_q, e))
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def unpacked(self) -> LowRankMultiheadAttention:
        """This attention with dense q, k, v projections (same out_proj): its dense form when
        the out_proj is thin (an nn.MultiheadAttention would read that weight itself)."""
        return LowRankMultiheadAttention.from_mha(self, None)

    @torch.no_grad()
    def to_dense(self) -> nn.MultiheadAttention:
        """The plain ``nn.MultiheadAttention`` computing the same function (same out_proj)."""
        w = self.in_proj_weight
        bias = self.in_proj_bias
        plain = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias=bias is not None,
            batch_first=self.batch_first,
            device=w.device,
            dtype=w.dtype,
        )
        plain.in_proj_weight.copy_(w)
        if bias is not None:
            plain.in_proj_bias.copy_(bias)
        plain.out_proj = self.out_proj
        return plain.train(self.training)

    def layer_spec(self) -> dict:
        return (
            {"kind": "unpacked"} if self.rank is None else {"kind": "low_rank", "rank": self.rank}
        )

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"rank={self.rank if self.rank is not None else 'dense (unpacked)'}, "
            f"batch_first={self.batch_first}"
        )


#: A thin 1x1 pair (no stride, padding or groups) whose channels-last input has at most this
#: many pixels (H x W) an image, and at least POINTWISE_MATMUL_ROWS pixels in all, runs as two
#: matrix products over the channels: at 4x4 and 2x2, batch 64, that takes 0.32-0.85 of the
#: dense convolution's time where the two convolutions take 0.46-1.01; from 8x8 up the
#: convolutions are as fast (``python bench/pointwise.py``), and so are they on a few rows
#: (batch 1: the products made mobilenet_v3_small's cut 6% slower, the convolutions not).
POINTWISE_MATMUL_PIXELS = 16
POINTWISE_MATMUL_ROWS = 64
_PRODUCTS = contextvars.ContextVar("lorita_pointwise_products", default=True)


@contextlib.contextmanager
def thin_pairs_as_layers() -> Iterator[None]:
    """Inside it (in this thread or task), every thin 1x1 pair calls its two layers: a traced
    pass (:func:`lorita.kinds.trace_forward`) then sees each layer run and its own output, so a
    BatchNorm after the pair folds into its second layer. The function is the same."""
    token = _PRODUCTS.set(False)
    try:
        yield
    finally:
        _PRODUCTS.reset(token)


class LowRankConv2d(_ConvGeometry, nn.Module):
    """A rank-r convolution: a k x k conv C_in -> g*r (no bias), then a 1x1 conv g*r -> C_out.

    With groups g > 1 both convolutions are grouped and every group keeps rank r. A 1x1 pair on
    a small channels-last input runs as two matrix products (:data:`POINTWISE_MATMUL_PIXELS`):
    the same function, the same parameters."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        groups: int = 1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = (
            _size("in_channels", in_channels),
            _size("out_channels", out_channels),
        )
        self.groups = g = _check_groups(groups, self.in_channels, self.out_channels)
        self._init_geometry(kernel_size, stride, padding, dilation, padding_mode)
        kh, kw_ = self.kernel_size
        fan_in = self.in_channels // g * kh * kw_
        self.rank = _check_rank(rank, min(self.out_channels // g, fan_in))
        kw = {"device": device, "dtype": dtype}
        self.first = nn.Conv2d(
            self.in_channels,
            g * self.rank,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            g,
            bias=False,
            padding_mode=self.padding_mode,
            **kw,
        )
        self.second = nn.Conv2d(g * self.rank, self.out_channels, 1, groups=g, bias=bias, **kw)

    @property
    def weight(self) -> Tensor:  # (C_out, C_in/g, kh, kw), formed when its values are read
        g, shape = self.groups, (self.out_channels, self.in_channels // self.groups)
        shape = (*shape, *self.kernel_size)
        first, second = self.first.weight, self.second.weight

        def product() -> Tensor:
            w = second.reshape(g, self.out_channels // g, self.rank) @ first.reshape(
                g, self.rank, -1
            )  # (g, C_out/g, fan_in)
            return w.reshape(shape)

        return product_weight(shape, (first, second), product)

    @property
    def bias(self) -> Tensor | None:
        return self.second.bias

    def forward(self, input: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H', W')
        if self._as_products(input):
            x = input.permute(0, 2, 3, 1)  # (B, H, W, C_in): a contiguous view
            x = F.linear(x, self.first.weight.flatten(1))
            return F.linear(x, self.second.weight.flatten(1), self.bias).permute(0, 3, 1, 2)
        return self.second(self.first(input))  # named as nn.Conv2d's

    def _as_products(self, x: Tensor) -> bool:
        """Whether this call runs as two matrix products: a 1x1 pair (no stride, padding or
        groups) on a channels-last batch of at most :data:`POINTWISE_MATMUL_PIXELS` pixels an
        image and :data:`POINTWISE_MATMUL_ROWS` in all, outside :func:`thin_pairs_as_layers`
        and outside an export or ``torch.compile``."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return False  # an exported or compiled graph keeps the convolutions (no branch on
            # the batch size, which an export leaves free)
        return (
            _PRODUCTS.get()
            and x.dim() == 4
            and x.shape[-2] * x.shape[-1] <= POINTWISE_MATMUL_PIXELS
            and x.shape[0] * x.shape[-2] * x.shape[-1] >= POINTWISE_MATMUL_ROWS
            and self.kernel_size == (1, 1)
            and self.stride == (1, 1)
            and self.groups == 1
            and not any(self._pad)
            and x.is_contiguous(memory_format=torch.channels_last)
        )

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: int, *, svd=None) -> LowRankConv2d:
        """Best rank-r approximation (per group) of ``conv`` (an nn.Conv2d or FactorConv2d).

        ``svd``: the thin SVD ``(U, S, Vh)`` of its per-group matrices (g, C_out/g, fan_in)."""
        _check_weight("conv", conv, 4, values=svd is None)
        w = conv.weight.detach()
        c_out, g = w.shape[0], getattr(conv, "groups", 1)
        layer = cls(
            w.shape[1] * g,
            c_out,
            conv.kernel_size,
            rank,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.bias is not None,
            conv.padding_mode,
            groups=g,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            first, second = _balanced_svd_split(w.reshape(g, c_out // g, -1), layer.rank, svd)
            layer.first.weight.copy_(first.reshape(layer.first.weight.shape))
            layer.second.weight.copy_(second.reshape(layer.second.weight.shape))
            if conv.bias is not None:
                layer.second.bias.copy_(conv.bias)
        return layer

    @torch.no_grad()
    def to_dense(self) -> nn.Conv2d:
        out = self._plain_conv(
            self.in_channels, self.out_channels, self.bias is not None, self.first.weight
        )
        out.weight.copy_(self.weight)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def layer_spec(self) -> dict:
        return {"kind": "low_rank", "rank": self.rank}

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, {self._geometry_repr()}, rank={self.rank}"


#: Every layer kind whose weight LoRITa reads, composes or truncates.
LAYER_TYPES = (
    nn.Linear,
    nn.Conv2d,
    nn.MultiheadAttention,
    FactorLinear,
    FactorConv2d,
    LowRankLinear,
    LowRankConv2d,
    LowRankMultiheadAttention,
)
#: The thin forms a cut layer takes (each has ``rank``, ``to_dense()`` and ``layer_spec()``).
THIN_LAYERS = (LowRankLinear, LowRankConv2d, LowRankMultiheadAttention)


def is_thin(module: nn.Module | None) -> bool:
    """Whether ``module`` is a cut layer in its thin form (an unpacked attention is not)."""
    return isinstance(module, THIN_LAYERS) and module.rank is not None
