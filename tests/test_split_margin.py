"""split.margin (sum | mean), the calibration table, seeded data.limit, and `compo eval`."""

import json

import pytest
import torch

from compo.cli import main
from compo.config import load_config
from compo.scoring.split import calibration, calibration_text, margins_of
from compo.run.workspace import load_data

SMALL = ["data.toy.n_train=96", "data.toy.n_eval=32", "model.toy.sft_steps=40"]


def test_mean_margin_divides_by_token_counts():
    c, r = torch.tensor([-10.0, -6.0]), torch.tensor([-4.0, -9.0])
    nc, nr = torch.tensor([5, 3]), torch.tensor([2, 3])
    assert torch.equal(margins_of(c, r, nc, nr, "sum"), torch.tensor([-6.0, 3.0]))
    assert torch.allclose(margins_of(c, r, nc, nr, "mean"), torch.tensor([-2.0 + 2.0, -2.0 + 3.0]))
    with pytest.raises(ValueError):
        margins_of(c, r, nc, nr, "median")


def test_calibration_counts_by_hand():
    m = torch.tensor([0.3, -0.8, 1.5, -2.5, 4.0, 12.0, 0.01, -0.04, 0.2, 0.6])
    rows = calibration({"sum": m})
    absolute = {r["threshold"]: r["n_noisy"] for r in rows if r["rule"] == "absolute"}
    assert absolute == {0.5: 4, 1.0: 6, 2.0: 7, 3.0: 8, 5.0: 9, 10.0: 9, 20.0: 10}
    quant = {r["threshold"]: r["n_noisy"] for r in rows if r["rule"] == "quantile"}
    assert quant == {0.1: 1, 0.2: 2, 0.3: 3, 0.5: 5}
    assert "delta=3: 8" in calibration_text(rows)


def test_split_with_mean_margin_and_calibration_in_summary(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["split", "-c", "tests/tiny.yaml", "--run-dir", str(run), "--set", "split.margin=mean",
            "--set", "split.delta=0.1"] + sum((["--set", s] for s in SMALL), [])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "split calibration (pairs marked noisy):" in out and "margin=mean absolute" in out
    rows = [json.loads(l) for l in (run / "split.jsonl").open()]
    for r in rows:
        mean = r["logp_chosen"] / r["chosen_tokens"] - r["logp_rejected"] / r["rejected_tokens"]
        assert r["margin_mean"] == pytest.approx(mean, abs=1e-5)
        assert r["noisy"] == (abs(r["margin_mean"]) < 0.1)
    split = json.loads((run / "summary.json").read_text())["split"]
    assert split["margin"] == "mean"
    cal = {(c["margin"], c["rule"], c["threshold"]): c["n_noisy"] for c in split["calibration"]}
    assert cal[("mean", "absolute", 0.1)] == split["n_noisy"] == sum(r["noisy"] for r in rows)


def test_limit_takes_a_seeded_random_subset_before_the_held_out_fraction(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"}) + "\n"
                            for i in range(100)))
    cfg = load_config(None, [f"data.path={data}", "data.limit=40", "data.eval_fraction=0.25", "data.eval_limit=5"])
    train, held, _ = load_data(cfg)
    assert len(train) == 30 and len(held) == 5
    ids = [int(r.prompt[1:]) for r in train + held]
    assert len(set(ids)) == 35 and max(ids) >= 40  # not the first 40 rows
    again, held2, _ = load_data(cfg)
    assert [r.prompt for r in again] == [r.prompt for r in train] and [r.prompt for r in held2] == [r.prompt for r in held]
    other, _, _ = load_data(load_config(None, [f"data.path={data}", "data.limit=40", "seed=1"]))
    assert [r.prompt for r in other] != [r.prompt for r in train][:40]


def test_eval_command_on_a_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["-c", "tests/tiny.yaml", "--run-dir", str(run)] + sum((["--set", s] for s in SMALL), [])
    assert main(["pipeline"] + base + ["--set", "stage1.epochs=1", "--set", "zo.m=16", "--set", "zo.max_steps=2"]) == 0
    capsys.readouterr()
    assert main(["eval"] + base + ["--set", "eval.generate=8", "--set", "eval.bootstrap=100"]) == 0
    out = capsys.readouterr().out
    res = json.loads((run / "eval.json").read_text())
    assert res["n_pairs"] == 32 and res["model"] == str(run / "model")
    m = res["metrics"]
    summary = json.loads((run / "summary.json").read_text())["eval"]["stage2"]
    for k in ("accuracy", "rewards/accuracies", "shift/chosen", "displacement/both_down"):
        assert m[k]["value"] == pytest.approx(summary[k], abs=1e-6), k  # same numbers as the pipeline
        assert m[k]["ci_low"] <= m[k]["value"] <= m[k]["ci_high"]
        assert any(line.startswith(k) for line in out.splitlines())
    assert m["gen/length"]["n"] == 8 and "gold/score" in m and 0 <= m["gold/win_rate"]["value"] <= 1
    for verdict, rate in (("A", 1.0), ("tie", 0.5), ("B", 0.0)):  # A = the evaluated model's response
        assert main(["eval"] + base + ["--set", "eval.generate=4", "--set", "eval.judge=tests.judge_custom:ConstantJudge",
                                       "--set", f"eval.judge_options={{verdict: {verdict}}}", "--set", "eval.out=judged.json"]) == 0
        judged = json.loads((run / "judged.json").read_text())["metrics"]["winrate/judge"]
        assert judged["value"] == rate and judged["n"] == 4


def test_eval_errors_before_work(tmp_path, capsys):
    assert main(["eval", "--run-dir", str(tmp_path / "none")]) == 2
    assert "eval.reference" in capsys.readouterr().err
    assert main(["eval", "--run-dir", str(tmp_path), "--set", f"eval.reference={tmp_path}",
                 "--set", f"eval.model={tmp_path}/missing"]) == 2
    assert "eval.model" in capsys.readouterr().err
    assert main(["eval", "--set", "eval.judge=openai"]) == 2
    assert "eval.judge compares generated responses: set eval.generate" in capsys.readouterr().err
