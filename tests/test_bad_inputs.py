"""A corpus of bad inputs: every one must fail the one-line way and touch nothing.

Each case sets up a run directory (fresh, or a copy of a run prepared once per session:
finished, stopped in stage 2 with a checkpoint, stopped in stage 1 with a checkpoint, or a
split-only run on a data file), damages one thing, runs ``compo`` in-process and checks the
error contract: exit code 2, exactly one stderr line ``compo: error: <where>: <what>`` that
names the offending file or config key, and every file under the test's directory
byte-identical afterwards (a fresh run directory must not even be created).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compo.cli import main

from bad_input_cases import (
    CASES, CONFIG, FILE_DATA, PAIRS, PREP, ROOT, Case, Ctx, damaged_model_dir, data, jsonl, sets,
    tokenizerless_model_dir,
)


# ---------------------------------------------------------------- the prepared runs


def _cli(args: list[str], cwd: Path, fault: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("COMPO_FAULT", None)
    if fault:
        env["COMPO_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", "compo.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """Build the runs every case copies (in parallel subprocesses, once per session):

    finished: a whole pipeline run; zo: killed after stage-2 step 3 (checkpoint of step 2 in
    checkpoints/zo/); s1: killed after stage-1 step 3 (checkpoint in checkpoints/stage1/step-2/);
    data: a folder holding pairs.jsonl and run/, a `compo split` of it, made with cwd=that folder
    and the relative data.path pairs.jsonl (so a copy elsewhere fingerprints the same)."""
    base = tmp_path_factory.mktemp("prepared")
    data = base / "data"
    data.mkdir()
    (data / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    pipeline = lambda run: ["pipeline", "-c", CONFIG, "--run-dir", str(run)] + sets(PREP)  # noqa: E731
    jobs = {
        "finished": _cli(pipeline(base / "finished"), ROOT),
        "zo": _cli(pipeline(base / "zo"), ROOT, "kill:zo.step:3"),
        "s1": _cli(pipeline(base / "s1"), ROOT, "kill:stage1.step:3"),
        "data": _cli(["split", "-c", CONFIG, "--run-dir", "run", "--set", "data.path=pairs.jsonl"]
                     + sets(PREP + FILE_DATA), data),
    }
    want_rc = {"finished": 0, "zo": -9, "s1": -9, "data": 0}
    for name, p in jobs.items():
        out, _ = p.communicate(timeout=600)
        assert p.returncode == want_rc[name], f"preparing {name}: rc {p.returncode}\n{out[-3000:]}"
    runs = {"finished": base / "finished", "zo": base / "zo", "s1": base / "s1", "data": data}
    assert (runs["finished"] / "model" / "compo_stage.json").exists()
    assert json.loads((runs["zo"] / "checkpoints" / "zo" / "state.json").read_text())["step"] == 2
    assert (runs["zo"] / "checkpoints" / "zo" / "head.safetensors").exists()
    assert (runs["s1"] / "checkpoints" / "stage1" / "step-2" / "model.safetensors").exists()
    assert not (runs["s1"] / "model").exists()
    assert (runs["data"] / "run" / "split.jsonl").exists()
    return runs


# ---------------------------------------------------------------- running a case


def snapshot(root: Path) -> tuple[dict, set]:
    """(relative path -> (bytes, mtime_ns) of every file, set of directories) below ``root``."""
    files, dirs = {}, set()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_dir():
            dirs.add(rel)
        else:
            files[rel] = (p.read_bytes(), p.stat().st_mtime_ns)
    return files, dirs


PROGRESS = re.compile(r"^[^|]*:\s+\d+%\|.*\| \d+/\d+ \[|^[^|]*:\s+\d+%\|.*\|\s*\d+/\d+\s*$")


def stderr_lines(err: str) -> list[str]:
    """The lines a terminal shows, less progress bars (tqdm redraws with \\r; the model loading
    bar of transformers and compo's own bars are progress, not messages)."""
    segments = (s.strip() for s in re.split(r"[\r\n]", err))
    return [s for s in segments if s and not PROGRESS.search(s)]


def prepare(case: Case, tmp: Path, prepared: dict[str, Path], monkeypatch) -> tuple[Ctx, list[str]]:
    for name, value in case.env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("COMPO_FAULT", raising=False)
    run = tmp / "run"
    if case.base == "data":  # a folder holding pairs.jsonl and run/, used with cwd=that folder
        shutil.copytree(prepared["data"], tmp, dirs_exist_ok=True)
        monkeypatch.chdir(tmp)
    elif case.base != "fresh":
        shutil.copytree(prepared[case.base], run)
    ctx = Ctx(tmp, run, prepared)
    if case.setup_fn is not None:
        case.setup_fn(ctx)
    extra = [a.replace("{tmp}", str(tmp)).replace("{run}", str(run)) for a in case.argv_extra]
    argv = [case.command, "-c", CONFIG, "--run-dir", str(run)] + sets(PREP) + extra
    return ctx, argv


def needs_prepared(case: Case) -> bool:
    return case.base != "fresh" or case.setup_fn in (damaged_model_dir, tokenizerless_model_dir)


@pytest.fixture()
def runs(request) -> dict[str, Path]:
    case = request.node.callspec.params.get("case")
    return request.getfixturevalue("prepared") if case is None or needs_prepared(case) else {}


PARAMS = [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)] if c.xfail else [])
          for c in CASES]


