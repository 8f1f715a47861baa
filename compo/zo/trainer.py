"""The ComPO loop: per step, cache the body's hidden states, vote on m perturbed heads in
chunks, estimate a sparse normalised direction, skip on weak signal, update the fp32 master
head; checkpoint atomically so a killed run resumes bit-identically."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from compo import faults
from compo.config import ZOConfig
from compo.dist import Ranks, all_gather_votes, all_reduce_sum, broadcast_votes, comm_device, world_info
from compo.errors import Diverged, Paused
from compo.models import untie_head
from compo.progress import bar as progress_bar, say, warn
from compo.rundir import RunDir
from compo.zo.estimator import (
    agreement_record, agreement_skip_reason, agreements, all_finite, normalise, proposed_head, signal_cosine,
    signal_mu2, skip_reason, sparsify, update_record,
)
from compo.zo.head import (
    HeadInputs, base_logits, base_logps, candidate_logps, capture, chunk_size, head_logps, projection_basis,
    require_plain_head, shift_rows, vocab_tile,
)
from compo.zo.monitor import new_state, observe
from compo.zo.checkpoint import load_head, save_head
from compo.zo.fused import fused_logps, worth_fusing
from compo.zo.perturb import PerturbationSource
from oracles.base import BETTER, Evidence, Oracle, OracleBatch, SeqLogProbs
from oracles.generation import GenerationOracle
from oracles.judges.base import JudgeQuit

CHECK_ATOL_PER_TOKEN = 2e-3  # self-check floor (fp32); bf16/fp16 scale up: head.self_check_tolerance


LARGE_UPDATE = 0.1  # warn once when a step moves the head by more than this fraction of its norm


def check_estimator(cfg: ZOConfig, oracle: Oracle) -> None:
    """The projected estimator is exact only for oracles that vote on fixed pairs' log-probs."""
    if cfg.estimator == "projected" and oracle.needs != Evidence.LOGPROBS:
        raise ValueError("zo.estimator=projected is exact only for likelihood oracles on fixed pairs; "
                         f"oracle '{oracle.name}' judges generated text: use zo.estimator=full")


class BudgetSpent(JudgeQuit):
    """A judge refused votes for lack of budget during a step: the step is redone on --resume."""


