"""LLM-as-a-judge over HTTP APIs: OpenAI chat.completions (and any OpenAI-compatible server
through ``base_url``) and Anthropic messages, with the production-client logic they share.

What every API judge guarantees:

* Concurrency is bounded by an asyncio semaphore (``max_concurrency``).
* tenacity is the single retry layer (the SDK clients get ``max_retries=0``): exponential
  backoff with jitter on 408/409/425/429, 5xx, timeouts and connection errors, and a
  ``Retry-After`` / ``retry-after-ms`` header, when present, sets the wait instead.
* Every answer is written to the sqlite cache (:mod:`oracles.judges.cache`) and committed as
  soon as it arrives, so an interrupted, resumed or repeated run never pays twice; identical
  requests inside one batch are sent once. Cache hits cost no budget.
* Failures never crash a run: a request that still fails after its retries (e.g. the server
  died) abstains and counts as an error; a 200 response whose body is malformed (not JSON, no
  choices / content) abstains at once, counts as ``malformed``, is not retried (it may have
  been billed) and is not cached (a later run asks again); a well-formed reply that names no
  verdict abstains, counts as ``no_verdict`` and *is* cached (it was paid for; the verdict
  is re-parsed from the cached text on every read).
* A hard budget (``max_calls`` requests and/or ``max_tokens_total`` billed tokens per judge
  instance, over all its ``judge()`` calls): once reached, further requests abstain and
  ``stats()["budget_exhausted"]`` is true. Requests already in flight when the token budget
  is crossed still complete, so it can be overshot by at most ``max_concurrency`` replies.
* Credentials (401/402/403) and unknown models (404) are configuration errors: with
  ``fail_fast`` (default) no new request is started, those in flight finish (and are
  cached), then :class:`~oracles.judges.base.JudgeError` is raised. Other 4xx abstain.
* The API key comes only from an environment variable or a key file. It is never logged,
  never part of ``repr``/``str``, never a cache key and never written to any file (replies
  and error messages that echo it are redacted before they are logged or stored).

With ``swap=True`` each pair is asked in both orders, (A, B) and (B, A); agreeing verdicts
stand, disagreeing ones become "tie" and a pair abstains when either order has no answer.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from oracles.judges.base import (
    Judgement,
    JudgeError,
    PairwiseJudge,
    check_batch,
    combine_swapped,
    flip,
    register_judge,
)
from oracles.judges.cache import JudgeCache, request_key
from oracles.judges.prompting import parse_verdict, render, resolve_template

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
FATAL_STATUS = frozenset({401, 402, 403, 404})
_PLACEHOLDER_KEY = "EMPTY"  # sent to keyless (local) servers, which ignore it


class _Secret:
    """Holds the API key; prints as a placeholder and refuses to be pickled."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None):
        self._value = value

    def get(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "<secret>" if self._value else "<no key>"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("API keys are not picklable")


def _load_api_key(api_key_env: str | None, api_key_file: str | PathLike | None, required: bool) -> _Secret:
    if api_key_file is not None:
        path = Path(api_key_file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise JudgeError(f"cannot read the API key file {path}: {e.strerror}") from None
        if not key:
            raise JudgeError(f"the API key file {path} is empty")
        return _Secret(key)
    if api_key_env:
        key = os.environ.get(api_key_env, "").strip()
        if key:
            return _Secret(key)
    if required:
        raise JudgeError(
            f"no API key: set the environment variable {api_key_env or '(none given)'} or pass api_key_file="
        )
    return _Secret(None)


def _retry_after_seconds(exc: BaseException) -> float | None:
    """The wait a server asked for in ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date)."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except Exception:
        return None


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def _check_cache_path(path: Path | None) -> None:
    """The cache file must be a file (or creatable under a writable folder): checked at build time."""
    if path is None:
        return
    if path.exists():
        if not path.is_file():
            raise JudgeError(f"cache_path {path} exists and is not a file")
        if not os.access(path, os.R_OK | os.W_OK):
            raise JudgeError(f"cache_path {path} is not readable and writable")
        return
    parent = next((q for q in path.absolute().parents if q.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise JudgeError(f"cache_path {path}: cannot create it under {parent}")


class _Malformed(Exception):
    """A 2xx response whose body is not a usable completion."""


@dataclass
class _Completion:
    text: str
    input_tokens: int
    output_tokens: int


@dataclass
class _Reply:
    raw: str | None
    status: str  # ok | cached | budget | error | malformed | skipped

    @property
    def verdict(self) -> str:
        return parse_verdict(self.raw) if self.raw is not None else "abstain"


class _LoopThread:
    """A private event loop in a daemon thread, so the sync API works inside running loops."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Any) -> Any:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("judge() called from inside the judge's own event loop; use ajudge()")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


class APIJudge(PairwiseJudge):
    """Shared machinery of the HTTP judges; subclasses make the client and send one request."""

    name = "api"
    extra_stat_keys = ("no_verdict", "malformed", "budget_skipped", "swap_disagreements", "cache_errors")

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str | None = None,
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
        system: str | None = None,
        retry_initial: float = 1.0,
        retry_max_wait: float = 60.0,
        max_retry_after: float = 120.0,
        fail_fast: bool = True,
        extra_body: dict | None = None,
    ):
        if not model:
            raise ValueError("model must be a non-empty string")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        for name, value in (("max_calls", max_calls), ("max_tokens_total", max_tokens_total)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None")
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env  # None: no environment lookup (keyless local server)
        self.api_key_file = api_key_file
        self._api_key = _load_api_key(self.api_key_env, api_key_file, required=base_url is None)
        self.template = resolve_template(template)
        self.swap = bool(swap)
        self.max_concurrency = int(max_concurrency)
        self.max_retries = int(max_retries)
        self.timeout = float(timeout)
        self.max_calls = max_calls
        self.max_tokens_total = max_tokens_total
        self.cache_path = None if cache_path is None else Path(cache_path).expanduser()
        self.temperature = temperature
        self.max_output_tokens = int(max_output_tokens)
        self.system = system
        self.retry_initial = float(retry_initial)
        self.retry_max_wait = float(retry_max_wait)
        self.max_retry_after = float(max_retry_after)
        self.fail_fast = bool(fail_fast)
        self.extra_body = dict(extra_body) if extra_body else None

        try:
            json.dumps(self._params())
        except TypeError as e:
            raise ValueError(f"extra_body must be JSON-serialisable: {e}") from None
        _check_cache_path(self.cache_path)
        self._cache_obj: JudgeCache | None = None  # opened on first use: building a judge writes nothing
        self._cache_lock = threading.Lock()
        self._budget_lock = threading.Lock()
        self._spent_calls = 0
        self._spent_tokens = 0
        self._refused = 0
        self._loop_thread: _LoopThread | None = None
        self._loop_lock = threading.Lock()
        self._client: Any = None
        self._sem: asyncio.Semaphore | None = None
        self._fatal: str | None = None
        self._closed = False

    # -- subclass hooks --------------------------------------------------------------------
    def _make_client(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    async def _call_once(self, user_text: str) -> _Completion:  # pragma: no cover - abstract
        raise NotImplementedError

    def _sdk_errors(self) -> tuple[tuple[type, ...], tuple[type, ...]]:
        """(connection / timeout error classes, malformed-body error classes) of the SDK."""
        return (), ()

    # -- public API ------------------------------------------------------------------------
    def judge(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> list[Judgement]:
        """Judge a batch synchronously (safe to call whether or not an event loop is running)."""
        check_batch(prompts, responses_a, responses_b)
        if not prompts:
            return []
        return self._loop().run(self._judge_batch(list(prompts), list(responses_a), list(responses_b)))

    async def ajudge(
        self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> list[Judgement]:
        """Async variant of :meth:`judge` (the requests run on the judge's private loop)."""
        check_batch(prompts, responses_a, responses_b)
        if not prompts:
            return []
        fut = asyncio.run_coroutine_threadsafe(
            self._judge_batch(list(prompts), list(responses_a), list(responses_b)), self._loop().loop
        )
        return await asyncio.wrap_future(fut)

    @property
    def budget_exhausted(self) -> bool:
        with self._budget_lock:
            return (self.max_calls is not None and self._spent_calls >= self.max_calls) or (
                self.max_tokens_total is not None and self._spent_tokens >= self.max_tokens_total
            )

    @property
    def budget_refusals(self) -> int:
        with self._budget_lock:
            return self._refused

    def budget_spent(self) -> dict:
        """Requests and billed tokens charged against the budget so far."""
        with self._budget_lock:
            return {"calls": self._spent_calls, "tokens": self._spent_tokens}

    def reset_budget(self) -> None:
        with self._budget_lock:
            self._spent_calls = 0
            self._spent_tokens = 0

    @property
    def _cache(self) -> JudgeCache:
        with self._cache_lock:
            if self._cache_obj is None:
                self._cache_obj = JudgeCache(self.cache_path)
            return self._cache_obj

    @property
    def cache(self) -> JudgeCache:
        return self._cache

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        lt = self._loop_thread
        if lt is not None:
            if self._client is not None:
                try:
                    asyncio.run_coroutine_threadsafe(self._client.close(), lt.loop).result(timeout=10)
                except Exception:  # pragma: no cover - best effort
                    pass
            lt.close()
        if self._cache_obj is not None:
            self._cache_obj.close()

    def __repr__(self) -> str:
        parts = [f"model={self.model!r}"]
        if self.base_url:
            parts.append(f"base_url={self.base_url!r}")
        parts += [
            f"api_key_env={self.api_key_env!r}" if self.api_key_file is None else f"api_key_file={str(self.api_key_file)!r}",
            f"swap={self.swap}",
            f"max_concurrency={self.max_concurrency}",
            f"max_calls={self.max_calls}",
            f"max_tokens_total={self.max_tokens_total}",
            f"cache_path={str(self.cache_path) if self.cache_path else None!r}",
        ]
        return f"{type(self).__name__}({', '.join(parts)})"

    __str__ = __repr__

    def __getstate__(self) -> Any:
        raise TypeError(f"{type(self).__name__} is not picklable (it holds a client and a credential)")

    # -- internals -------------------------------------------------------------------------
    def _loop(self) -> _LoopThread:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        with self._loop_lock:
            if self._loop_thread is None:
                self._loop_thread = _LoopThread(f"{self.name}-judge")
            return self._loop_thread

    def _key_for_client(self) -> str:
        return self._api_key.get() or _PLACEHOLDER_KEY

    def _redact(self, text: str) -> str:
        key = self._api_key.get()
        if key and text and key in text:
            text = text.replace(key, "***")
        return text

    def _params(self) -> dict:
        return {
            "temperature": self.temperature,
            "max_output_tokens": self.max_output_tokens,
            "system": self.system,
            "extra_body": self.extra_body,
        }

    def _key(self, prompt: str, first: str, second: str) -> str:
        return request_key(self.name, self.model, self.template, prompt, first, second, self._params())

    def _reserve_budget(self) -> bool:
        with self._budget_lock:
            if self.max_calls is not None and self._spent_calls >= self.max_calls:
                return False
            if self.max_tokens_total is not None and self._spent_tokens >= self.max_tokens_total:
                return False
            self._spent_calls += 1
            return True

    async def _judge_batch(self, prompts: list[str], resp_a: list[str], resp_b: list[str]) -> list[Judgement]:
        if self._client is None:
            self._client = self._make_client()
            self._sem = asyncio.Semaphore(self.max_concurrency)
        self._fatal = None
        requests: dict[str, tuple[str, str, str]] = {}
        plan: list[list[tuple[str, bool]]] = []
        for p, a, b in zip(prompts, resp_a, resp_b):
            orders = [(a, b, False)] + ([(b, a, True)] if self.swap else [])
            row = []
            for first, second, swapped in orders:
                k = self._key(p, first, second)
                requests.setdefault(k, (p, first, second))
                row.append((k, swapped))
            plan.append(row)
        keys = list(requests)
        replies = await asyncio.gather(*(self._resolve(k, *requests[k]) for k in keys))
        by_key = dict(zip(keys, replies))

        out: list[Judgement] = []
        for row in plan:
            verdicts, raws = [], []
            for k, swapped in row:
                reply = by_key[k]
                v = reply.verdict
                verdicts.append(flip(v) if swapped else v)
                raws.append(reply.raw)
            if self.swap:
                verdict = combine_swapped(verdicts[0], verdicts[1])
                if "abstain" not in verdicts and verdicts[0] != verdicts[1]:
                    self._count("swap_disagreements")
                raw = None if raws == [None, None] else f"[order A,B]\n{raws[0]}\n\n[order B,A]\n{raws[1]}"
            else:
                verdict, raw = verdicts[0], raws[0]
            if verdict == "abstain":
                self._count("abstentions")
            out.append(Judgement(verdict, None, raw))
        if self._fatal is not None:
            raise JudgeError(self._fatal)
        return out

    async def _resolve(self, key: str, prompt: str, first: str, second: str) -> _Reply:
        try:
            return await self._resolve_inner(key, prompt, first, second)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug must not lose the rest of the batch
            self._count("errors")
            log.error("%s judge: unexpected %s while judging: %s", self.name, type(e).__name__, self._redact(str(e)))
            return _Reply(None, "error")

    def _cached(self, key: str) -> _Reply | None:
        hit = self._cache.get(key)
        if hit is None:
            return None
        self._count("cache_hits")
        reply = _Reply(hit.raw, "cached")
        if reply.verdict == "abstain":
            self._count("no_verdict")
        return reply

    async def _resolve_inner(self, key: str, prompt: str, first: str, second: str) -> _Reply:
        hit = self._cached(key)
        if hit is not None:
            return hit
        assert self._sem is not None
        async with self._sem:
            if self._fatal is not None:
                return _Reply(None, "skipped")
            hit = self._cached(key)  # another process sharing the cache may have answered
            if hit is not None:
                return hit
            if not self._reserve_budget():
                self._count("budget_skipped")
                with self._budget_lock:
                    self._refused += 1
                return _Reply(None, "budget")
            self._count("calls")
            user_text = render(self.template, prompt, first, second)
            try:
                done = await self._call_with_retries(user_text)
            except _Malformed as e:
                self._count("malformed")
                log.warning("%s judge: malformed response body (%s); abstaining", self.name, self._redact(str(e))[:200])
                return _Reply(None, "malformed")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._count("errors")
                status = _status(e)
                desc = f"{type(e).__name__}" + (f" (HTTP {status})" if status else "")
                if status in FATAL_STATUS and self.fail_fast and self._fatal is None:
                    self._fatal = (
                        f"{self.name} judge for model {self.model!r}: {desc}: {self._redact(str(e))[:300]} "
                        "(check the API key, the model name and base_url)"
                    )
                log.warning("%s judge: request failed for good after retries: %s; abstaining", self.name, desc)
                return _Reply(None, "error")
            raw = self._redact(done.text)
            with self._budget_lock:
                self._spent_tokens += done.input_tokens + done.output_tokens
            self._count("input_tokens", done.input_tokens)
            self._count("output_tokens", done.output_tokens)
            verdict = parse_verdict(raw)
            if verdict == "abstain":
                self._count("no_verdict")
            try:
                self._cache.put(
                    key, kind=self.name, model=self.model, raw=raw, verdict=verdict,
                    input_tokens=done.input_tokens, output_tokens=done.output_tokens,
                    request=self._redact(user_text),
                )
            except Exception as e:  # the answer is still used for this run
                self._count("cache_errors")
                log.error("%s judge: could not write the cache: %s", self.name, e)
            return _Reply(raw, "ok")

    def _is_retryable(self, exc: BaseException) -> bool:
        connection_errors, _ = self._sdk_errors()
        if connection_errors and isinstance(exc, connection_errors):
            return True
        status = _status(exc)
        return status is not None and (status in RETRYABLE_STATUS or status >= 500)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        asked = _retry_after_seconds(exc) if exc is not None else None
        if asked is not None:
            asked = min(asked, self.max_retry_after)
            return asked + random.uniform(0.0, min(0.25, 0.1 * asked))
        backoff = self.retry_initial * 2 ** max(0, state.attempt_number - 1)
        return min(self.retry_max_wait, backoff + random.uniform(0.0, self.retry_initial))

    def _before_sleep(self, state: RetryCallState) -> None:
        self._count("retries")
        exc = state.outcome.exception() if state.outcome is not None else None
        status = _status(exc) if exc is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        log.info(
            "%s judge: %s%s, retry %d/%d in %.2fs", self.name, type(exc).__name__,
            f" (HTTP {status})" if status else "", state.attempt_number, self.max_retries, wait,
        )

    async def _call_with_retries(self, user_text: str) -> _Completion:
        _, malformed_errors = self._sdk_errors()
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception(self._is_retryable),
            before_sleep=self._before_sleep,
            reraise=True,
        )
        result: _Completion | None = None
        async for attempt in retrying:
            with attempt:
                try:
                    result = await self._call_once(user_text)
                except (json.JSONDecodeError, *malformed_errors) as e:
                    raise _Malformed(f"{type(e).__name__}: {e}") from e
        assert result is not None
        return result


def _int(x: Any) -> int:
    return x if isinstance(x, int) and x >= 0 else 0


@register_judge("openai")
class OpenAIJudge(APIJudge):
    """A judge served by an OpenAI chat.completions endpoint (OpenAI, vLLM, llama.cpp, ...).

    ``token_param`` names the output-length field: "max_completion_tokens" (OpenAI) or
    "max_tokens" for older OpenAI-compatible servers. ``temperature=None`` omits it (for
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
        token_param: str = "max_completion_tokens",
        **options: Any,
    ):
        if token_param not in ("max_completion_tokens", "max_tokens"):
            raise ValueError("token_param must be 'max_completion_tokens' or 'max_tokens'")
        self.token_param = token_param
        super().__init__(
            model, base_url, api_key_env, api_key_file, template, swap, max_concurrency, max_retries,
            timeout, max_calls, max_tokens_total, cache_path, temperature, max_output_tokens, **options,
        )

    def _params(self) -> dict:
        return {**super()._params(), "token_param": self.token_param}

    def _make_client(self) -> Any:
        import openai

        return openai.AsyncOpenAI(
            api_key=self._key_for_client(), base_url=self.base_url, max_retries=0, timeout=self.timeout
        )

    def _sdk_errors(self) -> tuple[tuple[type, ...], tuple[type, ...]]:
        import openai
        import pydantic

        return (openai.APIConnectionError,), (openai.APIResponseValidationError, pydantic.ValidationError)

    async def _call_once(self, user_text: str) -> _Completion:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": user_text}
        ]
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, self.token_param: self.max_output_tokens}
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body
        resp = await self._client.chat.completions.create(**kwargs)
        choices = getattr(resp, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise _Malformed(f"no choices in the response ({type(resp).__name__})")
        message = getattr(choices[0], "message", None)
        if message is None:
            raise _Malformed("the first choice has no message")
        text = getattr(message, "content", None)
        if text is None:
            text = getattr(message, "refusal", None) or ""
        if not isinstance(text, str):
            raise _Malformed(f"message content is a {type(text).__name__}, not text")
        usage = getattr(resp, "usage", None)
        return _Completion(text, _int(getattr(usage, "prompt_tokens", 0)), _int(getattr(usage, "completion_tokens", 0)))


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

    async def _call_once(self, user_text: str) -> _Completion:
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
            raise _Malformed(f"no content in the response ({type(resp).__name__})")
        texts = []
        for block in content:
            get = block.get if isinstance(block, dict) else (lambda k, b=block: getattr(b, k, None))
            if get("type") == "text" and isinstance(get("text"), str):
                texts.append(get("text"))
        usage = getattr(resp, "usage", None)
        return _Completion(
            "".join(texts), _int(getattr(usage, "input_tokens", 0)), _int(getattr(usage, "output_tokens", 0))
        )