@pytest.mark.parametrize("case", PARAMS)
def test_bad_input_fails_with_one_line_and_touches_nothing(case: Case, tmp_path, runs, monkeypatch, capsys):
    ctx, argv = prepare(case, tmp_path, runs, monkeypatch)
    existed = ctx.run.exists()
    before = snapshot(tmp_path)
    capsys.readouterr()

    rc = main(argv)

    err = capsys.readouterr().err
    lines = stderr_lines(err)
    assert rc == 2, f"exit code {rc}, stderr:\n{err}"
    assert len(lines) == 1 and lines[0].strip(), f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("compo: error: "), lines[0]
    expected = (case.expect_fragment,) if isinstance(case.expect_fragment, str) else case.expect_fragment
    expected = [f.replace("{tmp}", str(tmp_path)).replace("{run}", str(ctx.run)) for f in expected]
    for fragment in expected:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    after = snapshot(tmp_path)
    if not existed:
        assert not ctx.run.exists(), f"the failed run created {ctx.run}"
    assert after[1] == before[1], f"directories changed: +{after[1] - before[1]} -{before[1] - after[1]}"
    assert after[0].keys() == before[0].keys(), \
        f"files changed: +{after[0].keys() - before[0].keys()} -{before[0].keys() - after[0].keys()}"
    changed = [k for k in before[0] if after[0][k][0] != before[0][k][0]]
    assert not changed, f"files rewritten with other bytes: {changed}"
    touched = [k for k in before[0] if after[0][k][1] != before[0][k][1]]
    assert not touched, f"files rewritten (same bytes): {touched}"


def test_corpus_is_large_and_ids_unique():
    assert len(CASES) >= 45
    assert len({c.id for c in CASES}) == len(CASES)
    groups = {"cfg": 10, "orc": 6, "dev": 3, "model": 1, "split": 1, "data": 10, "rd": 12}
    for prefix, n in groups.items():
        assert sum(c.id.split("-")[0] == prefix for c in CASES) >= n, prefix


# ---------------------------------------------------------------- the good paths next to them


def test_undamaged_prepared_runs_resume(prepared, tmp_path, monkeypatch, capsys):
    """The bases are sound: without the damage, `--resume` of the finished run and of the
    run stopped in stage 2 succeeds (so the failures above come from the damage)."""
    monkeypatch.delenv("COMPO_FAULT", raising=False)
    for name in ("finished", "zo"):
        run = tmp_path / name
        shutil.copytree(prepared[name], run)
        rc = main(["pipeline", "-c", CONFIG, "--run-dir", str(run), "--resume"] + sets(PREP))
        assert rc == 0, capsys.readouterr().err
        summary = json.loads((run / "summary.json").read_text())
        assert summary["model_stage"] == "stage2" and summary["stage2"]["steps"] == 4
        assert "forced_resume" not in summary
        assert not (run / "checkpoints").exists()


def test_force_resume_with_other_zo_m_continues_and_is_recorded(prepared, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("COMPO_FAULT", raising=False)
    run = tmp_path / "run"
    shutil.copytree(prepared["zo"], run)
    argv = ["pipeline", "-c", CONFIG, "--run-dir", str(run)] + sets(PREP)
    assert main(argv + ["--resume"] + sets(["zo.m=16"])) == 2  # refused without --force-resume
    assert "zo.m" in capsys.readouterr().err
    rc = main(argv + ["--force-resume"] + sets(["zo.m=16"]))
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stage2"]["steps"] == 4
    assert "zo.m" in summary["forced_resume"]["stage2"]
    stage2_steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                    if r.get("stage") == "stage2" and "step" in r]
    assert sorted(set(stage2_steps)) == stage2_steps  # each step logged once, in order
    assert not (run / "checkpoints").exists()


def test_bad_input_in_fresh_nested_run_dir_leaves_no_directory(tmp_path, capsys):
    (tmp_path / "pairs.jsonl").write_text(jsonl(PAIRS[:3]) + "{oops\n")
    run = tmp_path / "a" / "b" / "run"
    rc = main(["pipeline", "-c", CONFIG, "--run-dir", str(run), "--set", f"data.path={tmp_path / 'pairs.jsonl'}"]
              + sets(PREP + FILE_DATA))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("compo: error: ") and "pairs.jsonl" in err
    assert not (tmp_path / "a").exists()


def test_split_then_train_resume_reuses_the_split(prepared, tmp_path, monkeypatch, capsys):
    """`compo split` then `compo train --resume` continues from split.jsonl: the split's
    fingerprint must not depend on stage-1 keys (it did, and the resume was refused)."""
    monkeypatch.delenv("COMPO_FAULT", raising=False)
    shutil.copytree(prepared["data"], tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    split_before = (tmp_path / "run" / "split.jsonl").read_bytes()
    rc = main(["train", "-c", CONFIG, "--run-dir", "run", "--resume"]
              + data("pairs.jsonl", "stage1.train_on=all", "stage1.max_steps=1") + sets(PREP))
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "split: reusing" in out
    assert (tmp_path / "run" / "split.jsonl").read_bytes() == split_before
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["model_stage"] == "stage1"
