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
                       ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5), ("NVIDIA L40", 181.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.1),
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


def test_random_model_has_the_configs_shape_and_is_seeded(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    import random_model

    src = tmp_path / "src"
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(src)
    (src / "tokenizer.json").write_text("{}")
    (src / "model.safetensors").write_text("not copied")
    a = AutoModelForCausalLM.from_pretrained(random_model.build(src, tmp_path / "a", seed=3))
    b = AutoModelForCausalLM.from_pretrained(random_model.build(src, tmp_path / "b", seed=3))
    c = AutoModelForCausalLM.from_pretrained(random_model.build(src, tmp_path / "c", seed=4))
    assert a.get_output_embeddings().weight.shape == (64, 16) and a.config.num_hidden_layers == 1
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == "{}"
    assert not (tmp_path / ".a.tmp").exists()
