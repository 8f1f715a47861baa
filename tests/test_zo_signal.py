"""Stage-2 signal diagnostics: the signal-cosine estimate against the exact expected direction."""

import copy

import pytest
import torch

from compo.config import ZOConfig
from compo.data.encode import encode_rows
from compo.zo.estimator import signal_cosine, signal_mu2
from compo.zo.head import capture, head_logps
from compo.zo.trainer import ZOTrainer
from oracles import LikelihoodOracle


def test_signal_estimates_by_hand():
    # n = 4 votes of N(0, I) draws in dim 10: S = 40; ||u||^2 = 100 -> mu^2 = 60 / 12, cos = 4 mu / 10
    assert signal_mu2(100.0, 4, 10) == pytest.approx(5.0)
    assert signal_cosine(100.0, 4, 10) == pytest.approx(4 * 5.0 ** 0.5 / 10)
    assert signal_mu2(30.0, 4, 10) == pytest.approx(-10 / 12)  # unbiased, so it can be negative
    assert signal_cosine(30.0, 4, 10) == 0.0  # below the pure-noise level
    assert signal_cosine(9.0, 4, 1, sphere=True) == pytest.approx(4 * (5 / 12) ** 0.5 / 3)
    assert signal_cosine(5.0, 1, 10) == 0.0


def _expected_direction(model, item) -> torch.Tensor:
    """E[u] for the strict likelihood rule in the linear regime: with a, b the unit gradients of
    log p(chosen) and -log p(rejected) w.r.t. the head, P(better) region {a.z > 0, b.z > 0} gives
    E[z 1{better}] = (a + b) / (2 sqrt(2 pi)), so E[u] = -m (a + b) / sqrt(2 pi)."""
    inp = capture(model, [item], 0, check=False)
    w = model.get_output_embeddings().weight.detach().float().clone().requires_grad_(True)
    lp = head_logps(w, inp)
    gc, = torch.autograd.grad(lp[0], w, retain_graph=True)
    gr, = torch.autograd.grad(lp[1], w)
    e = -(gc / gc.norm() - gr / gr.norm())
    return e / e.norm()


def test_signal_cosine_matches_the_measured_cosine(toy_reference, toy_pairs):
    model, tok = toy_reference
    model = copy.deepcopy(model)
    item = encode_rows(toy_pairs[0][:1], tok, 32, 16).items[0]
    texts = toy_pairs[0][:1]
    e = None
    means = {}
    # the per-step estimate of mu^2 has relative noise sqrt(2d) / (m mu^2): pool more steps at small m
    for m, repeats in ((100, 400), (400, 64), (1600, 16)):
        mu2, usq, meas = [], [], []
        cfg = ZOConfig(m=m, radius=1e-4, skip_threshold=1.0, checkpoint_every=0)  # every step skipped: W fixed
        tr = ZOTrainer(model, cfg, m, LikelihoodOracle(), pad_id=0)
        if e is None:
            e = _expected_direction(model, item)
        for t in range(repeats):
            rec = tr.step(t, [item], texts)
            u = tr.last_u
            mu2.append(rec["signal_mu2"])
            usq.append(rec["u_sq_norm"])
            meas.append(float((u.flatten() @ e.flatten()) / u.norm()))
        # pooled over seeds: n sqrt(mean mu^2) / sqrt(mean ||u||^2)   (n = m: the strict rule never abstains)
        pooled = signal_cosine(sum(usq) / len(usq), m, e.numel(), mu2=sum(mu2) / len(mu2))
        means[m] = (pooled, sum(meas) / len(meas))
        assert means[m][0] == pytest.approx(means[m][1], rel=0.10), (m, means[m])
    assert means[100][1] < means[400][1] < means[1600][1]  # more perturbations, better direction
