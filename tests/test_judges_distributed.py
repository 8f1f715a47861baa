"""Stage 2 with a generation oracle and an API judge across 2 gloo processes, against one process:
the same questions reach the judge (each distinct one asked once, by one rank, and cached once),
the same votes and a bit-identical head, a call budget that runs out at the same step; and the
sqlite cache taking answers from several processes at once."""

from __future__ import annotations

import collections
import copy
import hashlib
import os

import torch
import torch.distributed as dist

from compo.data import toy
from dist_run import start
from fake_llm import Act, FakeLLM, shown_texts

M, CHUNK, PAIRS, STEPS = 12, 3, 2, 3


def hashed_verdict(n: int, user_text: str) -> Act:
    """A deterministic judge with mixed verdicts: A, B or tie by a hash of the two responses
    shown (so a repeated question gets the same answer, whichever process asks it)."""
    digest = hashlib.sha256("\x00".join(shown_texts(user_text)).encode()).digest()[0] % 5
    return Act("Verdict: A" if digest < 2 else "Verdict: B" if digest < 4 else "Verdict: tie")


def quits_on_last_rank(after: int):
    """A local judge (hashed verdicts) whose person quits at its ``after``-th batch, on the last rank."""
    from oracles.judges import Judgement, JudgeQuit, PairwiseJudge

    class QuitLater(PairwiseJudge):
        def __init__(self):
            self.calls = 0

        def judge(self, prompts, responses_a, responses_b):
            self.calls += 1
            if self.calls == after and dist.get_rank() == dist.get_world_size() - 1:
                raise JudgeQuit("quit by the user")
            return [Judgement(hashed_verdict(0, f"[Response A]\n{a}\n\n[Response B]\n{b}\n\nExplain").text[9:])
                    for a, b in zip(responses_a, responses_b)]

    return QuitLater()


