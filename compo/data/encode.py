"""Rows -> token ids: chat templates, truncation, and padded batches with completion masks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from compo.data.rows import PairRow, Prompt, UnpairedRow


@dataclass
class Encoded:
    """Token ids of one prompt and its completions (one for unpaired rows, two for pairs)."""

    index: int  # position of the row in the input list
    prompt: list[int]
    completions: tuple[list[int], ...]


@dataclass
class EncodeResult:
    items: list[Encoded]
    n_dropped: int  # rows whose prompt alone exceeded max_prompt_length
    n_truncated: int  # rows with at least one completion truncated to fit max_length


def render_prompt(prompt: Prompt, tokenizer) -> tuple[str, bool]:
    """Prompt text, and whether it already holds the special tokens (chat template applied)."""
    if isinstance(prompt, str):
        return prompt, False
    messages = [dict(m) for m in prompt]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:", False


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_rows(
    rows: Sequence[PairRow | UnpairedRow], tokenizer, max_length: int, max_prompt_length: int, add_eos: bool = True
) -> EncodeResult:
    """Tokenize prompt and completions separately (as TRL does) and apply the length policy.

    Rows whose prompt alone is longer than ``max_prompt_length`` are dropped and counted;
    completions are truncated so prompt + completion fits in ``max_length``.
    """
    items, dropped, truncated = [], 0, 0
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    for i, row in enumerate(rows):
        text, templated = render_prompt(row.prompt, tokenizer)
        prompt_ids = _ids(tokenizer, text, special=not templated)
        if len(prompt_ids) > max_prompt_length:
            dropped += 1
            continue
        texts = (row.chosen, row.rejected) if isinstance(row, PairRow) else (row.completion,)
        room = max_length - len(prompt_ids)
        comps = []
        for t in texts:
            ids = _ids(tokenizer, t, special=False) + eos
            if len(ids) > room:
                ids = ids[:room]
                truncated += 1
            comps.append(ids)
        items.append(Encoded(i, prompt_ids, tuple(comps)))
    return EncodeResult(items, dropped, truncated)


def collate(
    sequences: Sequence[tuple[list[int], list[int]]], pad_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad (prompt, completion) id lists into input_ids, attention_mask and completion_mask."""
    width = max(len(p) + len(c) for p, c in sequences)
    n = len(sequences)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    completion = torch.zeros((n, width), dtype=torch.bool)
    for j, (p, c) in enumerate(sequences):
        ids = p + c
        start = width - len(ids) if padding_side == "left" else 0
        input_ids[j, start : start + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[j, start : start + len(ids)] = 1
        completion[j, start + len(p) : start + len(ids)] = True
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding, so left- and right-padded rows give identical results."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else (tokenizer.eos_token_id or 0)
