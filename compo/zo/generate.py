"""Generation under many output layers at once, for oracles that judge generated text.

All candidates share the frozen body, so one batched forward serves every (candidate, prompt)
row; only the last step differs: row (i, p) takes logits ``h W^T + s_i h z_i^T``. No model copy
per candidate. Sampling is seeded per (run seed, step, candidate index, prompt index), so a
candidate's text does not depend on which other candidates share its batch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from compo.data.encode import collate
from compo.scoring.logprobs import position_ids_from_mask
from compo.zo.perturb import perturbation_seed


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0


def _body(model):
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise ValueError(f"{type(model).__name__} exposes no base_model (decoder body) to generate with")
    return body


def cache_keyword(body) -> str:
    """The keyword the body's forward takes its KV cache by: ``cache`` (transformers 5.x; the old
    ``past_key_values`` warns there) or ``past_key_values`` (earlier versions)."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def returned_cache(out):
    """The KV cache a forward returned: ``out.cache`` (transformers 5.x) or ``out.past_key_values``."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class HeadGenerator:
    """Generates responses from the frozen body with base / perturbed output layers."""

    def __init__(self, model, tokenizer, settings: GenerationSettings, seed: int = 0):
        self.model, self.tokenizer, self.settings, self.seed = model, tokenizer, settings, seed
        self.body = _body(model)
        self.cache_kw = cache_keyword(self.body)
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)

    def _logits(self, h: torch.Tensor, w: torch.Tensor, z: torch.Tensor | None, scales: torch.Tensor | None,
                n_heads: int) -> torch.Tensor:
        logits = h.float() @ w.T
        head = self.model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias.float()
        if z is not None:
            p = h.shape[0] // n_heads
            extra = torch.bmm(h.float().view(n_heads, p, -1), z.transpose(1, 2))
            logits = logits + (scales.view(-1, 1, 1) * extra).reshape(h.shape[0], -1)
        return logits

    def _pick(self, logits: torch.Tensor, step: int, keys: list[tuple[int, int]], pos: int) -> torch.Tensor:
        if not self.settings.do_sample:
            return logits.argmax(-1)
        out = torch.empty(logits.shape[0], dtype=torch.long)
        gen = torch.Generator()
        for r, (cand, prompt) in enumerate(keys):
            gen.manual_seed(perturbation_seed(self.seed, step, (cand + 1) * 1_000_003 + prompt * 4099 + pos))
            u = torch.rand(logits.shape[1], generator=gen).clamp_(1e-12, 1 - 1e-12)
            gumbel = -torch.log(-torch.log(u))
            out[r] = int((logits[r].cpu() / self.settings.temperature + gumbel).argmax())
        return out.to(logits.device)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], w: torch.Tensor, z: torch.Tensor | None = None,
                 scales: torch.Tensor | None = None, step: int = 0, indices: list[int] | None = None) -> list[list[str]]:
        """Responses per head: shape (n_heads, len(prompts)); n_heads = 1 (base ``w``) or len(z).

        ``indices`` are the candidates' global perturbation indices (for seeded sampling); the
        base head uses index -1.
        """
        n_heads = 1 if z is None else z.shape[0]
        indices = indices if indices is not None else ([-1] if z is None else list(range(n_heads)))
        device = w.device
        rows = [p for _ in range(n_heads) for p in prompts]
        keys = [(indices[i], j) for i in range(n_heads) for j in range(len(prompts))]
        batch = collate([(p, []) for p in rows], self.pad, padding_side="left")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = self.body(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True)
        cache, h = returned_cache(out), out.last_hidden_state[:, -1]
        pos = position_ids_from_mask(mask)[:, -1]
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        tokens: list[torch.Tensor] = []
        for t in range(self.settings.max_new_tokens):
            nxt = self._pick(self._logits(h, w, z, scales, n_heads), step, keys, t)
            nxt = torch.where(done, torch.full_like(nxt, self.pad), nxt)
            tokens.append(nxt)
            if self.eos is not None:
                done |= nxt == self.eos
            if bool(done.all()) or t + 1 == self.settings.max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos + 1
            out = self.body(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                            use_cache=True, **{self.cache_kw: cache})
            cache, h = returned_cache(out), out.last_hidden_state[:, -1]
        gen = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in rows]
        texts = []
        for seq in gen:
            if self.eos is not None and self.eos in seq:
                seq = seq[: seq.index(self.eos)]
            texts.append(self.tokenizer.decode(seq, skip_special_tokens=True))
        return [texts[i * len(prompts) : (i + 1) * len(prompts)] for i in range(n_heads)]
