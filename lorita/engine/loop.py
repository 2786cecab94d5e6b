"""The training loop: ``train(config, run)``, readable top to bottom.

    train -> _open (claim the run folder) -> _setup (data, model, optimizer) -> _restore
          -> _loop (epochs of steps; validate, checkpoint) -> _finish (test, result.json)

Everything the loop changes lives in one :class:`Session` (the fixed set-up) and its
:class:`Counters` (what a checkpoint saves), passed to small functions. With a run folder the
loop writes metrics, spectra snapshots of every layer, a checkpoint at each epoch's end (one
transaction, see :mod:`lorita.engine.checkpoint`) and the best model by validation accuracy.
Under ``torchrun`` it trains with DistributedDataParallel and only rank 0 writes.

With ``plain_epochs`` the first epochs train the plain network; at the end of the last of them
the model is composed (balanced, so the same function) and gets a new optimizer and a schedule
over the remaining steps; the best model is chosen among the composed epochs only.

Resume is exact: a run killed at any instant and resumed from its last checkpoint ends with
the same numbers as the uninterrupted run (same seed, device and thread count). A run killed
before its first checkpoint starts over with the same config.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import data as data_mod
from ..checks import check_flag, is_int
from ..export import load as load_model_file
from ..io import fault
from ..runs import Run
from . import checkpoint
from .build import build_model, compose, load_splits, plain_phase
from .config import TrainConfig
from .devices import (
    DistInfo,
    all_ranks_sum,
    barrier,
    broadcast_from_main,
    init_distributed,
    resolve_device,
)
from .evaluate import evaluate
from .optim import loss_fn, main_output, make_optimizer, make_scheduler, per_step
from .spectra_worker import SpectraWorker

__all__ = ["Counters", "PeerLost", "Session", "check_batch", "train"]


@dataclass
class Counters:
    """Where the loop is; saved in every checkpoint and restored on resume."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_val: float | None = None
    best_step: int | None = None
    last_val: dict | None = None
    run_loss: float = 0.0  # training loss summed since the last metrics line
    run_correct: float = 0.0
    run_n: int = 0
    spectra_step: int | None = None  # step of the last snapshot taken


@dataclass
class Session:
    """The fixed set-up of one training run, plus its counters and outcome."""

    config: TrainConfig
    run: Run | None  # the run folder (every process); writing is rank 0's alone
    d: DistInfo
    device: torch.device
    amp: bool
    splits: data_mod.Splits
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    criterion: Callable
    per_rank: int
    steps_per_epoch: int
    total_steps: int
    callback: Callable[[dict], Any] | None = None
    stop: Callable[[], bool] | None = None
    net: nn.Module | None = None  # the model, wrapped in DDP under torchrun
    worker: SpectraWorker | None = None
    c: Counters = field(default_factory=Counters)
    state: str = "running"  # then completed, stopped or failed
    message: str = ""
    t_start: float = field(default_factory=time.time)
    timings: dict = field(
        default_factory=lambda: dict.fromkeys(
            ("steps", "eval", "spectra", "checkpoint", "spectra_end"), 0.0
        )
    )

    @property
    def writer(self) -> Run | None:
        return self.run if self.d.main else None

    @property
    def ckpt_dir(self) -> Path | None:
        return self.run.checkpoint_dir if self.run is not None else None


# --------------------------------------------------------------------------- entry point


