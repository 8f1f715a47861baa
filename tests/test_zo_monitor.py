"""The binomial skip rule and the stage-2 warnings, on constructed cases and the tiny model."""

import copy

import torch

from compo.config import ZOConfig
from compo.data.encode import encode_rows
from compo.zo import monitor
from compo.zo.estimator import agreement_skip_reason, binomial_critical
from compo.zo.trainer import ZOTrainer
from oracles import Evidence, LikelihoodOracle, Oracle


class CoinOracle(Oracle):
    """A pure-noise oracle: 'better' with probability p, independent of the candidate."""

    name = "coin"
    needs = Evidence.LOGPROBS

    def __init__(self, p: float = 0.3, seed: int = 0):
        self.p, self.gen = p, torch.Generator().manual_seed(seed)

    def compare(self, batch):
        better = torch.rand(batch.n_candidates, generator=self.gen) < self.p
        return torch.where(better, -1, 1).to(torch.int8)


def test_binomial_critical_by_hand():
    # Binomial(4, 1/2): P(X >= 4) = 1/16, P(X >= 3) = 5/16
    assert binomial_critical(4, 0.5, 0.1) == 4
    assert binomial_critical(4, 0.5, 0.5) == 3
    assert binomial_critical(4, 0.5, 0.01) == 5
    assert agreement_skip_reason(3, 4, 0.1).startswith("no significant signal: 3/4")
    assert agreement_skip_reason(4, 4, 0.1) is None


def _setup(toy_reference, toy_pairs):
    model, tok = toy_reference
    enc = encode_rows(toy_pairs[0][:4], tok, 32, 16)
    return copy.deepcopy(model), enc.items, toy_pairs[0][:4]


def test_binomial_rule_skips_noise_at_about_alpha_and_takes_signal(toy_reference, toy_pairs):
    model, items, texts = _setup(toy_reference, toy_pairs)
    alpha = 0.1
    cfg = ZOConfig(m=400, radius=1e-3, skip_rule="binomial", skip_alpha=alpha, checkpoint_every=0)
    noise = ZOTrainer(copy.deepcopy(model), cfg, 0, CoinOracle(0.3), pad_id=0)
    taken = sum(not noise.step(t, items[:1], texts[:1])["skipped"] for t in range(120))
    assert taken / 120 <= 2 * alpha + 0.05  # about alpha of pure-noise steps get through
    cfg = ZOConfig(m=1600, radius=1e-3, skip_rule="binomial", skip_alpha=alpha, checkpoint_every=0, gamma=1e-6)
    signal = ZOTrainer(copy.deepcopy(model), cfg, 0, LikelihoodOracle(), pad_id=0)
    recs = [signal.step(t, items[t % 4 : t % 4 + 1], texts[t % 4 : t % 4 + 1]) for t in range(8)]
    assert sum(not r["skipped"] for r in recs) >= 7
    assert all(r["n_agree"] > r["n_votes"] / 2 for r in recs)


def _rec(skipped=False, frac=0.3, dc=0.1, dr=-0.1, usq=None, mu2=0.0, n=100):
    r = {"skipped": skipped, "frac_minus": frac, "n_votes": n,
         "pairs": [{"logp_chosen_before": 0.0, "logp_chosen_after": dc, "logp_rejected_before": 0.0,
                    "logp_rejected_after": dr}]}
    if usq is not None:
        r.update(u_sq_norm=usq, signal_mu2=mu2)
    return r


def _feed(recs, pps=1, agg="any", dim=1000):
    st, out = monitor.new_state(), []
    for r in recs:
        out += monitor.observe(st, r, pps, agg, dim)
    return out


def test_each_warning_fires_on_its_case_and_only_once():
    w = _feed([_rec(skipped=True)] * 8, pps=4, agg="all")
    assert len(w) == 1 and "aggregation 'all' over 4 pairs" in w[0]
    assert _feed([_rec(skipped=True)] * 8, pps=4, agg="any") == []
    assert _feed([_rec(skipped=True)] * 8, pps=1, agg="all") == []
    w = _feed([_rec(skipped=True, frac=0.001)] * 12)
    assert len(w) == 1 and "zo.radius is probably outside the linear regime" in w[0]
    w = _feed([_rec(dc=-0.2, dr=0.1)] * 7)
    assert len(w) == 1 and "margin fell" in w[0]
    # pure noise: ||u||^2 = n d exactly -> cosine 0 over the window
    w = _feed([_rec(usq=100 * 1000.0, mu2=0.0)] * 25)
    assert len(w) == 1 and "signal cosine" in w[0]
    assert _feed([_rec(usq=100 * 1000.0 + 100 * 99 * 4.0, mu2=4.0)] * 25) == []


def test_warnings_are_quiet_on_the_quickstart(tmp_path, capsys):
    from compo.cli import main

    args = ["pipeline", "-c", "configs/quickstart.yaml", "--run-dir", str(tmp_path / "run"),
            "--set", "data.toy.n_eval=64", "--set", "zo.max_steps=30"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "warning" not in out
    assert "mean signal cosine" in out


def test_agreement_stats_under_the_fixed_rule_measure_without_changing_the_run(toy_reference, toy_pairs):
    model, items, texts = _setup(toy_reference, toy_pairs)
    base = dict(m=1600, radius=1e-3, checkpoint_every=0, skip_threshold=0.0, gamma=1e-6)
    plain = ZOTrainer(copy.deepcopy(model), ZOConfig(**base), 0, LikelihoodOracle(), pad_id=0)
    counted = ZOTrainer(copy.deepcopy(model), ZOConfig(**base, agreement_stats=True), 0, LikelihoodOracle(), pad_id=0)
    for t in range(3):
        a, b = plain.step(t, items[:1], texts[:1]), counted.step(t, items[:1], texts[:1])
        assert "agree_rate" not in a and b["agree_null"] == 0.5
        assert b["agree_rate"] == b["n_agree"] / b["n_votes"] > b["agree_needed"] > 0.5
        assert b["agree_needed"] == binomial_critical(b["n_votes"], 0.5, 0.05) / b["n_votes"]
    assert torch.equal(plain.w, counted.w)  # counting is a side pass: same votes, same head
    cfg = ZOConfig(**{**base, "m": 400}, agreement_stats=True)
    noise = ZOTrainer(copy.deepcopy(model), cfg, 0, CoinOracle(0.3), pad_id=0)
    rates = [noise.step(t, items[:1], texts[:1])["agree_rate"] for t in range(20)]
    assert abs(sum(rates) / len(rates) - 0.5) < 0.03  # 20 x 400 votes: sd of the mean ~0.006


def test_support_and_first_order_signal_warnings_fire_once():
    low = [dict(_rec(), support_energy=0.95, support_size=300), dict(_rec(), support_energy=0.85, support_size=40),
           dict(_rec(), support_energy=0.5, support_size=40)]
    w = _feed(low)
    assert len(w) == 1 and "85.0% of the expected direction lies in the step's 40 support rows" in w[0]
    assert _feed([dict(_rec(), support_energy=0.9, support_size=40)] * 3) == []
    # the likelihood rule's first-order cosine: its mean over 20 steps, not the pooled moment estimate
    first = lambda cos: dict(_rec(usq=1.0, mu2=1.0), signal_cos=cos, signal_cos_source="first_order")  # noqa: E731
    w = _feed([first(0.04)] * 19 + [first(0.049)])
    assert len(w) == 1 and "mean first-order signal cosine over the last 20 steps is 0.040" in w[0]
    assert _feed([first(0.04)] * 19 + [first(0.3)]) == []  # mean 0.053
