"""The ComPO estimator as pure functions: direction, sparsity, skip rule, update (DESIGN.md §2)."""

from __future__ import annotations

import math

import torch


def norm64(x: torch.Tensor, block: int = 1 << 20) -> torch.Tensor:
    """||x||_2 accumulated in float64, a block at a time: no float64 copy of a head-sized x."""
    flat, acc = x.reshape(-1), torch.zeros((), dtype=torch.float64, device=x.device)
    for a in range(0, flat.numel(), block):
        part = flat[a : a + block].double()
        acc += torch.dot(part, part)
    return acc.sqrt()


def normalise(u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """g = u / ||u||_2 (into ``out`` when given, which may be u), or None when u is zero (no
    usable direction)."""
    norm = norm64(u)
    if norm == 0 or not torch.isfinite(norm):
        return None
    return torch.div(u, norm.to(u.dtype), out=out)


def sparsify(g: torch.Tensor, rule: str = "absolute", lambda_g: float = 2.2e-4, rho: float = 0.01,
             inplace: bool = False) -> torch.Tensor:
    """Zero small entries without renormalising: |g_j| >= lambda_g (paper) or the top rho
    fraction (``inplace``: in g's own storage; g must then be contiguous)."""
    if rule == "absolute":
        mask = g.abs() < lambda_g
        return g.masked_fill_(mask, 0.0) if inplace else g.masked_fill(mask, 0.0)
    if rule == "top_fraction":
        k = max(1, min(g.numel(), math.ceil(rho * g.numel())))
        flat = g.view(-1) if inplace else g.reshape(-1)
        keep = top_indices(flat.abs(), k)
        vals = flat[keep]
        out = flat.zero_() if inplace else torch.zeros_like(flat)
        out[keep] = vals
        return out.view_as(g)
    raise ValueError(f"unknown sparsity rule '{rule}', allowed: absolute, top_fraction")


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or inf in ``x``: its float64 sum is finite exactly then (fp32 entries cannot
    overflow it), and one reduction is ~25x cheaper than ``isfinite(x).all()`` on a head.
    A finite sum in x's own dtype already proves it (an inf or NaN entry makes any sum inf or
    NaN) at a fraction of the float64 cost; only a non-finite one (or an overflow) needs that."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x.sum(dtype=torch.float64)))


def fits_dtype(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every entry of ``x`` stays finite cast to ``dtype``: a finite fp32 master head
    (or its logits) can still overflow a float16 model's range (65504) to inf. Casting rounds
    monotonically, so x's min and max decide it: one reduction, no head-sized copy; NaN fails."""
    if x.numel() == 0:
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(x)).to(dtype)).all())


def dtype_overflow(w: torch.Tensor, dtype: torch.dtype, h: torch.Tensor, bias: torch.Tensor | None = None,
                   block: int = 1 << 24) -> str | None:
    """Why the fp32 head ``w`` cannot run in the model's ``dtype``, or None when it can: an entry,
    or a logit ``h w^T (+ bias)`` of the step's hidden states ``h``, past dtype's largest value
    (the model would hold inf and give NaN log-probs, which the fp32 checks never see). The
    logits are computed in fp32 from the exact hidden states, so a logit within rounding of the
    limit may be judged either way. A dtype as wide as w's is never checked (None); the logits
    go a block of rows (about ``block`` entries: 64 MB) at a time, never all T x V at once."""
    big = torch.finfo(dtype).max
    if big >= torch.finfo(w.dtype).max:
        return None
    name = str(dtype).removeprefix("torch.")
    if not fits_dtype(w, dtype):
        return f"the updated head overflows the model's {name}: max |w| = {float(w.abs().max()):.6g} > {big:.6g}"
    rows = max(1, block // max(1, w.shape[0]))
    for a in range(0, h.shape[0], rows):
        logits = h[a : a + rows] @ w.T
        if bias is not None:
            logits += bias
        if not fits_dtype(logits, dtype):
            return (f"the updated head's logits overflow the model's {name}: max |logit| = "
                    f"{float(logits.abs().max()):.6g} > {big:.6g} on the step's pairs")
    return None


def top_indices(a: torch.Tensor, k: int, sample: int = 1 << 18) -> torch.Tensor:
    """Indices of the ``k`` largest entries of the 1-D ``a``: the set ``torch.topk`` gives.

    For a small fraction of a long vector, a quantile of a fixed random sample gives a lower
    bound that about 1.5 k entries pass, and topk runs on those alone (on a 49152 x 576 head at
    1%: ~8x faster). Should fewer than k pass (vanishingly rare), the full topk runs."""
    n = a.numel()
    if n > 4 * sample and k < n // 20:
        gen = torch.Generator(device=a.device).manual_seed(0)
        probe = a[torch.randint(0, n, (sample,), generator=gen, device=a.device)]
        passing = (a >= torch.quantile(probe, 1.0 - 1.5 * k / n)).nonzero().squeeze(1)
        if passing.numel() >= k:
            return passing[torch.topk(a[passing], k, sorted=False).indices]
    return torch.topk(a, k, sorted=False).indices


def skip_reason(n_minus: int, m: int, threshold: float) -> str | None:
    """Why the step is skipped (too few 'better' votes: N-/m < lambda), or None to proceed."""
    if n_minus / m < threshold:
        return f"weak signal: N-/m = {n_minus}/{m} = {n_minus / m:.3f} < {threshold}"
    return None


def proposed_head(w: torch.Tensor, g_sparse: torch.Tensor, gamma: float, frac: float,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """W - gamma * (N-/m) * g_sparse: a step against the estimated 'worse' direction (into
    ``out`` when given: the same two roundings, no fresh head-sized tensors)."""
    if out is None:
        return w - (gamma * frac) * g_sparse
    return torch.sub(w, torch.mul(g_sparse, gamma * frac, out=out), out=out)


def signal_mu2(u_sq_norm: float, n_votes: int, dim: int, sphere: bool = False) -> float:
    """Unbiased estimate of mu^2, the squared mean projection of y_i z_i on the expected direction.

    With n non-zero votes, E||u||^2 = S + n(n-1) mu^2, where S = sum ||y_i z_i||^2 is n * dim
    for N(0, I) draws (n for unit vectors). Noisy for one step at small m: average it over steps."""
    if n_votes < 2:
        return 0.0
    return (u_sq_norm - n_votes * (1.0 if sphere else dim)) / (n_votes * (n_votes - 1))


def signal_cosine(u_sq_norm: float, n_votes: int, dim: int, sphere: bool = False, mu2: float | None = None) -> float:
    """Estimated cosine between u = sum_i y_i z_i and its expectation: n mu / ||u||, with mu^2 from
    :func:`signal_mu2` (or a pooled ``mu2``), clipped at 0. Near 0: the update is noise."""
    if n_votes < 2 or u_sq_norm <= 0:
        return 0.0
    mu2 = signal_mu2(u_sq_norm, n_votes, dim, sphere) if mu2 is None else mu2
    return min(1.0, n_votes * math.sqrt(max(0.0, mu2)) / math.sqrt(u_sq_norm))


def binomial_critical(n: int, p: float, alpha: float) -> int:
    """The smallest k with P(X >= k) <= alpha for X ~ Binomial(n, p) (n + 1 if none)."""
    if n <= 0:
        return 1
    logs = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)
            for k in range(n + 1)]
    tail = 0.0
    for k in range(n, -1, -1):
        tail += math.exp(logs[k])
        if tail > alpha:
            return k + 1
    return 0


