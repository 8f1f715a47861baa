"""Read preference data from files, ``datasets`` directories or the hub, and normalise it.

Every supported format (DESIGN.md section 5) becomes a list of :class:`~compo.data.rows.PairRow`
(paired data) or :class:`~compo.data.rows.UnpairedRow` (thumbs-up / thumbs-down data):

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

OpenAssistant message trees (``{message_tree_id, prompt: {..., replies}}`` per row) are read by
:mod:`compo.data.oasst`: ranked sibling replies give pairs, ``+1``/``-1`` emojis give unpaired rows.

Invalid rows raise :class:`~compo.data.rows.DataError` naming the file, the 1-based row and the field,
or with ``on_invalid="skip"`` are dropped and counted by reason.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from compo.data.oasst import FORMAT as OASST_FORMAT, is_tree, normalise_trees
from compo.data.readers import FILE_TYPES, read_records  # noqa: F401 - re-exported
from compo.data.normalise import (  # noqa: F401 - the format names and skip reasons are re-exported
    ACCEPTED_FORMATS, ASSISTANT_MARKER, BAD_CONVERSATION, EMPTY, IDENTICAL, IMPLICIT, MISSING, UNRECOGNISED,
    WRONG_TYPE, Invalid, kind_message, normalise_paired, normalise_unpaired, row_kind as record_kind,
)
from compo.data.rows import DataError, PairRow, UnpairedRow

__all__ = [
    "LoadResult",
    "read_records",
    "normalise_records",
    "load_rows",
    "pairs_to_unpaired",
    "ACCEPTED_FORMATS",
    "ASSISTANT_MARKER",
]

@dataclass
class LoadResult:
    """Normalised rows plus what was skipped and where they came from."""

    rows: list  # list[PairRow] or list[UnpairedRow]
    kind: str  # "paired" or "unpaired"
    n_skipped: int  # invalid rows skipped (on_invalid="skip")
    skipped: dict[str, int]  # reason -> count
    source: str  # display name of where the data came from
    formats: dict[str, int] = field(default_factory=dict)  # detected format -> row count


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
    if records and is_tree(records[0]):
        rows, found, skipped = normalise_trees(records, file, kind=kind, on_invalid=on_invalid)
        return LoadResult(rows=rows, kind=found, n_skipped=sum(skipped.values()), skipped=skipped,
                          source=file, formats={OASST_FORMAT: len(rows)})
    found_kind, first_row = (None if kind == "auto" else kind), None
    rows: list = []
    skipped: dict[str, int] = {}
    formats: dict[str, int] = {}
    for i, rec in enumerate(records, 1):
        try:
            row_kind = record_kind(rec)
            if found_kind is not None and row_kind != found_kind:
                raise DataError(file, i, None, kind_message(row_kind, found_kind, kind, first_row))
            found_kind, first_row = row_kind, first_row or i
            if row_kind == "paired":
                row, fmt = normalise_paired(rec, f"{file}:{i}")
            else:
                row, fmt = normalise_unpaired(rec, f"{file}:{i}", rating_threshold)
        except Invalid as bad:
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
