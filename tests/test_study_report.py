"""The study report's statistics on hand-made cells: paired differences per seed and pooled over seeds."""
import csv
import io
import math

import pytest
import torch

from compo.research.study_report import (_paired_csv, markdown, paired_table, paired_vs_baseline,
                                         pooled_stage2_effects, t_interval)
from compo.scoring.evaluate import bootstrap_means, stratified_mean


def _cell(method: str, seed: int, final: list[float]) -> dict:
    return {"cell": f"s{seed}_n0.4u_{method}", "method": method, "noise": 0.4, "bias": "uniform",
            "condition": "0.4u", "seed": seed, "margins": {"final": final, "reference": [0.0] * len(final)}}


def test_stratified_mean_weighs_each_stratum_the_same():
    assert stratified_mean([torch.ones(4), torch.zeros(8)], 200, 0.95, 0) == (0.5, 0.5, 0.5)
    half = torch.tensor([0.0, 1.0] * 50)
    value, lo, hi = stratified_mean([half, half.clone()], 2000, 0.95, 0)
    one_lo, one_hi = bootstrap_means({"x": half}, 2000, 0.95, 0)["x"]
    assert value == 0.5 and lo < 0.5 < hi
    # two seeds' pairs: the interval narrows by about sqrt(2)
    assert (hi - lo) / (one_hi - one_lo) == pytest.approx(2 ** -0.5, abs=0.1)
    value, lo, hi = stratified_mean([torch.ones(1), half], 100, 0.95, 0)  # one pair: no interval
    assert value == 0.75 and math.isnan(lo) and math.isnan(hi)


def test_paired_rows_per_seed_and_pooled():
    # seed 0: the method wins pairs 0 and 1 the baseline lost (+2/4); seed 1: it loses pair 0 (-1/4)
    results = [_cell("dpo_all", 0, [-1.0, -1.0, 1.0, 1.0]), _cell("cdpo", 0, [1.0, 1.0, 1.0, 1.0]),
               _cell("dpo_all", 1, [1.0, 1.0, 1.0, -1.0]), _cell("cdpo", 1, [-1.0, 1.0, 1.0, -1.0])]
    rows = paired_vs_baseline(results, "dpo_all", 500, 0.95)
    acc = {r["seed"]: r for r in rows if r["metric"] == "accuracy"}
    assert acc[0]["value"] == 0.5 and acc[1]["value"] == -0.25 and acc[0]["n"] == acc[1]["n"] == 4
    pooled = acc["pooled"]
    assert pooled["value"] == pytest.approx(0.125) and pooled["n"] == 8 and pooled["cell"] == "pooled_0.4u_cdpo"
    assert pooled["ci_low"] <= 0.125 <= pooled["ci_high"]
    table = "\n".join(paired_table(rows, "dpo_all"))
    line = next(x for x in table.splitlines() if x.startswith("| cdpo | 0.4u | accuracy |"))
    mean, lo, hi = t_interval([0.5, -0.25])
    assert "s0 +50.00" in line and "s1 -25.00" in line and "pooled" not in line
    assert line.endswith(f"[{100 * lo:+.2f}, {100 * hi:+.2f}] |") and f"| {100 * mean:+.2f} [" in line
    written = list(csv.DictReader(io.StringIO(_paired_csv(rows))))
    assert [r["seed"] for r in written if r["metric"] == "accuracy"] == ["0", "1", "pooled"]


def test_one_seed_has_no_pooled_row():
    results = [_cell("dpo_all", 0, [-1.0, 1.0]), _cell("cdpo", 0, [1.0, 1.0])]
    rows = paired_vs_baseline(results, "dpo_all", 100, 0.95)
    assert {r["seed"] for r in rows} == {0}
    assert next(x for x in paired_table(rows, "dpo_all") if x.startswith("| cdpo |")).endswith("|  |")


def test_stage2_effect_pooled_over_seeds_from_the_kept_stage1_margins():
    # seed 0: stage 2 wins pair 0 (+1/4); seed 1: it loses pairs 0 and 1 (-2/4); mean -1/8
    cells = []
    for seed, before, after in ((0, [-1.0, 1.0, 1.0, -1.0], [1.0, 1.0, 1.0, -1.0]),
                                (1, [1.0, 1.0, -1.0, 1.0], [-1.0, -1.0, -1.0, 1.0])):
        cell = _cell("compo", seed, after)
        cell["margins"]["stage1"] = before
        cell.update(split={}, stage="stage2")
        cells.append(cell)
    pooled = pooled_stage2_effects(cells + [_cell("dpo_clean", 0, [1.0] * 4)], 500, 0.95)
    assert list(pooled) == [("compo", "0.4u")]  # cells without stage-1 margins are left out
    value, lo, hi = pooled["compo", "0.4u"]
    assert value == pytest.approx(-0.125) and lo <= -0.125 <= hi
    assert pooled_stage2_effects(cells[:1], 500, 0.95) == {}  # one seed: nothing to pool
    for c, v in zip(cells, (0.25, -0.5)):
        c["stage2_effect"] = {k: {"value": v, "ci_low": v, "ci_high": v, "n": 4}
                              for k in ("accuracy", "shift/chosen", "shift/rejected")}
    study = type("S", (), {"metrics": [], "noise_kind": "flip", "mixed": lambda self: False,
                           "settings": lambda self: [(0.4, "uniform")]})()
    md = markdown(study, cells, [], pooled)
    line = next(x for x in md.splitlines() if x.startswith("| compo | 0.4u |"))
    assert line.endswith(f"| -0.1250 [{lo:.4f}, {hi:.4f}] |")
    assert "mean of seeds [pairs resampled within each seed]" in md
