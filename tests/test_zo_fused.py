"""CPU candidates drawn and evaluated one per thread, tile by tile (compo/zo/fused.py), against
the draw-then-evaluate path: the same draws and log-probs bit for bit, whatever the thread count
(one thread a worker), and whole trainer steps the same on either path."""

import time

import pytest
import torch

from compo.zo.fused import fused_logps
from compo.zo.head import HeadInputs, candidate_logps, shift_rows
from compo.zo.perturb import PerturbationSource


def _case(t: int = 12, width: int = 8, v: int = 200, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(t, width, generator=gen)
    inp = HeadInputs(h, torch.randint(0, v, (t,), generator=gen), torch.arange(t) * 4 // t, 4, None)
    return inp, shift_rows(3 * torch.randn(t, v, generator=gen))


def _drawn_then_evaluated(source, step, idx, base, inp, tile, dtype=torch.float32):
    z = source.draw(step, idx)
    s = source.scales(z)
    return z, s, candidate_logps(base, inp.h, z, s, inp, tile=tile, matmul_dtype=dtype,
                                 scratch=lambda name, n, dt: torch.empty(n, dtype=dt))


@pytest.mark.parametrize("rng", ["philox", "torch"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("tile", [16, 48, 200])
def test_fused_candidates_match_draw_then_evaluate_bit_for_bit(threads, tile, rng):
    """Draws filled tile by tile inside the fused path against whole draws on one thread."""
    inp, base = _case()
    ref_source = PerturbationSource(7, (200, 8), 0.05, threads=1, rng=rng)
    source = PerturbationSource(7, (200, 8), 0.05, threads=threads, rng=rng)
    idx = [3, 4, 5, 6, 9]
    z_ref, s_ref, lp_ref = _drawn_then_evaluated(ref_source, 2, idx, base, inp, tile)
    z = torch.full((6, 200, 8), float("nan"))
    lp, s = fused_logps(source, 2, idx, z, base, inp.h, inp, tile)
    assert source.tiles_match(tile)
    assert torch.equal(z[:5], z_ref) and torch.equal(s, s_ref) and torch.equal(lp, lp_ref)
    assert torch.isnan(z[5]).all()  # rows past the chunk are not touched


def test_a_sphere_source_draws_whole_and_still_matches():
    inp, base = _case(seed=1)
    source = PerturbationSource(7, (200, 8), 0.5, "sphere", threads=2)
    z_ref, s_ref, lp_ref = _drawn_then_evaluated(source, 0, [0, 1, 2], base, inp, 64)
    z = torch.empty(3, 200, 8)
    lp, s = fused_logps(source, 0, [0, 1, 2], z, base, inp.h, inp, 64)
    assert torch.equal(z, z_ref) and torch.equal(s, s_ref) and torch.equal(lp, lp_ref)
    assert torch.equal(s, 0.5 / z.flatten(1).norm(dim=1))


def test_a_last_tile_under_16_numbers_is_not_interleaved_and_still_matches():
    inp, base = _case(width=3, v=197)  # 197 = 3 * 64 + 5 rows: the last tile holds 15 numbers
    source = PerturbationSource(1, (197, 3), 0.1, threads=2, rng="torch")
    assert not source.tiles_match(64) and source.tiles_match(197)
    z_ref, _, lp_ref = _drawn_then_evaluated(source, 0, [0, 1], base, inp, 64)
    z = torch.empty(2, 197, 3)
    lp, _ = fused_logps(source, 0, [0, 1], z, base, inp.h, inp, 64)
    assert torch.equal(z, z_ref) and torch.equal(lp, lp_ref)


def test_overflow_is_redone_with_the_per_tile_max_per_candidate():
    inp, base = _case(seed=2)
    big = base + 200.0  # exp(200) overflows fp32
    source = PerturbationSource(3, (200, 8), 0.05, threads=2)
    _, _, lp_ref = _drawn_then_evaluated(source, 1, [0, 1, 2], big, inp, 64)
    lp, _ = fused_logps(source, 1, [0, 1, 2], torch.empty(3, 200, 8), big, inp.h, inp, 64)
    assert torch.isfinite(lp).all() and torch.equal(lp, lp_ref)


def test_a_bfloat16_matmul_matches_its_draw_then_evaluate_path():
    inp, base = _case(seed=3)
    source = PerturbationSource(3, (200, 8), 0.05, threads=2)
    _, _, lp_ref = _drawn_then_evaluated(source, 0, [0, 1, 2, 3], base, inp, 64, torch.bfloat16)
    lp, _ = fused_logps(source, 0, [0, 1, 2, 3], torch.empty(4, 200, 8), base, inp.h, inp, 64, torch.bfloat16)
    assert torch.equal(lp, lp_ref)


def test_tile_draws_chain_like_one_draw_only_in_whole_blocks_of_16():
    source = PerturbationSource(0, (37, 7), 1.0, rng="torch")
    assert source.tiles_match(16) and source.tiles_match(32)  # 112 / 224 numbers, last block 35
    assert not source.tiles_match(3)  # 21 numbers a tile: not whole blocks of 16
    whole = source.draw(0, [0])[0]
    tiled = torch.empty_like(whole)
    gen = source.generator(0, 0)
    for a in range(0, 37, 16):
        source.fill(gen, tiled[a : a + 16])
    assert torch.equal(whole, tiled)


def test_a_chunk_smaller_than_the_thread_count_shares_the_spare_threads_out():
    from compo.zo import perturb

    inp, base = _case(seed=4)
    source = PerturbationSource(5, (200, 8), 0.05, threads=4)
    _, _, lp_ref = _drawn_then_evaluated(source, 0, [0, 1], base, inp, 64)
    lp, _ = fused_logps(source, 0, [0, 1], torch.empty(2, 200, 8), base, inp.h, inp, 64)
    assert torch.allclose(lp, lp_ref, atol=1e-6, rtol=0)
    seen: dict[int, int] = {}
    main = torch.get_num_threads()
    perturb.in_workers(2, lambda w: seen.__setitem__(w, torch.get_num_threads()), 2)
    perturb.in_workers(3, lambda w: seen.__setitem__(10 + w, torch.get_num_threads()))
    assert seen == {0: 2, 1: 2, 10: 1, 11: 1, 12: 1} and torch.get_num_threads() == main


def test_a_chunk_where_only_some_candidates_overflow_gives_each_its_own_numbers():
    """Only the candidates whose sums overflow are redone with the max shift, on either path:
    a candidate's log-probs do not depend on the chunk it came in."""
    inp, base = _case(seed=2)  # a case where a shifted redo rounds differently from the plain sum
    z = PerturbationSource(3, (200, 8), 0.05).draw(0, range(4))
    scales = torch.tensor([2.0, 80.0, 2.0, 2.0])  # candidate 1's offsets overflow exp()
    alone = [candidate_logps(base, inp.h, z[j : j + 1], scales[j : j + 1], inp, tile=64) for j in range(4)]
    together = candidate_logps(base, inp.h, z, scales, inp, tile=64)
    assert torch.isfinite(together).all()
    assert torch.equal(together, torch.cat(alone))


def test_a_failing_worker_fails_the_call_after_every_worker_has_stopped():
    from compo.zo import perturb

    done, main = [], torch.get_num_threads()

    def work(w: int) -> None:
        if w == 0:
            raise RuntimeError("worker 0 failed")
        time.sleep(0.2)  # still at work when worker 0 fails: the call must wait for it
        done.append(w)

    with pytest.raises(RuntimeError, match="worker 0 failed"):
        perturb.in_workers(3, work)
    assert sorted(done) == [1, 2] and torch.get_num_threads() == main


def test_trainer_steps_are_the_same_fused_or_drawn_then_evaluated(toy_reference, toy_pairs, monkeypatch):
    """A whole stage-2 step on the toy model with its head forced through vocab tiles: one
    candidate per thread (on 1 and on 2 threads) against draw-then-evaluate on 1 thread, on
    torch's stream and on zo.rng philox's (whose directions are others)."""
    import copy

    from compo.config import ZOConfig
    from compo.data.encode import encode_rows
    from compo.zo import step as zt
    from compo.zo.trainer import ZOTrainer
    from oracles import LikelihoodOracle

    model, tok = toy_reference
    enc = encode_rows(toy_pairs[0][:2], tok, 32, 16)
    monkeypatch.setattr(zt, "vocab_tile", lambda device, n_tok, v: 16)
    calls = []
    monkeypatch.setattr(zt, "fused_logps", lambda *a, **k: calls.append(1) or fused_logps(*a, **k))
    runs = {}
    for name, fused, threads, rng in (("drawn", False, 1, "torch"), ("fused1", True, 1, "torch"),
                                      ("fused2", True, 2, "torch"), ("philox_drawn", False, 1, "philox"),
                                      ("philox_fused2", True, 2, "philox")):
        monkeypatch.setattr(zt, "worth_fusing", lambda v, width, fused=fused: fused)
        n = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            cfg = ZOConfig(estimator="projected", m=48, chunk_size=8, radius=0.02, checkpoint_every=0, rng=rng)
            trainer = ZOTrainer(copy.deepcopy(model), cfg, 0, LikelihoodOracle(), 0)
            rec = trainer.step(0, enc.items[:2], toy_pairs[0][:2])
        finally:
            torch.set_num_threads(n)
        runs[name] = (rec["n_minus"], trainer.last_u.clone(), trainer.w.clone(), len(calls))
    for name, ref in (("fused1", "drawn"), ("fused2", "drawn"), ("philox_fused2", "philox_drawn")):
        assert runs[name][0] == runs[ref][0]
        assert torch.equal(runs[name][1], runs[ref][1]) and torch.equal(runs[name][2], runs[ref][2])
    assert 0 < runs["drawn"][0] < 48 and 0 < runs["philox_drawn"][0] < 48
    assert not torch.equal(runs["philox_drawn"][1], runs["drawn"][1])  # another stream: other directions
    # 48 / 8 chunks a fused step
    assert [runs[k][3] for k in ("drawn", "fused1", "fused2", "philox_drawn", "philox_fused2")] == [0, 6, 12, 12, 18]
