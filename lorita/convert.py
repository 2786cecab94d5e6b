"""Whole-model passes: compose every layer LoRITa can compose (overparameterize), multiply the
factors back (merge_model). Which module becomes what is decided by the table in
:mod:`lorita.kinds`. Layer names are those that ``model.named_modules()`` gives the plain
model, so a composed model and its merge agree.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_leaves

from . import inputs
from .checks import check_flag, check_module, check_optional_flag
from .clone import clone_model, is_compiled, unwrap
from .kinds import (
    INITS,
    INNER_CHOICES,
    ORDERS,
    TIED,
    LayerEntry,
    check_finite,
    detect_direct,
    guess_example_inputs,
    layer_table,
    like,
    other_layers,
    set_modules,
    trace_forward,
    why_other,
)
from .kinds import iter_layers as iter_layers
from .kinds import set_module as set_module
from .layers import (
    THIN_LAYERS,
    FactorConv2d,
    FactorLinear,
    FactorMultiheadAttention,
    check_n_factors,
)

__all__ = [
    "iter_layers",
    "composed_layers",
    "overparameterize",
    "check_skip",
    "merge_model",
    "set_module",
    "composition_summary",
    "fold_batchnorm",
    "apply_folds",
    "deploy_model",
    "bake_parametrizations",
    "take_off_compile",
    "deploy_input",
]

_COMPOSED = (FactorLinear, FactorConv2d, FactorMultiheadAttention)


def composed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` for every composed layer (FactorLinear, FactorConv2d, attention)."""
    return {n: m for n, m in iter_layers(model) if isinstance(m, _COMPOSED)}


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


def _check_skip(skip, names: list[str]) -> tuple[str, ...]:
    if skip is None:
        return ()
    if isinstance(skip, str):
        skip = (skip,)
    if not isinstance(skip, Iterable):
        raise ValueError(f"skip: expected a layer name or pattern, or a list of them, got {skip!r}")
    skip = tuple(skip)
    for p in skip:
        if not isinstance(p, str) or not any(_matches(n, (p,)) for n in names):
            raise ValueError(
                f"skip: pattern {p!r} matches no layer; layers are: {', '.join(names[:12])}"
                + (" ..." if len(names) > 12 else "")
            )
    return skip


def check_skip(model: nn.Module, skip: Iterable[str] | str) -> tuple[str, ...]:
    """``skip`` as :func:`overparameterize` takes it, each pattern checked to match a layer
    of ``model`` (only the names are read: a model built on the meta device will do); a
    ValueError naming ``skip`` and the layers otherwise."""
    return _check_skip(skip, [e.name for e in layer_table(model, direct=())])


def _check_options(n_factors, init, inner, order) -> None:
    check_n_factors(n_factors)
    if init not in INITS:
        raise ValueError(f"init: expected one of {', '.join(INITS)}, got {init!r}")
    if inner not in INNER_CHOICES:
        raise ValueError(f"inner: expected one of None, 'min', 'paper', got {inner!r}")
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {', '.join(ORDERS)}, got {order!r}")


def _why_left(e: LayerEntry, skip: tuple[str, ...], n_factors: int) -> str | None:
    if not e.kind.composable:
        return e.kind.why(e.module)
    if _matches(e.name, skip):
        return "skipped (skip=...)"
    if e.shared:
        return TIED
    if n_factors == 1:
        return "n_factors=1: the ordinary network"
    return None


def check_initialised(model: nn.Module, *, meta_ok: bool = False) -> None:
    """Refuse a model with lazy layers that have not seen a batch yet (no shapes to work on),
    and unless ``meta_ok`` (a model to be given a file's tensors) one on the meta device (no
    values to work on)."""
    check_module(model)
    for name, p in model.named_parameters():
        if p.is_meta and not meta_ok:
            raise ValueError(
                f"model: parameter {name!r} is on the 'meta' device (a shape without values); "
                "materialise the model first (model.to_empty(device='cpu'), then load its "
                "weights)"
            )
        if isinstance(p, nn.parameter.UninitializedParameter):
            layer = name.rsplit(".", 1)[0] if "." in name else name
            raise ValueError(
                f"model: layer {layer!r} has uninitialised (lazy) parameters; run one batch "
                "through the model first, so that they get their shapes and values"
            )


