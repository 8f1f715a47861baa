"""The one row type every data format is normalised into.

A prompt is either plain text or a conversation (a tuple of ``{"role", "content"}``
messages); completions are always the assistant's text. ``source`` names the file and
row the example came from so later errors can point back at it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from compo.core.errors import UserError

Message = dict  # {"role": str, "content": str}
Prompt = Union[str, tuple]  # str, or tuple[Message, ...] for conversational data


@dataclass(frozen=True)
class PairRow:
    """A preference pair: ``chosen`` was preferred to ``rejected`` for ``prompt``."""

    prompt: Prompt
    chosen: str
    rejected: str
    source: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)


@dataclass(frozen=True)
class UnpairedRow:
    """A single completion with a thumbs-up (``label=True``) or thumbs-down judgement."""

    prompt: Prompt
    completion: str
    label: bool
    source: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)


class DataError(UserError):
    """Invalid input data; the message names the file, the row number and the field."""

    def __init__(self, file: str, row: int | None, field_name: str | None, reason: str):
        self.file, self.row, self.field, self.reason = file, row, field_name, reason
        where = file
        if row is not None:
            where += f", row {row}"
        if field_name is not None:
            where += f", field '{field_name}'"
        super().__init__(where, reason)
