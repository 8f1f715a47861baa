"""compo.data.load: reading every file type and normalising every supported format (tiny in-test files)."""

from __future__ import annotations

import csv
import gzip
import json

import pytest

from compo.data import readers as cdata
from compo.data.load import LoadResult, load_rows, normalise_records, pairs_to_unpaired, read_records
from compo.data.rows import DataError, PairRow, UnpairedRow

HH_PROMPT = "\n\nHuman: Hi\n\nAssistant: Hello, how can I help?\n\nHuman: Tell me a joke\n\nAssistant:"
CONV_PROMPT = (
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello, how can I help?"},
    {"role": "user", "content": "Tell me a joke"},
)
CHOSEN, REJECTED = "Why did the chicken cross the road?", "No."


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return str(path)


def triple(row: PairRow):
    return row.prompt, row.chosen, row.rejected


def sharegpt(msgs):
    frm = {"user": "human", "assistant": "gpt", "system": "system"}
    return [{"from": frm[m["role"]], "value": m["content"]} for m in msgs]


# --------------------------------------------------------------------------- paired formats


def test_same_pair_in_every_paired_format_normalises_equally(tmp_path):
    a_c = {"role": "assistant", "content": CHOSEN}
    a_r = {"role": "assistant", "content": REJECTED}
    conv = list(CONV_PROMPT)
    records = {
        "standard_text": {"prompt": HH_PROMPT, "chosen": " " + CHOSEN, "rejected": " " + REJECTED},
        "hh": {"chosen": HH_PROMPT + " " + CHOSEN, "rejected": HH_PROMPT + " " + REJECTED},
        "conversational": {"prompt": conv, "chosen": [a_c], "rejected": [a_r]},
        "conv_full": {"prompt": conv, "chosen": conv + [a_c], "rejected": conv + [a_r]},
        "implicit_conv": {"chosen": conv + [a_c], "rejected": conv + [a_r]},
        "sharegpt": {"conversations": sharegpt(conv), "chosen": {"from": "gpt", "value": CHOSEN},
                     "rejected": {"from": "gpt", "value": REJECTED}},
        "lf_openai": {"messages": conv, "chosen": a_c, "rejected": a_r},
    }
    out = {}
    for name, rec in records.items():
        res = load_rows(write_jsonl(tmp_path / f"{name}.jsonl", [rec]))
        assert res.kind == "paired" and res.n_skipped == 0 and len(res.rows) == 1
        out[name] = res.rows[0]
    # text-prompt formats agree, leading space of the completion kept
    assert triple(out["hh"]) == triple(out["standard_text"]) == (HH_PROMPT, " " + CHOSEN, " " + REJECTED)
    assert not out["hh"].conversational
    # all conversational formats agree
    for name in ("conv_full", "implicit_conv", "sharegpt", "lf_openai"):
        assert triple(out[name]) == triple(out["conversational"]) == (CONV_PROMPT, CHOSEN, REJECTED), name
        assert out[name].conversational
    # the completions agree across text and conversational forms up to the leading space
    assert out["hh"].chosen.strip() == out["sharegpt"].chosen
    assert out["hh"].meta["format"] == "hh-rlhf" and out["sharegpt"].meta["format"] == "sharegpt"
    assert out["standard_text"].source == str(tmp_path / "standard_text.jsonl") + ":1"


def test_sharegpt_system_key_becomes_system_message(tmp_path):
    rec = {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}],
           "chosen": {"from": "gpt", "value": "Hello"}, "rejected": {"from": "gpt", "value": "Go away"}}
    row = load_rows(write_json(tmp_path / "d.json", [rec])).rows[0]
    assert row.prompt == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"})
    assert (row.chosen, row.rejected) == ("Hello", "Go away")


def test_hh_reply_containing_assistant_marker_uses_shared_prompt():
    p = "\n\nHuman: Q?\n\nAssistant:"
    rec = {"chosen": p + " A.\n\nHuman: more\n\nAssistant: B.", "rejected": p + " C."}
    row = normalise_records([rec], "f").rows[0]
    assert row.prompt == p
    assert row.chosen == " A.\n\nHuman: more\n\nAssistant: B." and row.rejected == " C."


