"""Stage 2 with a GenerationOracle: batched per-row-head generation, a judge-driven run, and a
judge server that dies halfway through the run."""

import copy
import warnings

import pytest
import torch

from compo.data import toy
from compo.config import ZOConfig
from compo.data.encode import encode_rows
from compo.scoring.models import untie_head
from compo.core.errors import Paused
from compo.core.rundir import RunDir, read_jsonl
from compo.zo.generate import GenerationSettings, HeadGenerator
from compo.zo.perturb import PerturbationSource
from compo.zo.trainer import ZOTrainer
from oracles import GenerationOracle, build_oracle
from oracles.judges import Judgement, JudgeCache, OpenAIJudge, PairwiseJudge
from fake_llm import Act, FakeLLM  # the local OpenAI-wire server of the judge tests


class ScoreJudge(PairwiseJudge):
    """Deterministic test judge: the response with the higher toy gold score wins (or, with
    sign=-1, the lower: the reference already speaks politely, so perturbed heads can only win
    against it on the way down)."""

    def __init__(self, sign: int = 1):
        self.sign = sign

    def judge(self, prompts, responses_a, responses_b):
        self._count("calls", len(prompts))
        out = []
        for a, b in zip(responses_a, responses_b):
            sa, sb = self.sign * toy.gold_score(a), self.sign * toy.gold_score(b)
            out.append(Judgement("A" if sa > sb else "B" if sb > sa else "tie"))
        return out


@pytest.fixture()
def setup(toy_reference, toy_pairs):
    model = copy.deepcopy(toy_reference[0])
    tok = toy_reference[1]
    enc = encode_rows(toy_pairs[0][:4], tok, 32, 16)
    return model, tok, enc.items, toy_pairs[0][:4]


