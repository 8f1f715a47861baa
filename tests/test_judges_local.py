"""Local judges (reward model, human), prompts and verdict parsing, the cache and the registry."""

from __future__ import annotations

import io
import json
import sqlite3
import sys
import threading
from pathlib import Path

import pytest
import torch

from oracles.judges import (
    DEFAULT_TEMPLATE,
    STAT_KEYS,
    HumanJudge,
    JudgeCache,
    Judgement,
    JudgeError,
    JudgeQuit,
    PairwiseJudge,
    RewardModelJudge,
    available_judges,
    build_judge,
    combine_swapped,
    load_template,
    parse_verdict,
    render,
    request_key,
    resolve_template,
    run_totals,
    totals_line,
)
from oracles.judges.budget import Budget
from oracles.judges.human import pair_key

TESTS = Path(__file__).parent


# -- verdict parsing and templates ---------------------------------------------------------

@pytest.mark.parametrize(
    "text, want",
    [
        ("Reasoning...\nVerdict: A", "A"),
        ("Verdict: B", "B"),
        ("Verdict: tie", "tie"),
        ("verdict: Tie.", "tie"),
        ("**Verdict:** A", "A"),
        ("**Verdict**: Response B", "B"),
        ("Final verdict: [[A]]", "A"),
        ("Verdict: a tie", "tie"),
        ("Verdict: It's a tie", "tie"),
        ("Verdict: both are equally good", "tie"),
        ("Verdict: A is clearly better", "A"),
        ("Verdict:\nB", "B"),
        ("The winner: Assistant A", "A"),
        ("Verdict: A\n(after more thought)\nVerdict: B", "B"),
        ("<think>Verdict: B</think>\nVerdict: A", "A"),
        ("B", "B"),
        ("Response A.", "A"),
        ("[[B]]", "B"),
        ("My final answer is [[C]]", "tie"),
        ("Verdict: A or B", "abstain"),
        ("Verdict: A and B are equally good", "abstain"),
        ("Answer with Verdict: A, Verdict: B or Verdict: tie", "abstain"),
        ("[[A]] or [[B]]", "abstain"),
        ("I cannot decide.", "abstain"),
        ("A good point is made by B", "abstain"),
        ("Verdict: none of them", "abstain"),
        ("Verdict:", "abstain"),
        ("", "abstain"),
        (None, "abstain"),
        ("\x00\ufffd" * 1000, "abstain"),
    ],
)
def test_parse_verdict(text, want):
    assert parse_verdict(text) == want


def test_templates(tmp_path):
    assert resolve_template(None) == DEFAULT_TEMPLATE
    text = render(DEFAULT_TEMPLATE, "P {x}", "first {response_b}", "second }{")
    assert "P {x}" in text and "first {response_b}" in text and "second }{" in text  # no re-formatting
    assert text.rstrip().endswith("Verdict: tie")
    custom = "Q: {prompt}\n1: {response_a}\n2: {response_b}\nJSON like {{\"a\": 1}}. Verdict: A/B/tie"
    f = tmp_path / "judge.txt"
    f.write_text(custom)
    assert load_template(f) == custom == resolve_template(str(f)) == resolve_template(f)
    assert render(custom, "p", "a", "b").startswith("Q: p\n1: a\n2: b\nJSON like {\"a\": 1}")
    with pytest.raises(ValueError, match="unknown fields"):
        resolve_template("{prompt} {response_a} {response_b} {extra}")
    with pytest.raises(ValueError, match="lacks"):
        resolve_template("{prompt} {response_a}")
    with pytest.raises(ValueError, match="literal braces"):
        resolve_template("{prompt} {response_a} {response_b} {")
    with pytest.raises(FileNotFoundError):
        resolve_template(str(tmp_path / "missing.txt"))


# -- base, cache -----------------------------------------------------------------------------

def test_judgement_and_swap_combination():
    with pytest.raises(ValueError):
        Judgement("C")
    assert combine_swapped("A", "A") == "A" and combine_swapped("B", "B") == "B"
    assert combine_swapped("A", "B") == "tie" and combine_swapped("tie", "A") == "tie"
    assert combine_swapped("A", "abstain") == "abstain" and combine_swapped("abstain", "abstain") == "abstain"