def train(
    config: TrainConfig | dict,
    run: Run | None = None,
    callback: Callable[[dict], Any] | None = None,
    *,
    stop: Callable[[], bool] | None = None,
    resume: bool = False,
    threads: int | str | None = None,
    on_complete: Callable[[Run, data_mod.Splits], Any] | None = None,
) -> dict:
    """Train a composed model; write the run folder when ``run`` is given.

    Args:
        config: a TrainConfig or its dict.
        run: a :class:`lorita.runs.Run` to write (config.json, status.json, metrics.jsonl,
            spectra.jsonl, checkpoints/); None trains in memory only.
        callback: called with event dicts ({"event": "start" | "step" | "eval" | "spectra" |
            "checkpoint" | "compose" | "end", ...}), e.g. for a progress bar; "compose" comes
            once, when a run with ``plain_epochs`` composes its plain network.
        stop: polled after every step; True ends the run after that step with a checkpoint
            (state "stopped"). A STOP file in the run folder does the same.
        resume: continue ``run`` from its last checkpoint (from the start, same config, if it
            has none). A completed run is refused before anything is written.
        threads: CPU threads for this run (restored afterwards): an integer, None (leave
            PyTorch's setting) or "auto" (one thread for a small model on the CPU).
        on_complete: called as ``on_complete(run, splits)`` by the writing process once the
            run has completed (result and status written), with this process's threads and
            data; e.g. :func:`lorita.curves.prepare` (what ``lorita train`` does). An error
            there never changes the run: it is returned as ``on_complete_error``.

    Returns:
        dict with state ("completed", "stopped" or "failed"), message, step, best_val_acc,
        best_step, val (last validation metrics), test (of the best checkpoint), test_last,
        timings (seconds spent in steps, evaluation, spectra, checkpoints), and ``model``
        (the trained composed model, in memory, last state, in eval mode: ready to evaluate
        or cut; ``.train()`` it to train it further).

    Calls from several threads of one process run one after another: the seeds, random
    streams and thread count a run sets (and restores for its caller) are the process's own.
    """
    with _ONE_AT_A_TIME:
        return _train(config, run, callback, stop, resume, threads, on_complete)


#: held by a training for its whole call (re-entrant: ``on_complete`` may train again)
_ONE_AT_A_TIME = threading.RLock()


def _train(config, run, callback, stop, resume, threads, on_complete) -> dict:
    config = TrainConfig.from_dict(
        config if not isinstance(config, TrainConfig) else config.to_dict()
    )
    if run is not None and not isinstance(run, Run):
        raise ValueError(
            f"run: expected a Run (lorita.RunStore(folder).create(config)) or None, got "
            f"{type(run).__name__}"
        )
    _check_call(callback, stop, resume, threads, on_complete)  # before the run is claimed
    d = init_distributed(config.device)
    check_batch(config, d)  # before the run is claimed: a refusal leaves it as it is
    writer = run if (run is not None and d.main) else None
    if resume and run is None:
        raise ValueError("resume: needs a run folder")
    if resume and (bad := checkpoint.damaged(run.checkpoint_dir)) is not None:
        raise ValueError(  # starting over would delete it, and the best checkpoint with it
            f"resume: checkpoint {str(bad)!r} is damaged (a file is not the size it was written "
            "with) and no other is whole; nothing was changed: move that folder aside to train "
            "the run again from the start"
        )
    if writer is not None:
        _open(writer, config, resume)
    old_threads, old_rng = torch.get_num_threads(), _caller_rng()
    s = None
    try:
        last = checkpoint.latest(run.checkpoint_dir) if resume else None
        epoch = checkpoint.counters(last)["epoch"] if last is not None else 0
        s = _setup(config, run, d, callback, stop, threads, epoch=epoch, resume=last is not None)
        _restore(s, last)
        _loop(s)
        result = _finish(s)
        used = torch.get_num_threads()
    except BaseException as e:
        lost = d.on and isinstance(e, RuntimeError) and _peer_lost(e)
        if lost:  # one line, not the collective's own text (a traceback through the step)
            name = f" {run.name}" if run is not None else ""
            e = PeerLost(
                f"another process of this run (torchrun, {d.world} in all) ended before it; "
                f"resume the run with --resume{name}"
            )
        if writer is not None:
            _mark_failed(writer, e)
        if lost:
            raise e from None
        raise
    finally:
        torch.set_num_threads(old_threads)
        _set_caller_rng(old_rng)  # training seeds them: the caller's streams go on as they were
        if s is not None and s.worker is not None:
            s.worker.close()
        if writer is not None:
            writer.stop_heartbeat()
            writer.release()
    if on_complete is not None and writer is not None and result["state"] == "completed":
        _after(on_complete, writer, s, result, used)
    return result


