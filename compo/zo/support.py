"""The vocabulary support of a stage-2 step: which head rows the perturbations touch, the step's
inputs restricted to them, and the first-order picture that says how much signal they keep.

The head gradient of log p(y) is ``sum_t (e_{y_t} - p_t) h_t^T``: only the target rows and the
rows the model puts mass on matter, so the likelihood rule's expected vote direction lives almost
entirely in a few hundred of V rows (docs/zo_support.md). Perturbing only the rows in S divides
the dimension d by V/|S|, and a candidate's logits change only in S: per position, the
log-sum-exp over the rows outside S is computed once a step and combined with each candidate's
|S| rows (:func:`compo.zo.head.shifted_logps`'s ``lse_out``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from compo.zo.head import HeadInputs, base_logps, projection_basis, vocab_tile

SUPPORTS = ("all", "pair", "topk")
LOW_ENERGY = 0.9  # warn when less of the expected direction than this lies in S


def support_rows(kind: str, base: torch.Tensor, targets: torch.Tensor, k: int = 8) -> torch.Tensor | None:
    """Sorted vocabulary rows of the step's support (None: every row).

    ``pair``: the step's target tokens; ``topk``: those plus the ``k`` largest logits of ``base``
    (T x V, the current head's) at every scored position. Fixed before any perturbation is drawn,
    from the base head alone, so every process finds the same rows."""
    if kind == "all":
        return None
    if kind not in SUPPORTS:
        raise ValueError(f"unknown zo.support '{kind}', allowed: {', '.join(SUPPORTS)}")
    rows = targets.reshape(-1)
    if kind == "topk" and k > 0:
        top = torch.topk(base, min(k, base.shape[1]), dim=1).indices.reshape(-1)
        rows = torch.cat([rows, top.to(rows.device)])
    return torch.unique(rows, sorted=True)


@dataclass
class Restricted:
    """A step's evaluation inputs on the support: candidates' logits are ``base + hs z^T`` over
    the |S| columns, combined per position with ``lse_out``, the base log-sum-exp outside S."""

    base: torch.Tensor  # (T, |S|) shifted base logits of the support's rows
    inp: HeadInputs  # targets renumbered to positions in ``rows``
    lse_out: torch.Tensor  # (T,) log-sum-exp of the base logits outside S (-inf when S is everything)
    rows: torch.Tensor  # (|S|,) sorted vocabulary ids


def restrict(base: torch.Tensor, inp: HeadInputs, rows: torch.Tensor) -> Restricted:
    """The step's inputs on ``rows`` (which hold every target: both supports include them)."""
    pos = torch.searchsorted(rows, inp.targets)
    if bool((pos >= rows.numel()).any()) or not torch.equal(rows[pos.clamp(max=rows.numel() - 1)], inp.targets):
        raise ValueError("the support must hold every target token of the step")
    outside = base.index_fill(1, rows, float("-inf"))
    lse_out = torch.logsumexp(outside, dim=1)
    return Restricted(base.index_select(1, rows).contiguous(), dataclasses.replace(inp, targets=pos),
                      lse_out, rows)


# ------------------------------------------------------------------ the first-order picture


@dataclass
class FirstOrder:
    """The oracle's expected vote direction to first order (Gaussian z, linear regime), held as
    per-token weights ``c`` of the rows of D = onehot(targets) - softmax(base), so that
    E[sum_i y_i z_i] points along ``e = (c D)^T X`` (X: the hidden states in z's basis)."""

    c: torch.Tensor  # (T,) weights
    d: torch.Tensor  # (T, V) onehot - softmax
    x: torch.Tensor  # (T, width)
    norm: float  # ||e||

    def rows_of(self, rows: torch.Tensor | None) -> torch.Tensor:
        """e's rows ``rows`` (every row when None), float64: (|S|, width)."""
        d = self.d if rows is None else self.d.index_select(1, rows)
        return (d.double() * self.c.double()[:, None]).T @ self.x.double()

    def energy(self, rows: torch.Tensor | None) -> float:
        """The share of ||e||^2 in the rows ``rows`` (1 for every row)."""
        if rows is None or self.norm == 0:
            return 1.0
        return float(self.rows_of(rows).pow(2).sum()) / self.norm ** 2

    def cosine(self, u: torch.Tensor, rows: torch.Tensor | None, block: int = 8192) -> float:
        """cos(u, e) for an estimate ``u`` on ``rows`` (|S| x width; every row when None, then
        built ``block`` rows at a time)."""
        un = float(torch.linalg.vector_norm(u, dtype=torch.float64))
        if un == 0 or self.norm == 0:
            return 0.0
        if rows is not None:
            return float((self.rows_of(rows) * u.double()).sum()) / (un * self.norm)
        dot = 0.0
        for a in range(0, u.shape[0], block):
            part = torch.arange(a, min(a + block, u.shape[0]), device=u.device)
            dot += float((self.rows_of(part) * u[a : a + block].double()).sum())
        return dot / (un * self.norm)


def first_order(base: torch.Tensor, inp: HeadInputs, x: torch.Tensor, rule: str = "strict",
                block: int = 8192) -> FirstOrder:
    """The expected direction of ``sum_i y_i z_i`` for the likelihood rule, pair by pair.

    With a, b the head gradients of log p(chosen), log p(rejected) (in z's basis), a candidate is
    better where both n1.z > 0 and n2.z > 0, n1 = a and n2 = -b (strict) or a - b (relaxed): for
    Gaussian z, E[z 1{better}] is along n1/|n1| + n2/|n2|, and the vote y is -1 there, so
    E[y z] is along -(n1/|n1| + n2/|n2|). Several pairs a step: the sum over pairs (exact for one).
    The pairs' norms come from (D D^T) * (X X^T) blocks, ||e|| from e built ``block`` rows at a time."""
    d = torch.softmax(base.float(), dim=1).neg_()
    d[torch.arange(d.shape[0], device=d.device), inp.targets] += 1.0
    b = inp.n_pairs
    w = torch.zeros(inp.n_seq, dtype=torch.float64, device=d.device)
    for j in range(b):
        ta, tb = (inp.seq == j).nonzero().squeeze(1), (inp.seq == b + j).nonzero().squeeze(1)
        t = torch.cat([ta, tb])
        dd, xx = d.index_select(0, t).double(), x.index_select(0, t).double()
        g = (dd @ dd.T) * (xx @ xx.T)
        na = len(ta)
        aa, bb, ab = g[:na, :na].sum(), g[na:, na:].sum(), g[:na, na:].sum()
        inv_a = 1 / float(aa.clamp(min=1e-300).sqrt())
        if rule == "strict":  # -(a/|a| - b/|b|)
            w[j] -= inv_a
            w[b + j] += 1 / float(bb.clamp(min=1e-300).sqrt())
        else:  # -(a/|a| + (a - b)/|a - b|)
            inv_m = 1 / float((aa + bb - 2 * ab).clamp(min=1e-300).sqrt())
            w[j] -= inv_a + inv_m
            w[b + j] += inv_m
    fo = FirstOrder(w[inp.seq].float(), d, x, 0.0)
    sq = sum(float(fo.rows_of(torch.arange(a, min(a + block, d.shape[1]), device=d.device)).pow(2).sum())
             for a in range(0, d.shape[1], block))
    fo.norm = sq ** 0.5
    return fo


# ------------------------------------------------------------------ a step's perturbation space


@dataclass
class StepSpace:
    """Where a step's perturbations live (rows x basis) and how its candidates are evaluated."""

    q: torch.Tensor | None  # (H, k) projection basis; None: z spans the whole hidden size
    hz: torch.Tensor  # (T, width) the hidden states in z's basis
    rows: torch.Tensor | None  # (|S|,) the support's vocabulary rows; None: all of V
    base: torch.Tensor  # (T, |S|) shifted base logits on the support (the full base when rows is None)
    inp: HeadInputs  # the step's inputs, targets numbered within the support
    lse_out: torch.Tensor | None  # (T,) base log-sum-exp outside the support; None: no outside
    base_lp: torch.Tensor  # (n_seq,) the votes' base: the candidates' arithmetic at offset 0

    @property
    def shape(self) -> tuple[int, int]:
        """A perturbation's shape: (support rows, basis width)."""
        return self.base.shape[1], self.hz.shape[1]

    @classmethod
    def whole(cls, inp: HeadInputs, base: torch.Tensor, base_lp: torch.Tensor) -> "StepSpace":
        """Every row and the full hidden size (the acceptance check's proposed head)."""
        return cls(None, inp.h, None, base, inp, None, base_lp)


def step_space(estimator: str, support: str, support_k: int, inp: HeadInputs, base: torch.Tensor,
               base_lp: torch.Tensor) -> StepSpace:
    """The step's space: the projection basis (``projected``) and the support's rows, fixed from
    the base head before any perturbation is drawn. ``support: all`` is today's space exactly."""
    q = projection_basis(inp.h) if estimator == "projected" else None
    hz = inp.h @ q if q is not None else inp.h
    rows = support_rows(support, base, inp.targets, support_k)
    if rows is None:
        return StepSpace(q, hz, None, base, inp, None, base_lp)
    r = restrict(base, inp, rows)
    lp = base_logps(r.base, r.inp, vocab_tile(base.device, inp.h.shape[0], rows.numel()), r.lse_out)
    if lp is None:
        raise FloatingPointError("the support's base log-probs are not finite")
    return StepSpace(q, hz, rows, r.base, r.inp, r.lse_out, lp)
