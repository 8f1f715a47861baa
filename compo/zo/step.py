"""One ComPO step: cache the body's hidden states, fix the step's space (basis and vocabulary
support), vote on m perturbed heads in chunks, estimate a sparse normalised direction, skip on
weak signal, update the fp32 master head (DESIGN.md §2)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from compo.core import faults
from compo.core.config import ZOConfig
from compo.core.dist import Ranks, all_gather_votes, all_reduce_sum, broadcast_votes, comm_device, world_info
from compo.core.errors import Diverged
from compo.scoring.models import untie_head
from compo.zo.estimator import (
    agreement_record, agreement_skip_reason, agreements, all_finite, dtype_overflow, normalise, proposed_head,
    signal_cosine, signal_mu2, skip_reason, sparsify, update_record,
)
from compo.zo.fused import fused_logps, worth_fusing
from compo.zo.head import (
    HeadInputs, base_logits, base_logps, candidate_logps, capture, chunk_size, head_logps, require_plain_head,
    shift_rows, vocab_tile,
)
from compo.zo.perturb import PerturbationSource
from compo.zo.oracles import check_estimator
from compo.zo.support import StepSpace, first_order, step_space
from oracles.base import BETTER, Evidence, Oracle, OracleBatch, SeqLogProbs
from oracles.generation import GenerationOracle
from oracles.judges.base import JudgeQuit

CHECK_ATOL_PER_TOKEN = 2e-3  # self-check floor (fp32); bf16/fp16 scale up: head.self_check_tolerance


class BudgetSpent(JudgeQuit):
    """A judge refused votes for lack of budget during a step: the step is redone on --resume."""


@dataclass
class Draws:
    """How a step's perturbations were drawn: enough to regenerate any of them."""

    source: PerturbationSource
    chunks: list[range]
    buf: torch.Tensor  # (chunk, *shape) scratch for redraws
    chunk: int