def overparameterize(
    model: nn.Module,
    n_factors: int = 3,
    *,
    init: str = "balanced",
    skip: Iterable[str] | str = (),
    inner: str | None = None,
    order: str = "auto",
    example_input: inputs.Example | None = None,
) -> nn.Module:
    """Return a copy of ``model`` with every layer that has a kind written as N factors.

    Linear, Conv2d (grouped too), MultiheadAttention's packed q, k, v and layers whose weight
    is read directly are composed; depthwise convolutions, tied weights and subclasses whose
    own forward does more with the weight (weight standardisation) or whose weight a
    parametrization computes (weight_norm) are left as they are; so are other weight-bearing
    modules (Conv1d, RNNs, ...), listed in the summary with kind "other".
    The copy carries ``lorita_summary`` (see :func:`composition_summary`) and
    ``lorita_direct`` (the layers whose weight the model reads itself: their cut stays dense).
    A composed layer keeps the forward and backward hooks and the frozen parameters of the
    layer it replaces, but not its state_dict hooks (they act on the ``weight`` key that the
    factors replace; a merge or a cut does not bring them back).

    Args:
        model: any module; it is not changed.
        n_factors: N >= 1. N=1 returns a plain copy (the ordinary network).
        init: "balanced" (the copy computes the same function) or "independent" (every factor
            gets PyTorch's default init, as in the paper).
        skip: layer names or shell-style patterns ("head", "blocks.*.fc1") left as they are.
        inner: inner width of the factors: None/"min" for min(in, out), "paper" for the
            authors' (Linear input width, conv output channels).
        order: evaluation order of the composed layers ("auto", "product", "sequential").
        example_input: one batch the model accepts (a tuple of tensors for a model with
            several inputs), used to trace which weights are read directly; default a small
            input guessed from the model.
    """
    check_module(model)
    _check_options(n_factors, init, inner, order)
    n_factors = check_n_factors(n_factors)  # (a NumPy integer will do: a plain int)
    check_initialised(model)
    new = clone_model(model)
    table = layer_table(new, direct=())
    if not any(e.kind.composable for e in table):
        raise ValueError("model: it has no nn.Linear or nn.Conv2d layer to compose")
    skip = _check_skip(skip, [e.name for e in table])
    for e in table:
        if e.kind.composable and isinstance(e.module, _COMPOSED):
            raise ValueError(
                f"model: layer {e.name!r} is already a {type(e.module).__name__}; "
                "merge_model() first"
            )
        if e.kind.composable and isinstance(e.module, THIN_LAYERS):
            raise ValueError(
                f"model: layer {e.name!r} is already cut ({type(e.module).__name__}); compose "
                "the model it was cut from, or merge_model() the cut one first (dense rank-r "
                "layers, the same function)"
            )
    direct, how = detect_direct(new, example_input)
    if how != "traced":  # a thin cut of a weight the model reads itself would cost more
        warnings.warn(
            f"overparameterize: {how} (truncate(..., example_input=...) traces them too)",
            stacklevel=2,
        )
    new.lorita_direct = tuple(direct)
    summary, composed = [], []
    for e in layer_table(new):
        why = _why_left(e, skip, n_factors)
        row = {"name": e.name, "kind": e.kind.name, "type": type(e.module).__name__}
        if why is not None:
            summary.append({**row, "action": "left", "why": why})
            continue
        check_finite(e.module, e.name)
        width = e.kind.paper_inner(e.module) if inner == "paper" else None
        layer = e.kind.compose(e.module, n_factors, init=init, inner=width, order=order)
        composed.append((e.name, like(e.module, layer)))
        summary.append({**row, "action": "composed", "why": ""})
    set_modules(new, composed)
    for name, module in other_layers(new, table):
        row = {"name": name, "kind": "other", "type": type(module).__name__}
        summary.append({**row, "action": "left", "why": why_other(module)})
    new.lorita_summary = {"n_factors": n_factors, "direct_reads": how, "layers": summary}
    return new


