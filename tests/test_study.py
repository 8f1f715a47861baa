"""`compo study`: a 2-method x 2-noise x 1-seed sweep on the tiny model, interrupted and resumed."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import yaml

from compo.cli import main
from compo.research.study import load_study

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def _study(tmp_path: Path) -> Path:
    spec = {
        "base": str(ROOT / "tests" / "tiny.yaml"),
        "study_dir": str(tmp_path / "study"),
        "seeds": [0],
        "noise_rates": [0.0, 0.3],
        "noise_bias": "low_margin",
        "overrides": {"data.toy.n_train": 96, "data.toy.n_eval": 48, "model.toy.sft_steps": 40, "data.toy.noise": 0.0,
                      "stage1.epochs": 1, "zo.m": 32, "zo.max_steps": 4, "zo.checkpoint_every": 1,
                      "zo.track_pairs": 4, "eval.bootstrap": 200},
        "methods": ["dpo_clean", "compo_projected"],
        "metrics": ["accuracy", "shift/chosen"],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(path: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "COMPO_FAULT"}
    if fault:
        env["COMPO_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "compo.cli", "study", "-c", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_study_runs_resumes_and_reports(tmp_path, capsys):
    path = _study(tmp_path)
    root = tmp_path / "study"
    killed = _run(path, "kill:zo.step:2")  # dies in cell 2 (the first stage-2 cell), step 2
    assert killed.returncode == -9, killed.stderr
    done = sorted(p.name for p in (root / "cells").glob("*.json"))
    assert done == ["s0_n0_dpo_clean.json"]
    first = (root / "cells" / done[0]).stat().st_mtime_ns
    stage1_dir = next((root / "runs").glob("s0_n0_stage1-*"))
    stage1_lines = (stage1_dir / "metrics.jsonl").read_text()
    assert main(["study", "-c", str(path), "--report-only"]) == 0  # a report of the finished cell; nothing run
    assert "3 of 4 cells not finished yet (first: s0_n0_compo_projected)" in capsys.readouterr().out
    assert {r["cell"] for r in csv.DictReader((root / "study.csv").open())} == {"s0_n0_dpo_clean"}
    assert sorted(p.name for p in (root / "cells").glob("*.json")) == done

    res = _run(path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "cell 1/4 s0_n0_dpo_clean: done earlier, skipping" in res.stdout
    # the pace: none before this process has run a cell, then from the cells it ran
    assert re.search(r"study: cell 2/4 s0_n0_compo_projected\n", res.stdout)
    assert re.search(r"study: cell 3/4 \S+ \(1 cell run here in \d+\S*; about \d+\S* left for 2 at that pace\)",
                     res.stdout)
    assert re.search(r"study: cell 4/4 \S+ \(2 cells run here in \S+; about \S+ left for 1 at that pace\)", res.stdout)
    assert "stage2: resumed from" in res.stdout  # the interrupted cell continued from its checkpoint
    assert (root / "cells" / done[0]).stat().st_mtime_ns == first
    assert (stage1_dir / "metrics.jsonl").read_text() == stage1_lines  # stage 1 not redone
    cell = json.loads((root / "runs" / "s0_n0_compo_projected" / "summary.json").read_text())
    assert cell["stage2"]["steps"] == 4
    steps = [json.loads(l)["step"] for l in (root / "runs" / "s0_n0_compo_projected" / "metrics.jsonl").open()
             if json.loads(l)["stage"] == "stage2"]
    assert steps == [1, 2, 3, 4]  # each step logged once across the kill
    assert "reusing" in res.stdout  # stage-2 cells reuse the split and stage 1

    rows = list(csv.DictReader((root / "study.csv").open()))
    assert {r["cell"] for r in rows} == {"s0_n0_dpo_clean", "s0_n0_compo_projected", "s0_n0.3_dpo_clean",
                                        "s0_n0.3_compo_projected"}
    acc = [r for r in rows if r["metric"] == "accuracy"]
    assert len(acc) == 4 and all(float(r["ci_low"]) <= float(r["value"]) <= float(r["ci_high"]) for r in acc)
    assert all(r["n"] == "48" for r in acc)
    md = (root / "study.md").read_text()
    assert "## accuracy" in md and "| compo_projected |" in md and "noise 0.3" in md
    assert "| compo_projected | 0.3 | " in md and "| compo_projected | 0 | " in md  # stage 2's own effect, per noise rate
    pngs = sorted((root / "plots").glob("*.png"))
    names = {p.name for p in pngs}
    assert {"accuracy_vs_noise.png", "shift_chosen_vs_noise.png", "margins_noise0.png", "margins_noise0.3.png",
            "trajectories_compo_projected_noise0.png"} <= names
    for p in pngs:
        assert p.read_bytes()[:8] == PNG
        assert matplotlib.image.imread(p).shape[0] > 0
    res = json.loads((root / "cells" / "s0_n0.3_compo_projected.json").read_text())
    assert len(res["tracks"]) == 4 and res["tracks"][0]["steps"] == [0, 1, 2, 3, 4]
    assert res["split"]["wrong_labels_in_noisy"] is not None  # carried into runs that reuse the split
    other = json.loads((root / "cells" / "s0_n0.3_dpo_clean.json").read_text())
    assert other["split"] == res["split"]
    _refuses_changed_configs(path, root, capsys)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refuses_changed_configs(path: Path, root: Path, capsys) -> None:
    """A rerun whose cells would change refuses before any work; the study directory stays as it was."""
    spec = yaml.safe_load(path.read_text())
    before = _files(root)

    def refused(changes: dict, where: str, key: str, **study) -> None:
        changed = tmp / "changed.yaml"
        changed.write_text(yaml.safe_dump({**spec, "overrides": {**spec["overrides"], **changes}, **study}))
        assert main(["study", "-c", str(changed)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and where in err and key in err, err
        assert _files(root) == before

    tmp = path.parent
    cells = root / "cells"
    refused({"zo.m": 16}, str(cells / "s0_n0_compo_projected.json"), "zo.m: 32 -> 16")  # the stage-1 cell before it is unchanged
    refused({"eval.bootstrap": 100}, str(cells / "s0_n0_dpo_clean.json"), "eval.bootstrap: 200 -> 100")
    refused({"stage1.beta": 0.2}, str(cells / "s0_n0_dpo_clean.json"), "stage1.beta: 0.1 -> 0.2")
    refused({}, str(cells / "s0_n0_dpo_clean.json"), "holds stage1 results but its config now ends with stage2",
            methods={"dpo_clean": {"zo.enabled": True}, "compo_projected": {}})  # zo.* at their defaults

    legacy = cells / "s0_n0_compo_projected.json"  # a result from before cells recorded their fingerprint
    saved = json.loads(legacy.read_text())
    legacy.write_text(json.dumps({k: v for k, v in saved.items() if k != "fingerprint"}))
    before = _files(root)
    refused({"zo.m": 16}, str(legacy), "zo.m: 32 -> 16")  # read from its run directory's record
    legacy.write_text(json.dumps({k: v for k, v in saved.items() if k not in ("fingerprint", "run_dir")}))
    before = _files(root)
    refused({}, str(legacy), "records no fingerprint and its run directory None has none")
    legacy.unlink()  # no result yet, but its stage-2 run directory ran with zo.m 32
    before = _files(root)
    refused({"zo.m": 16}, str(root / "runs" / "s0_n0_compo_projected" / "fingerprint.json"), "zo.m: 32 -> 16")
    legacy.write_text(json.dumps(saved))
    assert main(["study", "-c", str(path)]) == 0  # the unchanged study still reads every cell back
    assert capsys.readouterr().out.count("done earlier, skipping") == 4


def test_a_second_stage1_run_reuses_the_split_and_its_summary(tmp_path, capsys):
    path = _study(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec.update(noise_rates=[0.3], methods=["dpo_clean", "dpo_all"])
    path.write_text(yaml.safe_dump(spec))
    assert main(["study", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    root = tmp_path / "study"
    dirs = sorted((root / "runs").glob("s0_n0.3_stage1-*"))
    assert len(dirs) == 2  # DPO on clean and on all pairs: two stage-1 runs
    assert (dirs[0] / "split.jsonl").read_text() == (dirs[1] / "split.jsonl").read_text()
    assert out.count("split: reusing") == 1  # the second stage-1 run reads the first one's split
    clean = json.loads((root / "cells" / "s0_n0.3_dpo_clean.json").read_text())["split"]
    every = json.loads((root / "cells" / "s0_n0.3_dpo_all.json").read_text())["split"]
    assert every == clean and clean["wrong_labels_in_noisy"] is not None and clean["n_noisy"] > 0


def test_a_run_killed_between_saving_its_model_and_scoring_it_is_scored_on_resume(tmp_path):
    path = _study(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec.update(noise_rates=[0.3], methods=["dpo_clean", "compo_projected"])
    path.write_text(yaml.safe_dump(spec))
    root = tmp_path / "study"
    assert _run(path, "kill:stage1.saved:1").returncode == -9  # stage 1's model saved, not yet scored
    stage1_dir = next((root / "runs").glob("s0_n0.3_stage1-*"))
    assert "stage1" not in json.loads((stage1_dir / "eval_scores.json").read_text())
    assert _run(path, "kill:stage2.saved:1").returncode == -9  # cell 1 scored; cell 2's stage 2 saved, not scored
    assert sorted(p.name for p in (root / "cells").glob("*.json")) == ["s0_n0.3_dpo_clean.json"]
    res = _run(path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "holds the finished stage2; not running it again" in res.stdout
    for run_dir, stage in ((stage1_dir, "stage1"), (root / "runs" / "s0_n0.3_compo_projected", "stage2")):
        assert stage in json.loads((run_dir / "eval_scores.json").read_text())
        steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").open() if json.loads(l)["stage"] == stage]
        assert steps == sorted(set(steps)) and steps[0] == 1  # each step trained and logged once
    cell = json.loads((root / "cells" / "s0_n0.3_compo_projected.json").read_text())
    assert cell["metrics"]["accuracy"]["n"] == 48 and "stage2_effect" in cell


def test_study_config_errors_name_the_key(tmp_path, capsys):
    path = _study(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["methods"] = {"dpo_clean": {"stage1.bta": 1}}
    path.write_text(yaml.safe_dump(spec))
    assert main(["study", "-c", str(path)]) == 2
    assert "cell s0_n0_dpo_clean" in capsys.readouterr().err
    spec["methods"] = ["no_such_method"]
    path.write_text(yaml.safe_dump(spec))
    assert main(["study", "-c", str(path)]) == 2
    assert "methods.no_such_method: unknown preset" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()
    spec["methods"] = ["dpo_clean"]
    path.write_text(yaml.safe_dump(spec))
    assert main(["study", "-c", str(path), "--report-only"]) == 2
    assert "no finished cell to report yet" in capsys.readouterr().err


def test_every_shipped_study_config_validates():
    for p in [*(ROOT / "configs").glob("*study*.yaml"), ROOT / "configs" / "hh_rlhf_support.yaml"]:
        study, cells = load_study(p)
        assert len(cells) == len(study.seeds) * len(study.settings()) * len(study.methods)
