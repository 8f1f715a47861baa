"""APIJudge: the production-client logic the HTTP judges (OpenAI, Anthropic) share.

What every API judge guarantees:

* Two identical responses are a tie, answered without any request (``identical_ties``);
  with ``swap`` each pair is asked in both orders (:mod:`oracles.judges.swap_plan`).
* Concurrency is bounded by an asyncio semaphore (``max_concurrency``).
* Retries with backoff honouring ``Retry-After`` (:mod:`oracles.judges.retrying`).
* Every answer is written to the sqlite cache (:mod:`oracles.judges.cache`) and committed as
  soon as it arrives, so an interrupted, resumed or repeated run never pays twice; identical
  requests inside one batch are sent once. Cache hits cost no budget.
* Failures never crash a run: a request that still fails after its retries (e.g. the server
  died) abstains and counts as an error; a 200 response whose body is malformed (not JSON, no
  choices / content) abstains at once, counts as ``malformed``, is not retried (it may have
  been billed) and is not cached (a later run asks again); a well-formed reply that names no
  verdict abstains, counts as ``no_verdict`` and *is* cached (it was paid for; the verdict
  is re-parsed from the cached text on every read).
* A hard budget (:class:`~oracles.judges.budget.Budget`: ``max_calls`` requests and/or
  ``max_tokens_total`` billed tokens per judge instance): once reached, further requests
  abstain and ``stats()["budget_exhausted"]`` is true.
* Credentials (401/402/403), unknown models (404) and requests the server refuses for a
  setting the judge can change (a length field it rejects) are configuration errors: with
  ``fail_fast`` (default) no new request is started, those in flight finish (and are
  cached), then :class:`~oracles.judges.base.JudgeError` is raised. Other 4xx abstain.
* A reply longer than ``max_output_tokens`` (the server ignored the length field) counts as
  ``length_overruns`` and is warned about once per judge (logger ``oracles.judges.api``;
  :mod:`compo.core.progress` prints its warnings as ``warning: ...``).
* The API key comes only from an environment variable or a key file. It is never logged,
  never part of ``repr``/``str``, never a cache key and never written to any file (replies
  and error messages that echo it are redacted before they are logged or stored).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

from oracles.judges.base import Judgement, JudgeError, PairwiseJudge, check_batch
from oracles.judges.budget import Budget
from oracles.judges.cache import JudgeCache, check_cache_path, request_key
from oracles.judges.prompting import parse_verdict, render, resolve_template
from oracles.judges.retrying import RetryingMixin
from oracles.judges.swap_plan import Reply, SwapPlanMixin
from oracles.judges.transport import (
    FATAL_STATUS, PLACEHOLDER_KEY, Completion, LoopThread, Malformed, http_status, load_api_key,
)

log = logging.getLogger("oracles.judges.api")


class APIJudge(RetryingMixin, SwapPlanMixin, PairwiseJudge):
    """Shared machinery of the HTTP judges; subclasses make the client and send one request."""

    name = "api"
    extra_stat_keys = ("no_verdict", "malformed", "budget_skipped", "identical_ties", "swap_pairs",
                       "swap_disagreements", "length_overruns", "cache_errors")

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
        if max_output_tokens < 1:
            raise ValueError("max_output_tokens must be >= 1")
        self._budget = Budget(max_calls, max_tokens_total)
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env  # None: no environment lookup (keyless local server)
        self.api_key_file = api_key_file
        self._api_key = load_api_key(self.api_key_env, api_key_file, required=base_url is None)
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
        check_cache_path(self.cache_path)
        self._cache_obj: JudgeCache | None = None  # opened on first use: building a judge writes nothing
        self._cache_lock = threading.Lock()
        self._loop_thread: LoopThread | None = None
        self._loop_lock = threading.Lock()
        self._client: Any = None
        self._sem: asyncio.Semaphore | None = None
        self._fatal: str | None = None
        self._overrun_logged = False
        self._closed = False

    # -- subclass hooks --------------------------------------------------------------------
    def _make_client(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    async def _call_once(self, user_text: str) -> Completion:  # pragma: no cover - abstract
        raise NotImplementedError

    def _sdk_errors(self) -> tuple[tuple[type, ...], tuple[type, ...]]:
        """(connection / timeout error classes, malformed-body error classes) of the SDK."""
        return (), ()

    def _config_error(self, exc: BaseException) -> str | None:
        """A hint when a non-retryable failure is a setting the user must change, else None."""
        return None

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
        return self._budget.exhausted

    @property
    def budget_refusals(self) -> int:
        return self._budget.refusals

    @property
    def budget(self) -> Budget:
        """The spending limit (shared across processes by stage 2's GenerationOracle)."""
        return self._budget

    def budget_spent(self) -> dict:
        """Requests and billed tokens charged against the budget so far."""
        return self._budget.spent()

    def reset_budget(self) -> None:
        self._budget.reset()

    @property
    def cache(self) -> JudgeCache:
        with self._cache_lock:
            if self._cache_obj is None:
                self._cache_obj = JudgeCache(self.cache_path)
            return self._cache_obj

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
    def _loop(self) -> LoopThread:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        with self._loop_lock:
            if self._loop_thread is None:
                self._loop_thread = LoopThread(f"{self.name}-judge")
            return self._loop_thread

    def _key_for_client(self) -> str:
        return self._api_key.get() or PLACEHOLDER_KEY

    def _redact(self, text: str) -> str:
        return self._api_key.redact(text)

    def _params(self) -> dict:
        return {
            "temperature": self.temperature,
            "max_output_tokens": self.max_output_tokens,
            "system": self.system,
            "extra_body": self.extra_body,
        }

    def _key(self, prompt: str, first: str, second: str) -> str:
        return request_key(self.name, self.model, self.template, prompt, first, second, self._params())

    async def _judge_batch(self, prompts: list[str], resp_a: list[str], resp_b: list[str]) -> list[Judgement]:
        if self._client is None:
            self._client = self._make_client()
            self._sem = asyncio.Semaphore(self.max_concurrency)
        self._fatal = None
        requests, plan = self._plan(prompts, resp_a, resp_b)
        keys = list(requests)
        replies = await asyncio.gather(*(self._resolve(k, *requests[k]) for k in keys))
        by_key = dict(zip(keys, replies))

        out = [self._combine(row, by_key) for row in plan]
        if self._fatal is not None:
            raise JudgeError(self._fatal)
        return out

    async def _resolve(self, key: str, prompt: str, first: str, second: str) -> Reply:
        try:
            return await self._resolve_inner(key, prompt, first, second)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug must not lose the rest of the batch
            self._count("errors")
            log.error("%s judge: unexpected %s while judging: %s", self.name, type(e).__name__, self._redact(str(e)))
            return Reply(None, "error")

    def _cached(self, key: str) -> Reply | None:
        hit = self.cache.get(key)
        if hit is None:
            return None
        self._count("cache_hits")
        reply = Reply(hit.raw, "cached")
        if reply.verdict == "abstain":
            self._count("no_verdict")
        return reply

    async def _resolve_inner(self, key: str, prompt: str, first: str, second: str) -> Reply:
        hit = self._cached(key)
        if hit is not None:
            return hit
        assert self._sem is not None
        async with self._sem:
            if self._fatal is not None:
                return Reply(None, "skipped")
            hit = self._cached(key)  # another process sharing the cache may have answered
            if hit is not None:
                return hit
            if not self._budget.reserve():
                self._count("budget_skipped")
                return Reply(None, "budget")
            self._count("calls")
            user_text = render(self.template, prompt, first, second)
            try:
                done = await self._call_with_retries(user_text)
            except Malformed as e:
                self._count("malformed")
                log.warning("%s judge: malformed response body (%s); abstaining", self.name, self._redact(str(e))[:200])
                return Reply(None, "malformed")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._failed(e)
                return Reply(None, "error")
            return self._received(key, user_text, done)

    def _failed(self, e: Exception) -> None:
        """Count a request that failed for good; a configuration error stops the batch (fail_fast)."""
        self._count("errors")
        status = http_status(e)
        desc = f"{type(e).__name__}" + (f" (HTTP {status})" if status else "")
        hint = "check the API key, the model name and base_url" if status in FATAL_STATUS else self._config_error(e)
        if hint is not None and self.fail_fast and self._fatal is None:
            self._fatal = f"{self.name} judge for model {self.model!r}: {desc}: {self._redact(str(e))[:300]} ({hint})"
        log.warning("%s judge: request failed for good after retries: %s; abstaining", self.name, desc)

    def _received(self, key: str, user_text: str, done: Completion) -> Reply:
        """Charge, count and cache one reply."""
        raw = self._redact(done.text)
        self._budget.charge(done.input_tokens + done.output_tokens)
        self._count("input_tokens", done.input_tokens)
        self._count("output_tokens", done.output_tokens)
        if done.output_tokens > self.max_output_tokens:
            self._count("length_overruns")
            if not self._overrun_logged:
                self._overrun_logged = True
                log.warning("%s judge: a reply of %d tokens exceeds max_output_tokens=%d: the server ignores the "
                            "length field it was sent%s", self.name, done.output_tokens, self.max_output_tokens,
                            self._overrun_hint())
        verdict = parse_verdict(raw)
        if verdict == "abstain":
            self._count("no_verdict")
        try:
            self.cache.put(
                key, kind=self.name, model=self.model, raw=raw, verdict=verdict,
                input_tokens=done.input_tokens, output_tokens=done.output_tokens,
                request=self._redact(user_text),
            )
        except Exception as e:  # the answer is still used for this run
            self._count("cache_errors")
            log.error("%s judge: could not write the cache: %s", self.name, e)
        return Reply(raw, "ok")

    def _overrun_hint(self) -> str:
        return ""
