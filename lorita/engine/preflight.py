"""What can be checked before a run folder exists, cheaply and without allocating the model:
the device, the data, the model's size on the meta device, that it runs on the dataset's image
size (a forward pass on the meta device: shapes only), and the starting weights. The
command line runs :func:`check_start` before it writes anything; the app's Train page the same
checks before it starts a run. Each failure is a ValueError naming the field."""

from __future__ import annotations

import dataclasses
import json

import psutil
import torch
from torch import nn

from ..convert import check_skip
from ..data import check_dataset, dataset_options, dataset_shape, training_count
from ..models import create_model
from .build import check_weights, fit_head, load_splits, read_weights
from .config import TrainConfig
from .devices import dist_info, resolve_device

__all__ = [
    "check_init_from",
    "check_input_fits",
    "check_model",
    "check_model_size",
    "check_plain_steps",
    "check_start",
    "check_training_part",
]

#: image sides tried, smallest first, to say from which size a model runs
IMAGE_SIDES = (28, 32, 64, 75, 96, 112, 128, 160, 224, 299)


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


def check_model_size(
    config: TrainConfig, shape: tuple[int, int, int] | None = None
) -> nn.Module | None:
    """Build the model on the meta device (nothing allocated) and refuse it when its weights,
    gradients and optimizer state (about 4 x 4 bytes per parameter, N factors each) exceed this
    machine's memory; a build that registers over 20,000 weight tensors is refused as well.
    Returns the meta model (None if it cannot be built on the meta device). ``shape``: the
    dataset's :func:`~lorita.data.dataset_shape` when the caller has it (a folder is listed
    to find it)."""
    channels, size, classes = shape or dataset_shape(config.dataset, **config.dataset_kwargs)
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


def check_init_from(meta_model: nn.Module | None, path: str) -> str | None:
    """The weights file is readable (safetensors, or a state_dict read with weights_only) and
    matches the model's names and shapes (checked against the meta model: nothing allocated
    but the file's own tensors). Returns the note of an output layer that will start fresh
    (a 1000-class head for 10 classes), else None."""
    if meta_model is None:
        read_weights(path)
        return None
    sd, note = fit_head(meta_model, read_weights(path, meta_model))
    check_weights(meta_model, sd)
    return note


def _meta_forward(meta_model: nn.Module, channels: int, side: int) -> Exception | None:
    """The error a training-mode forward pass of two images raises on the meta device."""
    was = meta_model.training
    meta_model.train()
    try:
        with torch.no_grad():
            meta_model(torch.empty(2, channels, side, side, device="meta"))
    except Exception as e:  # noqa: BLE001 - any failure is reported or set aside below
        return e
    finally:
        meta_model.train(was)
    return None


def check_input_fits(
    meta_model: nn.Module | None, config: TrainConfig, shape: tuple[int, int, int] | None = None
) -> None:
    """The model runs on the dataset's images (a torchvision ImageNet model on 32 px CIFAR
    images may not: AlexNet, Inception v3 and MaxViT need larger ones). Checked on the meta
    device (shapes only, microseconds per layer). A failure counts only when a larger side
    runs: a model the meta device cannot run at any size is left to the real run, unless it
    runs with its default options (then the options are named)."""
    if meta_model is None:
        return
    shape = shape or dataset_shape(config.dataset, **config.dataset_kwargs)
    channels, size, _ = shape
    err = _meta_forward(meta_model, channels, size)
    if err is None:
        return
    fits = next(
        (s for s in IMAGE_SIDES if s > size and not _meta_forward(meta_model, channels, s)), None
    )
    what = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    what = what if len(what) <= 160 else what[:157] + "..."
    if fits is None:
        _refuse_options_if_at_fault(config, shape, f"{type(err).__name__}: {what}")
        return
    if "size" in dataset_options(config.dataset):
        fix = f"use larger images (dataset option size={fits}, --data-arg size={fits})"
    else:
        fix = "pick a model built for small images, or a dataset with larger ones"
    raise ValueError(
        f"model: {config.model!r} does not run on the {channels}x{size}x{size} images of "
        f"{config.dataset!r} ({type(err).__name__}: {what}); it runs from {fits} px: {fix}"
    )


