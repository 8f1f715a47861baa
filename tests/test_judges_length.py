"""The OpenAI judge's output-length field against a local server that, like llama-cpp-python's
OpenAI-compatible server, honours only ``max_tokens`` and ignores ``max_completion_tokens``."""

from __future__ import annotations

import logging

import pytest

from oracles.judges import JudgeError, OpenAIJudge, build_judge
from oracles.judges.openai_judge import is_openai_host, length_fields
from oracles.options import OptionError
from fake_llm import SECRET, Act, FakeLLM

LONG = 366  # tokens of the reply when the request carries no bound the server understands


class MaxTokensOnly(FakeLLM):
    """Rambles for LONG tokens (words), then gives its verdict; stops at ``max_tokens`` if sent."""

    def __init__(self):
        super().__init__("openai", lambda n, text: Act(" ".join(["hmm"] * (LONG - 2)) + "\nVerdict: A"))

    def wire(self, body: dict, act: Act) -> dict:
        words = act.text.split()
        limit = body.get("max_tokens")
        if isinstance(limit, int):
            words = words[:limit]
        return super().wire(body, Act(" ".join(words), usage=(10, len(words))))


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("COMPO_TEST_KEY", SECRET)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    srv = MaxTokensOnly()
    yield srv
    srv.stop()


def _judge(srv, **kw) -> OpenAIJudge:
    return OpenAIJudge("local-model", base_url=srv.base_url, api_key_env="COMPO_TEST_KEY", max_output_tokens=8,
                       timeout=5, max_retries=0, **kw)


def test_default_request_is_bounded_by_a_max_tokens_only_server(server):
    with _judge(server) as j:
        out = j.judge(["p"], ["a"], ["b"])
        s = j.stats()
    body = server.bodies[0]
    assert body["max_tokens"] == 8 and body["max_completion_tokens"] == 8  # auto: both fields off OpenAI
    assert len(out[0].raw.split()) == 8 and s["output_tokens"] == 8 and s["length_overruns"] == 0
    assert out[0].verdict == "abstain" and s["no_verdict"] == 1  # cut before its verdict, as asked


def test_max_completion_tokens_alone_is_ignored_and_the_overrun_reported(server, caplog, capsys, monkeypatch):
    from compo.core import progress

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(progress._settings, "level", progress.QUIET)  # warnings print even under --quiet
    caplog.set_level(logging.WARNING, logger="oracles.judges.api")
    capsys.readouterr()
    with _judge(server, token_param="max_completion_tokens") as j:
        out = j.judge(["p", "q"], ["a", "a"], ["b", "b"])
        s = j.stats()
    assert [sorted(k for k in b if k.startswith("max_")) for b in server.bodies] == [["max_completion_tokens"]] * 2
    assert [len(o.raw.split()) for o in out] == [LONG, LONG] and [o.verdict for o in out] == ["A", "A"]
    assert (s["output_tokens"], s["length_overruns"]) == (2 * LONG, 2)
    warnings = [r.getMessage() for r in caplog.records if "exceeds max_output_tokens=8" in r.getMessage()]
    assert len(warnings) == 1 and "token_param: both" in warnings[0]  # logged once per judge
    # ... and printed once, as compo prints its own warnings: prefixed, on stdout, nothing on stderr
    printed = capsys.readouterr()
    assert [ln for ln in printed.out.splitlines() if "max_output_tokens" in ln] == [f"warning: {warnings[0]}"]
    assert "max_output_tokens" not in printed.err


@pytest.mark.parametrize("token_param, sent", [
    ("max_tokens", ["max_tokens"]),
    ("both", ["max_completion_tokens", "max_tokens"]),
    ("auto", ["max_completion_tokens", "max_tokens"]),
])
def test_each_token_param_sends_its_fields(server, token_param, sent):
    with _judge(server, token_param=token_param) as j:
        j.judge(["p"], ["a"], ["b"])
        assert j.stats()["length_overruns"] == 0
    assert sorted(k for k in server.bodies[0] if k.startswith("max_")) == sent


def test_auto_resolution_by_host():
    assert length_fields("auto", None) == ("max_completion_tokens",)  # the SDK's default: api.openai.com
    assert length_fields("auto", "https://api.openai.com/v1") == ("max_completion_tokens",)
    assert length_fields("auto", "https://me.openai.azure.com/openai/v1") == ("max_completion_tokens",)
    for url in ("http://127.0.0.1:8000/v1", "http://localhost:1234/v1", "https://api.openai.com.evil.example/v1"):
        assert not is_openai_host(url) and length_fields("auto", url) == ("max_tokens", "max_completion_tokens")
    assert length_fields("max_tokens", None) == ("max_tokens",)
    with pytest.raises(ValueError, match="token_param"):
        length_fields("max_length", None)


def test_cache_keys_follow_the_fields_sent(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    official = OpenAIJudge("m")  # auto at api.openai.com keys as max_completion_tokens did before
    assert official._params()["token_param"] == "max_completion_tokens"
    assert official._key("p", "a", "b") == OpenAIJudge("m", token_param="max_completion_tokens")._key("p", "a", "b")
    assert _judge(server)._params()["token_param"] == "both"
    assert _judge(server)._key("p", "a", "b") != _judge(server, token_param="max_completion_tokens")._key("p", "a", "b")


def test_a_server_refusing_a_length_field_is_a_config_error(monkeypatch):
    monkeypatch.setenv("COMPO_TEST_KEY", SECRET)
    strict = FakeLLM("openai", lambda n, t: Act(status=400, error_message="Unsupported parameter: 'max_tokens'"))
    try:
        j = OpenAIJudge("m", base_url=strict.base_url, api_key_env="COMPO_TEST_KEY", token_param="both",
                        max_concurrency=1, max_retries=0)
        with pytest.raises(JudgeError, match="token_param") as info:
            j.judge(["p", "q", "r"], ["a"] * 3, ["b"] * 3)
        assert "max_tokens/max_completion_tokens" in str(info.value)
        assert strict.count == 1  # no new request after the refusal
        j.close()
    finally:
        strict.stop()


def test_bad_length_options_fail_at_build_time():
    with pytest.raises(OptionError, match="token_param"):
        build_judge("openai", model="m", base_url="http://127.0.0.1:9/v1", token_param="max_length")
    with pytest.raises(ValueError, match="max_output_tokens"):
        OpenAIJudge("m", base_url="http://127.0.0.1:9/v1", max_output_tokens=0)
