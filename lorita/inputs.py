"""A model's example input: one tensor, or a tuple of tensors for a model that takes several.

Every function of the library that runs a model on an example (tracing, counting, timing,
exporting) reads it through this module, so a model whose ``forward(x, y)`` takes two inputs
works wherever a one-input model does: pass ``example_input=(x, y)``. Each tensor's first
dimension is the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

#: One tensor, or a tuple of tensors passed as positional arguments.
Example = Tensor | tuple[Tensor, ...]


def check_example(x, field: str = "example_input") -> Example:
    """``x`` itself when it is a tensor or a non-empty tuple of tensors (each with a batch
    dimension), else a ValueError naming ``field``."""
    if isinstance(x, Tensor) and x.dim() > 0:
        return x
    if isinstance(x, tuple) and x and all(isinstance(t, Tensor) and t.dim() > 0 for t in x):
        return x
    if isinstance(x, Tensor) or (
        isinstance(x, tuple) and x and all(isinstance(t, Tensor) for t in x)
    ):
        raise ValueError(f"{field}: every tensor needs a batch dimension (got a 0-d tensor)")
    if not isinstance(x, tuple):
        got = type(x).__name__
    else:
        got = "a tuple holding something else than tensors" if x else "an empty tuple"
    raise ValueError(
        f"{field}: expected a tensor, or a tuple of tensors for a model with several "
        f"inputs, got {got}"
    )


def is_example(x) -> bool:
    """Whether ``x`` is a tensor or a non-empty tuple of tensors."""
    try:
        check_example(x)
    except ValueError:
        return False
    return True


def call(model: nn.Module, x: Example):
    """``model(x)``, or ``model(*x)`` for a tuple of inputs."""
    return model(*x) if isinstance(x, tuple) else model(x)


def as_args(x: Example) -> tuple[Tensor, ...]:
    """The positional arguments ``x`` stands for."""
    return x if isinstance(x, tuple) else (x,)


def each(fn: Callable[[Tensor], Tensor], x: Example) -> Example:
    """``fn`` applied to the tensor, or to each tensor of the tuple."""
    return tuple(fn(t) for t in x) if isinstance(x, tuple) else fn(x)


def lead(x: Example) -> Tensor:
    """The first input (the one whose dtype, device and layout stand for all)."""
    return x[0] if isinstance(x, tuple) else x


def rows(x: Example, batch: int) -> Example:
    """The first sample of each input repeated to ``batch`` rows (contiguous)."""
    return each(lambda t: t[:1].expand(batch, *t.shape[1:]).contiguous(), x)


def key(x: Example) -> tuple:
    """A hashable description (shapes and dtypes) of what ``x`` looks like."""
    return tuple((tuple(t.shape), t.dtype) for t in as_args(x))


def shape_words(x: Example) -> str:
    """``(2, 3, 64, 64)``, or ``(2, 8) and (2, 6)`` for several inputs (for messages)."""
    return " and ".join(str(tuple(t.shape)) for t in as_args(x))


def is_cuda(x: Example) -> bool:
    return any(t.is_cuda for t in as_args(x))


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
        if isinstance(e, ValueError) and str(e).startswith(f"{field}:"):
            raise
        raise ValueError(f"{field}: the model refused it ({type(e).__name__}: {e})") from e
