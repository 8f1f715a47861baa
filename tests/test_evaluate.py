"""Held-out metrics on hand-made log-probs, and bootstrap intervals."""

import math

import pytest
import torch

from compo.scoring.evaluate import bootstrap_means, pair_values, preference_metrics, summarise, with_intervals
from compo.scoring.logprobs import PairScores


def _s(c, r):
    return PairScores(torch.tensor(c), torch.tensor(r), torch.ones(len(c)), torch.ones(len(r)))


REF = _s([-10.0, -12.0, -8.0, -9.0], [-11.0, -11.0, -9.0, -9.5])
POL = _s([-9.0, -13.0, -8.5, -10.0], [-12.0, -10.0, -10.0, -9.0])


def test_metrics_equal_hand_computation():
    m = preference_metrics(POL, REF, beta=0.5)
    # policy margins 3, -3, 1.5, -1 -> accuracy 2/4
    assert m["accuracy"] == 0.5
    # shifts: chosen +1, -1, -0.5, -1 ; rejected -1, +1, -1, +0.5
    assert m["shift/chosen"] == pytest.approx(-1.5 / 4)
    assert m["shift/rejected"] == pytest.approx(-0.5 / 4)
    assert m["rewards/chosen"] == pytest.approx(0.5 * -1.5 / 4)
    assert m["rewards/rejected"] == pytest.approx(0.5 * -0.5 / 4)
    # implicit reward accuracy: dc > dr per pair: 1>-1 T, -1>1 F, -0.5>-1 T, -1>0.5 F
    assert m["rewards/accuracies"] == 0.5
    assert m["rewards/margins"] == pytest.approx(0.5 * (2 - 2 + 0.5 - 1.5) / 4)
    # both fall: pair 3 only (-0.5, -1); chosen falls: pairs 2, 3, 4
    assert m["displacement/both_down"] == 0.25
    assert m["displacement/chosen_down"] == 0.75
    # margin grew vs reference margins 1, -1, 1, 0.5: 3>1 T, -3>-1 F, 1.5>1 T, -1>0.5 F
    assert m["displacement/margin_up"] == 0.5
    assert m["logps/chosen"] == pytest.approx(-40.5 / 4)


def test_without_reference_only_likelihood_metrics():
    m = preference_metrics(POL)
    assert set(m) == {"accuracy", "logps/chosen", "logps/rejected"}
    assert preference_metrics(_s([], [])) == {}


def test_bootstrap_contains_point_estimate_and_shrinks_with_n():
    gen = torch.Generator().manual_seed(0)
    widths = []
    for n in (50, 400, 3200):
        x = (torch.rand(n, generator=gen) < 0.7).double()
        s = summarise({"acc": x}, n_boot=500, seed=1)["acc"]
        assert s["ci_low"] <= s["value"] <= s["ci_high"] and s["n"] == n
        widths.append(s["ci_high"] - s["ci_low"])
    assert widths[0] > widths[1] > widths[2]
    # ~ 2 * 1.96 * sqrt(p(1-p)/n) at n = 3200
    assert widths[2] == pytest.approx(2 * 1.96 * math.sqrt(0.21 / 3200), rel=0.2)


def test_bootstrap_is_seeded_and_shares_resamples():
    x = {"a": torch.arange(10.0), "b": torch.arange(10.0) * 2}
    one, two = bootstrap_means(x, 200, seed=5), bootstrap_means(x, 200, seed=5)
    assert one == two
    assert one["b"][0] == pytest.approx(2 * one["a"][0]) and one["b"][1] == pytest.approx(2 * one["a"][1])
    assert all(math.isnan(v) for v in bootstrap_means({"a": torch.ones(1)})["a"])


def test_with_intervals_adds_ci_per_metric():
    m = with_intervals(POL, REF, 0.1, n_boot=100, level=0.9, seed=0)
    assert set(m["ci"]) == set(m) - {"ci"}
    assert with_intervals(POL, REF, 0.1, 0, 0.9, 0).get("ci") is None
    values = pair_values(POL, REF)
    assert torch.equal(values["margin"], torch.tensor([3.0, -3.0, 1.5, -1.0], dtype=torch.float64))
