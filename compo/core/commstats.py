"""Counted collectives: every torch.distributed collective compo makes goes through here.

Each wrapper adds the size of the tensors this rank hands to torch.distributed (numel x
element size, the padded payload for objects) to a per-operation counter before the call, so
``scripts/bench_dist.py`` and the tests read bytes that were really passed, not estimates.
Object collectives are built here from tensor ones (pickle -> uint8 tensor), so their bytes are
counted the same way and they run on NCCL too. A barrier passes no tensor: 0 bytes, 1 call.
"""

from __future__ import annotations

import pickle
import threading
from typing import Any

import torch
import torch.distributed as dist

_LOCK = threading.Lock()
_COUNTS: dict[str, list[int]] = {}  # op -> [calls, bytes]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _record(op: str, n: int) -> None:
    with _LOCK:
        c = _COUNTS.setdefault(op, [0, 0])
        c[0] += 1
        c[1] += n


def snapshot() -> dict[str, dict[str, int]]:
    """{op: {"calls": n, "bytes": b}} counted so far in this process."""
    with _LOCK:
        return {op: {"calls": c, "bytes": b} for op, (c, b) in _COUNTS.items()}


def total_bytes(snap: dict | None = None) -> int:
    return sum(v["bytes"] for v in (snapshot() if snap is None else snap).values())


def diff(after: dict, before: dict) -> dict[str, dict[str, int]]:
    """What was counted between two snapshots (ops with no calls left out)."""
    out = {}
    for op, v in after.items():
        b = before.get(op, {"calls": 0, "bytes": 0})
        if v["calls"] != b["calls"]:
            out[op] = {"calls": v["calls"] - b["calls"], "bytes": v["bytes"] - b["bytes"]}
    return out


def reset() -> None:
    with _LOCK:
        _COUNTS.clear()


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
    _record("all_reduce", nbytes(t))
    dist.all_reduce(t, op=op)


def broadcast(t: torch.Tensor, src: int = 0) -> None:
    _record("broadcast", nbytes(t))
    dist.broadcast(t, src=src)


def all_gather(out: list[torch.Tensor], t: torch.Tensor) -> None:
    _record("all_gather", nbytes(t))
    dist.all_gather(out, t)


def barrier() -> None:
    _record("barrier", 0)
    dist.barrier()


def _object_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object_list(objs: list[Any], src: int = 0) -> None:
    """``torch.distributed.broadcast_object_list``'s contract (fills ``objs`` in place on every
    rank), sent as one int64 size and one uint8 payload, both counted."""
    device, rank = _object_device(), dist.get_rank()
    payload = pickle.dumps(list(objs)) if rank == src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    broadcast(size, src)
    buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    if rank == src:
        buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    broadcast(buf, src)
    if rank != src:
        got = pickle.loads(buf.cpu().numpy().tobytes())
        if len(got) != len(objs):
            raise ValueError(f"broadcast_object_list: rank {src} sent {len(got)} objects, this rank expects {len(objs)}")
        objs[:] = got


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order: an int64 size per rank, then payloads padded to the
    largest, all counted."""
    device, world = _object_device(), dist.get_world_size()
    payload = pickle.dumps(obj)
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    all_gather(sizes, size)
    n = max(int(s.item()) for s in sizes)
    buf = torch.zeros(n, dtype=torch.uint8, device=device)
    buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)  # pickles are never empty
    bufs = [torch.empty_like(buf) for _ in range(world)]
    all_gather(bufs, buf)
    return [pickle.loads(b[: int(s.item())].cpu().numpy().tobytes()) for b, s in zip(bufs, sizes)]
