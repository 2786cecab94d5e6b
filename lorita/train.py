"""Training: the config, the loop, evaluation and fine-tuning.

``train(config, run)`` trains a composed model and writes the run folder as it goes (metrics,
spectra snapshots of every layer, checkpoints each epoch, the best checkpoint by validation
accuracy). Under ``torchrun`` it trains with DistributedDataParallel and only rank 0 writes.

Weight decay and the theory: with ``optimizer="sgd"`` or ``"adam"`` the weight decay is added to
the gradient (``g + lambda * W_i`` for every factor), i.e. a true L2 penalty
``lambda/2 * sum_i ||W_i||^2`` -- the penalty whose minimum over factorisations is the
Schatten-(2/N) quasi-norm of the product. (With Adam the decay term is then rescaled by the
adaptive step like the rest of the gradient, so the penalty is exact in the objective but the
path differs from SGD's.) ``"adamw"`` decouples the decay (``W <- W - lr * lambda * W``), which
is not the gradient of any fixed penalty under Adam's preconditioning, so the theory does not
apply to it directly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_mod
from . import models as models_mod
from .spectra import layer_matrix

__all__ = [
    "TrainConfig",
    "build_model",
    "evaluate",
    "finetune",
    "load_splits",
    "resolve_device",
    "train",
    "Diverged",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "plateau", "none")
INITS = ("balanced", "independent")
AMP_MODES = ("auto", "bf16", "off")
INNER = (None, "min", "paper")


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


# --------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as the run's config.json).

    The defaults are the classroom run: digits, MLP, N=3, a few seconds on a laptop CPU.
    """

    # data
    dataset: str = "digits"  # one of lorita.data.list_datasets()
    dataset_kwargs: dict = field(default_factory=dict)  # dataset options (lowrank: rank, ...)
    val_fraction: float = 0.1  # share of the training data held out for validation/selection
    split_seed: int = 0  # seed of the validation carve-out (kept apart from `seed`)
    augment: bool = False  # random crop + horizontal flip on training batches (CIFAR)
    normalize: bool = True  # standardise channels with the training split's mean/std
    # model
    model: str = "mlp"  # one of lorita.models.list_models()
    model_kwargs: dict = field(default_factory=dict)  # model options (mlp: depth, width, ...)
    n_factors: int = 3  # N: each composed weight is a product of N factors; 1 = ordinary network
    init: str = "balanced"  # "balanced" (same start as N=1) or "independent" (paper: default init)
    inner: str | None = None  # factor inner width: None/"min" = min(in, out), "paper" = authors'
    skip: list[str] | None = None  # layer names/patterns not composed; None = the model's default
    # optimisation
    optimizer: str = "adam"  # "sgd" or "adam": decay is a true L2 penalty; "adamw": decoupled
    lr: float = 3e-3  # peak learning rate
    momentum: float = 0.9  # SGD momentum (ignored by Adam/AdamW)
    weight_decay: float = 5e-3  # L2 on every parameter, every factor included (the LoRITa knob)
    schedule: str = "cosine"  # cosine (per step, to 0), step (x0.1 at 50%, 75%), plateau, none
    epochs: int = 30  # passes over the training split
    batch_size: int = 64  # global batch (split across processes under torchrun); 0 = auto
    label_smoothing: float = 0.0  # cross-entropy label smoothing (the paper's CNNs use 0.1)
    grad_clip: float = 0.0  # clip the gradient norm to this (0 = off)
    max_steps: int = 0  # stop after this many steps (0 = all epochs)
    seed: int = 0  # seeds initialisation, shuffling and augmentation
    # hardware
    device: str = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1", "mps"
    amp: str = "auto"  # "auto" (bf16 autocast on CUDA only), "bf16", "off"
    num_workers: int = 0  # DataLoader worker processes (data is in memory; 0 is usually best)
    # logging
    spectra_every: int = 10  # steps between spectra snapshots (0 = only at start and end)
    spectra_budget: float = 0.05  # skip a snapshot when snapshots would exceed this share of time
    eval_every: int = 0  # steps between validation passes (0 = once per epoch)
    log_every: int = 10  # steps between training-loss lines in metrics.jsonl

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a dict (e.g. config.json); unknown keys are an error."""
        if isinstance(d, TrainConfig):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a JSON object, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"config: unknown field(s) {unknown}; allowed: {', '.join(names)}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TrainConfig:
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"config: file {str(path)!r} not found") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"config: file {str(path)!r} is not readable JSON ({e})") from None
        return cls.from_dict(d)


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (_is_int(v) or isinstance(v, float | np.floating)) and math.isfinite(float(v))


def _validate(c: TrainConfig) -> None:
    def bad(fieldname, value, allowed):
        raise ValueError(f"{fieldname}: {value!r} is not allowed; expected {allowed}")

    def choice(fieldname, allowed):
        v = getattr(c, fieldname)
        if v not in allowed:
            bad(fieldname, v, "one of " + ", ".join(map(str, allowed)))

    def integer(fieldname, lo):
        v = getattr(c, fieldname)
        if not _is_int(v) or v < lo:
            bad(fieldname, v, f"an integer >= {lo}")
        setattr(c, fieldname, int(v))

    def number(fieldname, lo, hi, lo_open=False, hi_open=False):
        v = getattr(c, fieldname)
        if not _is_num(v):
            bad(fieldname, v, "a finite number")
        v = float(v)
        if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
            bad(
                fieldname,
                v,
                f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}",
            )
        setattr(c, fieldname, v)

    choice("dataset", data_mod.list_datasets())
    choice("model", models_mod.list_models())
    for name in ("dataset_kwargs", "model_kwargs"):
        if not isinstance(getattr(c, name), dict):
            bad(name, getattr(c, name), "a JSON object of options")
    allowed = models_mod.model_options(c.model)
    unknown = sorted(set(c.model_kwargs) - set(allowed))
    if unknown:
        bad("model_kwargs", unknown, f"options of {c.model!r}: {', '.join(allowed)}")
    number("val_fraction", 0, 0.5, lo_open=True)
    integer("split_seed", 0)
    for name in ("augment", "normalize"):
        if not isinstance(getattr(c, name), bool):
            bad(name, getattr(c, name), "true or false")
    integer("n_factors", 1)
    choice("init", INITS)
    choice("inner", INNER)
    if c.skip is not None:
        if isinstance(c.skip, str):
            c.skip = [c.skip]
        if not isinstance(c.skip, list | tuple) or not all(isinstance(s, str) for s in c.skip):
            bad("skip", c.skip, "a list of layer names or patterns, or null")
        c.skip = list(c.skip)
    choice("optimizer", OPTIMIZERS)
    number("lr", 0, 10, lo_open=True)
    number("momentum", 0, 1, hi_open=True)
    number("weight_decay", 0, 1)
    choice("schedule", SCHEDULES)
    integer("epochs", 1)
    integer("batch_size", 0)
    number("label_smoothing", 0, 1, hi_open=True)
    number("grad_clip", 0, math.inf)
    integer("max_steps", 0)
    integer("seed", 0)
    dev = c.device
    if not isinstance(dev, str) or not (
        dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())
    ):
        bad("device", dev, "auto, cpu, cuda, cuda:<index> or mps")
    choice("amp", AMP_MODES)
    integer("num_workers", 0)
    integer("spectra_every", 0)
    number("spectra_budget", 0, 1, lo_open=True)
    integer("eval_every", 0)
    integer("log_every", 1)


# --------------------------------------------------------------------------- pieces


def available_devices() -> list[str]:
    """Device kinds usable here, best first: "cuda" and "mps" where present, then "cpu"."""
    out = ["cuda"] if torch.cuda.is_available() else []
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out + ["cpu"]


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """ "auto": cuda (this process's GPU under torchrun), then mps, then cpu."""
    kinds = available_devices()
    if name == "auto":
        name = kinds[0]
    if name.startswith("cuda") and "cuda" not in kinds:
        raise ValueError(f"device: {name!r} asked for but CUDA is not available; use cpu or auto")
    if name == "mps" and "mps" not in kinds:
        raise ValueError("device: 'mps' asked for but MPS is not available; use cpu or auto")
    if name == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def load_splits(config: TrainConfig) -> data_mod.Splits:
    """The dataset of a config, with its validation carve-out."""
    return data_mod.load_dataset(
        config.dataset,
        val_fraction=config.val_fraction,
        seed=config.split_seed,
        augment=config.augment,
        normalize=config.normalize,
        **config.dataset_kwargs,
    )


def build_model(config: TrainConfig, splits: data_mod.Splits) -> nn.Module:
    """The plain model of the config, composed with N factors (seeded by ``config.seed``)."""
    import lorita

    torch.manual_seed(config.seed)
    plain = models_mod.create_model(
        config.model,
        in_channels=splits.in_channels,
        image_size=splits.image_size,
        num_classes=splits.num_classes,
        **config.model_kwargs,
    )
    skip = models_mod.default_skip(config.model) if config.skip is None else tuple(config.skip)
    return lorita.overparameterize(
        plain, config.n_factors, init=config.init, skip=skip, inner=config.inner
    )


def _loss_fn(task: str, label_smoothing: float = 0.0):
    if task == "regression":
        return lambda out, y: F.mse_loss(out.float(), y.float())
    return lambda out, y: F.cross_entropy(out.float(), y, label_smoothing=label_smoothing)


def _task_of(dataset) -> str:
    y = getattr(dataset, "y", None)
    return "regression" if y is not None and y.is_floating_point() else "classification"


def _batches(dataset, batch_size: int):
    n = len(dataset)
    for i in range(0, n, batch_size):
        yield dataset[torch.arange(i, min(n, i + batch_size))]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    *,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    amp: bool = False,
) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` on ``dataset`` (accuracy as a fraction in [0, 1]).

    For a regression dataset (float targets) ``acc`` is the coefficient of determination R².
    The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    task = _task_of(dataset)
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0.0, 0
    ys, sse = [], 0.0
    try:
        for x, y in _batches(dataset, batch_size):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(x)
            out = out.float()
            if task == "regression":
                loss_sum += F.mse_loss(out, y, reduction="sum").item() / y.shape[1]
                sse += (out - y).pow(2).sum().item()
                ys.append(y.cpu())
            else:
                loss_sum += F.cross_entropy(out, y, reduction="sum").item()
                correct += (out.argmax(1) == y).sum().item()
            n += len(y)
    finally:
        model.train(was_training)
    if n == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    if task == "regression":
        yy = torch.cat(ys)
        sst = (yy - yy.mean(0)).pow(2).sum().item()
        return {"loss": loss_sum / n, "acc": 1.0 - sse / sst if sst > 0 else 0.0}
    return {"loss": loss_sum / n, "acc": correct / n}


def _make_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float):
    """SGD / Adam / AdamW, fused (one kernel for all parameters) where PyTorch supports it."""
    params = list(params)
    cls, kw = {
        "sgd": (torch.optim.SGD, {"momentum": momentum}),
        "adam": (torch.optim.Adam, {}),
        "adamw": (torch.optim.AdamW, {}),
    }[name]
    dev = params[0].device.type if params else "cpu"
    if dev in ("cpu", "cuda"):
        with contextlib.suppress(RuntimeError, TypeError, ValueError):
            return cls(params, lr=lr, weight_decay=weight_decay, fused=True, **kw)
    return cls(params, lr=lr, weight_decay=weight_decay, **kw)


def _make_scheduler(name: str, opt, total_steps: int):
    """Cosine and step schedules advance per step; plateau per validation pass."""
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    if name == "step":
        miles = sorted({max(1, int(total_steps * 0.5)), max(1, int(total_steps * 0.75))})
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=miles, gamma=0.1)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=10)
    return None


def finetune(
    model: nn.Module,
    splits: data_mod.Splits,
    *,
    epochs: int,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    seed: int = 0,
    label_smoothing: float = 0.0,
    callback: Callable[[dict], Any] | None = None,
) -> nn.Module:
    """Fine-tune a (truncated) model on the training split; returns a copy with the best
    validation accuracy seen (the starting point included), in eval mode on CPU."""
    if not _is_int(epochs) or epochs < 0:
        raise ValueError(f"epochs: {epochs!r} is not allowed; expected an integer >= 0")
    if not _is_num(lr) or lr <= 0:
        raise ValueError(f"lr: {lr!r} is not allowed; expected a number > 0")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: {optimizer!r} is not allowed; expected one of {OPTIMIZERS}")
    device = torch.device(device)
    work = copy.deepcopy(model).to(device)
    best = evaluate(work, splits.val, device=device)["acc"]
    best_state = copy.deepcopy(work.state_dict())
    if epochs == 0:
        return work.cpu().eval()
    gen = torch.Generator().manual_seed(seed)
    opt = _make_optimizer(optimizer, work.parameters(), lr, weight_decay, 0.9)
    steps = epochs * max(1, len(splits.train) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    loss_fn = _loss_fn(splits.task, label_smoothing)
    for ep in range(epochs):
        work.train()
        splits.train.seed(seed * 1000 + ep)
        for idx in data_mod.batch_indices(
            len(splits.train), batch_size, generator=gen, drop_last=True
        ):
            x, y = splits.train[idx]
            loss = loss_fn(work(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        val = evaluate(work, splits.val, device=device)
        if callback is not None:
            callback(
                {
                    "event": "finetune",
                    "epoch": ep + 1,
                    "val_acc": val["acc"],
                    "val_loss": val["loss"],
                }
            )
        if val["acc"] > best:
            best, best_state = val["acc"], copy.deepcopy(work.state_dict())
    work.load_state_dict(best_state)
    return work.cpu().eval()


# --------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def on(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_info() -> _Dist:
    """World size and ranks from torchrun's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return _Dist(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device_hint: str = "auto") -> _Dist:
    """Start the process group under torchrun (nccl on CUDA, gloo otherwise); idempotent."""
    import torch.distributed as dist

    d = dist_info()
    if d.on and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_hint in ("auto", "cuda")
        if use_cuda:
            torch.cuda.set_device(d.local_rank % torch.cuda.device_count())
        else:  # share the CPU cores between the processes on this machine
            local = int(os.environ.get("LOCAL_WORLD_SIZE", d.world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return d


# --------------------------------------------------------------------------- checkpoints


def _save_train_state(path: Path, opt, sched, meta: dict) -> None:
    """Optimizer/scheduler/RNG state as safetensors (tensors) + JSON metadata (everything else)."""
    from safetensors.torch import save as st_save

    from .export import atomic_write_bytes

    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    plain_state: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                plain_state.setdefault(str(idx), {})[k] = v
    info = {
        "param_groups": sd["param_groups"],
        "plain_state": plain_state,
        "scheduler": sched.state_dict() if sched is not None else None,
        **meta,
    }
    blob = st_save(tensors, metadata={"lorita_train_state": json.dumps(info, default=_jsonable)})
    atomic_write_bytes(path, blob)


def _jsonable(o):
    if torch.is_tensor(o) or isinstance(o, np.generic):
        return o.item()
    if isinstance(o, tuple | set):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _load_train_state(path: Path, opt, sched) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["lorita_train_state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for idx, st in info.pop("plain_state").items():
        state.setdefault(int(idx), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": info.pop("param_groups")})
    sched_state = info.pop("scheduler")
    if sched is not None and sched_state is not None:
        sched.load_state_dict(sched_state)
    torch.set_rng_state(tensors["rng.torch"])
    return info


# --------------------------------------------------------------------------- the loop


def _round_list(t: torch.Tensor) -> list[float]:
    return [float(f"{v:.6g}") for v in t.tolist()]


def train(
    config: TrainConfig | dict,
    run=None,
    callback: Callable[[dict], Any] | None = None,
    *,
    stop: Callable[[], bool] | None = None,
    resume: bool = False,
    threads: int | str | None = None,
) -> dict:
    """Train a composed model; write the run folder when ``run`` is given.

    Args:
        config: a TrainConfig or its dict.
        run: a :class:`lorita.runs.Run` to write (config.json, status.json, metrics.jsonl,
            spectra.jsonl, checkpoints/); None trains in memory only.
        callback: called with event dicts ({"event": "start" | "step" | "eval" | "spectra" |
            "checkpoint" | "end", ...}), e.g. for a progress bar.
        stop: polled after every step; True ends the run after that step with a checkpoint
            (state "stopped"). A STOP file in the run folder does the same.
        resume: continue ``run`` from its last checkpoint.
        threads: CPU threads for this run (restored afterwards): an integer, None (leave
            PyTorch's setting) or "auto" (one thread for a small model on the CPU: tiny matrix
            products gain nothing from more, and lose a lot when the cores are shared).

    Returns:
        dict with state ("completed", "stopped" or "failed"), message, step, best_val_acc,
        best_step, val (last validation metrics), test (of the best checkpoint), test_last,
        timings (seconds spent in steps, evaluation, spectra, checkpoints), and ``model``
        (the trained composed model, in memory, last state).
    """
    import lorita

    config = TrainConfig.from_dict(
        config if not isinstance(config, TrainConfig) else config.to_dict()
    )
    d = init_distributed(config.device)
    main = d.main
    writer = run if (run is not None and main) else None
    t_start = time.time()

    if writer is not None:
        if resume:
            st = run.raw_status()
            if st.get("state") == "completed":
                raise ValueError(f"resume: run {run.name!r} already completed")
        else:
            from .runs import write_json

            write_json(run.path / "config.json", config.to_dict())
        writer.start_heartbeat()

    old_threads = torch.get_num_threads()
    try:
        return _train(config, run, writer, d, callback, stop, resume, t_start, lorita, threads)
    except BaseException as e:
        if writer is not None:
            st = run.raw_status()
            if st.get("state") in ("queued", "running"):
                msg = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                writer.update_status(state="failed", message=msg[:500], ended=time.time())
        raise
    finally:
        torch.set_num_threads(old_threads)
        if writer is not None:
            writer.stop_heartbeat()


def _set_threads(threads, model: nn.Module, device: torch.device, d: _Dist) -> None:
    if threads is None:
        return
    if threads == "auto":
        small = sum(p.numel() for p in model.parameters()) < 1_000_000
        if device.type == "cpu" and small and not d.on:
            torch.set_num_threads(1)
        return
    if not _is_int(threads) or threads < 1:
        raise ValueError(
            f"threads: {threads!r} is not allowed; expected None, 'auto' or an integer >= 1"
        )
    torch.set_num_threads(int(threads))


def _train(config, run, writer, d, callback, stop, resume, t_start, lt, threads) -> dict:
    import torch.distributed as dist

    device = resolve_device(config.device, d.local_rank)
    cuda = device.type == "cuda"
    amp = config.amp == "bf16" or (config.amp == "auto" and cuda)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    def emit(event: str, **kw):
        if callback is not None and d.main:
            callback({"event": event, **kw})

    splits = load_splits(config)
    model = build_model(config, splits).to(device)
    _set_threads(threads, model, device, d)
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    channels_last = cuda and has_conv
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch_size = config.batch_size or (512 if cuda else 128)
    per_rank = max(1, batch_size // d.world)
    n_train = len(splits.train)
    shard = math.ceil(n_train / d.world)
    steps_per_epoch = max(1, shard // per_rank)  # the ragged last batch is dropped
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    opt = _make_optimizer(
        config.optimizer, model.parameters(), config.lr, config.weight_decay, config.momentum
    )
    sched = _make_scheduler(config.schedule, opt, total_steps)
    loss_fn = _loss_fn(splits.task, config.label_smoothing)
    ckpt_dir = run.path / "checkpoints" if run is not None else None

    # ---- state (restored on resume)
    step, epoch, step_in_epoch = 0, 0, 0
    best_val, best_step = -math.inf, None
    timings = {"steps": 0.0, "eval": 0.0, "spectra": 0.0, "checkpoint": 0.0, "spectra_end": 0.0}
    if resume:
        if run is None:
            raise ValueError("resume: needs a run folder")
        last, state_file = ckpt_dir / "last.safetensors", ckpt_dir / "train_state.safetensors"
        if not last.is_file() or not state_file.is_file():
            raise ValueError(f"resume: run {run.name!r} has no checkpoint to resume from")
        model.load_state_dict(lt.load(str(last)).state_dict())
        info = _load_train_state(state_file, opt, sched)
        if info.get("step") != lt.read_spec(str(last))["metadata"].get("step"):
            raise ValueError(f"resume: run {run.name!r} has inconsistent checkpoints")
        step, epoch, step_in_epoch = info["step"], info["epoch"], info["step_in_epoch"]
        best_val = (
            info.get("best_val", -math.inf) if info.get("best_val") is not None else -math.inf
        )
        best_step = info.get("best_step")
        if writer is not None:
            from .runs import rewrite_jsonl

            keep = [
                r for r in run.metrics() if r.get("step", 0) <= step and r.get("split") != "test"
            ]
            rewrite_jsonl(run.path / "metrics.jsonl", keep)
            rewrite_jsonl(
                run.path / "spectra.jsonl", [r for r in run.spectra() if r.get("step", 0) <= step]
            )
            with contextlib.suppress(FileNotFoundError):
                (run.path / "STOP").unlink()
    elif writer is not None:
        for fname in ("metrics.jsonl", "spectra.jsonl"):
            (run.path / fname).touch()

    net = model
    if d.on:
        from torch.nn.parallel import DistributedDataParallel as DDP

        dist.barrier()  # rank 0 has finished rewriting the run folder
        net = DDP(model, device_ids=[device.index] if cuda else None)  # broadcasts rank 0's weights

    if writer is not None:
        writer.update_status(
            state="running",
            message="",
            pid=os.getpid(),
            host=socket.gethostname(),
            started=time.time(),
            ended=None,
            step=step,
            total_steps=total_steps,
            epoch=epoch,
            device=str(device),
            world_size=d.world,
        )
    emit(
        "start",
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        device=str(device),
        step=step,
        run=str(run.path) if run is not None else None,
    )

    # ---- helpers
    spectra_worker = _SpectraWorker() if d.main else None

    def snapshot(force: bool = False):
        """Copy every layer's merged weight (cheap) and hand it to the helper thread for the
        SVD; skipped while the helper is busy or when snapshots exceed their time budget."""
        if not d.main:
            return
        if not force and timings["spectra"] > config.spectra_budget * max(timings["steps"], 1e-9):
            return
        t0 = time.perf_counter()
        if force or not spectra_worker.busy():
            with torch.no_grad():  # copies of the layers; the helper forms the products
                layers = {n: copy.deepcopy(m) for n, m in lt.iter_layers(model)}
            spectra_worker.submit((step, epoch, layers), wait=force)
        timings["spectra"] += time.perf_counter() - t0

    def flush_spectra(wait: bool = False):
        if spectra_worker is None:
            return
        for st, ep, spec in spectra_worker.results(wait=wait):
            row = {"step": st, "epoch": ep, "layers": {k: _round_list(v) for k, v in spec.items()}}
            if writer is not None:
                writer.log_spectra(row)
            emit("spectra", step=st, epoch=ep, layers=spec)

    def validate():
        """Evaluate on validation (rank 0), share the result, track the best checkpoint."""
        nonlocal best_val, best_step
        t0 = time.perf_counter()
        vals = torch.zeros(2, dtype=torch.float64)
        if d.main:
            m = evaluate(model, splits.val, device=device, amp=amp)
            vals = torch.tensor([m["loss"], m["acc"]], dtype=torch.float64)
        if d.on:
            vb = vals.to(device)
            dist.broadcast(vb, 0)
            vals = vb.cpu()
        m = {"loss": float(vals[0]), "acc": float(vals[1])}
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(m["acc"])
        row = {
            "step": step,
            "epoch": epoch,
            "split": "val",
            **m,
            "lr": opt.param_groups[0]["lr"],
            "time": time.time() - t_start,
        }
        if writer is not None:
            writer.log_metrics(row)
        timings["eval"] += time.perf_counter() - t0
        if d.main and m["acc"] > best_val:
            best_val, best_step = m["acc"], step
            if writer is not None:
                save_ckpt("best", m)
        emit("eval", **row, best_val_acc=best_val)
        return m

    def save_ckpt(which: str, val: dict | None = None):
        t0 = time.perf_counter()
        meta = {
            "which": which,
            "step": step,
            "epoch": epoch,
            "run": run.name,
            "dataset": config.dataset,
            "val_acc": None if val is None else val["acc"],
        }
        if which == "last":  # optimizer state first, the model last: resume checks they agree
            _save_train_state(
                ckpt_dir / "train_state.safetensors",
                opt,
                sched,
                {
                    "step": step,
                    "epoch": epoch,
                    "step_in_epoch": step_in_epoch,
                    "best_val": None if best_val == -math.inf else best_val,
                    "best_step": best_step,
                },
            )
        lt.save(model, ckpt_dir / f"{which}.safetensors", metadata=meta)
        timings["checkpoint"] += time.perf_counter() - t0
        emit("checkpoint", which=which, step=step)

    # ---- loop
    state, message = "completed", ""
    last_val: dict | None = None
    stop_flag = torch.zeros(2)
    sampler = _Sampler(n_train, d, config.seed)
    if step == 0:
        snapshot(force=True)
    run_loss, run_correct, run_n = 0.0, 0.0, 0
    net.train()
    done = step >= total_steps
    while not done:
        batches = sampler.epoch_batches(epoch, per_rank)[:steps_per_epoch]
        aug_seed = config.seed * 100003 + epoch
        splits.train.seed(aug_seed)
        loader = torch.utils.data.DataLoader(
            splits.train,
            sampler=batches[step_in_epoch:],
            batch_size=None,  # the sampler yields whole index batches; the dataset slices them
            num_workers=config.num_workers,
            pin_memory=cuda,
            worker_init_fn=_reseed_worker(aug_seed) if config.num_workers else None,
        )
        for x, y in loader:
            t0 = time.perf_counter()
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = net(x)
            loss = loss_fn(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            loss_v = loss.item()
            want_stop = bool(
                (stop is not None and stop()) or (run is not None and run.stop_requested())
            )
            bad = not math.isfinite(loss_v)
            if d.on:
                stop_flag[0], stop_flag[1] = float(want_stop), float(bad)
                sf = stop_flag.to(device)
                dist.all_reduce(sf, op=dist.ReduceOp.MAX)
                want_stop, bad = bool(sf[0] > 0), bool(sf[1] > 0)
            if bad:
                state = "failed"
                kept = ckpt_dir is not None and (ckpt_dir / "last.safetensors").is_file()
                message = f"diverged at step {step + 1}: the loss is {loss_v} (not finite); " + (
                    "the last good checkpoint is kept" if kept else "no checkpoint was written yet"
                )
                timings["steps"] += time.perf_counter() - t0
                done = True
                break
            opt.step()
            if sched is not None and not isinstance(
                sched, torch.optim.lr_scheduler.ReduceLROnPlateau
            ):
                sched.step()
            step += 1
            step_in_epoch += 1
            if splits.task == "classification":
                run_correct += (out.argmax(1) == y).sum().item()
            run_loss += loss_v * len(y)
            run_n += len(y)
            timings["steps"] += time.perf_counter() - t0
            emit(
                "step",
                step=step,
                total_steps=total_steps,
                epoch=epoch,
                loss=loss_v,
                lr=opt.param_groups[0]["lr"],
            )

            if step % config.log_every == 0 or step_in_epoch == steps_per_epoch:
                row = {
                    "step": step,
                    "epoch": epoch,
                    "split": "train",
                    "loss": run_loss / run_n,
                    "acc": run_correct / run_n if splits.task == "classification" else None,
                    "lr": opt.param_groups[0]["lr"],
                    "time": time.time() - t_start,
                }
                if writer is not None:
                    writer.log_metrics(row)
                    writer.update_status(step=step, epoch=epoch)
                run_loss, run_correct, run_n = 0.0, 0.0, 0
            if config.spectra_every and step % config.spectra_every == 0:
                snapshot()
            flush_spectra()
            if config.eval_every and step % config.eval_every == 0:
                last_val = validate()
                net.train()
            if want_stop:
                state, message = "stopped", f"stopped at step {step} on request"
                done = True
                break
            if step >= total_steps:
                done = True
                break
        if state != "completed":
            break
        if step_in_epoch >= steps_per_epoch or done:  # end of an epoch (or of training)
            if not config.eval_every or step % config.eval_every != 0:
                last_val = validate()
                net.train()
            if step_in_epoch >= steps_per_epoch:
                epoch += 1
                step_in_epoch = 0
            if writer is not None:
                save_ckpt("last", last_val)
                writer.update_status(step=step, epoch=epoch)

    # ---- the end
    if state == "stopped" and writer is not None:
        save_ckpt("last", last_val)
    t0 = time.perf_counter()
    if state != "failed":
        snapshot(force=True)
    if spectra_worker is not None:
        spectra_worker.close()
        flush_spectra(wait=True)
    timings["spectra_end"] = time.perf_counter() - t0  # the last snapshot, waited for
    result: dict[str, Any] = {
        "state": state,
        "message": message,
        "step": step,
        "total_steps": total_steps,
        "epochs_done": epoch,
        "best_val_acc": None if best_val == -math.inf else best_val,
        "best_step": best_step,
        "val": last_val,
        "test": None,
        "test_last": None,
    }
    if d.main and state == "completed":
        t0 = time.perf_counter()
        result["test_last"] = evaluate(model, splits.test, device=device, amp=amp)
        best_file = ckpt_dir / "best.safetensors" if ckpt_dir is not None else None
        if best_file is not None and best_file.is_file():
            best_model = lt.load(str(best_file)).to(device)
            result["test"] = evaluate(best_model, splits.test, device=device, amp=amp)
        else:
            result["test"] = result["test_last"]
        timings["eval"] += time.perf_counter() - t0
        if writer is not None:
            for which in ("best", "last"):
                m = result["test" if which == "best" else "test_last"]
                writer.log_metrics(
                    {
                        "step": step,
                        "epoch": epoch,
                        "split": "test",
                        "which": which,
                        **m,
                        "lr": None,
                        "time": time.time() - t_start,
                    }
                )
    result["test_acc"] = result["test"]["acc"] if result["test"] else None
    result["time"] = time.time() - t_start
    result["timings"] = timings
    if writer is not None:
        from .runs import write_json

        write_json(run.path / "result.json", result)
        writer.update_status(
            state=state, message=message, step=step, epoch=epoch, ended=time.time()
        )
    emit("end", **{k: v for k, v in result.items()})
    if d.on:
        dist.barrier()
    result["model"] = model
    return result


def _reseed_worker(base: int):
    """Give each DataLoader worker its own augmentation stream."""

    def init(worker_id: int) -> None:
        info = torch.utils.data.get_worker_info()
        info.dataset.seed(base * 131 + worker_id + 1)

    return init


class _Sampler:
    """Per-epoch shuffled index batches; each process takes its own shard (like
    DistributedSampler: seeded by seed + epoch, padded so every shard has the same length)."""

    def __init__(self, n: int, d: _Dist, seed: int) -> None:
        self.n, self.d, self.seed = n, d, seed

    def epoch_batches(self, epoch: int, per_rank: int) -> list[torch.Tensor]:
        from torch.utils.data import DistributedSampler

        s = DistributedSampler(
            range(self.n), num_replicas=self.d.world, rank=self.d.rank, shuffle=True, seed=self.seed
        )
        s.set_epoch(epoch)
        return list(torch.tensor(list(iter(s)), dtype=torch.long).split(per_rank))


class _SpectraWorker:
    """Singular values computed on a helper thread, off the training loop's critical path
    (PyTorch releases the GIL inside the SVD, so it runs on another core). Results come back
    in order through :meth:`results` and are written by the training thread."""

    def __init__(self, depth: int = 2) -> None:
        import queue

        self._queue_mod = queue
        self.inbox: queue.Queue = queue.Queue(maxsize=depth)
        self.outbox: queue.Queue = queue.Queue()
        self.pending = 0
        self.thread = threading.Thread(target=self._loop, name="lorita-spectra", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.inbox.get()
            if item is None:
                return
            step, epoch, layers = item
            try:
                with torch.no_grad():
                    spec = {
                        n: torch.linalg.svdvals(layer_matrix(m).float().cpu())
                        for n, m in layers.items()
                    }
            except RuntimeError:  # e.g. a non-finite weight: nothing to show
                spec = None
            self.outbox.put((step, epoch, spec))

    def busy(self) -> bool:
        return self.inbox.full()

    def submit(self, item, wait: bool = False) -> bool:
        try:
            self.inbox.put(item, block=wait)
        except self._queue_mod.Full:
            return False
        self.pending += 1
        return True

    def results(self, wait: bool = False) -> list:
        out = []
        while self.pending:
            try:
                r = self.outbox.get(block=wait)
            except self._queue_mod.Empty:
                break
            self.pending -= 1
            if r[2] is not None:
                out.append(r)
        return out

    def close(self) -> None:
        self.inbox.put(None)
