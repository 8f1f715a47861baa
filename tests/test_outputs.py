"""Run-directory outputs (docs/outputs.md): file modes follow the umask, wall time adds up over
resumed sessions, stage 2 unties a tied head (+V*H saved parameters), and the documented Python
call that runs stage 2 alone on a trained model works as written."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from compo.core import faults
from compo.cli import main
from oracles.judges.base import JudgeQuit
from oracles.likelihood import LikelihoodOracle

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.toy.n_train=96", "data.toy.n_eval=32", "model.toy.sft_steps=40", "stage1.epochs=1",
         "zo.m=32", "zo.max_steps=4", "zo.checkpoint_every=2"]


def _argv(run: Path, *extra: str) -> list[str]:
    argv = ["pipeline", "-c", str(ROOT / "tests" / "tiny.yaml"), "--run-dir", str(run)]
    for s in [*SMALL, *extra]:
        argv += ["--set", s]
    return argv


@pytest.fixture()
def clean_faults(monkeypatch):
    faults._hits.clear()
    yield monkeypatch
    faults._hits.clear()


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _stopped_in_stage2(run: Path, monkeypatch) -> None:
    """A run that diverges at stage 2's third step: model/ holds stage 1, checkpoints/zo step 2."""
    monkeypatch.setenv("COMPO_FAULT", "nan:zo.update:3")
    assert main(_argv(run)) == 3
    monkeypatch.delenv("COMPO_FAULT")
    faults._hits.clear()
    assert (run / "checkpoints" / "zo" / "state.json").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_run_directory_files_follow_the_umask(umask, clean_faults, tmp_path, capsys):
    run = tmp_path / "run"
    old = os.umask(umask)
    try:
        _stopped_in_stage2(run, clean_faults)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(run)): stat.S_IMODE(p.stat().st_mode) for p in [run, *run.rglob("*")]}
    for name in ("config.yaml", "summary.json", "metrics.jsonl", "split.jsonl", "fingerprint.json",
                 "model/model.safetensors", "model/compo_stage.json", "reference/config.json",
                 "checkpoints/zo/head.safetensors", "checkpoints/zo/state.json"):
        assert name in modes, name
    want = {True: 0o777 & ~umask, False: 0o666 & ~umask}
    wrong = {n: oct(m) for n, m in modes.items() if m != want[(run / n).is_dir()]}
    assert wrong == {}
    assert want[False] == (0o644 if umask == 0o022 else 0o600)


def test_resume_keeps_the_first_sessions_wall_time_and_adds_its_own(clean_faults, tmp_path, capsys):
    run = tmp_path / "run"
    _stopped_in_stage2(run, clean_faults)
    first = _summary(run)
    assert first["wall_s_sessions"] == [first["wall_s"]]  # the failed session is counted
    assert main([*_argv(run), "--resume"]) == 0
    after = _summary(run)
    sessions = after["wall_s_sessions"]
    assert len(sessions) == 2 and sessions[0] == first["wall_s"]
    assert after["wall_s"] == round(first["wall_s"] + sessions[1], 2) >= first["wall_s"]
    # a run without --resume starts the count anew
    assert main([*_argv(run), "--set", "zo.enabled=false"]) == 0
    assert len(_summary(run)["wall_s_sessions"]) == 1


class QuitOnce(LikelihoodOracle):
    """The likelihood oracle, quitting like a person would on its n-th vote round (COMPO_TEST_QUIT=n)."""

    calls = 0

    def compare(self, batch):
        QuitOnce.calls += 1
        if str(QuitOnce.calls) == os.environ.get("COMPO_TEST_QUIT"):
            raise JudgeQuit("the test judge quit")
        return super().compare(batch)


class _Clock:
    """time.time() for compo.zo.run only: each call is one second later."""

    def __init__(self):
        self.now = 1000.0

    def time(self) -> float:
        self.now += 1.0
        return self.now


def test_a_paused_stage2_keeps_its_time_across_the_resume(monkeypatch, tmp_path, capsys):
    import compo.zo.run as zo_run

    monkeypatch.setattr(zo_run, "time", _Clock())
    run = tmp_path / "run"
    argv = [*_argv(run), "--set", "zo.oracle.name=test_outputs:QuitOnce"]
    QuitOnce.calls = 0
    monkeypatch.setenv("COMPO_TEST_QUIT", "3")
    assert main(argv) == 4
    paused = _summary(run)["stage2"]
    assert "stopped" in paused and paused["steps_done"] == 2
    assert paused["wall_s"] == 1.0  # t0, then the pause: one clock tick
    monkeypatch.delenv("COMPO_TEST_QUIT")
    assert main([*argv, "--resume"]) == 0
    done = _summary(run)["stage2"]
    assert done["steps"] == 4 and "stopped" not in done
    assert done["wall_s"] == 2.0  # the paused session's second plus this one's


def _numel(path: Path) -> dict[str, int]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}


def _snippet() -> str:
    text = (ROOT / "docs" / "outputs.md").read_text()
    block = text[text.index("<!-- stage2-alone -->"):text.index("<!-- /stage2-alone -->")]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def test_the_documented_stage2_call_runs_on_a_trained_model_and_unties_its_head(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = yaml.safe_load((ROOT / "tests" / "tiny.yaml").read_text())
    for item in SMALL:
        key, value = item.split("=")
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(value)
    Path("my.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["pipeline", "-c", "my.yaml", "--run-dir", "runs/exp1", "--set", "zo.enabled=false"]) == 0
    scope: dict = {}
    exec(compile(_snippet(), "docs/outputs.md", "exec"), scope)
    assert scope["stage2"]["steps"] == 4 and scope["stage2"]["untied_head"] is True
    zo = Path("runs/exp1-zo")
    assert json.loads((zo / "model" / "compo_stage.json").read_text())["stage"] == "stage2"
    # the split was scored with the reference, so stage 2 trained exactly the pipeline's noisy pairs
    noisy = lambda p: [r["source"] for r in map(json.loads, open(p)) if r["noisy"]]  # noqa: E731
    assert noisy(zo / "split.jsonl") == noisy("runs/exp1/split.jsonl")
    s1, s2 = _numel(Path("runs/exp1/model/model.safetensors")), _numel(zo / "model" / "model.safetensors")
    emb = next(k for k in s1 if k.endswith("embed_tokens.weight"))
    vocab, hidden = s1[emb]
    assert "lm_head.weight" not in s1 and s2["lm_head.weight"] == [vocab, hidden]
    assert sum(torch.Size(v).numel() for v in s2.values()) - sum(torch.Size(v).numel() for v in s1.values()) == vocab * hidden
    assert _numel(zo / "model" / "zo_head_fp32.safetensors") == {"weight": [vocab, hidden]}
    with safe_open(str(zo / "model" / "model.safetensors"), "pt") as a, \
            safe_open("runs/exp1/model/model.safetensors", "pt") as b:
        assert torch.equal(a.get_tensor(emb), b.get_tensor(emb))  # the body (embeddings included) is untouched
        assert not torch.equal(a.get_tensor("lm_head.weight"), b.get_tensor(emb))  # the head moved
