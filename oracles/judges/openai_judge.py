"""OpenAIJudge: a judge served by a chat.completions endpoint (OpenAI itself, or any
OpenAI-compatible server through ``base_url``: vLLM, llama.cpp, llama-cpp-python, LM Studio,
Ollama, ...).

The output-length field is the one setting these servers disagree on: OpenAI prefers
``max_completion_tokens`` (and rejects ``max_tokens`` for its reasoning models), while many
compatible servers honour only ``max_tokens`` and silently ignore the other. ``token_param``
chooses what is sent; the default ``auto`` sends ``max_completion_tokens`` to OpenAI's own
hosts and both fields everywhere else, so every server bounds the reply.
"""

from __future__ import annotations

from os import PathLike
from typing import Any, Literal
from urllib.parse import urlparse

from oracles.judges.api_base import APIJudge
from oracles.judges.base import register_judge
from oracles.judges.transport import Completion, Malformed, count, http_status

TokenParam = Literal["auto", "max_tokens", "max_completion_tokens", "both"]
TOKEN_PARAMS: tuple[str, ...] = ("auto", "max_tokens", "max_completion_tokens", "both")
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens")


def is_openai_host(base_url: str | None) -> bool:
    """Whether requests go to OpenAI's own API (the SDK default, api.openai.com or Azure OpenAI)."""
    if base_url is None:
        return True
    host = (urlparse(base_url).hostname or "").lower()
    return host == "api.openai.com" or host.endswith(".openai.azure.com")


def length_fields(token_param: str, base_url: str | None) -> tuple[str, ...]:
    """The request fields that carry the output bound for ``token_param`` at ``base_url``."""
    if token_param not in TOKEN_PARAMS:
        raise ValueError(f"token_param must be one of {', '.join(TOKEN_PARAMS)}, got {token_param!r}")
    if token_param == "auto":
        token_param = "max_completion_tokens" if is_openai_host(base_url) else "both"
    return LENGTH_FIELDS if token_param == "both" else (token_param,)


@register_judge("openai")
class OpenAIJudge(APIJudge):
    """A judge served by an OpenAI chat.completions endpoint (OpenAI, vLLM, llama.cpp, ...).

    ``token_param`` names the output-length field(s): "auto" (default: see the module),
    "max_completion_tokens", "max_tokens" or "both". ``temperature=None`` omits it (for
    models that only accept the default).
    """

    name = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        api_key_file: str | PathLike | None = None,
        template: str | PathLike | None = None,
        swap: bool = False,
        max_concurrency: int = 8,
        max_retries: int = 6,
        timeout: float = 60,
        max_calls: int | None = None,
        max_tokens_total: int | None = None,
        cache_path: str | PathLike | None = None,
        temperature: float | None = 0.0,
        max_output_tokens: int = 1024,
        *,
        token_param: TokenParam = "auto",
        **options: Any,
    ):
        self.token_param = token_param
        self.length_fields = length_fields(token_param, base_url)
        super().__init__(
            model, base_url, api_key_env, api_key_file, template, swap, max_concurrency, max_retries,
            timeout, max_calls, max_tokens_total, cache_path, temperature, max_output_tokens, **options,
        )

    def _params(self) -> dict:
        # The fields actually sent (a one-field setting keeps the cache keys of earlier runs).
        sent = "both" if len(self.length_fields) == 2 else self.length_fields[0]
        return {**super()._params(), "token_param": sent}

    def _make_client(self) -> Any:
        import openai

        return openai.AsyncOpenAI(
            api_key=self._key_for_client(), base_url=self.base_url, max_retries=0, timeout=self.timeout
        )

    def _sdk_errors(self) -> tuple[tuple[type, ...], tuple[type, ...]]:
        import openai
        import pydantic

        return (openai.APIConnectionError,), (openai.APIResponseValidationError, pydantic.ValidationError)

    def _config_error(self, exc: BaseException) -> str | None:
        if http_status(exc) in (400, 422) and any(f in str(exc) for f in LENGTH_FIELDS):
            return (f"the server refused the length field(s) {'/'.join(self.length_fields)} "
                    f"(token_param={self.token_param}): set token_param to max_tokens or "
                    "max_completion_tokens, or lower max_output_tokens")
        return None

    def _overrun_hint(self) -> str:
        if "max_tokens" not in self.length_fields:
            return f" ({'/'.join(self.length_fields)}); set token_param: both (or max_tokens)"
        return " (it honours neither max_tokens nor max_completion_tokens): bound the reply length on the server"

    async def _call_once(self, user_text: str) -> Completion:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": user_text}
        ]
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages}
        kwargs.update({f: self.max_output_tokens for f in self.length_fields})
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body
        resp = await self._client.chat.completions.create(**kwargs)
        choices = getattr(resp, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise Malformed(f"no choices in the response ({type(resp).__name__})")
        message = getattr(choices[0], "message", None)
        if message is None:
            raise Malformed("the first choice has no message")
        text = getattr(message, "content", None)
        if text is None:
            text = getattr(message, "refusal", None) or ""
        if not isinstance(text, str):
            raise Malformed(f"message content is a {type(text).__name__}, not text")
        usage = getattr(resp, "usage", None)
        return Completion(text, count(getattr(usage, "prompt_tokens", 0)), count(getattr(usage, "completion_tokens", 0)))
