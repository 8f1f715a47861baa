#!/usr/bin/env python
"""Stage 2 across processes: seconds per step and the bytes each rank hands to collectives.

Spawns 1 and 2 gloo processes on CPU (``--worlds``), each running ``--steps`` ComPO steps
(likelihood oracle, acceptance check on, every step proposes) on the same model and pairs, and
reads the bytes from ``compo.core.commstats``, which counts the tensors passed to every collective
compo makes (counted, not estimated). Prints one JSON object:

* per run: ``world``, ``V``, ``H``, ``m``, ``steps``; ``step_s`` (per step, the slowest rank's
  wall seconds) and ``step_s_median``; ``bytes_per_step`` (per rank, per step) and
  ``ops_per_step`` (rank 0's first step: calls and bytes per operation);
* ``formula_bytes``: compo's prediction for one rank's step, ``4*m`` (votes, int32) ``+ 4``
  (the acceptance verdict); ``head_file_bytes``: ``V*H*4``, one fp32 head file, which is what
  the official code copies between nodes (by scp) instead.

    python scripts/bench_dist.py                              # toy model: H 48, V of the toy tokenizer
    python scripts/bench_dist.py --hidden 64 --extra-vocab 200 --m 800
    python scripts/bench_dist.py --model .models/smollm2-135m --m 1600 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _model(spec: dict):
    """(model, tokenizer) for a spec: {"path": DIR} or {"hidden": H, "extra_vocab": n} (a random toy Llama)."""
    from compo.data import toy
    from compo.config import ToyModelConfig

    if spec.get("path"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return AutoModelForCausalLM.from_pretrained(spec["path"]).eval(), AutoTokenizer.from_pretrained(spec["path"])
    tok = toy.build_tokenizer()
    cfg = ToyModelConfig(hidden_size=spec.get("hidden", 48), num_layers=spec.get("layers", 2), num_heads=4)
    return toy.build_model(cfg, len(tok) + spec.get("extra_vocab", 0), seed=0), tok


def _worker(rank: int, world: int, rdzv: str, out: str, spec: dict, m: int, steps: int, chunk: int,
            threads: int) -> None:
    from compo.core import commstats
    from compo.data import toy
    from compo.config import ToyDataConfig, ZOConfig
    from compo.data.encode import encode_rows, pad_id_of
    from compo.core.rundir import RunDir
    from compo.zo.trainer import ZOTrainer
    from oracles import LikelihoodOracle

    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        model, tok = _model(spec)
        rows = toy.toy_dataset(ToyDataConfig(n_train=8, n_eval=1), seed=0)[0]
        items = encode_rows(rows, tok, 32, 16).items
        cfg = ZOConfig(m=m, chunk_size=chunk, radius=5e-3, sparsity="top_fraction", rho=0.05, skip_threshold=0.0,
                       gamma=0.1, max_steps=steps, checkpoint_every=0, acceptance_check=True)
        tr = ZOTrainer(model, cfg, 0, LikelihoodOracle(), pad_id=pad_id_of(tok))
        v, h = tr.w.shape
        per_step: list[dict] = []
        last = [commstats.snapshot()]

        def count(t: int, rec: dict) -> None:
            now = commstats.snapshot()
            per_step.append({"wall_s": rec["wall_s"], "ops": commstats.diff(now, last[0]),
                             "bytes": commstats.total_bytes(now) - commstats.total_bytes(last[0])})
            last[0] = now

        tr.train(items, rows, RunDir(os.path.join(out, f"run-w{world}-r{rank}")), progress=False, callback=count)
        with open(os.path.join(out, f"w{world}-r{rank}.json"), "w") as f:
            json.dump({"V": v, "H": h, "steps": per_step}, f)
    finally:
        if world > 1:
            dist.destroy_process_group()


def measure(world: int, spec: dict, m: int = 400, steps: int = 3, chunk: int = 0, threads: int = 1) -> dict:
    """Run ``steps`` stage-2 steps on ``world`` gloo processes; per-step bytes (each rank) and times."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "rdzv"), tmp, spec, m, steps, chunk, threads),
                 nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"w{world}-r{r}.json").read_text()) for r in range(world)]
    v, h = ranks[0]["V"], ranks[0]["H"]
    step_s = [max(r["steps"][t]["wall_s"] for r in ranks) for t in range(steps)]
    return {
        "world": world, "V": v, "H": h, "m": m, "steps": steps,
        "step_s": step_s, "step_s_median": statistics.median(step_s),
        "bytes_per_step": [[s["bytes"] for s in r["steps"]] for r in ranks],
        "ops_per_step": ranks[0]["steps"][0]["ops"],
        "formula_bytes": 0 if world == 1 else 4 * m + 4,
        "head_file_bytes": v * h * 4,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a local causal-LM directory (default: a random toy Llama)")
    ap.add_argument("--hidden", type=int, default=48, help="toy model hidden size H")
    ap.add_argument("--extra-vocab", type=int, default=0, help="rows added to the toy head (V = toy vocab + this)")
    ap.add_argument("--m", type=int, default=400, help="perturbations per step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--chunk", type=int, default=0, help="zo.chunk_size (0: from the memory budget)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--worlds", default="1,2", help="process counts to run, comma-separated")
    args = ap.parse_args(argv)
    spec = {"path": args.model} if args.model else {"hidden": args.hidden, "extra_vocab": args.extra_vocab}
    runs = [measure(int(w), spec, args.m, args.steps, args.chunk, args.threads) for w in args.worlds.split(",")]
    out = {"model": args.model or f"toy(H={args.hidden}, +{args.extra_vocab} vocab)", "runs": runs}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
