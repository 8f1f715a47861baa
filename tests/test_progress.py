"""Console output: progress lines off a terminal, verbosity, the summary table, and a real
`compo pipeline` run written to files (no carriage returns, --quiet prints the final line)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from compo.core import progress
from compo.core.progress import LineBar
from compo.run.summary_table import final_line, grid, summary_lines, table

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["data.toy.n_train=96", "data.toy.n_eval=32", "model.toy.sft_steps=40", "stage1.epochs=1",
         "zo.m=32", "zo.max_steps=3"]


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _run_bar(n: int, dt: float, **kw) -> list[str]:
    """Iterate a LineBar over n items, the clock moving dt per item; the lines it printed."""
    lines: list[str] = []
    clock = Clock()
    b = LineBar(range(n), "stage1", unit="step", out=lines.append, clock=clock, **kw)
    for i in b:
        clock.t += dt
        b.set_postfix({"loss": f"{1 / (i + 1):.3f}"})
    return lines


def test_a_line_every_n_steps_and_a_closing_line():
    lines = _run_bar(25, 2.0, steps=10, seconds=0)
    assert lines == [
        "stage1: 10/25 (40%) 20s elapsed, 2.00 s/step, ~30s left | loss=0.100",
        "stage1: 20/25 (80%) 40s elapsed, 2.00 s/step, ~10s left | loss=0.050",
        "stage1: 25/25 (100%) done in 50s, 2.00 s/step | loss=0.040",
    ]


def test_a_line_every_n_seconds():
    lines = _run_bar(10, 2.0, steps=0, seconds=5)  # at 6 s, 12 s, 18 s: each 6 s after the last line
    assert [line.split(" ")[1] for line in lines] == ["3/10", "6/10", "9/10", "10/10"]
    assert lines[-1] == "stage1: 10/10 (100%) done in 20s, 2.00 s/step | loss=0.100"
    assert _run_bar(4, 0.25, steps=0, seconds=5) == ["stage1: 4/4 (100%) done in 1s, 4.00 step/s | loss=0.250"]


def test_transient_bars_print_only_when_they_ran_long():
    assert _run_bar(20, 0.1, steps=0, seconds=30, transient=True) == []  # quick scoring passes leave nothing
    long = _run_bar(20, 2.0, steps=0, seconds=30, transient=True)
    assert [line.split(" ")[1] for line in long] == ["15/20", "20/20"]


def test_a_resumed_loop_counts_from_its_start():
    lines: list[str] = []
    clock = Clock()
    b = LineBar(range(4, 10), "stage2 (ComPO)", total=10, initial=4, unit="step", steps=3, seconds=0,
                out=lines.append, clock=clock)
    seen = []
    for t in b:
        seen.append(t)
        clock.t += 1.0
    assert seen == [4, 5, 6, 7, 8, 9]  # the loop itself is untouched
    assert lines == ["stage2 (ComPO): 6/10 (60%) 2s elapsed, 1.00 step/s, ~4s left",
                     "stage2 (ComPO): 9/10 (90%) 5s elapsed, 1.00 step/s, ~1s left",
                     "stage2 (ComPO): 10/10 (100%) done in 6s, 1.00 step/s"]


def test_bar_kind_follows_the_terminal_and_the_verbosity(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert type(progress.bar(range(3), "x")) is LineBar
    progress.set_verbosity(progress.VERBOSE)
    b = progress.bar(range(3), "x")
    assert type(b) is LineBar and b.steps == 1  # --verbose: a line per step off a terminal
    assert progress.bar(range(3), "x", transient=True).steps == 0  # ... but not per scoring batch
    progress.set_verbosity(progress.QUIET)
    assert type(progress.bar(range(3), "x")) is progress._Bar
    progress.set_verbosity(progress.NORMAL)
    assert type(progress.bar(range(3), "x", enabled=False)) is progress._Bar
    monkeypatch.setenv("RANK", "1")
    assert type(progress.bar(range(3), "x")) is progress._Bar
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    b = progress.bar(range(3), "x")
    assert type(b) is progress._TqdmBar
    assert list(b) == [0, 1, 2]
    b.close()


def test_say_warn_and_result_per_verbosity(capsys, monkeypatch):
    def emit():
        progress.say("info")
        progress.say("detail", progress.VERBOSE)
        progress.warn("careful")
        progress.result("done")
        return capsys.readouterr().out.splitlines()

    progress.set_verbosity(progress.QUIET)
    assert emit() == ["warning: careful", "done"]
    progress.set_verbosity(progress.NORMAL)
    assert emit() == ["info", "warning: careful", "done"]
    progress.set_verbosity(progress.VERBOSE)
    assert emit() == ["info", "detail", "warning: careful", "done"]
    monkeypatch.setenv("RANK", "2")
    assert emit() == []  # only the main process prints
    with pytest.raises(ValueError):
        progress.set_verbosity(3)


# ---------------------------------------------------------------- summary table

SUMMARY = {
    "wall_s": 12.34, "n_pairs": 96, "n_clean": 41, "n_noisy": 55,
    "stage1": {"loss": 0.5, "rewards/chosen": -0.25, "rewards/accuracies": 0.75, "epoch": 1.0},
    "stage2": {"steps": 3, "steps_taken": 2, "steps_skipped": 1, "skip_reasons": {"weak signal": 1},
               "mean_frac_minus": 0.3125, "mean_signal_cos": 0.01, "mean_energy_kept": 0.25,
               "noisy_trained/n": 3, "noisy_trained/shift_chosen": 0.5, "noisy_trained/shift_rejected": -0.25,
               "warnings": ["stage2 step 2: something odd"]},
    "eval": {"reference": {"accuracy": 0.7, "n_pairs": 32, "ci": {"accuracy": [0.6, 0.8]}},
             "stage1": {"accuracy": 0.75, "shift/chosen": -1.5, "n_pairs": 32,
                        "ci": {"accuracy": [0.65, 0.85], "shift/chosen": [-2.0, -1.0]}},
             "stage2_effect": {"accuracy": 0.0125, "shift/chosen": -0.5,
                               "ci": {"accuracy": [0.0, 0.025], "shift/chosen": [-1.0, 0.0]}}},
}


def test_summary_table_lines():
    assert summary_lines(SUMMARY) == [
        "=" * 72,
        "run summary  (wall 12.3 s)",
        "  pairs 96   clean 41   noisy 55",
        "stage 1, last step",
        "    loss  rewards/chosen  rewards/accuracies",
        "  0.5000         -0.2500              0.7500",
        "stage 2 (ComPO)",
        "  steps  taken  skipped  mean N-/m  mean signal cosine  energy kept by sparsity",
        "      3      2        1     0.3125                0.01                     0.25",
        "  skipped by reason: weak signal 1",
        "  stage2 log-prob shift  pairs  chosen  rejected",
        "    noisy trained pairs      3     0.5     -0.25",
        "  warning: stage2 step 2: something odd",
        "held-out (32 pairs)                       accuracy                shift/chosen",
        "  reference                0.7000 [0.6000, 0.8000]",
        "  after stage1             0.7500 [0.6500, 0.8500]  -1.5000 [-2.0000, -1.0000]",
        "  stage 2's own effect  +0.0125 [+0.0000, +0.0250]  -0.5000 [-1.0000, +0.0000]",
        "  (stage 2's own effect: after stage2 minus after stage1 on the same pairs, paired bootstrap)",
        "=" * 72,
    ]
    assert final_line("pipeline", SUMMARY) == (
        "compo pipeline: done in 12.3 s; 96 pairs (41 clean, 55 noisy); "
        "held-out accuracy reference 0.7000, stage1 0.7500")


def test_grid_wraps_and_table_aligns():
    cells = [(f"metric{i}", f"{i}.5") for i in range(5)]
    assert grid(cells, width=30) == ["  metric0  metric1  metric2", "      0.5      1.5      2.5",
                                     "  metric3  metric4", "      3.5      4.5"]
    assert table(["name", "a", "bb"], [["x", "1", "22"], ["longer", "333", "4"]]) == [
        "name        a  bb", "  x         1  22", "  longer  333   4"]


# ---------------------------------------------------------------- the real command, into files


def _pipeline(tmp_path: Path, name: str, *flags: str, sets: tuple[str, ...] = (),
              command: str = "pipeline") -> tuple[str, str, Path]:
    """``compo <command>`` in a subprocess with stdout and stderr going to files."""
    run = tmp_path / name
    args = [sys.executable, "-m", "compo.cli", command, "-c", "tests/tiny.yaml", "--run-dir", str(run), *flags]
    for s in SMALL + list(sets):
        args += ["--set", s]
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    env = {k: v for k, v in os.environ.items() if k not in ("COMPO_FAULT", "RANK")}
    with open(out, "w") as fo, open(err, "w") as fe:
        rc = subprocess.run(args, cwd=ROOT, env=env, stdout=fo, stderr=fe, timeout=600).returncode
    assert rc == 0, err.read_text()[-2000:]
    return out.read_text(), err.read_text(), run


def _progress(lines: list[str], desc: str) -> list[str]:
    """The ``<desc>: n/total`` positions of a stage's progress lines, the closing one as ``n/total done``."""
    pos = [ln[len(desc) + 2:].split(" ")[0] + (" done" if " done in " in ln else "")
           for ln in lines if ln.startswith(desc + ": ") and re.match(r"\d+/\d+ \(", ln[len(desc) + 2:])]
    return pos


