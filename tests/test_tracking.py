"""Trackers (`report_to`): what reaches tensorboard equals metrics.jsonl, the config is stored
redacted, bad or missing trackers fail before any work, a failing tracker is switched off."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from compo.core import tracking
from compo.cli import main
from compo.config import TRACKERS, RunConfig, load_config
from compo.core.errors import UserError
from compo.core.rundir import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
NEEDS_TB = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs the tensorboard extra")
SMALL = ["data.toy.n_train=96", "data.toy.n_eval=32", "model.toy.sft_steps=40", "stage1.epochs=1",
         "zo.m=32", "zo.max_steps=3"]


def _argv(run: Path, *sets: str) -> list[str]:
    args = ["pipeline", "-c", "tests/tiny.yaml", "--run-dir", str(run)]
    for s in SMALL + list(sets):
        args += ["--set", s]
    return args


def _f32(x: float) -> float:
    return float(np.float32(x))


def _events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _stage_scalars(acc) -> dict[str, list[tuple[int, float]]]:
    """Every train/ and stage2/ scalar of the event files as [(step, value)], in file order."""
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if not t.startswith("eval/")}


def _expected(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the trackers should hold for metrics.jsonl's records (TRL names, float32 values)."""
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
    return expected


@NEEDS_TB
def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_argv(run, "report_to=[tensorboard]") + ["--verbose"]) == 0
    out = capsys.readouterr().out
    # --verbose off a terminal: one progress line per step, then the closing line
    assert re.findall(r"^stage1: (\d)/3", out, re.M) == ["1", "2", "3"]
    assert re.findall(r"^stage2 \(ComPO\): (\d)/3", out, re.M) == ["1", "2", "3"]

    acc = _events(run)
    expected = _expected(read_jsonl(run / "metrics.jsonl"))
    for name in ("train/loss", "train/rewards/chosen", "train/rewards/accuracies", "train/learning_rate",
                 "stage2/frac_minus", "stage2/skipped", "stage2/logps/chosen"):
        assert name in expected, name
    assert _stage_scalars(acc) == expected
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


@NEEDS_TB
def test_a_rerun_into_the_same_run_dir_leaves_exactly_metrics_jsonl_in_the_event_files(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_argv(run, "report_to=[tensorboard]")) == 0
    # a fresh rerun with fewer steps: the first run's steps 3 are gone from metrics.jsonl and the events
    assert main(_argv(run, "report_to=[tensorboard]", "stage1.max_steps=2", "zo.max_steps=2")) == 0
    records = read_jsonl(run / "metrics.jsonl")
    assert [(r["stage"], r["step"]) for r in records] == [("stage1", 1), ("stage1", 2), ("stage2", 1), ("stage2", 2)]
    acc = _events(run)
    assert _stage_scalars(acc) == _expected(records)
    summary = json.loads((run / "summary.json").read_text())
    assert [(e.step, e.value) for e in acc.Scalars("eval/stage2/accuracy")] == [
        (0, _f32(summary["eval"]["stage2"]["accuracy"]))]  # this run's evaluation, once
    assert len(acc.Tensors("config/text_summary")) == 1
    # a later stage-2 command keeps stage 1's records (in metrics.jsonl, so in the events too)
    zo = ["zo", "-c", "tests/tiny.yaml", "--run-dir", str(run)]
    for item in SMALL + ["report_to=[tensorboard]", "zo.max_steps=3"]:
        zo += ["--set", item]
    assert main(zo) == 0
    records = read_jsonl(run / "metrics.jsonl")
    assert [(r["stage"], r["step"]) for r in records] == [("stage1", 1), ("stage1", 2)] + [("stage2", i) for i in (1, 2, 3)]
    assert _stage_scalars(_events(run)) == _expected(records)


def _killed(run: Path, fault: str, *flags: str) -> None:
    """The pipeline in a subprocess, SIGKILLed at the fault point (as a crash or a lost node)."""
    args = [sys.executable, "-m", "compo.cli", *_argv(run, "report_to=[tensorboard]", "zo.max_steps=4",
                                                      "zo.checkpoint_every=2", "stage1.save_steps=2"), *flags]
    env = {**{k: v for k, v in os.environ.items() if k != "RANK"}, "COMPO_FAULT": fault}
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == -9, r.stderr[-2000:]


@NEEDS_TB
def test_resumed_stages_log_each_step_once(tmp_path, capsys):
    """Killed after stage 1's step 3 (checkpoint 2), then after stage 2's step 3 (checkpoint 2):
    each resume logs step 3 again; the event files hold it once, and stage 1's step 3 (above
    stage 2's checkpoint) survives stage 2's resume."""
    run = tmp_path / "run"
    _killed(run, "kill:stage1.step:3")
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    _killed(run, "kill:zo.step:3", "--resume")
    records = read_jsonl(run / "metrics.jsonl")
    assert [(r["stage"], r["step"]) for r in records] == [("stage1", i) for i in (1, 2, 3)] + [("stage2", i) for i in (1, 2, 3)]
    assert _stage_scalars(_events(run)) == _expected(records)
    assert main(_argv(run, "report_to=[tensorboard]", "zo.max_steps=4", "zo.checkpoint_every=2",
                      "stage1.save_steps=2") + ["--resume"]) == 0
    assert "stage2: resumed from" in capsys.readouterr().out
    records = read_jsonl(run / "metrics.jsonl")
    assert [(r["stage"], r["step"]) for r in records] == [("stage1", i) for i in (1, 2, 3)] + [("stage2", i) for i in (1, 2, 3, 4)]
    scalars = _stage_scalars(_events(run))
    assert scalars == _expected(records)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3] and [s for s, _ in scalars["stage2/n_minus"]] == [1, 2, 3, 4]