class PeerLost(RuntimeError):
    """A distributed run lost one of its processes (killed, crashed) mid-training."""


def _peer_lost(e: RuntimeError) -> bool:
    """Whether a collective failed because another process went away (gloo, NCCL)."""
    text = str(e)
    return any(
        k in text
        for k in ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                  "NCCL communicator was aborted", "ProcessGroupGloo", "gloo")
    )  # fmt: skip


def _open(run: Run, config: TrainConfig, resume: bool) -> None:
    """Claim the run folder for this process (refusing a completed run on resume)."""
    run.hold()
    try:
        st = run.raw_status()
        if resume and st.get("state") == "completed":
            raise ValueError(
                f"resume: run {run.name!r} already completed; nothing to resume "
                "(its result is kept as it is)"
            )
        if st.get("pid") != os.getpid() and run.is_alive():
            raise ValueError(f"run {run.name!r} is still {st.get('state')} (pid {st.get('pid')})")
        changed = run.data_changed() if resume else None
        if changed:
            raise ValueError(f"resume: {changed}; train a new run on the folder as it is now")
    except BaseException:
        run.release()
        raise
    run.clean_temp()
    if not resume:  # this process's attempt (the folder may have been made by another)
        earlier = st.get("state") != "queued" or any(run.checkpoint_dir.glob("*"))
        said = {"message": "starting over"} if earlier else {}
        run.mark_owner(state="queued", ended=None, **said)
        if earlier:  # what that attempt wrote goes first, then the config comes: killed
            fault("start_over")  # between the steps, the folder holds one attempt's files
            run.start_over()  # (resumed as it was, or started over), never a mix of two
        run.write_config(config.to_dict())
    run.start_heartbeat()
    fault("open")


def _mark_failed(run: Run, e: BaseException) -> None:
    """Say in the run's status why it ended; if even that cannot be written (a full disk, the
    folder gone), the error raised stays the one that ended the run. A KeyboardInterrupt (a
    notebook's stop button) stops the run, as Ctrl-C does on the command line: it reads as
    stopped, not failed, and goes on from its last checkpoint with ``resume=True``."""
    try:
        if run.raw_status().get("state") in ("queued", "running"):
            if isinstance(e, KeyboardInterrupt):
                state, msg = (
                    "stopped",
                    (
                        "interrupted (KeyboardInterrupt); train(config, run, resume=True) goes on "
                        "from its last checkpoint"
                    ),
                )
            else:
                state, msg = "failed", f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            run.update_status(state=state, message=msg[:500], ended=time.time())
    except OSError:
        pass


