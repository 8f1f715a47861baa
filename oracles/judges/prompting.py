"""Judge prompt templates and a robust verdict parser.

A template is a ``str.format`` string with exactly the fields ``{prompt}``, ``{response_a}``
and ``{response_b}`` (write literal braces as ``{{`` and ``}}``). The judge is asked to end
with a line ``Verdict: A``, ``Verdict: B`` or ``Verdict: tie``; :func:`parse_verdict` turns
any reply into "A", "B", "tie" or "abstain" and never raises.
"""

from __future__ import annotations

import re
import string
from os import PathLike
from pathlib import Path

TEMPLATE_FIELDS = frozenset({"prompt", "response_a", "response_b"})

DEFAULT_TEMPLATE = """\
You are an impartial judge. Compare two responses to the same user prompt and decide which \
one is better: more helpful, more correct, more honest and harmless, and better at following \
the prompt's instructions. Do not let the order of the responses, their length, or the labels \
A and B influence you. If they are equally good (or equally bad), answer tie.

[Prompt]
{prompt}

[Response A]
{response_a}

[Response B]
{response_b}

Explain your reasoning briefly, then finish with a final line that is exactly one of:
Verdict: A
Verdict: B
Verdict: tie"""


def validate_template(template: str) -> str:
    """Check that ``template`` is a format string using exactly the three judge fields."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"invalid judge template (write literal braces as '{{{{' and '}}}}'): {e}") from e
    bad = {f for f in fields if f not in TEMPLATE_FIELDS}
    if bad:
        raise ValueError(
            f"judge template has unknown fields {sorted(bad)}; allowed: {sorted(TEMPLATE_FIELDS)} "
            "(write literal braces as '{{' and '}}')"
        )
    missing = TEMPLATE_FIELDS - fields
    if missing:
        raise ValueError(f"judge template lacks the fields {sorted(missing)}")
    return template


def load_template(path: str | PathLike) -> str:
    """Read a template file (UTF-8) and validate it."""
    return validate_template(Path(path).expanduser().read_text(encoding="utf-8"))


def resolve_template(template: str | PathLike | None) -> str:
    """None -> the default template; a ``Path`` or a string without braces -> a template
    file to load; any other string -> the template text itself."""
    if template is None:
        return DEFAULT_TEMPLATE
    if isinstance(template, PathLike) or "{" not in template:
        return load_template(template)
    return validate_template(template)


def render(template: str, prompt: str, response_a: str, response_b: str) -> str:
    # str.format never interprets braces inside the substituted texts.
    return template.format(prompt=prompt, response_a=response_a, response_b=response_b)


# -- verdict parsing ----------------------------------------------------------------------

_THINK = re.compile(r"<think(?:ing)?>.*?</think(?:ing)?>", re.S | re.I)
_MARKUP = re.compile(r"[*_`#>]")
_VERDICT_LINE = re.compile(r"\b(?:final\s+)?(?:verdict|decision|winner)\b\s*(?:is)?\s*[:=\-\u2013\u2014]\s*(.*)$", re.I)
_PREFIX = r"(?:the\s+)?(?:(?:response|assistant|answer|output|option|model|candidate)\s*)?"
_TOKEN = re.compile(
    r"^\W*" + _PREFIX + r"(it'?s\s+a\s+tie|a\s+tie|tie|draw|equal(?:ly)?|same|both|neither|a|b)(?![\w'])(.*)$", re.I
)
_AMBIGUOUS_TAIL = re.compile(
    r"^\s*(?:or|and|/|\||vs\.?|versus|,\s*(?:or|and)?)\s*\W*" + _PREFIX + r"(?:a|b|tie)(?![\w'])", re.I
)
_BRACKETED = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.I)


def _normalise(token: str) -> str:
    token = token.lower()
    if token == "a":
        return "A"
    if token == "b":
        return "B"
    return "tie"


def _verdict_from_value(value: str) -> str | None:
    m = _TOKEN.match(value.strip())
    if m is None:
        return None
    if _AMBIGUOUS_TAIL.match(m.group(2)):
        return None  # "Verdict: A or B"
    return _normalise(m.group(1).split()[-1])


def parse_verdict(text: str | None) -> str:
    """Extract "A", "B" or "tie" from a judge reply; "abstain" when none is named clearly.

    Looks, from the last line up, for a line such as ``Verdict: A`` (markdown, "Final
    verdict", "Response B", "[[A]]" and "tie"/"draw"/"equal" are understood); a line naming
    two verdicts is ambiguous. Falls back to a reply consisting of a bare verdict ("B") or to
    MT-Bench style ``[[A]]``/``[[B]]``/``[[C]]`` markers when they all agree.
    """
    if not isinstance(text, str):
        return "abstain"
    try:
        cleaned = _MARKUP.sub("", _THINK.sub("", text))
        lines = [ln.strip() for ln in cleaned.splitlines() if ln.strip()]
        for i in range(len(lines) - 1, -1, -1):
            m = _VERDICT_LINE.search(lines[i])
            if m is None:
                continue
            value = m.group(1).replace("[[", "").replace("]]", "")
            if not value.strip() and i + 1 < len(lines):
                value = lines[i + 1]  # "Verdict:" with the answer on the next line
            if _VERDICT_LINE.search(value):
                return "abstain"  # several "Verdict:" on one line: a restated format, not an answer
            v = _verdict_from_value(value)
            return v if v is not None else "abstain"
        if lines and len(lines[-1]) <= 40:
            whole = lines[-1].strip(" .!\"'[](){}")
            m = _TOKEN.match(whole)
            if m is not None and not m.group(2).strip(" .!\"'[](){}"):
                return _normalise(m.group(1).split()[-1])
        found = {x.lower() for x in _BRACKETED.findall(cleaned)}
        if len(found) == 1:
            x = found.pop()
            return "A" if x == "a" else "B" if x == "b" else "tie"
    except Exception:  # pragma: no cover - parsing must never crash a run
        return "abstain"
    return "abstain"
