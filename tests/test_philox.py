"""``zo.rng: philox`` (compo/zo/philox.py): Philox4x32-10 against the published known-answer
vectors, the numba kernel against the torch-ops arithmetic bit for bit, Box-Muller against a
float64 evaluation of the same bits, the moments of the normals, and the perturbation source,
the fused CPU path on this stream (whole trainer steps: tests/test_zo_fused.py)."""

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch

from compo.zo import philox
from compo.zo.fused import fused_logps
from compo.zo.perturb import PerturbationSource, perturbation_seed

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba is not installed")


def _words(*vals):
    return tuple(torch.tensor([v], dtype=torch.int64) for v in vals)


@pytest.mark.parametrize("ctr,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox4x32_10_gives_the_random123_known_answers(ctr, key, expected):
    out = philox.philox_torch(_words(*ctr), *key)
    assert tuple(int(o) for o in out) == expected


@needs_numba
@pytest.mark.parametrize("start,n", [(0, 1), (0, 4), (1, 2), (3, 997), (5, 4), (4095, 4099), (12, 2048 * 3 + 5),
                                     (2**34 + 3, 10), (4 * (2**32 - 1) + 1, 12)])  # counters past 2^32, and across it
def test_the_numba_kernel_gives_the_torch_ops_numbers_bit_for_bit(start, n):
    k0, k1 = philox.keys(0x9E3779B97F4A7C15 & ((1 << 63) - 1))
    fast = philox.fill_normal(torch.full((n,), float("nan")), k0, k1, start)
    assert torch.equal(fast, philox.normal_torch(n, k0, k1, start))


def test_blocks_of_any_size_chain_like_one_fill():
    whole = torch.empty(3001)
    philox.PhiloxStream(42).fill(whole)
    stream, parts = philox.PhiloxStream(42), []
    for n in (1, 2, 5, 16, 977, 2000):
        parts.append(torch.empty(n))
        stream.fill(parts[-1])
    assert stream.pos == 3001 and torch.equal(torch.cat(parts), whole)
    other = torch.empty(3001)
    philox.PhiloxStream(43).fill(other)
    assert (other != whole).float().mean() > 0.99


def test_box_muller_in_float32_is_within_1e6_of_float64_on_the_same_bits():
    n = 1 << 18
    c = torch.arange(n, dtype=torch.int64)
    x0, x1, _, _ = philox.philox_torch((c, torch.zeros_like(c), torch.zeros_like(c), torch.zeros_like(c)), 7, 8)
    z0, z1 = philox._box_muller_torch(x0, x1)
    a, b = x0.numpy().astype(np.float64), x1.numpy().astype(np.float64)
    r = np.sqrt(-2 * np.log((np.floor(a / 256) + 1) / 2**24))
    theta = (np.floor(b / 2**30) + (np.floor(b / 64) % 2**24) / 2**24) * math.pi / 2
    assert np.abs(z0.numpy() - r * np.cos(theta)).max() < 1e-6
    assert np.abs(z1.numpy() - r * np.sin(theta)).max() < 1e-6


def test_the_extreme_words_give_zero_and_the_largest_radius_and_each_quadrant_its_signs():
    z0, z1 = philox._box_muller_torch(*_words(0xFFFFFFFF, 0))  # u = 1: r = 0
    assert z0.item() == 0 and z1.item() == 0
    z0, _ = philox._box_muller_torch(*_words(0), *_words(0))  # u = 2^-24, angle 0
    assert z0.item() == pytest.approx(math.sqrt(48 * math.log(2)), rel=1e-6)
    half = 1 << 29  # angle (q + 1/2) pi/2
    a = torch.full((4,), 0x80000000, dtype=torch.int64)
    b = torch.tensor([(q << 30) | half for q in range(4)], dtype=torch.int64)
    cos, sin = philox._box_muller_torch(a, b)
    r = math.sqrt(-2 * math.log(((0x80000000 >> 8) + 1) / 2**24))
    for q in range(4):
        theta = (q + 0.5) * math.pi / 2
        assert cos[q].item() == pytest.approx(r * math.cos(theta), abs=1e-6)
        assert sin[q].item() == pytest.approx(r * math.sin(theta), abs=1e-6)


def test_the_numbers_are_standard_normal_and_uncorrelated():
    n = 1 << 21
    z = philox.fill_normal(torch.empty(n), *philox.keys(2024)).double()
    assert abs(z.mean().item()) < 3 * 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    lanes = z.view(-1, 4)
    corr = torch.corrcoef(lanes.T)
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max() < 5 / math.sqrt(n / 4)
    x = np.sort(z[: 1 << 20].numpy())
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    ks = np.abs(cdf - np.arange(1, x.size + 1) / x.size).max()
    assert ks < 1.63 / math.sqrt(x.size)  # Kolmogorov-Smirnov at the 1% level


@needs_numba
def test_without_numba_the_cpu_falls_back_to_torch_ops_with_one_warning(monkeypatch):
    fast = philox.fill_normal(torch.empty(999), 3, 4, 7)
    monkeypatch.setattr(philox, "_KERNEL", None)
    monkeypatch.setitem(sys.modules, "compo.zo.philox_kernel", None)  # its import fails, as without numba
    with pytest.warns(UserWarning, match="the numba kernel is unavailable .ModuleNotFoundError"):
        slow = philox.fill_normal(torch.empty(999), 3, 4, 7)
    assert torch.equal(slow, fast)
    assert philox._KERNEL is False


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_philox_source_draws_each_perturbation_from_its_own_key_on_any_thread_count(threads):
    source = PerturbationSource(5, (300, 7), 0.1, threads=threads, rng="philox")
    z = source.draw(3, range(2, 9))
    for j, i in enumerate(range(2, 9)):
        ref = philox.fill_normal(torch.empty(300, 7), *philox.keys(perturbation_seed(5, 3, i)))
        assert torch.equal(z[j], ref)
    assert not torch.equal(z[0], PerturbationSource(5, (300, 7), 0.1, rng="torch").draw(3, [2])[0])  # not torch's
    assert source.tiles_match(13)  # counter-based: any tile
    with pytest.raises(ValueError, match="allowed: torch, philox"):
        PerturbationSource(5, (3, 7), 0.1, rng="mt19937")
    with pytest.raises(ValueError, match="mps lacks"):
        PerturbationSource(5, (3, 7), 0.1, device="mps", rng="philox")
    with pytest.raises(ValueError, match="contiguous float32"):
        philox.fill_normal(torch.empty(4, 6)[:, :3], 1, 2)


def test_large_fallback_draws_go_in_slices_with_the_same_numbers(monkeypatch):
    monkeypatch.setattr(philox, "_KERNEL", False)  # torch ops
    monkeypatch.setattr(philox, "_SLICE", 1000)
    sliced = philox.fill_normal(torch.empty(3, 1001), 5, 6, 9)
    assert torch.equal(sliced.view(-1), philox.normal_torch(3003, 5, 6, 9))


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_philox_candidates_match_draw_then_evaluate(threads):
    from compo.zo.head import HeadInputs, candidate_logps, shift_rows

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(12, 7, generator=gen)  # 7 wide: tiles of 13 rows start mid-counter (91 numbers)
    inp = HeadInputs(h, torch.randint(0, 203, (12,), generator=gen), torch.arange(12) // 3, 4, None)
    base = shift_rows(3 * torch.randn(12, 203, generator=gen))
    source = PerturbationSource(7, (203, 7), 0.05, threads=threads, rng="philox")
    z_ref = source.draw(2, [1, 4, 5])
    s = source.scales(z_ref)
    lp_ref = candidate_logps(base, h, z_ref, s, inp, tile=13, scratch=lambda name, n, dt: torch.empty(n, dtype=dt))
    z = torch.empty(3, 203, 7)
    lp, s2 = fused_logps(source, 2, [1, 4, 5], z, base, h, inp, 13)
    assert torch.equal(z, z_ref) and torch.equal(s2, s) and torch.equal(lp, lp_ref)


def test_a_run_recorded_before_zo_rng_existed_resumes_with_torch_s_stream_only():
    """Such a run drew from torch's stream (the only one then), whatever today's default."""
    from compo.config import RunConfig
    from compo.core.fingerprint import current, differences

    now = current(RunConfig(), "stage2")
    assert now["zo.rng"] == "philox"
    old = {k: v for k, v in now.items() if k != "zo.rng"}
    assert differences(old, now) == ["zo.rng"]
    assert differences(old, current(RunConfig.model_validate({"zo": {"rng": "torch"}}), "stage2")) == []


def test_the_config_takes_only_the_two_rngs():
    from pydantic import ValidationError

    from compo.config import ZOConfig

    assert ZOConfig().rng == "philox" and ZOConfig(rng="torch").rng == "torch"
    with pytest.raises(ValidationError):
        ZOConfig(rng="numpy")


@needs_numba
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_gpu_draws_the_cpu_kernels_numbers_bit_for_bit():
    k0, k1 = philox.keys(perturbation_seed(3, 1, 4))
    cpu = philox.fill_normal(torch.empty(1 << 20), k0, k1, 5)
    gpu = philox.fill_normal(torch.empty(1 << 20, device="cuda"), k0, k1, 5)
    assert torch.equal(gpu.cpu(), cpu)


def test_philox_on_mps_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from compo.scoring import models
    from compo.cli import main

    monkeypatch.setattr(models, "check_device", lambda name: torch.device("mps"))  # an MPS machine
    run = tmp_path / "run"
    config = str(Path(__file__).resolve().parent / "tiny.yaml")
    rc = main(["pipeline", "-c", config, "--run-dir", str(run), "--set", "zo.rng=philox"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("compo: error: zo.rng: ") and "MPS" in err and err.count("\n") == 1
    assert not run.exists()
