"""zo.support: perturbations on a vocabulary support S, candidates evaluated in O(|S|).

Checked against a naive evaluation that scatters each support perturbation into a full V x H
head and runs a full log-softmax; the stable combine of the inside and outside log-sum-exps;
the first-order energy and cosine against autograd; start-up errors for judges."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compo.config import ZOConfig
from compo.data.encode import Encoded
from compo.core.errors import UserError
from compo.zo.estimator import normalise, sparsify
from compo.zo.head import HeadInputs, candidate_logps, capture, head_logps, shift_rows
from compo.zo.perturb import PerturbationSource
from compo.zo.support import first_order, restrict, support_rows
from compo.zo.trainer import ZOTrainer
from oracles import LikelihoodOracle
from oracles.likelihood import likelihood_votes

V = 1200


def _model(tied: bool) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, pad_token_id=0)
    torch.manual_seed(3)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # logits with some spread, so the top-k rows are distinct
        model.get_output_embeddings().weight.mul_(40.0)
    return model


def _pairs(n: int, seed: int = 0) -> tuple[list[Encoded], list]:
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(4, V, (k,), generator=g).tolist()  # noqa: E731
    items = [Encoded(i, ids(5), (ids(4), ids(3))) for i in range(n)]
    texts = [SimpleNamespace(prompt=f"p{i}", chosen="c", rejected="r", source=f"s{i}") for i in range(n)]
    return items, texts


class Recording(LikelihoodOracle):
    """The likelihood rule, keeping every vote it gives (chunk by chunk)."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def compare(self, batch):
        y = super().compare(batch)
        self.seen.append(y.clone())
        return y