def agreement_skip_reason(agree: int, n_votes: int, alpha: float) -> str | None:
    """The binomial rule: with no signal, each vote term y_i z_i agrees in sign with the sum of
    the others (y_i z_i . u_(-i) > 0) with probability 1/2; skip unless the agreements are
    significantly more than n/2 at level alpha."""
    need = binomial_critical(n_votes, 0.5, alpha)
    if agree < need:
        return f"no significant signal: {agree}/{n_votes} votes agree with the rest, {need} needed at alpha={alpha}"
    return None


def agreement_record(agree: int, n_votes: int, alpha: float) -> dict:
    """The step's vote agreement against its no-signal rate: ``agree_rate`` (share of votes whose
    term agrees with the rest), ``agree_null`` (1/2, the rate without signal) and ``agree_needed``
    (the share the binomial rule needs at level ``alpha``)."""
    need = binomial_critical(n_votes, 0.5, alpha)
    return {"n_agree": agree, "agree_rate": agree / n_votes if n_votes else 0.0, "agree_null": 0.5,
            "agree_needed": need / n_votes if n_votes else 1.0}


def agreements(source, t: int, chunks, votes: torch.Tensor, u: torch.Tensor, buf: torch.Tensor, radius: float) -> int:
    """#{i : y_i != 0 and y_i z_i . (u - y_i z_i) > 0}, regenerating z from ``source``'s seeds
    (one more pass over the step's perturbations)."""
    agree = 0
    for idx in chunks:
        z = source.draw(t, idx, out=buf)
        coef = votes[idx.start : idx.stop].to(device=z.device, dtype=torch.float32) * (source.scales(z) / radius)
        terms = z.flatten(1) * coef[:, None]
        loo = terms @ u.flatten() - terms.pow(2).sum(1)
        agree += int(((loo > 0) & (coef != 0)).sum())
    return agree


def update_record(w: torch.Tensor, new_w: torch.Tensor, g_sparse: torch.Tensor, dtype: torch.dtype) -> dict:
    """What a taken step did: shares of entries changed (in the model's dtype) and kept by
    sparsity, the energy kept, the update's norm and its ratio to ||W||. Diagnostics only, so
    fp32 norms (pairwise sums, ~1e-6 relative; 1/20 the cost of fp64 ones)."""
    norm = float(torch.linalg.vector_norm(new_w - w))
    return {"frac_changed": int(torch.count_nonzero(new_w.to(dtype) != w.to(dtype))) / new_w.numel(),
            "frac_kept": int(torch.count_nonzero(g_sparse)) / g_sparse.numel(),
            "energy_kept": float(torch.linalg.vector_norm(g_sparse)) ** 2,
            "update_norm": norm, "update_ratio": norm / max(float(torch.linalg.vector_norm(w)), 1e-30)}
