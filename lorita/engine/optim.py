"""Optimizers, schedules and losses shared by training and fine-tuning.

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
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "AUX_WEIGHT",
    "loss_fn",
    "main_output",
    "make_optimizer",
    "make_scheduler",
    "per_step",
    "task_of",
]


def make_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float):
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


def make_scheduler(name: str, opt, total_steps: int, warmup: float = 0.0):
    """Cosine and step schedules advance per step; plateau per validation pass.

    ``warmup`` > 0: the first ``round(warmup * total_steps)`` steps raise the learning rate
    linearly from lr/100 to lr, then the schedule runs over the remaining steps (not with
    plateau). A product of N factors moves N times as fast as one matrix under the same step,
    so a composed model's first Adam steps are the largest it takes; the warm-up tames them.
    """
    w = min(round(warmup * total_steps), total_steps - 1) if name != "plateau" else 0
    if w <= 0:
        return _schedule(name, opt, total_steps)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=w)
    rest = _schedule(name, opt, total_steps - w)
    if rest is None:
        return warm
    return torch.optim.lr_scheduler.SequentialLR(opt, [warm, rest], milestones=[w])


def _schedule(name: str, opt, total_steps: int):
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    if name == "step":
        miles = sorted({max(1, int(total_steps * 0.5)), max(1, int(total_steps * 0.75))})
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=miles, gamma=0.1)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=10)
    return None


def per_step(sched) -> bool:
    """Whether ``sched`` advances after every optimizer step (all but plateau)."""
    return sched is not None and not isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)


#: weight of each auxiliary output in the training loss (GoogLeNet's side classifiers, 0.3)
AUX_WEIGHT = 0.3
_MAIN_KEYS = ("logits", "out", "output")


def _split_output(out) -> tuple[torch.Tensor, list[torch.Tensor]]:
    if torch.is_tensor(out):
        return out, []
    if isinstance(out, dict) and out:
        key = next((k for k in _MAIN_KEYS if k in out), next(iter(out)))
        rest = [v for k, v in out.items() if k != key]
        return out[key], [v for v in rest if torch.is_tensor(v)]
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0], [v for v in out[1:] if torch.is_tensor(v)]
    raise ValueError(
        f"model output: expected a tensor of logits (or a tuple or dict with them first), "
        f"got {type(out).__name__}"
    )


def main_output(out) -> torch.Tensor:
    """The logits of a model's output: the tensor itself; the first of a tuple (GoogLeNet's
    and Inception's outputs in train mode: logits, then their side classifiers); a dict's
    "logits" / "out" / "output" entry, else its first."""
    return _split_output(out)[0]


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.float(), y.float())


class _CrossEntropy:
    def __init__(self, label_smoothing: float) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float(), y, label_smoothing=self.label_smoothing)


class _WithAux:
    """A loss over the main output plus :data:`AUX_WEIGHT` times each auxiliary one."""

    def __init__(self, base: Callable) -> None:
        self.base = base

    def __call__(self, out, y: torch.Tensor) -> torch.Tensor:
        main, aux = _split_output(out)
        loss = self.base(main, y)
        for a in aux:
            if a.shape == main.shape:  # side classifiers; other extras are not outputs to fit
                loss = loss + AUX_WEIGHT * self.base(a, y)
        return loss


def loss_fn(task: str, label_smoothing: float = 0.0) -> Callable:
    """The training loss: MSE for regression, cross-entropy (with smoothing) otherwise; for a
    model with side classifiers (a tuple or dict output) the main output's loss plus
    :data:`AUX_WEIGHT` times each side classifier's."""
    return _WithAux(_mse if task == "regression" else _CrossEntropy(label_smoothing))


def task_of(dataset) -> str:
    y = getattr(dataset, "y", None)
    return "regression" if y is not None and y.is_floating_point() else "classification"
