"""Read preference data from files, ``datasets`` directories or the hub, and normalise it.

Every supported format (DESIGN.md section 5) becomes a list of :class:`~compo.rows.PairRow`
(paired data) or :class:`~compo.rows.UnpairedRow` (thumbs-up / thumbs-down data):

Paired
  * ``{prompt, chosen, rejected}`` strings (TRL "standard");
  * ``{prompt, chosen, rejected}`` message lists (TRL "conversational"; ``chosen`` may be just
    the assistant reply or the whole conversation including the prompt);
  * ``{chosen, rejected}`` message lists with no prompt (the prompt is the shared prefix);
  * ``{chosen, rejected}`` raw transcripts (hh-rlhf; the prompt is the text up to and including
    the last ``"\\n\\nAssistant:"``);
  * ShareGPT / LLaMA-Factory ``{conversations, chosen: {from, value}, rejected: {...}}``
    (``messages`` with ``{role, content}`` works too; an optional ``system`` key is a system message).

Unpaired
  * ``{prompt, completion, label}`` (prompt/completion may be strings or message lists);
  * ``{messages, label}`` / ``{conversations, label}`` whose last message is the assistant reply
    (LLaMA-Factory kto format);
  * ``{prompt, completion, rating}`` or ``{messages, rating}`` Likert ratings:
    ``label = rating >= rating_threshold``.

Invalid rows raise :class:`~compo.rows.DataError` naming the file, the 1-based row and the field,
or with ``on_invalid="skip"`` are dropped and counted by reason.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import math
import numbers
import os
import random
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable

from compo.rows import DataError, PairRow, UnpairedRow

__all__ = [
    "LoadResult",
    "read_records",
    "normalise_records",
    "load_rows",
    "pairs_to_unpaired",
    "ACCEPTED_FORMATS",
    "ASSISTANT_MARKER",
]

ASSISTANT_MARKER = "\n\nAssistant:"

ACCEPTED_FORMATS = (
    "paired: {prompt, chosen, rejected} (strings or message lists); "
    "{chosen, rejected} (hh-rlhf transcripts or message lists, implicit prompt); "
    "{conversations|messages, chosen, rejected} (ShareGPT); "
    "unpaired: {prompt, completion, label}; {prompt, completion, rating}; "
    "{messages|conversations, label|rating}"
)

FILE_TYPES = (".json", ".json.gz", ".jsonl", ".jsonl.gz", ".parquet", ".csv", ".csv.gz")

# Skip-count reasons (the keys of LoadResult.skipped); each invalid row has exactly one.
MISSING = "missing field"
EMPTY = "empty completion"
IDENTICAL = "chosen equals rejected"
WRONG_TYPE = "wrong type"
IMPLICIT = "implicit prompt"
UNRECOGNISED = "unrecognised format"
BAD_CONVERSATION = "bad conversation"

_ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}
_CONV_KEYS = ("conversations", "messages")


@dataclass
class LoadResult:
    """Normalised rows plus what was skipped and where they came from."""

    rows: list  # list[PairRow] or list[UnpairedRow]
    kind: str  # "paired" or "unpaired"
    n_skipped: int  # invalid rows skipped (on_invalid="skip")
    skipped: dict[str, int]  # reason -> count
    source: str  # display name of where the data came from
    formats: dict[str, int] = field(default_factory=dict)  # detected format -> row count


class _Invalid(Exception):
    """One invalid row: a skip reason, the offending field and a human-readable message."""

    def __init__(self, reason: str, field_name: str | None, message: str):
        super().__init__(message)
        self.reason, self.field, self.message = reason, field_name, message


# --------------------------------------------------------------------------- reading


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


# --------------------------------------------------------------------------- normalising


def normalise_records(records: list[dict], file: str, *, kind: str = "auto",
                      rating_threshold: float = 4.0, on_invalid: str = "error") -> LoadResult:
    """Detect each record's format from its keys and normalise it to PairRow / UnpairedRow.

    ``kind``: ``"auto"`` (all rows must still be of one kind), ``"paired"`` or ``"unpaired"``.
    ``on_invalid``: ``"error"`` raises DataError at the first invalid row; ``"skip"`` drops
    invalid rows and counts them by reason. A row of the wrong kind always raises.
    A raised row error carries ``.category``, the same reason string used in ``skipped``.
    """
    if kind not in ("auto", "paired", "unpaired"):
        raise ValueError(f"kind must be 'auto', 'paired' or 'unpaired', not {kind!r}")
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', not {on_invalid!r}")
    found_kind, first_row = (None if kind == "auto" else kind), None
    rows: list = []
    skipped: dict[str, int] = {}
    formats: dict[str, int] = {}
    for i, rec in enumerate(records, 1):
        try:
            row_kind = _row_kind(rec)
            if found_kind is not None and row_kind != found_kind:
                raise DataError(file, i, None, _kind_message(row_kind, found_kind, kind, first_row))
            found_kind, first_row = row_kind, first_row or i
            if row_kind == "paired":
                row, fmt = _normalise_paired(rec, f"{file}:{i}")
            else:
                row, fmt = _normalise_unpaired(rec, f"{file}:{i}", rating_threshold)
        except _Invalid as bad:
            if on_invalid == "error":
                err = DataError(file, i, bad.field, bad.message)
                err.category = bad.reason
                raise err from None
            skipped[bad.reason] = skipped.get(bad.reason, 0) + 1
            continue
        rows.append(row)
        formats[fmt] = formats.get(fmt, 0) + 1
    if not rows:
        detail = f" ({sum(skipped.values())} invalid rows skipped: {skipped})" if skipped else ""
        raise DataError(file, None, None, f"no valid rows{detail}")
    return LoadResult(rows=rows, kind=found_kind, n_skipped=sum(skipped.values()),
                      skipped=skipped, source=file, formats=formats)


def load_rows(source: str, *, kind: str = "auto", rating_threshold: float = 4.0,
              on_invalid: str = "error", split: str = "train") -> LoadResult:
    """Read ``source`` (see :func:`read_records`) and normalise it (see :func:`normalise_records`)."""
    records, name = read_records(source, split=split)
    return normalise_records(records, name, kind=kind, rating_threshold=rating_threshold,
                             on_invalid=on_invalid)


def pairs_to_unpaired(rows: list[PairRow], seed: int) -> list[UnpairedRow]:
    """Emit (prompt, chosen, True) and (prompt, rejected, False) per pair, then shuffle with ``seed``.

    Unshuffled, whole batches would be one class. ``meta["pair_index"]`` keeps the pair's position.
    """
    out: list[UnpairedRow] = []
    for idx, p in enumerate(rows):
        meta = {**p.meta, "pair_index": idx}
        out.append(UnpairedRow(p.prompt, p.chosen, True, p.source, dict(meta)))
        out.append(UnpairedRow(p.prompt, p.rejected, False, p.source, dict(meta)))
    random.Random(seed).shuffle(out)
    return out


# --------------------------------------------------------------------------- per-row helpers


def _has(rec: dict, key: str) -> bool:
    """A key counts as present unless missing or None (columnar files fill absent keys with None)."""
    return rec.get(key) is not None


def _conv_key(rec: dict) -> str | None:
    return next((k for k in _CONV_KEYS if _has(rec, k)), None)


def _row_kind(rec: Any) -> str:
    """"paired" or "unpaired" from the keys alone; raises _Invalid for an unrecognised row."""
    if not isinstance(rec, dict):
        raise _Invalid(UNRECOGNISED, None, f"unrecognised format: the row is a {type(rec).__name__}, "
                       f"not an object; accepted formats: {ACCEPTED_FORMATS}")
    if _has(rec, "chosen") or _has(rec, "rejected"):
        return "paired"
    if _has(rec, "label") or _has(rec, "rating") or _has(rec, "completion"):
        return "unpaired"
    keys = sorted(str(k) for k in rec if rec[k] is not None)
    raise _Invalid(UNRECOGNISED, None, f"unrecognised format: keys found {keys}; "
                   f"accepted formats: {ACCEPTED_FORMATS}")


def _kind_message(row_kind: str, have: str, asked: str, first_row: int | None) -> str:
    if asked != "auto":
        what = ("paired rows (chosen/rejected)" if row_kind == "paired"
                else "unpaired rows (completion with label/rating)")
        need = "paired" if asked == "paired" else "unpaired"
        return f"found {what} but {need} data is needed (kind='{asked}')"
    return (f"this row is {row_kind} but row {first_row} is {have}; "
            f"all rows of one file must be of one kind")


def _describe(v: Any) -> str:
    r = repr(v)
    return f"{type(v).__name__} {r if len(r) <= 40 else r[:37] + '...'}"


def _require(rec: dict, key: str, why: str) -> Any:
    if not _has(rec, key):
        raise _Invalid(MISSING, key, f"missing field ({why})")
    return rec[key]


def _text(v: Any, field_name: str, what: str = "a string") -> str:
    if not isinstance(v, str):
        raise _Invalid(WRONG_TYPE, field_name, f"wrong type: expected {what}, got {_describe(v)}")
    return v


def _nonempty(text: str, field_name: str) -> str:
    if not text.strip():
        raise _Invalid(EMPTY, field_name, "empty completion (empty or whitespace-only)")
    return text


def _check_pair(chosen: str, rejected: str) -> None:
    _nonempty(chosen, "chosen")
    _nonempty(rejected, "rejected")
    if chosen.strip() == rejected.strip():
        raise _Invalid(IDENTICAL, "rejected", "chosen and rejected are identical")


def _message(m: Any, field_name: str, pos: int) -> dict:
    """One message as ``{"role", "content"}``; accepts ``{role, content}`` or ``{from, value}``."""
    if not isinstance(m, dict):
        raise _Invalid(WRONG_TYPE, field_name, f"wrong type: message {pos} should be an object with "
                       f"role/content (or from/value), got {_describe(m)}")
    role = m.get("role", m.get("from"))
    if role is None:
        raise _Invalid(BAD_CONVERSATION, field_name, f"message {pos} has no 'role' (or 'from')")
    norm = _ROLES.get(str(role).lower()) if isinstance(role, str) else None
    if norm is None:
        raise _Invalid(BAD_CONVERSATION, field_name, f"message {pos} has unsupported role {role!r} "
                       f"(accepted: {', '.join(sorted(_ROLES))})")
    content = m.get("content", m.get("value"))
    if content is None:
        raise _Invalid(MISSING, field_name, f"missing field: message {pos} has no 'content' (or 'value')")
    content = _text(content, field_name, f"message {pos} content to be a string")
    return {"role": norm, "content": content}


def _messages(v: Any, field_name: str) -> list[dict]:
    if not isinstance(v, (list, tuple)):
        raise _Invalid(WRONG_TYPE, field_name, f"wrong type: expected a list of messages, got {_describe(v)}")
    return [_message(m, field_name, i) for i, m in enumerate(v, 1)]


def _with_system(rec: dict, msgs: list[dict]) -> list[dict]:
    if _has(rec, "system"):
        system = _text(rec["system"], "system")
        if system.strip():
            return [{"role": "system", "content": system}] + msgs
    return msgs


def _check_prompt(msgs: list[dict], field_name: str) -> tuple:
    if not msgs or msgs[-1]["role"] != "user":
        raise _Invalid(BAD_CONVERSATION, field_name, "the prompt conversation must end with a user message")
    return tuple(msgs)


def _assistant_text(v: Any, field_name: str, prompt: tuple | None) -> str:
    """The assistant reply from a string, one message, ``[reply]`` or ``prompt + [reply]``."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict):
        msgs = [_message(v, field_name, 1)]
    else:
        msgs = _messages(v, field_name)
        if prompt is not None and len(msgs) > len(prompt) and tuple(msgs[: len(prompt)]) == prompt:
            msgs = msgs[len(prompt):]
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise _Invalid(BAD_CONVERSATION, field_name, "expected one assistant message (alone or after the "
                       f"prompt's messages), got roles {[m['role'] for m in msgs]}")
    return msgs[0]["content"]


