"""Kill -9 at named points and resume (bit-identical to an uninterrupted run, no duplicate metrics,
no leftovers), non-finite values forced into each stage (exit 3, nothing non-finite saved), and
a judge budget that runs out mid-step (exit 4, then --resume with a raised budget finishes with
the same head as a run that never ran out)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compo.core import faults
from compo.cli import main
from compo.core.rundir import read_jsonl
from compo.zo.estimator import fits_dtype
from test_nonfinite import strict_loads

ROOT = Path(__file__).resolve().parent.parent
RUN_ARGS = ["data.toy.n_train=96", "data.toy.n_eval=32", "model.toy.sft_steps=40", "stage1.epochs=1",
            "stage1.save_steps=1", "zo.m=32", "zo.max_steps=4", "zo.checkpoint_every=1"]
VOLATILE = ("wall_s", "perturbations_per_s", "prep_s")


def _argv(run: Path, extra=()) -> list[str]:
    argv = ["pipeline", "-c", "tests/tiny.yaml", "--run-dir", str(run)]
    for s in [*RUN_ARGS, *extra]:
        argv += ["--set", s]
    return argv


def _subprocess(run: Path, *flags: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "COMPO_FAULT"}
    env.update(OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    if fault:
        env["COMPO_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "compo.cli", *_argv(run), *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_jsonl(run / "metrics.jsonl")]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hidden(run: Path) -> list[str]:
    return [str(p.relative_to(run)) for p in run.rglob(".*")]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    r = _subprocess(run)
    assert r.returncode == 0, r.stderr
    return run


KILL_POINTS = [
    "kill:stage1.step:2",  # between stage-1 steps (3 in all), checkpoints at 1 and 2
    "kill:stage1.checkpoint:2",  # inside the 2nd stage-1 checkpoint write (accelerate state written, no trainer_state)
    "kill:swap.model:1",  # stage 1's model/ is complete in its temp dir, not yet renamed
    "kill:zo.step:2",  # between stage-2 steps
    "kill:zo.checkpoint:3",  # inside a stage-2 checkpoint write (head written, no state.json)
    "kill:swap.zo:2",  # the old stage-2 checkpoint moved aside, the new one not yet in place
    "kill:swap.model:2",  # stage 1's model/ moved aside, stage 2's not yet in place
    "kill:stage2.saved:1",  # stage 2's model/ in place, summary.json not yet updated
]


@pytest.mark.parametrize("fault", KILL_POINTS)
def test_kill_and_resume_equals_an_uninterrupted_run(fault, reference_run, tmp_path):
    run = tmp_path / "run"
    killed = _subprocess(run, fault=fault)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    resumed = _subprocess(run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("model/model.safetensors", "model/zo_head_fp32.safetensors"):
        assert _digest(run / name) == _digest(reference_run / name), name
    assert _metrics(run) == _metrics(reference_run)  # every step logged once, same numbers
    got, want = (json.loads((r / "summary.json").read_text()) for r in (run, reference_run))
    assert got["eval"] == want["eval"] and got["model_stage"] == "stage2"
    assert got["stage2"]["steps"] == 4 and got["n_noisy"] == want["n_noisy"]
    assert _hidden(run) == [] and not (run / "checkpoints").exists()


@pytest.fixture()
def clean_faults(monkeypatch):
    faults._hits.clear()
    yield monkeypatch
    faults._hits.clear()


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("compo:")]
    assert len(err) == 1, err  # progress bars also write to stderr; the error itself is one line
    return err[0]


def test_nan_loss_in_stage1_stops_with_exit_3_and_keeps_the_last_checkpoint(clean_faults, tmp_path, capsys):
    clean_faults.setenv("COMPO_FAULT", "nan:stage1.loss:3")
    run = tmp_path / "run"
    assert main(_argv(run)) == 3
    line = _one_error_line(capsys)
    assert line.startswith("compo: error: stage1 step 3: non-finite loss (nan)") and "step-2" in line
    assert not (run / "model").exists()
    assert (run / "checkpoints" / "stage1" / "step-2" / "trainer_state.json").exists()
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]


def test_huge_learning_rate_never_leaves_a_non_finite_model(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(_argv(run, ["stage1.learning_rate=1e30", "stage1.max_grad_norm=1e30"]))
    line = _one_error_line(capsys)
    assert rc == 3 and "non-finite" in line and "stage1 step" in line, line
    assert not (run / "model").exists()


@pytest.mark.parametrize("point", ["zo.update", "zo.votes"])
def test_non_finite_stage2_step_keeps_the_stage1_model(point, clean_faults, tmp_path, capsys):
    run = tmp_path / "run"
    clean_faults.setenv("COMPO_FAULT", f"nan:{point}:3")
    assert main(_argv(run)) == 3
    line = _one_error_line(capsys)
    assert line.startswith("compo: error: stage2 step 3:") and "not finite" in line, line
    marker = json.loads((run / "model" / "compo_stage.json").read_text())
    assert marker["stage"] == "stage1"  # model/ still holds stage 1, nothing non-finite was written
    state = json.loads((run / "checkpoints" / "zo" / "state.json").read_text())
    assert state["step"] == 2
    clean_faults.delenv("COMPO_FAULT")
    assert main(_argv(run) + ["--resume"]) == 0  # once the cause is gone the run finishes from step 2
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["stage"] == "stage2"] == [1, 2, 3, 4]


def test_a_huge_step_size_warns(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_argv(run, ["zo.gamma=1e9"])) == 0
    out = capsys.readouterr().out
    assert "warning: stage2 step" in out and "lower zo.gamma" in out
    summary = json.loads((run / "summary.json").read_text())
    assert any("lower zo.gamma" in w for w in summary["stage2"]["warnings"])


FP16_STAGE2 = ["stage1.enabled=false", "model.dtype=float16"]


def _strict_json_files(run: Path) -> None:
    """Every JSON file in the run directory parses without NaN / Infinity."""
    for p in [*run.glob("*.json"), *run.glob("checkpoints/**/*.json")]:
        strict_loads(p.read_text())
    for p in run.glob("*.jsonl"):
        for line in p.read_text().splitlines():
            strict_loads(line)


def test_a_head_overflowing_float16_stops_with_exit_3(tmp_path, capsys):
    """The fp32 master head stays finite; the float16 model's head (or its logits) overflows."""
    run = tmp_path / "run"
    assert main(_argv(run, [*FP16_STAGE2, "zo.gamma=1e8"])) == 3
    line = _one_error_line(capsys)
    assert line.startswith("compo: error: stage2") and "float16" in line, line
    assert not (run / "model").exists()
    _strict_json_files(run)


