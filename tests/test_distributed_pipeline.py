"""The whole pipeline in 2 processes (gloo, FILE rendezvous, as under torchrun): sharded split
scoring, stage 1 (DDP), stage 2, evaluation write the outputs one process writes for the same
global batch; a stage-2 run killed with N processes resumes with M (2 -> 1, 1 -> 2) to the
uninterrupted head, bit for bit."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from torch.multiprocessing import ProcessExitedException

from compo.cli import main
from dist_run import argv, metrics, output, spawn, summary

SETS = ["data.toy.n_train=96", "data.toy.n_eval=32", "model.toy.sft_steps=40", "stage1.epochs=1",
        "zo.m=32", "zo.max_steps=4", "zo.checkpoint_every=1"]
ONE = SETS + ["stage1.grad_accum=2"]  # 32 rows per step: 2 micro-batches of 16 in one process ...
TWO = SETS + ["stage1.grad_accum=1"]  # ... or one in each of two
SAME_BYTES = ("split.jsonl", "eval_scores.json", "model/model.safetensors", "model/zo_head_fp32.safetensors",
              "reference/model.safetensors")


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    run = tmp_path_factory.mktemp("one") / "run"
    assert main(argv("pipeline", run, ONE)) == 0
    return run


def _same_outputs(a, b) -> None:
    for name in SAME_BYTES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert metrics(a) == metrics(b)
    assert summary(a) == summary(b)
    assert sorted(str(p.relative_to(a)) for p in a.rglob("*")) == sorted(str(p.relative_to(b)) for p in b.rglob("*"))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def test_two_processes_write_the_outputs_of_one(one, tmp_path):
    two = tmp_path / "two"
    spawn(2, argv("pipeline", two, TWO), tmp_path)
    _same_outputs(one, two)
    c1, c2 = (_flat(yaml.safe_load((r / "config.yaml").read_text())) for r in (one, two))
    assert sorted(k for k in c1 if c1[k] != c2[k]) == ["run_dir", "stage1.grad_accum"]
    f1, f2 = (_flat(json.loads((r / "fingerprint.json").read_text())) for r in (one, two))
    assert sorted(k for k in f1 if f1[k] != f2[k]) == ["stage1.stage1.grad_accum", "stage2.stage1.grad_accum"]
    assert [r["step"] for r in metrics(two) if r["stage"] == "stage2"] == [1, 2, 3, 4]  # rank 0 alone logs


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_stage2_resumes_with_another_number_of_processes(before, after, one, tmp_path, capsys):
    run = tmp_path / "run"
    sets = TWO if before == 2 else ONE
    with pytest.raises(ProcessExitedException) as killed:
        spawn(before, argv("pipeline", run, sets), tmp_path, fault="kill:zo.step:2")
    assert killed.value.signal_name in ("SIGKILL", "SIGTERM")
    assert json.loads((run / "model" / "compo_stage.json").read_text())["stage"] == "stage1"
    assert (run / "checkpoints" / "zo" / "state.json").exists()
    if after == 1:
        assert main(argv("pipeline", run, sets, resume=True, quiet=False)) == 0
        said = capsys.readouterr().out
    else:
        said = output(spawn(after, argv("pipeline", run, sets, resume=True, quiet=False), tmp_path))
    assert "holds the finished stage1; not running it again" in said
    assert re.search(r"stage2: resumed from \S+ at step [12]/4", said)  # the kill came after step 2's checkpoint or in it
    _same_outputs(one, run)
