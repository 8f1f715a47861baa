import torch

from compo.scoring.split import histogram, noisy_mask, summarize

M = torch.tensor([-5.0, -2.9, -0.5, 0.0, 0.4, 2.99, 3.0, 7.0])


def test_absolute_rule_counts():
    noisy = noisy_mask(M, "absolute", delta=3.0)
    assert noisy.tolist() == [False, True, True, True, True, True, False, False]
    s = summarize(M, noisy)
    assert (s["n_pairs"], s["n_clean"], s["n_noisy"]) == (8, 3, 5)


def test_code_rule_requires_positive_margin():
    noisy = noisy_mask(M, "absolute", delta=3.0, require_positive=True)
    assert noisy.nonzero().flatten().tolist() == [4, 5]


def test_quantile_rule_takes_smallest_magnitudes():
    noisy = noisy_mask(M, "quantile", quantile=0.25)
    assert noisy.nonzero().flatten().tolist() == [3, 4]


def test_histogram_counts_every_pair():
    text = histogram(M, bins=4)
    assert sum(int(line.split(")")[1].split()[0]) for line in text.splitlines()) == 8
