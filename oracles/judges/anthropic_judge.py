"""AnthropicJudge: a judge served by the Anthropic messages API (or a compatible server
through ``base_url``). The messages API requires ``max_tokens``, so every reply is bounded."""

from __future__ import annotations

from os import PathLike
from typing import Any

from oracles.judges.api_base import APIJudge
from oracles.judges.base import register_judge
from oracles.judges.transport import Completion, Malformed, count


@register_judge("anthropic")
class AnthropicJudge(APIJudge):
    """A judge served by the Anthropic messages API (or a compatible server via ``base_url``).

    ``temperature`` defaults to None (the API's default) and, when set, is sent in the
    request body.
    """

    name = "anthropic"

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str | None = "ANTHROPIC_API_KEY",
        api_key_file: str | PathLike | None = None,
        template: str | PathLike | None = None,
        swap: bool = False,
        max_concurrency: int = 8,
        max_retries: int = 6,
        timeout: float = 60,
        max_calls: int | None = None,
        max_tokens_total: int | None = None,
        cache_path: str | PathLike | None = None,
        temperature: float | None = None,
        max_output_tokens: int = 1024,
        **options: Any,
    ):
        super().__init__(
            model, base_url, api_key_env, api_key_file, template, swap, max_concurrency, max_retries,
            timeout, max_calls, max_tokens_total, cache_path, temperature, max_output_tokens, **options,
        )

    def _make_client(self) -> Any:
        import anthropic

        kwargs: dict[str, Any] = {"api_key": self._key_for_client(), "max_retries": 0, "timeout": self.timeout}
        if self.base_url is not None:
            kwargs["base_url"] = self.base_url
        return anthropic.AsyncAnthropic(**kwargs)

    def _sdk_errors(self) -> tuple[tuple[type, ...], tuple[type, ...]]:
        import anthropic
        import pydantic

        return (anthropic.APIConnectionError,), (anthropic.APIResponseValidationError, pydantic.ValidationError)

    async def _call_once(self, user_text: str) -> Completion:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_output_tokens,
            "messages": [{"role": "user", "content": user_text}],
        }
        if self.system:
            kwargs["system"] = self.system
        body = dict(self.extra_body or {})
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if body:
            kwargs["extra_body"] = body
        resp = await self._client.messages.create(**kwargs)
        content = getattr(resp, "content", None)
        if not isinstance(content, list):
            raise Malformed(f"no content in the response ({type(resp).__name__})")
        texts = []
        for block in content:
            get = block.get if isinstance(block, dict) else (lambda k, b=block: getattr(b, k, None))
            if get("type") == "text" and isinstance(get("text"), str):
                texts.append(get("text"))
        usage = getattr(resp, "usage", None)
        return Completion(
            "".join(texts), count(getattr(usage, "input_tokens", 0)), count(getattr(usage, "output_tokens", 0))
        )
