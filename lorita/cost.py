"""What a deployable model costs: parameters, FLOPs (counted by PyTorch's FlopCounterMode, per
layer) and measured latency (whole model at batch 1 and 64, and per layer). A composed model is
merged first: it deploys as plain layers. Latency is measured on the model as it deploys
(:func:`lorita.convert.deploy_model`: BatchNorm folded into the layer before it and, for a
convolutional model, channels_last memory format), so an original and its cut are always timed
the same way."""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from . import inputs
from .checks import check_module, is_int
from .clone import clone_model, evaluating, unwrap
from .convert import (
    bake_parametrizations,
    composed_layers,
    deploy_input,
    deploy_model,
    iter_layers,
    merge_model,
)
from .kinds import layer_table, median_seconds, paired_medians

__all__ = [
    "Cost",
    "count_cost",
    "attention_projection_flops",
    "measure_latency",
    "latency_profile",
    "paired_latency",
    "busy_note",
    "timing_threads",
    "deployed_forward",
    "layer_latency",
]

#: The batch sizes :func:`latency_profile` measures by default.
LATENCY_BATCHES = (1, 64)


@dataclass
class Cost:
    """Parameters and FLOPs of one forward pass (a multiply-add counts as 2 FLOPs)."""

    params: int
    flops: int
    per_layer: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"params": self.params, "flops": self.flops, "per_layer": self.per_layer}


def _deployable(model: nn.Module) -> nn.Module:
    """Merged, and with every parametrization (weight_norm's g and v) baked into the weight it
    computes, as :func:`lorita.convert.deploy_model` deploys it: its parameters are counted."""
    model = unwrap(model)
    merged = bool(composed_layers(model))
    model = merge_model(model) if merged else model
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        model = model if merged else clone_model(model)  # (a merged model is a copy already)
        bake_parametrizations(model)
    return model


_ATTENTION_LOCK = threading.Lock()
_attention_counting = {"depth": 0, "was": True}  # counters open now; the setting before them


@contextlib.contextmanager
def _counted_attention() -> Iterator[None]:
    """Attention computed by its plain ops while FLOPs are counted. In eval mode without
    gradients nn.MultiheadAttention (and nn.TransformerEncoderLayer) run one fused kernel
    that FlopCounterMode counts as 0 FLOPs: a ViT's q, k, v and output projections would be
    missing from the total, and a cut that leaves them dense would look cheaper than it runs.

    The switch is process-wide: counts running at once in several threads (app sessions)
    share it, and the last one out restores the setting found by the first one in.
    """
    with _ATTENTION_LOCK:
        if _attention_counting["depth"] == 0:
            _attention_counting["was"] = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        _attention_counting["depth"] += 1
    try:
        yield
    finally:
        with _ATTENTION_LOCK:
            _attention_counting["depth"] -= 1
            if _attention_counting["depth"] == 0:
                torch.backends.mha.set_fastpath_enabled(_attention_counting["was"])


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)  # (shapes) the two products q k^T and (.) v


def _rnn_layer_flops(x, w_ih, w_hh, *args, out_shape=None, **kwargs) -> int:
    """One direction of one nn.LSTM layer on the CPU: both gate products at every step."""
    steps = math.prod(x) // max(1, x[-1])  # (time, batch, features)
    return 2 * steps * (math.prod(w_ih) + math.prod(w_hh))


def _trilinear_flops(i1, i2, i3, expand1, expand2, expand3, *args, out_shape=None, **kw) -> int:
    """nn.Bilinear's product: one multiply-add per point of the three inputs' broadcast grid."""
    grid = None
    for shape, expand in ((i1, expand1), (i2, expand2), (i3, expand3)):
        full = list(shape)
        for d in sorted(expand):
            full.insert(d, 1)
        grid = full if grid is None else [max(a, b) for a, b in zip(grid, full)]
    return 2 * math.prod(grid or [0])


#: Ops FlopCounterMode has no formula for: scaled_dot_product_attention on the CPU runs this
#: kernel (a ViT's attention products, nn.MultiheadAttention with need_weights=False), an
#: nn.LSTM runs one mkldnn_rnn_layer per layer and direction, nn.Bilinear runs _trilinear.
_EXTRA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten.mkldnn_rnn_layer: _rnn_layer_flops,
    torch.ops.aten._trilinear: _trilinear_flops,
}