def composition_summary(model: nn.Module) -> dict:
    """What :func:`overparameterize` did: ``{"n_factors", "direct_reads", "layers": [{"name",
    "kind", "type", "action": "composed" | "left", "why"}]}`` (never printed); also of the
    composed model inside a DataParallel or torch.compile wrapper."""
    summary = getattr(unwrap(model), "lorita_summary", None)
    if summary is None:
        raise ValueError("model: it was not made by overparameterize (no lorita_summary)")
    return summary


def merge_model(model: nn.Module) -> nn.Module:
    """Return a copy with every composed layer multiplied back into one plain layer and every
    low-rank layer made dense: the original architecture, whose ``state_dict()`` loads with
    ``strict=True`` into the un-composed model."""
    check_module(model)
    new = clone_model(model)
    merged = []
    for e in layer_table(new):
        plain = e.kind.merge(e.module)
        if plain is not e.module:
            merged.append((e.name, like(e.module, plain)))
    set_modules(new, merged)
    return new


# --------------------------------------------------------------------------- deploying

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
#: BatchNorm type -> the plain layer it folds into and that layer's output rank.
_FOLDS_INTO = {nn.BatchNorm2d: (nn.Conv2d, 4), nn.BatchNorm1d: (nn.Linear, 2)}


def _fold_target(model: nn.Module, name: str) -> bool:
    m = model.get_submodule(name)
    return type(m) in (nn.Linear, nn.Conv2d) and not parametrize.is_parametrized(m)


def _shared_weights(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, k in seen.items() if k > 1}


def _fold_layer(model: nn.Module, bn_name: str, trace, producers, shared) -> tuple[str, str]:
    """``(layer, "")`` when ``bn_name`` folds into ``layer``, else ``("", why not)``."""
    bn = model.get_submodule(bn_name)
    if bn.running_mean is None or bn.running_var is None:
        return "", "no running statistics (track_running_stats=False)"
    if bn.training:  # (in an eval-mode model: a BatchNorm put back in training on its own)
        return "", "it is in training mode: it normalises by the batch"
    if _hooked(bn, pre=True):
        return "", "it has forward hooks, which folding would drop"
    if trace.calls.get(bn_name, 0) != 1:
        return "", f"it ran {trace.calls.get(bn_name, 0)} times on the example, not once"
    x = trace.inputs[bn_name][0]
    layer = producers.get(id(x)) if isinstance(x, Tensor) else None
    if layer is None:
        return "", "its input is not the output of a Linear or Conv2d layer"
    plain, rank = _FOLDS_INTO[type(bn)]
    if type(model.get_submodule(layer)) is not plain or x.dim() != rank:
        return "", f"{type(bn).__name__} after {layer!r} ({x.dim()}-D output) does not fold into it"
    if trace.calls.get(layer, 0) != 1:
        return "", f"{layer!r} runs more than once"
    if _hooked(model.get_submodule(layer), pre=False):
        return "", f"{layer!r} has forward hooks, which would then see the folded output"
    others = sorted(
        {u or "the model's own forward" for u in trace.uses.get(id(x), []) if u != bn_name}
    )
    if any(t is x for t in tree_leaves(trace.result)):
        others.append("the model's output")
    if others:
        return "", f"the output of {layer!r} is also used elsewhere ({', '.join(others)})"
    target = model.get_submodule(layer)
    if id(target.weight) in shared or id(target.bias) in shared or layer in trace.direct:
        return "", f"the weight or bias of {layer!r} is shared or read directly"
    return layer, ""


