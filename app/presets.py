"""Training presets for the Train page: a label and a full training config each.

The form shows the common fields (``FORM_FIELDS``); everything else in a preset (model
options, optimizer, schedule, how often to snapshot spectra) is passed through unchanged.
"""

from __future__ import annotations

from typing import Any

FORM_FIELDS = (
    "dataset",
    "model",
    "n_factors",
    "init",
    "plain_epochs",
    "weight_decay",
    "lr",
    "epochs",
    "batch_size",
    "seed",
    "device",
    "model_kwargs",
    "dataset_kwargs",
)
#: The form's boxes of ``key=value`` options, by config field (read by lorita's parse_options).
OPTION_BOXES = {"dataset_kwargs": "Dataset options", "model_kwargs": "Model options"}
#: the field whose choice each options box belongs to
OPTION_OWNERS = {"dataset_kwargs": "dataset", "model_kwargs": "model"}

PRESETS: dict[str, dict[str, Any]] = {
    # The library's TrainConfig defaults are the classroom run: filled in by config().
    "classroom": {"label": "Classroom demo: digits MLP, about 15 s on a CPU", "config": None},
    "fashion": {
        "label": "Fashion-MNIST MLP (a few minutes on a CPU)",
        "config": {
            "dataset": "fashion_mnist",
            "dataset_kwargs": {},
            "model": "mlp",
            "model_kwargs": {"depth": 3, "width": 256},
            "n_factors": 3,
            "init": "balanced",
            "optimizer": "adam",
            # the settings of bench/fidelity.py and bench/vs_pruning.py (docs/fidelity.md has
            # the effective ranks of N=1 and N=3, docs/training_recipe.md the recipes tried)
            "lr": 2e-3,
            "warmup": 0.1,  # N=3's dense accuracy +0.9 points (docs/training_recipe.md)
            "weight_decay": 1e-3,
            "epochs": 10,
            # the plain network first, composed after half the epochs: N=3 ends closer to N=1
            # uncut than composed from the start, its cuts ahead at small budgets
            # (docs/vs_pruning.md)
            "plain_epochs": 5,
            # and its composed epochs at half the learning rate: N=3's uncut test accuracy
            # within 0.1 points of N=1's, 0.5 under at the full rate (docs/vs_pruning.md)
            "composed_lr_scale": 0.5,
            "batch_size": 256,
            "seed": 0,
            "device": "auto",
            "spectra_every": 50,
            "log_every": 20,
        },
    },
    "planted": {
        "label": "Planted rank 5 (synthetic teacher of rank 5)",
        "config": {
            "dataset": "lowrank",
            "dataset_kwargs": {"rank": 5},
            "model": "mlp",
            "model_kwargs": {"depth": 2, "width": 64},
            "n_factors": 3,
            "init": "balanced",
            "optimizer": "adam",
            "lr": 3e-3,
            "weight_decay": 1e-3,
            "epochs": 20,
            "batch_size": 64,
            "seed": 0,
            "device": "auto",
        },
    },
    "cifar_vgg": {
        "label": "CIFAR-10 VGG — GPU",
        "config": {
            "dataset": "cifar10",
            "dataset_kwargs": {},
            "model": "vgg16",
            "model_kwargs": {},
            "n_factors": 3,
            "init": "balanced",
            "optimizer": "sgd",
            "lr": 0.01,
            "weight_decay": 1e-3,
            "schedule": "cosine",
            "epochs": 100,
            "batch_size": 128,
            "label_smoothing": 0.1,
            "augment": True,
            "seed": 42,
            "device": "cuda",
            "spectra_every": 200,
            "log_every": 50,
        },
    },
}
DEFAULT_PRESET = "classroom"


def config(preset: str) -> dict[str, Any]:
    """The full training config of ``preset`` (classroom: the library's TrainConfig defaults)."""
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown {preset!r}; allowed: {', '.join(PRESETS)}")
    cfg = PRESETS[preset]["config"]
    if cfg is None:
        from lorita.engine import TrainConfig

        cfg = {**TrainConfig().to_dict(), "device": "auto"}
    return dict(cfg)


def labels() -> dict[str, str]:
    return {k: v["label"] for k, v in PRESETS.items()}


def form_values(preset: str) -> dict[str, Any]:
    """The values the form shows for ``preset``."""
    cfg = config(preset)
    return {k: cfg[k] for k in FORM_FIELDS if k in cfg}


def build_config(preset: str, form: dict[str, Any]) -> dict[str, Any]:
    """The preset's full config with the form's fields on top."""
    base = config(preset)
    return drop_foreign_options(
        {**base, **{k: v for k, v in form.items() if k in FORM_FIELDS}}, base
    )


def foreign_options(cfg: dict[str, Any], start: dict[str, Any]) -> dict[str, Any]:
    """The options ``cfg`` kept from ``start`` for another dataset or model (the preset's MLP
    width once the model is a ResNet), by field; options given for the new one are not."""
    return {
        field: cfg[field]
        for field, owner in OPTION_OWNERS.items()
        if cfg.get(owner) != start.get(owner) and field in cfg and cfg[field] == start.get(field)
    }


def drop_foreign_options(cfg: dict[str, Any], start: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` without its :func:`foreign_options`."""
    for field in foreign_options(cfg, start):
        cfg.pop(field, None)
    return cfg


def baseline_config(config: dict[str, Any]) -> dict[str, Any]:
    """The same run with N=1: the ordinary network, same seed (the comparison to watch)."""
    return {**config, "n_factors": 1}
