"""The embedded default: a tiny causal LM, its tokenizer, and a generated preference task.

The task ("polite replies"). A prompt is a few topic words; a response is a fixed number of
words drawn from three groups: polite words, rude words and neutral words. The **gold**
preference: the response with the higher score ``#polite - #rude`` wins (ties are never
generated). Training labels are flipped with probability ``min(0.5, 2 * noise / gap)`` where
``gap`` is the gold score difference: like human annotators, the labels are mostly wrong on
close calls (the label noise compo is built for); held-out pairs keep their gold labels, so preference accuracy can be measured
exactly.

The reference model is the random tiny Llama after a short SFT on responses in which polite
words are slightly more common than rude ones: like a real SFT model it already leans toward
the gold preference, confidently on pairs with a large score gap (clean by the margin rule)
and hardly at all on close pairs (noisy). Everything is built locally and seeded: no download.
"""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from compo.core.config import ToyDataConfig, ToyModelConfig
from compo.data.rows import PairRow

POLITE = ["please", "thanks", "glad", "sure", "happy", "kindly", "welcome", "great"]
RUDE = ["no", "ugh", "whatever", "stupid", "never", "boring", "meh", "bad"]
NEUTRAL = [
    "the", "a", "it", "is", "we", "can", "do", "that", "this", "will", "be", "here",
    "now", "then", "so", "and", "you", "there", "with", "for", "on", "in", "at", "of",
]
TOPICS = ["weather", "music", "code", "food", "travel", "books", "sport", "math", "film", "art", "games", "news"]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "Q:", "A:"]
SFT_MIX = (0.30, 0.20, 0.50)  # polite, rude, neutral word frequencies the reference is trained on


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the toy vocabulary (built in-process with `tokenizers`)."""
    vocab = {w: i for i, w in enumerate(SPECIALS + POLITE + RUDE + NEUTRAL + TOPICS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def build_model(cfg: ToyModelConfig, vocab_size: int, seed: int) -> LlamaForCausalLM:
    """A random tiny Llama with a tied head (like SmolLM2), seeded."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 2,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def gold_score(response: str) -> int:
    words = response.split()
    return sum(w in POLITE for w in words) - sum(w in RUDE for w in words)


def _prompt(rng: random.Random) -> str:
    return "Q: " + " ".join(rng.choice(TOPICS) for _ in range(rng.randint(2, 4))) + " A:"


def _response(rng: random.Random, n_words: int, mix: tuple[float, float, float]) -> str:
    groups = rng.choices([POLITE, RUDE, NEUTRAL], weights=mix, k=n_words)
    return " ".join(rng.choice(g) for g in groups)


def make_pairs(n: int, cfg: ToyDataConfig, seed: int, noise: float) -> list[PairRow]:
    """Pairs with gold labels; a pair with gold gap g is flipped with probability min(0.5, 2 noise / g).

    ``meta["gold"]`` is True when ``chosen`` is the gold-preferred response.
    """
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        a = _response(rng, cfg.response_words, _mix(rng))
        b = _response(rng, cfg.response_words, _mix(rng))
        sa, sb = gold_score(a), gold_score(b)
        if sa == sb:
            continue
        good, bad = (a, b) if sa > sb else (b, a)
        flipped = rng.random() < min(0.5, 2 * noise / abs(sa - sb))
        chosen, rejected = (bad, good) if flipped else (good, bad)
        rows.append(PairRow(_prompt(rng), " " + chosen, " " + rejected, f"toy:{len(rows) + 1}",
                            {"gold": not flipped, "gold_gap": abs(sa - sb)}))
    return rows


def _mix(rng: random.Random) -> tuple[float, float, float]:
    """Random word-group frequencies, so responses range from very polite to very rude."""
    p, r = rng.random(), rng.random()
    return (p, r, 1.0)


def sft_texts(n: int, cfg: ToyDataConfig, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [_prompt(rng) + " " + _response(rng, cfg.response_words, SFT_MIX) + " </s>" for _ in range(n)]


def sft(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, texts: list[str], steps: int,
        lr: float, seed: int, batch_size: int = 32) -> LlamaForCausalLM:
    """A short next-token SFT that turns the random model into a reference that knows the language."""
    if steps == 0:
        return model
    gen = torch.Generator().manual_seed(seed)
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (batch_size,), generator=gen)
        loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def build_reference(cfg: ToyModelConfig, data_cfg: ToyDataConfig, seed: int):
    """(model, tokenizer): the tiny reference model, SFT'd on the toy language."""
    tokenizer = build_tokenizer()
    model = build_model(cfg, len(tokenizer), seed)
    texts = sft_texts(2048, data_cfg, seed + 1)
    return sft(model, tokenizer, texts, cfg.sft_steps, cfg.sft_lr, seed), tokenizer


def toy_dataset(cfg: ToyDataConfig, seed: int) -> tuple[list[PairRow], list[PairRow]]:
    """(train pairs with label noise, held-out pairs with gold labels)."""
    return make_pairs(cfg.n_train, cfg, seed + 2, cfg.noise), make_pairs(cfg.n_eval, cfg, seed + 3, 0.0)
