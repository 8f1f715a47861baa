"""The stage-2 fast paths against their plain definitions: the max-free log-sum-exp of shifted
base logits (and its overflow fallback), the reduced-precision candidate matmul
(zo.matmul_dtype), CPU vocab tiles, the sampled top-k, the buffered proposed head and the
one-reduction finiteness check."""

import copy
import math

import pytest
import torch

from compo.config import ZOConfig
from compo.data.encode import encode_rows
from compo.zo.estimator import all_finite, proposed_head, sparsify, top_indices
from compo.zo.head import (
    HeadInputs, base_logits, base_logps, candidate_logps, capture, chunk_size, logits_logps, shift_rows, tiled_logps,
    vocab_tile,
)
from compo.zo.perturb import PerturbationSource
from compo.zo.trainer import ZOTrainer
from oracles import LikelihoodOracle


def _inputs(t: int = 12, width: int = 8, v: int = 50, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(t, width, generator=gen)
    inp = HeadInputs(h, torch.randint(0, v, (t,), generator=gen), torch.arange(t) * 4 // t, 4, None)
    base = 3 * torch.randn(t, v, generator=gen)
    z = torch.randn(5, v, width, generator=gen)
    return inp, base, z, torch.tensor([0.05, 0.1, 0.2, 0.3, 1.0])


def _plain(base, h, z, scales, inp) -> torch.Tensor:
    """Each candidate's logits written out, then torch.logsumexp."""
    return torch.stack([logits_logps(base + s * (h @ zi.T), inp) for zi, s in zip(z, scales)])


def test_shifted_base_gives_the_plain_log_probs_and_overflow_falls_back():
    inp, base, z, s = _inputs()
    expected = _plain(base, inp.h, z, s, inp)
    assert torch.equal(shift_rows(base).amax(-1), torch.zeros(base.shape[0]))
    torch.testing.assert_close(candidate_logps(shift_rows(base), inp.h, z, s, inp), expected, atol=1e-5, rtol=0)
    big = base + 200.0  # exp(200) overflows fp32: that chunk is redone with the max shift
    got = candidate_logps(big, inp.h, z, s, inp, out=torch.empty(5 * 12 * 50))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_matmul_moves_each_offset_by_well_under_a_percent(dtype):
    inp, base, z, s = _inputs(t=40, width=16, v=400, seed=1)
    s = s * 0.01
    base_lp = logits_logps(base, inp)
    exact = candidate_logps(shift_rows(base), inp.h, z, s, inp) - base_lp
    bufs: dict = {}
    low = candidate_logps(shift_rows(base), inp.h, z, s, inp, matmul_dtype=dtype,
                          scratch=lambda name, n, dt: bufs.setdefault(name, torch.empty(n, dtype=dt)))
    rel = float(((low - base_lp) - exact).abs().max() / exact.abs().max())
    assert 0 < rel < 0.01
    assert bufs["z_low"].dtype == dtype and bufs["z_low"].numel() == z.numel()
    assert chunk_size(100, 1000, 16, 40, low_bytes=2) == 100 * 2**20 // (4 * (16000 + 80000) + 2 * (16000 + 40000))


def test_bf16_votes_agree_with_float32_on_the_toy_model(toy_reference, toy_pairs):
    model, tok = copy.deepcopy(toy_reference[0]), toy_reference[1]  # the trainer unties and freezes the head
    enc = encode_rows(toy_pairs[0][:2], tok, 32, 16)
    votes = {}
    for dt in ("float32", "bfloat16"):
        seen = []

        class Recording(LikelihoodOracle):
            def compare(self, batch):
                y = super().compare(batch)
                seen.append(y)
                return y

        cfg = ZOConfig(estimator="projected", m=512, radius=0.02, matmul_dtype=dt, checkpoint_every=0)
        trainer = ZOTrainer(model, cfg, 0, Recording(), 0)
        head0 = trainer.head.weight.detach().clone()
        trainer.step(0, enc.items[:1], toy_pairs[0][:1])
        trainer.head.weight.data.copy_(head0)
        votes[dt] = torch.cat(seen)
    agree = float((votes["float32"] == votes["bfloat16"]).float().mean())
    assert 0.97 <= agree <= 1.0


def test_sampled_top_k_is_the_top_k():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3_000_000, generator=gen).abs()
    k = math.ceil(0.01 * a.numel())
    got = top_indices(a, k)
    assert got.numel() == k and len(set(got.tolist())) == k
    assert set(got.tolist()) == set(torch.topk(a, k, sorted=False).indices.tolist())
    assert float(a[got].min()) >= float(torch.topk(a, k).values[-1])
    ties = torch.zeros(2_000_000)  # all equal: every entry passes the bound, topk picks among them
    assert top_indices(ties, 50).numel() == 50
    g = torch.randn(2000, 1500, generator=gen)
    kept = sparsify(g, "top_fraction", rho=0.01)
    ref = torch.zeros_like(g).flatten()
    idx = torch.topk(g.abs().flatten(), 30000, sorted=False).indices
    ref[idx] = g.flatten()[idx]
    assert torch.equal(kept, ref.view_as(g))


def test_all_finite_finds_one_bad_entry_and_trusts_huge_finite_ones():
    x = torch.full((1000, 300), 3e38)  # the fp32 sum would overflow; the float64 one does not
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[517, 3] = bad
        assert not all_finite(y)


def test_the_trainer_evaluates_candidates_the_plain_way(toy_reference, toy_pairs):
    """A whole projected step's candidate log-probs: the fast path against the written-out one."""
    model, tok = toy_reference
    enc = encode_rows(toy_pairs[0][:1], tok, 32, 16)
    inp = capture(model, enc.items, 0)
    w = model.get_output_embeddings().weight.detach().float()
    src = PerturbationSource(1, (w.shape[0], inp.h.shape[1]), radius=0.05)
    z = src.draw(0, range(6))
    fast = candidate_logps(shift_rows(base_logits(w, inp)), inp.h, z, src.scales(z), inp)
    torch.testing.assert_close(fast, _plain(base_logits(w, inp), inp.h, z, src.scales(z), inp), atol=1e-5, rtol=0)


def test_sequence_sums_match_index_add_in_any_token_order():
    from compo.scoring.logprobs import seq_sums, slots_of

    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 5, (40,), generator=gen)  # unsorted; sequence 4 may be empty
    seq[seq == 4] = 3
    vals = torch.randn(3, 7, 40, generator=gen, dtype=torch.float64, requires_grad=True)
    expected = torch.zeros(3, 7, 5, dtype=torch.float64).index_add_(-1, seq, vals.detach())
    got = seq_sums(vals, seq, 5)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    assert got[..., 4].abs().max() == 0
    assert slots_of(torch.tensor([1, 0, 1, 1, 0]), 2).tolist() == [0, 0, 1, 2, 1]
    got.sum().backward()
    assert torch.equal(vals.grad, torch.ones_like(vals))