def _refuse_options_if_at_fault(
    config: TrainConfig, shape: tuple[int, int, int], what: str
) -> None:
    """A model that runs at no image size with the run's model options but does with its
    default ones (timm's drop_rate=1.5 is only refused by the forward pass): the options are
    named now, not by a failed run."""
    if not config.model_kwargs:
        return
    try:
        plain = check_model_size(dataclasses.replace(config, model_kwargs={}), shape)
    except ValueError:  # not even with its defaults: left to the real run, as before
        return
    if plain is None or _meta_forward(plain, shape[0], shape[1]) is not None:
        return
    raise ValueError(
        f"model_kwargs: {config.model!r} does not run with the options "
        f"{sorted(config.model_kwargs)} ({what}); it runs with its default ones"
    )


def check_model(config: TrainConfig) -> str | None:
    """The model's size on the meta device, that it runs on the dataset's images, then the
    starting weights against it. Returns what the run will do with the weights that is worth
    saying before it starts (an output layer left fresh), else None."""
    shape = dataset_shape(config.dataset, **config.dataset_kwargs)  # lists a folder: once
    meta_model = check_model_size(config, shape)
    if config.skip and meta_model is not None:  # None: not buildable on meta; checked later
        check_skip(meta_model, config.skip)
    check_input_fits(meta_model, config, shape)
    check_batchnorm_batches(meta_model, config)
    if config.init_from is not None:
        return check_init_from(meta_model, config.init_from)
    return None


def check_batchnorm_batches(meta_model: nn.Module | None, config: TrainConfig) -> None:
    """A model with BatchNorm cannot train on batches of one sample (torch refuses the step):
    refuse a batch size of 1, or a folder that leaves one image for training, naming which."""
    if meta_model is None or not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in meta_model.modules()
    ):
        return
    fix = "or a model without BatchNorm (the built-in models: --model-arg batchnorm=false)"
    world = dist_info().world  # under torchrun each process's share of a batch counts
    per = f" in each of the {world} processes (torchrun)" if world > 1 else " per batch"
    if config.batch_size and config.batch_size < 2 * world:
        raise ValueError(f"batch_size: {config.batch_size} cannot train a model with BatchNorm (it "
                         f"needs at least 2 samples{per}); use {2 * world} or more, {fix}")  # fmt: skip
    n = training_count(config.dataset, config.val_fraction, **config.dataset_kwargs)
    if n is not None and n < world + 1:
        raise ValueError(
            f"{_sample_field(config)}: {config.dataset!r} leaves {n} sample(s) for training once "
            f"validation and test are held out; a model with BatchNorm needs at least "
            f"{world + 1}{'' if world == 1 else f' (for 2 in each of the {world} processes)'}"
            f": {_more_samples(config)}, {fix}"
        )


def check_training_part(config: TrainConfig) -> None:
    """The dataset leaves at least one sample to train on once validation is held out."""
    n = training_count(config.dataset, config.val_fraction, **config.dataset_kwargs)
    if n is not None and n < 1:
        raise ValueError(
            f"{_sample_field(config)}: {config.dataset!r} leaves no sample for training once "
            f"validation and test are held out: {_more_samples(config)}"
        )


def _sample_field(config: TrainConfig) -> str:
    """The field that sets how many training samples there are."""
    return "dataset option 'n_train'" if "n_train" in dataset_options(config.dataset) else "dataset"


def _more_samples(config: TrainConfig) -> str:
    return "raise n_train" if "n_train" in dataset_options(config.dataset) else "add images"


def check_plain_steps(config: TrainConfig) -> None:
    """With ``max_steps``, the plain epochs end before the run does (else nothing would be
    composed). The training part is read to count its steps only when the counts alone (an
    epoch takes at least one step) do not settle it."""
    plain, last = config.plain_epochs, config.max_steps
    if not (last and config.n_factors > 1 and plain):
        return
    took = f"at least {plain}"
    if plain < last:
        cuda = resolve_device(config.device).type == "cuda"
        steps = plain * max(1, len(load_splits(config).train) // config.batch_for(cuda))
        if steps < last:
            return
        took = str(steps)
    raise ValueError(
        f"plain_epochs: {plain} plain epoch{'s take' if plain > 1 else ' takes'} {took} steps, "
        f"but max_steps is {last}: nothing would be composed; lower plain_epochs (--plain-epochs)"
        " or raise max_steps (--max-steps)"
    )


def check_start(config: TrainConfig) -> str:
    """Everything cheap that can fail before a run folder exists: device, data, model size,
    the skip patterns, the starting weights, the plain epochs against max_steps. Returns
    the dataset's note (:func:`lorita.data.check_dataset`: where the data come from, and
    what a folder leaves out)."""
    resolve_device(config.device)
    note = check_dataset(config.dataset, **config.dataset_kwargs)
    check_training_part(config)
    check_model(config)
    check_plain_steps(config)
    return note