def _count(deploy: nn.Module, example_input: inputs.Example) -> FlopCounterMode:
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS)
    with evaluating(deploy), torch.no_grad(), _counted_attention(), counter, inputs.refused():
        inputs.call(deploy, example_input)
    return counter


def attention_projection_flops(
    model: nn.Module, example_input: inputs.Example, names: list[str]
) -> dict[str, int]:
    """FLOPs of the q, k and v projections of each named attention layer on one forward pass
    (2 x E x E per token of query, key and value, over every call), as FlopCounterMode counts
    them, and of its output projection under ``NAME.out_proj`` (2 x E x E per query token).
    A rank cut scales these and not the rest of the attention (its products), all of which
    :func:`count_cost` puts under the attention's name when nn.MultiheadAttention reads the
    out_proj's weight itself."""
    found = dict.fromkeys(names, 0) | {f"{n}.out_proj": 0 for n in names}

    def counter(name: str):
        def pre(module, args, kwargs):
            given = list(args[:3]) + [kwargs.get(k) for k in ("query", "key", "value")[len(args) :]]
            tokens = [t.numel() // module.embed_dim for t in given[:3] if t is not None]
            found[name] += 2 * module.embed_dim * module.embed_dim * sum(tokens)
            found[f"{name}.out_proj"] += 2 * module.embed_dim * module.embed_dim * tokens[0]

        return pre

    handles = [
        model.get_submodule(n).register_forward_pre_hook(counter(n), with_kwargs=True)
        for n in names
    ]
    try:
        with evaluating(model), torch.no_grad(), inputs.refused():
            inputs.call(model, inputs.check_example(example_input))
    finally:
        for h in handles:
            h.remove()
    return found


def count_cost(model: nn.Module, example_input: inputs.Example) -> Cost:
    """Count parameters and FLOPs of ``model`` on ``example_input`` (e.g. one batch).

    Composed layers are merged first (their factors are a training device, not a deployed
    cost). ``per_layer`` maps each Linear/Conv2d/low-rank layer name to its params and FLOPs
    (a parameter that several layers share counts once, in the first of them, so the layers'
    params add up to no more than ``params``).
    ``example_input``: a tensor, or a tuple of tensors for a model with several inputs.
    """
    check_module(model)
    example_input = inputs.check_example(example_input)
    deploy = _deployable(model)
    try:
        counter = _count(deploy, example_input)
    except AssertionError:
        # FlopCounterMode's module tracker hooks the gradient of every module input that
        # requires it and fails on a parameter view passed as one (timm's CaiT and PiT pass
        # their expanded class tokens): count on a copy whose parameters need no gradient
        deploy = clone_model(deploy).requires_grad_(False)
        counter = _count(deploy, example_input)
    counts = counter.get_flop_counts()
    prefix = type(deploy).__name__
    per_layer = {}
    seen: set[int] = set()
    for name, module in iter_layers(deploy):
        ops = counts.get(f"{prefix}.{name}", {})
        own = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in own)
        per_layer[name] = {
            "params": sum(p.numel() for p in own),
            "flops": int(sum(ops.values())),
        }
    params = sum(p.numel() for p in deploy.parameters())
    return Cost(params=params, flops=int(counter.get_total_flops()), per_layer=per_layer)


def _check_repeats(repeats, warmup) -> None:
    for name, v, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if not is_int(v) or not low <= v <= 10_000:
            raise ValueError(f"{name}: expected an integer in [{low}, 10000], got {v!r}")


def _timed(example_input: inputs.Example):
    """A wall-clock timer around a forward call (synchronising CUDA when it is used)."""
    cuda = inputs.is_cuda(example_input)

    def run(fn):
        if cuda:
            torch.cuda.synchronize()
        fn()
        if cuda:
            torch.cuda.synchronize()

    return run


def _forward(deploy: nn.Module, x: inputs.Example) -> Callable[[], None]:
    """One timed forward pass of a deployed model on ``x`` (put in its memory format), without
    gradients, synchronising CUDA when it is used."""
    x = deploy_input(deploy, x)
    run = _timed(x)

    def forward() -> None:
        with torch.no_grad():
            run(lambda: inputs.call(deploy, x))

    return forward