def test_request_key_covers_what_the_judge_sees():
    base = dict(kind="openai", model="m", template="T", prompt="p", first="a", second="b", params={"t": 0})
    k = request_key(**base)
    assert k == request_key(**base)
    for field, value in [("kind", "anthropic"), ("model", "m2"), ("template", "T2"), ("prompt", "p2"), ("params", {"t": 1})]:
        assert request_key(**{**base, field: value}) != k
    assert request_key(**{**base, "first": "b", "second": "a"}) != k  # the order shown is part of the key


def test_cache_persists_across_reopen_and_threads(tmp_path):
    path = tmp_path / "sub" / "cache.sqlite"
    with JudgeCache(path) as c:
        c.put("k1", kind="openai", model="m", raw="Verdict: A", verdict="A", input_tokens=3, output_tokens=2)

        def write(i):
            c.put(f"t{i}", kind="openai", model="m", raw=f"r{i}", verdict="B")

        threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(c) == 9
    with JudgeCache(path) as c:
        hit = c.get("k1")
        assert (hit.raw, hit.verdict, hit.input_tokens, hit.output_tokens) == ("Verdict: A", "A", 3, 2)
        assert c.get("nope") is None and "t3" in c
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    mem = JudgeCache(None)
    mem.put("x", kind="k", model="m", raw="r", verdict="tie")
    assert mem.get("x").verdict == "tie"
    mem.close()
    with pytest.raises(RuntimeError):
        mem.get("x")


def test_budget_counts_calls_tokens_and_refusals():
    b = Budget(max_calls=2, max_tokens_total=None)
    assert [b.reserve() for _ in range(4)] == [True, True, False, False]
    assert b.exhausted and b.refusals == 2 and b.spent() == {"calls": 2, "tokens": 0}
    b.reset()
    assert not b.exhausted and b.refusals == 2 and b.reserve()  # refusals are never reset
    t = Budget(max_tokens_total=10)
    assert t.reserve() and t.reserve()  # two requests in flight
    t.charge(6)
    assert not t.exhausted
    t.charge(6)  # the second reply crosses the limit: it still counts
    assert t.exhausted and t.spent() == {"calls": 2, "tokens": 12} and not t.reserve()
    with pytest.raises(ValueError, match="max_calls"):
        Budget(max_calls=-1)


def test_run_totals_sum_the_step_counters_and_rate_the_position_bias():
    recs = [
        {"oracle/calls": 4, "oracle/identical_ties": 1, "oracle/swap_pairs": 2, "oracle/swap_disagreements": 1,
         "oracle/swap_disagreement": 0.5, "oracle/budget_exhausted": False},
        {"oracle/calls": 0, "oracle/identical_ties": 3, "oracle/swap_pairs": 0, "oracle/swap_disagreements": 0,
         "oracle/swap_disagreement": None},
        {"oracle/calls": 6, "oracle/swap_pairs": 3, "oracle/swap_disagreements": 3, "oracle/cache_hits": 2},
        {"step": 4},
    ]
    t = run_totals(recs)
    assert t == {"oracle/calls": 10, "oracle/identical_ties": 4, "oracle/swap_pairs": 5,
                 "oracle/swap_disagreements": 4, "oracle/cache_hits": 2, "oracle/swap_disagreement": 0.8}
    assert run_totals(recs, "accept_oracle/") == {} and totals_line(t, "accept_oracle/") is None
    assert totals_line(t) == ("judge (oracle): 10 requests, 2 cache hits, 0 abstentions, 4 identical-response ties; "
                              "position bias: the two orders disagree on 0.800 of 5 pairs")
    no_swap = run_totals([{"oracle/calls": 3, "oracle/swap_pairs": 0, "oracle/length_overruns": 2}])
    assert "oracle/swap_disagreement" not in no_swap
    assert totals_line(no_swap).endswith("; 2 replies longer than max_output_tokens (see docs/judges.md)")


# -- registry ----------------------------------------------------------------------------------

def test_registered_names():
    assert {"openai", "anthropic", "reward_model", "human"} <= set(available_judges())


