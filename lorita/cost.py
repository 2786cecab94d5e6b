"""What a deployable model costs: parameters, FLOPs (counted by PyTorch's FlopCounterMode, per
layer) and measured latency. A composed model is merged first: it deploys as plain layers."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .convert import composed_layers, iter_layers, merge_model

__all__ = ["Cost", "count_cost", "measure_latency"]


@dataclass
class Cost:
    """Parameters and FLOPs of one forward pass (a multiply-add counts as 2 FLOPs)."""

    params: int
    flops: int
    per_layer: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"params": self.params, "flops": self.flops, "per_layer": self.per_layer}


def _deployable(model: nn.Module) -> nn.Module:
    return merge_model(model) if composed_layers(model) else model


def count_cost(model: nn.Module, example_input: Tensor) -> Cost:
    """Count parameters and FLOPs of ``model`` on ``example_input`` (e.g. one batch).

    Composed layers are merged first (their factors are a training device, not a deployed
    cost). ``per_layer`` maps each Linear/Conv2d/low-rank layer name to its params and FLOPs.
    """
    deploy = _deployable(model)
    was_training = deploy.training
    deploy.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            deploy(example_input)
    finally:
        deploy.train(was_training)
    counts = counter.get_flop_counts()
    prefix = type(deploy).__name__
    per_layer = {}
    for name, module in iter_layers(deploy):
        ops = counts.get(f"{prefix}.{name}", {})
        per_layer[name] = {
            "params": sum(p.numel() for p in module.parameters()),
            "flops": int(sum(ops.values())),
        }
    params = sum(p.numel() for p in deploy.parameters())
    return Cost(params=params, flops=int(counter.get_total_flops()), per_layer=per_layer)


def measure_latency(
    model: nn.Module, example_input: Tensor, *, repeats: int = 20, warmup: int = 3
) -> float:
    """Median wall time in seconds of one forward pass of the deployable model (no grad)."""
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats!r}")
    deploy = _deployable(model)
    was_training = deploy.training
    deploy.eval()
    times = []
    try:
        with torch.no_grad():
            for i in range(warmup + repeats):
                if example_input.is_cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                deploy(example_input)
                if example_input.is_cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        deploy.train(was_training)
    return statistics.median(times)
