"""Pairwise judges: which of two responses to a prompt is better.

Registered names: "openai", "anthropic" (LLM-as-a-judge over HTTP APIs), "reward_model" (a
local sequence-classification reward model), "human" (a person at the terminal) and
"human_web" (a person in the browser, same answer record). Others load through an entry
point in group ``compo.judges`` or as ``module:Class``:
``build_judge("openai", model="gpt-4o-mini", swap=True, cache_path="runs/judge.sqlite")``.
Every option of the built-in judges, with its default: docs/judges.md.
"""

from oracles.judges.base import (
    STAT_KEYS,
    VERDICTS,
    Judgement,
    JudgeError,
    JudgeQuit,
    PairwiseJudge,
    Verdict,
    available_judges,
    build_judge,
    combine_swapped,
    flip,
    register_judge,
    run_totals,
    totals_line,
)
from oracles.judges.cache import JudgeCache, request_key
from oracles.judges.prompting import (
    DEFAULT_TEMPLATE,
    load_template,
    parse_verdict,
    render,
    resolve_template,
    validate_template,
)
from oracles.judges.api import AnthropicJudge, APIJudge, OpenAIJudge
from oracles.judges.reward_model import RewardModelJudge
from oracles.judges.human import HumanJudge
from oracles.judges.human_web import WebHumanJudge

__all__ = [
    "STAT_KEYS", "VERDICTS", "Judgement", "JudgeError", "JudgeQuit", "PairwiseJudge", "Verdict",
    "available_judges", "build_judge", "combine_swapped", "flip", "register_judge", "run_totals", "totals_line",
    "JudgeCache", "request_key",
    "DEFAULT_TEMPLATE", "load_template", "parse_verdict", "render", "resolve_template", "validate_template",
    "APIJudge", "AnthropicJudge", "OpenAIJudge", "RewardModelJudge", "HumanJudge",
    "WebHumanJudge",
]
