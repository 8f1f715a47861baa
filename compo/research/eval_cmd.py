"""`compo eval`: held-out metrics of any saved model against its reference, with intervals.

Likelihood metrics (accuracy, implicit rewards, displacement: see compo/scoring/evaluate.py) on the
held-out pairs of the config's data; with ``eval.generate`` N, greedy responses to N held-out
prompts from both models give verbosity (``gen/length``), the gold score on the toy task
(``gold/*``) and, with ``eval.judge``, the win rate against the reference (ties count half).
Writes ``eval.json`` (``eval.out``) and prints one line per metric.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compo.core.config import RunConfig
from compo.core.errors import UserError
from compo.scoring.evaluate import pair_values, summarise
from compo.scoring.logprobs import score_pairs
from compo.core.rundir import RunDir, atomic_write_json
from compo.run.workspace import say


def _paths(cfg: RunConfig) -> tuple[str, str]:
    run = RunDir(cfg.run_dir)
    model = cfg.eval.model or str(run.model)
    ref = cfg.eval.reference or (str(run.reference) if run.reference.exists() else cfg.model.path)
    if ref == "toy":
        raise UserError("eval.reference", f"the toy reference is built by a run: give a run dir that holds one "
                        f"({run.reference} does not exist) or set eval.reference")
    return model, ref


def _judge(cfg: RunConfig):
    if cfg.eval.judge is None:
        return None
    from oracles.judges import build_judge
    from oracles.options import OptionError

    try:
        return build_judge(cfg.eval.judge, **cfg.eval.judge_options)
    except OptionError as e:
        raise UserError(f"eval.judge_options.{e.key}" if e.key else "eval.judge_options", e.what) from None
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the judge's own constructor check
        raise UserError("eval.judge", f"cannot build judge '{cfg.eval.judge}': {e}") from None


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16) -> tuple[list[str], list[int]]:
    """Greedy responses (text, token count up to and excluding EOS) to tokenized prompts."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    texts, lengths = [], []
    for a in range(0, len(prompts), batch_size):
        chunk = prompts[a : a + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=eos)[:, width:]
        for row in out.tolist():
            n = row.index(eos) if eos in row else len(row)
            lengths.append(n)
            texts.append(tokenizer.decode(row[:n], skip_special_tokens=True))
    return texts, lengths


def _verdict_value(v: str) -> float | None:
    return {"A": 1.0, "B": 0.0, "tie": 0.5}.get(v)


def generation_values(cfg: RunConfig, held, items, model, ref, tokenizer, judge) -> dict[str, torch.Tensor]:
    """Per-prompt values of the generation metrics (means are the metrics)."""
    n = min(cfg.eval.generate, len(items))
    prompts = [items[i].prompt for i in range(n)]
    say(f"eval: generating {n} responses per model (greedy, max {cfg.eval.max_new_tokens} tokens)")
    out_m, len_m = generate(model, tokenizer, prompts, cfg.eval.max_new_tokens)
    out_r, len_r = generate(ref, tokenizer, prompts, cfg.eval.max_new_tokens)
    vals = {"gen/length": torch.tensor(len_m, dtype=torch.float64),
            "gen/length_reference": torch.tensor(len_r, dtype=torch.float64)}
    if cfg.data.path == "toy":
        from compo.data.toy import gold_score

        gm = torch.tensor([gold_score(t) for t in out_m], dtype=torch.float64)
        gr = torch.tensor([gold_score(t) for t in out_r], dtype=torch.float64)
        vals.update({"gold/score": gm, "gold/score_reference": gr,
                     "gold/win_rate": (gm > gr).double() + 0.5 * (gm == gr).double()})
    if judge is not None:
        from oracles.generation import prompt_text

        texts = [prompt_text(held[items[i].index].prompt) for i in range(n)]
        verdicts = [_verdict_value(j.verdict) for j in judge.judge(texts, out_m, out_r)]
        kept = [v for v in verdicts if v is not None]
        if not kept:
            raise UserError("eval.judge", f"the judge abstained on all {n} comparisons")
        vals["winrate/judge"] = torch.tensor(kept, dtype=torch.float64)
    return vals


def run_eval(cfg: RunConfig) -> dict:
    """Evaluate ``eval.model`` (default run_dir/model) against ``eval.reference``; write eval.json."""
    from compo.data.encode import encode_rows
    from compo.scoring.models import check_device, check_model_path, load_pretrained
    from compo.run.workspace import load_data

    device = check_device(cfg.model.device)
    model_path, ref_path = _paths(cfg)
    check_model_path("eval.model", model_path)
    check_model_path("eval.reference", ref_path)
    _, held, _ = load_data(cfg)
    if not held:
        raise UserError("data.eval_path", "no held-out pairs: set data.eval_path or data.eval_fraction (or use the toy task)")
    judge = _judge(cfg)
    try:
        model, tokenizer = load_pretrained(model_path, cfg)
        ref, _ = load_pretrained(ref_path, cfg)
        model.to(device).eval()
        ref.to(device).eval()
        enc = encode_rows(held, tokenizer, cfg.data.max_length, cfg.data.max_prompt_length)
        if not enc.items:
            raise UserError(cfg.data.eval_path or cfg.data.path, "every held-out pair was dropped by data.max_prompt_length")
        if enc.n_dropped:
            say(f"eval: dropped {enc.n_dropped} of {len(held)} held-out pairs whose prompt exceeds "
                f"data.max_prompt_length={cfg.data.max_prompt_length}")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        s = score_pairs(model, enc.items, pad, cfg.split.batch_size, desc="eval model", shared=cfg.model.share_prompt)
        r = score_pairs(ref, enc.items, pad, cfg.split.batch_size, desc="eval reference",
                     shared=cfg.model.share_prompt)
        vals = pair_values(s, r, cfg.stage1.beta)
        vals.pop("margin")
        metrics = summarise(vals, cfg.eval.bootstrap, cfg.eval.level, cfg.seed)
        if cfg.eval.generate:
            gen = generation_values(cfg, held, enc.items, model, ref, tokenizer, judge)
            metrics.update(summarise(gen, cfg.eval.bootstrap, cfg.eval.level, cfg.seed + 1))
    finally:
        if judge is not None:
            judge.close()
    out = {"model": model_path, "reference": ref_path, "n_pairs": len(enc.items), "n_dropped": enc.n_dropped,
           "bootstrap": cfg.eval.bootstrap, "level": cfg.eval.level, "metrics": metrics}
    path = Path(cfg.eval.out) if Path(cfg.eval.out).is_absolute() else Path(cfg.run_dir) / cfg.eval.out
    atomic_write_json(path, out)
    for k, m in metrics.items():
        say(f"{k:28s} {m['value']:.4f}  [{m['ci_low']:.4f}, {m['ci_high']:.4f}]  n={m['n']}")
    say(f"eval: wrote {path}")
    return out