def _worker(rank: int, world: int, rdzv: str, model_dir: str, out: str, base_url: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compo.core import commstats
    from compo.config import ToyDataConfig, ZOConfig
    from compo.data.encode import encode_rows
    from compo.core.errors import Paused
    from compo.core.rundir import RunDir
    from compo.zo.trainer import ZOTrainer
    from oracles import GenerationOracle
    from oracles.judges import OpenAIJudge

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir)
        rows = toy.toy_dataset(ToyDataConfig(n_train=8, n_eval=1), seed=0)[0]
        items = encode_rows(rows, tok, 32, 16).items
        cfg = ZOConfig(m=M, chunk_size=CHUNK, pairs_per_step=PAIRS, radius=0.3, sparsity="top_fraction", rho=0.05,
                       skip_threshold=0.05, gamma=0.5, max_steps=STEPS, checkpoint_every=0, acceptance_check=True,
                       rng="torch")  # on torch's stream these settings take a step (asserted below)

        def run(name: str, max_calls: int | None, judge=None, accept: bool = True) -> dict:
            judge = judge or OpenAIJudge(f"{name}-w{world}", base_url=base_url, api_key_env=None, max_calls=max_calls,
                                         cache_path=os.path.join(out, f"{name}-w{world}.sqlite"), max_concurrency=2,
                                         timeout=20, max_retries=0)
            oracle = GenerationOracle(judge, max_new_tokens=4)
            got = {"votes": [], "collected": [], "asked": [], "calls": [], "bytes": [], "paused": None}
            settle, ask = oracle.settle, judge.judge

            def settle_and_keep(n, p, group=None):
                got["collected"].append([(q.slot, q.prompt, q.a, q.b) for q in oracle._questions])
                votes = settle(n, p, group)
                got["votes"].append(votes.tolist())
                return votes

            def ask_and_keep(prompts, a, b):
                got["asked"] += list(zip(prompts, a, b))
                return ask(prompts, a, b)

            oracle.settle, judge.judge = settle_and_keep, ask_and_keep
            tr = ZOTrainer(copy.deepcopy(model), cfg.model_copy(update={"acceptance_check": accept}), 3, oracle,
                           pad_id=0, tokenizer=tok)
            last = [commstats.total_bytes()]

            def keep(t: int, rec: dict) -> None:
                got["calls"].append(rec["oracle/calls"])
                got["bytes"].append((commstats.total_bytes() - last[0], "accepted" in rec))
                last[0] = commstats.total_bytes()

            try:
                tr.train(items, rows, RunDir(os.path.join(out, f"run-{name}-w{world}")), progress=False, callback=keep)
            except Paused as e:
                got["paused"], got["stopped"] = e.totals["steps"], e.totals["stopped"]
            finally:
                oracle.close()
            got["head"] = tr.w
            return got

        free = run("free", None)
        budget = sum(free["calls"][:2]) - 1  # one call short of step 2's
        limited = run("budget", budget)
        quit = run("quit", None, quits_on_last_rank(2), accept=False)  # its 2nd batch: step 2's
        torch.save({"free": free, "budget": budget, "limited": limited, "quit": quit},
                   os.path.join(out, f"w{world}-r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _requests(srv: FakeLLM, model: str) -> list[str]:
    return [b["messages"][-1]["content"] for b in srv.bodies if b["model"] == model]


def test_two_processes_ask_each_question_once_and_vote_as_one(tmp_path, toy_reference):
    from oracles.judges import JudgeCache

    model, tok = toy_reference
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    srv = FakeLLM("openai", hashed_verdict)
    try:
        for world in (1, 2):
            start(_worker, (world, str(tmp_path / f"rdzv{world}"), str(tmp_path / "model"), str(tmp_path),
                            srv.base_url), world)
    finally:
        srv.stop()
    one = torch.load(tmp_path / "w1-r0.pt", weights_only=False)
    two = [torch.load(tmp_path / f"w2-r{r}.pt", weights_only=False) for r in (0, 1)]

    # the same votes on every rank as on one process (some better, some not), the same head
    votes = one["free"]["votes"]
    assert len(votes) > STEPS and all(t["free"]["votes"] == votes for t in two)
    flat = [v for step in votes for v in step]
    assert flat.count(-1) > 0 and flat.count(1) > 0
    assert all(t["free"]["head"].numpy().tobytes() == one["free"]["head"].numpy().tobytes() for t in two)
    assert not torch.equal(one["free"]["head"], model.get_output_embeddings().weight.float())

    # the judge saw the same questions; each rank asked its own, none asked twice or by both
    asked = [collections.Counter(t["free"]["asked"]) for t in two]
    assert asked[0] + asked[1] == collections.Counter(one["free"]["asked"])
    assert not set(asked[0]) & set(asked[1])
    # ... although some questions came up in both ranks' candidates of a step
    shared = 0
    for mine, theirs in zip(two[0]["free"]["collected"], two[1]["free"]["collected"]):
        shared += len({q[1:] for q in mine if q[2] != q[3]} & {q[1:] for q in theirs if q[2] != q[3]})
    assert shared > 0
    for world in (1, 2):
        sent = _requests(srv, f"free-w{world}")
        assert len(sent) == len(set(sent)) == sum(one["free"]["calls"])
        with JudgeCache(tmp_path / f"free-w{world}.sqlite") as c:
            assert len(c) == len(sent)
    assert set(_requests(srv, "free-w1")) == set(_requests(srv, "free-w2"))
    assert all(t["free"]["calls"] == one["free"]["calls"] for t in two)  # logged counters are global

    # bytes per rank and step: digests (int64 per question) and verdicts + 4 flags/totals + the
    # judge's counters; the acceptance check likewise for its P questions; the refusal check
    from oracles.judges import OpenAIJudge
    from oracles.judges.base import STAT_KEYS

    k = len(STAT_KEYS) - 1 + len(OpenAIJudge.extra_stat_keys)
    settle = lambda n: 8 * n + 8 * (n + 4 + k)  # noqa: E731
    for t in two:
        assert [b for b, _ in t["free"]["bytes"]] == [settle(M * PAIRS) + 8 + (settle(PAIRS) if acc else 0)
                                                     for _, acc in t["free"]["bytes"]]
    assert one["free"]["bytes"] == [(0, acc) for _, acc in one["free"]["bytes"]]

    # a budget one call short of step 2 pauses both runs before step 2, having sent exactly it
    assert one["budget"] == two[0]["budget"] == two[1]["budget"]
    assert one["limited"]["paused"] == 1 and all(t["limited"]["paused"] == 1 for t in two)
    per_rank = [len(t["limited"]["asked"]) for t in two]
    assert max(per_rank) < one["budget"]  # a per-process budget would not have run out
    for world in (1, 2):
        assert len(_requests(srv, f"budget-w{world}")) == one["budget"]

    # a person quitting on one rank stops every rank at the same step boundary
    assert one["quit"]["paused"] == 1 and "quit by the user" in one["quit"]["stopped"]
    assert two[0]["quit"]["paused"] == two[1]["quit"]["paused"] == 1
    assert "stopped on another process" in two[0]["quit"]["stopped"] and "quit by the user" in two[1]["quit"]["stopped"]


def _cache_writer(rank: int, world: int, rdzv: str, folder: str, n: int) -> None:
    from oracles.judges import JudgeCache

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        for i in range(n):  # every process opens the same new file at the same moment
            dist.barrier()
            with JudgeCache(os.path.join(folder, f"new{i}.sqlite")) as c:
                c.put(f"r{rank}", kind="openai", model="m", raw="Verdict: B", verdict="B")
        with JudgeCache(os.path.join(folder, "shared.sqlite")) as c:  # then all write at once
            dist.barrier()
            for i in range(n):
                c.put(f"r{rank}-{i}", kind="openai", model="m", raw=f"Verdict: A {rank} {i}", verdict="A")
                assert c.get(f"r{rank}-{i}").raw == f"Verdict: A {rank} {i}"
    finally:
        dist.destroy_process_group()


def test_the_cache_takes_writes_from_several_processes(tmp_path):
    """Several ranks share one cache file (each writes the answers it paid for): opening a new
    file together and writing together loses nothing."""
    from oracles.judges import JudgeCache

    n = 30
    start(_cache_writer, (3, str(tmp_path / "rdzv"), str(tmp_path), n), 3)
    for i in range(n):
        with JudgeCache(tmp_path / f"new{i}.sqlite") as c:
            assert {r["key"] for r in c.rows()} == {"r0", "r1", "r2"}
    with JudgeCache(tmp_path / "shared.sqlite") as c:
        rows = c.rows()
    assert len(rows) == 3 * n and {r["key"] for r in rows} == {f"r{r}-{i}" for r in range(3) for i in range(n)}
