"""The study figures: valid PNGs written atomically, robust to NaN/None and empty inputs."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from compo.research import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 0 and img.shape[1] > 0
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def _row(method, noise, metric, mean, lo=None, hi=None, n=3):
    return {"method": method, "noise": noise, "metric": metric, "mean": mean, "ci_low": lo, "ci_high": hi, "n": n}


ROWS = [
    _row("dpo", 0.2, "win_rate", 0.50, 0.40, 0.60),
    _row("dpo", 0.0, "win_rate", 0.70, 0.65, 0.75),
    _row("dpo", 0.4, "win_rate", float("nan")),
    _row("compo", 0.0, "win_rate", 0.72, None, 0.80),
    _row("compo", 0.4, "win_rate", 0.66, 0.60, 0.70),
    _row("compo", 0.2, "win_rate", None),
    _row("dpo", 0.0, "margin_acc", 0.99, 0.98, 1.0),
    _row("other", 0.0, "margin_acc", 0.10),
]


def test_series_exact():
    got = plots.series(ROWS, "win_rate")
    assert got == {
        "compo": [(0.0, 0.72, None, 0.80), (0.4, 0.66, 0.60, 0.70)],
        "dpo": [(0.0, 0.70, 0.65, 0.75), (0.2, 0.50, 0.40, 0.60)],
    }
    assert plots.series(ROWS, "margin_acc") == {"dpo": [(0.0, 0.99, 0.98, 1.0)], "other": [(0.0, 0.10, None, None)]}
    assert plots.series(ROWS, "missing") == {}


def test_series_nan_bounds_become_none():
    got = plots.series([_row("m", "0.1", "x", "0.5", float("nan"), float("inf"))], "x")
    assert got == {"m": [(0.1, 0.5, None, None)]}


def test_metric_vs_noise(tmp_path):
    out = plots.plot_metric_vs_noise(ROWS, "win_rate", tmp_path / "win_rate.png", title="t")
    assert out == tmp_path / "win_rate.png"
    _check_png(out)


@pytest.mark.parametrize("rows", [[], [_row("a", 0.0, "x", None), _row("a", 0.1, "x", math.nan)], ROWS])
def test_metric_vs_noise_empty_or_nan(tmp_path, rows):
    _check_png(plots.plot_metric_vs_noise(rows, "x", tmp_path / "sub" / "x.png"))


def test_metric_vs_noise_ci_on_wrong_side(tmp_path):
    rows = [_row("a", 0.0, "x", 0.5, 0.6, 0.4), _row("a", 0.1, "x", 0.4, 0.3, 0.5)]
    _check_png(plots.plot_metric_vs_noise(rows, "x", tmp_path / "x.png"))


def test_margin_histograms(tmp_path):
    margins = {"stage1": [-1.0, 0.5, 2.0, 3.0], "stage2": [0.1, 0.2, float("nan"), 4.0], "none": []}
    _check_png(plots.plot_margin_histograms(margins, tmp_path / "m.png", title="margins", bins=5))


@pytest.mark.parametrize("margins", [{}, {"a": []}, {"a": [1.0]}, {"a": [float("nan")]}])
def test_margin_histograms_degenerate(tmp_path, margins):
    _check_png(plots.plot_margin_histograms(margins, tmp_path / "m.png"))


def _track(trained, steps, chosen, rejected, source="noisy"):
    return {"source": source, "trained": trained, "steps": steps, "chosen": chosen, "rejected": rejected}


def test_trajectories(tmp_path):
    tracks = [
        _track(True, [0, 10, 20], [-5.0, -4.5, -4.0], [-6.0, -6.5, -7.0]),
        _track(True, [0, 10], [-3.0, -2.0], [-3.0, -3.5]),
        _track(False, [0, 10, 20], [-4.0, -4.1, float("nan")], [-4.0, -4.0, -4.2]),
        _track(False, [], [], []),
    ]
    _check_png(plots.plot_trajectories(tracks, tmp_path / "traj.png", title="traj"))


def test_trajectories_one_group_only(tmp_path):
    _check_png(plots.plot_trajectories([_track(False, [0, 1], [-1.0, -1.2], [-2.0, -2.1])], tmp_path / "t.png"))


def test_trajectories_empty(tmp_path):
    _check_png(plots.plot_trajectories([], tmp_path / "traj.png"))


def test_mean_curve_and_relative():
    assert plots._relative([0, 1, 2], [-2.0, float("nan"), -1.0]) == ([0.0, 2.0], [0.0, 1.0])
    xs, ys = plots._mean_curve([([0.0, 1.0], [0.0, 2.0]), ([0.0, 1.0, 2.0], [0.0, 4.0, 6.0])])
    assert xs == [0.0, 1.0, 2.0] and ys == [0.0, 3.0, 6.0]


def test_overwrite_and_no_open_figures(tmp_path):
    import matplotlib.pyplot as plt

    out = tmp_path / "x.png"
    out.write_bytes(b"old")
    plots.plot_metric_vs_noise(ROWS, "win_rate", out)
    plots.plot_margin_histograms({"a": [1.0, -1.0]}, out)
    plots.plot_trajectories([], out)
    _check_png(out)
    assert plt.get_fignums() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_failed_save_leaves_no_temp(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError):
        plots.plot_trajectories([], tmp_path / "t.png")
    assert list(tmp_path.iterdir()) == []