def test_build_judge_module_class(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    judge = build_judge("judge_custom:ConstantJudge", verdict="B")
    assert isinstance(judge, PairwiseJudge)
    assert [j.verdict for j in judge.judge(["p", "q"], ["a", "a"], ["b", "b"])] == ["B", "B"]
    stats = judge.stats()
    assert set(STAT_KEYS) <= set(stats) and stats["calls"] == 2 and stats["budget_exhausted"] is False
    assert judge.stats()["calls"] == 0
    with pytest.raises(TypeError, match="not a PairwiseJudge"):
        build_judge("judge_custom:NotAJudge")
    with pytest.raises(ValueError, match="unknown name"):
        build_judge("no-such-judge")
    with pytest.raises(ValueError, match="cannot import"):
        build_judge("no_such_module_xyz:Judge")


def test_build_judge_entry_point(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(TESTS))
    dist = tmp_path / "compo_judge_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: compo-judge-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[compo.judges]\nconstant-plugin = judge_custom:ConstantJudge\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "constant-plugin" in available_judges()
    judge = build_judge("constant-plugin", verdict="tie")
    assert type(judge).__name__ == "ConstantJudge"
    assert judge.judge(["p"], ["a"], ["b"])[0].verdict == "tie"


# -- reward model ------------------------------------------------------------------------------

WORDS = ["[PAD]", "[UNK]", "[BOS]", "user", "assistant", "system", ":", "this", "is", "answer", "prompt",
         "great", "awful", "good", "ok", "fine", "meh"]
QUALITY = {"great": 2.0, "awful": -2.0, "good": 0.5}


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]")


def make_reward_model():
    """A Llama whose score is a monotone function of the last token's 'quality' feature.

    All linear layers are zero (attention and MLP add nothing), so the final hidden state
    is the last token's embedding [quality, 1, 0, ...] after an RMSNorm, and the score head
    reads feature 0: score = quality * sqrt(H / (quality^2 + 1)).
    """
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, num_labels=1, pad_token_id=0,
    )
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if "norm" in name else 0.0)
        emb = model.model.embed_tokens.weight
        emb[:, 1] = 1.0
        for w, q in QUALITY.items():
            emb[WORDS.index(w), 0] = q
        model.score.weight[0, 0] = 1.0
    return model.eval()


def expected_score(word: str) -> float:
    q = QUALITY.get(word, 0.0)
    return q * (8 / (q * q + 1)) ** 0.5


def test_reward_model_judge_verdicts():
    judge = RewardModelJudge(make_reward_model(), make_tokenizer(), batch_size=2)
    prompts = ["prompt", "prompt is this", "prompt", "prompt", "prompt"]
    a = ["this is great", "this is awful", "this is ok", "ok", "this is good"]
    b = ["this is awful", "great", "this is fine", "this is fine meh", "ok"]
    out = judge.judge(prompts, a, b)
    assert [o.verdict for o in out] == ["A", "B", "tie", "tie", "A"]
    diff = expected_score("great") - expected_score("awful")
    assert out[0].prob_a == pytest.approx(torch.sigmoid(torch.tensor(diff)).item(), rel=1e-4)
    assert out[2].prob_a == pytest.approx(0.5)
    assert out[1].prob_a < 0.5
    # batched scores match one-at-a-time scores (padding does not leak into the score)
    batched = judge.score(prompts + prompts, a + b)
    single = torch.cat([judge.score([p], [r]) for p, r in zip(prompts + prompts, a + b)])
    assert torch.allclose(batched, single, atol=1e-5)
    assert batched[0].item() == pytest.approx(expected_score("great"), rel=1e-3)
    s = judge.stats()
    assert s["calls"] == 5 and s["abstentions"] == 0 and s["budget_exhausted"] is False
    # a tie margin turns small differences into ties
    wide = RewardModelJudge(make_reward_model(), make_tokenizer(), tie_margin=2.0)
    assert [o.verdict for o in wide.judge(prompts, a, b)] == ["A", "B", "tie", "tie", "tie"]