def _check_call(callback, stop, resume, threads, on_complete) -> None:
    """train()'s own arguments, each refused by name (a typo must not end a run as failed)."""
    for name, fn in (("callback", callback), ("stop", stop), ("on_complete", on_complete)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{name}: expected a function or None, got {type(fn).__name__}")
    check_flag(resume, "resume")
    if threads is not None and threads != "auto" and (not is_int(threads) or threads < 1):
        raise ValueError(
            f"threads: {threads!r} is not allowed; expected None, 'auto' or an integer >= 1"
        )


def check_batch(config: TrainConfig, d: DistInfo) -> None:
    """Under torchrun (``d``: :func:`~lorita.engine.devices.dist_info`) the batch must split
    evenly between the processes (a ValueError naming batch_size)."""
    if d.on:
        cuda = resolve_device(config.device, d.local_rank).type == "cuda"
        config.batch_per_process(cuda, d.world)


def _set_threads(threads, model: nn.Module, device: torch.device, d: DistInfo) -> None:
    if threads is None:
        return
    if threads == "auto":
        small = sum(p.numel() for p in model.parameters()) < 1_000_000
        if device.type == "cpu" and small and not d.on:
            torch.set_num_threads(1)
        return
    torch.set_num_threads(int(threads))


# --------------------------------------------------------------------------- set-up


def _say_if_world_changed(before, now: int) -> None:
    """A resume in another number of processes trains on (each step sees other batches) but
    does not end as the uninterrupted run would: say so."""
    if isinstance(before, int) and not isinstance(before, bool) and before != now:
        warnings.warn(
            f"resume: the run trained in {before} process(es) and goes on in {now}; each step "
            "now sees other batches, so it will not end as an uninterrupted run would",
            stacklevel=3,
        )


def _caller_rng() -> tuple:
    """The global random generators' states (Python's, NumPy's, torch's CPU and CUDA)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_caller_rng(state: tuple) -> None:
    py, np_state, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(np_state)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _setup(config, run, d, callback, stop, threads, *, epoch: int, resume: bool) -> Session:
    """Seed everything, load the data, build the model (plain or composed, as at ``epoch``),
    optimizer and schedule. A resumed run's checkpoint replaces every weight: its start file
    (init_from) is not read again (it may be gone since, with the run it came from)."""
    device = resolve_device(config.device, d.local_rank)
    cuda = device.type == "cuda"
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    splits = load_splits(config)
    model = _place(build_model(config, splits, load_init=not resume, epoch=epoch), device)
    _set_threads(threads, model, device, d)
    per_rank = config.batch_per_process(cuda, d.world)
    # the ragged last batch is dropped; counted in global batches, so that K processes take
    # the steps (and the samples of each) that one process takes
    steps_per_epoch = max(1, len(splits.train) // (per_rank * d.world))
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    switch = config.plain_epochs * steps_per_epoch if config.n_factors > 1 else 0
    if switch >= total_steps:
        raise ValueError(
            f"plain_epochs: {config.plain_epochs} plain epochs take {switch} steps, but the run "
            f"ends at step {total_steps} (max_steps {config.max_steps}): nothing would be "
            "composed; lower plain_epochs or raise max_steps"
        )
    # the plain epochs' schedule ends at the switch; the composed one runs from there
    plain = plain_phase(config, epoch)
    steps = switch if plain else total_steps - switch
    opt, sched = _optimizer(config, model, steps, composed=config.n_factors > 1 and not plain)
    return Session(
        config=config,
        run=run,
        d=d,
        device=device,
        amp=config.amp == "bf16" or (config.amp == "auto" and cuda),
        splits=splits,
        model=model,
        opt=opt,
        sched=sched,
        criterion=loss_fn(splits.task, config.label_smoothing),
        per_rank=per_rank,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        callback=callback,
        stop=stop,
        worker=SpectraWorker() if d.main else None,
    )


def _place(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device``; convolutions in channels-last memory on CUDA."""
    model = model.to(device)
    if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    return model


def _optimizer(config: TrainConfig, model: nn.Module, steps: int, *, composed: bool):
    """The optimizer of ``model``'s parameters and its schedule over ``steps`` steps; a
    ``composed`` model (N > 1, past its plain epochs) trains at ``lr x composed_lr_scale``."""
    lr = config.lr * (config.composed_lr_scale if composed else 1.0)
    opt = make_optimizer(
        config.optimizer, model.parameters(), lr, config.weight_decay, config.momentum
    )
    return opt, make_scheduler(config.schedule, opt, steps, config.warmup)


def _wrap(s: Session) -> nn.Module:
    """The module the steps call: the model, or under torchrun the model in DDP (which
    broadcasts rank 0's weights)."""
    if not s.d.on:
        return s.model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [s.device.index] if s.device.type == "cuda" else None
    return DDP(s.model, device_ids=ids)


def _emit(s: Session, event: str, **kw) -> None:
    if s.callback is not None and s.d.main:
        s.callback({"event": event, **kw})


def _restore(s: Session, last: Path | None) -> None:
    """Load the ``last`` checkpoint (a resume; None: start over), then mark the run running."""
    if last is not None:
        counters, rng = checkpoint.load(last, s.model, s.opt, s.sched)
        s.c = Counters(**counters)
        _set_rng(rng, s)
        if s.writer is not None:
            _say_if_world_changed(s.run.raw_status().get("world_size"), s.d.world)
            checkpoint.sweep(s.ckpt_dir)
            checkpoint.prune(s.ckpt_dir, keep=last)
            checkpoint.restore_best(s.ckpt_dir, last)
            s.writer.truncate_logs(s.c.step)
    elif s.writer is not None:
        s.writer.start_over()
        s.writer.record_data()  # what the splits were drawn from, to tell a change later
    barrier(s.d)  # rank 0 has finished rewriting the run folder
    s.net = _wrap(s)
    if s.writer is not None:
        s.writer.update_status(
            state="running", message="", started=time.time(), ended=None,
            step=s.c.step, total_steps=s.total_steps, epoch=s.c.epoch,
            device=str(s.device), world_size=s.d.world,
            note=getattr(s.model, "lorita_init_note", None),
        )  # fmt: skip
    _emit(
        s, "start", total_steps=s.total_steps, steps_per_epoch=s.steps_per_epoch,
        device=str(s.device), step=s.c.step, run=str(s.run.path) if s.run else None,
        note=getattr(s.model, "lorita_init_note", None), task=s.splits.task,
    )  # fmt: skip


def _rng_state(s: Session) -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if s.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(s.device)
    gen = getattr(s.splits.train, "generator", None)
    if isinstance(gen, torch.Generator):
        rng["augment"] = gen.get_state()
    return rng


def _set_rng(rng: dict[str, torch.Tensor], s: Session) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and s.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], s.device)
    s.splits.train.seed(_aug_seed(s))
    gen = getattr(s.splits.train, "generator", None)
    if "augment" in rng and isinstance(gen, torch.Generator) and s.c.step_in_epoch:
        gen.set_state(rng["augment"])  # resumed mid-epoch: the stream where it stopped


