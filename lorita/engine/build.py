"""The data and the model of a config: splits with their validation carve-out, the plain
model (optionally started from a weights file) composed with N factors."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .. import data as data_mod
from .. import models as models_mod
from ..convert import overparameterize
from ..runs import load_splits as _run_splits
from .config import TrainConfig

__all__ = ["build_model", "load_splits", "read_weights"]


def load_splits(config: TrainConfig | dict) -> data_mod.Splits:
    """The dataset of a config, with its validation carve-out."""
    return _run_splits(config.to_dict() if isinstance(config, TrainConfig) else config)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from a safetensors file or a PyTorch file read with ``weights_only=True``
    (never unpickling code). ValueError naming ``init_from`` if it cannot be read."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"init_from: {str(path)!r} is not a file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise ValueError(f"init_from: {str(path)!r} is not a readable weights file ({e})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"init_from: {str(path)!r} does not hold a state_dict of tensors")
    return sd


def _load_into(plain: nn.Module, path: str) -> None:
    sd = read_weights(path)
    own = plain.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(
                f"init_from: {k!r} has shape {tuple(v.shape)} in the file but "
                f"{tuple(own[k].shape)} in the model"
            )
    try:
        plain.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0][:300]
        raise ValueError(f"init_from: the weights do not match the model ({first})") from None


def build_model(config: TrainConfig, splits: data_mod.Splits) -> nn.Module:
    """The plain model of the config, composed with N factors (seeded by ``config.seed``).

    With ``config.init_from`` the plain model's weights are loaded from that file first.
    """
    torch.manual_seed(config.seed)
    plain = models_mod.create_model(
        config.model,
        in_channels=splits.in_channels,
        image_size=splits.image_size,
        num_classes=splits.num_classes,
        **config.model_kwargs,
    )
    if config.init_from is not None:
        _load_into(plain, config.init_from)
    skip = models_mod.default_skip(config.model) if config.skip is None else tuple(config.skip)
    return overparameterize(
        plain, config.n_factors, init=config.init, skip=skip, inner=config.inner
    )
