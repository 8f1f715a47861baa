"""scripts/bench_head.py: head FLOP and byte counts, the bf16 peak and bandwidth tables, and bench_zo's
throughput keys."""

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_head  # noqa: E402


def test_head_flops_and_step_rate():
    assert bench_head.head_flops(91, 90, 49152) == 805_109_760  # 2 T k V for SmolLM2's projected pair
    assert math.isclose(bench_head.head_tflops(1000.0, 91, 90, 49152), 0.80510976, rel_tol=1e-12)
    assert math.isclose(bench_head.head_tflops(2500.0, 91, 1, 49152), 0.02236416, rel_tol=1e-12)  # 2500*8945664


def test_head_matmul_bytes_and_fractions():
    # (T w + V w + T V) * 2 bytes for one bf16 candidate: 8190 + 4_423_680 + 4_472_832 = 8_904_702 elements
    assert bench_head.head_matmul_bytes(1, 91, 90, 49152) == 17_809_404
    assert bench_head.head_matmul_bytes(64, 91, 90, 49152) == 64 * 17_809_404 == 1_139_801_856
    assert bench_head.head_matmul_bytes(2, 3, 4, 5, itemsize=4) == 2 * (12 + 20 + 15) * 4 == 376
    # 1.139801856 GB in 0.5 ms: 2279.603712 GB/s, 0.47491744 of an H200's 4800 GB/s
    gbs = 1_139_801_856 / 0.5e-3 / 1e9
    assert math.isclose(gbs, 2279.603712, rel_tol=1e-12)
    assert math.isclose(bench_head.fraction(gbs, 4800.0), 0.47491744, rel_tol=1e-12)
    assert bench_head.fraction(1.0, None) is None and bench_head.fraction(1.0, 0.0) is None
    assert bench_head.fraction(3.0, 12.0) == 0.25


def test_peak_table_by_device_name(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert bench_head.peak_tflops(cpu) is None and bench_head.peak_tflops(cpu, 12.5) == 12.5
    for name, peak in (("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5), ("NVIDIA H100 80GB HBM3", 989.4),
                       ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5), ("NVIDIA L40", 181.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.1),
                       ("NVIDIA L4", 121.0), ("Tesla T4", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d, n=name: n)
        assert bench_head.peak_tflops(cuda) == peak, name
    assert bench_head.peak_tflops(cuda, 100.0) == 100.0


def test_bandwidth_table_by_device_name(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert bench_head.peak_gbs(cpu) is None and bench_head.peak_gbs(cpu, 900.0) == 900.0
    for name, gbs in (("NVIDIA H200", 4800.0), ("NVIDIA H200 NVL", 4800.0), ("NVIDIA H100 80GB HBM3", 3350.0),
                      ("NVIDIA H100 PCIe", 2000.0), ("NVIDIA H100 NVL", 3900.0),
                      ("NVIDIA A100-SXM4-80GB", 2039.0), ("NVIDIA A100-SXM4-40GB", 1555.0),
                      ("NVIDIA A100-PCIE-40GB", 1555.0), ("NVIDIA A100 80GB PCIe", 1935.0), ("NVIDIA A100", None),
                      ("NVIDIA L40S", 864.0), ("NVIDIA L40", 864.0), ("NVIDIA L4", 300.0), ("NVIDIA A10G", 600.0),
                      ("NVIDIA GeForce RTX 4090", 1008.0), ("Tesla T4", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d, n=name: n)
        assert bench_head.peak_gbs(cuda) == gbs, name
    assert bench_head.peak_gbs(cuda, 1234.5) == 1234.5


def test_sync_takes_a_device_or_a_string(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls.append(d))
    bench_head.sync("cpu")
    bench_head.sync(torch.device("cpu"))
    assert calls == []
    bench_head.sync("cuda")
    bench_head.sync(torch.device("cuda", 1))
    assert calls == [torch.device("cuda"), torch.device("cuda", 1)]


def test_bench_zo_reports_throughput_against_the_given_peak(capsys):
    import bench_zo

    with torch.random.fork_rng():  # the benchmark seeds torch's global generator
        assert bench_zo.main(["--m", "8", "--skip-reference", "--skip-full", "--floor-reps", "1", "--peak-tflops", "2",
                              "--peak-gbs", "50"]) == 0
    out = json.loads(capsys.readouterr().out)
    mm, rate = out["head_matmul_bf16_tflops"], out["projected_perturbations_per_s"]
    assert math.isfinite(mm) and mm > 0 and out["peak_bf16_tflops"] == 2.0
    assert out["head_matmul_fraction_of_peak"] == mm / 2.0
    t, k, v, c, s = out["completion_tokens"], out["projected_width"], out["V"], out["chunk_projected"], out["head_matmul_s"]
    assert math.isclose(mm, c * 2 * t * k * v / s / 1e12, rel_tol=1e-12)
    assert out["head_matmul_bytes"] == c * (t * k + v * k + t * v) * 2
    assert math.isclose(out["head_matmul_gbs"], out["head_matmul_bytes"] / s / 1e9, rel_tol=1e-12)
    assert out["peak_bandwidth_gbs"] == 50.0 and out["head_matmul_fraction_of_bandwidth"] == out["head_matmul_gbs"] / 50
    assert out["projected_step_matmul_dtype"] == "float32"
    step = rate * 2 * out["completion_tokens"] * out["projected_width"] * out["V"] / 1e12
    assert math.isclose(out["projected_step_head_tflops"], step, rel_tol=1e-12)
    assert math.isclose(out["projected_step_fraction_of_peak"], step / 2.0, rel_tol=1e-12)


def test_random_model_has_the_configs_shape_and_is_seeded(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    import random_model

    src = tmp_path / "src"
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(src)
    (src / "tokenizer.json").write_text("{}")
    for stale in ("model.safetensors", "pytorch_model.bin", "consolidated.safetensors"):  # src's own weights
        (src / stale).write_text("not copied")
    a = AutoModelForCausalLM.from_pretrained(random_model.build(src, tmp_path / "a", seed=3))
    b = AutoModelForCausalLM.from_pretrained(random_model.build(src, tmp_path / "b", seed=3))
    c = AutoModelForCausalLM.from_pretrained(random_model.build(src, tmp_path / "c", seed=4))
    assert a.get_output_embeddings().weight.shape == (64, 16) and a.config.num_hidden_layers == 1
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == "{}"
    # the weights are the random ones, none of src's: save_pretrained rewrites model.safetensors, but a copied
    # pytorch_model.bin or other *.safetensors would stay beside it
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json", "generation_config.json",
                                                                  "model.safetensors", "tokenizer.json"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes()[:10] != b"not copied"
    assert not (tmp_path / ".a.tmp").exists()
