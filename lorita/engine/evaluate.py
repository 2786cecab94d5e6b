"""Evaluation and fine-tuning of a model on a dataset split.

``evaluate(model, split)`` gives the mean loss and accuracy (R² for regression);
``finetune(model, splits, epochs=...)`` trains a (truncated) model a little more and returns
the copy with the best validation accuracy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import data as data_mod
from ..checks import check_flag, check_module, is_int, is_num
from ..clone import clone_model, evaluating
from ..inputs import refused
from .config import OPTIMIZERS
from .optim import loss_fn, main_output, make_optimizer, task_of

__all__ = ["check_batched", "evaluate", "finetune"]


def check_batched(dataset, field: str) -> None:
    """A dataset of lorita's kind: indexed by a tensor of positions, giving ``(x, y)``."""
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")) or isinstance(
        dataset, (str, bytes, data_mod.Splits)
    ):
        raise ValueError(
            f"{field}: expected one split of the data (splits.val, a lorita.data.TensorDataset), "
            f"got {type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise ValueError(f"{field}: it holds no examples")
    if isinstance(dataset, data_mod.TensorDataset):
        return  # (read as is: a probe would draw from its augmentation stream)
    try:  # one batch of two, as every reader here takes them
        x, y = dataset[torch.arange(min(2, len(dataset)))]
        ok = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and len(x) == len(y)
        why = "" if ok else "it did not give an (inputs, targets) pair of tensors"
    except Exception as e:  # a dataset read one example at a time (dataset[3]), a list, ...
        why = f"{type(e).__name__}: {e}"
    if why:
        raise ValueError(
            f"{field}: expected a dataset that takes a tensor of positions and gives a batch "
            f"(x, y), as lorita.data.TensorDataset(x, y) or torch's TensorDataset do; "
            f"{type(dataset).__name__}[tensor([0, 1])] failed ({why})"[:400]
        )


def _check_batch_size(batch_size) -> None:
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size: {batch_size!r} is not allowed; expected an integer >= 1")


def as_device(device) -> torch.device:
    """``device`` as a torch.device; a ValueError naming it for text torch does not read."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device: {device!r} is not allowed; expected cpu, cuda, cuda:<index> or mps"
        ) from None


def _check_finetune_options(seed, weight_decay, label_smoothing, callback) -> None:
    if not is_int(seed):
        raise ValueError(f"seed: {seed!r} is not allowed; expected an integer")
    if not is_num(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay: {weight_decay!r} is not allowed; expected a number >= 0")
    if not is_num(label_smoothing) or not 0 <= label_smoothing < 1:
        raise ValueError(
            f"label_smoothing: {label_smoothing!r} is not allowed; expected a number in [0, 1)"
        )
    if callback is not None and not callable(callback):
        raise ValueError(f"callback: expected a function or None, got {type(callback).__name__}")


def _check_finetune(model, splits, epochs, lr, optimizer, batch_size) -> None:
    check_module(model)
    if not isinstance(splits, data_mod.Splits):
        raise ValueError(
            f"splits: expected the train/val/test Splits (lorita.load_splits(config)), got "
            f"{type(splits).__name__}"
        )
    check_batched(splits.train, "splits.train")
    check_batched(splits.val, "splits.val")
    if not is_int(epochs) or epochs < 0:
        raise ValueError(f"epochs: {epochs!r} is not allowed; expected an integer >= 0")
    _check_batch_size(batch_size)
    if epochs and not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model: no parameter requires grad (every weight is frozen)")
    if not is_num(lr) or lr <= 0:
        raise ValueError(f"lr: {lr!r} is not allowed; expected a number > 0")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: {optimizer!r} is not allowed; expected one of {OPTIMIZERS}")


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
    if not callable(model):  # (a module, or a module-like callable: an ONNX session's wrapper)
        raise ValueError(f"model: expected a model to call, got {type(model).__name__}")
    check_batched(dataset, "dataset")
    _check_batch_size(batch_size)
    check_flag(amp, "amp")
    device = as_device(device)
    task = task_of(dataset)
    loss_sum, correct, n = 0.0, 0.0, 0
    ys, sse = [], 0.0
    with evaluating(model):
        for x, y in _batches(dataset, batch_size):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp), refused("dataset"):
                out = main_output(model(x))
            out = out.float()
            if out.dim() != 2 or len(out) != len(y):
                raise ValueError(
                    f"dataset: the model refused it: for inputs {tuple(x.shape)} it returned "
                    f"{tuple(out.shape)}, expected (batch, outputs)"
                )
            if task != "regression" and out.shape[1] <= int(y.max()):
                raise ValueError(
                    f"dataset: it has class {int(y.max())}, the model only {out.shape[1]} "
                    "outputs (build it with num_classes= the dataset's)"
                )
            if task == "regression":
                loss_sum += F.mse_loss(out, y, reduction="sum").item() / y.shape[1]
                sse += (out - y).pow(2).sum().item()
                ys.append(y.cpu())
            else:
                loss_sum += F.cross_entropy(out, y, reduction="sum").item()
                correct += (out.argmax(1) == y).sum().item()
            n += len(y)
    if n == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    if task == "regression":
        yy = torch.cat(ys)
        sst = (yy - yy.mean(0)).pow(2).sum().item()
        return {"loss": loss_sum / n, "acc": 1.0 - sse / sst if sst > 0 else 0.0}
    return {"loss": loss_sum / n, "acc": correct / n}


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
    _check_finetune(model, splits, epochs, lr, optimizer, batch_size)
    _check_finetune_options(seed, weight_decay, label_smoothing, callback)
    epochs, batch_size, seed = int(epochs), int(batch_size), int(seed)  # (NumPy's too)
    device = as_device(device)
    work = clone_model(model).to(device)
    best = evaluate(work, splits.val, device=device)["acc"]
    best_state = copy.deepcopy(work.state_dict())
    if epochs == 0:
        return work.cpu().eval()
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(optimizer, work.parameters(), lr, weight_decay, 0.9)
    steps = epochs * max(1, len(splits.train) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    criterion = loss_fn(splits.task, label_smoothing)
    for ep in range(epochs):
        work.train()
        if hasattr(splits.train, "seed"):  # lorita's datasets reseed their augmentation
            splits.train.seed(seed * 1000 + ep)
        for idx in data_mod.batch_indices(
            len(splits.train), batch_size, generator=gen, drop_last=True
        ):
            x, y = splits.train[idx]
            loss = criterion(work(x.to(device)), y.to(device))
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