class ZOTrainer:
    """Stage 2 over a model whose body stays frozen; only the output layer moves."""

    def __init__(self, model, cfg: ZOConfig, run_seed: int, oracle: Oracle, pad_id: int,
                 accept_oracle: Oracle | None = None, tokenizer=None, share_prompt: bool = True):
        check_estimator(cfg, oracle)
        self.model, self.cfg, self.seed, self.pad_id = model, cfg, run_seed, pad_id
        self.share_prompt = share_prompt  # model.share_prompt: how the step's pairs are captured
        self.oracle, self.accept_oracle = oracle, accept_oracle or oracle
        self.untied = untie_head(model)
        for p in model.parameters():
            p.requires_grad_(False)
        self.head = model.get_output_embeddings()
        self.w = self.head.weight.detach().float().clone()  # fp32 master copy (DESIGN.md §2)
        self._spare: torch.Tensor | None = None  # the next proposed head is written here (_spare_head)
        self.checked = False
        self._buffers: dict[str, torch.Tensor] = {}  # reused across steps: fresh big tensors cost page faults
        self.generator = None
        self.extras: list[Callable[[int, dict, torch.Tensor], None]] = []  # add fields to each step's record
        gen_oracles = [o for o in (self.oracle, self.accept_oracle) if o.needs == Evidence.GENERATIONS]
        if gen_oracles:
            if tokenizer is None:
                raise ValueError(f"oracle '{gen_oracles[0].name}' judges generated text: ZOTrainer needs the tokenizer")
            from compo.zo.generate import GenerationSettings, HeadGenerator

            o = gen_oracles[0]
            settings = GenerationSettings(getattr(o, "max_new_tokens", 64), getattr(o, "do_sample", False),
                                          getattr(o, "temperature", 1.0))
            self.generator = HeadGenerator(model, tokenizer, settings, run_seed)

    # ------------------------------------------------------------------ one step

    def _batch(self, texts: Sequence, n: int, base: torch.Tensor, cand: torch.Tensor | None,
               generate=None, base_responses=None) -> OracleBatch:
        b = len(texts)
        return OracleBatch(
            prompts=[r.prompt for r in texts], chosen=[r.chosen for r in texts], rejected=[r.rejected for r in texts],
            n_candidates=n, base=SeqLogProbs(base[:b], base[b:]),
            candidates=None if cand is None else SeqLogProbs(cand[:, :b], cand[:, b:]),
            generate=generate, extra={} if base_responses is None else {"base_responses": base_responses},
        )

    def _ask(self, oracle: Oracle, t: int, items, texts, inp: HeadInputs, base: torch.Tensor, base_lp: torch.Tensor,
             hz: torch.Tensor, z: torch.Tensor, s: torch.Tensor, indices: list[int],
             matmul_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One oracle call on candidates W + s_i z_i, computing only the evidence it needs
        (``base``: the base logits through :func:`shift_rows`)."""
        if oracle.needs == Evidence.LOGPROBS:
            tile = vocab_tile(z.device, hz.shape[0], z.shape[1])
            out = None if tile else self._buffer("logits", z.shape[0] * hz.shape[0] * z.shape[1])
            cand = candidate_logps(base, hz, z, s, inp, out=out, matmul_dtype=matmul_dtype, scratch=self._buffer,
                                   tile=tile)
            return oracle.compare(self._batch(texts, len(indices), base_lp, cand))
        return oracle.compare(self._generation_batch(t, items, texts, base_lp, z, s, indices))

    def _generation_batch(self, t: int, items, texts, base_lp: torch.Tensor, z: torch.Tensor, s: torch.Tensor,
                          indices: list[int]) -> OracleBatch:
        """A batch whose ``generate`` gives candidates W + s_i z_i's responses (base ones made once a step)."""
        prompts = [it.prompt for it in items]
        if self._base_responses is None:
            self._base_responses = self.generator.generate(prompts, self.w, step=t)[0]
        gen = lambda: self.generator.generate(prompts, self.w, z, s, step=t, indices=indices)  # noqa: E731
        return self._batch(texts, len(indices), base_lp, None, gen, self._base_responses)

    def _buffer(self, name: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A flat scratch tensor of at least ``numel`` entries, kept across steps."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            self._buffers.pop(name, None)
            buf = self._buffers[name] = torch.empty(numel, dtype=dtype, device=self.w.device)
        return buf[:numel]

    def _spare_head(self) -> torch.Tensor:
        """A head-sized tensor for the next proposed head: the previous master head, swapped out
        when a step is taken (a fresh 100+ MB tensor costs page faults on every step)."""
        if self._spare is None or self._spare.shape != self.w.shape or self._spare is self.w:
            self._spare = torch.empty_like(self.w)
        return self._spare

    def _check_head(self, inp: HeadInputs) -> None:
        """The cached head must reproduce the model's own log-probs (:func:`require_plain_head`)."""
        require_plain_head(inp, self.head, CHECK_ATOL_PER_TOKEN)
        self.checked = True

    @torch.no_grad()
    def step(self, t: int, items: Sequence, texts: Sequence) -> dict:
        """Run step ``t`` on encoded pairs ``items`` (texts: their PairRows). Returns the log record."""
        cfg, device = self.cfg, self.w.device
        t0 = time.perf_counter()
        self._base_responses = None  # generated once per step, on first need
        inp = capture(self.model, items, self.pad_id, check=not self.checked, shared=self.share_prompt)
        base = shift_rows(base_logits(self.w, inp))  # candidates: base + offset, no max pass (head.py)
        tile = vocab_tile(device, inp.h.shape[0], self.w.shape[0])
        base_lp = base_logps(base, inp, tile)  # the candidates' arithmetic, at offset 0; None: not finite
        if base_lp is None:
            raise Diverged(f"stage2 step {t + 1}: the model's log-probs of the step's pairs are not finite "
                           "(the body or the head holds non-finite values)")
        refused0 = self._refusals()
        if not self.checked:
            self._check_head(inp)
        v, hdim = self.w.shape
        if cfg.estimator == "projected":
            q = projection_basis(inp.h)
            hz, width = inp.h @ q, q.shape[1]
        else:
            q, hz, width = None, inp.h, hdim
        source = PerturbationSource(self.seed, (v, width), cfg.radius, cfg.distribution, device, rng=cfg.rng)
        matmul_dtype = getattr(torch, cfg.matmul_dtype)
        low = 0 if matmul_dtype == torch.float32 else matmul_dtype.itemsize
        c = cfg.chunk_size or chunk_size(cfg.memory_budget_mb, v, width, inp.h.shape[0], low)
        c = min(c, cfg.m)
        buf = self._buffer("z", c * v * width).view(c, v, width)
        u = self._buffer("u", v * width).view(v, width).zero_()  # sum_i y_i z_i, fp32
        votes = torch.zeros(cfg.m, dtype=torch.int8)
        chunks = [range(a, min(cfg.m, a + c)) for a in range(0, cfg.m, c)]
        world, rank = world_info()
        group = Ranks(world, rank, device) if world > 1 else None
        # a generation oracle hears the whole step's questions at once (settle), collectively
        # across ranks: each distinct question asked by one rank, every rank gets every vote
        deferred = isinstance(self.oracle, GenerationOracle)

        def accumulate(idx: range, z: torch.Tensor, s: torch.Tensor) -> None:
            coef = votes[idx.start : idx.stop].to(device=device, dtype=torch.float32) * (s / cfg.radius)
            u.view(1, -1).addmm_(coef[None], z.flatten(1))

        # CPU likelihood oracles: each candidate drawn and evaluated by one thread, tile by tile (fused.py)
        fused = bool(tile) and not deferred and self.oracle.needs == Evidence.LOGPROBS and worth_fusing(v, width)
        t1 = time.perf_counter()
        for k, idx in enumerate(chunks):
            if k % world != rank:
                continue
            if fused:
                cand, s = fused_logps(source, t, list(idx), buf, base, hz, inp, tile, matmul_dtype)
                z = buf[: len(idx)]
                y = self.oracle.compare(self._batch(texts, len(idx), base_lp, cand))
            else:
                z = source.draw(t, idx, out=buf)
                s = source.scales(z)
                if deferred:
                    self.oracle.collect(self._generation_batch(t, items, texts, base_lp, z, s, list(idx)), idx.start)
                    continue
                y = self._ask(self.oracle, t, items, texts, inp, base, base_lp, hz, z, s, list(idx), matmul_dtype)
            votes[idx.start : idx.stop] = y.to(torch.int8).cpu()
            if world == 1:
                accumulate(idx, z, s)
        if deferred:
            votes = self.oracle.settle(cfg.m, len(items), group).to(torch.int8).cpu()
        elif world > 1:
            votes = all_gather_votes(votes, device)
        if world > 1 or deferred:
            # only votes travel; every rank regenerates z from seeds and sums u in the canonical
            # chunk order, the same arithmetic as one process: the result is world-size free
            for idx in chunks:
                z = source.draw(t, idx, out=buf)
                accumulate(idx, z, source.scales(z))
        t_perturb = time.perf_counter() - t1
        if faults.poisoned("zo.votes"):
            u.fill_(float("nan"))
        if not all_finite(u):
            raise Diverged(f"stage2 step {t + 1}: the estimate sum(y_i z_i) is not finite (zo.radius={cfg.radius})")
        n_minus = int((votes == BETTER).sum())
        frac = n_minus / cfg.m
        self.last_u = u
        u_sq = float(torch.linalg.vector_norm(u, dtype=torch.float64) ** 2)
        n_votes, dim, sphere = int((votes != 0).sum()), v * width, cfg.distribution == "sphere"
        rec: dict = {"stage": "stage2", "step": t + 1, "n_minus": n_minus, "frac_minus": frac,
                     "n_abstain": cfg.m - n_votes, "signal_cos": signal_cosine(u_sq, n_votes, dim, sphere),
                     "signal_mu2": signal_mu2(u_sq, n_votes, dim, sphere), "u_sq_norm": u_sq,
                     "n_votes": n_votes, "dim": dim}
        if cfg.skip_rule == "binomial" or cfg.agreement_stats:
            rec.update(agreement_record(agreements(source, t, chunks, votes, u, buf, cfg.radius), n_votes,
                                        cfg.skip_alpha))
        if cfg.skip_rule == "fixed":
            reason = skip_reason(n_minus, cfg.m, cfg.skip_threshold)
        else:
            reason = agreement_skip_reason(rec["n_agree"], rec["n_votes"], cfg.skip_alpha)
        new_w = g_sparse = None
        if reason is None:
            g = self._buffer("g", v * hdim).view(v, hdim)  # reused: a fresh head-sized tensor page-faults
            g = normalise(torch.matmul(u, q.T, out=g) if q is not None else u, out=g)
            if g is None:
                reason = "zero direction: the votes cancel exactly"
            else:
                g_sparse = sparsify(g, cfg.sparsity, cfg.lambda_g, cfg.rho, inplace=True)
                new_w = proposed_head(self.w, g_sparse, cfg.gamma, frac, out=self._spare_head())
        if new_w is not None and cfg.acceptance_check:
            step_dir = (new_w - self.w)[None]
            verdict = torch.zeros(1, dtype=torch.int8)
            if isinstance(self.accept_oracle, GenerationOracle):  # rank 0 generates, every rank settles
                if rank == 0:
                    self.accept_oracle.collect(self._generation_batch(t, items, texts, base_lp, step_dir,
                                                                      torch.ones(1, device=device), [-2]), 0)
                verdict = self.accept_oracle.settle(1, len(items), group).to(torch.int8).cpu()
            else:
                if rank == 0:
                    verdict = self._ask(self.accept_oracle, t, items, texts, inp, base, base_lp, inp.h, step_dir,
                                        torch.ones(1, device=device), [-2]).to(torch.int8).cpu()
                verdict = broadcast_votes(verdict, device)
            rec["accepted"] = bool(int(verdict[0]) == BETTER)
            if not rec["accepted"]:
                reason, new_w = "rejected by the acceptance check", None
        if self._budgeted and self._refused_anywhere(self._refusals() - refused0, device):
            raise BudgetSpent(f"the judge's budget ran out during step {t + 1} (its votes would be incomplete); "
                              "raise max_calls / max_tokens_total and --resume to redo that step (answers already "
                              "paid for are cached)")
        if new_w is not None and faults.poisoned("zo.update"):
            new_w = new_w * float("inf")
        if new_w is not None and not all_finite(new_w):
            raise Diverged(f"stage2 step {t + 1}: the updated head is not finite (zo.gamma={cfg.gamma}); "
                           "model/ was not written and the last checkpoint is kept")
        after_lp = base_lp
        if new_w is not None:
            dtype = self.head.weight.dtype
            rec.update(update_record(self.w, new_w, g_sparse, dtype))
            self._spare, self.w = self.w, new_w
            self.head.weight.data.copy_(new_w.to(dtype))
            after_lp = head_logps(self.w, inp)
            if not torch.isfinite(after_lp).all():
                raise Diverged(f"stage2 step {t + 1}: the updated head gives non-finite log-probs (zo.gamma={cfg.gamma})")
        else:
            rec.update(frac_changed=0.0, frac_kept=0.0, energy_kept=0.0, update_norm=0.0, update_ratio=0.0)
        rec["skipped"] = reason is not None
        rec["skip_reason"] = reason
        b = inp.n_pairs
        rec["pairs"] = [
            {"source": texts[j].source, "logp_chosen_before": float(base_lp[j]), "logp_rejected_before": float(base_lp[b + j]),
             "logp_chosen_after": float(after_lp[j]), "logp_rejected_after": float(after_lp[b + j])}
            for j in range(b)
        ]
        rec["wall_s"] = round(time.perf_counter() - t0, 4)
        rec["perturbations_per_s"] = round(cfg.m / max(t_perturb, 1e-9), 2)
        rec["chunk"] = c
        rec.update({f"oracle/{k}": val for k, val in self.oracle.stats().items()})
        if self.accept_oracle is not self.oracle:
            rec.update({f"accept_oracle/{k}": val for k, val in self.accept_oracle.stats().items()})
        return rec

    @property
    def _budgeted(self) -> bool:
        """Whether an oracle can refuse votes for budget (the same on every rank: set by the config);
        the likelihood oracle cannot, so its steps pay no extra collective."""
        return any(type(o).budget_refusals is not Oracle.budget_refusals for o in (self.oracle, self.accept_oracle))

    def _refusals(self) -> int:
        return sum(o.budget_refusals() for o in {id(o): o for o in (self.oracle, self.accept_oracle)}.values())

    @staticmethod
    def _refused_anywhere(n: int, device: torch.device) -> bool:
        """Whether any process had a vote refused for budget this step (all ranks agree)."""
        return bool(all_reduce_sum(torch.tensor([n], dtype=torch.float64), comm_device(device)).item() > 0)

    # ------------------------------------------------------------------ the loop

    def pairs_for_step(self, t: int, n: int) -> list[int]:
        """Pair indices of step t: a seeded permutation of the noisy pairs per epoch."""
        pps = self.cfg.pairs_per_step
        per_epoch = max(1, math.ceil(n / pps))
        epoch, k = divmod(t, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7919 + 17 + epoch))
        return perm[(torch.arange(k * pps, (k + 1) * pps) % n)].tolist()

    def total_steps(self, n: int) -> int:
        from compo.checks import zo_total_steps

        return zo_total_steps(self.cfg, n)

    def train(self, items: Sequence, texts: Sequence, run: RunDir, resume: bool = False,
              callback: Callable[[int, dict], None] | None = None, progress: bool = True) -> dict:
        """All steps over the noisy pairs; checkpoints to run/checkpoints/zo; returns the totals."""
        if not items:
            raise ValueError("stage 2 has no noisy pairs to train on (see split counts; raise split.delta?)")
        ckpt_dir = run.checkpoints / "zo"
        total = self.total_steps(len(items))
        totals = {"steps": 0, "steps_taken": 0, "steps_skipped": 0, "skip_reasons": {}, "sum_frac_minus": 0.0}
        start = 0
        rank0 = world_info()[1] == 0
        if resume and ckpt_dir.exists():
            start, totals = self.load_checkpoint(ckpt_dir, total)
            say(f"stage2: resumed from {ckpt_dir} at step {start}/{total}")
        elif rank0:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        if rank0:
            run.truncate_metrics("stage2", start)
        bar = progress_bar(range(start, total), "stage2 (ComPO)", total=total, initial=start, unit="step",
                           enabled=progress and rank0)
        for t in bar:
            idx = self.pairs_for_step(t, len(items))
            try:
                rec = self.step(t, [items[i] for i in idx], [texts[i] for i in idx])
            except JudgeQuit as e:
                if rank0:
                    self.save_checkpoint(ckpt_dir, t, totals)
                totals["stopped"] = f"{e}; stopped before step {t + 1}, --resume continues from there"
                say(f"stage2: {totals['stopped']}")
                raise Paused(f"stage2 paused before step {t + 1} of {total}: {e}; the checkpoint is in "
                             f"{ckpt_dir} and --resume continues from there", totals) from None
            for extra in self.extras:
                extra(t, rec, self.w)
            mon = totals.setdefault("monitor", new_state())
            for msg in observe(mon, rec, self.cfg.pairs_per_step, getattr(self.oracle, "aggregation", None),
                               rec["dim"], self.cfg.distribution == "sphere"):
                rec.setdefault("warnings", []).append(msg)
                totals.setdefault("warnings", []).append(f"stage2 step {t + 1}: {msg}")
                if rank0:
                    warn(f"stage2 step {t + 1}: {msg}")
            if rank0:
                run.log(rec)
            if rec.get("update_ratio", 0.0) > LARGE_UPDATE and not totals.get("large_update_warned"):
                totals["large_update_warned"] = True
                msg = (f"stage2 step {t + 1}: the update moved the head by {100 * rec['update_ratio']:.1f}% of its "
                       f"norm (zo.gamma={self.cfg.gamma}); steps that large leave the linear regime the oracle "
                       "votes in and usually hurt: lower zo.gamma")
                totals.setdefault("warnings", []).append(msg)
                warn(msg)
            if rec.get("oracle/budget_exhausted") and not totals.get("budget_exhausted"):
                totals["budget_exhausted"] = True
                warn(f"stage2: the judge's budget is spent at step {t + 1}: from here on its votes abstain "
                     "(raise max_calls / max_tokens_total and --resume to continue paying)")
            totals["steps"] += 1
            totals["sum_frac_minus"] += rec["frac_minus"]
            if rec["skipped"]:
                totals["steps_skipped"] += 1
                key = rec["skip_reason"].split(":")[0]
                totals["skip_reasons"][key] = totals["skip_reasons"].get(key, 0) + 1
            else:
                totals["steps_taken"] += 1
            bar.set_postfix(n_minus=rec["n_minus"], taken=totals["steps_taken"], cos=f"{rec['signal_cos']:.3f}",
                            **({"agree": f"{rec['agree_rate']:.3f}"} if "agree_rate" in rec else {}),
                            pps=rec["perturbations_per_s"])
            if self.cfg.checkpoint_every and (t + 1) % self.cfg.checkpoint_every == 0 and t + 1 < total:
                if world_info()[1] == 0:
                    self.save_checkpoint(ckpt_dir, t + 1, totals)
            faults.point("zo.step")
            if callback is not None:
                callback(t + 1, rec)
        return totals

    def load_checkpoint(self, ckpt_dir: Path, total: int) -> tuple[int, dict]:
        """Restore the head and totals from ``ckpt_dir`` (checkpoint.load_head checks them)."""
        step, totals, w = load_head(ckpt_dir, tuple(self.w.shape), total)
        self.w = w.to(self.w.device)
        self.head.weight.data.copy_(self.w.to(self.head.weight.dtype))
        return step, totals

    def save_checkpoint(self, ckpt_dir: Path, step: int, totals: dict) -> None:
        """Head (fp32 master), step, seed and totals, written as one directory swap."""
        save_head(ckpt_dir, self.w, step, self.seed, totals, self.cfg.m, self.cfg.radius)
