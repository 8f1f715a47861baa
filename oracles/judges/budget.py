"""The hard spending limit of an API judge: requests and billed tokens, over its lifetime."""

from __future__ import annotations

import threading


class Budget:
    """At most ``max_calls`` requests and ``max_tokens_total`` billed tokens (None: no limit).

    A request reserves its call before it is sent; its tokens are charged when the reply
    arrives, so requests already in flight when the token limit is crossed still complete.
    Thread-safe.

    Several processes can share one budget (stage 2 under torchrun): before a round of
    requests each takes its ``share`` of what is left, and after it every process ``adopt``s
    the totals summed over all of them, so the limits hold for the run, not per process.
    """

    def __init__(self, max_calls: int | None = None, max_tokens_total: int | None = None):
        for name, value in (("max_calls", max_calls), ("max_tokens_total", max_tokens_total)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None")
        self.max_calls = max_calls
        self.max_tokens_total = max_tokens_total
        self._lock = threading.Lock()
        self._calls = 0
        self._tokens = 0
        self._refused = 0
        self._cap: int | None = None  # this process's share of a shared round (absolute call count)

    def _spent(self) -> bool:
        return (self.max_calls is not None and self._calls >= self.max_calls) or (
            self.max_tokens_total is not None and self._tokens >= self.max_tokens_total
        )

    @property
    def limited(self) -> bool:
        return self.max_calls is not None or self.max_tokens_total is not None

    def calls_left(self) -> int | None:
        """Requests the limits still allow: 0 once spent, None when only tokens are limited
        (or nothing is) and they are not spent yet."""
        with self._lock:
            if self._spent():
                return 0
            return None if self.max_calls is None else self.max_calls - self._calls

    def share(self, allowance: int) -> None:
        """Allow at most ``allowance`` more requests until :meth:`adopt` (this process's share
        of a round whose requests several processes send)."""
        if allowance < 0:
            raise ValueError("allowance must be >= 0")
        with self._lock:
            self._cap = self._calls + allowance

    def adopt(self, calls: int, tokens: int) -> None:
        """Take the totals spent by every process sharing this budget, and end the round's share."""
        with self._lock:
            self._calls, self._tokens, self._cap = int(calls), int(tokens), None

    def reserve(self) -> bool:
        """Take one call from the budget; False (and one more refusal) when it is spent."""
        with self._lock:
            if self._spent() or (self._cap is not None and self._calls >= self._cap):
                self._refused += 1
                return False
            self._calls += 1
            return True

    def charge(self, tokens: int) -> None:
        with self._lock:
            self._tokens += tokens

    @property
    def exhausted(self) -> bool:
        with self._lock:
            return self._spent()

    @property
    def refusals(self) -> int:
        """Requests refused so far (monotonic, never reset)."""
        with self._lock:
            return self._refused

    def spent(self) -> dict:
        with self._lock:
            return {"calls": self._calls, "tokens": self._tokens}

    def reset(self) -> None:
        """Forget what was spent (the refusal count stays)."""
        with self._lock:
            self._calls = 0
            self._tokens = 0
