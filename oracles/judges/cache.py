"""A persistent judge answer cache: one sqlite row per request, committed on arrival.

The key is a SHA-256 over everything that decides what the judge sees and how it answers:
judge kind, model, template text, generation settings and the exact prompt and response
texts *in the order shown to the judge* (so the order is part of the key, and the same
request asked by a swapped and an unswapped run is paid for once). Credentials and
endpoints are never part of the key or of any row.

WAL journaling with ``synchronous=FULL`` makes each committed answer survive a crash of
the process (or the machine). Several processes on one machine may share one cache file (stage
2 under torchrun: each rank writes the answers it paid for, as they arrive): WAL lets readers
run beside the one writer, each write is one short transaction, and a busy timeout makes a
writer wait for the others instead of failing. sqlite's WAL needs every process on one host:
across nodes, give each node a cache on its own disk (docs/scaling.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from oracles.judges.base import JudgeError

SCHEMA_VERSION = 1


def request_key(
    kind: str,
    model: str,
    template: str,
    prompt: str,
    first: str,
    second: str,
    params: dict[str, Any] | None = None,
) -> str:
    """Hash of one judge request; ``first``/``second`` are the responses in shown order."""
    blob = json.dumps(
        {
            "v": SCHEMA_VERSION,
            "kind": kind,
            "model": model,
            "template": template,
            "params": params or {},
            "prompt": prompt,
            "first": first,
            "second": second,
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def check_cache_path(path: Path | None) -> None:
    """The cache file must be a file (or creatable under a writable folder): checked before any
    work, so a bad path fails when the judge is built, not at its first answer."""
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


@dataclass(frozen=True)
class CachedAnswer:
    raw: str
    verdict: str
    input_tokens: int
    output_tokens: int
    created: float


class JudgeCache:
    """Thread-safe sqlite cache of raw judge answers. ``path=None`` keeps it in memory."""

    def __init__(self, path: str | PathLike | None = None, timeout: float = 30.0):
        self.path = None if path is None else Path(path).expanduser()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            ":memory:" if self.path is None else str(self.path),
            timeout=timeout,
            check_same_thread=False,
            isolation_level=None,  # autocommit; we open transactions explicitly
        )
        with self._lock:
            self._setup(timeout)

    def _setup(self, timeout: float) -> None:
        """WAL mode and the table, retried while another process holds the file: sqlite's busy
        timeout covers reads and writes, but not the switch to WAL (it fails at once with
        'database is locked' when several processes open a new cache together)."""
        c = self._conn
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.path is not None and c.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    c.execute("PRAGMA journal_mode=WAL").fetchone()
                c.execute("PRAGMA synchronous=FULL")
                c.execute(
                    "CREATE TABLE IF NOT EXISTS answers ("
                    " key TEXT PRIMARY KEY,"
                    " kind TEXT NOT NULL,"
                    " model TEXT NOT NULL,"
                    " verdict TEXT NOT NULL,"
                    " raw TEXT NOT NULL,"
                    " input_tokens INTEGER NOT NULL DEFAULT 0,"
                    " output_tokens INTEGER NOT NULL DEFAULT 0,"
                    " created REAL NOT NULL,"
                    " request TEXT)"
                )
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the judge cache is closed")
        return self._conn

    def get(self, key: str) -> CachedAnswer | None:
        with self._lock:
            row = self._connection().execute(
                "SELECT raw, verdict, input_tokens, output_tokens, created FROM answers WHERE key = ?", (key,)
            ).fetchone()
        return None if row is None else CachedAnswer(*row)

    def put(
        self,
        key: str,
        *,
        kind: str,
        model: str,
        raw: str,
        verdict: str,
        input_tokens: int = 0,
        output_tokens: int = 0,
        request: str | None = None,
    ) -> None:
        """Store one answer and commit it before returning."""
        with self._lock:
            c = self._connection()
            c.execute("BEGIN IMMEDIATE")
            try:
                c.execute(
                    "INSERT OR REPLACE INTO answers"
                    " (key, kind, model, verdict, raw, input_tokens, output_tokens, created, request)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (key, kind, model, verdict, raw, int(input_tokens), int(output_tokens), time.time(), request),
                )
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        with self._lock:
            return int(self._connection().execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def rows(self) -> list[dict[str, Any]]:
        """Every stored answer (for inspection and tests)."""
        with self._lock:
            cur = self._connection().execute(
                "SELECT key, kind, model, verdict, raw, input_tokens, output_tokens, created, request FROM answers"
                " ORDER BY created"
            )
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "JudgeCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"JudgeCache(path={str(self.path) if self.path else None!r})"
