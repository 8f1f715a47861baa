"""ComPO's stage 2 with API judges (against the fake servers) voting and checking acceptance:
position bias in the step log and summary, identical generations free, the acceptance judge's counters."""

from __future__ import annotations

import hashlib

import pytest

from fake_llm import Act, shown_texts


def _by_hash(n: int, user_text: str) -> Act:
    """A position-independent judge: the response with the smaller hash wins, whatever the order."""
    first, second = (hashlib.sha256(t.encode()).hexdigest() for t in shown_texts(user_text))
    return Act("Verdict: A" if first < second else "Verdict: B")


def _stage2(judge, toy_reference, toy_pairs, run_dir, accept_judge=None, **zo):
    """Three stage-2 steps on the toy model with ``judge`` voting (and ``accept_judge``, if
    given, running the acceptance check)."""
    import copy

    from compo.config import ZOConfig
    from compo.data.encode import encode_rows
    from compo.core.rundir import RunDir, read_jsonl
    from compo.zo.trainer import ZOTrainer
    from oracles import GenerationOracle

    model, tok = copy.deepcopy(toy_reference[0]), toy_reference[1]
    enc = encode_rows(toy_pairs[0][:4], tok, 32, 16)
    cfg = ZOConfig(**{"m": 8, "radius": 0.5, "sparsity": "top_fraction", "rho": 0.05, "skip_threshold": 0.1,
                      "gamma": 0.5, "max_steps": 3, "checkpoint_every": 0, **zo})
    oracle = GenerationOracle(judge, max_new_tokens=4)
    accept = None if accept_judge is None else GenerationOracle(accept_judge, max_new_tokens=4)
    run = RunDir(run_dir)
    ZOTrainer(model, cfg, 0, oracle, 0, accept, tok).train(enc.items, toy_pairs[0][:4], run, progress=False)
    return run, [r for r in read_jsonl(run.metrics) if r["stage"] == "stage2"]


@pytest.mark.parametrize("biased", [True, False])
def test_position_bias_reaches_the_step_log_and_the_summary(biased, serve, judges, toy_reference, toy_pairs,
                                                            tmp_path, capsys):
    from compo.pipeline import print_summary
    from compo.zo.run import step_diagnostics

    srv = serve("openai", (lambda n, t: Act("Verdict: A")) if biased else _by_hash)
    run, recs = _stage2(judges("openai", srv, swap=True), toy_reference, toy_pairs, tmp_path / "run")
    assert len(recs) == 3
    for r in recs:  # 8 candidates x 1 prompt per step: each pair is a tie by identity or asked both ways
        assert r["oracle/identical_ties"] + r["oracle/swap_pairs"] == 8 and r["oracle/abstentions"] == 0
        assert r["oracle/swap_disagreements"] == (r["oracle/swap_pairs"] if biased else 0)
    pairs = sum(r["oracle/swap_pairs"] for r in recs)
    assert pairs > 0 and srv.count == sum(r["oracle/calls"] for r in recs) <= 2 * pairs
    assert all(r["oracle/swap_disagreement"] == (1.0 if biased else 0.0) for r in recs if r["oracle/swap_pairs"])
    totals = step_diagnostics(run)
    assert totals["oracle/swap_disagreement"] == (1.0 if biased else 0.0) and totals["oracle/swap_pairs"] == pairs
    assert totals["oracle/identical_ties"] == 24 - pairs and totals["oracle/calls"] == srv.count
    capsys.readouterr()
    print_summary({"stage2": {"steps": 3, **totals}})
    out = capsys.readouterr().out
    rate = "1.000" if biased else "0.000"
    assert f"stage2 judge (oracle): {srv.count} requests, 0 cache hits, 0 abstentions, {24 - pairs} identical" in out
    assert f"position bias: the two orders disagree on {rate} of {pairs} pairs" in out


def test_identical_generations_cost_no_requests(serve, judges, toy_reference, toy_pairs, tmp_path):
    # a tiny radius leaves every candidate's greedy text equal to the base head's
    srv = serve("openai", lambda n, t: Act("Verdict: B"))
    _, recs = _stage2(judges("openai", srv, swap=True), toy_reference, toy_pairs, tmp_path / "run", radius=1e-6)
    assert [r["oracle/identical_ties"] for r in recs] == [8, 8, 8]
    assert srv.count == 0 and all(r["oracle/calls"] == 0 and r["oracle/swap_disagreement"] is None for r in recs)
    assert all(r["n_minus"] == 0 and r["skipped"] for r in recs)  # ties are no votes


def test_the_acceptance_judge_reports_its_own_counters(serve, judges, toy_reference, toy_pairs, tmp_path):
    from compo.zo.run import step_diagnostics

    fair_srv, biased_srv = serve("openai", _by_hash), serve("openai", lambda n, t: Act("Verdict: A"))
    # gamma large enough that the accepted step changes the generated text
    run, recs = _stage2(judges("openai", fair_srv, swap=True), toy_reference, toy_pairs, tmp_path / "run",
                        judges("openai", biased_srv, swap=True), acceptance_check=True, gamma=5.0)
    asked = [r for r in recs if "accepted" in r]
    assert asked and all(r["accept_oracle/identical_ties"] + r["accept_oracle/swap_pairs"] == 1 for r in asked)
    assert all(r["accept_oracle/swap_disagreement"] == 1.0 for r in asked if r["accept_oracle/swap_pairs"])
    assert all(r["oracle/swap_disagreement"] == 0.0 for r in recs)  # each judge's counters stay its own
    totals = step_diagnostics(run)
    assert totals["accept_oracle/calls"] == biased_srv.count > 0 and totals["accept_oracle/swap_disagreement"] == 1.0
    assert totals["oracle/calls"] == fair_srv.count and totals["oracle/swap_disagreement"] == 0.0
