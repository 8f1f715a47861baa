#!/usr/bin/env python
"""Where a noise study's wall time goes, per pair, before and after its speed-ups (prints JSON).

On N training pairs of the study config (configs/hh_rlhf_noise_study.yaml: SmolLM2-135M and
hh-rlhf, prompts up to 160 tokens, sequences up to 224), one process:

- scoring (reference log-probs, held-out evaluation): batches in data order vs longest first;
- a stage-1 DPO step: fp32 in data order vs bf16 autocast (``stage1.mixed_precision``) with
  ``stage1.group_by_length``;
- stage 2's held-out evaluation: a full forward vs the head alone on the kept stage-1 hidden
  states (``eval.cache_hidden_mb``).

    python scripts/bench_study.py --pairs 48 --steps 3

Each figure is seconds per pair (per step for stage 1, with --batch pairs a step); each
``speedup`` is a ratio of two figures measured in this one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "smollm2-hh-rlhf.yaml"))
    p.add_argument("--pairs", type=int, default=48)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()

    import torch
    from accelerate.state import AcceleratorState

    from compo.core.config import load_config
    from compo.core.rundir import RunDir
    from compo.data.encode import encode_rows
    from compo.run import head_eval
    from compo.run.workspace import load_data
    from compo.scoring.logprobs import pair_logps, score_pairs
    from compo.scoring.models import load_pretrained
    from compo.train.stage1 import Stage1Data, paired_objective, train_stage1

    sets = ["data.limit=null", "data.eval_fraction=0.62", "data.max_prompt_length=160", "data.max_length=224",
            f"stage1.batch_size={args.batch}", f"split.batch_size={args.batch}"]
    cfg = load_config(args.config, sets)
    model, tok = load_pretrained(cfg.model.path, cfg)
    train, _, _ = load_data(cfg)
    enc = encode_rows(train, tok, cfg.data.max_length, cfg.data.max_prompt_length)
    gen = torch.Generator().manual_seed(0)
    items = [enc.items[i] for i in torch.randperm(len(enc.items), generator=gen)[: args.pairs].tolist()]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n, out = len(items), {"pairs": len(items), "batch": args.batch, "threads": torch.get_num_threads()}

    @torch.no_grad()
    def in_order() -> None:
        model.eval()
        for i in range(0, n, args.batch):
            pair_logps(model, items[i: i + args.batch], pad, True)

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    timed(lambda: pair_logps(model, items[:2], pad, True))  # warm-up
    a = timed(in_order) / n
    ref = None

    def sorted_scores() -> None:
        nonlocal ref
        ref = score_pairs(model, items, pad, args.batch, progress=False)

    b = timed(sorted_scores) / n
    out["scoring_s_per_pair"] = {"data_order": round(a, 4), "longest_first": round(b, 4), "speedup": round(a / b, 2)}

    data = Stage1Data(items, torch.stack([ref.chosen, ref.rejected], 1))
    step = {}
    for name, extra in (("fp32_data_order", []), ("bf16_grouped", ["stage1.mixed_precision=bf16",
                                                                   "stage1.group_by_length=true"])):
        c = load_config(args.config, sets + [f"stage1.max_steps={args.steps}"] + extra)
        AcceleratorState._reset_state(reset_partial_state=True)  # another mixed precision in this process
        with tempfile.TemporaryDirectory() as d:
            m = copy.deepcopy(model)
            step[name] = timed(lambda: train_stage1(m, tok, data, c, RunDir(d), paired_objective(c, pad),
                                                    progress=False)) / args.steps
            del m
    out["stage1_s_per_step"] = {k: round(v, 3) for k, v in step.items()}
    out["stage1_s_per_step"]["speedup"] = round(step["fp32_data_order"] / step["bf16_grouped"], 2)

    with tempfile.TemporaryDirectory() as d:
        path, sources = Path(d) / head_eval.FILE, [str(i) for i in range(n)]
        keep = timed(lambda: head_eval.score_and_keep(model, items, pad, args.batch, True, path, "k", sources)) / n
        full = timed(lambda: score_pairs(model, items, pad, args.batch, progress=False)) / n
        head = timed(lambda: head_eval.head_only(model, path, "k", sources)) / n
    out["stage2_eval_s_per_pair"] = {"full_forward": round(full, 4), "head_only": round(head, 4),
                                     "speedup": round(full / head, 2), "stage1_eval_keeping": round(keep, 4)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
