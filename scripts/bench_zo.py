#!/usr/bin/env python
"""Seconds per perturbation of ComPO stage 2: the official procedure vs compo vs the floor.

All three are measured in one run, on one preference pair, on the same (untied) model:

* ``reference_s``: the official code's per-perturbation procedure re-expressed: a float64
  NumPy draw of V*H numbers, a copy to torch (the model's dtype and device), one full-model
  forward with the unperturbed head and one with the head perturbed by r*z written into
  ``lm_head.weight`` (restored after), scoring the chosen and rejected log-probs.
* ``compo_full_s`` / ``compo_projected_s``: ``ZOTrainer.step`` (likelihood oracle, m
  perturbations, chunk from the memory budget) divided by m: the whole step amortised
  (hidden-state capture, all chunks, estimator, update). ``skip_threshold`` is 0 so every
  timed step goes through the update; the head is restored after each step.
* ``floor_projected_s``: the same for the projected estimator: a V x k draw (k = rank of the
  scored hidden states) and one (T x k)(k x V) matmul, log-softmax and gather.
* ``step_m{m}_projected_s`` / ``step_m{m}_full_s``: one whole step (m perturbations), wall or CPU
  seconds per ``--clock``; ``--m 1600`` gives the paper's step.
* ``floor_s``: one V x H fp32 draw of the step's stream (``--rng``: Philox by default, or
  ``torch.randn``'s numbers) plus one head matmul h z^T over the pair's
  scored tokens, log-softmax over V and gather (``compo.zo.head.candidate_logps``, in the
  trainer's vocab tiles on the CPU), per perturbation; measured before and after the compo steps, the smaller is reported (on a
  shared machine the load drifts: ``loadavg_1m`` gives it at the start and the end).

Prints one JSON object on stdout (progress on stderr). Besides the three timings:
``speedup_vs_reference`` = reference_s / compo_full_s, ``ratio_to_floor`` = compo_full_s / floor_s,
``completion_tokens`` (scored tokens, chosen + rejected), ``chunk_*`` (perturbations per chunk),
``compo_*_loop_s`` (the trainer's own wall-clock perturbation loop, without capture and update).
``head_matmul_bf16_tflops``: a bf16 ``torch.bmm`` of one projected chunk's candidates
(scripts/bench_head.py), and with ``peak_bf16_tflops`` (a known GPU's, or ``--peak-tflops``)
``head_matmul_fraction_of_peak``; ``projected_step_head_tflops`` / ``_fraction_of_peak``: the
head FLOP/s the projected step's perturbation loop achieved (``projected_perturbations_per_s``),
against the bf16 peak whatever ``projected_step_matmul_dtype`` (the step's ``--matmul-dtype``) is.
The head matmul is memory-bound, so also ``head_matmul_bytes`` (the bf16 chunk product's inputs
read and output written), ``head_matmul_gbs`` and, with ``peak_bandwidth_gbs`` (a known GPU's
data-sheet figure, or ``--peak-gbs``), ``head_matmul_fraction_of_bandwidth``. On a GPU the
product is timed with CUDA events over 200 repetitions (10 on the CPU's wall clock).
``--matmul-dtype bfloat16`` times the compo steps with ``zo.matmul_dtype`` bfloat16 (the floor
stays float32) and adds ``vote_agreement_vs_float32``: the share of a projected step's m votes
that are the same as with the float32 matmul. ``--rng torch`` draws the perturbations (compo's
steps and both floors) with ``zo.rng`` torch (plain ``torch.randn``) instead of Philox.

On a shared machine other processes' threads make multi-threaded timings swing widely (the
full-model forwards suffer most); ``--threads 1 --clock cpu`` gives steadier numbers.

    python scripts/bench_zo.py                                   # embedded toy model, one toy pair
    python scripts/bench_zo.py --model .models/smollm2-135m \\
        --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from compo.zo.perturb import PerturbationSource  # noqa: E402

from bench_head import (fraction, head_matmul_bytes, head_matmul_seconds, head_tflops, peak_gbs,  # noqa: E402
                        peak_tflops, sync)


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of all threads)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(args, device):
    """(model, tokenizer, name, pair row) on ``device``, fp32, head untied."""
    from compo.config import ToyDataConfig, ToyModelConfig
    from compo.data.encode import pad_id_of
    from compo.scoring.models import untie_head

    if args.model == "toy":
        from compo.data import toy

        log("building the embedded toy reference model ...")
        model, tok = toy.build_reference(ToyModelConfig(), ToyDataConfig(), args.seed)
        name = "toy"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log(f"loading {args.model} ...")
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        name = str(args.model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = model.to(device).eval()
    untie_head(model)  # as ZOTrainer does: perturbing a tied head would change the body's inputs
    for p in model.parameters():
        p.requires_grad_(False)

    if args.data is None:
        if args.model != "toy":
            raise SystemExit("--model other than toy needs --data FILE (a paired data file)")
        from compo.data import toy

        rows = toy.make_pairs(args.pair_index + 1, ToyDataConfig(), args.seed + 2, 0.0)
    else:
        from compo.data.load import load_rows

        res = load_rows(args.data, on_invalid="skip")
        if res.kind != "paired":
            raise SystemExit(f"{args.data}: needs paired rows, found {res.kind}")
        rows = res.rows
    if not 0 <= args.pair_index < len(rows):
        raise SystemExit(f"--pair-index {args.pair_index} out of range (0..{len(rows) - 1})")
    return model, tok, name, rows[args.pair_index], pad_id_of(tok)


def reference_per_perturbation(model, batch, radius: float, reps: int, seed: int, device) -> float:
    """The official per-perturbation procedure; seconds per perturbation over ``reps`` (after one warm-up)."""
    from compo.scoring.logprobs import sequence_logps
    from oracles.likelihood import likelihood_votes

    head = model.get_output_embeddings()
    v, hdim = head.weight.shape
    saved = head.weight.detach().clone()

    def one(i: int) -> None:
        rng = np.random.default_rng([seed, i + 1])
        z_np = rng.standard_normal((v, hdim))  # float64 on the CPU, as the official code
        z = torch.from_numpy(z_np).to(device=device, dtype=head.weight.dtype)
        base = sequence_logps(model, **batch).logps  # forward 1: unperturbed (same every time)
        head.weight.data.add_(z, alpha=radius)
        try:
            cand = sequence_logps(model, **batch).logps  # forward 2: perturbed head
        finally:
            head.weight.data.copy_(saved)
        likelihood_votes(base[:1], base[1:], cand[None, :1], cand[None, 1:])
        sync(device)

    with torch.no_grad():
        one(-1)
        sync(device)
        t0 = CLOCK()
        for i in range(reps):
            one(i)
        return (CLOCK() - t0) / reps


def compo_per_perturbation(model, item, row, pad_id, cfg, steps: int, seed: int, device) -> tuple[float, dict]:
    """ZOTrainer.step wall time / m (after one warm-up step); also the last step's record."""
    from compo.zo.trainer import ZOTrainer
    from oracles.likelihood import LikelihoodOracle

    trainer = ZOTrainer(model, cfg, seed, LikelihoodOracle(), pad_id)
    head = trainer.head
    w0, head0 = trainer.w.clone(), head.weight.detach().clone()

    def restore() -> None:
        trainer.w = w0.clone()
        head.weight.data.copy_(head0)

    rec = trainer.step(0, [item], [row])
    restore()
    sync(device)
    times = []
    for s in range(steps):
        t0 = CLOCK()
        rec = trainer.step(1 + s, [item], [row])
        sync(device)
        times.append(CLOCK() - t0)
        restore()
    return min(times) / cfg.m, rec


