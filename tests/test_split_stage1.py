"""``split.score: stage1`` (the small-loss split), flip detection figures, and reference log-probs
shared between runs of one reference (a study's noise settings)."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from compo.cli import main
from compo.core import fingerprint
from compo.core.config import load_config
from compo.run.split_stage import flip_detection
from compo.scoring.logprobs import PairScores
from compo.train import split_model

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "tiny.yaml")
# the toy task with uniform flips (placed anywhere, not only where the reference is unsure)
UNIFORM = ["data.toy.noise=0.0", "data.noise.kind=flip", "data.noise.rate=0.2", "data.noise.bias=uniform",
           "split.rule=quantile", "split.quantile=0.3"]
STAGE1 = ["split.score=stage1", "split.stage1_steps=40"]


def _split(run_dir: Path, sets: list[str]) -> dict:
    args = ["split", "-c", TINY, "--run-dir", str(run_dir)]
    for s in sets:
        args += ["-s", s]
    assert main(args) == 0
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def stage1_split(tmp_path_factory):
    run = tmp_path_factory.mktemp("split") / "run"
    return run, _split(run, UNIFORM + STAGE1)


def test_flipped_pairs_of_uniform_noise_land_in_the_stage1_noisy_part(stage1_split):
    run, summary = stage1_split
    rows = [json.loads(line) for line in (run / "split.jsonl").open()]
    flipped = [r for r in rows if r["label_flipped"]]
    assert len(rows) == 384 and len(flipped) == round(0.2 * 384)
    found = sum(r["noisy"] for r in flipped)
    assert found >= 0.9 * len(flipped)  # measured 74 of 77
    det = summary["split"]["flip_detection"]
    assert det["stage1"]["recall"] == found / len(flipped)
    # the reference margin cannot find flips it did not place: about a random split's share
    assert det["reference"]["recall"] < 0.45 and det["reference"]["random_recall"] == 115 / 384
    assert det["stage1"]["precision"] > 2.5 * det["stage1"]["random_precision"]
    # the noisy part is the 30% with the lowest implicit margin after the brief DPO
    cut = max(r["margin_stage1"] for r in rows if r["noisy"])
    assert sum(r["noisy"] for r in rows) == 115 and all(r["margin_stage1"] >= cut for r in rows if not r["noisy"])


def test_the_stage1_rule_is_in_the_split_fingerprint(stage1_split):
    run, _ = stage1_split
    fp = json.loads((run / "fingerprint.json").read_text())["split"]
    assert fp["split.score"] == "stage1" and fp["split.stage1_steps"] == 40
    assert fp["stage1.learning_rate"] == 1e-3 and fp["stage1.beta"] == 0.1  # the brief DPO's settings
    assert "stage1.loss" not in fp and "stage1.epochs" not in fp  # what the brief DPO does not use
    cfg = load_config(TINY, UNIFORM + STAGE1)
    assert fp == fingerprint.current(cfg, "split")
    other = load_config(TINY, UNIFORM + STAGE1 + ["stage1.learning_rate=0.002"])
    assert fingerprint.differences(fp, fingerprint.current(other, "split")) == ["stage1.learning_rate"]
    ref = load_config(TINY, UNIFORM)
    assert "stage1.learning_rate" not in fingerprint.current(ref, "split")


def test_the_brief_model_is_reused_not_retrained(stage1_split, tmp_path, monkeypatch, capsys):
    run, first = stage1_split
    copy = tmp_path / "run"
    import shutil

    shutil.copytree(run, copy)
    (copy / "split.jsonl").unlink()  # the split is redone from the kept brief model
    calls = []
    import compo.train.stage1 as stage1

    monkeypatch.setattr(stage1, "train_stage1", lambda *a, **k: calls.append(a) or {})
    again = _split(copy, UNIFORM + STAGE1)
    assert calls == [] and "reusing the brief DPO model" in capsys.readouterr().out
    assert (copy / "split.jsonl").read_text() == (run / "split.jsonl").read_text()
    assert again["split"]["flip_detection"] == first["split"]["flip_detection"]
    # another brief budget is another split: it trains again
    _split(copy, UNIFORM + ["split.score=stage1", "split.stage1_steps=41"])
    assert len(calls) == 1


def test_a_study_trains_one_brief_model_per_noise_setting(tmp_path, monkeypatch, capsys):
    trained = []
    real = split_model.brief_scores

    def counting(model, tokenizer, items, ref, cfg, run_root, pad_id):
        trained.append(Path(run_root).name)
        return real(model, tokenizer, items, ref, cfg, run_root, pad_id)

    monkeypatch.setattr(split_model, "brief_scores", counting)
    spec = {"base": TINY, "study_dir": str(tmp_path / "study"), "seeds": [0],
            "noise": [{"rate": 0.0}, {"rate": 0.25, "bias": "uniform"}, {"rate": 0.25, "bias": "low_margin"}],
            "overrides": {"data.toy.n_train": 96, "data.toy.n_eval": 48, "model.toy.sft_steps": 40,
                          "data.toy.noise": 0.0, "stage1.epochs": 1, "split.rule": "quantile", "split.score": "stage1",
                          "split.stage1_steps": 6, "eval.bootstrap": 100},
            "methods": ["dpo_clean", "dpo_all"], "metrics": ["accuracy"], "baseline": "dpo_all"}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["study", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    root = tmp_path / "study"
    # one brief model per noise setting, shared by both methods; reference scored once for all three
    assert len(trained) == 3 and out.count("split: reusing") == 3
    assert out.count("reference log-probs from") == 2
    names = sorted(p.stem for p in (root / "cells").glob("*.json"))
    assert names == ["s0_n0.25lm_dpo_all", "s0_n0.25lm_dpo_clean", "s0_n0.25u_dpo_all", "s0_n0.25u_dpo_clean",
                     "s0_n0_dpo_all", "s0_n0_dpo_clean"]
    md = (root / "study.md").read_text()
    assert "noise 0.25u" in md and "noise 0.25lm" in md and "| 0.25u | 0 | stage1 |" in md and "| 0.25lm | 0 | reference |" in md
    cell = json.loads((root / "cells" / "s0_n0.25u_dpo_clean.json").read_text())
    assert cell["bias"] == "uniform" and cell["condition"] == "0.25u"
    assert set(cell["split"]["flip_detection"]) == {"reference", "stage1"}
    # dpo_clean against dpo_all on the same held-out pairs: the mean of the per-pair differences
    paired = list(csv.DictReader((root / "paired.csv").open()))
    assert len(paired) == 6 and {r["method"] for r in paired} == {"dpo_clean"}
    other = json.loads((root / "cells" / "s0_n0.25u_dpo_all.json").read_text())
    acc = lambda c: [m > 0 for m in c["margins"]["final"]]  # noqa: E731
    want = (sum(acc(cell)) - sum(acc(other))) / len(acc(cell))
    row = next(r for r in paired if r["cell"] == "s0_n0.25u_dpo_clean" and r["metric"] == "accuracy")
    assert float(row["value"]) == pytest.approx(want, abs=1e-12) and row["n"] == "48" and row["bias"] == "uniform"
    assert float(row["ci_low"]) <= float(row["value"]) <= float(row["ci_high"])
    assert "## Paired against dpo_all" in md
    # the held-out reference scores of the three settings are the same numbers, scored once
    refs = {json.dumps(json.loads((d / "eval_scores.json").read_text())["reference"])
            for d in (root / "runs").glob("*_stage1-*")}
    assert len(refs) == 1


def test_flip_detection_counts():
    flags = [True, True, False, False, False, True, False, False]
    masks = {"reference": torch.tensor([1, 0, 1, 0, 0, 0, 0, 0], dtype=torch.bool),
             "stage1": torch.tensor([1, 1, 0, 0, 0, 1, 1, 0], dtype=torch.bool), "none": None}
    det = flip_detection(flags, masks)
    assert det["reference"] == {"n_noisy": 2, "recall": 1 / 3, "precision": 0.5, "random_recall": 0.25,
                                "random_precision": 3 / 8}
    assert det["stage1"] == {"n_noisy": 4, "recall": 1.0, "precision": 0.75, "random_recall": 0.5,
                             "random_precision": 3 / 8}
    assert "none" not in det


def test_implicit_margins_and_lowest():
    pol = PairScores(torch.tensor([-1.0, -5.0, -2.0]), torch.tensor([-3.0, -1.0, -2.0]),
                     torch.tensor([2, 4, 1]), torch.tensor([1, 2, 2]))
    ref = PairScores(torch.tensor([-2.0, -4.0, -2.0]), torch.tensor([-2.0, -2.0, -1.0]),
                     torch.tensor([2, 4, 1]), torch.tensor([1, 2, 2]))
    m = split_model.implicit_margins(pol, ref, "sum")
    assert m.tolist() == [2.0, -2.0, 1.0]  # (pc - rc) - (pr - rr)
    assert split_model.implicit_margins(pol, ref, "mean").tolist() == [0.5 + 1.0, -0.25 - 0.5, 0.0 + 0.5]
    assert split_model.lowest(m, 1 / 3).tolist() == [False, True, False]
    assert split_model.lowest(torch.tensor([1.0, 1.0, 0.0]), 2 / 3).tolist() == [True, False, True]


@pytest.mark.parametrize("sets,needle", [
    (["split.score=stage1"], "split.rule=quantile"),
    (["split.score=stage1", "split.rule=quantile", "split.require_positive=true"], "require_positive"),
    (["split.score=stage1", "split.rule=quantile", "split.stage1_steps=0"], "split.stage1_steps"),
])
def test_bad_stage1_split_options_exit_2(tmp_path, capsys, sets, needle):
    args = ["split", "-c", TINY, "--run-dir", str(tmp_path / "r")]
    for s in sets:
        args += ["-s", s]
    assert main(args) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
