"""THE table of layer kinds: for each kind of layer, how to compose it, merge it, read its
matrices, cut it, build its thin form and describe it in a saved spec.

convert (compose, merge), truncation (cut, form), export (save, load) and cost all dispatch
through :data:`KINDS`; adding a kind is one class here plus its tests. The kinds:

==============  ==========================================  ===============================
kind            module                                      matrices (G, m, n)
==============  ==========================================  ===============================
linear          nn.Linear                                   1 x (out, in)
conv            nn.Conv2d, groups=1                         1 x (C_out, C_in*kh*kw)
grouped_conv    nn.Conv2d, groups=g > 1                     g x (C_out/g, C_in/g*kh*kw)
depthwise       nn.Conv2d with one input channel per group  none: left as it is
parametrized    a Linear / Conv2d / MultiheadAttention      none: left as it is
                whose weight a parametrization computes
                (weight_norm, spectral_norm, ...)
attention       nn.MultiheadAttention, packed q, k, v       3 x (E, E)
direct          a Linear / Conv2d whose weight the model    as linear / conv
                reads without calling the layer
==============  ==========================================  ===============================

A layer has one rank; with G > 1 matrices every matrix keeps that rank. Its spectrum is the
root mean square over the G matrices of each singular value, so the energy a cut drops is
exactly G times the energy of the pooled tail.

The thin form (LowRankLinear / LowRankConv2d, and for ``attention`` LowRankMultiheadAttention:
thin q, k, v projections, out_proj called as a layer) is only used where it is what the model
calls: ``direct`` layers keep a dense rank-r weight, as does an ``attention`` layer with
``add_bias_kv`` / ``add_zero_attn``. An attention's out_proj, which nn.MultiheadAttention
reads itself, is thin only in a LowRankMultiheadAttention (with dense q, k, v, "unpacked",
when the attention itself is not cut thin). An
nn.TransformerEncoderLayer holding a thin layer is kept off its fused inference path, which
would read the weights instead of calling the layers (:func:`unfuse_encoders`).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from . import inputs
from .checks import check_module, is_int
from .clone import clone_model, eager, evaluating, is_compiled, rebind_compiled, unwrap
from .functional import svd64
from .layers import (
    INITS,
    ORDERS,
    THIN_LAYERS,
    FactorConv2d,
    FactorLinear,
    FactorMultiheadAttention,
    LowRankConv2d,
    LowRankLinear,
    LowRankMultiheadAttention,
    check_finite,
    is_thin,
    thin_pairs_as_layers,
    values_read,
)

__all__ = [
    "KINDS",
    "Kind",
    "INITS",
    "ORDERS",
    "INNER_CHOICES",
    "FORMS",
    "DECIDE_BY",
    "LayerEntry",
    "kind_of",
    "layer_table",
    "other_layers",
    "why_other",
    "iter_layers",
    "output_layer",
    "find_output_layer",
    "matrices",
    "pooled_spectrum",
    "layer_svd",
    "find_direct_reads",
    "trace_forward",
    "Trace",
    "guess_example_input",
    "guess_example_inputs",
    "set_module",
    "set_modules",
    "cut_model",
    "choose_forms",
    "median_seconds",
    "unfuse_encoders",
    "can_be_thin",
    "callable_out_proj",
]

#: Inner widths of composed factors: None/"min" = min(in, out); "paper" = the authors' widths.
INNER_CHOICES = (None, "min", "paper")
#: Truncation forms: "low_rank" (thin layers where cheaper) or "dense" (rank-r dense weights).
FORMS = ("low_rank", "dense")
#: How truncate decides between the thin and the dense form of a cut layer.
DECIDE_BY = ("flops", "latency")


#: What every nn.Module keeps in its ``__dict__`` (never a user's alias of a layer).
_MODULE_STATE = frozenset(vars(nn.Module()))
#: ... and what a plain layer keeps there (its options): anything else on a layer is the user's.
_LAYER_STATE = _MODULE_STATE.union(
    *(vars(m) for m in (nn.Linear(1, 1), nn.Conv2d(1, 1, 1), nn.MultiheadAttention(2, 1)))
)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``new``, also where the model
    keeps the old one in a plain list, tuple or dict attribute (``self.order =
    list(self.blocks)``), which its forward may call instead of the registered name."""
    set_modules(model, [(name, new)])


def set_modules(model: nn.Module, replacements: Iterable[tuple[str, nn.Module]]) -> None:
    """:func:`set_module` for each ``(name, new)`` in turn, the model's plain containers
    scanned once for all of them (a scan per layer is most of the time of cutting a deep
    model). A module registered under several names (``self.b = self.a``) is replaced under
    each, so its call sites keep sharing one layer."""
    swaps: dict[int, tuple[nn.Module, nn.Module]] = {}  # id(old) -> (old, new): old kept alive
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        setattr(parent, child, new)
        swaps[id(old)] = (old, new)
    if not swaps:
        return
    added = {id(new) for _, new in swaps.values()}
    for m in list(model.modules()):
        for child, sub in list(m._modules.items()):  # the other names of a replaced module
            if sub is not None and id(sub) in swaps and swaps[id(sub)][0] is sub:
                m._modules[child] = swaps[id(sub)][1]
        if is_compiled(m) and id(m._orig_mod) in added:
            rebind_compiled(m)  # a compiled layer: its wrapper is bound to the one replaced
        for k, v in vars(m).items():
            if type(v) in (list, tuple, dict) and k not in _MODULE_STATE:
                relinked = _relink(v, swaps, depth=0)
                if relinked is not v:
                    object.__setattr__(m, k, relinked)


def _relink(v, swaps: dict[int, tuple[nn.Module, nn.Module]], *, depth: int):
    """``v`` with each replaced module swapped for its replacement (lists and dicts in place,
    tuples rebuilt), through at most three levels of plain containers of at most 4096 items."""
    seen = 0
    while id(v) in swaps and swaps[id(v)][0] is v and seen < len(swaps):
        v, seen = swaps[id(v)][1], seen + 1  # replaced, perhaps replaced again
    if seen:
        return v
    if depth > 2 or type(v) not in (list, tuple, dict) or len(v) > 4096:
        return v  # a large container (a vocabulary, a lookup table) holds no layer aliases
    if type(v) is dict:
        for k, item in v.items():
            v[k] = _relink(item, swaps, depth=depth + 1)
        return v
    items = [_relink(item, swaps, depth=depth + 1) for item in v]
    if type(v) is list:
        v[:] = items
        return v
    return v if all(a is b for a, b in zip(items, v)) else tuple(items)


#: Forward and backward hook tables of an nn.Module; a replacing layer takes them over.
_HOOK_TABLES = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def _weight_hook(hook) -> bool:
    """Hooks that recompute the old layer's ``weight`` (pruning masks, the old-style
    weight_norm and spectral_norm): their effect is already in the weight composed or cut."""
    from torch.nn.utils.prune import BasePruningMethod

    return isinstance(hook, BasePruningMethod) or _norm_hook(hook)