def test_extra_columns_kept_in_meta():
    rec = {"prompt": "p", "chosen": "a", "rejected": "b", "id": 7, "unused": None}
    row = normalise_records([rec], "f").rows[0]
    assert row.meta == {"format": "standard", "extra": {"id": 7}}


# --------------------------------------------------------------------------- unpaired formats


def test_same_example_in_every_unpaired_format_normalises_equally(tmp_path):
    conv = list(CONV_PROMPT)
    a = {"role": "assistant", "content": CHOSEN}
    records = {
        "prompt_completion": {"prompt": conv, "completion": [a], "label": True},
        "messages": {"messages": conv + [a], "label": True},
        "kto_sharegpt": {"conversations": sharegpt(conv + [a]), "label": "true"},
        "likert": {"messages": conv + [a], "rating": 5},
    }
    for name, rec in records.items():
        res = load_rows(write_json(tmp_path / f"{name}.json", [rec]))
        assert res.kind == "unpaired" and len(res.rows) == 1, name
        row = res.rows[0]
        assert (row.prompt, row.completion, row.label) == (CONV_PROMPT, CHOSEN, True), name
    text = normalise_records([{"prompt": "Q", "completion": " A", "label": False}], "f").rows[0]
    assert (text.prompt, text.completion, text.label, text.source) == ("Q", " A", False, "f:1")


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), ("true", True), ("FALSE", False),
                                            (1, True), (0, False), ("1", True), ("0", False)])
def test_label_forms(value, expected):
    row = normalise_records([{"prompt": "p", "completion": "c", "label": value}], "f").rows[0]
    assert row.label is expected


def test_likert_threshold():
    recs = [{"prompt": f"p{r}", "completion": "c", "rating": r} for r in (1, 3, 4, 5)] + \
           [{"prompt": "p", "completion": "c", "rating": "3.5"}]
    default = normalise_records(recs, "f")
    assert [r.label for r in default.rows] == [False, False, True, True, False]
    assert [r.meta["rating"] for r in default.rows] == [1.0, 3.0, 4.0, 5.0, 3.5]
    assert default.formats == {"prompt-completion+rating": 5}
    lower = normalise_records(recs, "f", rating_threshold=3.0)
    assert [r.label for r in lower.rows] == [False, True, True, True, True]


# --------------------------------------------------------------------------- file types

PAIRS = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]


def _expected_pairs(name):
    return [PairRow(f"Q{i}", f"good {i}", f"bad {i}", f"{name}:{i + 1}") for i in range(3)]


def test_every_file_type_reads_the_same_rows(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = [
        write_json(tmp_path / "list.json", PAIRS),
        write_json(tmp_path / "wrapped.json", {"data": PAIRS}),
        write_json(tmp_path / "train.json", {"train": PAIRS, "info": "x"}),
        write_jsonl(tmp_path / "lines.jsonl", PAIRS),
    ]
    with gzip.open(tmp_path / "lines.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in PAIRS) + "\n\n")
    paths.append(str(tmp_path / "lines.jsonl.gz"))
    with gzip.open(tmp_path / "list.json.gz", "wt", encoding="utf-8") as f:
        json.dump(PAIRS, f)
    paths.append(str(tmp_path / "list.json.gz"))
    pq.write_table(pa.Table.from_pylist(PAIRS), tmp_path / "t.parquet")
    paths.append(str(tmp_path / "t.parquet"))
    with open(tmp_path / "t.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(PAIRS)
    paths.append(str(tmp_path / "t.csv"))
    (tmp_path / "jsonl_named.json").write_text("\n".join(json.dumps(r) for r in PAIRS))
    paths.append(str(tmp_path / "jsonl_named.json"))
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "ds"))
    paths.append(str(tmp_path / "ds"))

    for p in paths:
        res = load_rows(p)
        assert isinstance(res, LoadResult)
        assert (res.kind, res.n_skipped, res.skipped, res.source) == ("paired", 0, {}, p), p
        assert res.rows == _expected_pairs(p), p


def test_datasetdict_dir_takes_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS[:1]),
                               "test": datasets.Dataset.from_list(PAIRS)})
    dd.save_to_disk(str(tmp_path / "dd"))
    res = load_rows(str(tmp_path / "dd"), split="test")
    name = f"{tmp_path / 'dd'}[test]"
    assert res.source == name and res.rows == _expected_pairs(name)
    assert len(load_rows(str(tmp_path / "dd")).rows) == 1
    with pytest.raises(DataError, match=r"split 'validation' not found; splits: \['test', 'train'\]"):
        read_records(str(tmp_path / "dd"), split="validation")