def test_pipeline_output_in_a_file_has_no_frames_and_quiet_prints_the_final_line(tmp_path):
    out, err, run = _pipeline(tmp_path, "normal", sets=("logging.progress_seconds=0",))
    summary = json.loads((run / "summary.json").read_text())
    assert "\r" not in out and "\r" not in err
    lines = out.splitlines()
    # progress_seconds=0 (no line by time) and progress_steps 0: each stage's closing progress line
    # alone, and the quick scoring passes print nothing. The 48 lines: data (1), split counts and
    # label quality (2), split calibration (5), reference margin histogram (1 + 12 bins), held-out
    # eval of the reference, after stage 1 and after stage 2 (3), stage 1 and stage 2: a start
    # line and a closing progress line each (4), the summary table (19), the final line (1)
    assert len(summary_lines(summary)) == 19
    assert len(lines) == 48, "\n".join(lines)
    assert sum(ln.startswith("  [") for ln in lines) == 12 and sum(ln.startswith("eval ") for ln in lines) == 3
    assert _progress(lines, "stage1") == ["3/3 done"] and _progress(lines, "stage2 (ComPO)") == ["3/3 done"]
    assert lines[-1] == final_line("pipeline", summary)
    assert "\n".join(summary_lines(summary)) in out
    assert sum(line.startswith("stage1: 3/3 (100%) done in ") for line in lines) == 1
    assert sum(line.startswith("stage2 (ComPO): 3/3 (100%) done in ") for line in lines) == 1
    assert not any("Loading weights" in line or "Writing model shards" in line for line in out.splitlines() + err.splitlines())

    out, err, run = _pipeline(tmp_path, "quiet", "--quiet")
    summary = json.loads((run / "summary.json").read_text())
    assert "\r" not in out and "\r" not in err
    lines = out.splitlines()
    assert lines[-1] == final_line("pipeline", summary)
    assert all(line.startswith("warning: ") for line in lines[:-1]), lines
    assert summary["stage2"]["steps"] == 3 and len(summary["eval"]) == 4  # the run did everything


