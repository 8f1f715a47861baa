"""Counted collectives (compo.core.commstats): every collective compo makes goes through the wrappers,
they count the bytes of the tensors really passed, and a stage-2 step passes 4*m + 4 bytes per
rank whatever the size V*H of the output layer (scripts/bench_dist.py measures the same way)."""

from __future__ import annotations

import os
import pickle
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dist_run import start

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

COLLECTIVE = re.compile(r"\b(?:dist|torch\.distributed)\.(all_reduce|all_gather\w*|broadcast\w*|barrier|reduce\w*|"
                        r"gather|scatter\w*|all_to_all\w*|send|recv|isend|irecv)\s*\(")


def test_compo_calls_collectives_only_through_the_counting_wrappers():
    offenders = []
    for pkg in ("compo", "oracles"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path.name == "commstats.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if COLLECTIVE.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == [], "call compo.core.commstats instead (its bytes are counted):\n" + "\n".join(offenders)
    assert COLLECTIVE.search("    dist.all_reduce(x, op=SUM)") and COLLECTIVE.search("dist.broadcast_object_list(o)")


def _wrappers(rank: int, world: int, rdzv: str, out: str) -> None:
    from compo.core import commstats

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        got = {}
        t = torch.arange(5, dtype=torch.int32) + rank
        commstats.all_reduce(t)
        got["sum"] = t.tolist()
        b = torch.full((3,), float(rank + 1), dtype=torch.float64)
        commstats.broadcast(b, src=1)
        got["bcast"] = b.tolist()
        parts = [torch.empty(2, dtype=torch.int64) for _ in range(world)]
        commstats.all_gather(parts, torch.tensor([rank, 10 * rank]))
        got["gather"] = [p.tolist() for p in parts]
        commstats.barrier()
        got["objects"] = commstats.all_gather_object({"rank": rank, "pad": "x" * (5 * rank)})
        objs = [None, None] if rank else [{"a": 1}, "two"]
        commstats.broadcast_object_list(objs, src=0)
        got["bobj"] = objs
        got["counts"] = commstats.snapshot()
        torch.save(got, os.path.join(out, f"wrap{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_wrappers_do_the_collective_and_count_the_tensors_passed(tmp_path):
    start(_wrappers, (2, str(tmp_path / "rdzv"), str(tmp_path)), 2)
    big = len(pickle.dumps({"rank": 1, "pad": "xxxxx"}))  # payloads are padded to the longest
    small = len(pickle.dumps([{"a": 1}, "two"]))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"wrap{rank}.pt", weights_only=False)
        assert got["sum"] == [1, 3, 5, 7, 9] and got["bcast"] == [2.0, 2.0, 2.0]
        assert got["gather"] == [[0, 0], [1, 10]]
        assert got["objects"] == [{"rank": 0, "pad": ""}, {"rank": 1, "pad": "xxxxx"}]
        assert got["bobj"] == [{"a": 1}, "two"]
        assert got["counts"] == {
            "all_reduce": {"calls": 1, "bytes": 5 * 4},
            "broadcast": {"calls": 3, "bytes": 3 * 8 + 8 + small},  # + the object list: size, payload
            "all_gather": {"calls": 3, "bytes": 2 * 8 + 8 + big},  # + the objects: size, padded payload
            "barrier": {"calls": 1, "bytes": 0},
        }


def test_a_stage2_step_passes_4m_plus_4_bytes_per_rank_whatever_v_times_h():
    from bench_dist import measure

    m, steps = 24, 2
    small = {"hidden": 32, "layers": 1, "extra_vocab": 0}
    large = {"hidden": 64, "layers": 1, "extra_vocab": 70}
    runs = [measure(2, spec, m=m, steps=steps, chunk=5) for spec in (small, large)]  # 5 chunks: ranks take 3 and 2
    assert runs[1]["V"] * runs[1]["H"] > 3 * runs[0]["V"] * runs[0]["H"]
    for run in runs:
        assert run["bytes_per_step"] == [[4 * m + 4] * steps] * 2  # votes (int32) + the acceptance verdict
        assert run["ops_per_step"] == {"all_reduce": {"calls": 1, "bytes": 4 * m}, "broadcast": {"calls": 1, "bytes": 4}}
    one = measure(1, small, m=m, steps=steps, chunk=5)
    assert one["bytes_per_step"] == [[0] * steps] and one["ops_per_step"] == {}
