"""What can be checked before a run folder exists, cheaply and without allocating the model:
the device, the data, the model's size on the meta device, and the starting weights. The
command line runs :func:`check_start` before it writes anything; the app's Train page the same
checks before it starts a run. Each failure is a ValueError naming the field."""

from __future__ import annotations

import json

import psutil
import torch
from torch import nn

from ..data import check_dataset, dataset_shape
from ..models import create_model
from .build import check_weights, fit_head, read_weights
from .config import TrainConfig
from .devices import resolve_device

__all__ = ["check_init_from", "check_model", "check_model_size", "check_start"]


def _machine_bytes() -> int:
    return int(psutil.virtual_memory().total)


class _TooBig(Exception):
    pass


class _ParamCounter:
    """A parameter-registration hook that counts tensors and elements and raises
    :class:`_TooBig` past 20,000 tensors or ``limit`` bytes at ``per_param`` bytes each."""

    def __init__(self, limit: int, per_param: int) -> None:
        self.limit, self.per_param = limit, per_param
        self.tensors = self.numel = 0

    def __call__(self, module, name, param) -> None:
        if param is None:
            return
        self.tensors += 1
        self.numel += param.numel()
        if self.tensors > 20_000 or self.numel * self.per_param > self.limit:
            raise _TooBig


def check_model_size(config: TrainConfig) -> nn.Module | None:
    """Build the model on the meta device (nothing allocated) and refuse it when its weights,
    gradients and optimizer state (about 4 x 4 bytes per parameter, N factors each) exceed this
    machine's memory; a build that registers over 20,000 weight tensors is refused as well.
    Returns the meta model (None if it cannot be built on the meta device)."""
    channels, size, classes = dataset_shape(config.dataset, **config.dataset_kwargs)
    limit = _machine_bytes()
    count = _ParamCounter(limit, per_param=16 * max(1, config.n_factors))
    hook = torch.nn.modules.module.register_module_parameter_registration_hook(count)
    try:
        with torch.device("meta"):
            return create_model(
                config.model,
                in_channels=channels,
                image_size=size,
                num_classes=classes,
                **config.model_kwargs,
            )
    except _TooBig:
        opts = json.dumps(config.model_kwargs)
        opts = opts if len(opts) <= 60 else opts[:57] + "..."
        raise ValueError(
            f"model: {config.model!r} with {opts} needs more than this machine's "
            f"{limit / 2**30:.0f} GiB for its weights, gradients and optimizer state "
            f"({count.tensors} tensors, {count.numel:.3g} parameters so far); use smaller "
            f"options"
        ) from None
    except TypeError as e:
        raise ValueError(f"model_kwargs: {e}") from None
    except (RuntimeError, NotImplementedError, AssertionError):
        return None  # cannot be built on the meta device: the real build checks it
    finally:
        hook.remove()


def check_init_from(meta_model: nn.Module | None, path: str) -> None:
    """The weights file is readable (safetensors, or a state_dict read with weights_only) and
    matches the model's names and shapes (checked against the meta model: nothing allocated
    but the file's own tensors)."""
    if meta_model is None:
        read_weights(path)
        return
    sd, _ = fit_head(meta_model, read_weights(path, meta_model))
    check_weights(meta_model, sd)


def check_model(config: TrainConfig) -> None:
    """The model's size on the meta device, then the starting weights against it."""
    meta_model = check_model_size(config)
    if config.init_from is not None:
        check_init_from(meta_model, config.init_from)


def check_start(config: TrainConfig) -> None:
    """Everything cheap that can fail before a run folder exists: device, data, model size,
    the starting weights."""
    resolve_device(config.device)
    check_dataset(config.dataset, **config.dataset_kwargs)
    check_model(config)