def test_progress_steps_and_seconds_from_the_config(tmp_path):
    # logging.progress_steps=2: a line at every 2nd step of stage 1 (9 steps: 3 epochs of 41 clean
    # pairs in batches of 16) and of stage 2 (5 steps), then the closing line; nothing by time
    out, err, run = _pipeline(tmp_path, "steps", sets=("logging.progress_steps=2", "logging.progress_seconds=0",
                                                       "stage1.epochs=3", "zo.max_steps=5"))
    lines = out.splitlines()
    assert "\r" not in out + err
    assert _progress(lines, "stage1") == ["2/9", "4/9", "6/9", "8/9", "9/9 done"]
    assert _progress(lines, "stage2 (ComPO)") == ["2/5", "4/5", "5/5 done"]
    assert _progress(lines, "reference log-probs") == ["2/6", "4/6", "6/6 done"]  # 96 pairs in batches of 16
    # logging.progress_seconds: a line whenever that long has passed since the last one; with a
    # nanosecond every step qualifies (each takes milliseconds), so stage 1 prints a line per step
    out, _, _ = _pipeline(tmp_path, "seconds", command="train",
                          sets=("logging.progress_steps=0", "logging.progress_seconds=1e-9", "stage1.epochs=3"))
    assert _progress(out.splitlines(), "stage1") == [f"{i}/9" for i in range(1, 9)] + ["9/9 done"]
