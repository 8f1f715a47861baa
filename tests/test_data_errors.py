"""Every failure to read a data file is a one-line DataError naming the file (and line)."""

from __future__ import annotations

import builtins
import codecs
import csv
import gzip
import json
import os

import pytest

from compo.data import readers as cdata
from compo.data.load import load_rows
from compo.data.rows import DataError

PAIRS = [{"prompt": f"Q{i} é", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(40)]
JSONL = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PAIRS)
CSV = "prompt,chosen,rejected\r\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\r\n" for r in PAIRS)
TRIPLES = [(r["prompt"], r["chosen"], r["rejected"]) for r in PAIRS]


def triples(res):
    return [(r.prompt, r.chosen, r.rejected) for r in res.rows]


def _gz(text: str) -> bytes:
    return gzip.compress(text.encode("utf-8"), mtime=0)


def _corrupt_block(text: str) -> bytes:
    d = bytearray(_gz(text))
    d[10] = 0xFF  # first deflate block header: BTYPE=11 (reserved) -> zlib.error
    return bytes(d)


def _bad_crc(text: str) -> bytes:
    d = bytearray(_gz(text))
    d[-8:-4] = bytes(4 * [0]) if d[-8:-4] != bytes(4) else b"\x01\x00\x00\x00"
    return bytes(d)


def _not_parquet() -> bytes:
    return b"PAR1" + b"\x00garbage" * 20 + b"PAR1"


CASES = [
    # (id, file name, content bytes, fragments the message must contain)
    ("truncated-jsonl-gz", "d.jsonl.gz", _gz(JSONL)[:200], ["truncated gzip file"]),
    ("truncated-json-gz", "d.json.gz", _gz(json.dumps(PAIRS))[:200], ["truncated gzip file"]),
    ("truncated-csv-gz", "d.csv.gz", _gz(CSV)[:150], ["truncated gzip file"]),
    ("fake-gzip", "d.jsonl.gz", JSONL.encode(), ["not a valid gzip file (Not a gzipped file"]),
    ("corrupt-deflate", "d.jsonl.gz", _corrupt_block(JSONL), ["not a valid gzip file: corrupt compressed data",
                                                              "invalid block type"]),
    ("bad-crc", "d.json.gz", _bad_crc(json.dumps(PAIRS)), ["not a valid gzip file (CRC check failed)"]),
    ("empty-gz", "d.jsonl.gz", _gz(""), ["the file is empty"]),
    ("utf8-jsonl-line3", "d.jsonl", b'{"a": 1}\n{"b": 2}\n{"c": "\xff"}\n',
     ["line 3 is not valid UTF-8 (byte 0xff at offset 25); save the file as UTF-8"]),
    ("utf8-csv-line2", "d.csv", b"prompt,chosen,rejected\nQ,caf\xe9,b\n",
     ["line 2 is not valid UTF-8 (byte 0xe9 at offset 28)"]),
    ("utf8-json-gz", "d.json.gz", gzip.compress(b'[\n{"prompt": "Q",\n "chosen": "\xc3"}]'),
     ["line 3 is not valid UTF-8 (byte 0xc3 at offset"]),
    ("latin1-after-bom", "d.jsonl", codecs.BOM_UTF8 + b'{"a": "\xe9"}\n', ["line 1 is not valid UTF-8 (byte 0xe9 at offset 10)"]),
    ("utf16-no-bom-ascii", "d.jsonl", JSONL.replace("é", "e").encode("utf-16-le"),
     ["line 1 is not valid UTF-8 text (NUL byte at offset 1", "UTF-16 without a byte-order mark?"]),
    ("utf16-no-bom-nonascii", "d.csv", "prompt,chosen\né,x\n".encode("utf-16-le"),
     ["line 2 is not valid UTF-8 (byte 0xe9 at offset 28", "UTF-16 without a byte-order mark?"]),
    ("utf16-bom-odd-length", "d.jsonl", codecs.BOM_UTF16_LE + '{"a": 1}\n{"b": 2}\n'.encode("utf-16-le") + b"x",
     ["line 3 is not valid UTF-16 (truncated data at offset 38)"]),
    ("gzip-without-gz-name", "d.jsonl", _gz(JSONL), ["line 1 is not valid UTF-8 (byte 0x8b at offset 1",
                                                   "looks gzip-compressed: name it .gz"]),
    ("garbage-json", "d.json", b'[\n  {"prompt": "Q",\n   "chosen": oops}\n]',
     ["line 3 is not valid JSON (Expecting value at column 14)"]),
    ("garbage-jsonl-line2", "d.jsonl", b'{"a": 1}\n{oops\n',
     ["line 2 is not valid JSON (Expecting property name enclosed in double quotes at column 2)"]),
    ("binary-json", "d.json", bytes(range(256)) * 4, ["line 2 is not valid UTF-8 (byte 0x80 at offset 128); save"]),
    ("json-null", "d.json", b"null", ["expected a JSON list of objects, got null"]),
    ("json-scalar", "d.json", b"42\n", ["expected a JSON list of objects, got a number"]),
    ("json-string", "d.json", b'"rows"', ["expected a JSON list of objects, got a string"]),
    ("json-nested-too-deep", "d.json", b"[" * 200_000, ["the file is not valid JSON (nested too deeply)"]),
    ("jsonl-nested-too-deep", "d.jsonl", b'{"a": 1}\n' + b"[" * 200_000, ["line 2 is not valid JSON (nested too deeply)"]),
    ("json-list-of-scalars", "d.json", b"[1, 2, 3]", ["row 1: unrecognised format: the row is a int"]),
    ("empty-json", "d.json", b"", ["the file is empty"]),
    ("blank-jsonl", "d.jsonl", b"\n  \n\n", ["the file is empty"]),
    ("empty-csv", "d.csv", codecs.BOM_UTF8, ["the file is empty"]),
    ("csv-header-only", "d.csv", b"prompt,chosen,rejected\n", ["no valid rows"]),
    ("csv-unquoted-comma", "d.csv", b"prompt,chosen,rejected\nQ,a,b\nQ,hello, world,b\n",
     ["row 2: line 3 has 4 fields but the header has 3; quote fields that contain commas"]),
    ("not-parquet", "d.parquet", _not_parquet(), ["not a valid parquet file (", "Parquet"]),
    ("empty-parquet", "d.parquet", b"", ["not a valid parquet file (", "0 bytes"]),
    ("text-as-parquet", "d.parquet", JSONL.encode(), ["not a valid parquet file ("]),
    ("unsupported-extension", "d.xlsx", b"PK\x03\x04", ["unsupported file type; accepted: .json"]),
]


