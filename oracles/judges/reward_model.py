"""A local reward model as a pairwise judge.

Any ``AutoModelForSequenceClassification`` with one output (``num_labels=1``) scores
``prompt + response``: through the tokenizer's chat template when it has one (a user turn
and an assistant turn), else the prompt, ``separator`` and the response concatenated. A is
better when ``score_a - score_b > tie_margin``, B when it is below ``-tie_margin``, else tie;
``prob_a = sigmoid(score_a - score_b)`` (the Bradley-Terry probability).

Inputs longer than ``max_length`` tokens lose tokens from the start (a leading special token
such as BOS/CLS is kept), so the end of the response, where decoder reward models read their
score, is always seen. Batches are right-padded with the model's pad token; a model and
tokenizer with no pad token at all are scored one sequence at a time.
"""

from __future__ import annotations

import logging
from os import PathLike
from typing import Any, Sequence

import torch

from oracles.judges.base import Judgement, PairwiseJudge, check_batch, register_judge

log = logging.getLogger(__name__)


@register_judge("reward_model")
class RewardModelJudge(PairwiseJudge):
    name = "reward_model"
    extra_stat_keys = ("sequences_scored",)

    def __init__(
        self,
        model: str | PathLike | Any,
        tokenizer: str | PathLike | Any | None = None,
        batch_size: int = 16,
        tie_margin: float = 0.0,
        device: str | torch.device = "cpu",
        max_length: int = 1024,
        *,
        separator: str = "\n",
        use_chat_template: bool = True,
        dtype: Any = None,
        trust_remote_code: bool = False,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if tie_margin < 0:
            raise ValueError("tie_margin must be >= 0")
        if max_length < 2:
            raise ValueError("max_length must be >= 2")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(model, (str, PathLike)):
            kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
            if dtype is not None:
                kwargs["dtype"] = dtype
            self.model_name = str(model)
            model_obj = AutoModelForSequenceClassification.from_pretrained(self.model_name, **kwargs).to(device)
            if tokenizer is None:
                tokenizer = self.model_name
        else:
            # A model object stays on its own device; inputs are sent there.
            self.model_name = type(model).__name__
            model_obj = model
            if tokenizer is None:
                raise ValueError("RewardModelJudge needs tokenizer= when given a model object")
        if isinstance(tokenizer, (str, PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=trust_remote_code)
        self.model = model_obj.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.tie_margin = float(tie_margin)
        self.max_length = int(max_length)
        self.separator = separator
        self.use_chat_template = use_chat_template

        config = self.model.config
        num_labels = getattr(config, "num_labels", 1)
        if num_labels != 1:
            raise ValueError(f"a reward model must have one output (num_labels=1), this one has {num_labels}")
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        pad = getattr(text_config, "pad_token_id", None)
        if pad is None and getattr(tokenizer, "pad_token_id", None) is not None:
            pad = tokenizer.pad_token_id
            text_config.pad_token_id = pad  # the model locates the last real token through it
            log.info("reward model: no pad_token_id in the model config; using the tokenizer's (%s)", pad)
        if pad is None:
            log.warning("reward model: no pad token in model or tokenizer; scoring one sequence at a time")
        self._pad_id: int | None = pad
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])

    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:  # pragma: no cover
            return torch.device("cpu")

    def _encode(self, prompt: str, response: str) -> list[int]:
        tok = self.tokenizer
        if self.use_chat_template and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
            )
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
        else:
            ids = list(tok(prompt + self.separator + response)["input_ids"])
        if len(ids) > self.max_length:
            head = ids[:1] if ids and ids[0] in self._special else []
            ids = head + ids[len(ids) - (self.max_length - len(head)):]
        if not ids:
            raise ValueError("the tokenizer produced no tokens for a prompt/response pair")
        return ids

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Reward of each (prompt, response), float32 on the CPU, shape (len(prompts),)."""
        if len(prompts) != len(responses):
            raise ValueError("prompts and responses must have the same length")
        unique: dict[tuple[str, str], int] = {}
        index = [unique.setdefault((p, r), len(unique)) for p, r in zip(prompts, responses)]
        encoded = [self._encode(p, r) for p, r in unique]
        scores = torch.empty(len(encoded), dtype=torch.float32)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        bs = self.batch_size if self._pad_id is not None else 1
        device = self.device
        for start in range(0, len(order), bs):
            chunk = order[start:start + bs]
            width = max(len(encoded[i]) for i in chunk)
            pad = self._pad_id if self._pad_id is not None else 0
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
                mask[row, : len(encoded[i])] = 1
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            scores[torch.tensor(chunk)] = logits.reshape(len(chunk), -1)[:, 0].float().cpu()
        self._count("sequences_scored", len(encoded))
        return scores[torch.tensor(index, dtype=torch.long)] if index else scores

    def judge(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> list[Judgement]:
        check_batch(prompts, responses_a, responses_b)
        n = len(prompts)
        if n == 0:
            return []
        scores = self.score(list(prompts) * 2, list(responses_a) + list(responses_b))
        diff = scores[:n] - scores[n:]
        prob = torch.sigmoid(diff)
        out = []
        for d, pa in zip(diff.tolist(), prob.tolist()):
            verdict = "A" if d > self.tie_margin else "B" if d < -self.tie_margin else "tie"
            out.append(Judgement(verdict, float(pa), f"score_a - score_b = {d:.6g}"))
        self._count("calls", n)
        return out

    def __repr__(self) -> str:
        return (
            f"RewardModelJudge(model={self.model_name!r}, batch_size={self.batch_size}, "
            f"tie_margin={self.tie_margin}, device={str(self.device)!r}, max_length={self.max_length})"
        )
