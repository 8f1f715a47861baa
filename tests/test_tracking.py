"""Trackers (`report_to`): what reaches tensorboard equals metrics.jsonl, the config is stored
redacted, bad or missing trackers fail before any work, a failing tracker is switched off."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from compo import progress, tracking
from compo.cli import main
from compo.config import TRACKERS, RunConfig, load_config
from compo.rundir import read_jsonl

SMALL = ["data.toy.n_train=96", "data.toy.n_eval=32", "model.toy.sft_steps=40", "stage1.epochs=1",
         "zo.m=32", "zo.max_steps=3"]


@pytest.fixture(autouse=True)
def _default_output():
    yield
    progress.set_verbosity(progress.NORMAL)


def _argv(run: Path, *sets: str) -> list[str]:
    args = ["pipeline", "-c", "tests/tiny.yaml", "--run-dir", str(run)]
    for s in SMALL + list(sets):
        args += ["--set", s]
    return args


def _f32(x: float) -> float:
    return float(np.float32(x))


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs the tensorboard extra")
def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(_argv(run, "report_to=[tensorboard]") + ["--verbose"]) == 0
    out = capsys.readouterr().out
    # --verbose off a terminal: one progress line per step, then the closing line
    assert re.findall(r"^stage1: (\d)/3", out, re.M) == ["1", "2", "3"]
    assert re.findall(r"^stage2 \(ComPO\): (\d)/3", out, re.M) == ["1", "2", "3"]

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    records = read_jsonl(run / "metrics.jsonl")
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        prefix = {"stage1": "train/", "stage2": "stage2/"}[r["stage"]]
        for k, v in r.items():
            if k in ("stage", "step") or isinstance(v, (str, list, dict)) or v is None:
                continue
            expected.setdefault(prefix + k, []).append((r["step"], _f32(float(v))))
        if r["stage"] == "stage2":
            for side in ("chosen", "rejected"):
                mean = sum(p[f"logp_{side}_after"] for p in r["pairs"]) / len(r["pairs"])
                expected.setdefault(f"stage2/logps/{side}", []).append((r["step"], _f32(mean)))
    for name in ("train/loss", "train/rewards/chosen", "train/rewards/accuracies", "train/learning_rate",
                 "stage2/frac_minus", "stage2/skipped", "stage2/logps/chosen"):
        assert name in expected, name
    assert {t for t in tags if not t.startswith("eval/")} == set(expected)
    for name, points in expected.items():
        assert [(e.step, e.value) for e in acc.Scalars(name)] == points, name
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]

    summary = json.loads((run / "summary.json").read_text())
    for label in ("reference", "stage1", "stage2"):
        (e,) = acc.Scalars(f"eval/{label}/accuracy")
        assert (e.step, e.value) == (0, _f32(summary["eval"][label]["accuracy"]))
    (e,) = acc.Scalars("eval/stage2_effect/accuracy")
    assert e.value == _f32(summary["eval"]["stage2_effect"]["accuracy"])

    (text,) = acc.Tensors("config/text_summary")
    stored = yaml.safe_load(text.tensor_proto.string_val[0].decode())
    cfg = load_config("tests/tiny.yaml", SMALL + ["report_to=[tensorboard]", f"run_dir={run}"])
    assert stored == tracking.config_values(cfg)
    assert stored["stage1.beta"] == 0.1 and stored["report_to"] == "[tensorboard]"


def test_config_values_are_flat_and_redacted():
    cfg = RunConfig.model_validate({"eval": {"judge_options": {"api_key": "sk-live-123", "model": "m"}},
                                    "report_to": "tensorboard"})
    values = tracking.config_values(cfg)
    assert values["eval.judge_options.api_key"] == "***" and values["eval.judge_options.model"] == "m"
    assert "sk-live-123" not in json.dumps(values)
    assert values["zo.m"] == 1600 and values["split.reference"] is None and values["report_to"] == "[tensorboard]"
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in values.values())


def test_record_values_use_trl_names():
    group, values, step = tracking.record_values(
        {"stage": "stage1", "step": 4, "loss": 0.5, "rewards/chosen": -0.25, "epoch": 1.5})
    assert (group, step) == ("stage1", 4)
    assert values == {"train/loss": 0.5, "train/rewards/chosen": -0.25, "train/epoch": 1.5}
    pairs = [{"source": "a", "logp_chosen_after": -1.0, "logp_rejected_after": -3.0},
             {"source": "b", "logp_chosen_after": -2.0, "logp_rejected_after": -4.0}]
    group, values, step = tracking.record_values(
        {"stage": "stage2", "step": 2, "n_minus": 7, "skipped": True, "skip_reason": "weak signal",
         "accepted": None, "warnings": ["w"], "pairs": pairs})
    assert (group, step) == ("stage2", 2)
    assert values == {"stage2/n_minus": 7, "stage2/skipped": 1, "stage2/logps/chosen": -1.5,
                      "stage2/logps/rejected": -3.5}


def test_unknown_tracker_is_refused_naming_the_allowed_ones(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_argv(run, "report_to=[tensorbord]")) == 2
    err = capsys.readouterr().err
    assert "report_to: unknown tracker 'tensorbord'; allowed: " + ", ".join(TRACKERS) in err
    assert not run.exists()


def test_a_missing_tracker_package_fails_before_any_work(tmp_path, capsys):
    missing = next((t for t in TRACKERS if importlib.util.find_spec(t) is None), None)
    if missing is None:
        pytest.skip("every tracker package is installed")
    run = tmp_path / "run"
    assert main(_argv(run, f"report_to=[{missing}]")) == 2
    captured = capsys.readouterr()
    assert f"compo: error: report_to: the {missing} tracker needs" in captured.err
    assert f"pip install {tracking.pip_name(missing)}" in captured.err
    assert captured.out == "" and not run.exists()  # nothing loaded, nothing written


class _Fake:
    """A tracker that records what it is given; ``fail`` makes its log raise."""

    def __init__(self, name: str, fail: bool = False):
        self.name, self.fail, self.logged, self.finished = name, fail, [], 0

    def log(self, values, step=None):
        if self.fail:
            raise OSError("disk full")
        self.logged.append((values, step))

    def store_init_configuration(self, values):
        self.logged.append(("config", values))

    def finish(self):
        self.finished += 1


def test_a_failing_tracker_is_switched_off_with_one_warning(capsys):
    good, bad = _Fake("mlflow"), _Fake("aim", fail=True)
    trackers = tracking.Trackers([good, bad])
    trackers.log({"stage": "stage1", "step": 1, "loss": 0.5})
    trackers.log({"stage": "stage1", "step": 2, "loss": 0.25})
    out = capsys.readouterr().out
    assert out.count("warning: the aim tracker failed") == 1 and "OSError: disk full" in out
    assert bad.finished == 1 and trackers.trackers == [good]
    assert good.logged == [({"train/loss": 0.5}, 1), ({"train/loss": 0.25}, 2)]
    trackers.close()
    assert good.finished == 1 and trackers.trackers == []


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="needs the wandb extra")
def test_wandb_offline_run_gets_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert main(_argv(run, "report_to=[wandb]")) == 0
    (files,) = list((run / "wandb").glob("offline-run-*/files"))
    summary = json.loads((files / "wandb-summary.json").read_text())
    last = [r for r in read_jsonl(run / "metrics.jsonl") if r["stage"] == "stage1"][-1]
    assert summary["train/loss"] == pytest.approx(last["loss"]) and summary["train/global_step"] == last["step"]
    assert "stage1.beta" in (files / "config.yaml").read_text()