def test_a_non_finite_head_stops_the_step_as_diverged(toy_reference, toy_pairs):
    """The base log-probs go through the max-free path, which returns None when not finite:
    the step must still end in Diverged (exit code for a diverged run), not a TypeError."""
    from compo.core.errors import Diverged

    model, tok = copy.deepcopy(toy_reference[0]), toy_reference[1]
    enc = encode_rows(toy_pairs[0][:1], tok, 32, 16)
    trainer = ZOTrainer(model, ZOConfig(estimator="projected", m=8, checkpoint_every=0), 0, LikelihoodOracle(), 0)
    trainer.w[3, 0] = float("nan")
    with pytest.raises(Diverged, match="log-probs of the step's pairs are not finite"):
        trainer.step(0, enc.items, toy_pairs[0][:1])


def test_head_inputs_sum_per_sequence_with_their_cached_layout():
    inp, _, _, _ = _inputs(t=10)
    vals = torch.arange(20.0).view(2, 10)
    assert inp.layout[1] == 3 and inp.layout[0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 0, 1]
    assert inp.sums(vals).tolist() == [[3.0, 7.0, 18.0, 17.0], [33.0, 27.0, 48.0, 37.0]]


# tiled candidate evaluation (CPU) and the buffered update path

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


def test_tile_width_keeps_a_tile_near_one_megabyte_on_the_cpu_only():
    assert vocab_tile("cpu", 91, 49152) == 2560  # 1 MiB / (4 B * 91 rows) = 2880 -> 2560
    assert vocab_tile("cpu", 91, 2000) == 0  # one tile would hold it: the batched path
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
    x = torch.randn(300, 40)
    assert all_finite(x)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[123, 7] = bad
        assert not all_finite(y)