def _norm_hook(hook) -> bool:
    """An old-style ``torch.nn.utils.weight_norm`` / ``spectral_norm`` hook: like a
    parametrization, it recomputes its layer's weight at every call."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return isinstance(hook, (WeightNorm, SpectralNorm))


def _norm_hooks(module: nn.Module) -> list:
    """The old-style weight_norm / spectral_norm hooks of ``module``."""
    return [h for h in module._forward_pre_hooks.values() if _norm_hook(h)]


def like(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` (the layer replacing ``old``) in ``old``'s training mode, frozen
    (``requires_grad=False``) when every parameter of ``old`` was (a frozen backbone stays
    frozen when composed, merged or cut; a layer whose bias alone, or weight alone, was frozen
    keeps its bias, or its weight's factors, frozen), and with ``old``'s forward and backward
    hooks (a user's hook keeps acting on the layer's output; hooks that recompute the weight
    are dropped: their effect is in it). ``old`` is being replaced: its hook tables move."""
    new.train(old.training)
    params = dict(old.named_parameters())
    bias = params.pop("bias", None)
    weights = {p.requires_grad for p in params.values()}  # the weight, or its factors
    flags = weights | ({bias.requires_grad} if bias is not None else set())
    if flags == {False}:
        new.requires_grad_(False)
    elif bias is not None and weights == {not bias.requires_grad}:
        for name, p in new.named_parameters():
            p.requires_grad_(
                bias.requires_grad if name.rsplit(".", 1)[-1] == "bias" else any(weights)
            )
    if any(getattr(old, t) for t in _HOOK_TABLES):
        for t in _HOOK_TABLES:  # the same tables: a user's handle.remove() still works
            table = getattr(old, t)
            for k in [k for k, h in table.items() if _weight_hook(h)]:
                del table[k]
            setattr(new, t, table)
        if old._is_full_backward_hook is not None:
            new._is_full_backward_hook = old._is_full_backward_hook
    _carry_attributes(old, new)
    return new


def _carry_attributes(old: nn.Module, new: nn.Module) -> None:
    """The plain attributes a user set on ``old`` (``fc.temperature = 3.0``, which the model's
    forward may read), set on ``new`` too where it has none of that name; tensors and modules
    are state, not attributes (a layer holding those is left as it is)."""
    for k, v in vars(old).items():
        if k in _LAYER_STATE or isinstance(v, (Tensor, nn.Module)):
            continue
        if k in vars(new) or hasattr(type(new), k):
            continue
        with contextlib.suppress(AttributeError, TypeError):
            object.__setattr__(new, k, v)


def _svd_weight(svd: tuple[Tensor, Tensor, Tensor], rank: int) -> Tensor:
    u, s, vh = svd  # s may be kept in float64, the vectors in the weights' precision
    return (u[..., :, :rank] * s[..., None, :rank].to(u.dtype)) @ vh[..., :rank, :]  # (G, m, n)


class Kind:
    """One kind of layer. Subclasses override what differs; every method takes the module."""

    name = ""
    label = ""
    composable = True  # compose / cut it at all
    thin_form = True  # the thin two-layer form can be what the model calls
    why_left = ""  # for kinds that are not composable

    def why(self, module: nn.Module) -> str:
        """Why a layer of this kind is left as it is (kinds that are not composable)."""
        return self.why_left

    def why_dense(self, module: nn.Module) -> str:
        """Why this layer cannot take the thin form ("" when it can)."""
        return (
            "" if self.thin_form else f"{self.label}: the thin form cannot be what the model calls"
        )

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def compose(self, module, n_factors, *, init, inner, order) -> nn.Module:
        raise NotImplementedError

    def merge(self, module: nn.Module) -> nn.Module:
        """The plain module computing the same function."""
        if hasattr(module, "merge"):
            return module.merge()
        if hasattr(module, "to_dense"):
            return module.to_dense()
        return module

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight

    def matrices(self, module: nn.Module) -> Tensor:
        """The layer's merged weight as a batch of matrices (G, m, n), detached."""
        w = self.weight(module).detach()
        return w.reshape(1, w.shape[0], -1)

    def paper_inner(self, module: nn.Module) -> int:
        raise NotImplementedError

    def thin(self, module: nn.Module, rank: int, svd) -> nn.Module:
        raise NotImplementedError

    def dense_cut(self, module: nn.Module, rank: int, svd) -> None:
        """Replace the (plain) module's weight by its best rank-r approximation, in place."""
        w = self.weight(module)
        with torch.no_grad():
            w.copy_(_svd_weight(svd, rank).reshape(w.shape).to(w.dtype))

    def empty(self, plain: nn.Module, spec: dict) -> nn.Module:
        """A module shaped as ``spec`` says, built from the plain one, weights to be loaded."""
        form = spec.get("kind")
        if form == "factor":
            return self.compose(
                plain,
                spec["n_factors"],
                init="independent",
                inner=spec.get("inner"),
                order=spec.get("order", "auto"),
            )
        if form == "low_rank" and not self.why_dense(plain):
            thin = self.empty_thin(plain, spec["rank"])
            ref = next(plain.parameters(), None)  # the fresh model's dtype and device
            return thin if ref is None else thin.to(device=ref.device, dtype=ref.dtype)
        raise ValueError(f"spec: a {self.name} layer cannot be stored as {form!r}")

    def empty_thin(self, plain: nn.Module, rank: int) -> nn.Module:
        raise NotImplementedError

    def full_rank(self, module: nn.Module) -> int:
        _, m, n = self.shape(module)
        return min(m, n)

    def shape(self, module: nn.Module) -> tuple[int, int, int]:
        """(G, m, n) of :meth:`matrices` without computing them."""
        w = self.weight(module)
        return 1, w.shape[0], w[0].numel()


class LinearKind(Kind):
    name, label = "linear", "Linear"

    def matches(self, module):
        return isinstance(module, (nn.Linear, FactorLinear, LowRankLinear))

    def compose(self, module, n_factors, *, init, inner, order):
        return FactorLinear.from_linear(module, n_factors, init=init, inner=inner, order=order)

    def paper_inner(self, module):
        return module.in_features

    def thin(self, module, rank, svd):
        return LowRankLinear.from_linear(module, rank, svd=svd)

    def empty_thin(self, plain, rank):
        return LowRankLinear(
            plain.in_features, plain.out_features, rank, bias=plain.bias is not None
        )


class ConvKind(Kind):
    name, label = "conv", "Conv2d"

    def _is_conv(self, module) -> bool:
        return isinstance(module, (nn.Conv2d, FactorConv2d, LowRankConv2d))

    def matches(self, module):
        return self._is_conv(module) and getattr(module, "groups", 1) == 1

    def compose(self, module, n_factors, *, init, inner, order):
        return FactorConv2d.from_conv(module, n_factors, init=init, inner=inner, order=order)

    def paper_inner(self, module):
        return module.out_channels // module.groups

    def thin(self, module, rank, svd):
        return LowRankConv2d.from_conv(module, rank, svd=svd)

    def empty_thin(self, plain, rank):
        return LowRankConv2d(
            plain.in_channels,
            plain.out_channels,
            plain.kernel_size,
            rank,
            plain.stride,
            plain.padding,
            plain.dilation,
            plain.bias is not None,
            plain.padding_mode,
            groups=plain.groups,
        )

    def shape(self, module):
        g = module.groups
        w = self.weight(module)
        return g, w.shape[0] // g, w[0].numel()

    def matrices(self, module):
        g, m, n = self.shape(module)
        return self.weight(module).detach().reshape(g, m, n)


