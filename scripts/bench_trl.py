#!/usr/bin/env python
"""Benchmark (not a test): stage-1 DPO throughput and peak memory, compo vs TRL's DPOTrainer.

``python scripts/bench_stage1.py --vs-trl ...`` (or this script) runs each trainer in its own
subprocess on the same model, the same pairs (the first ``--pairs`` pairs of ``--data`` whose
prompt + longer response fit ``--max-length`` tokens, so neither side truncates), the same batch
size, fp32, the same thread count, the same optimizer-step count and the same activation
checkpointing (``--gradient-checkpointing``: on by default, as TRL's DPOConfig); TRL twice, with
``precompute_ref_log_probs`` on and off. Each worker times every optimizer step (wall clock)
after ``--warmup`` steps and reports the median; the one-time reference log-prob pass is timed
separately (``*_prep_s``). Peak RSS is the worker's ``ru_maxrss`` (model load included: TRL
without precomputed reference log-probs holds a second copy of the model).

Prints one JSON object on stdout: ``compo_pairs_per_s``, ``trl_pairs_per_s`` (precompute on),
``trl_noprecompute_pairs_per_s``, ``compo_peak_rss_mb``, ``trl_peak_rss_mb``,
``trl_noprecompute_peak_rss_mb``, ``speedup_vs_trl`` and each worker's raw figures; with
``--device cuda`` both trainers run on the GPU (still fp32) and each also reports ``*_peak_gpu_mb``.
TRL is needed only here: ``pip install trl`` (into the same environment, or point
``--trl-python`` at another interpreter that has compo's dependencies and trl).

    python scripts/bench_stage1.py --vs-trl --model .models/smollm2-135m \\
        --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz --batch 4 --steps 4 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # bench_head, however this file is run or imported

from bench_head import sync  # noqa: E402  (step marks wait for the GPU's queued work)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def select_pairs(data: str, model: str, n: int, max_length: int) -> list[dict]:
    """The first ``n`` valid pairs whose prompt + longer response fit ``max_length`` tokens."""
    from transformers import AutoTokenizer

    from compo.data.load import load_rows

    tok = AutoTokenizer.from_pretrained(model)
    out = []
    for r in load_rows(data, on_invalid="skip").rows:
        lens = [len(tok(r.prompt + c, add_special_tokens=False)["input_ids"]) for c in (r.chosen, r.rejected)]
        if max(lens) + 1 <= max_length:
            out.append({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected})
        if len(out) == n:
            return out
    raise SystemExit(f"{data}: only {len(out)} pairs fit --max-length {max_length}, {n} needed")


def step_timer(device: str = "cpu"):
    """(marks, mark): call mark() after every optimizer step; marks holds the clock readings."""
    marks = [time.perf_counter()]

    def mark() -> None:
        sync(device)
        marks.append(time.perf_counter())

    return marks, mark


def summarise(marks: list[float], warmup: int, batch: int, prep_s: float, device: str = "cpu") -> dict:
    dts = [b - a for a, b in zip(marks, marks[1:])][warmup:]
    med = statistics.median(dts)
    out = {"s_per_step_median": round(med, 4), "steps_timed": len(dts), "pairs_per_s": round(batch / med, 4),
           "prep_s": round(prep_s, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}
    if device.startswith("cuda"):
        import torch

        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def worker_compo(args, pairs_file: Path) -> dict:
    """compo's stage 1: reference log-probs once (what the split computes), then train_stage1."""
    import torch

    from compo.config import load_config
    from compo.scoring.logprobs import score_pairs
    from compo.scoring.models import load_model
    from compo.pipeline import Workspace
    from compo.data.rows import PairRow
    from compo.core.rundir import RunDir
    from compo.train.stage1 import Stage1Data, paired_objective, train_stage1

    rows = [PairRow(p["prompt"], p["chosen"], p["rejected"]) for p in map(json.loads, pairs_file.open())]
    over = [f"model.path={args.model}", f"data.path={pairs_file}", "stage1.loss=dpo",
            f"stage1.batch_size={args.batch}", f"stage1.max_steps={args.steps + args.warmup}",
            "stage1.warmup_ratio=0.0", "stage1.save_steps=0", f"stage1.learning_rate={args.lr}",
            f"stage1.beta={args.beta}", f"data.max_length={args.max_length}",
            f"data.max_prompt_length={args.max_length - 1}", f"model.device={args.device}", "model.dtype=float32",
            f"run_dir={args.scratch}/compo", f"seed={args.seed}", f"split.batch_size={args.batch}",
            f"stage1.gradient_checkpointing={'true' if args.gradient_checkpointing else 'false'}", *args.compo_set]
    cfg = load_config(None, over)
    run = RunDir(cfg.run_dir)
    model, tok = load_model(cfg, None)
    ws = Workspace(cfg, run, model, tok, rows, [], "paired")
    t0 = time.perf_counter()
    enc = ws.encode(rows)
    ref = score_pairs(model, enc.items, ws.pad_id, cfg.split.batch_size, progress=False)
    prep = time.perf_counter() - t0
    data = Stage1Data(enc.items, torch.stack([ref.chosen, ref.rejected], 1))
    marks, mark = step_timer(args.device)
    train_stage1(model, tok, data, cfg, run, paired_objective(cfg, ws.pad_id), hooks={"after_step": mark},
                 progress=False)
    return summarise(marks, args.warmup, args.batch, prep, args.device)