def _time(deploy: nn.Module, x: inputs.Example, repeats: int, warmup: int) -> float:
    return median_seconds(_forward(deploy, x), repeats=repeats, warmup=warmup)


def measure_latency(
    model: nn.Module,
    example_input: inputs.Example,
    *,
    repeats: int = 20,
    warmup: int = 3,
    fold_bn: bool = True,
    channels_last: bool | None = None,
) -> float:
    """Median wall time in seconds of one forward pass of the deployable model (no grad).

    The model is timed as it deploys (:func:`lorita.convert.deploy_model`): a copy, composed
    layers merged, eval mode, BatchNorm folded (``fold_bn``) and channels_last memory format
    for a convolutional model (``channels_last=None``: decided so; True / False to force)."""
    check_module(model)
    _check_repeats(repeats, warmup)
    example_input = inputs.check_example(example_input)
    deploy = deploy_model(model, example_input, fold_bn=fold_bn, channels_last=channels_last)
    with inputs.refused():
        return _time(deploy, example_input, repeats, warmup)


def latency_profile(
    model: nn.Module,
    example_input: inputs.Example,
    *,
    batches: tuple[int, ...] = LATENCY_BATCHES,
    repeats: int = 20,
    warmup: int = 3,
    fold_bn: bool = True,
    channels_last: bool | None = None,
) -> dict[int, float]:
    """``{batch: median seconds}`` of the deployable model on ``example_input``'s first sample
    repeated to each batch size (default 1 and 64); deployed as :func:`measure_latency` says.
    What is timed at each batch size is :func:`deployed_forward`'s call."""
    return paired_latency(
        [model], example_input, batches=batches, repeats=repeats, warmup=warmup,
        fold_bn=fold_bn, channels_last=channels_last,
    )[0]  # fmt: skip


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def busy_note() -> str | None:
    """A warning for timings taken now, when other work keeps this machine's cores busy (the
    1-minute load average above three quarters of the cores this process may use): a forward
    pass then waits for its threads to be scheduled, so its time (and a ratio of two models'
    times) says more about the load than about the model. None when the machine is quiet."""
    if not hasattr(os, "getloadavg"):
        return None
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = usable_cores()
    if load <= max(1.0, 0.75 * cores):
        return None
    return (
        f"the machine was busy while timing (load average {load:.1f} on {cores} "
        f"core{'' if cores == 1 else 's'}; a training run, say): these latencies are noisy, "
        "measure again when it is idle to compare"
    )


@contextlib.contextmanager
def timing_threads() -> Iterator[str | None]:
    """Latency timed inside this block meets the machine as it is: on a quiet machine with
    torch's threads as set (yields None); on a busy one (:func:`busy_note`) with one thread,
    restored after, yielding the note that says so, and the caller keeps the fastest of the
    repeats (``paired_latency(..., fastest=True)``). Threads that wait at every layer for a
    busy core slow a model with more layers more (a cut's thin two-layer form), and a longer
    call is more often cut short by the scheduler: so timed, a ratio of two models' times
    holds under load."""
    note = busy_note()
    if note is None:
        yield None
        return
    kept = "the fastest of the repeats kept (the least disturbed)"
    threads = torch.get_num_threads()
    if threads == 1:
        yield f"{note}; {kept}"
        return
    torch.set_num_threads(1)
    try:
        yield (
            f"{note}; timed on one thread instead of {threads}, so that waiting for a busy core "
            f"does not slow the model with more layers more, and {kept}"
        )
    finally:
        torch.set_num_threads(threads)


def paired_latency(
    models: list[nn.Module],
    example_input: inputs.Example,
    *,
    batches: tuple[int, ...] = LATENCY_BATCHES,
    repeats: int = 20,
    warmup: int = 3,
    fold_bn: bool = True,
    channels_last: bool | None = None,
    fastest: bool = False,
) -> list[dict[int, float]]:
    """:func:`latency_profile` of several models (an original and its cuts), timed together:
    at each batch size every model runs once in turn per round, so work that shares the
    machine (a training run on the same cores) slows them alike and their ratio holds where
    separate measurements, seconds apart, can differ several-fold. One ``{batch: median
    seconds}`` per model, in the order given; ``fastest``: the shortest call instead of the
    median (what :func:`timing_threads` says to use on a busy machine)."""
    if not models:
        raise ValueError("models: expected at least one model to time")
    for m in models:
        check_module(m)
    _check_repeats(repeats, warmup)
    forwards = [
        deployed_forward(m, example_input, batches=batches, fold_bn=fold_bn,
                         channels_last=channels_last)
        for m in models
    ]  # fmt: skip
    out: list[dict[int, float]] = [{} for _ in models]
    with inputs.refused():
        for b in forwards[0]:
            times = paired_medians(
                [f[b] for f in forwards], repeats=repeats, warmup=warmup, fastest=fastest
            )
            for profile, t in zip(out, times, strict=True):
                profile[b] = t
    return out