class GroupedConvKind(ConvKind):
    name, label = "grouped_conv", "grouped Conv2d"

    def matches(self, module):
        g = getattr(module, "groups", 1)
        return self._is_conv(module) and g > 1 and module.in_channels // g > 1


class DepthwiseKind(ConvKind):
    name, label = "depthwise", "depthwise Conv2d"
    composable = False
    why_left = "depthwise convolution (one input channel per group): nothing to gain"

    def matches(self, module):
        g = getattr(module, "groups", 1)
        return isinstance(module, nn.Conv2d) and g > 1 and module.in_channels // g == 1


#: forwards of the plain layers: a subclass that keeps one of them computes the same function
_PLAIN = (nn.Linear, nn.Conv2d)
#: class -> why its own forward makes it a layer to leave ("" when it computes the plain one)
_OWN_FORWARD: dict[type, str] = {}


def _probe_input(module: nn.Module) -> Tensor:
    w = module.weight
    g = torch.Generator().manual_seed(0)  # the global random state is the user's
    if isinstance(module, nn.Linear):
        return torch.randn(3, module.in_features, generator=g).to(w)
    sides = [d * (k - 1) + 1 + 3 * s for k, d, s in zip(module.kernel_size, module.dilation,
                                                         module.stride, strict=True)]  # fmt: skip
    return torch.randn(2, module.in_channels, *sides, generator=g).to(w)


def _own_state(module: nn.Module) -> list[str]:
    """The parameters, buffers and sub-modules ``module`` holds beyond a plain layer's weight
    and bias (a LoRA branch, a mask): composing would drop them. A pruning hook's tensors
    (``weight_orig``, ``weight_mask``) are the weight: composing bakes the mask in."""
    from torch.nn.utils.prune import BasePruningMethod

    pruned = {
        f"{h._tensor_name}{end}"
        for h in module._forward_pre_hooks.values()
        if isinstance(h, BasePruningMethod)
        for end in ("_orig", "_mask")
    }
    held = {**module._parameters, **module._buffers}
    keep = {"weight", "bias", *pruned}
    extra = [n for n, v in held.items() if v is not None and n not in keep]
    return extra + list(module._modules)


@torch.no_grad()
def _own_forward(module: nn.Module) -> str:
    """Why ``module``, of a subclass with its own forward (or one replaced on the instance),
    computes more than the plain layer from its weight (timm's ScaledStdConv2d standardises
    it; a LoRA branch adds to it, even while it is still zero), checked once per class on a
    random input; "" when the two agree."""
    cls = type(module)
    if "forward" in vars(module):  # module.forward = ...: this instance's, never the class's
        return (
            f"its forward is replaced on the instance ({cls.__name__}.forward = ...): composing "
            "or cutting it would drop that"
        )
    if cls in _OWN_FORWARD:
        return _OWN_FORWARD[cls]
    extra = _own_state(module)
    if extra:
        why = (
            f"{cls.__name__} has its own forward and holds {', '.join(extra[:4])} beside its "
            f"weight: composing or cutting it would drop them"
        )
        _OWN_FORWARD[cls] = why
        return why
    if module.weight.is_meta:
        return ""  # nothing to compute with: checked on the first real instance
    base = next(b for b in cls.__mro__ if b in _PLAIN)
    was = module.training
    module.eval()
    try:
        x = _probe_input(module)
        want, plain = module(x), base.forward(module, x)
        same = torch.is_tensor(want) and want.shape == plain.shape
        same = same and bool((want - plain).abs().max() <= 1e-4 * (plain.abs().max() + 1e-6))
    except Exception:  # noqa: BLE001 - a forward that refuses a plain layer's input
        same = False
    finally:
        module.train(was)
    why = "" if same else (
        f"{cls.__name__} has its own forward, which computes more than a plain "
        f"{base.__name__} from its weight: composing or cutting it would change the function"
    )  # fmt: skip
    _OWN_FORWARD[cls] = why
    return why


class ParametrizedKind(Kind):
    """A layer whose weight is computed by a ``torch.nn.utils.parametrize`` parametrization
    (weight_norm, spectral_norm, orthogonal, your own) or by the old-style weight_norm /
    spectral_norm hooks: left as it is, since composing it
    would replace what the parametrization computes and drop it from training."""

    name, label = "parametrized", "parametrized weight"
    composable = False

    def matches(self, module):
        return isinstance(module, (*_PLAIN, nn.MultiheadAttention)) and bool(
            parametrize.is_parametrized(module) or _norm_hooks(module)
        )

    def why(self, module) -> str:
        given = getattr(module, "parametrizations", {})
        names = sorted(
            {type(p).__name__.lstrip("_") for ps in given.values() for p in ps}
            | {type(h).__name__ for h in _norm_hooks(module)}
        )
        tensors = sorted(set(given) | ({"weight"} if _norm_hooks(module) else set()))
        verb = "is" if len(tensors) == 1 else "are"
        return (
            f"its {' and '.join(tensors)} {verb} computed by a parametrization "
            f"({', '.join(names)}): composing would drop it"
        )


#: weight-bearing modules that are no kind of the table: listed by overparameterize as left
_OTHER = (
    nn.modules.conv._ConvNd, nn.RNNBase, nn.Bilinear, nn.MultiheadAttention, nn.Embedding,
    nn.EmbeddingBag,
)  # fmt: skip


def other_layers(model: nn.Module, table: list[LayerEntry]) -> list[tuple[str, nn.Module]]:
    """Modules with a weight that no kind handles (Conv1d, Conv3d, transposed convolutions,
    RNNs, Bilinear, MultiheadAttention with separate q, k, v, embeddings), outside the layers of
    ``table``, in module order."""
    taken = [e.name for e in table]
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, _OTHER) or kind_of(module) is not None:
            continue
        if any(name == t or name.startswith(t + ".") for t in taken):
            continue
        out.append((name, module))
    return out


def why_other(module: nn.Module) -> str:
    """Why a module of :func:`other_layers` is left as it is."""
    if isinstance(module, nn.MultiheadAttention):
        return (
            "MultiheadAttention with separate q, k, v projections (kdim or vdim differ from "
            "embed_dim): only the packed form is composed"
        )
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return f"{type(module).__name__} is a table of rows looked up, not a matrix product"
    return (
        f"{type(module).__name__} is not a kind LoRITa composes "
        "(Linear, Conv2d, MultiheadAttention)"
    )


