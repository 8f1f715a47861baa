"""The single retry layer of the API judges (the SDK clients get ``max_retries=0``).

Exponential backoff with jitter on 408/409/425/429, 5xx, timeouts and connection errors; a
``Retry-After`` / ``retry-after-ms`` header, when present, sets the wait instead (capped at
``max_retry_after``). A 2xx body the SDK cannot read is :class:`Malformed` and never retried.
"""

from __future__ import annotations

import json
import logging
import random

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from oracles.judges.transport import RETRYABLE_STATUS, Completion, Malformed, http_status, retry_after_seconds

log = logging.getLogger("oracles.judges.api")


class RetryingMixin:
    """Retries of :meth:`_call_once` for a judge with ``name``, ``max_retries``,
    ``retry_initial``, ``retry_max_wait``, ``max_retry_after``, ``_count`` and ``_sdk_errors``."""

    name: str
    max_retries: int
    retry_initial: float
    retry_max_wait: float
    max_retry_after: float

    def _is_retryable(self, exc: BaseException) -> bool:
        connection_errors, _ = self._sdk_errors()
        if connection_errors and isinstance(exc, connection_errors):
            return True
        status = http_status(exc)
        return status is not None and (status in RETRYABLE_STATUS or status >= 500)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        asked = retry_after_seconds(exc) if exc is not None else None
        if asked is not None:
            asked = min(asked, self.max_retry_after)
            return asked + random.uniform(0.0, min(0.25, 0.1 * asked))
        backoff = self.retry_initial * 2 ** max(0, state.attempt_number - 1)
        return min(self.retry_max_wait, backoff + random.uniform(0.0, self.retry_initial))

    def _before_sleep(self, state: RetryCallState) -> None:
        self._count("retries")
        exc = state.outcome.exception() if state.outcome is not None else None
        status = http_status(exc) if exc is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        log.info(
            "%s judge: %s%s, retry %d/%d in %.2fs", self.name, type(exc).__name__,
            f" (HTTP {status})" if status else "", state.attempt_number, self.max_retries, wait,
        )

    async def _call_with_retries(self, user_text: str) -> Completion:
        _, malformed_errors = self._sdk_errors()
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception(self._is_retryable),
            before_sleep=self._before_sleep,
            reraise=True,
        )
        result: Completion | None = None
        async for attempt in retrying:
            with attempt:
                try:
                    result = await self._call_once(user_text)
                except (json.JSONDecodeError, *malformed_errors) as e:
                    raise Malformed(f"{type(e).__name__}: {e}") from e
        assert result is not None
        return result
