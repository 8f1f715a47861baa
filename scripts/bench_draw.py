"""Time one perturbation's CPU draw two ways and print JSON: ``torch.randn`` from a seeded
generator (``zo.rng: torch``) and compo's Philox normals (``zo.rng: philox``, the default), in
milliseconds per draw of ``--rows`` x ``--width``
float32 numbers (default: a projected SmolLM2 perturbation, 49152 x 90), on ``--threads`` threads
(one draw runs on one), CPU seconds, best of ``--runs`` runs of ``--reps`` draws.

    python scripts/bench_draw.py [--rows 49152 --width 90 --reps 10 --runs 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from compo.zo.philox import fill_normal, keys  # noqa: E402


def best_ms(fn, reps: int, runs: int) -> float:
    """The best of ``runs`` means over ``reps`` calls, in CPU milliseconds."""
    fn()
    best = float("inf")
    for _ in range(runs):
        t0 = time.process_time()
        for _ in range(reps):
            fn()
        best = min(best, (time.process_time() - t0) / reps * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=49152, help="vocabulary rows of a draw")
    ap.add_argument("--width", type=int, default=90, help="numbers a row (projected width k, or H)")
    ap.add_argument("--reps", type=int, default=10, help="draws a run")
    ap.add_argument("--runs", type=int, default=3, help="runs; the best is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seed = 20261203
    z = torch.empty(args.rows, args.width)
    gen = torch.Generator().manual_seed(seed)
    out = {"rows": args.rows, "width": args.width, "numbers": z.numel(), "threads": args.threads,
           "torch_randn_ms": best_ms(lambda: torch.randn(z.shape, generator=gen, out=z), args.reps, args.runs)}
    out["philox_ms"] = best_ms(lambda: fill_normal(z, *keys(seed)), args.reps, args.runs)
    out["philox_speedup"] = out["torch_randn_ms"] / out["philox_ms"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