def _split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """hh-rlhf: prompt = text up to and including the last ``"\\n\\nAssistant:"``, shared by both.

    When one side's reply itself contains ``"\\n\\nAssistant:"`` (a reply that carries on the
    dialogue), the shorter of the two prompts is used if both transcripts start with it.
    """
    cut_c, cut_r = chosen.rfind(ASSISTANT_MARKER), rejected.rfind(ASSISTANT_MARKER)
    if cut_c < 0:
        raise _Invalid(IMPLICIT, "chosen", f"implicit prompt: no {ASSISTANT_MARKER!r} found in the transcript")
    if cut_r < 0:
        raise _Invalid(IMPLICIT, "rejected", f"implicit prompt: no {ASSISTANT_MARKER!r} found in the transcript")
    p_c = chosen[: cut_c + len(ASSISTANT_MARKER)]
    p_r = rejected[: cut_r + len(ASSISTANT_MARKER)]
    prompt = min(p_c, p_r, key=len)
    if p_c != p_r and not (chosen.startswith(prompt) and rejected.startswith(prompt)):
        raise _Invalid(IMPLICIT, "rejected", f"implicit prompt: chosen and rejected have different "
                       f"prompts (the text up to the last {ASSISTANT_MARKER!r} differs)")
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def _normalise_paired(rec: dict, source: str) -> tuple[PairRow, str]:
    why = "paired rows need 'chosen' and 'rejected'"
    chosen_v, rejected_v = _require(rec, "chosen", why), _require(rec, "rejected", why)
    conv = _conv_key(rec)
    used = {"chosen", "rejected"}
    if conv is not None:  # ShareGPT / LLaMA-Factory
        fmt, used = "sharegpt", used | {conv, "system"}
        prompt = _check_prompt(_with_system(rec, _messages(rec[conv], conv)), conv)
        chosen = _assistant_text(chosen_v, "chosen", prompt)
        rejected = _assistant_text(rejected_v, "rejected", prompt)
    elif _has(rec, "prompt"):
        used.add("prompt")
        prompt_v = rec["prompt"]
        if isinstance(prompt_v, str):
            fmt, prompt = "standard", prompt_v
            chosen = _text(chosen_v, "chosen", "a string (the prompt is a string)")
            rejected = _text(rejected_v, "rejected", "a string (the prompt is a string)")
        elif isinstance(prompt_v, (list, tuple)):
            fmt = "conversational"
            prompt = _check_prompt(_messages(prompt_v, "prompt"), "prompt")
            chosen = _assistant_text(chosen_v, "chosen", prompt)
            rejected = _assistant_text(rejected_v, "rejected", prompt)
        else:
            raise _Invalid(WRONG_TYPE, "prompt", f"wrong type: expected a string or a list of messages, "
                           f"got {_describe(prompt_v)}")
    elif isinstance(chosen_v, str):  # hh-rlhf raw transcripts
        fmt = "hh-rlhf"
        rejected_v = _text(rejected_v, "rejected", "a string (chosen is a string transcript)")
        prompt, chosen, rejected = _split_transcripts(chosen_v, rejected_v)
    else:  # full conversations, implicit prompt
        fmt = "implicit-conversational"
        c_msgs = _messages(chosen_v, "chosen")
        if isinstance(rejected_v, str):
            raise _Invalid(WRONG_TYPE, "rejected", "wrong type: expected a list of messages (chosen is one), "
                           f"got {_describe(rejected_v)}")
        r_msgs = _messages(rejected_v, "rejected")
        if c_msgs[:-1] != r_msgs[:-1]:
            raise _Invalid(IMPLICIT, "rejected", "implicit prompt: chosen and rejected conversations differ "
                           "before their last message")
        prompt = _check_prompt(c_msgs[:-1], "chosen")
        chosen = _assistant_text(c_msgs[-1:], "chosen", None)
        rejected = _assistant_text(r_msgs[-1:], "rejected", None)
    _check_pair(chosen, rejected)
    return PairRow(prompt, chosen, rejected, source, _meta(rec, fmt, used)), fmt