def test_float16_overflow_stops_at_its_step_and_keeps_the_last_good_checkpoint(clean_faults, tmp_path, capsys):
    """A good run stopped at its 2nd update keeps the checkpoint before it; resumed with a huge
    zo.gamma it takes that step again (votes do not depend on gamma) and its head overflows."""
    run = tmp_path / "run"
    clean_faults.setenv("COMPO_FAULT", "nan:zo.update:2")
    assert main(_argv(run, FP16_STAGE2)) == 3
    capsys.readouterr()
    clean_faults.delenv("COMPO_FAULT")
    assert main(_argv(run, [*FP16_STAGE2, "zo.gamma=1e8"]) + ["--force-resume"]) == 3
    line = _one_error_line(capsys)
    prefix = "compo: error: stage2 step "
    assert line.startswith(prefix) and "the updated head overflows the model's float16" in line, line
    step = int(line[len(prefix):].split(":")[0])
    assert json.loads((run / "checkpoints" / "zo" / "state.json").read_text())["step"] == step - 1
    assert fits_dtype(load_file(run / "checkpoints" / "zo" / "head.safetensors")["weight"], torch.float16)
    assert not (run / "model").exists()
    _strict_json_files(run)


# ------------------------------------------------------------------ judge budget


def _hash_verdict(n: int, user_text: str):
    from fake_llm import Act

    return Act("Verdict: B" if hashlib.sha256(user_text.encode()).digest()[0] % 3 else "Verdict: A")


