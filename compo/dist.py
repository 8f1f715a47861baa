"""torch.distributed in one place: who am I, sums across processes, joining under torchrun."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


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
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.to(t.device)


def init_distributed() -> None:
    """Join the process group when launched by torchrun (NCCL on GPU, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def comm_device(device: torch.device) -> torch.device:
    """Where collectives run: the device itself under NCCL, the CPU under gloo."""
    return device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_votes(votes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank filled its own chunks (zeros elsewhere): a sum gives all votes everywhere."""
    buf = votes.to(device=comm_device(device), dtype=torch.int32)
    dist.all_reduce(buf)
    return buf.to(device="cpu", dtype=torch.int8)


def broadcast_votes(votes: torch.Tensor, device: torch.device) -> torch.Tensor:
    if world_info()[0] == 1:
        return votes
    buf = votes.to(device=comm_device(device), dtype=torch.int32)
    dist.broadcast(buf, src=0)
    return buf.to(device="cpu", dtype=torch.int8)