def _hooked(module: nn.Module, *, pre: bool) -> bool:
    """Whether ``module`` has forward hooks (and, with ``pre``, forward pre-hooks) of a user's:
    folding moves or drops what they act on. (A pre-hook of the layer itself is kept: it
    acts on the layer's input, which folding does not change.)"""
    tables = ["_forward_hooks"] + (["_forward_pre_hooks"] if pre else [])
    return any(getattr(module, t, None) for t in tables)


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """``bn(layer(x))`` becomes ``layer(x)``: scale each output row, shift the bias."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)  # (C,)
    w = layer.weight
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(var)
    w.copy_((w.double() * scale.reshape(-1, *[1] * (w.dim() - 1))).to(w.dtype))
    new_bias = ((bias - mean) * scale + beta).to(w.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(new_bias)


def _example(model: nn.Module, example_input) -> list[inputs.Example]:
    if example_input is not None:
        return [inputs.check_example(example_input)]
    guesses = guess_example_inputs(model)
    if not guesses:
        raise ValueError("example_input: needed to trace the model (none could be guessed)")
    return guesses


def _trace(
    model: nn.Module, example_input: inputs.Example | None, bns: list[str], layers: list[str]
):
    errors = []
    for x in _example(model, example_input):
        try:
            return trace_forward(model, x, inputs_of=tuple(bns), outputs_of=tuple(layers))
        except Exception as e:  # a guessed input the model refuses: try the next one
            if example_input is not None:
                raise inputs.refusal(e) from None
            errors.append(f"{inputs.shape_words(x)} ({type(e).__name__})")
    raise ValueError(
        f"example_input: no guessed input ran the model: {', '.join(errors)}; pass "
        "example_input= (a tensor, or a tuple of tensors for a model with several inputs)"
    )


def fold_batchnorm(
    model: nn.Module, example_input: inputs.Example | None = None, *, inplace: bool = False
) -> nn.Module:
    """The deployable model with every eval-mode BatchNorm folded into the layer before it.

    One forward pass on ``example_input`` (guessed from the model when None) is traced; a
    BatchNorm2d (BatchNorm1d) folds into a plain Conv2d (Linear, 2-D output) only when its
    input is that layer's output and nothing else uses that output, so the function is kept.
    A thin layer folds into its last factor, a dense or plain layer into itself (which gains
    a bias if it had none); the BatchNorm becomes ``nn.Identity``. Composed layers are merged
    first. The result's ``lorita_folded`` maps each folded BatchNorm to its layer (what
    :func:`apply_folds` and a saved spec need) and ``lorita_unfolded`` says why others stay.

    Raises ValueError for a model in training mode: BatchNorm then normalises by the batch,
    which no fixed weight can do (call ``model.eval()`` first; fine-tuning keeps BatchNorm).
    """
    check_flag(inplace, "inplace")
    check_module(model)
    if model.training:
        raise ValueError(
            "model: in training mode; fold_batchnorm folds BatchNorm's running statistics, "
            "call model.eval() first (keep BatchNorm for fine-tuning)"
        )
    if composed_layers(model):
        model = merge_model(model)
    elif not inplace:
        model = clone_model(model)
    folded = dict(getattr(model, "lorita_folded", None) or {})
    bns = [n for n, m in model.named_modules() if type(m) in _FOLDS_INTO]
    unfolded: dict[str, str] = {}
    if bns:
        layers = [n for n, _ in model.named_modules() if n and _fold_target(model, n)]
        trace = _trace(model, example_input, bns, layers)
        shared = _shared_weights(model)
        producers = {id(o): n for n, outs in trace.outputs.items() for o in outs}
        for bn in bns:
            layer, why = _fold_layer(model, bn, trace, producers, shared)
            if not layer:
                unfolded[bn] = why
                continue
            _fold_into(model.get_submodule(layer), model.get_submodule(bn))
            set_module(model, bn, nn.Identity())
            folded[bn] = layer
    model.lorita_folded = folded
    model.lorita_unfolded = unfolded
    return model


def apply_folds(model: nn.Module, folded: dict[str, str]) -> nn.Module:
    """Give a freshly built ``model`` the structure :func:`fold_batchnorm` leaves (in place,
    weights empty): each BatchNorm named in ``folded`` becomes ``nn.Identity`` and its layer
    gains a bias. Already folded entries are left as they are. ValueError names the first
    entry that does not fit the model."""
    for bn, layer in folded.items():
        field = f"folded[{bn[:80]!r}]"
        try:
            m, target = model.get_submodule(bn), model.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"{field}: {bn!r} or {layer!r} is not in this model") from None
        if type(target) not in (nn.Linear, nn.Conv2d):
            raise ValueError(f"{field}: {layer!r} is a {type(target).__name__}, not Linear/Conv2d")
        if isinstance(m, _BN):
            set_module(model, bn, nn.Identity())
        elif not isinstance(m, nn.Identity):
            raise ValueError(f"{field}: {bn!r} is a {type(m).__name__}, not a BatchNorm")
        if target.bias is None:
            w = target.weight
            target.bias = nn.Parameter(torch.empty(w.shape[0], dtype=w.dtype, device=w.device))
    model.lorita_folded = {**(getattr(model, "lorita_folded", None) or {}), **folded}
    return model


def uses_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def bake_parametrizations(model: nn.Module) -> list[str]:
    """Replace every parametrized tensor (weight_norm, spectral_norm, ...) of ``model`` by
    the value it computes now, in place: at inference it is a constant. Returns their names.

    Done by hand rather than with ``parametrize.remove_parametrizations``, which deletes the
    property from the parametrized class, a class the copy shares with the user's model."""
    baked = []
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        values = {t: getattr(module, t).detach().clone() for t in module.parametrizations}
        module.__class__ = type(module).__bases__[0]  # the class before parametrization
        del module._modules["parametrizations"]
        for tensor, value in values.items():
            module.register_parameter(tensor, nn.Parameter(value, requires_grad=False))
            baked.append(f"{name}.{tensor}" if name else tensor)
    return baked


