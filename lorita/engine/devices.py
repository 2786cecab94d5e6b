"""Devices and distributed set-up: which accelerators exist, which one a run uses, torchrun.

``available_devices()`` is the one device probe (the CLI and the app list it);
``resolve_device("auto")`` picks cuda (this process's GPU under torchrun), then mps, then cpu.
Under ``torchrun`` :func:`init_distributed` starts the process group (nccl on CUDA, gloo on
CPU) from the environment variables torchrun sets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["DistInfo", "available_devices", "dist_info", "init_distributed", "resolve_device"]


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
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ValueError(
            f"device: {name!r} asked for but only {torch.cuda.device_count()} GPU(s) are visible"
        )
    return torch.device(name)


@dataclass(frozen=True)
class DistInfo:
    """World size and this process's ranks (1, 0, 0 without torchrun)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def on(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


#: what to do about torchrun's variables found in a bad state
_TORCHRUN = (
    "these are set by torchrun (torchrun --nproc_per_node=K -m lorita train ...); "
    "start the command with torchrun, or unset them for one process"
)


def _env_int(name: str, default: int, lo: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or value < lo:
        raise ValueError(
            f"environment variable {name}: {raw[:40]!r} is not allowed; expected an integer "
            f">= {lo}; {_TORCHRUN}"
        )
    return value


def dist_info() -> DistInfo:
    """World size and ranks from torchrun's environment variables, checked: a half-set or
    contradictory set (RANK without WORLD_SIZE, a rank outside the world, a world without
    its rendezvous address) is a ValueError naming the variable, not a hang or a traceback."""
    world = _env_int("WORLD_SIZE", 1, 1)
    rank = _env_int("RANK", 0, 0)
    local = _env_int("LOCAL_RANK", 0, 0) if world > 1 else 0  # (-1: "not distributed", by some)
    if rank >= world:
        said = os.environ.get("WORLD_SIZE", "not set")
        raise ValueError(
            f"environment variable RANK: {rank} is not below WORLD_SIZE ({said}); {_TORCHRUN}"
        )
    if world > 1:
        for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise ValueError(
                    f"environment variable {name}: not set, but WORLD_SIZE is {world}; {_TORCHRUN}"
                )
    return DistInfo(world, rank, local)


def init_distributed(device_hint: str = "auto") -> DistInfo:
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


def all_ranks_sum(values: list[float], d: DistInfo, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over every process (the values themselves alone)."""
    if not d.on:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def broadcast_from_main(values: list[float], d: DistInfo, device: torch.device) -> list[float]:
    """Rank 0's ``values`` on every process."""
    if not d.on:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return t.cpu().tolist()


def barrier(d: DistInfo) -> None:
    if d.on:
        import torch.distributed as dist

        dist.barrier()