def test_config_values_are_flat_and_redacted():
    cfg = RunConfig.model_validate({"eval": {"judge_options": {"api_key": "sk-live-123", "model": "m"}},
                                    "report_to": "tensorboard"})
    values = tracking.config_values(cfg)
    assert values["eval.judge_options.api_key"] == "***" and values["eval.judge_options.model"] == "m"
    assert "sk-live-123" not in json.dumps(values)
    assert values["zo.m"] == 1600 and values["split.reference"] is None and values["report_to"] == "[tensorboard]"
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in values.values())


SECRETS = {"token": "hf_TOK1", "access_token": "AT2", "hf_token": "hf_TOK3", "api_key": "sk-4", "secret_key": "S5",
           "credentials": {"user": "u", "pw": "CRED6"}, "credential": "CRED7", "password": "PW8", "apiKey": "sk-9",
           "headers": {"Authorization": "Bearer AUTH10", "X-Api-Key": "XK11"}}
KEPT = {"max_tokens": 5, "max_tokens_total": 1000, "max_output_tokens": 64, "token_param": "max_completion_tokens",
        "api_key_env": "OPENAI_API_KEY", "api_key_file": "~/.keys/openai", "model": "gpt-4o-mini"}


def test_secrets_never_reach_the_trackers():
    opts = {**SECRETS, **KEPT, "base_url": "https://alice:PW12@judge.example.com/v1?token=QT13&lang=en",
            "mirrors": ["http://TOK14@mirror.example.com/v1"]}
    cfg = RunConfig.model_validate({"eval": {"judge_options": opts}, "report_to": "tensorboard"})
    values = tracking.config_values(cfg)
    text = json.dumps(values)
    for secret in ("TOK1", "AT2", "TOK3", "sk-4", "S5", "CRED6", "CRED7", "PW8", "sk-9", "AUTH10", "XK11", "PW12",
                   "alice", "QT13", "TOK14"):
        assert secret not in text, secret
    o = {k.removeprefix("eval.judge_options."): v for k, v in values.items() if k.startswith("eval.judge_options.")}
    assert {k: o[k] for k in ("token", "access_token", "hf_token", "api_key", "secret_key", "credentials", "password",
                              "apiKey", "headers.Authorization", "headers.X-Api-Key")} == dict.fromkeys(
        ("token", "access_token", "hf_token", "api_key", "secret_key", "credentials", "password", "apiKey",
         "headers.Authorization", "headers.X-Api-Key"), "***")
    assert {k: o[k] for k in KEPT} == KEPT  # option names that hold counts, names and paths stay
    assert o["base_url"] == "https://***@judge.example.com/v1?token=***&lang=en"
    assert o["mirrors"] == "['http://***@mirror.example.com/v1']"


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


def test_tracker_options_need_their_tracker_in_report_to(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_argv(run, "logging.tracker_options.wandb.entity=me")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["compo: error: logging.tracker_options.wandb: options for the wandb tracker, which is not in "
                   "report_to (none): add wandb to report_to or remove these options"]
    assert not run.exists()
    cfg = load_config(None, ["report_to=[tensorboard]", "logging.tracker_options.mlflow.tags={a: b}"])
    with pytest.raises(UserError) as e:
        tracking.check(cfg)
    assert e.value.where == "logging.tracker_options.mlflow" and "not in report_to (tensorboard)" in e.value.what


@NEEDS_TB
def test_a_tracker_the_installed_accelerate_lacks_is_a_user_error(monkeypatch):
    import accelerate
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    monkeypatch.delitem(LOGGER_TYPE_TO_CLASS, "tensorboard")
    with pytest.raises(UserError) as e:
        tracking.check(load_config(None, ["report_to=[tensorboard]"]))
    assert e.value.where == "report_to"
    assert e.value.what.startswith(f"the installed accelerate {accelerate.__version__} has no tensorboard tracker (it has ")
    assert e.value.what.endswith("): pip install -U accelerate")


class _Recorder:
    """Stands in for an accelerate tracker class: records how it was constructed."""

    requires_logging_directory = False
    built: list = []

    def __init__(self, *args, **kwargs):
        self.name, self.args, self.kwargs = "mlflow", args, kwargs
        _Recorder.built.append(self)

    def start(self):
        pass


def test_run_name_goes_to_the_trackers_own_keyword(tmp_path, monkeypatch):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    monkeypatch.setitem(LOGGER_TYPE_TO_CLASS, "mlflow", _Recorder)
    root = tmp_path / "exp-7"
    for sets, expected in ((["logging.project=proj"], "exp-7"), (["logging.run_name=dpo-a"], "dpo-a"),
                           (["logging.run_name=dpo-a", "logging.tracker_options.mlflow.run_name=mine"], "mine")):
        t = tracking._build("mlflow", load_config(None, ["report_to=[mlflow]", *sets]), root)
        assert t.kwargs["run_name"] == expected
    assert _Recorder.built[0].args == ("proj",)  # the project, as accelerate's init_trackers passes it


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
