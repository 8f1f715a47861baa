"""Tiled candidate evaluation (CPU): one candidate's logits a vocab tile at a time must give the
plain log-probs, tie with the base at offset 0, survive overflow, and match the batched path;
and the head-sized buffers of the update path give the plain results bit for bit."""

import pytest
import torch

from compo.zo.estimator import proposed_head
from compo.zo.head import (
    HeadInputs, base_logps, candidate_logps, logits_logps, shift_rows, tiled_logps, vocab_tile,
)


def _inputs(t: int = 12, width: int = 8, v: int = 50, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(t, width, generator=gen)
    inp = HeadInputs(h, torch.randint(0, v, (t,), generator=gen), torch.arange(t) * 4 // t, 4, None)
    base = 3 * torch.randn(t, v, generator=gen)
    z = torch.randn(5, v, width, generator=gen)
    return inp, base, z, torch.tensor([0.05, 0.1, 0.2, 0.3, 1.0])


def _plain(base, h, z, scales, inp) -> torch.Tensor:
    return torch.stack([logits_logps(base + s * (h @ zi.T), inp) for zi, s in zip(z, scales)])


@pytest.mark.parametrize("tile", [7, 16, 50, 64])
def test_tiles_give_the_plain_log_probs_and_the_batched_path_agrees(tile):
    inp, base, z, s = _inputs()
    expected = _plain(base, inp.h, z, s, inp)
    sb = shift_rows(base)
    tiled = candidate_logps(sb, inp.h, z, s, inp, tile=tile)
    torch.testing.assert_close(tiled, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(tiled, candidate_logps(sb, inp.h, z, s, inp), atol=1e-5, rtol=0)


def test_a_zero_offset_ties_with_the_base_exactly():
    inp, base, z, s = _inputs(v=70)
    sb = shift_rows(base)
    got = candidate_logps(sb, inp.h, torch.zeros_like(z), s, inp, tile=16)
    assert torch.equal(got, base_logps(sb, inp, 16).expand_as(got))
    assert torch.equal(tiled_logps(sb, None, None, inp, 16)[0], base_logps(sb, inp, 16))


def test_overflow_in_a_tile_falls_back_to_the_per_tile_max():
    inp, base, z, s = _inputs()
    expected = _plain(base, inp.h, z, s, inp)
    got = candidate_logps(base + 200.0, inp.h, z, s, inp, tile=16)  # exp(200) overflows fp32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert base_logps(base + 200.0, inp, 16) is not None
    assert base_logps(torch.full_like(base, float("nan")), inp, 16) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_tiled_matmul_stays_close_and_uses_scratch(dtype):
    inp, base, z, s = _inputs(t=40, width=16, v=400, seed=1)
    s = s * 0.01
    sb = shift_rows(base)
    base_lp = base_logps(sb, inp, 64)
    exact = candidate_logps(sb, inp.h, z, s, inp, tile=64) - base_lp
    bufs: dict = {}
    low = candidate_logps(sb, inp.h, z, s, inp, matmul_dtype=dtype, tile=64,
                          scratch=lambda name, n, dt: bufs.setdefault(name, torch.empty(n, dtype=dt)))
    rel = float(((low - base_lp) - exact).abs().max() / exact.abs().max())
    assert 0 < rel < 0.01
    assert bufs["tile_low"].dtype == dtype and bufs["tile_low"].numel() == 40 * 64
    assert bufs["tile"].dtype == torch.float32


def test_tile_width_keeps_a_tile_near_three_megabytes_on_the_cpu_only():
    assert vocab_tile("cpu", 91, 49152) == 8192  # 3 MiB / (4 B * 91 rows) = 8642 -> 8192
    assert vocab_tile("cpu", 91, 5000) == 5000
    assert vocab_tile("cpu", 4000, 49152) == 512
    assert vocab_tile(torch.device("cuda"), 91, 49152) == 0


def test_the_proposed_head_into_a_buffer_is_bit_identical():
    gen = torch.Generator().manual_seed(3)
    w, g = torch.randn(64, 32, generator=gen), torch.randn(64, 32, generator=gen)
    out = torch.empty_like(w)
    got = proposed_head(w, g, 0.37, 0.41, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, w - (0.37 * 0.41) * g)


def test_all_finite_decides_on_the_cheap_sum_when_it_is_finite():
    from compo.zo.estimator import all_finite

    x = torch.randn(300, 40)
    assert all_finite(x)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[123, 7] = bad
        assert not all_finite(y)