def vote_agreement(model, item, row, pad_id, cfg, seed: int) -> float:
    """Share of one step's votes that ``cfg`` (e.g. a bfloat16 matmul) gives as float32 does."""
    from compo.zo.trainer import ZOTrainer
    from oracles.likelihood import LikelihoodOracle

    class Recording(LikelihoodOracle):
        def compare(self, batch):
            y = super().compare(batch)
            self.votes.append(y.cpu())
            return y

    votes = []
    for c in (cfg.model_copy(update={"matmul_dtype": "float32"}), cfg):
        oracle = Recording()
        oracle.votes = []
        trainer = ZOTrainer(model, c, seed, oracle, pad_id)
        w0, head0 = trainer.w.clone(), trainer.head.weight.detach().clone()
        trainer.step(0, [item], [row])
        trainer.head.weight.data.copy_(head0)
        del w0
        votes.append(torch.cat(oracle.votes))
    return float((votes[0] == votes[1]).float().mean())


def floor_per_perturbation(model, item, pad_id, radius: float, reps: int, seed: int, device,
                           projected: bool = False, rng: str = "philox") -> tuple[float, int, int]:
    """(seconds, scored tokens T, width) per perturbation of randn(V, width) + one head matmul
    (T x width by width x V) + log-softmax + gather, with the base logits computed once outside.
    width = H, or with ``projected`` k = the rank of the scored hidden states (h in the basis Q
    of their span, as one projected step computes it once). The draw is the step's own
    (``PerturbationSource.draw`` for ``rng``)."""
    from compo.zo.head import base_logits, candidate_logps, capture, projection_basis, shift_rows, vocab_tile

    with torch.no_grad():
        inp = capture(model, [item], pad_id)
        w = model.get_output_embeddings().weight.detach().float()
        base = shift_rows(base_logits(w, inp))
        hz = inp.h @ projection_basis(inp.h) if projected else inp.h
        v, width = w.shape[0], hz.shape[1]
        source = PerturbationSource(seed, (v, width), radius, device=device, rng=rng)
        z = torch.empty((1, v, width), dtype=torch.float32, device=device)
        scales = torch.full((1,), radius, device=device)
        tile = vocab_tile(device, hz.shape[0], v)  # the trainer's tile width (head.vocab_tile)

        def one() -> None:
            source.draw(0, [0], out=z)
            candidate_logps(base, hz, z, scales, inp, tile=tile)
            sync(device)

        one()
        t0 = CLOCK()
        for _ in range(reps):
            one()
        return (CLOCK() - t0) / reps, int(inp.h.shape[0]), width


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy", help="'toy' (default) or a saved causal-LM directory")
    ap.add_argument("--data", default=None, help="paired data file (default: a generated toy pair)")
    ap.add_argument("--pair-index", type=int, default=0, help="which pair of --data (after skipping invalid rows)")
    ap.add_argument("--m", type=int, default=64, help="perturbations per timed compo step")
    ap.add_argument("--steps", type=int, default=1, help="timed compo steps per estimator (min is reported)")
    ap.add_argument("--ref-reps", type=int, default=3, help="reference perturbations to time")
    ap.add_argument("--floor-reps", type=int, default=10, help="floor perturbations to time")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-prompt-length", type=int, default=256)
    ap.add_argument("--memory-budget-mb", type=int, default=None, help="ZOConfig.memory_budget_mb (default: its default)")
    ap.add_argument("--radius", type=float, default=5e-4)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed seconds; cpu: CPU seconds of the process (steadier on a shared machine, "
                         "with --threads 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's); 1 is steadier on a shared machine")
    ap.add_argument("--matmul-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="zo.matmul_dtype of the compo steps; not float32: also vote_agreement_vs_float32")
    ap.add_argument("--rng", default="philox", choices=("philox", "torch"),
                    help="zo.rng of the compo steps and the floors' draws")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense bf16 peak, TFLOP/s (default: bench_head's table for known GPUs)")
    ap.add_argument("--peak-gbs", type=float, default=None,
                    help="the device's memory bandwidth, GB/s (default: bench_head's table for known GPUs)")
    ap.add_argument("--skip-reference", action="store_true", help="do not time the reference procedure")
    ap.add_argument("--skip-full", action="store_true", help="do not time the full estimator (an m=1600 full step "
                    "takes minutes on a CPU)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # only the JSON goes to stdout
        from compo.config import ZOConfig
        from compo.data.encode import collate, encode_rows
        from compo.scoring.models import resolve_device

        device = resolve_device(args.device)
        torch.manual_seed(args.seed)
        model, tok, name, row, pad_id = load(args, device)
        enc = encode_rows([row], tok, args.max_length, args.max_prompt_length)
        if not enc.items:
            raise SystemExit(f"pair {args.pair_index}: prompt longer than --max-prompt-length {args.max_prompt_length}")
        item = enc.items[0]
        seqs = [(item.prompt, item.completions[0]), (item.prompt, item.completions[1])]
        batch = {k: t.to(device) for k, t in collate(seqs, pad_id).items()}
        v, hdim = model.get_output_embeddings().weight.shape
        log(f"model={name} V={v} H={hdim} prompt={len(item.prompt)} tokens, completions="
            f"{[len(c) for c in item.completions]} tokens, device={device}, threads={torch.get_num_threads()}")

        load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        log("floor ...")
        floor_a, n_tok, _ = floor_per_perturbation(model, item, pad_id, args.radius, args.floor_reps, args.seed,
                                                   device, rng=args.rng)
        log(f"  floor_s={floor_a:.4f}")
        floor_pa, _, width = floor_per_perturbation(model, item, pad_id, args.radius, args.floor_reps, args.seed,
                                                    device, projected=True, rng=args.rng)
        log(f"  floor_projected_s={floor_pa:.5f} (k={width})")

        extra = {} if args.memory_budget_mb is None else {"memory_budget_mb": args.memory_budget_mb}
        common = dict(m=args.m, radius=args.radius, skip_threshold=0.0, checkpoint_every=0,
                      matmul_dtype=args.matmul_dtype, rng=args.rng, **extra)
        full_s = rec_full = None
        if not args.skip_full:
            log(f"compo full (m={args.m}) ...")
            full_s, rec_full = compo_per_perturbation(
                model, item, row, pad_id, ZOConfig(estimator="full", **common), args.steps, args.seed, device)
            log(f"  compo_full_s={full_s:.4f} (chunk {rec_full['chunk']})")
        log(f"compo projected (m={args.m}) ...")
        proj_s, rec_proj = compo_per_perturbation(
            model, item, row, pad_id,
            ZOConfig(estimator="projected", distribution="gaussian", sparsity="top_fraction", **common),
            args.steps, args.seed, device)
        log(f"  compo_projected_s={proj_s:.5f} (chunk {rec_proj['chunk']})")
        agreement = None
        if args.matmul_dtype != "float32":
            proj_cfg = ZOConfig(estimator="projected", distribution="gaussian", sparsity="top_fraction", **common)
            agreement = vote_agreement(model, item, row, pad_id, proj_cfg, args.seed)
            log(f"  vote_agreement_vs_float32={agreement:.4f}")

        log("floor again (the min of both is reported) ...")
        floor_b, _, _ = floor_per_perturbation(model, item, pad_id, args.radius, args.floor_reps, args.seed + 1,
                                               device, rng=args.rng)
        log(f"  floor_s={floor_b:.4f}")
        floor_s = min(floor_a, floor_b)
        floor_pb, _, _ = floor_per_perturbation(model, item, pad_id, args.radius, args.floor_reps, args.seed + 1,
                                                device, projected=True, rng=args.rng)
        log(f"  floor_projected_s={floor_pb:.5f}")
        floor_p = min(floor_pa, floor_pb)
        peak, peak_bw = peak_tflops(device, args.peak_tflops), peak_gbs(device, args.peak_gbs)
        log("head matmul throughput (bf16, one projected chunk) ...")
        chunk = rec_proj["chunk"]
        mm_s = head_matmul_seconds(device, chunk, n_tok, width, v)
        mm_tflops = head_tflops(chunk / mm_s, n_tok, width, v)
        mm_bytes = head_matmul_bytes(chunk, n_tok, width, v)
        mm_gbs = mm_bytes / mm_s / 1e9
        log(f"  head_matmul_bf16_tflops={mm_tflops:.3f} head_matmul_gbs={mm_gbs:.1f}")
        step_tf = head_tflops(rec_proj["perturbations_per_s"], n_tok, width, v)  # the projected step's head work
        ref_s = None
        if not args.skip_reference:
            log(f"reference ({args.ref_reps} perturbations) ...")
            ref_s = reference_per_perturbation(model, batch, args.radius, args.ref_reps, args.seed, device)
            log(f"  reference_s={ref_s:.4f}")

    out = {
        "model": name,
        "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "V": int(v),
        "H": int(hdim),
        "prompt_tokens": len(item.prompt),
        "completion_tokens": n_tok,
        "m": args.m,
        "reference_s": ref_s,
        "projected_width": width,
        "compo_full_s": full_s,
        "compo_projected_s": proj_s,
        "floor_s": floor_s,
        "floor_projected_s": floor_p,
        "speedup_vs_reference": None if ref_s is None or full_s is None else ref_s / full_s,
        "projected_speedup_vs_reference": None if ref_s is None else ref_s / proj_s,
        "ratio_to_floor": None if full_s is None else full_s / floor_s,
        "projected_ratio_to_floor": proj_s / floor_p,
        f"step_m{args.m}_projected_s": proj_s * args.m,
        f"step_m{args.m}_full_s": None if full_s is None else full_s * args.m,
        "chunk_full": None if rec_full is None else rec_full["chunk"],
        "chunk_projected": rec_proj["chunk"],
        "compo_full_loop_s": None if rec_full is None else 1.0 / rec_full["perturbations_per_s"],
        "compo_projected_loop_s": 1.0 / rec_proj["perturbations_per_s"],
        "projected_perturbations_per_s": rec_proj["perturbations_per_s"],
        "peak_bf16_tflops": peak,
        "head_matmul_bf16_tflops": mm_tflops,
        "head_matmul_fraction_of_peak": fraction(mm_tflops, peak),
        "peak_bandwidth_gbs": peak_bw,
        "head_matmul_s": mm_s,
        "head_matmul_bytes": mm_bytes,
        "head_matmul_gbs": mm_gbs,
        "head_matmul_fraction_of_bandwidth": fraction(mm_gbs, peak_bw),
        "projected_step_head_tflops": step_tf,
        "projected_step_fraction_of_peak": fraction(step_tf, peak),
        "projected_step_matmul_dtype": args.matmul_dtype,
        "matmul_dtype": args.matmul_dtype,
        "rng": args.rng,
        "vote_agreement_vs_float32": agreement,
        "loadavg_1m": None if load0 is None else [round(load0, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(out), file=real_stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
