"""A copy of any model: ``copy.deepcopy``, also for modules that keep tensors computed with
autograd between calls (timm's LeViT caches its attention biases in eval mode), which
``deepcopy`` refuses; those are copied detached, as the values they are. A ``torch.compile``
wrapper is taken off first (:func:`unwrap`): its compiled graph would not survive the change
anyway, and its ``_orig_mod.`` prefix would be in every layer name."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["clone_model", "eager", "evaluating", "is_compiled", "rebind_compiled", "unwrap"]


def _non_leaves(value, found: dict[int, torch.Tensor], depth: int = 0) -> None:
    if torch.is_tensor(value):
        if not value.is_leaf:
            found[id(value)] = value.detach().clone()
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            _non_leaves(v, found, depth + 1)
    elif depth < 3 and isinstance(value, list | tuple):
        for v in value:
            _non_leaves(v, found, depth + 1)


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper (an ``OptimizedModule``)."""
    return type(module).__name__ == "OptimizedModule" and isinstance(
        getattr(module, "_orig_mod", None), nn.Module
    )


def rebind_compiled(wrapper: nn.Module) -> None:
    """Make a ``torch.compile`` wrapper call the module it holds now: its forward is bound,
    when it is made (or copied), to the module it wrapped then, so after its ``_orig_mod`` is
    replaced (a layer composed or cut) it would still call the old layer."""
    init = getattr(wrapper, "_initialize", None)
    if callable(init):
        init()
    else:  # (older torch: the forward is set in __init__ alone)
        wrapper.forward = wrapper.dynamo_ctx(wrapper._orig_mod.__call__)


def eager() -> contextlib.AbstractContextManager:
    """Inside it, a ``torch.compile`` wrapper in the model runs its module as plain Python:
    compiled code runs without the forward hooks and the torch function mode that trace a
    pass (the layers a compiled block runs would be taken for weights read directly)."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # (torch >= 2.6)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile(model)``, ``nn.DataParallel`` or
    ``DistributedDataParallel`` wrapper holds (its layers are the model's, without the
    ``module.`` prefix); ``model`` itself otherwise."""
    while True:
        if is_compiled(model):
            model = model._orig_mod
        elif isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; after it, every module back in the mode it had,
    each its own: ``model.train(was)`` would put a BatchNorm that a fine-tuning user froze in
    eval mode back in training. A module put in inside the block (a layer replaced by its cut)
    takes the mode of the module it replaced (same name), or of its nearest ancestor that was
    there before. Anything else with ``training``, ``eval()`` and ``train(mode)`` gets its
    one mode back."""
    if not isinstance(model, nn.Module):  # a module-like callable (an ONNX session's wrapper)
        was = model.training
        model.eval()
        try:
            yield model
        finally:
            model.train(was)
        return
    modes = {name: m.training for name, m in model.named_modules()}
    model.eval()
    try:
        yield model
    finally:
        for name, m in model.named_modules():
            key = name
            while key not in modes:
                key = key.rpartition(".")[0]
            m.training = modes[key]


def clone_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(unwrap(model))`` with every cached non-leaf tensor (an attribute of a
    module, or inside a dict, list or tuple attribute) copied detached."""
    model = unwrap(model)
    memo: dict[int, torch.Tensor] = {}
    for m in model.modules():
        for k, v in vars(m).items():
            if not k.startswith("_"):
                _non_leaves(v, memo)
    try:
        return copy.deepcopy(model, memo)
    except (TypeError, copy.Error, NotImplementedError) as exc:
        raise ValueError(
            f"model: it cannot be copied ({_uncopyable(model, memo) or exc}); the library "
            "works on a copy and leaves your model as it is: keep what cannot be copied (a "
            "lock, an open file, a process) outside the model, or give its class a "
            "__deepcopy__"
        ) from exc


def _uncopyable(model: nn.Module, memo: dict[int, torch.Tensor]) -> str | None:
    """'attribute NAME (TYPE): ERROR' for the first module attribute deepcopy refuses."""
    for name, m in model.named_modules():
        for k, v in vars(m).items():
            if k in ("_parameters", "_buffers", "_modules") or isinstance(v, nn.Module):
                continue
            try:
                copy.deepcopy(v, dict(memo))
            except Exception as exc:  # noqa: BLE001 - naming the culprit, whatever it raised
                where = f"{name}.{k}" if name else k
                return f"attribute {where!r} ({type(v).__name__}): {exc}"
    return None
