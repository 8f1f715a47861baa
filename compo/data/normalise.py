"""One record of preference data to one normalised row: the format of a record from its keys,
its fields checked (types, empty or identical completions, roles of a conversation), an implicit
prompt split off (hh-rlhf transcripts, prompt-less message lists), and a Likert rating or a label
turned into thumbs-up / thumbs-down. :mod:`compo.data.load` applies it to whole files; an invalid
record raises :class:`Invalid` with one skip reason."""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

from compo.data.rows import PairRow, UnpairedRow

ASSISTANT_MARKER = "\n\nAssistant:"

ACCEPTED_FORMATS = (
    "paired: {prompt, chosen, rejected} (strings or message lists); "
    "{chosen, rejected} (hh-rlhf transcripts or message lists, implicit prompt); "
    "{conversations|messages, chosen, rejected} (ShareGPT); "
    "unpaired: {prompt, completion, label}; {prompt, completion, rating}; "
    "{messages|conversations, label|rating}; "
    "OASST trees"
)


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


class Invalid(Exception):
    """One invalid row: a skip reason, the offending field and a human-readable message."""

    def __init__(self, reason: str, field_name: str | None, message: str):
        super().__init__(message)
        self.reason, self.field, self.message = reason, field_name, message


def _has(rec: dict, key: str) -> bool:
    """A key counts as present unless missing or None (columnar files fill absent keys with None)."""
    return rec.get(key) is not None


def _conv_key(rec: dict) -> str | None:
    return next((k for k in _CONV_KEYS if _has(rec, k)), None)


def row_kind(rec: Any) -> str:
    """"paired" or "unpaired" from the keys alone; raises Invalid for an unrecognised row."""
    if not isinstance(rec, dict):
        raise Invalid(UNRECOGNISED, None, f"unrecognised format: the row is a {type(rec).__name__}, "
                       f"not an object; accepted formats: {ACCEPTED_FORMATS}")
    if _has(rec, "chosen") or _has(rec, "rejected"):
        return "paired"
    if _has(rec, "label") or _has(rec, "rating") or _has(rec, "completion"):
        return "unpaired"
    keys = sorted(str(k) for k in rec if rec[k] is not None)
    raise Invalid(UNRECOGNISED, None, f"unrecognised format: keys found {keys}; "
                   f"accepted formats: {ACCEPTED_FORMATS}")


def kind_message(row_kind: str, have: str, asked: str, first_row: int | None) -> str:
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
        raise Invalid(MISSING, key, f"missing field ({why})")
    return rec[key]


def _text(v: Any, field_name: str, what: str = "a string") -> str:
    if not isinstance(v, str):
        raise Invalid(WRONG_TYPE, field_name, f"wrong type: expected {what}, got {_describe(v)}")
    return v


def _nonempty(text: str, field_name: str) -> str:
    if not text.strip():
        raise Invalid(EMPTY, field_name, "empty completion (empty or whitespace-only)")
    return text


def _check_pair(chosen: str, rejected: str) -> None:
    _nonempty(chosen, "chosen")
    _nonempty(rejected, "rejected")
    if chosen.strip() == rejected.strip():
        raise Invalid(IDENTICAL, "rejected", "chosen and rejected are identical")


def _message(m: Any, field_name: str, pos: int) -> dict:
    """One message as ``{"role", "content"}``; accepts ``{role, content}`` or ``{from, value}``."""
    if not isinstance(m, dict):
        raise Invalid(WRONG_TYPE, field_name, f"wrong type: message {pos} should be an object with "
                       f"role/content (or from/value), got {_describe(m)}")
    role = m.get("role", m.get("from"))
    if role is None:
        raise Invalid(BAD_CONVERSATION, field_name, f"message {pos} has no 'role' (or 'from')")
    norm = _ROLES.get(str(role).lower()) if isinstance(role, str) else None
    if norm is None:
        raise Invalid(BAD_CONVERSATION, field_name, f"message {pos} has unsupported role {role!r} "
                       f"(accepted: {', '.join(sorted(_ROLES))})")
    content = m.get("content", m.get("value"))
    if content is None:
        raise Invalid(MISSING, field_name, f"missing field: message {pos} has no 'content' (or 'value')")
    content = _text(content, field_name, f"message {pos} content to be a string")
    return {"role": norm, "content": content}


def _messages(v: Any, field_name: str) -> list[dict]:
    if not isinstance(v, (list, tuple)):
        raise Invalid(WRONG_TYPE, field_name, f"wrong type: expected a list of messages, got {_describe(v)}")
    return [_message(m, field_name, i) for i, m in enumerate(v, 1)]


def _with_system(rec: dict, msgs: list[dict]) -> list[dict]:
    if _has(rec, "system"):
        system = _text(rec["system"], "system")
        if system.strip():
            return [{"role": "system", "content": system}] + msgs
    return msgs