def deployed_forward(
    model: nn.Module,
    example_input: inputs.Example,
    *,
    batches: tuple[int, ...] = LATENCY_BATCHES,
    fold_bn: bool = True,
    channels_last: bool | None = None,
) -> dict[int, Callable[[], None]]:
    """``{batch: forward}``: ``forward()`` runs one forward pass of the model as it deploys
    (deployed once, as :func:`measure_latency` says) on ``example_input``'s first sample
    repeated to that batch size, in the deployed memory format, without gradients (and
    synchronising CUDA when it is used). This is the call :func:`latency_profile` times; time
    it yourself to measure several models together, e.g. a cut model paired with the model it
    came from, round by round (:func:`lorita.kinds.paired_medians`)."""
    example_input = inputs.check_example(example_input)
    for b in batches:
        if not is_int(b) or not 1 <= b <= 4096:
            raise ValueError(f"batches: expected integers in [1, 4096], got {b!r}")
    deploy = deploy_model(model, example_input, fold_bn=fold_bn, channels_last=channels_last)
    return {b: _forward(deploy, inputs.rows(example_input, b)) for b in batches}


def layer_latency(
    model: nn.Module,
    example_input: inputs.Example,
    *,
    repeats: int = 10,
    warmup: int = 2,
    batch: int | None = None,
    fold_bn: bool = True,
    channels_last: bool | None = None,
) -> dict[str, float]:
    """Where the time goes: ``{layer name: median seconds}`` spent inside each layer (Linear,
    Conv2d, grouped and depthwise conv, low-rank, attention) over one forward pass of the
    deployable model (deployed as :func:`measure_latency` says), summed over its calls (0.0
    for a layer that did not run).

    ``batch``: time ``example_input``'s first sample repeated to that many rows (default: the
    input as given). A cut model and the model it came from share layer names (a thin layer
    keeps the name of the layer it replaces), so their dicts compare key by key; the whole
    pass (:func:`measure_latency`) minus the sum is the time spent outside these layers.
    """
    check_module(model)
    _check_repeats(repeats, warmup)
    example_input = inputs.check_example(example_input)
    if batch is not None:
        if not is_int(batch) or not 1 <= batch <= 4096:
            raise ValueError(f"batch: expected an integer in [1, 4096], got {batch!r}")
        example_input = inputs.rows(example_input, batch)
    deploy = deploy_model(model, example_input, fold_bn=fold_bn, channels_last=channels_last)
    x = deploy_input(deploy, example_input)
    layers = {e.name: e.module for e in layer_table(deploy)}
    samples: dict[str, list[float]] = {n: [] for n in layers}
    pass_total: dict[str, float] = {}
    starts: dict[str, list[float]] = {n: [] for n in layers}
    handles = []
    for name, module in layers.items():
        handles.append(module.register_forward_pre_hook(_start_hook(starts[name])))
        handles.append(module.register_forward_hook(_stop_hook(starts[name], pass_total, name)))
    try:
        with torch.no_grad(), inputs.refused():
            for i in range(warmup + repeats):
                pass_total.clear()
                inputs.call(deploy, x)
                if i >= warmup:
                    for n in layers:
                        samples[n].append(pass_total.get(n, 0.0))
    finally:
        for h in handles:
            h.remove()
    return {n: statistics.median(v) for n, v in samples.items()}


def _start_hook(stack: list[float]):
    def hook(module, args):
        stack.append(time.perf_counter())

    return hook


def _stop_hook(stack: list[float], total: dict[str, float], name: str):
    def hook(module, args, out):
        total[name] = total.get(name, 0.0) + time.perf_counter() - stack.pop()

    return hook