class ZOStep:
    """The per-step machinery of stage 2 over a model whose body stays frozen."""

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
        self.extras: list = []  # hooks adding fields to each step's record: (step, record, master head)
        self.last_u: torch.Tensor | None = None  # the last step's sum_i y_i z_i, on its support's rows
        self.last_space: StepSpace | None = None
        gen_oracles = [o for o in (self.oracle, self.accept_oracle) if o.needs == Evidence.GENERATIONS]
        if gen_oracles:
            if tokenizer is None:
                raise ValueError(f"oracle '{gen_oracles[0].name}' judges generated text: ZOTrainer needs the tokenizer")
            from compo.zo.generate import GenerationSettings, HeadGenerator

            o = gen_oracles[0]
            settings = GenerationSettings(getattr(o, "max_new_tokens", 64), getattr(o, "do_sample", False),
                                          getattr(o, "temperature", 1.0))
            self.generator = HeadGenerator(model, tokenizer, settings, run_seed)

    # ------------------------------------------------------------------ oracle calls

    def _batch(self, texts: Sequence, n: int, base: torch.Tensor, cand: torch.Tensor | None,
               generate=None, base_responses=None) -> OracleBatch:
        b = len(texts)
        return OracleBatch(
            prompts=[r.prompt for r in texts], chosen=[r.chosen for r in texts], rejected=[r.rejected for r in texts],
            n_candidates=n, base=SeqLogProbs(base[:b], base[b:]),
            candidates=None if cand is None else SeqLogProbs(cand[:, :b], cand[:, b:]),
            generate=generate, extra={} if base_responses is None else {"base_responses": base_responses},
        )

    def _ask(self, oracle: Oracle, t: int, items, texts, sp: StepSpace, z: torch.Tensor, s: torch.Tensor,
             indices: list[int], matmul_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One oracle call on candidates W + s_i z_i (z on ``sp``'s rows and basis), computing
        only the evidence it needs."""
        if oracle.needs == Evidence.LOGPROBS:
            n_tok, v = sp.hz.shape[0], z.shape[1]
            tile = vocab_tile(z.device, n_tok, v)
            out = None if tile else self._buffer("logits", z.shape[0] * n_tok * v)
            cand = candidate_logps(sp.base, sp.hz, z, s, sp.inp, out=out, matmul_dtype=matmul_dtype,
                                   scratch=self._buffer, tile=tile, lse_out=sp.lse_out)
            return oracle.compare(self._batch(texts, len(indices), sp.base_lp, cand))
        return oracle.compare(self._generation_batch(t, items, texts, sp.base_lp, z, s, indices))

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

    # ------------------------------------------------------------------ one step, in parts

    def _evidence(self, t: int, items) -> tuple[HeadInputs, torch.Tensor, torch.Tensor]:
        """The step's cached head inputs, shifted base logits and base log-probs."""
        inp = capture(self.model, items, self.pad_id, check=not self.checked, shared=self.share_prompt)
        base = shift_rows(base_logits(self.w, inp))  # candidates: base + offset, no max pass (head.py)
        base_lp = base_logps(base, inp, vocab_tile(self.w.device, inp.h.shape[0], self.w.shape[0]))
        if base_lp is None:
            raise Diverged(f"stage2 step {t + 1}: the model's log-probs of the step's pairs are not finite "
                           "(the body or the head holds non-finite values)")
        if not self.checked:  # the cached head must reproduce the model's own log-probs
            require_plain_head(inp, self.head, CHECK_ATOL_PER_TOKEN)
            self.checked = True
        return inp, base, base_lp

    def _vote(self, t: int, items, texts, sp: StepSpace) -> tuple[torch.Tensor, torch.Tensor, float, Draws]:
        """The m votes and u = sum_i y_i (s_i / r) z_i (on the support's rows), the seconds spent."""
        cfg, device = self.cfg, self.w.device
        v, width = sp.shape
        source = PerturbationSource(self.seed, (v, width), cfg.radius, cfg.distribution, device, rng=cfg.rng)
        matmul_dtype = getattr(torch, cfg.matmul_dtype)
        low = 0 if matmul_dtype == torch.float32 else matmul_dtype.itemsize
        c = min(cfg.chunk_size or chunk_size(cfg.memory_budget_mb, v, width, sp.hz.shape[0], low), cfg.m)
        draws = Draws(source, [range(a, min(cfg.m, a + c)) for a in range(0, cfg.m, c)],
                      self._buffer("z", c * v * width).view(c, v, width), c)
        u = self._buffer("u", v * width).view(v, width).zero_()  # fp32
        votes = torch.zeros(cfg.m, dtype=torch.int8)
        world, rank = world_info()
        # a generation oracle hears the whole step's questions in one call, collectively across
        # ranks: each distinct question asked by one rank, every rank gets every vote
        deferred = isinstance(self.oracle, GenerationOracle)
        tile = vocab_tile(device, sp.hz.shape[0], v)
        # CPU likelihood oracles: each candidate drawn and evaluated by one thread, tile by tile (fused.py)
        fused = bool(tile) and not deferred and self.oracle.needs == Evidence.LOGPROBS and worth_fusing(v, width)
        mine = [idx for k, idx in enumerate(draws.chunks) if k % world == rank]
        t1 = time.perf_counter()
        if deferred:
            votes = self._vote_generated(t, items, texts, sp, draws, mine).to(torch.int8).cpu()
        else:
            for idx in mine:
                if fused:
                    cand, s = fused_logps(source, t, list(idx), draws.buf, sp.base, sp.hz, sp.inp, tile,
                                          matmul_dtype, sp.lse_out)
                    z = draws.buf[: len(idx)]
                    y = self.oracle.compare(self._batch(texts, len(idx), sp.base_lp, cand))
                else:
                    z = source.draw(t, idx, out=draws.buf)
                    s = source.scales(z)
                    y = self._ask(self.oracle, t, items, texts, sp, z, s, list(idx), matmul_dtype)
                votes[idx.start : idx.stop] = y.to(torch.int8).cpu()
                if world == 1:
                    self._accumulate(u, votes, idx, z, s)
            if world > 1:
                votes = all_gather_votes(votes, device)
        if world > 1 or deferred:
            # only votes travel; every rank regenerates z from seeds and sums u in the canonical
            # chunk order, the same arithmetic as one process: the result is world-size free
            for idx in draws.chunks:
                z = source.draw(t, idx, out=draws.buf)
                self._accumulate(u, votes, idx, z, source.scales(z))
        return votes, u, time.perf_counter() - t1, draws

    def _vote_generated(self, t: int, items, texts, sp: StepSpace, draws: Draws, mine: list[range]) -> torch.Tensor:
        """A generation oracle's m votes in one call: this rank's chunks, each drawn just before
        its candidates generate (the draws share one buffer), then judged together."""
        def batches():
            for idx in mine:
                z = draws.source.draw(t, idx, out=draws.buf)
                yield self._generation_batch(t, items, texts, sp.base_lp, z, draws.source.scales(z), list(idx)), idx.start

        return self.oracle.vote(batches(), self.cfg.m, len(items), self._group())

    def _group(self) -> Ranks | None:
        """The processes a generation oracle's round is shared with (None: this one alone)."""
        world, rank = world_info()
        return Ranks(world, rank, self.w.device) if world > 1 else None

    def _accumulate(self, u: torch.Tensor, votes: torch.Tensor, idx: range, z: torch.Tensor, s: torch.Tensor) -> None:
        coef = votes[idx.start : idx.stop].to(device=u.device, dtype=torch.float32) * (s / self.cfg.radius)
        u.view(1, -1).addmm_(coef[None], z.flatten(1))

    def _signal(self, t: int, votes: torch.Tensor, u: torch.Tensor, sp: StepSpace, inp: HeadInputs,
                base: torch.Tensor, draws: Draws) -> dict:
        """The step's vote counts and signal diagnostics: the moment estimate of the signal
        cosine, and for log-prob oracles the support's first-order energy and cosine."""
        cfg = self.cfg
        n_minus = int((votes == BETTER).sum())
        u_sq = float(torch.linalg.vector_norm(u, dtype=torch.float64) ** 2)
        n_votes, dim, sphere = int((votes != 0).sum()), u.numel(), cfg.distribution == "sphere"
        moment = signal_cosine(u_sq, n_votes, dim, sphere)
        rec: dict = {"stage": "stage2", "step": t + 1, "n_minus": n_minus, "frac_minus": n_minus / cfg.m,
                     "n_abstain": cfg.m - n_votes, "signal_cos": moment, "signal_cos_moment": moment,
                     "signal_cos_source": "moment", "signal_mu2": signal_mu2(u_sq, n_votes, dim, sphere),
                     "u_sq_norm": u_sq, "n_votes": n_votes, "dim": dim, "support_size": sp.shape[0]}
        if self.oracle.needs == Evidence.LOGPROBS:
            rule = getattr(self.oracle, "rule", None)  # the likelihood rule: its expected direction is known
            if rule is None and sp.rows is None:
                rec["support_energy"] = 1.0  # every row: nothing of the direction is outside
            else:
                fo = first_order(base, inp, sp.hz, rule if rule in ("strict", "relaxed") else "strict")
                rec["support_energy"] = fo.energy(sp.rows)
            if rule is not None:
                rec.update(signal_cos=max(0.0, fo.cosine(u, sp.rows)), signal_cos_source="first_order")
        if cfg.skip_rule == "binomial" or cfg.agreement_stats:
            rec.update(agreement_record(agreements(draws.source, t, draws.chunks, votes, u, draws.buf, cfg.radius),
                                        n_votes, cfg.skip_alpha))
        return rec

    def _propose(self, rec: dict, u: torch.Tensor, sp: StepSpace) -> tuple[str | None, torch.Tensor | None, torch.Tensor | None]:
        """(skip reason, proposed head, sparse direction): the skip rule, then
        W - gamma (N-/m) g_sparse with g = u / ||u|| mapped back to the head's rows and basis."""
        cfg = self.cfg
        if cfg.skip_rule == "fixed":
            reason = skip_reason(rec["n_minus"], cfg.m, cfg.skip_threshold)
        else:
            reason = agreement_skip_reason(rec["n_agree"], rec["n_votes"], cfg.skip_alpha)
        if reason is not None:
            return reason, None, None
        v, hdim = self.w.shape
        g = self._buffer("g", v * hdim).view(v, hdim)  # reused: a fresh head-sized tensor page-faults
        out = g if sp.rows is None else None  # a support's rows are normalised and ranked within S
        d = normalise(torch.matmul(u, sp.q.T, out=out) if sp.q is not None else u, out=out)
        if d is None:
            return "zero direction: the votes cancel exactly", None, None
        d = sparsify(d, cfg.sparsity, cfg.lambda_g, cfg.rho, inplace=True)
        if sp.rows is not None:
            d = g.zero_().index_copy_(0, sp.rows, d)
        return None, proposed_head(self.w, d, cfg.gamma, rec["frac_minus"], out=self._spare_head()), d

    def _accept(self, t: int, items, texts, new_w: torch.Tensor, whole: StepSpace) -> bool:
        """The acceptance check: does the (acceptance) oracle prefer the proposed head?"""
        device = self.w.device
        rank = world_info()[1]
        step_dir, one = (new_w - self.w)[None], torch.ones(1, device=device)
        verdict = torch.zeros(1, dtype=torch.int8)
        if isinstance(self.accept_oracle, GenerationOracle):  # rank 0 generates, every rank takes part
            mine = [(self._generation_batch(t, items, texts, whole.base_lp, step_dir, one, [-2]), 0)] if rank == 0 else []
            verdict = self.accept_oracle.vote(mine, 1, len(items), self._group()).to(torch.int8).cpu()
        else:
            if rank == 0:
                verdict = self._ask(self.accept_oracle, t, items, texts, whole, step_dir, one, [-2]).to(torch.int8).cpu()
            verdict = broadcast_votes(verdict, device)
        return int(verdict[0]) == BETTER

    def _apply(self, t: int, new_w: torch.Tensor, g_sparse: torch.Tensor, inp: HeadInputs) -> tuple[dict, torch.Tensor]:
        """Make ``new_w`` the master head and the model's; (the update record, log-probs after)."""
        if faults.poisoned("zo.update"):
            new_w = new_w * float("inf")
        if not all_finite(new_w):
            raise Diverged(f"stage2 step {t + 1}: the updated head is not finite (zo.gamma={self.cfg.gamma}); "
                           "model/ was not written and the last checkpoint is kept")
        dtype = self.head.weight.dtype
        overflow = dtype_overflow(new_w, dtype, inp.h, inp.bias)
        if overflow is not None:
            raise Diverged(f"stage2 step {t + 1}: {overflow} (zo.gamma={self.cfg.gamma}); "
                           "model/ was not written and the last checkpoint is kept")
        rec = update_record(self.w, new_w, g_sparse, dtype)
        self._spare, self.w = self.w, new_w
        self.head.weight.data.copy_(new_w.to(dtype))
        after_lp = head_logps(self.w, inp)
        if not torch.isfinite(after_lp).all():
            raise Diverged(f"stage2 step {t + 1}: the updated head gives non-finite log-probs (zo.gamma={self.cfg.gamma})")
        return rec, after_lp

    @torch.no_grad()
    def step(self, t: int, items: Sequence, texts: Sequence) -> dict:
        """Run step ``t`` on encoded pairs ``items`` (texts: their PairRows). Returns the log record."""
        cfg, t0 = self.cfg, time.perf_counter()
        self._base_responses = None  # generated once per step, on first need
        inp, base, base_lp = self._evidence(t, items)
        refused0 = self._refusals()
        sp = step_space(cfg.estimator, cfg.support, cfg.support_k, inp, base, base_lp)
        votes, u, t_perturb, draws = self._vote(t, items, texts, sp)
        if faults.poisoned("zo.votes"):
            u.fill_(float("nan"))
        if not all_finite(u):
            raise Diverged(f"stage2 step {t + 1}: the estimate sum(y_i z_i) is not finite (zo.radius={cfg.radius})")
        self.last_u, self.last_space = u, sp
        rec = self._signal(t, votes, u, sp, inp, base, draws)
        reason, new_w, g_sparse = self._propose(rec, u, sp)
        if new_w is not None and cfg.acceptance_check:
            rec["accepted"] = self._accept(t, items, texts, new_w, StepSpace.whole(inp, base, base_lp))
            if not rec["accepted"]:
                reason, new_w = "rejected by the acceptance check", None
        if self._budgeted and self._refused_anywhere(self._refusals() - refused0, self.w.device):
            raise BudgetSpent(f"the judge's budget ran out during step {t + 1} (its votes would be incomplete); "
                              "raise max_calls / max_tokens_total and --resume to redo that step (answers already "
                              "paid for are cached)")
        after_lp = base_lp
        if new_w is not None:
            upd, after_lp = self._apply(t, new_w, g_sparse, inp)
            rec.update(upd)
        else:
            rec.update(frac_changed=0.0, frac_kept=0.0, energy_kept=0.0, update_norm=0.0, update_ratio=0.0)
        rec["skipped"], rec["skip_reason"] = reason is not None, reason
        b = inp.n_pairs
        rec["pairs"] = [
            {"source": texts[j].source, "logp_chosen_before": float(base_lp[j]), "logp_rejected_before": float(base_lp[b + j]),
             "logp_chosen_after": float(after_lp[j]), "logp_rejected_after": float(after_lp[b + j])}
            for j in range(b)
        ]
        rec.update(wall_s=round(time.perf_counter() - t0, 4), chunk=draws.chunk,
                   perturbations_per_s=round(cfg.m / max(t_perturb, 1e-9), 2))
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