class OwnForwardKind(Kind):
    """A Linear or Conv2d subclass whose own forward does more with its weight than the plain
    layer (weight standardisation, ...), or a layer holding tensors beside its weight and bias
    (a buffer the model reads, ``fc.register_buffer("scale", ...)``): left as it is, with the
    reason."""

    name, label = "own_forward", "layer with its own forward"
    composable = False

    def matches(self, module):
        if not isinstance(module, _PLAIN):
            return False
        if self._plain_forward(module):  # the plain layers and subclasses that keep it
            return bool(_own_state(module))  # unless the model hangs tensors on the layer
        return bool(_own_forward(module))

    @staticmethod
    def _plain_forward(module) -> bool:
        kept = any(type(module).forward is b.forward for b in _PLAIN)
        return kept and "forward" not in vars(module)

    def why(self, module) -> str:
        if self._plain_forward(module):
            return (
                f"it holds {', '.join(_own_state(module)[:4])} beside its weight and bias, "
                "which the model may read: composing or cutting it would drop them"
            )
        return _own_forward(module)


class AttentionKind(Kind):
    name, label = "attention", "MultiheadAttention q, k, v"

    def matches(self, module):
        if isinstance(module, LowRankMultiheadAttention):
            return True
        return isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim

    def why_dense(self, module):
        why = LowRankMultiheadAttention.supports(module)
        return f"{self.label}: {why}" if why else ""

    def thin(self, module, rank, svd):
        return LowRankMultiheadAttention.from_mha(module, rank, svd=svd)

    def empty_thin(self, plain, rank):
        return LowRankMultiheadAttention.empty_like(plain, rank)

    def empty(self, plain, spec):
        if spec.get("kind") == "unpacked" and not self.why_dense(plain):
            return LowRankMultiheadAttention.empty_like(plain, None)
        return super().empty(plain, spec)

    def compose(self, module, n_factors, *, init, inner, order):
        return FactorMultiheadAttention.from_mha(
            module, n_factors, init=init, inner=inner, order=order
        )

    def weight(self, module):
        return module.in_proj_weight  # (3E, E), a property on the composed form

    def paper_inner(self, module):
        return module.embed_dim

    def shape(self, module):
        e = module.embed_dim
        return 3, e, e

    def matrices(self, module):
        return self.weight(module).detach().reshape(3, module.embed_dim, module.embed_dim)


class DirectKind(Kind):
    """A Linear or Conv2d whose weight the model reads itself (``F.linear(x, m.weight)``):
    composed like its base kind (the composed layer serves ``.weight``), cut dense."""

    name, label = "direct", "weight read directly"
    thin_form = False

    def __init__(self) -> None:
        self._bases = (LinearKind(), ConvKind(), GroupedConvKind())

    def base(self, module) -> Kind:
        for k in self._bases:
            if k.matches(module):
                return k
        raise ValueError(f"layer: a {type(module).__name__} cannot be a directly read weight")

    def matches(self, module):
        return any(k.matches(module) for k in self._bases)

    def compose(self, module, n_factors, **kw):
        return self.base(module).compose(module, n_factors, **kw)

    def paper_inner(self, module):
        return self.base(module).paper_inner(module)

    def shape(self, module):
        return self.base(module).shape(module)

    def matrices(self, module):
        return self.base(module).matrices(module)


#: Every kind by name, in the order they are tried (depthwise before grouped before conv).
KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        ParametrizedKind(),
        OwnForwardKind(),
        LinearKind(),
        DepthwiseKind(),
        GroupedConvKind(),
        ConvKind(),
        AttentionKind(),
        DirectKind(),
    )
}


def kind_of(module: nn.Module, *, direct: bool = False) -> Kind | None:
    """The kind of ``module`` (None when LoRITa has nothing to do with it)."""
    if direct and KINDS["direct"].matches(module) and not KINDS["parametrized"].matches(module):
        return KINDS["direct"]
    for k in KINDS.values():
        if k.name != "direct" and k.matches(module):
            return k
    return None


#: why a layer whose weight or bias is another module's too (an output layer tied to the
#: embedding) is neither composed nor cut: either would change the other module
TIED = "its weight or bias is shared with another module (tied parameters)"


@dataclass
class LayerEntry:
    """One layer of a model as the kinds table sees it."""

    name: str
    module: nn.Module
    kind: Kind
    shared: bool = False  # a Parameter of its own is another module's too (see TIED)


def _skip_inside(name: str, module: nn.Module) -> str | None:
    """Prefix of the sub-modules that belong to this layer (not layers of their own)."""
    if isinstance(module, (FactorMultiheadAttention, LowRankMultiheadAttention)):
        return name + ".in_proj."
    if isinstance(module, (FactorLinear, FactorConv2d, LowRankLinear, LowRankConv2d)):
        return name + "."
    return None