@pytest.fixture()
def judge_server(monkeypatch):
    from fake_llm import FakeLLM

    monkeypatch.setenv("COMPO_TEST_KEY", "sk-test-SECRET-987")
    srv = FakeLLM("openai", _hash_verdict)
    yield srv
    srv.stop()


def _judge_args(srv, cache: Path, max_calls: int | None) -> list[str]:
    opts = "zo.oracle.options"
    args = ["zo.m=8", "zo.max_steps=4", "zo.radius=0.5", "zo.skip_threshold=0.1", "zo.checkpoint_every=2",
            "zo.oracle.name=generation", f"{opts}.judge=openai", f"{opts}.max_new_tokens=4",
            f"{opts}.judge_options.model=judge-model", f"{opts}.judge_options.base_url={srv.base_url}",
            f"{opts}.judge_options.api_key_env=COMPO_TEST_KEY", f"{opts}.judge_options.cache_path={cache}",
            f"{opts}.judge_options.max_concurrency=2"]
    if max_calls is not None:
        args.append(f"{opts}.judge_options.max_calls={max_calls}")
    return args


def test_a_spent_budget_pauses_and_resume_with_more_loses_and_repeats_nothing(judge_server, tmp_path, capsys):
    full = tmp_path / "full"
    assert main(_argv(full, _judge_args(judge_server, tmp_path / "full.sqlite", None))) == 0
    run = tmp_path / "run"
    assert main(_argv(run, _judge_args(judge_server, tmp_path / "c.sqlite", 12))) == 4
    line = _one_error_line(capsys)
    assert line.startswith("compo: paused: stage2 paused before step 2 of 4") and "budget" in line, line
    summary = json.loads((run / "summary.json").read_text())
    assert "budget" in summary["stage2"]["stopped"] and summary["model_stage"] == "stage1"
    assert json.loads((run / "model" / "compo_stage.json").read_text())["stage"] == "stage1"
    assert json.loads((run / "checkpoints" / "zo" / "state.json").read_text())["step"] == 1
    assert main(_argv(run, _judge_args(judge_server, tmp_path / "c.sqlite", 1000)) + ["--resume"]) == 0
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["stage"] == "stage2"]
    assert steps == [1, 2, 3, 4]
    assert _digest(run / "model" / "zo_head_fp32.safetensors") == _digest(full / "model" / "zo_head_fp32.safetensors")
    assert json.loads((run / "summary.json").read_text())["model_stage"] == "stage2"


def test_budget_limits_are_not_part_of_the_fingerprint(judge_server, tmp_path):
    from compo.core import fingerprint
    from compo.config import load_config

    a = load_config("tests/tiny.yaml", _judge_args(judge_server, tmp_path / "a.sqlite", 5))
    b = load_config("tests/tiny.yaml", _judge_args(judge_server, tmp_path / "b.sqlite", 500) + ["run_dir=x"])
    c = load_config("tests/tiny.yaml", _judge_args(judge_server, tmp_path / "a.sqlite", 5) + ["zo.m=9"])
    fa, fb, fc = (fingerprint.current(x, "stage2") for x in (a, b, c))
    assert fingerprint.differences(fa, fb) == []
    assert fingerprint.differences(fa, fc) == ["zo.m"]


def test_leftovers_of_interrupted_writes_are_cleaned_or_restored(tmp_path):
    from compo.core.rundir import RunDir

    run = RunDir(tmp_path)
    (tmp_path / ".split.jsonl.abc.tmp").write_text("half")
    (tmp_path / ".model.xyz.tmp").mkdir()
    (tmp_path / ".model.old").mkdir()
    (tmp_path / ".model.old" / "config.json").write_text("{}")
    (tmp_path / "checkpoints" / ".zo.q.tmp").mkdir(parents=True)
    done = run.clean_leftovers()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "model"]
    assert (tmp_path / "model" / "config.json").read_text() == "{}"  # the swap was rolled back
    assert list((tmp_path / "checkpoints").iterdir()) == [] and len(done) == 4
    shutil.rmtree(tmp_path / "model")
