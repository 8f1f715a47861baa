"""A local fake LLM server for the API judge tests: it speaks the OpenAI and Anthropic wire
formats on 127.0.0.1:0 and does what a script (an :class:`Act` per request) says. The
fixtures ``serve`` and ``judges`` in tests/conftest.py start them and aim API judges at them."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

SECRET = "sk-test-SECRET-123"


@dataclass
class Act:
    """What the fake server does with one request."""

    text: str | None = "Verdict: A"
    status: int = 200
    headers: dict = field(default_factory=dict)
    delay: float = 0.0
    raw_body: bytes | None = None
    die: bool = False
    usage: tuple[int, int] = (10, 5)
    error_message: str = "scripted error"


def shown_texts(user_text: str) -> tuple[str, str]:
    """The two responses, in the order the judge was shown them (default template)."""
    m = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]\n(.*?)\n\nExplain", user_text, re.S)
    assert m, user_text
    return m.group(1), m.group(2)


def fair(n: int, user_text: str) -> Act:
    """A position-independent judge: the response containing 'good' wins."""
    first, second = shown_texts(user_text)
    if "good" in first and "good" not in second:
        return Act("The first one is better.\nVerdict: A")
    if "good" in second and "good" not in first:
        return Act("**Verdict:** B")
    return Act("Both are the same.\nVerdict: tie")


class FakeLLM:
    def __init__(self, flavor: str, behave: Callable[[int, str], Act] = fair):
        self.flavor, self.behave = flavor, behave
        self.lock = threading.Lock()
        self.count = 0
        self.times: list[float] = []
        self.events: list[tuple[str, int]] = []  # ("arrived", n) / ("replied", n), in the order they happened
        self.released = threading.Event()  # set by stop(): cuts scripted delays short
        self.bodies: list[dict] = []
        self.auth: list[str] = []
        self.dead = False
        self._stopped = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _abort(self):
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def do_POST(self):
                if fake.dead:
                    return self._abort()
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                user_text = body["messages"][-1]["content"]
                with fake.lock:
                    fake.count += 1
                    n = fake.count
                    fake.times.append(time.monotonic())
                    fake.events.append(("arrived", n))
                    fake.bodies.append(body)
                    fake.auth.append(f"{self.headers.get('authorization')} {self.headers.get('x-api-key')}")
                act = fake.behave(n, user_text)
                if act.die:
                    fake.dead = True
                    threading.Thread(target=fake.stop, daemon=True).start()
                    return self._abort()
                if act.delay:
                    fake.released.wait(act.delay)
                if act.raw_body is not None:
                    payload = act.raw_body
                elif act.status == 200:
                    payload = json.dumps(fake.wire(body, act)).encode()
                elif fake.flavor == "openai":
                    payload = json.dumps({"error": {"message": act.error_message, "type": "x", "code": act.status}}).encode()
                else:
                    payload = json.dumps({"type": "error", "error": {"type": "x", "message": act.error_message}}).encode()
                try:
                    self.send_response(act.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    for k, v in act.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout test)
                    pass
                with fake.lock:
                    fake.events.append(("replied", n))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def wire(self, body: dict, act: Act) -> dict:
        i, o = act.usage
        if self.flavor == "openai":
            return {
                "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": act.text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": i, "completion_tokens": o, "total_tokens": i + o},
            }
        return {
            "id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
            "content": [{"type": "text", "text": act.text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": i, "output_tokens": o},
        }

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}" + ("/v1" if self.flavor == "openai" else "")

    def stop(self) -> None:
        with self.lock:
            if self._stopped:
                return
            self._stopped = True
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
