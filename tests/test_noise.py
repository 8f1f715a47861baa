"""Noise injection: exact counts, seeds, records, and how the split sees flipped labels."""

import json
import math

import pytest
import torch

from compo.data import noise
from compo.cli import main
from compo.data.rows import PairRow, UnpairedRow
from compo.core.rundir import read_jsonl

SMALL = ["data.toy.n_train=96", "data.toy.n_eval=32", "model.toy.sft_steps=40", "data.toy.noise=0"]


def _pairs(n):
    return [PairRow(f"p{i}", f"good{i}", f"bad{i}", f"src:{i}") for i in range(n)]


@pytest.mark.parametrize("rate,n,expected", [(0.2, 96, 19), (0.25, 10, 3), (0.5, 7, 4), (0.0, 50, 0), (1.0, 9, 9)])
def test_flip_changes_exactly_round_rate_n_labels(rate, n, expected):
    pn = noise.pair_noise("flip", rate, n, seed=3)
    assert len(pn.flipped) == expected == noise.count_of(rate, n)
    rows = noise.apply_to_pairs(_pairs(n), pn)
    swapped = [i for i, r in enumerate(rows) if r.chosen.startswith("bad")]
    assert swapped == pn.flipped
    assert [i for i, r in enumerate(rows) if r.meta["label_flipped"]] == pn.flipped
    assert all(r.source == f"src:{i}" for i, r in enumerate(rows))


def test_flip_is_seeded():
    a = noise.pair_noise("flip", 0.3, 100, seed=1).flipped
    assert a == noise.pair_noise("flip", 0.3, 100, seed=1).flipped
    assert a != noise.pair_noise("flip", 0.3, 100, seed=2).flipped


def test_low_margin_bias_prefers_close_calls():
    margins = [0.1] * 50 + [10.0] * 50
    hits = [0, 0]
    for seed in range(20):
        for i in noise.pair_noise("flip", 0.2, 100, seed, "low_margin", margins).flipped:
            hits[i >= 50] += 1
    assert sum(hits) == 20 * 20
    assert hits[0] > 2 * hits[1]  # weights exp(-0.01) vs exp(-1) (median scale 10): about 2.7x
    with pytest.raises(ValueError, match="margin"):
        noise.pair_noise("flip", 0.2, 100, 0, "low_margin")


def test_low_margin_weights_are_exp_of_minus_margin_over_median():
    w = noise.low_margin_weights([1.0, -2.0, 4.0])
    assert w == pytest.approx([math.exp(-0.5), math.exp(-1.0), math.exp(-2.0)])


def test_ambiguous_pairs_get_coin_labels():
    pn = noise.pair_noise("ambiguous", 0.5, 200, seed=0)
    assert len(pn.ambiguous) == 100
    assert set(pn.flipped) <= set(pn.ambiguous)
    assert 30 < len(pn.flipped) < 70
    rows = noise.apply_to_pairs(_pairs(200), pn)
    assert sum(r.meta["ambiguous"] for r in rows) == 100


def test_swap_pairs_swaps_only_flipped_rows():
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert torch.equal(noise.swap_pairs(v, [0, 2]), torch.tensor([[2.0, 1.0], [3.0, 4.0], [6.0, 5.0]]))
    assert torch.equal(noise.swap_pairs(v, []), v)


def test_shift_drops_short_prompt_ups_and_long_prompt_downs():
    rows = [UnpairedRow("x" * (i + 1), f"c{i}", i % 2 == 0, f"s{i}") for i in range(20)]
    kept, dropped = noise.shift_unpaired(rows, 0.2, seed=0)
    # 10 up rows (even i, prompt length i+1) and 10 down rows: 2 of each dropped
    assert dropped == [0, 2, 17, 19]
    assert len(kept) == 16 and all(r.meta["shift_kept"] for r in kept)


def test_label_quality_by_hand():
    flags = [True, False, False, True, False, False]
    noisy = [True, True, False, False, False, False]
    q = noise.label_quality(flags, noisy)
    assert q["label_correct/noisy"] == 0.5
    assert q["label_correct/clean"] == 0.75
    assert q["wrong_labels"] == 2 and q["wrong_labels_in_noisy"] == 0.5


def test_pipeline_split_records_flips_and_reuses_them(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["split", "-c", "tests/tiny.yaml", "--run-dir", str(run), "--set", "data.noise.kind=flip",
            "--set", "data.noise.rate=0.25", "--set", "data.noise.bias=low_margin"]
    for s in SMALL:
        args += ["--set", s]
    assert main(args) == 0
    rows = read_jsonl(run / "split.jsonl")
    clean = read_jsonl(run / "split.jsonl")
    assert sum(r["label_flipped"] for r in rows) == 24
    summary = json.loads((run / "summary.json").read_text())["split"]
    assert summary["noise"]["n_flipped"] == 24 and summary["wrong_labels"] == 24
    # the reference margin of a flipped pair is the negated margin of its original orientation
    base = tmp_path / "base"
    assert main(["split", "-c", "tests/tiny.yaml", "--run-dir", str(base)] + sum((["--set", s] for s in SMALL), [])) == 0
    orig = read_jsonl(base / "split.jsonl")
    for a, b in zip(orig, clean):
        sign = -1 if b["label_flipped"] else 1
        assert b["margin"] == pytest.approx(sign * a["margin"], abs=1e-5)
        assert (b["chosen"] == a["rejected"]) == b["label_flipped"]
    # a second run reuses split.jsonl and the same flips (training on the flipped labels)
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    assert "reusing" in capsys.readouterr().out
    assert read_jsonl(run / "split.jsonl") == rows


def test_noise_kind_must_fit_the_data(capsys):
    assert main(["split", "--set", "data.noise.rate=0.2"]) == 2
    assert "data.noise.rate > 0 needs data.noise.kind" in capsys.readouterr().err