def worker_trl(args, pairs_file: Path, precompute: bool) -> dict:
    """TRL's DPOTrainer on the same pairs; the callback marks every optimizer step."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ds = load_dataset("json", data_files=str(pairs_file), split="train")
    marks: list[float] = []

    class Marks(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            sync(args.device)
            marks.append(time.perf_counter())

    cfg = DPOConfig(output_dir=f"{args.scratch}/trl", per_device_train_batch_size=args.batch,
                    max_steps=args.steps + args.warmup, learning_rate=args.lr, beta=args.beta,
                    max_length=args.max_length, precompute_ref_log_probs=precompute,
                    precompute_ref_batch_size=args.batch, use_cpu=args.device == "cpu", bf16=False, fp16=False,
                    report_to=[], save_strategy="no", logging_steps=10**6, seed=args.seed,
                    dataloader_num_workers=0, disable_tqdm=True,
                    gradient_checkpointing=bool(args.gradient_checkpointing))
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Marks()])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    out = summarise(marks, args.warmup, args.batch, 0.0, args.device)
    out["prep_s"] = round(max(0.0, total - (marks[-1] - marks[0])), 3)  # before the first step: ref pass
    return out


def run_worker(args, kind: str, pairs_file: Path) -> dict:
    py = args.trl_python if kind.startswith("trl") else sys.executable
    cmd = [py, __file__, "--worker", kind, "--pairs-file", str(pairs_file), *args.passthrough]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    log(f"{kind} ...")
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if res.returncode != 0:
        tail = "\n".join(res.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"the {kind} worker failed (exit {res.returncode}):\n{tail}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    log(f"  {kind}: {out}")
    return out


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="causal-LM directory (e.g. .models/smollm2-135m)")
    ap.add_argument("--data", help="paired data file (compo's readers)")
    ap.add_argument("--batch", type=int, default=4, help="pairs per optimizer step (both trainers)")
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    ap.add_argument("--max-length", type=int, default=256, help="max tokens of prompt + response")
    ap.add_argument("--lr", type=float, default=5e-7)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every worker")
    ap.add_argument("--gradient-checkpointing", type=int, choices=(0, 1), default=1,
                    help="activation checkpointing in both trainers (1: TRL's default, which trades compute for "
                         "memory; 0: off in both)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where both trainers run (cuda: also each worker's peak_gpu_mb)")
    ap.add_argument("--trl-python", default=sys.executable, help="interpreter with trl installed")
    ap.add_argument("--compo-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra compo config overrides for the compo worker (e.g. stage1.gradient_checkpointing=true)")
    ap.add_argument("--only", choices=("compo", "trl", "trl_noprecompute"), action="append",
                    help="run only these workers (repeatable)")
    ap.add_argument("--worker", choices=("compo", "trl", "trl_noprecompute"), help=argparse.SUPPRESS)
    ap.add_argument("--pairs-file", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        real = sys.stdout
        sys.stdout = sys.stderr  # only the JSON goes to stdout
        with tempfile.TemporaryDirectory() as scratch:
            args.scratch = args.scratch or scratch
            pf = Path(args.pairs_file)
            out = (worker_compo(args, pf) if args.worker == "compo"
                   else worker_trl(args, pf, precompute=args.worker == "trl"))
        print(json.dumps(out), file=real, flush=True)
        return 0
    if not args.data:
        raise SystemExit("--data FILE is needed (a paired data file)")
    if subprocess.run([args.trl_python, "-c", "import trl"], capture_output=True).returncode != 0:
        raise SystemExit(f"{args.trl_python} cannot import trl: pip install trl (needed only for this benchmark)")
    drop = {"--only"}
    args.passthrough = [a for i, a in enumerate(argv) if a not in drop and (i == 0 or argv[i - 1] not in drop)]
    with tempfile.TemporaryDirectory() as tmp:
        pairs = select_pairs(args.data, args.model, args.batch * (args.steps + args.warmup), args.max_length)
        pf = Path(tmp) / "pairs.jsonl"
        pf.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        kinds = args.only or ["compo", "trl", "trl_noprecompute"]
        res = {k: run_worker(args, k, pf) for k in kinds}
    out: dict = {"model": args.model, "pairs": len(pairs), "batch": args.batch, "steps": args.steps,
                 "gradient_checkpointing": bool(args.gradient_checkpointing),
                 "max_length": args.max_length, "threads": args.threads, "dtype": "float32", "device": args.device}
    for k, r in res.items():
        out[f"{k}_pairs_per_s"] = r["pairs_per_s"]
        out[f"{k}_peak_rss_mb"] = r["peak_rss_mb"]
        if "peak_gpu_mb" in r:
            out[f"{k}_peak_gpu_mb"] = r["peak_gpu_mb"]
    if "compo" in res and "trl" in res:
        out["speedup_vs_trl"] = round(res["compo"]["pairs_per_s"] / res["trl"]["pairs_per_s"], 3)
    out["workers"] = res
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
