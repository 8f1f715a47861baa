"""torch.distributed in one place: who am I, sums across processes, joining under torchrun."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.distributed as dist

from compo.core import commstats  # every collective goes through it: bytes are counted


def world_info() -> tuple[int, int]:
    """(world size, rank) of torch.distributed, or (1, 0) when it is not running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum over processes (identity on one process), communicated on ``device``; returns on ``t``'s device."""
    if world_info()[0] == 1:
        return t
    x = t.to(device)
    commstats.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.to(t.device)


def init_distributed(device: torch.device | None = None) -> bool:
    """Join the process group when launched by torchrun / accelerate launch: NCCL when the model is
    on a GPU (``device``; None: whenever CUDA exists), else gloo. A GPU process first selects its
    own GPU (``LOCAL_RANK``), so ``cuda`` means that one. True when this call made the group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def comm_device(device: torch.device) -> torch.device:
    """Where collectives run: the device itself under NCCL, the CPU under gloo."""
    return device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_votes(votes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank filled its own chunks (zeros elsewhere): a sum gives all votes everywhere."""
    buf = votes.to(device=comm_device(device), dtype=torch.int32)
    commstats.all_reduce(buf)
    return buf.to(device="cpu", dtype=torch.int8)


def broadcast_votes(votes: torch.Tensor, device: torch.device) -> torch.Tensor:
    if world_info()[0] == 1:
        return votes
    buf = votes.to(device=comm_device(device), dtype=torch.int32)
    commstats.broadcast(buf, src=0)
    return buf.to(device="cpu", dtype=torch.int8)


# ---------------------------------------------------------------- whole-run helpers (split, stage 1, run dir)


def barrier() -> None:
    """Wait for every process (no-op on one)."""
    if world_info()[0] > 1:
        commstats.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the body first (it may write what the others then read), then the others."""
    rank = world_info()[1]
    if rank != 0:
        barrier()
    yield
    if rank == 0:
        barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself on one process)."""
    if world_info()[0] == 1:
        return obj
    box = [obj]
    commstats.broadcast_object_list(box, src=0)
    return box[0]


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """``rank``'s contiguous share [lo, hi) of ``n`` units: sizes differ by at most one."""
    return n * rank // world, n * (rank + 1) // world


def gather_shards(local: torch.Tensor, sizes: list[int], device: torch.device) -> torch.Tensor:
    """Every rank's ``local`` (``sizes[r]`` rows on rank r) concatenated in rank order along dim 0,
    on every rank. Rows are copied, never summed, so the result is exactly what the ranks had."""
    world = world_info()[0]
    if world == 1:
        return local
    cap = max(sizes)
    buf = torch.zeros((cap, *local.shape[1:]), dtype=local.dtype, device=comm_device(device))
    buf[: len(local)] = local.to(buf.device)
    out = [torch.empty_like(buf) for _ in range(world)]
    commstats.all_gather(out, buf)
    return torch.cat([o[:s] for o, s in zip(out, sizes)]).to(local.device)


def leave_distributed() -> None:
    """Destroy the process group (what :func:`init_distributed` made)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Ranks:
    """The processes of a run as an oracle's collective step sees them (oracles.generation.RankGroup):
    world size, rank, and a sum of CPU tensors over all ranks, communicated on ``device``."""

    def __init__(self, world: int, rank: int, device: torch.device):
        self.world, self.rank, self.device = world, rank, comm_device(device)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t, self.device).cpu()