def stages(layers: Iterable[str], most: int = 12) -> dict[str, str]:
    """The stage each layer belongs to, for grouping long per-layer listings: the first part of
    its name (``layer2.0.conv1`` -> ``layer2``, ``fc1`` -> ``fc1``), and one part more, as
    often as needed, where a stage would hold over ``most`` layers (MobileNet's 41
    ``features.N...`` layers: ``features.3.block.0.0`` -> ``features.3``). Where that makes
    over ``most`` stages side by side (a flat numbering: ``fc1`` ... ``fc60``, VGG's
    ``features.0`` ... ``features.28``), neighbours are taken together, at most ``most`` layers
    in one, named ``first–last``. In layer order."""
    out: dict[str, str] = {}

    def split(group: list[str], depth: int) -> None:
        by: dict[str, list[str]] = {}
        for name in group:
            by.setdefault(".".join(name.split(".")[:depth]), []).append(name)

        def deeper(members: list[str]) -> bool:
            return len(members) > most and any(m.count(".") >= depth for m in members)

        kept = sum(len(ms) for ms in by.values() if not deeper(ms))
        size = -(-kept // -(-kept // most)) if kept else most  # even parts of at most `most`
        together: list[tuple[str, list[str]]] = []  # (stage, its layers): neighbours joined

        def close() -> None:
            if together:
                first, last = together[0][0], together[-1][0]
                label = first if first == last else f"{first}–{last}"
                out.update(dict.fromkeys((m for _, ms in together for m in ms), label))
                together.clear()

        for stage, members in by.items():
            if deeper(members):
                close()
                split(members, depth + 1)
            elif len(by) <= most:
                out.update(dict.fromkeys(members, stage))
            else:
                if sum(len(ms) for _, ms in together) + len(members) > size:
                    close()
                together.append((stage, members))
        close()

    names = list(layers)
    split(names, 1)
    return {n: out[n] for n in names}


def _direct_names(model: nn.Module) -> set[str]:
    """``model.lorita_direct`` (found when the model was composed), less the out_proj of
    every attention now in lorita's form, which calls it."""
    names = getattr(model, "lorita_direct", ()) or ()
    return {n for n in names if not _parent_is(model, n, LowRankMultiheadAttention)}


def _out_proj_owner(model: nn.Module, name: str) -> nn.Module | None:
    """The module ``name`` is the ``out_proj`` of (None when it is not an out_proj)."""
    parent, _, leaf = name.rpartition(".")
    if leaf != "out_proj":
        return None
    try:
        return model.get_submodule(parent)
    except AttributeError:
        return None


def _parent_is(model: nn.Module, name: str, cls: type) -> bool:
    """Whether ``name`` is the out_proj of a ``cls`` module."""
    return isinstance(_out_proj_owner(model, name), cls)


def callable_out_proj(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is the out_proj of an attention that can be in lorita's form
    (LowRankMultiheadAttention calls its out_proj, so it can be thin)."""
    owner = _out_proj_owner(model, name)
    attention = KINDS["attention"]
    return owner is not None and attention.matches(owner) and not attention.why_dense(owner)


def can_be_thin(model: nn.Module, entry: LayerEntry) -> bool:
    """Whether a cut of ``entry`` can take the thin form (where it saves FLOPs): its kind
    allows it, or it is the out_proj of an attention that can be in lorita's form."""
    return not entry.kind.why_dense(entry.module) or (
        entry.kind.name == "direct" and callable_out_proj(model, entry.name)
    )


def layer_table(model: nn.Module, *, direct=None) -> list[LayerEntry]:
    """Every layer of ``model`` that has a kind (depthwise ones included), in module order.

    ``direct``: names of layers whose weight is read directly; default ``model.lorita_direct``.
    """
    check_module(model)
    model = unwrap(model)  # a torch.compile wrapper: the layers of the model it holds
    direct = _direct_names(model) if direct is None else set(direct)
    counts: dict[int, int] = {}  # Parameter -> how many distinct modules hold it
    for m in model.modules():  # a module registered under two names counts once
        for p in m._parameters.values():
            if p is not None:
                counts[id(p)] = counts.get(id(p), 0) + 1
    out, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        kind = kind_of(module, direct=name in direct)
        if kind is None:
            continue
        if name == "":
            raise ValueError(
                f"model: expected a container of layers, got a bare {type(module).__name__}; "
                "wrap it: nn.Sequential(layer)"
            )
        prefix = _skip_inside(name, module)
        if prefix:
            inside.append(prefix)
        # the registered Parameters only (weight, bias, a packed in_proj_weight): a composed
        # layer's .weight is a property that multiplies its factors (seconds per read)
        shared = any(
            isinstance(p, nn.Parameter) and counts.get(id(p), 0) > 1
            for p in module._parameters.values()
        )
        out.append(LayerEntry(name, module, kind, shared))
    return out


def iter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every layer with matrices LoRITa can read: Linear, Conv2d
    (grouped too), MultiheadAttention's packed projection, composed and low-rank layers (not
    the pieces inside them). Depthwise convolutions are left out."""
    for e in layer_table(model):
        if e.kind.composable:
            yield e.name, e.module


def why_not_cut(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """``{name: why}`` for each of ``names`` that is a module of ``model`` no cut may take: a
    parametrized or depthwise layer, a tied one (cutting it would cut the module it shares
    its weight with, or untie them), a module with no matrices LoRITa reads. Names of no
    module, and layers a cut may take, are not in it."""
    table = {e.name: e for e in layer_table(model)}
    out = {}
    for name in names:
        if name in table:
            e = table[name]
            if not e.kind.composable or e.shared:
                out[name] = e.kind.why(e.module) if not e.kind.composable else TIED
            continue
        try:
            module = unwrap(model).get_submodule(name)
        except (AttributeError, TypeError):
            continue
        alias = next((e.name for e in table.values() if e.module is module), None)
        if alias is not None:
            out[name] = f"it is layer {alias!r} under another name: name it so"
        elif isinstance(module, _OTHER):
            out[name] = why_other(module)
        else:
            out[name] = f"a {type(module).__name__} has no matrices LoRITa reads"
    return out


def matrices(module: nn.Module) -> Tensor:
    """The merged weight of a layer as a batch of matrices (G, m, n), detached."""
    kind = kind_of(module)
    if kind is None or not kind.composable:
        raise ValueError(f"module: a {type(module).__name__} has no matrices LoRITa reads")
    with torch.no_grad():
        return kind.matrices(module)


def pooled_spectrum(s: Tensor) -> Tensor:
    """One spectrum per layer from the singular values of its G matrices (G, k): the root mean
    square over G of each singular value (descending; the same as ``s[0]`` when G = 1)."""
    if s.dim() == 1:
        return s
    return s.double().pow(2).mean(0).sqrt().to(s.dtype)


def layer_svd(module: nn.Module, name: str = "") -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD (float64) of the layer's matrices: U (G, m, k), S (G, k), Vh (G, k, n)."""
    check_finite(module, name)
    return svd64(matrices(module))


# --------------------------------------------------------------------------- direct reads


class _ReadTracer(TorchFunctionMode):
    """Notes every layer weight passed to a torch function while its layer is not running, and
    which module was running at each use of a watched tensor (the dataflow a fold needs)."""

    def __init__(self, owners: dict[int, list[str]], active: list[str], watched: dict) -> None:
        super().__init__()
        self.owners, self.active, self.found = owners, active, set()
        self.watched = watched  # id -> tensor, kept alive so an id is never reused
        self.uses: dict[int, list[str]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reads = values_read(func, args)
        for a in tree_leaves((args, kwargs)):
            if not isinstance(a, Tensor):
                continue
            names = self.owners.get(id(a), ())
            if names and (reads is None or a is reads) and not set(names) & set(self.active):
                self.found.update(names)  # read while none of the layers that own it runs
            if id(a) in self.watched:
                self.uses.setdefault(id(a), []).append(self.active[-1] if self.active else "")
        return func(*args, **kwargs)


def _push(active: list[str], name: str):
    def pre(module, args):
        active.append(name)

    def post(module, args, out):
        if active and active[-1] == name:
            active.pop()

    return pre, post


@dataclass
class Trace:
    """What one forward pass did (:func:`trace_forward`)."""

    direct: list[str]  # layers whose weight the model read without calling them
    calls: dict[str, int]  # module name -> times it ran
    inputs: dict[str, list]  # name -> first positional input of each call (modules asked for)
    outputs: dict[str, list]  # name -> output of each call (modules asked for)
    uses: dict[int, list[str]]  # id(output) -> innermost module running at each use of it
    result: object  # what the model returned


def _recorder(store: dict[str, list], watched: dict | None, name: str, *, output: bool):
    def pre(module, args):
        store.setdefault(name, []).append(args[0] if args else None)

    def post(module, args, out):
        store.setdefault(name, []).append(out)
        if isinstance(out, Tensor):
            watched[id(out)] = out

    return post if output else pre


def trace_forward(
    model: nn.Module,
    example_input: inputs.Example,
    *,
    inputs_of: tuple[str, ...] = (),
    outputs_of: tuple[str, ...] = (),
) -> Trace:
    """Run one forward pass (eval mode, no grad) on ``example_input`` and note which layer
    weights are read directly, how often each module runs, the inputs of ``inputs_of`` and
    the outputs of ``outputs_of`` modules, and every use of those outputs by torch functions
    (with the module running at the time)."""
    owners, handles, active = {}, [], []
    calls: dict[str, int] = {}
    ins: dict[str, list] = {}
    outs: dict[str, list] = {}
    watched: dict[int, Tensor] = {}
    want_in, want_out = set(inputs_of), set(outputs_of)
    for name, module in model.named_modules():
        # A registered tensor only: a property (a composed or parametrized layer's) makes a
        # new one per read, whose id is reused. A tied weight has several owners.
        w = module._parameters.get("weight")
        if name and w is not None and KINDS["direct"].matches(module):
            owners.setdefault(id(w), []).append(name)
        pre, post = _push(active, name)
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        handles.append(module.register_forward_pre_hook(_counter(calls, name)))
        if name in want_in:
            handles.append(
                module.register_forward_pre_hook(_recorder(ins, None, name, output=False))
            )
        if name in want_out:
            handles.append(
                module.register_forward_hook(_recorder(outs, watched, name, output=True))
            )
    tracer = _ReadTracer(owners, active, watched)
    try:
        with evaluating(model), torch.no_grad(), eager(), thin_pairs_as_layers(), tracer:
            result = inputs.call(model, inputs.check_example(example_input))
    finally:
        for h in handles:
            h.remove()
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    direct = sorted(tracer.found, key=order.__getitem__)
    return Trace(direct, calls, ins, outs, tracer.uses, result)


def _counter(calls: dict[str, int], name: str):
    def pre(module, args):
        calls[name] = calls.get(name, 0) + 1

    return pre


def find_direct_reads(model: nn.Module, example_input: inputs.Example) -> list[str]:
    """Names of the Linear / Conv2d layers whose weight the model reads without calling the
    layer, found by tracing one forward pass (eval mode, no grad) on ``example_input``.

    The ``out_proj`` of every ``nn.MultiheadAttention`` is one (its weight is passed to
    ``F.multi_head_attention_forward``), as are torchvision Swin's ``qkv`` and ``proj``.
    """
    return trace_forward(model, example_input).direct


def _static_direct(model: nn.Module) -> list[str]:
    """Layers known to be read directly without tracing (MultiheadAttention's out_proj)."""
    return [
        f"{name}.out_proj" if name else "out_proj"
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    ]


#: Square input sides tried, in order, when a model does not say what it takes.
GUESSED_SIDES = (32, 28, 64, 224, 299)
#: Frames of the clips tried for a video model (its first layer a Conv3d): torchvision's take 16.
GUESSED_FRAMES = 16


def guess_example_inputs(model: nn.Module) -> list[Tensor]:
    """Small inputs the model probably accepts, most likely first: ``model.lorita_input_shape``
    (set by :func:`lorita.create_model`) alone when set; else from the first layer: token ids
    for an Embedding, the Linear layers' widths (the first registered first: it may be a
    head), or a convolution's channels at the model's ``image_size`` attribute (a ViT) or at
    :data:`GUESSED_SIDES` (CIFAR's and MNIST's sides, which hand-written networks with a fixed
    flatten size are built for and which cost least, 64 px, then the sizes ImageNet models are
    built for): a Conv2d's images, a Conv1d's sequences of that length, a Conv3d's clips of
    :data:`GUESSED_FRAMES` frames (a video model). Float inputs take the dtype and device of the
    model's first floating weight."""
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    kw = {} if ref is None else {"dtype": ref.dtype, "device": ref.device}
    shape = getattr(model, "lorita_input_shape", None)
    if shape is not None:
        return [torch.zeros(2, *shape, **kw)]
    kinds = (nn.Embedding, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    first = next((m for m in model.modules() if isinstance(m, kinds)), None)
    if first is None:
        return []
    if isinstance(first, nn.Embedding):
        return [torch.zeros(2, 8, dtype=torch.long, device=first.weight.device)]
    if isinstance(first, nn.Linear):  # the first one registered may be a head: each width
        widths = [m.in_features for m in model.modules() if isinstance(m, nn.Linear)]
        return [torch.zeros(2, w, **kw) for w in dict.fromkeys(widths[:8])]
    size = getattr(model, "image_size", None)
    sides = [size] if isinstance(size, int) and not isinstance(size, bool) else []
    sides += [s for s in GUESSED_SIDES if s not in sides]
    frames = (GUESSED_FRAMES,) if isinstance(first, nn.Conv3d) else ()  # (C, T, H, W)
    dims = 1 if isinstance(first, nn.Conv1d) else 2
    return [torch.zeros(2, first.in_channels, *frames, *[s] * dims, **kw) for s in sides]


def guess_example_input(model: nn.Module) -> Tensor | None:
    """The most likely of :func:`guess_example_inputs` (None when there is none)."""
    guesses = guess_example_inputs(model)
    return guesses[0] if guesses else None


def detect_direct(model: nn.Module, example_input: inputs.Example | None) -> tuple[list[str], str]:
    """Directly read layers (traced when an input is known) and a note on how they were found.

    Without ``example_input`` each guessed input is tried until the model accepts one."""
    static = _static_direct(model)
    if example_input is not None:
        example_input = inputs.check_example(example_input)
    guesses = guess_example_inputs(model) if example_input is None else [example_input]
    if not guesses:
        return static, "no example input: only MultiheadAttention's out_proj checked"
    errors = []
    for x in guesses:
        try:
            traced = find_direct_reads(model, x)
        except Exception as e:  # a guessed input the model refuses: try the next one
            if example_input is not None:
                raise inputs.refusal(e) from None
            errors.append(f"{inputs.shape_words(x)} ({type(e).__name__})")
            continue
        order = [*static, *traced]
        return sorted(set(order), key=order.index), "traced"
    return static, (
        f"could not trace a forward pass on a guessed input: {', '.join(errors)}; "
        "pass example_input= to find weights read directly"
    )


def output_layer(model: nn.Module, example_input: inputs.Example) -> str | None:
    """The name of the last Linear/Conv2d layer to run on ``example_input`` (a classifier's
    head), found with forward hooks in eval mode; None if no layer runs."""
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda *_, name=n: order.append(name))
        for n, m in iter_layers(model)
    ]
    try:
        with evaluating(model), torch.no_grad(), eager():
            inputs.call(model, example_input)
    finally:
        for h in hooks:
            h.remove()
    return order[-1] if order else None


def find_output_layer(
    model: nn.Module, example_input: inputs.Example | None = None
) -> tuple[str | None, str]:
    """The output layer and how it was found: by one forward pass on ``example_input`` (or the
    first guessed input the model accepts), else the last layer the model registers."""
    if example_input is not None:
        try:
            return output_layer(model, inputs.check_example(example_input)), ""
        except Exception as e:
            raise inputs.refusal(e) from None
    for x in guess_example_inputs(model):
        try:
            return output_layer(model, x), ""
        except Exception:  # a guessed input the model refuses: try the next one
            continue
    names = [n for n, _ in iter_layers(model)]
    how = "the last layer registered: no forward pass ran on a guessed input (pass example_input=)"
    return (names[-1] if names else None), how


# --------------------------------------------------------------------------- cutting


#: A thin form counts as faster only when it takes at most this share of the dense form's time:
#: timings on a shared machine vary by a few percent, and a near-tie decided by that noise
#: would swap layers to the thin form for no measurable gain (dense costs no more).
FASTER_IF_AT_MOST = 0.95


def is_faster(t_thin: float, t_dense: float) -> bool:
    """Whether a thin form's time ``t_thin`` is clearly below the dense form's ``t_dense``."""
    return t_thin <= FASTER_IF_AT_MOST * t_dense


def median_seconds(fn, *, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _layer_inputs(
    model: nn.Module, names: list[str], example: inputs.Example
) -> dict[str, tuple[tuple, dict]]:
    """The inputs ``(args, kwargs)`` each named layer receives on one forward pass of
    ``example`` (a model may call ``self.fc(input=x)``, an attention ``need_weights=False``).
    A model that refuses ``example`` (its first sample repeated to a batch) is named."""
    seen: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name in names:

        def grab(module, args, kwargs, name=name):
            args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
            kwargs = {k: v.detach() if isinstance(v, Tensor) else v for k, v in kwargs.items()}
            seen.setdefault(name, (args, kwargs))

        hook = model.get_submodule(name).register_forward_pre_hook(grab, with_kwargs=True)
        handles.append(hook)
    try:
        with torch.no_grad():
            inputs.call(model, example)
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise ValueError(
            f"example_input: by='latency' times the model on its first sample repeated to a "
            f"batch ({inputs.shape_words(example)}), and the model refuses that "
            f"({type(e).__name__}: {str(e)[:200]}); give the input a batch axis, or batch=None "
            "to time it as given"
        ) from e
    finally:
        for h in handles:
            h.remove()
    return seen


def _channels_last(model: nn.Module, x: inputs.Example) -> bool:
    """Whether the model deploys in channels_last memory format (a convolutional model on 4-D
    inputs, as :func:`lorita.convert.deploy_model` decides): forms are timed that way."""
    return inputs.lead(x).dim() == 4 and any(isinstance(m, nn.Conv2d) for m in model.modules())


def _as_deployed(module: nn.Module, args: tuple, channels_last: bool) -> tuple[nn.Module, tuple]:
    """A copy of ``module`` and its inputs in the memory format it deploys in."""
    if not channels_last:
        return module, args
    fmt = torch.channels_last
    args = tuple(
        a.contiguous(memory_format=fmt) if isinstance(a, Tensor) and a.dim() == 4 else a
        for a in args
    )
    return copy.deepcopy(module).to(memory_format=fmt), args


def _thin_is_faster(dense: nn.Module, thin: nn.Module, call: tuple[tuple, dict] | None) -> bool:
    if call is None:  # the layer did not run on the example: fall back to FLOPs
        return True
    args, kw = call
    with torch.no_grad():
        t_dense, t_thin = paired_medians(
            [lambda: dense(*args, **kw), lambda: thin(*args, **kw)], repeats=9
        )
    return is_faster(t_thin, t_dense)


def paired_medians(
    fns: list, *, repeats: int = 7, warmup: int = 2, fastest: bool = False
) -> list[float]:
    """Median wall time of each of ``fns``, called in turn in every round: a burst of other
    work on the machine slows them alike instead of whichever was being timed. ``fastest``:
    the shortest time of each instead (on a busy machine, the call least disturbed: a longer
    call is more often cut short by the scheduler, which would bias a median against it)."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + repeats):
        for fn, t in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                t.append(time.perf_counter() - t0)
    return [min(t) if fastest else statistics.median(t) for t in times]


def _batch_of(example: inputs.Example, batch: int | None) -> inputs.Example:
    example = inputs.check_example(example)
    if batch is None:
        return example
    if not is_int(batch) or not 1 <= batch <= 4096:
        raise ValueError(f"batch: expected an integer in [1, 4096], got {batch!r}")
    return inputs.rows(example, batch)


def check_cut_options(form, by, example_input) -> None:
    if form not in FORMS:
        raise ValueError(f"form: expected one of {', '.join(FORMS)}, got {form!r}")
    if by not in DECIDE_BY:
        raise ValueError(f"by: expected one of {', '.join(DECIDE_BY)}, got {by!r}")
    if by == "latency" and example_input is None:
        raise ValueError("example_input: by='latency' measures each layer on an input batch")
    if example_input is not None:
        inputs.check_example(example_input)


def cut_model(
    model: nn.Module,
    ranks: dict[str, int],
    svd: dict[str, tuple[Tensor, Tensor, Tensor]],
    *,
    form: str = "low_rank",
    by: str = "flops",
    example_input: inputs.Example | None = None,
    batch: int | None = 64,
) -> dict[str, dict]:
    """Cut the layers of the plain ``model`` (in place) to ``ranks``; return the plan.

    Each cut layer takes the thin two-layer form only where the model calls it and it is
    cheaper (``by="flops"``: r*(m+n) < m*n per matrix; ``by="latency"``: measured on this
    machine on the layer's own input for ``example_input`` repeated to ``batch`` rows);
    elsewhere it keeps a dense rank-r weight, so a cut never costs more than no cut.

    Returns ``{name: {"rank", "full", "kind", "form": "thin" | "dense" | "full", "why"}}``.
    """
    check_cut_options(form, by, example_input)
    with evaluating(model):  # timing runs the model: BatchNorm's statistics must not move
        return _cut(model, ranks, svd, form=form, by=by, example_input=example_input, batch=batch)


def _cut(model, ranks, svd, *, form, by, example_input, batch) -> dict[str, dict]:
    table = {e.name: e for e in layer_table(model)}
    unknown = [n for n in ranks if n not in table or n not in svd]
    if unknown:
        raise ValueError(f"ranks: unknown layer name(s) {unknown[:5]}")
    plan, thin = {}, []
    for name, r in ranks.items():
        e, (u, s, vh) = table[name], svd[name]
        if e.kind.name == "direct" and callable_out_proj(model, name):  # called once unpacked
            e = LayerEntry(name, e.module, KINDS["linear"], e.shared)
        full = e.kind.full_rank(e.module)  # the SVD may hold fewer values (a model cut before)
        row = {"rank": int(min(r, full)), "full": int(full), "kind": e.kind.name}
        if r >= full:
            plan[name] = {**row, "form": "full", "why": "full rank: not cut"}
            continue
        m, n = u.shape[-2], vh.shape[-1]
        why = ""
        if form == "dense":
            why = "form='dense'"
        elif e.kind.why_dense(e.module):
            why = e.kind.why_dense(e.module)
        elif r * (m + n) >= m * n:
            why = "the thin form would cost more FLOPs"
        if why:
            e.kind.dense_cut(e.module, r, (u, s, vh))
            plan[name] = {**row, "form": "dense", "why": why}
        else:
            _unpack_parent(model, name)
            thin.append((name, like(e.module, e.kind.thin(e.module, r, (u, s, vh)))))
            plan[name] = {**row, "form": "thin", "why": ""}
    set_modules(model, thin)
    unfuse_encoders(model)
    if by == "latency" and form == "low_rank":
        _faster_forms(model, plan, _batch_of(example_input, batch))
    return plan


def _unpack_parent(model: nn.Module, name: str) -> None:
    """Before an attention's out_proj takes the thin form: an nn.MultiheadAttention (which
    would read the out_proj's weight itself) becomes a LowRankMultiheadAttention with dense
    q, k, v projections, which calls it."""
    mha = _out_proj_owner(model, name)
    if isinstance(mha, nn.MultiheadAttention):
        unpacked = LowRankMultiheadAttention.from_mha(mha, None)
        set_module(model, name.rpartition(".")[0], like(mha, unpacked))


def _unfuse(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing: its presence turns off an encoder layer's fused
    inference path (PyTorch takes that path only for a layer without hooks)."""


def unfuse_encoders(model: nn.Module) -> None:
    """Keep every nn.TransformerEncoderLayer holding a thin layer off its fused inference path.

    In eval mode without gradients that path passes the layer's packed attention weight and
    ``linear1`` / ``linear2``'s ``.weight`` to one kernel instead of calling them: thin layers
    would be multiplied back into dense weights on every call. A layer with a thin part gets
    a no-op forward pre-hook (PyTorch's documented condition for leaving the path) and its
    nn.TransformerEncoder stops packing padded inputs as nested tensors (which only that path
    takes); a layer without one runs fused as before. Idempotent: call it after every change
    of forms (cut, choose_forms, load)."""
    for m in model.modules():
        if not isinstance(m, nn.TransformerEncoderLayer):
            continue
        thin = any(isinstance(x, THIN_LAYERS) for x in m.modules())
        ours = [k for k, hook in m._forward_pre_hooks.items() if hook is _unfuse]
        if thin and not ours:
            m.register_forward_pre_hook(_unfuse)
        elif not thin:
            for k in ours:
                del m._forward_pre_hooks[k]
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
            _unfuse in layer._forward_pre_hooks.values() for layer in m.layers
        ):
            m.use_nested_tensor = False


def _thin_plan(model: nn.Module) -> dict[str, dict]:
    """The plan of a cut model: ``model.lorita_plan`` or, without one, its thin layers."""
    plan = {n: dict(p) for n, p in (getattr(model, "lorita_plan", None) or {}).items()}
    for e in layer_table(model):
        if is_thin(e.module) and e.name not in plan:
            rank = e.module.rank
            plan[e.name] = {"rank": rank, "full": None, "kind": e.kind.name, "form": "thin"}
            plan[e.name]["why"] = ""
    return plan


def choose_forms(
    model: nn.Module, example_input: inputs.Example, *, by: str = "latency", batch: int | None = 64
) -> dict[str, dict]:
    """Give each thin layer of a cut model (from :func:`cut_model` / ``truncate``, fine-tuned
    or not) the faster of its thin and dense rank-r forms, in place; the function is unchanged.

    ``by="latency"``: each thin layer is timed against its dense form on its own input for
    ``example_input`` repeated to ``batch`` rows, then the whole model with the remaining thin
    layers against all of them dense (kept only if faster), so the result is never slower than
    the same ranks all dense. Faster means at least 5% faster (:data:`FASTER_IF_AT_MOST`): a
    near-tie stays dense. ``by="flops"`` changes nothing (thin layers are already the ones
    that save FLOPs). Returns the plan (also stored as ``model.lorita_plan``).
    """
    check_cut_options("low_rank", by, example_input)
    plan = _thin_plan(model)
    if by == "latency":
        with evaluating(model):
            _faster_forms(model, plan, _batch_of(example_input, batch))
    model.lorita_plan = plan
    return plan


def _faster_forms(model: nn.Module, plan: dict[str, dict], x: inputs.Example) -> None:
    """Each thin layer timed alone against its dense form; then the whole model. A
    convolutional model is timed in channels_last memory format, as it deploys."""
    thin = [n for n, p in plan.items() if p["form"] == "thin"]
    layer_args = _layer_inputs(model, thin, x)
    cl = _channels_last(model, x)
    for name in thin:
        layer = model.get_submodule(name)
        out_thin = is_thin(getattr(layer, "out_proj", None))  # an attention's
        dense = like(layer, layer.unpacked() if out_thin else layer.to_dense())
        dense_t, layer_t, call = dense, layer, layer_args.get(name)
        if call is not None:  # timed in the memory format the model deploys in
            dense_t, _ = _as_deployed(dense, call[0], cl)
            layer_t, args = _as_deployed(layer, call[0], cl)
            call = (args, call[1])
        if not _thin_is_faster(dense_t, layer_t, call):
            set_module(model, name, dense)
            why = f"the thin form measured slower at batch {len(inputs.lead(x))}"
            plan[name] = {**plan[name], "form": "dense", "why": why, "timed": True}
    _repack(model)
    unfuse_encoders(model)
    _keep_thin_only_if_faster(model, plan, x)
    _repack(model)
    unfuse_encoders(model)


def _repack(model: nn.Module) -> None:
    """An unpacked attention (dense q, k, v) whose out_proj is no longer thin goes back to
    nn.MultiheadAttention, which PyTorch runs faster (and fused in an encoder layer)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LowRankMultiheadAttention) and m.rank is None and not is_thin(m.out_proj):
            set_module(model, name, like(m, m.to_dense()))


def _keep_thin_only_if_faster(model: nn.Module, plan: dict[str, dict], x: inputs.Example) -> None:
    """Layers timed alone can each be faster thin yet slower together (more, smaller kernels
    in a row): time the whole model both ways and keep the thin layers only if it is faster.
    With every layer dense the cut model costs what the uncut one does, so the cut is never
    slower than the model it came from."""
    thin = [n for n, p in plan.items() if p["form"] == "thin"]
    if not thin:
        return
    all_dense = clone_model(model)
    for n in thin:
        layer = all_dense.get_submodule(n)
        set_module(all_dense, n, like(layer, layer.to_dense()))
    _repack(all_dense)
    unfuse_encoders(all_dense)  # all dense: encoder layers run fused again, as they would
    cl = _channels_last(model, x)
    (m_thin, _), (m_dense, _) = (_as_deployed(m, (), cl) for m in (model, all_dense))
    xd = inputs.channels_last(x) if cl else x
    with torch.no_grad():  # timed in turn: a burst of other work slows both alike
        t_thin, t_dense = paired_medians(
            [lambda: inputs.call(m_thin, xd), lambda: inputs.call(m_dense, xd)]
        )
    if is_faster(t_thin, t_dense):
        return
    for n in thin:
        set_module(model, n, all_dense.get_submodule(n))
        plan[n] = {
            **plan[n],
            "form": "dense",
            "why": "the whole model measured slower with thin layers at batch "
            f"{len(inputs.lead(x))}",
            "timed": True,  # dense because of the timing, not the FLOPs
        }
