"""A human judge in the browser: a local page shows the prompt and both responses side by side.

:meth:`WebHumanJudge.judge` starts a stdlib ``ThreadingHTTPServer`` on first use (127.0.0.1 and a
free port by default; the URL is printed once), puts the batch's unanswered pairs to the page
one at a time and blocks until every one is answered or the person quits (:class:`JudgeQuit`).
Answers use the terminal judge's record, order and budget (:mod:`oracles.judges.human_record`):
each is appended to the same JSONL at once, so a reload loses nothing and either judge resumes
the other's file. The page sends the question id with every answer; an answer to a question
that is no longer current is refused, so a stale tab or a double key press cannot misvote.
Two identical responses are a tie without asking. A ``host`` that is not a loopback address
serves the texts to the network without a login, so starting the server warns once.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from os import PathLike
from typing import Any, TextIO

from compo.core.errors import UserError
from oracles.judges.base import JudgeError, JudgeQuit, register_judge
from oracles.judges.human_page import PAGE
from oracles.judges.human_record import ANSWERS, Question, RecordedHumanJudge

log = logging.getLogger(__name__)

_MAX_BODY = 64 * 1024
_WEB_ANSWERS = {"a", "b", "t", "s", "q"}  # what the page sends (its keys and buttons)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name part of a Host header (``[::1]:8080`` -> ``[::1]``), lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.split(":", 1)[0]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], judge: "WebHumanJudge"):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.judge = judge
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "compo-human-judge"

    def log_message(self, format: str, *args: Any) -> None:  # keep the run's output clean
        pass

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def _host_ok(self) -> bool:
        """Refuse other Host names on a loopback server (DNS rebinding would read the texts).
        Any port is fine: an SSH tunnel may forward another local port to this one."""
        allowed = self.server.judge.allowed_hosts
        return allowed is None or _host_name(self.headers.get("Host", "")) in allowed

    def do_GET(self) -> None:
        if not self._host_ok():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            return self._send(HTTPStatus.OK, PAGE.encode("utf-8"), "text/html; charset=utf-8")
        if path == "/api/state":
            return self._json(HTTPStatus.OK, self.server.judge.state())
        self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    def do_POST(self) -> None:
        # The custom header cannot be sent cross-origin without a CORS preflight, which this
        # server never grants: another web site cannot vote through the person's browser.
        if not self._host_ok() or self.headers.get("X-Compo-Judge") != "1":
            return self._json(HTTPStatus.FORBIDDEN, {"error": "missing X-Compo-Judge header or unexpected Host"})
        if self.path.split("?", 1)[0] != "/api/answer":
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {self.path}"})
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= _MAX_BODY:
                raise ValueError(f"body of {length} bytes")
            body = json.loads(self.rfile.read(length))
            qid, answer = body.get("id"), str(body["answer"]).strip().lower()
            if answer not in _WEB_ANSWERS:
                raise ValueError(f"answer must be one of {sorted(_WEB_ANSWERS)}, got {answer!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": f"bad answer: {e}"})
        status, state = self.server.judge.submit(qid, answer)
        self._json(status, state)


@register_judge("human_web")
class WebHumanJudge(RecordedHumanJudge):
    """Asks a person through a local web page; see the module docstring."""

    name = "human_web"

    def __init__(
        self,
        record_path: str | PathLike,
        seed: int = 0,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_calls: int | None = None,
        output: TextIO | None = None,
    ):
        if not isinstance(host, str) or not host:
            raise ValueError("host must be a non-empty host name or address")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an integer in 0..65535 (0: a free port), got {port!r}")
        super().__init__(record_path, seed, max_calls)
        self.host, self.port = host, port
        self.output = output
        self.url: str | None = None
        self.allowed_hosts: set[str] | None = None
        self._server: _Server | None = None
        self._cv = threading.Condition()
        self._questions: list[Question] = []
        self._pos = 0
        self._batch_no = 0
        self._version = 0
        self._quit = False  # asked for by the page, not yet raised
        self._stopped = False  # the last batch ended with a quit
        self._closed = False
        self._failure: OSError | None = None  # the record could not be written

    # -- server ----------------------------------------------------------------------------
    def start(self) -> str:
        """Start the server if it is not running; returns the page's URL (printed once)."""
        with self._cv:
            if self._closed:
                raise JudgeError("human_web judge: closed")
            if self._server is not None:
                return self.url  # type: ignore[return-value]
            try:
                server = _Server((self.host, self.port), self)
            except OSError as e:
                raise UserError("judge human_web", f"cannot listen on {self.host}:{self.port}: {e}") from None
            port = server.server_address[1]
            shown = f"[{self.host}]" if ":" in self.host else self.host
            self.url = f"http://{shown}:{port}/"
            if _is_loopback(self.host):
                self.allowed_hosts = {shown.lower(), "localhost", "127.0.0.1", "[::1]"}
            self._server = server
            threading.Thread(target=server.serve_forever, name="human_web judge", daemon=True).start()
        out = self.output if self.output is not None else sys.stdout
        print(f"human_web judge: answer in a browser at {self.url} (answers go to {self.record_path})",
              file=out, flush=True)
        if not _is_loopback(self.host):
            log.warning("human_web judge: listening on %s, not a loopback address: anyone who can reach %s "
                        "can read the prompts and responses and answer, there is no login (keep the default "
                        "host 127.0.0.1 and forward the port over SSH: docs/human_judge.md)", self.host, self.url)
        return self.url

    def close(self) -> None:
        """Stop the server; a :meth:`judge` call still waiting raises :class:`JudgeError`."""
        with self._cv:
            server, self._server, self._closed = self._server, None, True
            self._version += 1
            self._cv.notify_all()
        if server is not None:
            server.shutdown()
            server.server_close()

    # -- state shared with the page (all under self._cv) -----------------------------------
    def _current(self) -> Question | None:
        return self._questions[self._pos] if self._pos < len(self._questions) else None

    def _state(self) -> dict:
        q = self._current()
        if self._closed:
            status = "closed"
        elif self._quit:
            status = "stopping"
        elif q is not None:
            status = "asking"
        else:
            status = "stopped" if self._stopped else "waiting"
        n = len(self._questions)
        return {
            "status": status,
            "version": self._version,
            "question": None if status != "asking" or q is None else {
                "id": f"{self._batch_no}-{self._pos}", "prompt": q.prompt, "left": q.left, "right": q.right},
            "batch": {"answered": self._pos, "remaining": n - self._pos, "total": n},
            "session_answers": self._asked,
            "budget": self.max_calls,
            "on_record": len(self.record),
        }

    def state(self) -> dict:
        """What the page shows: the current question (screen order), progress and budget."""
        with self._cv:
            return self._state()

    def submit(self, qid: Any, answer: str) -> tuple[int, dict]:
        """An answer from the page: ``a`` / ``b`` (the side), ``t``, ``s`` or ``q``."""
        with self._cv:
            if answer == "q":
                if not self._closed:
                    self._quit = True
                    self._version += 1
                    self._cv.notify_all()
                return HTTPStatus.OK, self._state()
            q = self._current()
            if q is None or self._closed or self._quit or qid != f"{self._batch_no}-{self._pos}":
                return HTTPStatus.CONFLICT, self._state()  # answered elsewhere or a stale page
            try:
                self.answer(q, ANSWERS[answer], answer)
            except OSError as e:  # the record cannot be written: stop the run, loudly
                self._failure = e
                self._cv.notify_all()
                return HTTPStatus.INTERNAL_SERVER_ERROR, {**self._state(), "error": f"cannot record: {e}"}
            self._pos += 1
            self._version += 1
            self._cv.notify_all()
            return HTTPStatus.OK, self._state()

    # -- the judge -------------------------------------------------------------------------
    def _ask_all(self, questions: list[Question]) -> None:
        self.start()
        with self._cv:
            if self._quit:
                self._quit, self._stopped = False, True
                self._version += 1
                raise JudgeQuit("quit by the user in the browser")
            self._questions, self._pos, self._stopped = questions, 0, False
            self._failure = None
            self._batch_no += 1
            self._version += 1
            self._cv.notify_all()
            n = len(questions)
            try:
                while self._pos < n:
                    if self._closed:
                        raise JudgeError("human_web judge: closed while waiting for answers")
                    if self._failure is not None:
                        raise JudgeError(f"human_web judge: cannot write {self.record_path}: {self._failure}")
                    if self._quit:
                        self._quit, self._stopped = False, True
                        raise JudgeQuit(f"quit by the user in the browser at pair {self._pos + 1}/{n}")
                    self._cv.wait(0.25)  # short waits keep Ctrl-C working in the main thread
            finally:
                if self._pos < n:  # quit or closed: the page shows no half-done batch
                    self._questions, self._pos = [], 0
                self._version += 1

    def __repr__(self) -> str:
        return f"WebHumanJudge(record_path={str(self.record_path)!r}, seed={self.seed}, url={self.url!r})"


__all__ = ["WebHumanJudge"]
