"""Reading raw records: local files (json, jsonl, parquet, csv, gzipped), ``datasets``
directories and hub datasets, decoded with byte-order-mark detection.

Every failure to read (missing, unreadable, truncated gzip, bad encoding, garbage JSON, bad
CSV, corrupt parquet) is a one-line :class:`~compo.data.rows.DataError` naming the file and, where
known, the line; :mod:`compo.data.load` normalises what is read here.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import os
import zlib
from typing import Any

from compo.data.rows import DataError

FILE_TYPES = (".json", ".json.gz", ".jsonl", ".jsonl.gz", ".parquet", ".csv", ".csv.gz")


def read_records(source: str, split: str = "train") -> tuple[list[dict], str]:
    """Read raw records from a local file, a ``save_to_disk`` directory or a hub dataset.

    Local files: ``.json`` (a list of objects, or an object holding the list under ``split``,
    ``"data"`` or ``"train"``), ``.jsonl``, ``.parquet``, ``.csv`` (values stay strings), and
    gzipped ``.json.gz`` / ``.jsonl.gz`` / ``.csv.gz``. A directory written by
    ``datasets.save_to_disk`` (a ``DatasetDict`` gives ``split``). Anything else that does not
    exist locally is tried as a hub name with ``datasets.load_dataset``.
    Text files are UTF-8, or UTF-8/16/32 with a byte-order mark. A file that cannot be read
    (unreadable, bad gzip, bad encoding, bad JSON/CSV/parquet) raises a one-line DataError.
    Returns ``(records, display_name)``.
    """
    path = os.path.expanduser(str(source))
    if os.path.isdir(path):
        return _read_saved_dataset(path, str(source), split)
    if os.path.isfile(path):
        return _read_file(path, str(source), split), str(source)
    if _looks_like_path(str(source)):
        raise DataError(str(source), None, None, "file not found")
    return _read_hub(str(source), split)


def _looks_like_path(source: str) -> bool:
    low = source.lower()
    return (
        low.endswith(FILE_TYPES)
        or low.endswith(".gz")
        or source.startswith((".", "/", "~", "\\"))
        or source.count("/") > 1
    )


def _one_line(e: Any, limit: int = 200) -> str:
    """``str(e)`` on one line (whitespace collapsed), cut to about ``limit`` characters."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_bytes(path: str, name: str) -> bytes:
    """The file's bytes (gunzipped for ``.gz``); any failure is a one-line DataError."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(name, None, None, f"cannot read: {_one_line(e.strerror or e)}") from None
    if not path.lower().endswith(".gz"):
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise DataError(name, None, None, "truncated gzip file (the compressed data ends early); "
                        "download or compress it again") from None
    except gzip.BadGzipFile as e:
        raise DataError(name, None, None, f"not a valid gzip file ({_one_line(e)})") from None
    except zlib.error as e:
        raise DataError(name, None, None, f"not a valid gzip file: corrupt compressed data "
                        f"({_one_line(e)})") from None


_BOMS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def _decode(raw: bytes, name: str) -> str:
    """Text from bytes: UTF-8, or UTF-8/16/32 with a byte-order mark (the mark is dropped).

    Undecodable bytes raise DataError naming the line, the byte and its offset; so does UTF-16
    without a byte-order mark (many NUL bytes), which would otherwise decode as garbage.
    """
    codec, skip = next(((c, len(bom)) for bom, c in _BOMS if raw.startswith(bom)), ("utf-8", 0))
    try:
        text = raw[skip:].decode(codec)
    except UnicodeDecodeError as e:
        off = skip + e.start
        if codec == "utf-8":
            line = raw[:off].count(b"\n") + 1
            hint = ""
            if raw[:2] == b"\x1f\x8b":
                hint = "; the file looks gzip-compressed: name it .gz"
            elif raw[:4] == b"PAR1":
                hint = "; the file looks like parquet: name it .parquet"
            elif _many_nuls(raw):
                hint = "; many NUL bytes: UTF-16 without a byte-order mark?"
            raise DataError(name, None, None, f"line {line} is not valid UTF-8 (byte 0x{raw[off]:02x} "
                            f"at offset {off}{hint}); save the file as UTF-8") from None
        line = raw[skip:off].decode(codec, errors="replace").count("\n") + 1
        raise DataError(name, None, None, f"line {line} is not valid {codec[:6].upper()} "
                        f"({_one_line(e.reason)} at offset {off}); save the file as UTF-8") from None
    if skip == 0 and _many_nuls(raw):
        off = raw.index(b"\x00")
        line = raw[:off].count(b"\n") + 1
        raise DataError(name, None, None, f"line {line} is not valid UTF-8 text "
                        f"(NUL byte at offset {off}; many NUL bytes: UTF-16 without a byte-order "
                        f"mark?); save the file as UTF-8")
    return text


def _many_nuls(raw: bytes) -> bool:
    """At least a quarter NUL bytes in the first 4 KiB: UTF-16/32 text, not UTF-8."""
    head = raw[:4096]
    n = head.count(b"\x00")
    return n > 0 and 4 * n >= len(head)


def _read_text(path: str, name: str) -> str:
    text = _decode(_read_bytes(path, name), name)
    if not text.strip():
        raise DataError(name, None, None, "the file is empty")
    return text


def _read_parquet(path: str, name: str) -> list:
    raw = _read_bytes(path, name)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(pa.BufferReader(raw)).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(name, None, None, f"not a valid parquet file ({_one_line(e)})") from None


_CSV_LIMIT_RAISED = False


def _raise_csv_field_limit() -> None:
    """Lift the csv module's 128 KiB field limit (once): long completions are legitimate."""
    global _CSV_LIMIT_RAISED
    if _CSV_LIMIT_RAISED:
        return
    limit = 2**31 - 1
    while True:
        try:
            csv.field_size_limit(limit)
            break
        except OverflowError:
            limit //= 2
    _CSV_LIMIT_RAISED = True


