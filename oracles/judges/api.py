"""LLM-as-a-judge over HTTP APIs (the import path the package has always offered).

The code lives in smaller modules: :mod:`oracles.judges.api_base` (what every API judge
guarantees: retries, cache, budget), :mod:`.swap_plan` (both orders, position bias,
identical-response ties), :mod:`.openai_judge`
(chat.completions and its length field), :mod:`.anthropic_judge` (messages API),
:mod:`.transport` (key, statuses, event loop) and :mod:`.budget`. Options: docs/judges.md.
"""

from oracles.judges.anthropic_judge import AnthropicJudge
from oracles.judges.api_base import APIJudge
from oracles.judges.openai_judge import TOKEN_PARAMS, OpenAIJudge, length_fields
from oracles.judges.transport import FATAL_STATUS, RETRYABLE_STATUS

__all__ = ["APIJudge", "AnthropicJudge", "OpenAIJudge", "TOKEN_PARAMS", "length_fields",
           "FATAL_STATUS", "RETRYABLE_STATUS"]
