"""The training engine: one job per file.

    config.py          TrainConfig (help text and bounds in field metadata), option tuples
    devices.py         available_devices, resolve_device, torchrun / DDP set-up
    build.py           load_splits, build_model (optionally from a weights file)
    preflight.py       check_start: device, data, model size, starting weights, before a run
    optim.py           optimizers, schedules, losses
    loop.py            train(config, run): the loop, readable top to bottom
    checkpoint.py      one checkpoint = one transaction (folder + manifest, one rename)
    evaluate.py        evaluate, finetune
    spectra_worker.py  singular values on a one-worker executor, off the critical path

The run folder itself is read and written through :mod:`lorita.runs` only.
"""

from .build import build_model, load_splits
from .config import AMP_MODES, OPTIMIZERS, SCHEDULES, TrainConfig
from .devices import available_devices, init_distributed, resolve_device
from .evaluate import evaluate, finetune
from .loop import PeerLost, check_batch, train

__all__ = [
    "AMP_MODES",
    "OPTIMIZERS",
    "PeerLost",
    "SCHEDULES",
    "TrainConfig",
    "available_devices",
    "build_model",
    "check_batch",
    "evaluate",
    "finetune",
    "init_distributed",
    "load_splits",
    "resolve_device",
    "train",
]