def _parse_csv(text: str, name: str) -> list:
    _raise_csv_field_limit()
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for r in reader:
            extra = r.pop(None, None)  # fields beyond the header's
            if extra and any(str(v).strip() for v in extra):
                n_head = len(reader.fieldnames or ())
                raise DataError(name, len(rows) + 1, None, f"line {reader.reader.line_num} has "
                                f"{n_head + len(extra)} fields but the header has {n_head}; "
                                "quote fields that contain commas")
            rows.append(r)
    except csv.Error as e:
        raise DataError(name, None, None, f"line {reader.reader.line_num} is not valid CSV "
                        f"({_one_line(e)})") from None
    return rows


def _read_file(path: str, name: str, split: str) -> list:
    low = path.lower()
    base = low[:-3] if low.endswith(".gz") else low
    if base.endswith(".parquet") and not low.endswith(".gz"):
        return _read_parquet(path, name)
    if base.endswith(".jsonl"):
        return _parse_jsonl(_read_text(path, name), name)
    if base.endswith(".json"):
        return _parse_json(_read_text(path, name), name, split)
    if base.endswith(".csv"):
        return _parse_csv(_read_text(path, name), name)
    raise DataError(name, None, None, f"unsupported file type; accepted: {', '.join(FILE_TYPES)} "
                    "or a directory written by datasets.save_to_disk")


_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
               str: "a string"}


def _json_loads(text: str, name: str, line_no: int | None) -> Any:
    """``json.loads`` with a one-line DataError for text nested too deeply to parse."""
    try:
        return json.loads(text)
    except RecursionError:
        where = f"line {line_no} is" if line_no is not None else "the file is"
        raise DataError(name, None, None, f"{where} not valid JSON (nested too deeply)") from None


def _parse_jsonl(text: str, name: str) -> list:
    records = []
    # split on "\n" only: str.splitlines() also breaks at U+2028, \x0c, ... which JSON strings may hold
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(_json_loads(line, name, line_no))
        except json.JSONDecodeError as e:
            raise DataError(name, None, None, f"line {line_no} is not valid JSON "
                            f"({e.msg} at column {e.colno})") from None
    return records


def _parse_json(text: str, name: str, split: str) -> list:
    try:
        data = _json_loads(text, name, None)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines saved with a .json name
            return _parse_jsonl(text, name)
        raise DataError(name, None, None, f"line {e.lineno} is not valid JSON "
                        f"({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):
        for key in (split, "data", "train"):
            if isinstance(data.get(key), list):
                return data[key]
        raise DataError(name, None, None, f"a JSON object must hold the rows as a list under "
                        f"'{split}', 'data' or 'train'; keys found: {sorted(data)}")
    if not isinstance(data, list):
        raise DataError(name, None, None, f"expected a JSON list of objects, got "
                        f"{_JSON_TYPES.get(type(data), type(data).__name__)}")
    return data


def _read_saved_dataset(path: str, name: str, split: str) -> tuple[list[dict], str]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - any failure means "not a saved dataset"
        raise DataError(name, None, None, f"a directory must be written by datasets.save_to_disk "
                        f"(could not load it: {_one_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(name, None, None, f"split '{split}' not found; splits: {sorted(ds)}")
        return ds[split].to_list(), f"{name}[{split}]"
    return ds.to_list(), name


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached (DNS fails), or None; skipped in offline mode (cache only).

    Checked first because ``load_dataset`` retries for ~25 s before giving up without a network.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return None
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"cannot resolve {host}: {e}"
    return None


def _read_hub(name: str, split: str) -> tuple[list[dict], str]:
    reason = _hub_unreachable()
    if reason is None:
        try:
            import datasets

            return datasets.load_dataset(name, split=split).to_list(), f"{name}[{split}]"
        except Exception as e:  # noqa: BLE001 - no network, unknown name, bad split ...
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    raise DataError(name, None, None, f"neither a local file or directory nor a dataset reachable "
                    f"on the Hugging Face Hub ({reason}); download it and pass a local "
                    f"{'/'.join(FILE_TYPES[:5])} file or a datasets.save_to_disk directory")
