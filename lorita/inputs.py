"""A model's example input: one tensor, a tuple of tensors for a model that takes several,
or a dict of tensors passed by keyword (``forward(self, x, *, mask)``).

Every function of the library that runs a model on an example (tracing, counting, timing,
exporting) reads it through this module, so a model whose ``forward(x, y)`` takes two inputs
works wherever a one-input model does: pass ``example_input=(x, y)``, or
``example_input={"x": x, "mask": mask}``. Each tensor's first dimension is the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

#: One tensor, a tuple of tensors passed as positional arguments, or a dict of tensors passed
#: as keyword arguments.
Example = Tensor | tuple[Tensor, ...] | dict[str, Tensor]


def _tensors(x) -> list | None:
    """The tensors of a tuple or dict example (None for anything else)."""
    if isinstance(x, tuple):
        return list(x)
    if isinstance(x, dict) and all(isinstance(k, str) and k.isidentifier() for k in x):
        return list(x.values())
    return None


def check_example(x, field: str = "example_input") -> Example:
    """``x`` itself when it is a tensor, or a non-empty tuple or dict (str keys) of tensors,
    each with a batch dimension (detached, where one requires grad: an example is only
    run); else a ValueError naming ``field``."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError(f"{field}: every tensor needs a batch dimension (got a 0-d tensor)")
        _check_samples([x], field)
        return x.detach() if x.requires_grad else x
    items = _tensors(x)
    if items and all(isinstance(t, Tensor) for t in items):
        if not all(t.dim() > 0 for t in items):
            raise ValueError(f"{field}: every tensor needs a batch dimension (got a 0-d tensor)")
        _check_samples(items, field)
        return each(Tensor.detach, x) if any(t.requires_grad for t in items) else x
    if items is None:
        got = (
            "a dict whose keys are not argument names" if isinstance(x, dict) else type(x).__name__
        )
    else:
        kind = type(x).__name__
        got = f"a {kind} holding something else than tensors" if items else f"an empty {kind}"
    raise ValueError(
        f"{field}: expected a tensor, or a tuple of tensors (positional) or a dict of tensors "
        f"(keyword arguments) for a model with several inputs, got {got}"
    )


def _check_samples(items: list[Tensor], field: str) -> None:
    """A batch of 0 runs nothing: its cost is 0 and a budget planned on it means nothing."""
    if any(len(t) == 0 for t in items):
        shapes = ", ".join(str(tuple(t.shape)) for t in items)
        raise ValueError(
            f"{field}: it holds no samples (a batch of 0: {shapes}); give at least one"
        )


def is_example(x) -> bool:
    """Whether ``x`` is a tensor or a non-empty tuple of tensors."""
    try:
        check_example(x)
    except ValueError:
        return False
    return True


def call(model: nn.Module, x: Example):
    """``model(x)``, ``model(*x)`` for a tuple of inputs, ``model(**x)`` for a dict."""
    if isinstance(x, dict):
        return model(**x)
    return model(*x) if isinstance(x, tuple) else model(x)


def as_args(x: Example) -> tuple[Tensor, ...]:
    """The positional arguments ``x`` stands for (none for a dict)."""
    if isinstance(x, dict):
        return ()
    return x if isinstance(x, tuple) else (x,)


def as_kwargs(x: Example) -> dict[str, Tensor]:
    """The keyword arguments ``x`` stands for (none unless it is a dict)."""
    return dict(x) if isinstance(x, dict) else {}


def tensors(x: Example) -> list[Tensor]:
    """Every input tensor, in order."""
    return list(x.values()) if isinstance(x, dict) else list(as_args(x))


def each(fn: Callable[[Tensor], Tensor], x: Example) -> Example:
    """``fn`` applied to the tensor, or to each tensor of the tuple or dict."""
    if isinstance(x, dict):
        return {k: fn(t) for k, t in x.items()}
    return tuple(fn(t) for t in x) if isinstance(x, tuple) else fn(x)


def lead(x: Example) -> Tensor:
    """The first input (the one whose dtype, device and layout stand for all)."""
    return tensors(x)[0]


def rows(x: Example, batch: int) -> Example:
    """The first sample of each input (:func:`check_example`: there is one) repeated to
    ``batch`` rows (contiguous)."""
    return each(lambda t: t[:1].expand(batch, *t.shape[1:]).contiguous(), x)


def key(x: Example) -> tuple:
    """A hashable description (names, shapes and dtypes) of what ``x`` looks like."""
    names = list(x) if isinstance(x, dict) else [None] * len(as_args(x))
    return tuple((n, tuple(t.shape), t.dtype) for n, t in zip(names, tensors(x)))


def shape_words(x: Example) -> str:
    """``(2, 3, 64, 64)``, ``(2, 8) and (2, 6)`` for several inputs, ``x (2, 8) and mask
    (2, 8)`` for keyword inputs (for messages)."""
    if isinstance(x, dict):
        return " and ".join(f"{k} {tuple(t.shape)}" for k, t in x.items())
    return " and ".join(str(tuple(t.shape)) for t in as_args(x))


def is_cuda(x: Example) -> bool:
    return any(t.is_cuda for t in tensors(x))


def channels_last(x: Example) -> Example:
    """Every 4-D input in ``torch.channels_last`` memory format."""
    fmt = torch.channels_last
    return each(lambda t: t.contiguous(memory_format=fmt) if t.dim() == 4 else t, x)


@contextmanager
def refused(field: str = "example_input") -> Iterator[None]:
    """Turn the error of a model that cannot run on the given input (a wrong shape, dtype or
    number of inputs) into a ValueError naming ``field``."""
    try:
        yield
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        error = refusal(e, field)
        if error is e:
            raise
        raise error from e


def refusal(e: Exception, field: str = "example_input") -> Exception:
    """The error to raise for ``e``, raised by a model run on the input ``field``: a
    ValueError naming the field, or ``e`` itself when it already names it or is not the
    input's fault (the device out of memory)."""
    if isinstance(e, ValueError) and str(e).startswith(f"{field}:"):
        return e
    if isinstance(e, torch.OutOfMemoryError):  # the input is fine; the device is full
        return e
    return ValueError(f"{field}: the model refused it ({type(e).__name__}: {e})")