def test_parquet_mixed_formats_with_null_columns(tmp_path):
    """Columnar files fill a row's absent keys with None; detection must ignore them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"prompt": "Q", "chosen": " a", "rejected": " b"},
            {"chosen": "\n\nHuman: Q\n\nAssistant: a", "rejected": "\n\nHuman: Q\n\nAssistant: b"}]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "m.parquet")
    res = load_rows(str(tmp_path / "m.parquet"))
    assert [triple(r) for r in res.rows] == [("Q", " a", " b"), ("\n\nHuman: Q\n\nAssistant:", " a", " b")]
    assert res.formats == {"standard": 1, "hh-rlhf": 1}


def test_csv_unpaired_labels_and_ratings_are_parsed(tmp_path):
    p = tmp_path / "u.csv"
    p.write_text("prompt,completion,label\nQ,yes,True\nQ,no,false\n", encoding="utf-8")
    assert [(r.completion, r.label) for r in load_rows(str(p)).rows] == [("yes", True), ("no", False)]
    p2 = tmp_path / "r.csv"
    p2.write_text("prompt,completion,rating\nQ,yes,4\nQ,no,2.5\n", encoding="utf-8")
    assert [r.label for r in load_rows(str(p2)).rows] == [True, False]


def test_read_records_errors(tmp_path):
    with pytest.raises(DataError, match=r"^missing\.jsonl: file not found$"):
        read_records("missing.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"d\.txt: unsupported file type; accepted: \.json"):
        read_records(str(tmp_path / "d.txt"))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        read_records(str(tmp_path / "bad.jsonl"))
    (tmp_path / "obj.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match=r"under 'train', 'data' or 'train'; keys found: \['rows'\]"):
        read_records(str(tmp_path / "obj.json"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"empty_dir: a directory must be written by datasets.save_to_disk"):
        read_records(str(tmp_path / "empty_dir"))


def test_hub_name_without_network_gives_clear_error(monkeypatch):
    import datasets

    monkeypatch.setattr(cdata, "_hub_unreachable", lambda: "cannot resolve huggingface.co")
    with pytest.raises(DataError, match=r"^someone/prefs: neither a local file or directory nor a dataset "
                                        r"reachable on the Hugging Face Hub \(cannot resolve huggingface\.co\); "
                                        r"download it and pass a local \.json"):
        read_records("someone/prefs")

    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")

    monkeypatch.setattr(cdata, "_hub_unreachable", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"reachable on the Hugging Face Hub \(ConnectionError: Couldn't reach"):
        read_records("someone/prefs")

    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list(PAIRS))
    res = load_rows("someone/prefs", split="test")
    assert res.source == "someone/prefs[test]" and res.rows == _expected_pairs("someone/prefs[test]")


# --------------------------------------------------------------------------- invalid rows

GOOD_PAIR = {"prompt": "Q", "chosen": "a", "rejected": "b"}
GOOD_UNPAIRED = {"prompt": "Q", "completion": "a", "label": True}
HH = "\n\nHuman: Q\n\nAssistant:"


@pytest.mark.parametrize("first,bad,message", [
    (GOOD_PAIR, {"prompt": "Q", "chosen": "a"},
     "row 2, field 'rejected': missing field (paired rows need 'chosen' and 'rejected')"),
    (GOOD_PAIR, {"prompt": "Q", "chosen": " \n ", "rejected": "b"},
     "row 2, field 'chosen': empty completion (empty or whitespace-only)"),
    (GOOD_PAIR, {"prompt": "Q", "chosen": "a", "rejected": ""},
     "row 2, field 'rejected': empty completion (empty or whitespace-only)"),
    (GOOD_PAIR, {"prompt": "Q", "chosen": "same", "rejected": "same "},
     "row 2, field 'rejected': chosen and rejected are identical"),
    (GOOD_PAIR, {"prompt": "Q", "chosen": 3, "rejected": "b"},
     "row 2, field 'chosen': wrong type: expected a string (the prompt is a string), got int 3"),
    (GOOD_PAIR, {"prompt": 5, "chosen": "a", "rejected": "b"},
     "row 2, field 'prompt': wrong type: expected a string or a list of messages, got int 5"),
    (GOOD_PAIR, {"chosen": "Human: hi Assistant: a", "rejected": HH + " b"},
     "row 2, field 'chosen': implicit prompt: no '\\n\\nAssistant:' found in the transcript"),
    (GOOD_PAIR, {"chosen": HH + " a", "rejected": "\n\nHuman: Other\n\nAssistant: b"},
     "row 2, field 'rejected': implicit prompt: chosen and rejected have different prompts"),
    (GOOD_PAIR, {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}],
                 "rejected": [{"role": "user", "content": "R"}, {"role": "assistant", "content": "b"}]},
     "row 2, field 'rejected': implicit prompt: chosen and rejected conversations differ"),
    (GOOD_PAIR, {"conversations": [{"from": "robot", "value": "Q"}], "chosen": {"from": "gpt", "value": "a"},
                 "rejected": {"from": "gpt", "value": "b"}},
     "row 2, field 'conversations': message 1 has unsupported role 'robot'"),
    (GOOD_PAIR, {"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "human", "value": "a"},
                 "rejected": {"from": "gpt", "value": "b"}},
     "row 2, field 'chosen': expected one assistant message"),
    (GOOD_PAIR, {"question": "Q", "answer": "A"},
     "row 2: unrecognised format: keys found ['answer', 'question']; accepted formats: paired: "
     "{prompt, chosen, rejected}"),
    (GOOD_UNPAIRED, {"prompt": "Q", "completion": "a", "label": "maybe"},
     "row 2, field 'label': wrong type: expected a boolean (true/false), got str 'maybe'"),
    (GOOD_UNPAIRED, {"prompt": "Q", "completion": "a", "label": 2},
     "row 2, field 'label': wrong type: expected a boolean (true/false), got int 2"),
    (GOOD_UNPAIRED, {"prompt": "Q", "completion": "\t", "label": True},
     "row 2, field 'completion': empty completion (empty or whitespace-only)"),
    (GOOD_UNPAIRED, {"prompt": "Q", "completion": "a"},
     "row 2, field 'label': missing field (unpaired rows need 'label' or 'rating')"),
    (GOOD_UNPAIRED, {"completion": "a", "label": True},
     "row 2, field 'prompt': missing field (unpaired rows need 'prompt' and 'completion'"),
    (GOOD_UNPAIRED, {"prompt": "Q", "completion": "a", "rating": "high"},
     "row 2, field 'rating': wrong type: expected a number, got str 'high'"),
    (GOOD_UNPAIRED, {"messages": [{"role": "user", "content": "Q"}], "label": True},
     "row 2, field 'messages': the conversation must end with the assistant's reply"),
    (GOOD_UNPAIRED, {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}],
                     "label": True},
     "row 2, field 'messages': empty completion"),
])
def test_invalid_row_error_names_file_row_and_field(tmp_path, first, bad, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [first, bad])
    with pytest.raises(DataError) as exc:
        load_rows(path)
    assert str(exc.value).startswith(f"{path}, {message}")
    assert exc.value.file == path and exc.value.row == 2
    # skipping drops exactly the bad row
    res = load_rows(path, on_invalid="skip")
    assert len(res.rows) == 1 and res.n_skipped == 1 and res.rows[0].source == f"{path}:1"
    assert list(res.skipped.values()) == [1]
    assert list(res.skipped) == [exc.value.category]


def test_skip_counts_by_reason(tmp_path):
    recs = [GOOD_PAIR, {"prompt": "Q", "chosen": "a"}, {"prompt": "Q", "chosen": "", "rejected": "b"},
            {"prompt": "Q", "chosen": "x", "rejected": "x"}, {"foo": 1}, {"prompt": "Q", "chosen": "", "rejected": "c"},
            {"chosen": "no marker", "rejected": "none"}, {"prompt": "Q", "chosen": 1, "rejected": "b"},
            {"prompt": "Q2", "chosen": "c", "rejected": "d"}]
    res = load_rows(write_json(tmp_path / "s.json", recs), on_invalid="skip")
    assert [triple(r) for r in res.rows] == [("Q", "a", "b"), ("Q2", "c", "d")]
    assert [r.source.rsplit(":", 1)[1] for r in res.rows] == ["1", "9"]
    assert res.n_skipped == 7
    assert res.skipped == {"missing field": 1, "empty completion": 2, "chosen equals rejected": 1,
                           "unrecognised format": 1, "implicit prompt": 1, "wrong type": 1}


def test_all_rows_invalid_is_an_error():
    with pytest.raises(DataError, match=r"^f: no valid rows \(1 invalid rows skipped: \{'wrong type': 1\}\)"):
        normalise_records([{"prompt": "Q", "chosen": 1, "rejected": "b"}], "f", on_invalid="skip")


def test_kind_mismatch_errors():
    with pytest.raises(DataError, match=r"^f, row 1: found unpaired rows \(completion with label/rating\) "
                                        r"but paired data is needed \(kind='paired'\)"):
        normalise_records([GOOD_UNPAIRED], "f", kind="paired")
    with pytest.raises(DataError, match=r"^f, row 1: found paired rows \(chosen/rejected\) "
                                        r"but unpaired data is needed \(kind='unpaired'\)"):
        normalise_records([GOOD_PAIR], "f", kind="unpaired", on_invalid="skip")
    with pytest.raises(DataError, match=r"^f, row 2: this row is unpaired but row 1 is paired; "
                                        r"all rows of one file must be of one kind"):
        normalise_records([GOOD_PAIR, GOOD_UNPAIRED], "f", on_invalid="skip")
    assert normalise_records([GOOD_PAIR], "f", kind="paired").kind == "paired"
    assert normalise_records([GOOD_UNPAIRED], "f", kind="unpaired").kind == "unpaired"
    with pytest.raises(ValueError, match="kind must be"):
        normalise_records([GOOD_PAIR], "f", kind="pairs")
    with pytest.raises(ValueError, match="on_invalid must be"):
        normalise_records([GOOD_PAIR], "f", on_invalid="ignore")


# --------------------------------------------------------------------------- pairs -> unpaired


def test_pairs_to_unpaired_is_seeded_and_keeps_counts():
    pairs = [PairRow(f"Q{i}", f"good {i}", f"bad {i}", f"f:{i + 1}") for i in range(20)]
    a, b, c = pairs_to_unpaired(pairs, 0), pairs_to_unpaired(pairs, 0), pairs_to_unpaired(pairs, 1)
    assert a == b and a != c
    assert len(a) == 40 and sum(r.label for r in a) == 20
    assert all(isinstance(r, UnpairedRow) for r in a)
    expected = {(f"Q{i}", f"good {i}", True, f"f:{i + 1}") for i in range(20)} | \
               {(f"Q{i}", f"bad {i}", False, f"f:{i + 1}") for i in range(20)}
    assert {(r.prompt, r.completion, r.label, r.source) for r in a} == expected
    # shuffled: not the emission order, and labels are not in two blocks
    assert [r.label for r in a] != [True, False] * 20
    assert [r.label for r in a[:20]].count(True) not in (0, 20)
    assert {r.meta["pair_index"] for r in a if r.prompt == "Q3"} == {3}
    assert pairs_to_unpaired([], 0) == []
