"""compo's kernel for torch's CPU normal stream (compo/zo/mt19937.py): torch.randn's numbers,
bit for bit, and used by zo.rng=torch draws only where it matches."""

import pytest
import torch

pytest.importorskip("numba")

from compo.zo import mt19937  # noqa: E402
from compo.zo.perturb import PerturbationSource, perturbation_seed  # noqa: E402

# torch's AVX2 Box-Muller (which AVX512 CPUs run too) is what the kernel copies; without AVX2
# torch uses the C library's ln, sin and cos, and the kernel is (correctly) not used
AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


@pytest.mark.skipif(not AVX2, reason="torch's CPU normal kernel here is not the AVX2 one")
def test_kernel_gives_torch_randn_bit_for_bit_across_chained_fills():
    assert mt19937.available()
    for seed, sizes in ((3, (16, 16, 17, 4000)), (2**62 + 11, (1000, 33, 624 * 3 + 5)),
                        (perturbation_seed(9, 4, 2), (49152 * 3, 100))):
        gen, stream = torch.Generator().manual_seed(seed), mt19937.TorchCPUStream(seed)
        for n in sizes:  # each fill continues the stream where the last left it, tails redrawn
            want, got = torch.randn(n, generator=gen), torch.empty(n)
            stream.fill(got)
            assert torch.equal(_bits(want), _bits(got)), (seed, n)


@pytest.mark.skipif(not AVX2, reason="torch's CPU normal kernel here is not the AVX2 one")
def test_seeds_keep_their_low_32_bits_as_torch_does():
    a = torch.empty(64)
    mt19937.TorchCPUStream(5 + 2**40).fill(a)
    assert torch.equal(a, torch.randn(64, generator=torch.Generator().manual_seed(5)))
    mt19937.TorchCPUStream(6).fill(a)
    assert not torch.equal(a, torch.randn(64, generator=torch.Generator().manual_seed(5)))


@pytest.mark.skipif(not AVX2, reason="torch's CPU normal kernel here is not the AVX2 one")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(300, 7), (4097, 17)])  # the second is drawn on the thread pool
def test_torch_rng_draws_use_the_kernel_and_equal_torchs(threads, shape):
    source = PerturbationSource(4, shape, 0.1, threads=threads, rng="torch")
    z = source.draw(2, range(3))
    assert isinstance(source.generator(2, 0), mt19937.TorchCPUStream)
    for i in range(3):
        gen = torch.Generator().manual_seed(perturbation_seed(4, 2, i))
        assert torch.equal(_bits(z[i]), _bits(torch.randn(shape, generator=gen)))


def test_small_draws_and_a_mismatching_torch_keep_torchs_generator(monkeypatch):
    small = PerturbationSource(1, (3, 5), 0.1, rng="torch")  # 15 numbers: torch draws them another way
    assert isinstance(small.generator(0, 0), torch.Generator)
    monkeypatch.setattr(mt19937, "_OK", False)
    source = PerturbationSource(4, (300, 7), 0.1, rng="torch")
    assert isinstance(source.generator(0, 0), torch.Generator)
    gen = torch.Generator().manual_seed(perturbation_seed(4, 0, 1))
    assert torch.equal(source.draw(0, [1])[0], torch.randn((300, 7), generator=gen))


def test_a_kernel_that_fails_or_differs_is_not_used_and_says_why(monkeypatch):
    from compo.zo import mt_kernel

    def broken(out, st, pos):
        raise RuntimeError("no locator available for the cache")

    monkeypatch.setattr(mt_kernel, "fill", broken)
    monkeypatch.setattr(mt19937, "_OK", None)
    with pytest.warns(UserWarning, match="no locator available"):
        assert not mt19937.available()
    monkeypatch.setattr(mt_kernel, "fill", lambda out, st, pos: out.fill(0.5))
    monkeypatch.setattr(mt19937, "_OK", None)
    assert not mt19937.available()  # runs, but not torch's numbers: torch draws, silently (same numbers)
    monkeypatch.setattr(mt19937, "_OK", None)
    torch.set_default_dtype(torch.float64)  # the check draws float32 on the CPU whatever the defaults
    try:
        monkeypatch.undo()
        monkeypatch.setattr(mt19937, "_OK", None)
        assert mt19937.available() == AVX2
    finally:
        torch.set_default_dtype(torch.float32)


def test_fill_refuses_what_torch_draws_another_way():
    stream = mt19937.TorchCPUStream(1)
    with pytest.raises(ValueError, match="16 numbers or more"):
        stream.fill(torch.empty(15))
    with pytest.raises(ValueError, match="float64"):
        stream.fill(torch.empty(32, dtype=torch.float64))
    with pytest.raises(ValueError, match="16 numbers or more"):
        stream.fill(torch.empty(32, 2).t())  # not contiguous


def test_bench_draw_prints_the_three_timings(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_draw.py"
    res = subprocess.run([sys.executable, str(script), "--rows", "64", "--width", "3", "--reps", "1", "--runs", "1"],
                         capture_output=True, text=True, timeout=300, check=True)
    out = json.loads(res.stdout)
    assert out["numbers"] == 192 and out["torch_draw_kernel"] == mt19937.available()
    assert out["torch_randn_ms"] > 0 and out["philox_ms"] > 0
    assert ("torch_kernel_ms" in out) == out["torch_draw_kernel"]
