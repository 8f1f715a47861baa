"""ComPO stage 2: estimator, skip and acceptance rules, cached-head exactness, determinism, resume."""

import copy

import pytest
import torch

from compo.config import ZOConfig
from compo.data.encode import encode_rows
from compo.scoring.models import untie_head
from compo.core.rundir import RunDir
from compo.zo.estimator import normalise, proposed_head, skip_reason, sparsify
from compo.zo.head import base_logits, candidate_logps, capture, logits_logps
from compo.zo.perturb import PerturbationSource, perturbation_seed
from compo.zo.trainer import ZOTrainer
from oracles import LikelihoodOracle, Oracle


def test_estimator_recovers_sign_pattern_of_a_linear_objective():
    torch.manual_seed(0)
    a = torch.zeros(8, 5)
    a[0, 0], a[3, 2], a[5, 4], a[7, 1] = 3.0, -2.5, 2.0, -3.0
    a += 0.01 * torch.randn(8, 5)
    w = torch.randn(8, 5)
    f = lambda x: float((a * x).sum())  # noqa: E731
    src = PerturbationSource(1, (8, 5), radius=1e-3)
    z = src.draw(0, range(2000))
    y = torch.where((a * (w + 1e-3 * z)).sum((1, 2)) < f(w), -1, 1).float()  # -1: candidate better
    u = (y[:, None, None] * z).sum(0)
    g = sparsify(normalise(u), "top_fraction", rho=0.1)
    kept = g != 0
    assert int(kept.sum()) == 4
    assert torch.equal(torch.sign(g[kept]), torch.sign(a[kept]))
    assert {tuple(i) for i in kept.nonzero().tolist()} == {(0, 0), (3, 2), (5, 4), (7, 1)}
    frac = float((y == -1).float().mean())
    assert f(proposed_head(w, g, 0.5, frac)) < f(w)


def test_sparsify_absolute_keeps_without_renormalising():
    g = torch.tensor([0.5, -0.1, 0.3, -0.02])
    assert sparsify(g, "absolute", lambda_g=0.1).tolist() == pytest.approx([0.5, -0.1, 0.3, 0.0])
    assert skip_reason(10, 100, 0.2).startswith("weak signal: N-/m = 10/100")
    assert skip_reason(20, 100, 0.2) is None


def test_perturbations_are_pure_functions_of_seed_step_index():
    src = PerturbationSource(7, (3, 4), 0.1)
    whole = src.draw(5, range(6))
    assert torch.equal(src.draw(5, [4, 1]), whole[[4, 1]])
    assert not torch.equal(PerturbationSource(8, (3, 4), 0.1).draw(5, [0])[0], whole[0])
    assert perturbation_seed(7, 5, 0) != perturbation_seed(7, 6, 0)
    sphere = PerturbationSource(7, (3, 4), 0.1, "sphere")
    zs = sphere.draw(0, range(3))
    assert torch.allclose((sphere.scales(zs)[:, None] * zs.flatten(1)).norm(dim=1), torch.full((3,), 0.1))


