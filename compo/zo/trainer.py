"""The ComPO loop: a step (compo/zo/step.py) per batch of noisy pairs, warnings from the step
records, progress, and atomic checkpoints so a killed run resumes bit-identically."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Callable, Sequence

import torch

from compo.core import faults
from compo.core.dist import world_info
from compo.core.errors import Paused
from compo.core.progress import bar as progress_bar, say, warn
from compo.core.rundir import RunDir
from compo.zo.checkpoint import load_head, save_head
from compo.zo.monitor import new_state, observe
from compo.zo.oracles import check_estimator  # noqa: F401 (a public name)
from compo.zo.step import CHECK_ATOL_PER_TOKEN, BudgetSpent, ZOStep  # noqa: F401 (public names)
from oracles.judges.base import JudgeQuit

LARGE_UPDATE = 0.1  # warn once when a step moves the head by more than this fraction of its norm


def zo_total_steps(cfg, n_pairs: int) -> int:
    """Stage 2's step count for ``n_pairs`` noisy pairs (zo.max_steps, or epochs over the pairs)."""
    return cfg.max_steps or cfg.epochs * max(1, math.ceil(n_pairs / cfg.pairs_per_step))


class ZOTrainer(ZOStep):
    """Stage 2 over a model whose body stays frozen; only the output layer moves."""

    def pairs_for_step(self, t: int, n: int) -> list[int]:
        """Pair indices of step t: a seeded permutation of the noisy pairs per epoch."""
        pps = self.cfg.pairs_per_step
        per_epoch = max(1, math.ceil(n / pps))
        epoch, k = divmod(t, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7919 + 17 + epoch))
        return perm[(torch.arange(k * pps, (k + 1) * pps) % n)].tolist()

    def total_steps(self, n: int) -> int:
        return zo_total_steps(self.cfg, n)

    def train(self, items: Sequence, texts: Sequence, run: RunDir, resume: bool = False,
              callback: Callable[[int, dict], None] | None = None, progress: bool = True) -> dict:
        """All steps over the noisy pairs; checkpoints to run/checkpoints/zo; returns the totals."""
        if not items:
            raise ValueError("stage 2 has no noisy pairs to train on (see split counts; raise split.delta?)")
        ckpt_dir, total = run.checkpoints / "zo", self.total_steps(len(items))
        rank0 = world_info()[1] == 0
        start, totals = self._start(ckpt_dir, total, resume, rank0)
        if rank0:
            run.truncate_metrics("stage2", start)
        bar = progress_bar(range(start, total), "stage2 (ComPO)", total=total, initial=start, unit="step",
                           enabled=progress and rank0)
        for t in bar:
            rec = self._paused_or_step(t, items, texts, ckpt_dir, totals, total, rank0)
            for extra in self.extras:
                extra(t, rec, self.w)
            self._warn(t, rec, totals, rank0)
            if rank0:
                run.log(rec)
            self._count(rec, totals)
            bar.set_postfix(**progress_fields(rec, totals))
            if self.cfg.checkpoint_every and (t + 1) % self.cfg.checkpoint_every == 0 and t + 1 < total and rank0:
                self.save_checkpoint(ckpt_dir, t + 1, totals)
            faults.point("zo.step")
            if callback is not None:
                callback(t + 1, rec)
        return totals

    def _start(self, ckpt_dir: Path, total: int, resume: bool, rank0: bool) -> tuple[int, dict]:
        """(first step, totals): from the checkpoint on ``resume``, else a fresh start."""
        if resume and ckpt_dir.exists():
            start, totals = self.load_checkpoint(ckpt_dir, total)
            say(f"stage2: resumed from {ckpt_dir} at step {start}/{total}")
            return start, totals
        if rank0:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        return 0, {"steps": 0, "steps_taken": 0, "steps_skipped": 0, "skip_reasons": {}, "sum_frac_minus": 0.0}

    def _paused_or_step(self, t: int, items, texts, ckpt_dir: Path, totals: dict, total: int, rank0: bool) -> dict:
        """Step ``t``; a judge that quits (budget, a human) checkpoints here and pauses the run."""
        idx = self.pairs_for_step(t, len(items))
        try:
            return self.step(t, [items[i] for i in idx], [texts[i] for i in idx])
        except JudgeQuit as e:
            if rank0:
                self.save_checkpoint(ckpt_dir, t, totals)
            totals["stopped"] = f"{e}; stopped before step {t + 1}, --resume continues from there"
            say(f"stage2: {totals['stopped']}")
            raise Paused(f"stage2 paused before step {t + 1} of {total}: {e}; the checkpoint is in "
                         f"{ckpt_dir} and --resume continues from there", totals) from None

    def _warn(self, t: int, rec: dict, totals: dict, rank0: bool) -> None:
        """The monitor's warnings (compo/zo/monitor.py), a large update, a spent judge budget: each once."""
        mon = totals.setdefault("monitor", new_state())
        msgs = observe(mon, rec, self.cfg.pairs_per_step, getattr(self.oracle, "aggregation", None),
                       rec["dim"], self.cfg.distribution == "sphere")
        v = self.w.shape[0]
        if rec["support_size"] < v and not totals.get("support_gamma_warned"):
            totals["support_gamma_warned"] = True
            scaled = self.cfg.gamma * math.sqrt(rec["support_size"] / v)
            msgs.append(f"zo.support={self.cfg.support}: the whole update lands in the step's {rec['support_size']} of "
                        f"{v} rows, about sqrt(V/|S|) = {math.sqrt(v / rec['support_size']):.0f}x as far in them as "
                        f"zo.support=all moves them at the same zo.gamma={self.cfg.gamma:g}; a gamma tuned for 'all' "
                        f"is too large here: try about {scaled:.3g} (docs/zo_support.md)")
        if rec.get("update_ratio", 0.0) > LARGE_UPDATE and not totals.get("large_update_warned"):
            totals["large_update_warned"] = True
            msgs.append(f"the update moved the head by {100 * rec['update_ratio']:.1f}% of its norm "
                        f"(zo.gamma={self.cfg.gamma}); steps that large leave the linear regime the oracle votes in "
                        "and usually hurt: lower zo.gamma")
        for msg in msgs:
            rec.setdefault("warnings", []).append(msg)
            totals.setdefault("warnings", []).append(f"stage2 step {t + 1}: {msg}")
            if rank0:
                warn(f"stage2 step {t + 1}: {msg}")
        if rec.get("oracle/budget_exhausted") and not totals.get("budget_exhausted"):
            totals["budget_exhausted"] = True
            warn(f"stage2: the judge's budget is spent at step {t + 1}: from here on its votes abstain "
                 "(raise max_calls / max_tokens_total and --resume to continue paying)")

    @staticmethod
    def _count(rec: dict, totals: dict) -> None:
        """Add a step's outcome to the run's totals."""
        totals["steps"] += 1
        totals["sum_frac_minus"] += rec["frac_minus"]
        if rec["skipped"]:
            totals["steps_skipped"] += 1
            key = rec["skip_reason"].split(":")[0]
            totals["skip_reasons"][key] = totals["skip_reasons"].get(key, 0) + 1
        else:
            totals["steps_taken"] += 1

    def load_checkpoint(self, ckpt_dir: Path, total: int) -> tuple[int, dict]:
        """Restore the head and totals from ``ckpt_dir`` (checkpoint.load_head checks them)."""
        step, totals, w = load_head(ckpt_dir, tuple(self.w.shape), total)
        self.w = w.to(self.w.device)
        self.head.weight.data.copy_(self.w.to(self.head.weight.dtype))
        return step, totals

    def save_checkpoint(self, ckpt_dir: Path, step: int, totals: dict) -> None:
        """Head (fp32 master), step, seed and totals, written as one directory swap."""
        save_head(ckpt_dir, self.w, step, self.seed, totals, self.cfg.m, self.cfg.radius)


def progress_fields(rec: dict, totals: dict) -> dict:
    """The progress line's fields for a step: votes, steps taken, signal, support, speed."""
    out = {"n_minus": rec["n_minus"], "taken": totals["steps_taken"], "cos": f"{rec['signal_cos']:.3f}"}
    if "agree_rate" in rec:
        out["agree"] = f"{rec['agree_rate']:.3f}"
    out["S"] = rec["support_size"]
    if "support_energy" in rec:
        out["E"] = f"{rec['support_energy']:.3f}"
    out["pps"] = rec["perturbations_per_s"]
    return out