def test_reward_model_chat_template_truncation_and_loading(tmp_path):
    tok = make_tokenizer()
    model = make_reward_model()
    plain = RewardModelJudge(model, tok)
    assert WORDS.index("assistant") not in plain._encode("prompt", "great")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
    chat = RewardModelJudge(model, tok)
    ids = chat._encode("prompt", "this is great")
    assert ids[:3] == [WORDS.index("user"), WORDS.index(":"), WORDS.index("prompt")]
    assert WORDS.index("assistant") in ids and ids[-1] == WORDS.index("great")
    assert chat.judge(["prompt"], ["great"], ["awful"])[0].verdict == "A"
    # over-long inputs lose their start, never the end of the response
    short = RewardModelJudge(model, tok, max_length=4)
    ids = short._encode("prompt " * 50, "this is awful")
    assert len(ids) == 4 and ids[-1] == WORDS.index("awful")
    assert short.judge(["prompt " * 50], ["this is awful"], ["this is great"])[0].verdict == "B"
    # from a saved directory, by path and by registered name
    model.save_pretrained(tmp_path / "rm")
    make_tokenizer().save_pretrained(tmp_path / "rm")
    loaded = build_judge("reward_model", model=str(tmp_path / "rm"), device="cpu")
    assert isinstance(loaded, RewardModelJudge)
    assert [o.verdict for o in loaded.judge(["prompt"] * 2, ["great", "ok"], ["awful", "great"])] == ["A", "B"]
    with pytest.raises(ValueError, match="tokenizer"):
        RewardModelJudge(model)


# -- human ---------------------------------------------------------------------------------------

class ScreenReader:
    """A scripted human: reads the screen and prefers the response containing 'good'."""

    def __init__(self, output: io.StringIO, extra: list[str] | None = None):
        self.output, self.pos, self.asked, self.extra = output, 0, 0, list(extra or [])

    def __call__(self, question: str) -> str:
        self.asked += 1
        if self.extra:
            return self.extra.pop(0)
        screen = self.output.getvalue()[self.pos:]
        self.pos = len(self.output.getvalue())
        lines = screen.splitlines()
        header = next(i for i, ln in enumerate(lines) if ln.startswith("[A]") and " | " in ln)
        left = " ".join(ln.split(" | ")[0] for ln in lines[header + 2:] if " | " in ln)
        right = " ".join(ln.split(" | ")[1] for ln in lines[header + 2:] if " | " in ln)
        if "good" in left and "good" not in right:
            return "a"
        if "good" in right and "good" not in left:
            return "B"
        return "tie"


def _never(question):
    raise AssertionError("a recorded answer must not be asked again")


def test_human_judge_records_and_resumes(tmp_path):
    path = tmp_path / "human.jsonl"
    out = io.StringIO()
    reader = ScreenReader(out)
    judge = HumanJudge(path, input_fn=reader, output=out, seed=3, width=100)
    prompts = [f"question number {i}" for i in range(8)]
    a = [("a good long answer " * 6) if i % 2 == 0 else "plain answer" for i in range(8)]
    b = ["plain answer" if i % 2 == 0 else "a good answer" for i in range(8)]
    b[7] = a[7] = "same answer"  # two copies of one text: a tie, never put to the person
    verdicts = [j.verdict for j in judge.judge(prompts, a, b)]
    assert verdicts == ["A", "B", "A", "B", "A", "B", "A", "tie"]
    assert reader.asked == 7 and "question number 7" not in out.getvalue()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["verdict"] for r in records] == verdicts[:7]  # the identical pair is not recorded
    assert {r["shown_swapped"] for r in records} == {True, False}  # the seeded shuffle did shuffle
    assert all(r["key"] == pair_key(p, x, y) for r, p, x, y in zip(records, prompts, a, b))
    assert " | " in out.getvalue() and "question number 0" in out.getvalue()
    s = judge.stats()
    assert (s["calls"], s["cache_hits"], s["abstentions"], s["identical_ties"]) == (7, 0, 0, 1)

    # a new judge on the same file answers from the record without asking
    again = HumanJudge(path, input_fn=_never, output=io.StringIO(), seed=3)
    assert [j.verdict for j in again.judge(prompts, a, b)] == verdicts
    s = again.stats()
    assert (s["calls"], s["cache_hits"], s["identical_ties"]) == (0, 7, 1)
    # the same pair with the responses the other way round is reused, labels flipped
    assert again.judge(prompts[:2], b[:2], a[:2])[0].verdict == "B"


