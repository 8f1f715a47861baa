#!/usr/bin/env python
"""Signal and speed of stage 2's projected estimator by vocabulary support (zo.support).

For each estimator, one stage-2 step per pair from the same head (``skip_threshold`` 1: no step
is taken), likelihood rule (strict), Gaussian z. Per estimator (``estimators.<name>``):

* ``mean_signal_cos``: the mean of the steps' logged ``signal_cos`` (what users see);
* ``mean_signal_cos_moment``: the mean of the moment estimate ``n mu / ||u||`` logged beside it
  (clipped at 0 step by step, so biased up where the signal is below its noise floor);
* ``first_order_cos``: the check, computed here independently of the trainer's code: the mean
  cosine of the step's raw estimate ``sum_i y_i z_i`` (scattered into V x k) with the first-order
  expected direction ``b/|b| - a/|a|``, where a, b are autograd's head gradients of log p(chosen)
  and log p(rejected) on hidden states taken by a hook on the output layer, projected on the
  trainer's basis Q of the pair's span;
* ``median_support_energy`` (share of that direction's energy in S, same independent code),
  ``median_support_size``, ``perturbations_per_s`` and ``step_s`` (medians of the step records).

The names: ``all``, ``pair``, ``topk8``, ``topk32`` at ``--m``, ``topk8_m16000`` (topk8 at m
16,000) and ``topk8_m1600`` (the paper's m, for the step-time target). ``ratios`` gives each
estimator's ``first_order_cos`` over ``all``'s and the ``perturbations_per_s`` ratio of topk8 to
all; ``targets`` says which of issue 24's targets hold. JSON on the last line of stdout.

    python scripts/get_smollm2.py
    python scripts/bench_signal.py --pairs 20 --m 400 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ESTIMATORS = {  # name: (support, support_k, m or None for --m)
    "all": ("all", 0, None), "pair": ("pair", 0, None), "topk8": ("topk", 8, None), "topk32": ("topk", 32, None),
    "topk8_m16000": ("topk", 8, 16000), "topk8_m1600": ("topk", 8, 1600),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def head_input(model, ids: list[int]) -> torch.Tensor:
    """The output layer's input at every position of one sequence (a forward pre-hook)."""
    got = {}
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: got.setdefault("h", a[0]))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        hook.remove()
    return got["h"][0].float()


def expected_direction(model, item, q: torch.Tensor) -> torch.Tensor:
    """b/|b| - a/|a| in the basis q (V x k): a, b the head gradients of log p(chosen) and
    log p(rejected) by autograd, projected on q."""
    w = model.get_output_embeddings().weight.detach().float().clone().requires_grad_(True)
    grads = []
    for completion in item.completions:
        ids = item.prompt + completion
        h = head_input(model, ids)[len(item.prompt) - 1 : len(ids) - 1]
        lp = torch.log_softmax(h @ w.T, -1).gather(1, torch.tensor(completion)[:, None]).sum()
        g, = torch.autograd.grad(lp, w)
        g = g @ q
        grads.append(g / g.norm())
    return grads[1] - grads[0]


def run_estimator(name: str, model, items, rows, args) -> dict:
    from compo.config import ZOConfig
    from compo.zo.trainer import ZOTrainer
    from oracles import LikelihoodOracle

    support, k, m = ESTIMATORS[name]
    cfg = ZOConfig(m=m or args.m, radius=args.radius, estimator="projected", support=support, support_k=k,
                   skip_threshold=1.0, checkpoint_every=0)
    tr = ZOTrainer(model, cfg, args.seed, LikelihoodOracle(), pad_id=args.pad_id)
    recs, fo_cos, energy = [], [], []
    for i, (item, row) in enumerate(zip(items, rows)):
        rec = tr.step(i, [item], [row])
        sp = tr.last_space
        e = expected_direction(model, item, sp.q)
        u = torch.zeros_like(e)
        u[sp.rows if sp.rows is not None else slice(None)] = tr.last_u
        fo_cos.append(float((u * e).sum() / (u.norm() * e.norm())))
        energy.append(1.0 if sp.rows is None else float(e[sp.rows].pow(2).sum() / e.pow(2).sum()))
        recs.append(rec)
        log(f"{name} pair {i + 1}/{len(items)}: logged cos {rec['signal_cos']:.4f} (moment "
            f"{rec['signal_cos_moment']:.4f}), first-order {fo_cos[-1]:.4f}, |S| {rec['support_size']}, "
            f"energy {energy[-1]:.4f}, {rec['wall_s']:.2f} s")
    return {
        "m": cfg.m, "support": support, "support_k": k,
        "mean_signal_cos": statistics.fmean(r["signal_cos"] for r in recs),
        "mean_signal_cos_moment": statistics.fmean(r["signal_cos_moment"] for r in recs),
        "first_order_cos": statistics.fmean(fo_cos),
        "first_order_cos_min": min(fo_cos), "first_order_cos_max": max(fo_cos),
        "median_support_energy": statistics.median(energy),
        "median_support_energy_logged": statistics.median(r["support_energy"] for r in recs),
        "median_support_size": statistics.median(r["support_size"] for r in recs),
        "perturbations_per_s": statistics.median(r["perturbations_per_s"] for r in recs),
        "step_s": statistics.median(r["wall_s"] for r in recs),
    }


