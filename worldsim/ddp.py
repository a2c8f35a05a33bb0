"""Distributed data parallel helpers for `worldsim train` (torchrun, one script for 1..N GPUs).

    torchrun --nproc_per_node=8 train.py --data data/maze --preset base --out runs/base
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 \\
             --nproc_per_node=8 train.py ...          (and --node_rank=1 on the second machine)

`Dist.from_env()` reads the variables torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK) and joins
the process group: nccl on CUDA, gloo on CPU. Without them it is a single process and every
collective below is a no-op, so the training loop has one code path.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib
import os

import torch
import torch.distributed as dist

from worldsim import model


@dataclasses.dataclass
class Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str = "auto", timeout_s: float = 1800.0) -> "Dist":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        dev = pick_device(device, local_rank)
        info = cls(world_size, rank, local_rank, local_world_size, dev, False)
        if world_size > 1:
            if dev.type == "cuda" and local_world_size > torch.cuda.device_count():
                # nccl refuses two ranks on one GPU, and only after the process group is up
                raise RuntimeError(
                    f"{local_world_size} ranks on this machine but {torch.cuda.device_count()} CUDA GPU(s): run "
                    f"torchrun --nproc_per_node={torch.cuda.device_count()}, or --device cpu for CPU ranks (gloo)")
            if not dist.is_initialized():
                # Before the process group exists: torch.distributed.nn (DDP imports it) binds group.WORLD
                # into ten functions' default arguments when first imported, so a group made before it
                # outlived destroy_process_group and gloo's worker threads were never joined; one still
                # dropping a finished barrier's tensors at interpreter exit took the GIL there ("terminate
                # called without an active exception", SIGABRT: about 1 torchrun in 10 on a loaded 2-core VM).
                importlib.import_module("torch.distributed.nn")  # (`import torch....` here would make torch local)
                backend = "nccl" if dev.type == "cuda" else "gloo"
                kwargs = {}
                if dev.type == "cuda":
                    kwargs["device_id"] = dev
                dist.init_process_group(
                    backend=backend, rank=rank, world_size=world_size,
                    timeout=datetime.timedelta(seconds=timeout_s), **kwargs,
                )
            info.initialized = True
        return info

    def barrier(self) -> None:
        if self.enabled:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def any_flags(self, *flags: bool) -> tuple[bool, ...]:
        """For each flag, True on every rank if it is true on any rank (Ctrl-C, a loss that is not
        finite: all ranks act together); one collective for all of them."""
        if not self.enabled:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v > 0) for v in t.tolist())

    def means(self, values: list[float]) -> list[float]:
        """Means of several Python floats over ranks in one collective (a metrics row: every rank
        must pass the same number of values, in the same order)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], device=self.device,
                         dtype=torch.float64 if self.device.type == "cpu" else torch.float32)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [v / self.world_size for v in t.tolist()]

    def max(self, value: float) -> float:
        """Largest value of a Python float over ranks (ranks agree on a wall-clock schedule)."""
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], device=self.device, dtype=torch.float64 if self.device.type == "cpu" else torch.float32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def close(self) -> None:
        if self.initialized and dist.is_initialized():
            import gc

            gc.collect()  # a DDP wrapper left in a reference cycle holds the group too
            dist.destroy_process_group()
            self.initialized = False


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto`: this rank's CUDA GPU where there is one, else the CPU (model.pick_device checks the name)."""
    dev = model.pick_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    return dev


def cpu_threads_per_rank(local_world_size: int) -> int:
    """All cores of the machine, shared evenly by the ranks running on it."""
    return max(1, model.usable_cores() // max(1, local_world_size))