def _check_prompt(msgs: list[dict], field_name: str) -> tuple:
    if not msgs or msgs[-1]["role"] != "user":
        raise Invalid(BAD_CONVERSATION, field_name, "the prompt conversation must end with a user message")
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
        raise Invalid(BAD_CONVERSATION, field_name, "expected one assistant message (alone or after the "
                       f"prompt's messages), got roles {[m['role'] for m in msgs]}")
    return msgs[0]["content"]


def _split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """hh-rlhf: prompt = text up to and including the last ``"\\n\\nAssistant:"``, shared by both.

    When one side's reply itself contains ``"\\n\\nAssistant:"`` (a reply that carries on the
    dialogue), the shorter of the two prompts is used if both transcripts start with it.
    """
    cut_c, cut_r = chosen.rfind(ASSISTANT_MARKER), rejected.rfind(ASSISTANT_MARKER)
    if cut_c < 0:
        raise Invalid(IMPLICIT, "chosen", f"implicit prompt: no {ASSISTANT_MARKER!r} found in the transcript")
    if cut_r < 0:
        raise Invalid(IMPLICIT, "rejected", f"implicit prompt: no {ASSISTANT_MARKER!r} found in the transcript")
    p_c = chosen[: cut_c + len(ASSISTANT_MARKER)]
    p_r = rejected[: cut_r + len(ASSISTANT_MARKER)]
    prompt = min(p_c, p_r, key=len)
    if p_c != p_r and not (chosen.startswith(prompt) and rejected.startswith(prompt)):
        raise Invalid(IMPLICIT, "rejected", f"implicit prompt: chosen and rejected have different "
                       f"prompts (the text up to the last {ASSISTANT_MARKER!r} differs)")
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def normalise_paired(rec: dict, source: str) -> tuple[PairRow, str]:
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
            raise Invalid(WRONG_TYPE, "prompt", f"wrong type: expected a string or a list of messages, "
                           f"got {_describe(prompt_v)}")
    elif isinstance(chosen_v, str):  # hh-rlhf raw transcripts
        fmt = "hh-rlhf"
        rejected_v = _text(rejected_v, "rejected", "a string (chosen is a string transcript)")
        prompt, chosen, rejected = _split_transcripts(chosen_v, rejected_v)
    else:  # full conversations, implicit prompt
        fmt = "implicit-conversational"
        c_msgs = _messages(chosen_v, "chosen")
        if isinstance(rejected_v, str):
            raise Invalid(WRONG_TYPE, "rejected", "wrong type: expected a list of messages (chosen is one), "
                           f"got {_describe(rejected_v)}")
        r_msgs = _messages(rejected_v, "rejected")
        if c_msgs[:-1] != r_msgs[:-1]:
            raise Invalid(IMPLICIT, "rejected", "implicit prompt: chosen and rejected conversations differ "
                           "before their last message")
        prompt = _check_prompt(c_msgs[:-1], "chosen")
        chosen = _assistant_text(c_msgs[-1:], "chosen", None)
        rejected = _assistant_text(r_msgs[-1:], "rejected", None)
    _check_pair(chosen, rejected)
    return PairRow(prompt, chosen, rejected, source, _meta(rec, fmt, used)), fmt


def normalise_unpaired(rec: dict, source: str, threshold: float) -> tuple[UnpairedRow, str]:
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
            raise Invalid(WRONG_TYPE, "prompt", f"wrong type: expected a string or a list of messages, "
                           f"got {_describe(prompt_v)}")
        completion = _nonempty(completion, "completion")
    elif conv is not None:
        fmt, used = "messages", {conv, "system"}
        msgs = _with_system(rec, _messages(rec[conv], conv))
        if not msgs or msgs[-1]["role"] != "assistant":
            raise Invalid(BAD_CONVERSATION, conv, "the conversation must end with the assistant's reply")
        prompt = _check_prompt(msgs[:-1], conv)
        completion = _nonempty(msgs[-1]["content"], conv)
    else:
        raise Invalid(MISSING, "completion", "missing field (unpaired rows need 'prompt' and 'completion', "
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
        raise Invalid(MISSING, "label", "missing field (unpaired rows need 'label' or 'rating')")
    return UnpairedRow(prompt, completion, label, source, meta), fmt


def _label(v: Any) -> bool:
    """bool, 0/1, or the strings "true"/"false"/"1"/"0" (any case)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, numbers.Real) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):
        return v.strip().lower() in ("true", "1")
    raise Invalid(WRONG_TYPE, "label", f"wrong type: expected a boolean (true/false), got {_describe(v)}")


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
        raise Invalid(WRONG_TYPE, "rating", f"wrong type: expected a number, got {_describe(v)}")
    return x


def _meta(rec: dict, fmt: str, used: Iterable[str]) -> dict:
    """``{"format": fmt}`` plus any other non-null columns under ``"extra"``."""
    used = set(used)
    extra = {k: v for k, v in rec.items() if k not in used and v is not None}
    return {"format": fmt, "extra": extra} if extra else {"format": fmt}