def _aug_seed(s: Session) -> int:
    return s.config.seed * 100003 + s.c.epoch


# --------------------------------------------------------------------------- the loop


def _loop(s: Session) -> None:
    """Epochs of steps until the last step, a stop request or a non-finite loss."""
    if s.c.step == 0:
        _snapshot(s, force=True)
    s.net.train()
    if s.c.step >= s.total_steps:
        s.state = "completed"
    resumed_mid_epoch = s.c.step_in_epoch > 0
    while s.state == "running":
        if not resumed_mid_epoch:
            s.splits.train.seed(_aug_seed(s))
        resumed_mid_epoch = False
        for x, y in _epoch_loader(s):
            _step(s, x, y)
            if s.state != "running":
                break
        if s.state == "failed":
            return
        if s.state == "stopped":
            _checkpoint(s)
            if s.writer is not None:
                s.writer.consume_stop()
            return
        _end_of_epoch(s)


def _epoch_loader(s: Session):
    """This process's batches of the current epoch, from where the epoch stands."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(
        range(len(s.splits.train)), num_replicas=s.d.world, rank=s.d.rank, shuffle=True,
        seed=s.config.seed,
    )  # fmt: skip
    sampler.set_epoch(s.c.epoch)
    order = torch.tensor(list(iter(sampler)), dtype=torch.long)
    batches = list(order.split(s.per_rank))[: s.steps_per_epoch]
    aug_seed, workers = _aug_seed(s), s.config.num_workers
    return torch.utils.data.DataLoader(
        s.splits.train,
        sampler=batches[s.c.step_in_epoch :],
        batch_size=None,  # the sampler yields whole index batches; the dataset slices them
        num_workers=workers,
        pin_memory=s.device.type == "cuda",
        worker_init_fn=_WorkerSeed(aug_seed) if workers else None,
    )


class _WorkerSeed:
    """Give each DataLoader worker its own augmentation stream."""

    def __init__(self, base: int) -> None:
        self.base = base

    def __call__(self, worker_id: int) -> None:
        info = torch.utils.data.get_worker_info()
        info.dataset.seed(self.base * 131 + worker_id + 1)


def _step(s: Session, x: torch.Tensor, y: torch.Tensor) -> None:
    """One optimizer step, then its bookkeeping (logs, snapshots, validation, stop)."""
    t0 = time.perf_counter()
    x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
    if s.device.type == "cuda" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.amp):
        out = s.net(x)
    loss = s.criterion(out, y)
    s.opt.zero_grad(set_to_none=True)
    loss.backward()
    if s.config.grad_clip:
        nn.utils.clip_grad_norm_(s.model.parameters(), s.config.grad_clip)
    loss_v = loss.item()
    correct = 0.0
    if s.splits.task == "classification":
        correct = float((main_output(out).argmax(1) == y).sum().item())
    want_stop = bool((s.stop is not None and s.stop()) or (s.run and s.run.stop_requested()))
    # one collective a step: a stop or a non-finite loss in any process, and the step's loss
    # and correct answers summed over every process's share of the batch (the training-loss
    # line is the whole batch's, as in one process, on every process alike)
    stop_f, bad_f, loss_sum, correct, n = all_ranks_sum(
        [float(want_stop), float(not math.isfinite(loss_v)), loss_v * len(y), correct,
         float(len(y))], s.d, s.device,
    )  # fmt: skip
    if s.d.on:
        loss_v = loss_sum / n  # the whole batch's mean loss, as one process has it
    if bad_f > 0:
        _diverged(s, loss_v)
        s.timings["steps"] += time.perf_counter() - t0
        return
    s.opt.step()
    if per_step(s.sched):
        s.sched.step()
    c = s.c
    c.step += 1
    c.step_in_epoch += 1
    c.run_correct += correct
    c.run_loss += loss_sum
    c.run_n += int(n)
    s.timings["steps"] += time.perf_counter() - t0
    lr = s.opt.param_groups[0]["lr"]
    _emit(s, "step", step=c.step, total_steps=s.total_steps, epoch=c.epoch, loss=loss_v, lr=lr)
    fault("step")
    _after_step(s)
    if stop_f > 0:
        s.state, s.message = "stopped", f"stopped at step {c.step} on request"
    elif c.step >= s.total_steps or c.step_in_epoch >= s.steps_per_epoch:
        s.state = "epoch_end"


def _diverged(s: Session, loss_v: float) -> None:
    kept = s.ckpt_dir is not None and checkpoint.latest(s.ckpt_dir) is not None
    s.state = "failed"
    s.message = f"diverged at step {s.c.step + 1}: the loss is {loss_v} (not finite); " + (
        "the last good checkpoint is kept" if kept else "no checkpoint was written yet"
    )


def _after_step(s: Session) -> None:
    """The training-loss line, spectra snapshots and the every-k-steps validation."""
    c, cfg = s.c, s.config
    if c.step % cfg.log_every == 0 or c.step_in_epoch == s.steps_per_epoch:
        row = {
            "step": c.step,
            "epoch": c.epoch,
            "split": "train",
            "loss": c.run_loss / c.run_n,
            "acc": c.run_correct / c.run_n if s.splits.task == "classification" else None,
            "lr": s.opt.param_groups[0]["lr"],
            "time": time.time() - s.t_start,
        }
        if s.writer is not None:
            s.writer.log_metrics(row)
            s.writer.update_status(step=c.step, epoch=c.epoch)
        c.run_loss, c.run_correct, c.run_n = 0.0, 0.0, 0
    if cfg.spectra_every and c.step % cfg.spectra_every == 0:
        _snapshot(s)
    _flush_spectra(s)
    if cfg.eval_every and c.step % cfg.eval_every == 0:
        _validate(s)
        s.net.train()


def _end_of_epoch(s: Session) -> None:
    """Validate (unless just done), move to the next epoch, write a checkpoint."""
    c, cfg = s.c, s.config
    if not cfg.eval_every or c.step % cfg.eval_every != 0:
        _validate(s)
        s.net.train()
    if c.step_in_epoch >= s.steps_per_epoch:
        c.epoch += 1
        c.step_in_epoch = 0
    s.state = "completed" if c.step >= s.total_steps else "running"
    if s.state == "running" and plain_phase(cfg, c.epoch - 1) and not plain_phase(cfg, c.epoch):
        _compose(s)
    _checkpoint(s)
    if s.writer is not None:
        s.writer.update_status(step=c.step, epoch=c.epoch)


def _compose(s: Session) -> None:
    """The plain epochs are over: the same function written as N factors (balanced), a new
    optimizer and schedule over the remaining steps. The best model is chosen among the
    composed epochs only (the plain one's best is dropped): the run's model is a composed one,
    trained with weight decay on its factors."""
    c, cfg = s.c, s.config
    s.model = _place(compose(s.model, cfg, init="balanced"), s.device)
    s.opt, s.sched = _optimizer(cfg, s.model, s.total_steps - c.step, composed=True)
    s.net = _wrap(s)
    s.net.train()
    c.best_val, c.best_step = None, None
    if s.writer is not None:
        checkpoint.drop_best(s.ckpt_dir)
    fault("compose")
    _emit(s, "compose", step=c.step, epoch=c.epoch, n_factors=cfg.n_factors)


# --------------------------------------------------------------------------- pieces


def _validate(s: Session) -> dict:
    """Evaluate on validation (rank 0), share the result, track the best model."""
    t0 = time.perf_counter()
    vals = [0.0, 0.0]
    if s.d.main:
        m = evaluate(s.model, s.splits.val, device=s.device, amp=s.amp)
        vals = [m["loss"], m["acc"]]
    loss, acc = broadcast_from_main(vals, s.d, s.device)
    m = {"loss": loss, "acc": acc}
    if s.sched is not None and not per_step(s.sched):
        s.sched.step(m["acc"])
    c = s.c
    row = {"step": c.step, "epoch": c.epoch, "split": "val", **m}
    row.update(lr=s.opt.param_groups[0]["lr"], time=time.time() - s.t_start)
    if s.writer is not None:
        s.writer.log_metrics(row)
    s.timings["eval"] += time.perf_counter() - t0
    c.last_val = m
    if s.d.main and (c.best_val is None or m["acc"] > c.best_val):
        c.best_val, c.best_step = m["acc"], c.step
        if s.writer is not None:
            t0 = time.perf_counter()
            checkpoint.publish_best(s.ckpt_dir, s.model, _meta(s, "best"))
            s.timings["checkpoint"] += time.perf_counter() - t0
    fault("validate")
    _emit(s, "eval", **row, best_val_acc=c.best_val)
    return m


def _meta(s: Session, which: str) -> dict:
    val = s.c.last_val
    return {
        "which": which,
        "step": s.c.step,
        "epoch": s.c.epoch,
        "run": s.run.name if s.run is not None else None,
        "dataset": s.config.dataset,
        "val_acc": None if val is None else val["acc"],
        "preprocess": s.splits.preprocess(),  # how to feed it, for an export without the data
    }


def _checkpoint(s: Session) -> None:
    """One checkpoint transaction (rank 0, run folder only); the spectra taken so far are
    written first, so the folder matches the checkpoint."""
    if s.writer is None:
        return
    t0 = time.perf_counter()
    if s.state in ("completed", "stopped") and s.c.spectra_step != s.c.step:
        _snapshot(s, force=True)  # the final snapshot belongs to the final checkpoint
    _flush_spectra(s, wait=True)
    checkpoint.save(
        s.ckpt_dir, s.model, s.opt, s.sched,
        counters=asdict(s.c), rng=_rng_state(s), meta=_meta(s, "last"),
    )  # fmt: skip
    s.timings["checkpoint"] += time.perf_counter() - t0
    _emit(s, "checkpoint", which="last", step=s.c.step)


def _snapshot(s: Session, force: bool = False) -> None:
    """Hand copies of every layer to the spectra worker; skipped while it is busy or when
    snapshots exceed their share of the time (``spectra_budget``), unless forced."""
    if s.worker is None:
        return
    t = s.timings
    if not force and (
        t["spectra"] > s.config.spectra_budget * max(t["steps"], 1e-9) or s.worker.busy()
    ):
        return
    t0 = time.perf_counter()
    s.worker.submit(s.model, s.c.step, s.c.epoch)
    s.c.spectra_step = s.c.step
    t["spectra"] += time.perf_counter() - t0


def _round_list(t: torch.Tensor) -> list[float]:
    return [float(f"{v:.6g}") for v in t.tolist()]


def _flush_spectra(s: Session, wait: bool = False) -> None:
    if s.worker is None:
        return
    for st, ep, spec in s.worker.results(wait=wait):
        if s.writer is not None:
            layers = {k: _round_list(v) for k, v in spec.items()}
            s.writer.log_spectra({"step": st, "epoch": ep, "layers": layers})
        _emit(s, "spectra", step=st, epoch=ep, layers=spec)


# --------------------------------------------------------------------------- the end


def _test(s: Session) -> tuple[dict, dict]:
    """Test metrics of the best checkpoint and of the last model (rank 0)."""
    t0 = time.perf_counter()
    last = evaluate(s.model, s.splits.test, device=s.device, amp=s.amp)
    best_file = s.ckpt_dir / "best.safetensors" if s.ckpt_dir is not None else None
    best = last
    if s.writer is not None and best_file.is_file():
        best_model = load_model_file(str(best_file)).to(s.device)
        best = evaluate(best_model, s.splits.test, device=s.device, amp=s.amp)
    s.timings["eval"] += time.perf_counter() - t0
    return best, last


def _after(on_complete, run: Run, s: Session, result: dict, threads: int) -> None:
    """``on_complete(run, splits)`` with the threads training used, after the run is done and
    released; its error is reported in ``result`` (the run stays completed)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        on_complete(run, s.splits)
    except Exception as e:  # noqa: BLE001 - derived work must not turn a finished run failed
        result["on_complete_error"] = f"{type(e).__name__}: {e}"
    finally:
        torch.set_num_threads(old)


def _finish(s: Session) -> dict:
    """The final snapshot, the test pass, result.json and the final status."""
    t0 = time.perf_counter()
    if s.state != "failed" and s.c.spectra_step != s.c.step:
        _snapshot(s, force=True)
    _flush_spectra(s, wait=True)
    s.timings["spectra_end"] = time.perf_counter() - t0  # the last snapshot, waited for
    c = s.c
    result: dict[str, Any] = {
        "state": s.state, "message": s.message, "step": c.step, "total_steps": s.total_steps,
        "epochs_done": c.epoch, "best_val_acc": c.best_val, "best_step": c.best_step,
        "val": c.last_val, "test": None, "test_last": None,
    }  # fmt: skip
    if s.d.main and s.state == "completed":
        result["test"], result["test_last"] = _test(s)
        fault("test")
        for which in ("best", "last"):
            m = result["test" if which == "best" else "test_last"]
            row = {"step": c.step, "epoch": c.epoch, "split": "test", "which": which, **m}
            if s.writer is not None:
                s.writer.log_metrics({**row, "lr": None, "time": time.time() - s.t_start})
    result["test_acc"] = result["test"]["acc"] if result["test"] else None
    result["time"] = time.time() - s.t_start
    result["timings"] = s.timings
    if s.writer is not None:
        s.writer.write_result(result)
        fault("result")
        s.writer.update_status(
            state=s.state, message=s.message, step=c.step, epoch=c.epoch, ended=time.time()
        )
    _emit(s, "end", **result)
    barrier(s.d)
    result["model"] = s.model.eval()  # ready to evaluate: BatchNorm's running stats, no dropout
    return result