def take_off_compile(model: nn.Module) -> list[str]:
    """Replace every ``torch.compile`` wrapper inside ``model`` by the module it holds, in
    place: a deployed model is traced by the ONNX exporters, which cannot trace a compiled
    function. Returns the names of the wrappers taken off."""
    wrapped = [n for n, m in model.named_modules() if n and is_compiled(m)]
    wrapped.sort(key=lambda n: n.count("."), reverse=True)  # a wrapper inside one: first
    for name in wrapped:
        set_module(model, name, model.get_submodule(name)._orig_mod)
    return wrapped


def deploy_model(
    model: nn.Module,
    example_input: inputs.Example | None = None,
    *,
    fold_bn: bool = True,
    channels_last: bool | None = None,
) -> nn.Module:
    """The model as it deploys: a copy, composed layers merged, eval mode, BatchNorm folded
    (``fold_bn``, see :func:`fold_batchnorm`) and, for a convolutional model on 4-D inputs,
    weights in ``torch.channels_last`` memory format (``channels_last=None``: decided so;
    measured faster on CPU for plain and cut convolutional models, bench/zoo.py). The result's
    ``lorita_deploy`` records what was done; give it inputs in the same memory format
    (:func:`deploy_input`). Weights computed by a parametrization (weight_norm, ...) are
    replaced by their current values (``lorita_deploy["baked"]``), and a layer wrapped by
    ``torch.compile`` by the layer itself."""
    check_flag(fold_bn, "fold_bn")
    check_optional_flag(channels_last, "channels_last")
    check_module(model)
    if example_input is not None:  # checked before any work: one the model cannot take is named
        example_input = inputs.check_example(example_input)
    new = merge_model(model) if composed_layers(model) else clone_model(model)
    new.eval()
    take_off_compile(new)
    baked = bake_parametrizations(new)
    if fold_bn:
        new = fold_batchnorm(new, example_input, inplace=True)
    if channels_last is None:
        four_d = example_input is None or inputs.lead(example_input).dim() == 4
        channels_last = four_d and uses_conv(new)
    if channels_last:
        new = new.to(memory_format=torch.channels_last)
    new.lorita_deploy = {
        "folded": sorted(getattr(new, "lorita_folded", None) or {}),
        "baked": baked,
        "memory_format": "channels_last" if channels_last else "contiguous",
    }
    return new


def deploy_input(model: nn.Module, x: inputs.Example) -> inputs.Example:
    """``x`` in the memory format :func:`deploy_model` gave ``model``."""
    info = getattr(model, "lorita_deploy", None) or {}
    if info.get("memory_format") == "channels_last":
        return inputs.channels_last(x)
    return x
