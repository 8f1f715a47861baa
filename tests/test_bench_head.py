"""scripts/bench_head.py: head FLOP counts, the bf16 peak table, and bench_zo's throughput keys."""

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_head  # noqa: E402


def test_head_flops_and_step_rate():
    assert bench_head.head_flops(91, 90, 49152) == 805_109_760  # 2 T k V for SmolLM2's projected pair
    assert bench_head.step_tflops(1000.0, 91, 90, 49152) == 1000.0 * 805_109_760 / 1e12


def test_peak_table_by_device_name(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert bench_head.peak_tflops(cpu) is None and bench_head.peak_tflops(cpu, 12.5) == 12.5
    for name, peak in (("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5), ("NVIDIA H100 80GB HBM3", 989.4),
                       ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.1),
                       ("NVIDIA L4", 121.0), ("Tesla T4", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d, n=name: n)
        assert bench_head.peak_tflops(cuda) == peak, name
    assert bench_head.peak_tflops(cuda, 100.0) == 100.0


def test_bench_zo_reports_throughput_against_the_given_peak(capsys):
    import bench_zo

    with torch.random.fork_rng():  # the benchmark seeds torch's global generator
        assert bench_zo.main(["--m", "8", "--skip-reference", "--skip-full", "--floor-reps", "1", "--peak-tflops", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    mm, rate = out["head_matmul_bf16_tflops"], out["projected_perturbations_per_s"]
    assert math.isfinite(mm) and mm > 0 and out["peak_bf16_tflops"] == 2.0
    assert out["head_matmul_fraction_of_peak"] == mm / 2.0
    step = rate * 2 * out["completion_tokens"] * out["projected_width"] * out["V"] / 1e12
    assert math.isclose(out["projected_step_head_tflops"], step, rel_tol=1e-12)
    assert math.isclose(out["projected_step_fraction_of_peak"], step / 2.0, rel_tol=1e-12)