def targets(est: dict) -> dict:
    """Issue 24's targets, each True / False (absent estimators: None)."""
    def get(name, key):
        return est.get(name, {}).get(key)

    base = get("all", "first_order_cos")
    out = {}
    if base and "topk8" in est:
        out["topk8_energy_ge_0.95"] = get("topk8", "median_support_energy") >= 0.95
        out["topk8_cos_ge_10x_all"] = get("topk8", "first_order_cos") >= 10 * base
        out["topk8_pps_ge_20x_all"] = get("topk8", "perturbations_per_s") >= 20 * get("all", "perturbations_per_s")
    if base and "pair" in est:
        out["pair_cos_ge_20x_all"] = get("pair", "first_order_cos") >= 20 * base
    if base and "topk8_m16000" in est:
        out["topk8_m16000_cos_ge_0.3"] = get("topk8_m16000", "first_order_cos") >= 0.3
        out["topk8_m16000_step_le_all_step"] = get("topk8_m16000", "step_s") <= get("all", "step_s")
    if "topk8_m1600" in est:
        out["topk8_m1600_step_le_2s"] = get("topk8_m1600", "step_s") <= 2.0
    out["logged_within_20pct"] = all(abs(v["mean_signal_cos"] - v["first_order_cos"]) <= 0.2 * v["first_order_cos"]
                                     for v in est.values())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / ".models/smollm2-135m"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/hh-rlhf-harmless-base-test.jsonl.gz"))
    ap.add_argument("--pairs", type=int, default=20, help="pairs, one step each from the same head")
    ap.add_argument("--m", type=int, default=400, help="perturbations per step (the topk8_m* estimators set theirs)")
    ap.add_argument("--radius", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--max-prompt-length", type=int, default=96)
    ap.add_argument("--estimators", default=",".join(ESTIMATORS), help="comma-separated names")
    args = ap.parse_args(argv)
    names = [n for n in args.estimators.split(",") if n]
    bad = [n for n in names if n not in ESTIMATORS]
    if bad:
        ap.error(f"unknown estimator {bad[0]!r}; allowed: {', '.join(ESTIMATORS)}")
    if not (Path(args.model) / "config.json").exists():
        ap.error(f"--model {args.model}: no config.json (run scripts/get_smollm2.py first)")
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compo.data.load import load_rows
    from compo.data.encode import encode_rows, pad_id_of
    from compo.scoring.models import untie_head

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    untie_head(model)
    args.pad_id = pad_id_of(tok)
    res = load_rows(args.data, on_invalid="skip")
    enc = encode_rows(res.rows, tok, args.max_length, args.max_prompt_length)
    items = enc.items[: args.pairs]
    rows = [res.rows[it.index] for it in items]
    log(f"{len(items)} pairs, median {statistics.median(len(c) for it in items for c in it.completions)} "
        f"completion tokens")
    est, t0 = {}, time.time()
    for name in names:
        est[name] = run_estimator(name, model, items, rows, args)
    base = est.get("all", {}).get("first_order_cos")
    out = {
        "model": Path(args.model).name, "pairs": len(items), "m": args.m, "radius": args.radius,
        "threads": args.threads, "machine": f"{platform.machine()} {os.cpu_count()} cpus", "estimators": est,
        "ratios": {f"{n}_cos_over_all": (v["first_order_cos"] / base if base else None) for n, v in est.items()},
        "targets": targets(est), "wall_s": round(time.time() - t0, 1),
    }
    if "all" in est and "topk8" in est:
        out["ratios"]["topk8_pps_over_all"] = est["topk8"]["perturbations_per_s"] / est["all"]["perturbations_per_s"]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