@pytest.mark.parametrize("do_sample", [False, True])
def test_batched_candidate_generation_equals_one_at_a_time(setup, do_sample):
    model, tok, items, _ = setup
    untie_head(model)
    w = model.get_output_embeddings().weight.detach().float().clone()
    src = PerturbationSource(0, tuple(w.shape), 0.5)
    z = src.draw(3, range(5))
    s = src.scales(z)
    gen = HeadGenerator(model, tok, GenerationSettings(8, do_sample), seed=11)
    prompts = [it.prompt for it in items[:3]]
    batched = gen.generate(prompts, w, z, s, step=3, indices=list(range(5)))
    single = [gen.generate(prompts, w, z[i : i + 1], s[i : i + 1], step=3, indices=[i])[0] for i in range(5)]
    assert batched == single
    assert len({tuple(r) for r in batched}) > 1  # the heads really differ
    # the base head reproduces transformers' own greedy generation
    if not do_sample:
        base = gen.generate(prompts[:1], w)[0][0]
        ref = model.generate(torch.tensor([prompts[0]]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert base == tok.decode(ref[0, len(prompts[0]):], skip_special_tokens=True)


def test_generation_passes_the_cache_by_its_current_name(setup):
    """transformers 5 renamed a forward's ``past_key_values`` to ``cache``: the old name warns."""
    model, tok, items, _ = setup
    w = model.get_output_embeddings().weight.detach().float()
    gen = HeadGenerator(model, tok, GenerationSettings(4, False), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = gen.generate([items[0].prompt], w)
    assert out[0][0]


def _cfg(**kw):
    return ZOConfig(**{"m": 8, "radius": 0.05, "sparsity": "top_fraction", "rho": 0.05, "skip_threshold": 0.1,
                       "gamma": 0.5, "max_steps": 3, "checkpoint_every": 0, **kw})


def test_stage2_with_generation_oracle_completes(setup, tmp_path):
    model, tok, items, texts = setup
    oracle = GenerationOracle(ScoreJudge(-1), aggregation="any", max_new_tokens=6)
    tr = ZOTrainer(model, _cfg(radius=0.5), 0, oracle, pad_id=0, tokenizer=tok)
    w0 = tr.w.clone()
    run = RunDir(tmp_path)
    totals = tr.train(items, texts, run, progress=False)
    recs = [r for r in read_jsonl(run.metrics) if r["stage"] == "stage2"]
    assert totals["steps"] == 3 and len(recs) == 3
    assert all(r["oracle/calls"] == 8 for r in recs)  # one judge call per candidate and prompt
    assert totals["steps_taken"] > 0 and sum(r["n_minus"] for r in recs) > 0
    assert not torch.equal(tr.w, w0)
    polite = GenerationOracle(ScoreJudge(+1), max_new_tokens=6)  # the polite base beats every wild head
    rec = ZOTrainer(copy.deepcopy(model), _cfg(radius=0.5), 0, polite, 0, tokenizer=tok).step(0, items[:1], texts[:1])
    assert rec["n_minus"] == 0 and rec["skipped"]


def test_projected_estimator_is_refused_for_generation_oracles(setup):
    model, tok, *_ = setup
    with pytest.raises(ValueError, match="exact only for likelihood oracles"):
        ZOTrainer(model, _cfg(estimator="projected"), 0, GenerationOracle(ScoreJudge()), 0, tokenizer=tok)


def test_judge_server_dies_halfway(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPO_TEST_KEY", "sk-test-SECRET-123")
    model, tok, items, texts = setup
    srv = FakeLLM("openai", lambda n, t: Act(die=True) if n == 13 else Act("Verdict: B"))
    try:
        cache = tmp_path / "judge.sqlite"
        judge = OpenAIJudge("judge-model", base_url=srv.base_url, api_key_env="COMPO_TEST_KEY", cache_path=str(cache),
                            timeout=20, max_retries=1, retry_initial=0.01, retry_max_wait=0.02, max_concurrency=2)
        oracle = build_oracle("generation", judge=judge, max_new_tokens=4)
        run = RunDir(tmp_path / "run")
        totals = ZOTrainer(model, _cfg(), 0, oracle, pad_id=0, tokenizer=tok).train(items, texts, run, progress=False)
        assert totals["steps"] == 3  # the run finished
        recs = [r for r in read_jsonl(run.metrics) if r["stage"] == "stage2"]
        abstained = sum(r["oracle/abstentions"] for r in recs)
        ties = sum(r["oracle/identical_ties"] for r in recs)  # identical responses: a tie, never asked
        answered = 24 - abstained - ties
        assert abstained > 0 and sum(r["n_abstain"] for r in recs) == abstained + ties
        assert answered >= 12
        oracle.close()
        with JudgeCache(cache) as c:  # every answer the server gave before dying was kept
            assert len(c.rows()) == srv.count - 1 == len({r["key"] for r in c.rows()})
    finally:
        srv.stop()


class QuitAtCall(PairwiseJudge):
    """Answers 'B' until call ``n``, where the person quits (as HumanJudge does on 'q')."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def judge(self, prompts, responses_a, responses_b):
        from oracles.judges import JudgeQuit

        self.calls += 1
        if self.calls == self.n:
            raise JudgeQuit("quit by the user")
        return [Judgement("B") for _ in prompts]


def test_a_quit_stops_at_a_step_boundary_and_resume_continues(setup, tmp_path):
    model, tok, items, texts = setup
    run = RunDir(tmp_path)
    cfg = _cfg(radius=0.5, chunk_size=8)  # one judge call per step
    tr = ZOTrainer(model, cfg, 0, GenerationOracle(QuitAtCall(3), max_new_tokens=4), 0, tokenizer=tok)
    with pytest.raises(Paused, match="paused before step 3 of 3: quit by the user") as e:
        tr.train(items, texts, run, progress=False)
    totals = e.value.totals
    assert totals["steps"] == 2 and "stopped before step 3" in totals["stopped"]
    assert len([r for r in read_jsonl(run.metrics) if r["stage"] == "stage2"]) == 2
    from safetensors.torch import load_file

    saved = load_file(str(run.checkpoints / "zo" / "head.safetensors"))["weight"]
    assert torch.equal(saved, tr.w)  # the checkpoint holds the head of the last finished step
    tr2 = ZOTrainer(copy.deepcopy(model), cfg, 0, GenerationOracle(QuitAtCall(0), max_new_tokens=4), 0, tokenizer=tok)
    totals2 = tr2.train(items, texts, run, resume=True, progress=False)
    assert totals2["steps"] == 3 and "stopped" not in totals2
    steps = [r["step"] for r in read_jsonl(run.metrics) if r["stage"] == "stage2"]
    assert steps == [1, 2, 3]  # resumed at step 3, not restarted