def _naive_step(tr: ZOTrainer, w: torch.Tensor, item, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(votes, proposed direction) of step ``t`` from head ``w``, the slow way: every candidate
    is a full V x H head W + s_i scatter(z_i Q^T), scored by a full log-softmax."""
    cfg = tr.cfg
    sp = tr.last_space
    inp = capture(tr.model, [item], 0, check=False)
    base_lp = head_logps(w, inp)
    v, width = sp.shape
    src = PerturbationSource(tr.seed, (v, width), cfg.radius, cfg.distribution)
    z = src.draw(t, range(cfg.m))
    s = src.scales(z)
    votes = []
    for i in range(cfg.m):
        delta = z[i] @ sp.q.T if sp.q is not None else z[i]
        full = torch.zeros_like(w)
        full[sp.rows if sp.rows is not None else slice(None)] = delta
        lp = head_logps(w + s[i] * full, inp)
        votes.append(likelihood_votes(base_lp[:1], base_lp[1:], lp[None, :1], lp[None, 1:])[0, 0])
    votes = torch.stack(votes)
    u = ((votes.float() * (s / cfg.radius))[:, None] * z.flatten(1)).sum(0).view(v, width)
    return votes, u


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("estimator,distribution,sparsity", [
    ("projected", "gaussian", "top_fraction"), ("projected", "gaussian", "off"), ("full", "sphere", "top_fraction"),
    ("full", "gaussian", "off"),
])
def test_support_votes_and_steps_match_a_naive_full_head_evaluation(tied, estimator, distribution, sparsity):
    items, texts = _pairs(3)
    sparse = dict(sparsity="top_fraction", rho=0.1) if sparsity == "top_fraction" else dict(sparsity="absolute",
                                                                                             lambda_g=0.0)
    cfg = ZOConfig(m=24, chunk_size=5, radius=0.05, estimator=estimator, distribution=distribution, support="topk",
                   support_k=3, skip_threshold=0.0, gamma=0.5, checkpoint_every=0, **sparse)
    oracle = Recording()
    tr = ZOTrainer(_model(tied), cfg, 11, oracle, pad_id=0)
    taken = 0
    for t in range(3):
        w = tr.w.clone()
        rec = tr.step(t, [items[t]], [texts[t]])
        votes = torch.cat(oracle.seen)
        oracle.seen.clear()
        naive, u = _naive_step(tr, w, items[t], t)
        assert torch.equal(votes, naive), t
        assert rec["support_size"] == tr.last_space.rows.numel() < V
        assert rec["dim"] == rec["support_size"] * tr.last_space.shape[1]
        torch.testing.assert_close(tr.last_u, u, rtol=1e-5, atol=1e-5)
        # the update: g = u (Q^T) on S, normalised and sparsified within S, 0 on the other rows
        g_rows = normalise(u @ tr.last_space.q.T if tr.last_space.q is not None else u)
        g_rows = sparsify(g_rows, cfg.sparsity, cfg.lambda_g, cfg.rho)
        want = w.clone()
        want[tr.last_space.rows] -= cfg.gamma * rec["frac_minus"] * g_rows
        if not rec["skipped"]:
            taken += 1
            torch.testing.assert_close(tr.w, want, rtol=0, atol=1e-6)
            untouched = torch.ones(V, dtype=torch.bool)
            untouched[tr.last_space.rows] = False
            assert torch.equal(tr.w[untouched], w[untouched])
        if sparsity == "top_fraction" and not rec["skipped"]:
            kept = int((tr.w != w).sum())
            assert kept == pytest.approx(0.1 * rec["support_size"] * w.shape[1], abs=2)  # ranked within S
    assert taken >= 1


def test_a_support_of_every_row_gives_the_votes_and_head_of_support_all():
    items, texts = _pairs(2)
    heads, votes = {}, {}
    for name, kw in (("all", dict(support="all")), ("topk", dict(support="topk", support_k=V))):
        cfg = ZOConfig(m=30, chunk_size=7, radius=0.05, estimator="projected", sparsity="top_fraction", rho=0.1,
                       skip_threshold=0.0, gamma=0.5, checkpoint_every=0, **kw)
        oracle = Recording()
        tr = ZOTrainer(_model(True), cfg, 4, oracle, pad_id=0)
        for t in range(2):
            tr.step(t, [items[t]], [texts[t]])
        heads[name], votes[name] = tr.w, torch.cat(oracle.seen)
    assert torch.equal(votes["all"], votes["topk"])
    torch.testing.assert_close(heads["all"], heads["topk"], rtol=0, atol=1e-6)


def test_support_all_is_the_estimator_of_the_whole_head():
    """support: all keeps today's arithmetic: u over V x k, g = normalise(u Q^T), sparsified over
    the whole head, bit for bit."""
    items, texts = _pairs(1)
    cfg = ZOConfig(m=20, radius=0.05, estimator="projected", sparsity="top_fraction", rho=0.1, skip_threshold=0.0,
                   gamma=0.5, checkpoint_every=0)
    tr = ZOTrainer(_model(True), cfg, 9, LikelihoodOracle(), pad_id=0)
    w = tr.w.clone()
    rec = tr.step(0, items, texts)
    assert tr.last_space.rows is None and rec["support_size"] == V and rec["support_energy"] == 1.0
    g = sparsify(normalise(tr.last_u @ tr.last_space.q.T), "top_fraction", rho=0.1)
    assert torch.equal(tr.w, w - (cfg.gamma * rec["frac_minus"]) * g)


def _inputs(targets: list[int], seq: list[int]) -> HeadInputs:
    t = torch.tensor(targets)
    return HeadInputs(torch.zeros(len(t), 2), t, torch.tensor(seq), max(seq) + 1, None)


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_the_outside_log_sum_exp_combines_stably(scale):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g, dtype=torch.float64) * scale
    logits[:, 7] += 3 * scale  # the row max sits outside S for the far positions below
    inp = _inputs([1, 2, 3, 1, 2, 3], [0, 0, 0, 1, 1, 1])
    want = torch.log_softmax(logits, -1).gather(1, inp.targets[:, None]).squeeze(1)
    want = torch.stack([want[:3].sum(), want[3:].sum()])
    base = shift_rows(logits.float())
    rows = support_rows("pair", base, inp.targets)
    r = restrict(base, inp, rows)
    assert r.base.shape == (6, 3) and torch.equal(r.inp.targets, torch.tensor([0, 1, 2, 0, 1, 2]))
    z, hs = torch.zeros(1, 3, 2), torch.zeros(6, 2)
    got = candidate_logps(r.base, hs, z, torch.ones(1), r.inp, lse_out=r.lse_out)[0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-3 * max(1.0, scale / 1e3))


def test_a_support_holding_every_row_needs_no_outside_term():
    g = torch.Generator().manual_seed(1)
    base = shift_rows(torch.randn(4, 9, generator=g))
    inp = _inputs([0, 8, 3, 3], [0, 0, 1, 1])
    r = restrict(base, inp, torch.arange(9))
    assert torch.isinf(r.lse_out).all() and (r.lse_out < 0).all()
    z, hs = torch.randn(3, 9, 2, generator=g), torch.randn(4, 2, generator=g)
    whole = candidate_logps(base, hs, z, torch.full((3,), 0.1), inp)
    assert torch.equal(candidate_logps(r.base, hs, z, torch.full((3,), 0.1), r.inp, lse_out=r.lse_out), whole)


def test_supports_are_the_targets_and_the_top_tokens():
    base = torch.tensor([[0.0, -1, -5, -2, -9], [-3, -4, 0, -1, -8]])
    targets = torch.tensor([4, 4])
    assert support_rows("all", base, targets) is None
    assert support_rows("pair", base, targets).tolist() == [4]
    assert support_rows("topk", base, targets, 2).tolist() == [0, 1, 2, 3, 4]
    assert support_rows("topk", base, targets, 1).tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="every target"):
        restrict(base, HeadInputs(torch.zeros(2, 1), targets, torch.tensor([0, 1]), 2, None), torch.tensor([0, 2]))


@pytest.mark.parametrize("rule", ["strict", "relaxed"])
def test_the_first_order_direction_matches_autograd(rule):
    """e = -(n1/|n1| + n2/|n2|) with the rule's normals, from head gradients by autograd."""
    model = _model(False)
    items, _ = _pairs(1, seed=5)
    inp = capture(model, items, 0, check=False)
    w = model.get_output_embeddings().weight.detach().float().clone().requires_grad_(True)
    lp = head_logps(w, inp)
    a, = torch.autograd.grad(lp[0], w, retain_graph=True)
    b, = torch.autograd.grad(lp[1], w)
    n1, n2 = a, (-b if rule == "strict" else a - b)
    e = -(n1 / n1.norm() + n2 / n2.norm())
    base = shift_rows(inp.h @ w.detach().T)
    fo = first_order(base, inp, inp.h, rule)
    assert fo.norm == pytest.approx(float(e.norm()), rel=1e-4)
    rows = support_rows("topk", base, inp.targets, 4)
    assert fo.energy(rows) == pytest.approx(float(e[rows].pow(2).sum() / e.pow(2).sum()), rel=1e-4)
    u = torch.randn(rows.numel(), w.shape[1], generator=torch.Generator().manual_seed(0)) + 50 * e[rows]
    full = torch.zeros_like(w)
    full[rows] = u
    cos = float((full * e).sum() / (full.norm() * e.norm()))
    assert fo.cosine(u, rows) == pytest.approx(cos, rel=1e-4)
    assert fo.cosine(full, None) == pytest.approx(cos, rel=1e-4)


def test_logged_signal_is_the_first_order_cosine_and_supports_raise_it():
    items, texts = _pairs(1, seed=2)
    cos = {}
    for support in ("all", "pair"):
        cfg = ZOConfig(m=200, radius=0.01, estimator="projected", support=support, skip_threshold=1.0,
                       checkpoint_every=0)
        tr = ZOTrainer(_model(False), cfg, 1, LikelihoodOracle(), pad_id=0)
        rec = tr.step(0, items, texts)
        assert rec["signal_cos_source"] == "first_order" and "signal_cos_moment" in rec
        cos[support] = rec["signal_cos"]
        assert 0 < rec["support_energy"] <= 1
    assert cos["pair"] > 2 * cos["all"]


def test_judges_cannot_use_a_support():
    from compo.zo.oracles import check_estimator

    judge = SimpleNamespace(needs=__import__("oracles.base", fromlist=["Evidence"]).Evidence.GENERATIONS, name="j")
    with pytest.raises(UserError, match="zo.support: zo.support=topk needs an oracle"):
        check_estimator(ZOConfig(support="topk"), judge)
    check_estimator(ZOConfig(support="all"), judge)



def test_a_killed_support_run_resumes_bit_identically(tmp_path):
    """SIGKILL between stage-2 steps of a zo.support=topk run, then --resume: the same head and
    metrics as a run never killed."""
    import hashlib
    import os
    import subprocess
    import sys
    from pathlib import Path

    from compo.core.rundir import read_jsonl

    root = Path(__file__).resolve().parent.parent
    sets = ["data.toy.n_train=64", "data.toy.n_eval=16", "model.toy.sft_steps=20", "stage1.enabled=false",
            "zo.m=32", "zo.max_steps=4", "zo.checkpoint_every=1", "zo.support=topk", "zo.support_k=4",
            "zo.estimator=projected"]

    def run(path: Path, *flags: str, fault: str | None = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "COMPO_FAULT"}
        env.update(OMP_NUM_THREADS="1", PYTHONHASHSEED="0", **({"COMPO_FAULT": fault} if fault else {}))
        argv = [sys.executable, "-m", "compo.cli", "pipeline", "-c", "tests/tiny.yaml", "--run-dir", str(path),
                *[a for s in sets for a in ("--set", s)], *flags]
        return subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=600)

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert run(ref).returncode == 0
    assert run(killed, fault="kill:zo.step:2").returncode == -9
    resumed = run(killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert digest(killed / "model/zo_head_fp32.safetensors") == digest(ref / "model/zo_head_fp32.safetensors")
    strip = lambda p: [{k: v for k, v in r.items() if k not in ("wall_s", "perturbations_per_s", "prep_s")}  # noqa: E731
                       for r in read_jsonl(p / "metrics.jsonl")]
    recs = [r for r in strip(killed) if r.get("stage") == "stage2"]
    assert strip(killed) == strip(ref) and len(recs) == 4
    assert all(r["support_size"] < 58 and 0 < r["support_energy"] <= 1 for r in recs)
    import json

    summary = json.loads((ref / "summary.json").read_text())["stage2"]
    assert summary["mean_support_size"] == sum(r["support_size"] for r in recs) / 4
    assert summary["min_support_energy"] == min(r["support_energy"] for r in recs)


def test_the_progress_line_shows_the_support():
    from compo.zo.trainer import progress_fields

    rec = {"n_minus": 7, "signal_cos": 0.1234, "support_size": 256, "support_energy": 0.99912, "perturbations_per_s": 9.5}
    assert progress_fields(rec, {"steps_taken": 3}) == {"n_minus": 7, "taken": 3, "cos": "0.123", "S": 256,
                                                         "E": "0.999", "pps": 9.5}


def test_a_support_run_warns_once_that_gamma_moves_its_rows_further(tmp_path):
    from compo.core.rundir import RunDir

    items, texts = _pairs(3)
    warned = {}
    for support in ("all", "pair"):
        cfg = ZOConfig(m=8, radius=0.05, support=support, gamma=0.5, max_steps=3, checkpoint_every=0)
        totals = ZOTrainer(_model(True), cfg, 0, LikelihoodOracle(), 0).train(items, texts, RunDir(tmp_path / support),
                                                                               progress=False)
        warned[support] = [w for w in totals.get("warnings", []) if "lands in the step's" in w]
    assert warned["all"] == [] and len(warned["pair"]) == 1
    size = int(warned["pair"][0].split("lands in the step's ")[1].split(" ")[0])
    assert f"try about {0.5 * (size / V) ** 0.5:.3g}" in warned["pair"][0] and "stage2 step 1:" in warned["pair"][0]