def _normalise_unpaired(rec: dict, source: str, threshold: float) -> tuple[UnpairedRow, str]:
    conv = _conv_key(rec)
    if _has(rec, "prompt") or _has(rec, "completion"):
        fmt, used = "prompt-completion", {"prompt", "completion"}
        why = "unpaired rows need 'prompt' and 'completion' (or 'messages')"
        prompt_v, completion_v = _require(rec, "prompt", why), _require(rec, "completion", why)
        if isinstance(prompt_v, str):
            prompt = prompt_v
            completion = _text(completion_v, "completion", "a string (the prompt is a string)")
        elif isinstance(prompt_v, (list, tuple)):
            prompt = _check_prompt(_messages(prompt_v, "prompt"), "prompt")
            completion = _assistant_text(completion_v, "completion", prompt)
        else:
            raise _Invalid(WRONG_TYPE, "prompt", f"wrong type: expected a string or a list of messages, "
                           f"got {_describe(prompt_v)}")
        completion = _nonempty(completion, "completion")
    elif conv is not None:
        fmt, used = "messages", {conv, "system"}
        msgs = _with_system(rec, _messages(rec[conv], conv))
        if not msgs or msgs[-1]["role"] != "assistant":
            raise _Invalid(BAD_CONVERSATION, conv, "the conversation must end with the assistant's reply")
        prompt = _check_prompt(msgs[:-1], conv)
        completion = _nonempty(msgs[-1]["content"], conv)
    else:
        raise _Invalid(MISSING, "completion", "missing field (unpaired rows need 'prompt' and 'completion', "
                       "or 'messages')")
    meta = _meta(rec, fmt, used | {"label", "rating"})
    if _has(rec, "label"):
        label = _label(rec["label"])
        if _has(rec, "rating"):
            meta["rating"] = _rating(rec["rating"])
    elif _has(rec, "rating"):
        rating = _rating(rec["rating"])
        label, meta["rating"], fmt = rating >= threshold, rating, fmt + "+rating"
        meta["format"] = fmt
    else:
        raise _Invalid(MISSING, "label", "missing field (unpaired rows need 'label' or 'rating')")
    return UnpairedRow(prompt, completion, label, source, meta), fmt


def _label(v: Any) -> bool:
    """bool, 0/1, or the strings "true"/"false"/"1"/"0" (any case)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, numbers.Real) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):
        return v.strip().lower() in ("true", "1")
    raise _Invalid(WRONG_TYPE, "label", f"wrong type: expected a boolean (true/false), got {_describe(v)}")


def _rating(v: Any) -> float:
    """A finite number, or a string holding one (CSV)."""
    x = None
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        x = float(v)
    elif isinstance(v, str):
        try:
            x = float(v.strip())
        except ValueError:
            pass
    if x is None or not math.isfinite(x):
        raise _Invalid(WRONG_TYPE, "rating", f"wrong type: expected a number, got {_describe(v)}")
    return x


def _meta(rec: dict, fmt: str, used: Iterable[str]) -> dict:
    """``{"format": fmt}`` plus any other non-null columns under ``"extra"``."""
    used = set(used)
    extra = {k: v for k, v in rec.items() if k not in used and v is not None}
    return {"format": fmt, "extra": extra} if extra else {"format": fmt}
