"""The `compo` command: help texts, config errors, and the run-directory contract."""

import json

import pytest
import yaml
from transformers import AutoModelForCausalLM

from compo.cli import main
from compo.config import RunConfig, reference_table
from compo.core.rundir import read_jsonl

SMALL = ["data.toy.n_train=96", "data.toy.n_eval=32", "model.toy.sft_steps=40", "stage1.epochs=1",
         "zo.m=32", "zo.max_steps=3", "zo.checkpoint_every=2"]


@pytest.mark.parametrize("cmd", ["split", "train", "zo", "pipeline", "config"])
def test_every_subcommand_help_describes_its_options(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--set", "--run-dir", "--resume"):
        assert flag in out
    if cmd == "pipeline":
        for key, _, _ in reference_table():
            assert f"  {key} " in out, key


def test_bad_override_exits_with_message(capsys):
    assert main(["split", "--set", "split.delt=1"]) == 2
    assert "unknown key 'delt' in split; allowed: rule, delta" in capsys.readouterr().err


def test_pipeline_writes_the_run_directory_contract(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["pipeline", "-c", "tests/tiny.yaml", "--run-dir", str(run)]
    for s in SMALL:
        args += ["--set", s]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "clean" in out and "  after stage1 " in out and "  after stage2 " in out
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    RunConfig.model_validate(cfg)
    split = read_jsonl(run / "split.jsonl")
    assert set(split[0]) >= {"prompt", "chosen", "rejected", "logp_chosen", "logp_rejected", "margin", "noisy"}
    assert all(abs(r["margin"] - (r["logp_chosen"] - r["logp_rejected"])) < 1e-4 for r in split)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_pairs"] == len(split) == 96
    assert summary["n_noisy"] == sum(r["noisy"] for r in split)
    assert summary["n_clean"] + summary["n_noisy"] == 96
    assert "rewards/accuracies" in summary["stage1"] and summary["stage2"]["steps"] == 3
    stages = {r["stage"] for r in read_jsonl(run / "metrics.jsonl")}
    assert stages == {"stage1", "stage2"}
    assert (run / "reference" / "config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert model.config.tie_word_embeddings is False  # stage 2 untied the head


def test_pipeline_resume_skips_finished_stages(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["pipeline", "-c", "tests/tiny.yaml", "--run-dir", str(run)]
    for s in SMALL:
        base += ["--set", s]
    assert main(base + ["--set", "zo.enabled=false"]) == 0  # a run that ended after stage 1
    stage1_model = (run / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(base + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "holds the finished stage1; not running it again" in out
    records = read_jsonl(run / "metrics.jsonl")
    assert sum(r["stage"] == "stage1" for r in records) == 3  # stage 1 trained once (3 steps), not twice
    assert sum(r["stage"] == "stage2" for r in records) == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model_stage"] == "stage2"
    assert (run / "model" / "model.safetensors").read_bytes() != stage1_model