def _check(err: DataError, path: str, fragments: list[str]) -> str:
    msg = str(err)
    assert msg.startswith(path), msg
    assert "\n" not in msg and "\r" not in msg, msg
    assert len(msg) < len(path) + 400, msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize("fname,content,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_file_is_one_line_data_error(tmp_path, fname, content, fragments):
    path = tmp_path / fname
    path.write_bytes(content)
    with pytest.raises(DataError) as exc:
        load_rows(str(path))
    _check(exc.value, str(path), fragments)
    assert exc.value.file == str(path)


def test_csv_error_names_the_line(tmp_path, monkeypatch):
    """Any csv.Error (here: a field over a lowered limit) is a DataError with the line number."""
    monkeypatch.setattr(cdata, "_CSV_LIMIT_RAISED", True)  # keep the lowered limit below
    old = csv.field_size_limit(20)
    try:
        path = tmp_path / "d.csv"
        path.write_text("prompt,chosen,rejected\nQ,a,b\nQ,a,b\nQ," + "x" * 30 + ",b\n", encoding="utf-8")
        with pytest.raises(DataError) as exc:
            load_rows(str(path))
    finally:
        csv.field_size_limit(old)
    _check(exc.value, str(path), ["line 4 is not valid CSV (field larger than field limit (20))"])


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text(JSONL, encoding="utf-8")
    real_open = builtins.open

    def denying_open(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denying_open)
    with pytest.raises(DataError) as exc:
        load_rows(str(path))
    assert str(exc.value) == f"{path}: cannot read: Permission denied"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads mode-000 files")
def test_unreadable_file_real_permissions(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(CSV, encoding="utf-8")
    path.chmod(0)
    try:
        with pytest.raises(DataError, match=r": cannot read: Permission denied$"):
            load_rows(str(path))
    finally:
        path.chmod(0o600)


def test_directory_error_is_one_line(tmp_path, monkeypatch):
    import datasets

    def broken(path):
        raise FileNotFoundError("Directory\n  x\tis neither a `Dataset` directory\nnor a `DatasetDict` " + "y" * 500)

    monkeypatch.setattr(datasets, "load_from_disk", broken)
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError) as exc:
        load_rows(str(tmp_path / "dir"))
    msg = _check(exc.value, str(tmp_path / "dir"), [
        "a directory must be written by datasets.save_to_disk (could not load it: Directory x is neither"])
    assert msg.endswith("...)")


# --------------------------------------------------------------------------- files that must load


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig", "utf-32"])
@pytest.mark.parametrize("fname,text", [("d.jsonl", JSONL), ("d.csv", CSV), ("d.json", json.dumps(PAIRS, indent=1))])
def test_byte_order_marks_are_decoded(tmp_path, encoding, fname, text):
    raw = text.encode(encoding)
    if encoding == "utf-16-be":
        raw = codecs.BOM_UTF16_BE + raw
    assert raw[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) or raw[:3] == codecs.BOM_UTF8
    path = tmp_path / fname
    path.write_bytes(raw)
    utf8 = tmp_path / ("plain" + fname[1:])
    utf8.write_text(text, encoding="utf-8")
    res, ref = load_rows(str(path)), load_rows(str(utf8))
    assert triples(res) == triples(ref) == TRIPLES
    assert res.rows[0].prompt == "Q0 é"  # no BOM char glued to the first key or value


def test_utf16_bom_in_gzip(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(JSONL.encode("utf-16")))
    assert triples(load_rows(str(path))) == TRIPLES


def test_csv_field_over_default_limit_loads(tmp_path):
    long = "x" * 300_000
    path = tmp_path / "long.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected"])
        w.writerow(["Q", long, "short"])
        w.writerow(["Q2", '"quoted", with commas\nand a newline', "b"])
    res = load_rows(str(path))
    assert triples(res) == [("Q", long, "short"), ("Q2", '"quoted", with commas\nand a newline', "b")]


def test_csv_trailing_empty_fields_are_ignored(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("prompt,chosen,rejected\nQ,a,b,,\n", encoding="utf-8")
    res = load_rows(str(path))
    assert triples(res) == [("Q", "a", "b")] and res.rows[0].meta == {"format": "standard"}


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    recs = [{"prompt": "a\u2028b\x0cc\x1dd", "chosen": " x\u2029", "rejected": " y\x85"}]
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in recs), encoding="utf-8")
    assert triples(load_rows(str(path))) == [("a\u2028b\x0cc\x1dd", " x\u2029", " y\x85")]