def test_human_judge_skip_tie_quit_and_bad_input(tmp_path, capsys, monkeypatch):
    path = tmp_path / "human.jsonl"
    out = io.StringIO()
    answers = iter(["what?", "", "SKIP", "Tie", "q"])
    judge = HumanJudge(path, input_fn=lambda q: next(answers), output=out, width=40)  # narrow: stacked
    prompts, a, b = ["p1", "p2", "p3"], ["x1", "x2", "x3"], ["y1", "y2", "y3"]
    with pytest.raises(JudgeQuit):
        judge.judge(prompts, a, b)
    assert "Please answer" in out.getvalue() and " | " not in out.getvalue()
    assert [json.loads(line)["verdict"] for line in path.read_text().splitlines()] == ["abstain", "tie"]
    s = judge.stats()
    assert (s["calls"], s["abstentions"]) == (2, 0)  # the quit returned no judgement to abstain with

    # resume: only the third pair is asked; the file tolerates a torn last line
    from compo.core import progress

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(progress._settings, "level", progress.QUIET)
    with open(path, "a") as f:
        f.write('{"key": "torn", "verd')
    asked = []
    capsys.readouterr()
    resumed = HumanJudge(path, input_fn=lambda q: asked.append(q) or "right", output=io.StringIO())
    assert capsys.readouterr().out == f"warning: human judge: ignored 1 unreadable line(s) in {path}\n"
    out3 = resumed.judge(prompts, a, b)
    assert [j.verdict for j in out3[:2]] == ["abstain", "tie"] and out3[2].verdict in ("A", "B")
    assert len(asked) == 1
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1])["verdict"] == out3[2].verdict  # appended on its own line

    # end of input stops cleanly too
    def eof(q):
        raise EOFError

    with pytest.raises(JudgeQuit):
        HumanJudge(tmp_path / "other.jsonl", input_fn=eof, output=io.StringIO()).judge(["p"], ["a"], ["b"])
    with pytest.raises(JudgeError):
        HumanJudge(tmp_path / "bad.jsonl", input_fn=lambda q: "?", output=io.StringIO(), max_bad_answers=3).judge(
            ["p"], ["a"], ["b"]
        )


def test_human_judge_reads_stdin(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("tie\n"))
    judge = build_judge("human", record_path=tmp_path / "h.jsonl", output=io.StringIO())
    assert judge.judge(["p"], ["a"], ["b"])[0].verdict == "tie"


def test_human_judge_budget_refuses_and_a_resume_asks_only_the_rest(tmp_path):
    path, asked, out = tmp_path / "h.jsonl", [], io.StringIO()
    judge = HumanJudge(path, input_fn=lambda q: asked.append(q) or "t", output=out, max_calls=2)
    batch = (["p1", "p2", "p1", "p3", "p4"], ["a"] * 4 + ["x"], ["b"] * 4 + ["x"])
    verdicts = [j.verdict for j in judge.judge(*batch)]
    assert verdicts == ["tie", "tie", "tie", "abstain", "tie"]  # a repeated or identical pair costs no budget
    assert len(asked) == 2 and "budget: 1/2 answers used" in out.getvalue()
    assert judge.budget_exhausted and judge.budget_refusals == 1
    s = judge.stats()
    assert (s["calls"], s["cache_hits"], s["abstentions"], s["identical_ties"], s["budget_exhausted"]) == (
        2, 1, 1, 1, True)
    assert len(path.read_text().splitlines()) == 2  # refused pairs are not recorded
    again = HumanJudge(path, input_fn=lambda q: asked.append(q) or "a", output=io.StringIO(), max_calls=1)
    assert [j.verdict for j in again.judge(["p1", "p3"], ["a"] * 2, ["b"] * 2)][0] == "tie"
    assert len(asked) == 3 and again.budget_refusals == 0
    with pytest.raises(ValueError, match="max_calls"):
        HumanJudge(path, max_calls=-1)


def test_the_guide_documents_every_judge_option():
    import inspect
    import re

    from oracles.judges import AnthropicJudge, APIJudge, OpenAIJudge
    from oracles.judges.human_web import WebHumanJudge

    guide = (TESTS.parent / "docs" / "judges.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([a-z_]+)`", guide))
    for cls in (OpenAIJudge, AnthropicJudge, APIJudge, RewardModelJudge, HumanJudge, WebHumanJudge):
        params = {n for n, p in inspect.signature(cls).parameters.items() if p.kind is not p.VAR_KEYWORD}
        assert params and params <= documented, (cls.__name__, sorted(params - documented))