@pytest.mark.parametrize("tied", [True, False])
def test_cached_head_equals_full_forward_with_perturbed_head(tied, toy_tokenizer, toy_pairs):
    from compo.data import toy
    from compo.config import ToyModelConfig

    model = toy.build_model(ToyModelConfig(hidden_size=32), len(toy_tokenizer), seed=1)
    if not tied:
        untie_head(model)
    assert (model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == tied
    enc = encode_rows(toy_pairs[0][:3], toy_tokenizer, 32, 16)
    untie_head(model)  # stage 2 always perturbs an untied head
    inp = capture(model, enc.items, 0)
    w = model.get_output_embeddings().weight.detach().float().clone()
    src = PerturbationSource(3, tuple(w.shape), radius=0.05)
    z = src.draw(0, range(4))
    cached = candidate_logps(base_logits(w, inp), inp.h, z, src.scales(z), inp)
    for i in range(4):
        m = copy.deepcopy(model)
        m.get_output_embeddings().weight.data.copy_(w + 0.05 * z[i])
        full = capture(m, enc.items, 0).forward_logps
        torch.testing.assert_close(cached[i], full, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits_logps(base_logits(w, inp), inp), inp.forward_logps, atol=1e-4, rtol=0)


def _trainer(model, seed=0, oracle=None, **kw):
    cfg = ZOConfig(**{"m": 64, "radius": 5e-3, "sparsity": "top_fraction", "rho": 0.05, "skip_threshold": 0.05,
                      "gamma": 0.5, "checkpoint_every": 2, **kw})
    return ZOTrainer(model, cfg, seed, oracle or LikelihoodOracle(), pad_id=0)


def _noisy(toy_reference, toy_pairs, n=6):
    model, tok = toy_reference
    enc = encode_rows(toy_pairs[0][:n], tok, 32, 16)
    return enc.items, toy_pairs[0][:n]


def _fresh(toy_reference):
    return copy.deepcopy(toy_reference[0])


def test_five_steps_raise_chosen_and_lower_rejected(tmp_path, toy_reference, toy_pairs):
    model = _fresh(toy_reference)
    items, texts = _noisy(toy_reference, toy_pairs)
    tr = _trainer(model, max_steps=5)
    recs = []
    tr.train(items, texts, RunDir(tmp_path), callback=lambda t, r: recs.append(r), progress=False)
    taken = [r for r in recs if not r["skipped"]]
    assert len(taken) >= 3
    d_c = [p["logp_chosen_after"] - p["logp_chosen_before"] for r in taken for p in r["pairs"]]
    d_r = [p["logp_rejected_after"] - p["logp_rejected_before"] for r in taken for p in r["pairs"]]
    assert sum(d_c) / len(d_c) > 0 and sum(d_r) / len(d_r) < 0
    assert all(0 < r["frac_changed"] <= 0.06 for r in taken)
    assert tr.untied and not model.config.tie_word_embeddings


def test_skip_rule_and_acceptance_check_skip_steps(tmp_path, toy_reference, toy_pairs):
    items, texts = _noisy(toy_reference, toy_pairs, 2)
    tr = _trainer(_fresh(toy_reference), skip_threshold=1.0)
    w0 = tr.w.clone()
    rec = tr.step(0, items[:1], texts[:1])
    assert rec["skipped"] and rec["skip_reason"].startswith("weak signal") and torch.equal(tr.w, w0)

    class Never(Oracle):
        def compare(self, batch):
            return torch.ones(batch.n_candidates, dtype=torch.int8)

    tr = _trainer(_fresh(toy_reference), acceptance_check=True)
    tr.accept_oracle = Never()
    rec = tr.step(0, items[:1], texts[:1])
    assert rec["accepted"] is False and rec["skip_reason"] == "rejected by the acceptance check"
    assert torch.equal(tr.w, w0)
    tr = _trainer(_fresh(toy_reference), acceptance_check=True)
    rec = tr.step(0, items[:1], texts[:1])
    assert rec["accepted"] is True and not torch.equal(tr.w, w0)


def _run(toy_reference, toy_pairs, path, seed=0, kill_at=None, resume=False, **kw):
    items, texts = _noisy(toy_reference, toy_pairs)
    tr = _trainer(_fresh(toy_reference), seed=seed, max_steps=6, **kw)

    def cb(t, _):
        if t == kill_at:
            raise KeyboardInterrupt("simulated kill")

    try:
        tr.train(items, texts, RunDir(path), resume=resume, callback=cb, progress=False)
    except KeyboardInterrupt:
        return None
    return tr.w


def _bytes(w):
    return w.contiguous().numpy().tobytes()


def test_resume_after_kill_is_bit_identical(tmp_path, toy_reference, toy_pairs):
    full = _run(toy_reference, toy_pairs, tmp_path / "a")
    assert _run(toy_reference, toy_pairs, tmp_path / "b", kill_at=5) is None  # checkpoint at step 4 exists
    resumed = _run(toy_reference, toy_pairs, tmp_path / "b", resume=True)
    assert _bytes(resumed) == _bytes(full)


def test_same_seed_same_head_different_seed_different_head(tmp_path, toy_reference, toy_pairs):
    a = _run(toy_reference, toy_pairs, tmp_path / "a", seed=1)
    b = _run(toy_reference, toy_pairs, tmp_path / "b", seed=1)
    c = _run(toy_reference, toy_pairs, tmp_path / "c", seed=2)
    assert _bytes(a) == _bytes(b)
    assert _bytes(a) != _bytes(c)


def test_projected_estimator_runs_and_moves_the_right_way(tmp_path, toy_reference, toy_pairs):
    items, texts = _noisy(toy_reference, toy_pairs)
    tr = _trainer(_fresh(toy_reference), estimator="projected", max_steps=4)
    recs = []
    tr.train(items, texts, RunDir(tmp_path), callback=lambda t, r: recs.append(r), progress=False)
    taken = [p for r in recs if not r["skipped"] for p in r["pairs"]]
    assert taken
    assert sum(p["logp_chosen_after"] - p["logp_chosen_before"] for p in taken) > 0


def test_threaded_draws_equal_one_thread_bit_for_bit():
    one = PerturbationSource(5, (7, 6), 0.1, threads=1).draw(3, range(2, 13))
    for n in (2, 3, 16):
        many = PerturbationSource(5, (7, 6), 0.1, threads=n).draw(3, range(2, 13))
        assert torch.equal(one, many)
    assert torch.equal(one[4], PerturbationSource(5, (7, 6), 0.1, threads=4).draw(3, [6])[0])
