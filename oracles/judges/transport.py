"""Wire-independent plumbing of the HTTP judges: the API key, HTTP statuses and retry waits,
the completion a backend returns, and the private event loop the sync API runs on."""

from __future__ import annotations

import asyncio
import email.utils
import os
import threading
import time
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from oracles.judges.base import JudgeError

#: Statuses retried with backoff (besides every 5xx, timeouts and connection errors).
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
#: Statuses that mean the configuration is wrong (credentials, model name): fail fast.
FATAL_STATUS = frozenset({401, 402, 403, 404})
PLACEHOLDER_KEY = "EMPTY"  # sent to keyless (local) servers, which ignore it


class Secret:
    """Holds the API key; prints as a placeholder and refuses to be pickled."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None):
        self._value = value

    def get(self) -> str | None:
        return self._value

    def redact(self, text: str) -> str:
        """``text`` with every occurrence of the key replaced by ``***``."""
        if self._value and text and self._value in text:
            text = text.replace(self._value, "***")
        return text

    def __repr__(self) -> str:
        return "<secret>" if self._value else "<no key>"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("API keys are not picklable")


def load_api_key(api_key_env: str | None, api_key_file: str | PathLike | None, required: bool) -> Secret:
    """The key from ``api_key_file`` (first) or the environment variable ``api_key_env``."""
    if api_key_file is not None:
        path = Path(api_key_file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise JudgeError(f"cannot read the API key file {path}: {e.strerror}") from None
        if not key:
            raise JudgeError(f"the API key file {path} is empty")
        return Secret(key)
    if api_key_env:
        key = os.environ.get(api_key_env, "").strip()
        if key:
            return Secret(key)
    if required:
        raise JudgeError(
            f"no API key: set the environment variable {api_key_env or '(none given)'} or pass api_key_file="
        )
    return Secret(None)


def retry_after_seconds(exc: BaseException) -> float | None:
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


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an SDK error carries, if any."""
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def count(x: Any) -> int:
    """A token count from a usage object: a non-negative int, anything else is 0."""
    return x if isinstance(x, int) and x >= 0 else 0


class Malformed(Exception):
    """A 2xx response whose body is not a usable completion."""


@dataclass
class Completion:
    """The text of one reply and the tokens billed for it."""

    text: str
    input_tokens: int
    output_tokens: int


class LoopThread:
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
