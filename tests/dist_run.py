"""Run the `compo` CLI in W processes joined by a FILE rendezvous (gloo, no port), as torchrun
would run it: the helpers of the multi-process tests (test_stage1_distributed.py,
test_distributed_pipeline.py); ``start`` starts the ranks of every multi-process test."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
VOLATILE = ("wall_s", "wall_s_sessions", "perturbations_per_s", "prep_s")

# The ranks are forked from multiprocessing's fork server, which imports these once per pytest
# process, instead of each rank importing them into a fresh interpreter (mp.spawn): those imports
# were ~4 s of CPU a rank, most of a multi-process test's time (a 2-rank stage-2 test: 12 s -> 2 s).
# Only third-party modules: each rank still imports compo (and the test's module) itself, after the
# fork; importing these starts no thread, so forking the server is safe.
PRELOAD = ["torch", "torch.distributed", "transformers", "transformers.models.llama.modeling_llama",
           "safetensors.torch", "numba"]
multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)


def start(fn, args: tuple, nprocs: int) -> None:
    """``mp.spawn(fn, args, nprocs)``: ``fn(rank, *args)`` in ``nprocs`` new processes, joined; an
    exception or a kill in one surfaces as mp.spawn's (ProcessRaisedException / ProcessExitedException).
    Each rank runs with the caller's environment and working directory, as mp.spawn's would."""
    mp.start_processes(_as_the_caller, args=(fn, dict(os.environ), os.getcwd(), args), nprocs=nprocs, join=True,
                       start_method="forkserver")


def _as_the_caller(rank: int, fn, env: dict, cwd: str, args: tuple) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    fn(rank, *args)


def _worker(rank: int, world: int, rdzv: str, argv: list[str], fault: str | None, out: str) -> None:
    with open(f"{out}.{rank}", "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        _run(rank, world, rdzv, argv, fault)


def _run(rank: int, world: int, rdzv: str, argv: list[str], fault: str | None) -> None:
    os.chdir(ROOT)
    os.environ.pop("COMPO_FAULT", None)
    if fault:
        os.environ["COMPO_FAULT"] = fault
    os.environ["OMP_NUM_THREADS"] = "1"
    if world > 1:  # what torchrun sets; accelerate reads it (and finds the group already joined)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=rdzv, rank=rank, world_size=world)
    from compo.cli import main

    try:
        code = main(argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if code:
        raise SystemExit(code)


def spawn(world: int, argv: list[str], tmp: Path, fault: str | None = None) -> Path:
    """``compo <argv>`` in ``world`` new processes; a fault kill surfaces as mp's ProcessExitedException.
    Rank r's console output goes to ``<returned path>.r``."""
    n = len(list(tmp.glob("rdzv-*")))
    rdzv, out = tmp / f"rdzv-{n}", tmp / f"out-{n}"
    start(_worker, (world, f"file://{rdzv}", argv, fault, str(out)), world)
    return out


def output(out: Path, rank: int = 0) -> str:
    return Path(f"{out}.{rank}").read_text()


def argv(command: str, run: Path, sets: list[str], resume: bool = False, quiet: bool = True) -> list[str]:
    out = [command, "-c", "tests/tiny.yaml", "--run-dir", str(run)] + (["-q"] if quiet else [])
    for s in sets:
        out += ["--set", s]
    return out + (["--resume"] if resume else [])


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def summary(run: Path) -> dict:
    return _drop(json.loads((run / "summary.json").read_text()))


def _drop(obj):
    if isinstance(obj, dict):
        return {k: _drop(v) for k, v in obj.items() if k not in VOLATILE}
    return obj


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
