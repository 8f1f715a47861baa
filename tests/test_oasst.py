"""compo.data.oasst: OpenAssistant message trees -> ranked pairs and emoji thumbs rows (hand-written trees)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from compo.data.load import load_rows
from compo.data.encode import encode_rows
from compo.data.oasst import TreeError, is_tree, tree_pairs, tree_thumbs
from compo.data.rows import DataError, PairRow, UnpairedRow

REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "oasst-en_100_tree.jsonl"


def msg(mid: str, role: str, text: str, replies: list | None = None, **extra) -> dict:
    return {"message_id": mid, "role": role, "text": text, "lang": "en", "replies": replies or [], **extra}


def make_tree() -> dict:
    """Q1 has three ranked replies (one synthetic) and one unranked; A1 is followed up by Q2,
    which has two ranked replies with a synthetic prompter branch beside it."""
    q2 = msg("q2", "prompter", "And in summer?", [
        msg("b0", "assistant", "Wear a hat.", rank=0, emojis={"+1": 1, "-1": 3}),
        msg("b1", "assistant", "Stay inside.", rank=1),
    ])
    synthetic_q = msg("qs", "prompter", "Synthetic follow-up", [
        msg("c0", "assistant", "c0", rank=0), msg("c1", "assistant", "c1", rank=1)], synthetic=True)
    return {"message_tree_id": "t1", "tree_state": "ready_for_export", "prompt": msg("q1", "prompter", "How to stay warm?", [
        msg("a1", "assistant", "Wear a coat.", [q2, synthetic_q], rank=1, emojis={"+1": 3, "-1": 1, "_skip_reply": 2}),
        msg("a0", "assistant", "Layers and a hot drink.", rank=0, emojis={"+1": 2, "-1": 2}),
        msg("a2", "assistant", "Move south.", rank=2, synthetic=False, emojis={"red_flag": 1}),
        msg("as", "assistant", "SYNTHETIC", rank=3, synthetic=True, emojis={"+1": 9}),
        msg("au", "assistant", "Unranked.", emojis={"-1": 1}),
    ], synthetic=False, emojis={"+1": 5})}


Q1 = ({"role": "user", "content": "How to stay warm?"},)
Q2 = Q1 + ({"role": "assistant", "content": "Wear a coat."}, {"role": "user", "content": "And in summer?"})


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- pairs


def test_tree_pairs_exact():
    pairs = tree_pairs(make_tree(), "f.jsonl")
    got = [(p.prompt, p.chosen, p.rejected, p.source) for p in pairs]
    assert got == [
        (Q1, "Layers and a hot drink.", "Wear a coat.", "f.jsonl:tree=t1:msg=q1"),
        (Q1, "Layers and a hot drink.", "Move south.", "f.jsonl:tree=t1:msg=q1"),
        (Q1, "Wear a coat.", "Move south.", "f.jsonl:tree=t1:msg=q1"),
        (Q2, "Wear a hat.", "Stay inside.", "f.jsonl:tree=t1:msg=q2"),
    ]
    assert all(isinstance(p, PairRow) and p.conversational for p in pairs)
    assert isinstance(pairs[0].prompt, tuple)
    assert pairs[0].meta == {"format": "oasst-tree", "tree_id": "t1", "chosen_id": "a0", "rejected_id": "a1",
                             "chosen_rank": 0, "rejected_rank": 1}


def test_synthetic_messages_and_their_subtrees_are_dropped():
    texts = {t for p in tree_pairs(make_tree()) for t in (p.chosen, p.rejected)}
    texts |= {m["content"] for p in tree_pairs(make_tree()) for m in p.prompt}
    assert "SYNTHETIC" not in texts and "c0" not in texts and "Synthetic follow-up" not in texts
    root_synthetic = make_tree()
    root_synthetic["prompt"]["synthetic"] = True
    assert tree_pairs(root_synthetic) == [] and tree_thumbs(root_synthetic) == []
    deleted = make_tree()
    deleted["prompt"]["replies"][0]["deleted"] = True  # a1 and the Q2 branch below it go
    assert [(p.chosen, p.rejected) for p in tree_pairs(deleted)] == [("Layers and a hot drink.", "Move south.")]


def test_equal_ranks_and_fewer_than_two_ranked_replies_give_no_pairs():
    tree = {"message_tree_id": "t", "prompt": msg("q", "prompter", "Q", [
        msg("x", "assistant", "x", rank=0), msg("y", "assistant", "y", rank=0), msg("z", "assistant", "z")])}
    assert tree_pairs(tree) == []
    tree["prompt"]["replies"][1]["rank"] = 1
    assert [(p.chosen, p.rejected) for p in tree_pairs(tree)] == [("x", "y")]


# --------------------------------------------------------------------------- thumbs


def test_tree_thumbs_labels():
    rows = tree_thumbs(make_tree(), "f.jsonl")
    got = [(r.prompt, r.completion, r.label, r.source) for r in rows]
    assert got == [
        (Q1, "Wear a coat.", True, "f.jsonl:tree=t1:msg=a1"),  # 3 vs 1
        (Q2, "Wear a hat.", False, "f.jsonl:tree=t1:msg=b0"),  # 1 vs 3
        (Q1, "Unranked.", False, "f.jsonl:tree=t1:msg=au"),  # 0 vs 1
    ]  # a0 is a tie, a2 has no +1/-1, the synthetic reply and the prompter messages are skipped
    assert all(isinstance(r, UnpairedRow) for r in rows)
    assert rows[0].meta == {"format": "oasst-tree", "tree_id": "t1", "message_id": "a1", "+1": 3, "-1": 1}


# --------------------------------------------------------------------------- invalid trees


@pytest.mark.parametrize("edit, field, reason", [
    (lambda t: t.pop("message_tree_id"), None, None),  # not detected as a tree at all
    (lambda t: t["prompt"].update(role="assistant"), "prompt.role", "the root message must be prompter, got 'assistant'"),
    (lambda t: t["prompt"]["replies"][1].update(role="prompter"), "prompt.replies[1].role",
     "a reply to a prompter message must be assistant, got 'prompter'"),
    (lambda t: t["prompt"]["replies"][1].update(rank="first"), "prompt.replies[1].rank",
     "wrong type: expected a non-negative integer, got str 'first'"),
    (lambda t: t["prompt"]["replies"][0]["replies"][0].pop("text"), "prompt.replies[0].replies[0].text",
     "missing field or wrong type: expected a string, got NoneType None"),
    (lambda t: t["prompt"]["replies"][2].update(text="  "), "prompt.replies[2].text", "empty message text"),
    (lambda t: t["prompt"]["replies"][0].update(emojis={"+1": -2}), "prompt.replies[0].emojis.+1",
     "wrong type: expected a non-negative integer"),
    (lambda t: t["prompt"].update(replies={"a": 1}), "prompt.replies", "wrong type: expected a list of messages"),
    (lambda t: t["prompt"]["replies"][3].update(synthetic="yes"), "prompt.replies[3].synthetic",
     "wrong type: expected a boolean"),
    (lambda t: t["prompt"]["replies"][3].update(role="robot"), "prompt.replies[3].role",
     "expected 'prompter' or 'assistant'"),  # synthetic messages are still validated
])
def test_invalid_tree_is_a_one_line_error_naming_file_row_and_field(tmp_path, edit, field, reason):
    bad = make_tree()
    edit(bad)
    path = write_jsonl(tmp_path / "trees.jsonl", [make_tree(), bad])
    with pytest.raises(DataError) as exc:
        load_rows(path, kind="paired")
    text = str(exc.value)
    assert "\n" not in text and exc.value.file == path and exc.value.row == 2
    if field is None:
        assert text.startswith(f"{path}, row 2: not an OpenAssistant message tree")
    else:
        assert text.startswith(f"{path}, row 2, field '{field}': {reason}"), text
        with pytest.raises(TreeError):
            tree_pairs(bad)
    res = load_rows(path, kind="paired", on_invalid="skip")
    assert len(res.rows) == 4 and res.skipped == {"invalid tree": 1}
    assert list(res.skipped) == [exc.value.category]


def test_trees_without_usable_rows_are_an_error(tmp_path):
    tree = {"message_tree_id": "t", "prompt": msg("q", "prompter", "Q", [msg("x", "assistant", "x")])}
    path = write_jsonl(tmp_path / "empty.jsonl", [tree])
    with pytest.raises(DataError, match=r"empty\.jsonl: no valid rows: the OpenAssistant trees hold no ranked"):
        load_rows(path, kind="paired")
    with pytest.raises(DataError, match=r"no valid rows: the OpenAssistant trees hold no assistant messages"):
        load_rows(path, kind="unpaired")


def test_is_tree_detection():
    assert is_tree(make_tree())
    assert not is_tree({"prompt": "Q", "chosen": "a", "rejected": "b", "message_tree_id": "t"})
    assert not is_tree({"message_tree_id": "t", "prompt": "a string"})
    assert not is_tree([make_tree()])


# --------------------------------------------------------------------------- load_rows end to end


def test_load_rows_on_a_tree_file(tmp_path, toy_tokenizer):
    other = copy.deepcopy(make_tree())
    other["message_tree_id"] = "t2"
    path = write_jsonl(tmp_path / "trees.jsonl", [make_tree(), other])
    paired = load_rows(path, kind="paired")
    assert (paired.kind, paired.n_skipped, paired.formats) == ("paired", 0, {"oasst-tree": 8})
    assert paired.rows[0].source == f"{path}:tree=t1:msg=q1" and paired.rows[4].source == f"{path}:tree=t2:msg=q1"
    assert [(r.prompt, r.chosen, r.rejected) for r in paired.rows[:4]] == [
        (p.prompt, p.chosen, p.rejected) for p in tree_pairs(make_tree())]
    assert load_rows(path).kind == "paired"  # auto means paired for trees
    unpaired = load_rows(path, kind="unpaired")
    assert unpaired.kind == "unpaired" and [r.label for r in unpaired.rows] == [True, False, False] * 2
    enc = encode_rows(paired.rows, toy_tokenizer, max_length=64, max_prompt_length=32)
    assert len(enc.items) == 8 and all(len(e.completions) == 2 for e in enc.items)


@pytest.mark.skipif(not REAL.exists(), reason="../shared/data is not present")
def test_real_oasst_file():
    paired = load_rows(str(REAL), kind="paired")
    assert len(paired.rows) > 0 and paired.n_skipped == 0
    assert all(p.prompt[-1]["role"] == "user" and p.chosen != p.rejected for p in paired.rows)
    assert all(p.meta["chosen_rank"] < p.meta["rejected_rank"] for p in paired.rows)
    unpaired = load_rows(str(REAL), kind="unpaired")
    labels = {r.label for r in unpaired.rows}
    assert labels == {True, False}
