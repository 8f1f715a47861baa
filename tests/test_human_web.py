"""The browser human judge: its HTTP API (always) and the real page in headless Chromium.

The browser tests drive /usr/bin/chromium through chromedriver with Selenium; they skip, with
the reason, where either is missing (scripts/test.sh installs them when it can).
"""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest

from oracles.judges import HumanJudge, JudgeError, JudgeQuit, WebHumanJudge, available_judges, build_judge
from oracles.judges.human_record import pair_key

TIMEOUT = 20.0  # seconds before a stuck wait fails the test (never reached when things work)


class Background:
    """``judge.judge(...)`` in a thread: it blocks until the page has answered the batch."""

    def __init__(self, judge: WebHumanJudge, prompts, a, b):
        self.judge, self.result, self.error = judge, None, None
        self.thread = threading.Thread(target=self._run, args=(prompts, a, b), daemon=True)
        self.thread.start()

    def _run(self, prompts, a, b):
        try:
            self.result = self.judge.judge(prompts, a, b)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def wait(self):
        self.thread.join(TIMEOUT)
        if self.thread.is_alive():
            self.judge.close()
            self.thread.join(TIMEOUT)
            raise AssertionError("judge() did not return after the page answered")
        return self.result


def _until(cond, what: str):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _request(url: str, data: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    body = None if data is None else json.dumps(data).encode()
    hdrs = {"Content-Type": "application/json", "X-Compo-Judge": "1"} if data is not None else {}
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=body, headers=hdrs, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _state(judge) -> dict:
    return _request(judge.url + "api/state")[1]


def _asking(judge) -> dict:
    _until(lambda: judge.url, "the server to start")  # judge() starts it on first use
    return _until(lambda: (s := _state(judge))["status"] == "asking" and s, "a question")["question"]


def _good_side(left: str, right: str) -> str:
    """The scripted person: prefers the text containing 'good', ties otherwise."""
    if ("good" in left) != ("good" in right):
        return "a" if "good" in left else "b"
    return "t"


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


PROMPTS = [f"question {i}" for i in range(6)]
A = ["a good answer", "meh", "good, surely", "so-so", "fine", "a good one"]
B = ["meh", "a good reply", "nope", "good enough", "also fine", "bad"]
EXPECTED = ["A", "B", "A", "B", "tie", "A"]


# -- HTTP API (no browser needed) -------------------------------------------------------------

def test_http_answers_map_back_dedupe_and_url_printed_once(tmp_path):
    out = io.StringIO()
    judge = build_judge("human_web", record_path=tmp_path / "h.jsonl", seed=1, output=out)
    assert isinstance(judge, WebHumanJudge) and "human_web" in available_judges()
    # the batch repeats pair 0 and asks pair 1 the other way round: each is put once; the last
    # pair's responses are identical: a tie, never put to the person
    prompts, a, b = PROMPTS + PROMPTS[:2] + ["twins"], A + [A[0], B[1], "same"], B + [B[0], A[1], "same"]
    run = Background(judge, prompts, a, b)
    for i in range(6):
        q = _asking(judge)
        status, state = _request(judge.url + "api/answer", {"id": q["id"], "answer": _good_side(q["left"], q["right"])})
        assert status == 200 and state["batch"] == {"answered": i + 1, "remaining": 5 - i, "total": 6}
    assert [j.verdict for j in run.wait()] == EXPECTED + ["A", "A", "tie"]
    records = _lines(tmp_path / "h.jsonl")
    assert [r["key"] for r in records] == [pair_key(*t) for t in zip(PROMPTS, A, B)]
    assert {r["shown_swapped"] for r in records} == {True, False}  # the shuffle did shuffle
    s = judge.stats()
    assert (s["calls"], s["cache_hits"], s["abstentions"], s["identical_ties"]) == (6, 2, 0, 1)
    assert _state(judge)["status"] == "waiting" and _state(judge)["on_record"] == 6

    run = Background(judge, ["another"], ["x"], ["y good"])  # a second batch: same server, no new URL
    q = _asking(judge)
    _request(judge.url + "api/answer", {"id": q["id"], "answer": "s"})
    assert [j.verdict for j in run.wait()] == ["abstain"]
    assert out.getvalue().count("http://") == 1 and judge.url.startswith("http://127.0.0.1:")
    assert not judge.url.endswith(":0/") and judge.url in out.getvalue()
    judge.close()


def test_http_refuses_stale_foreign_and_malformed_answers(tmp_path):
    path = tmp_path / "h.jsonl"
    judge = WebHumanJudge(path, output=io.StringIO())
    run = Background(judge, ["p"], ["x"], ["y"])
    q = _asking(judge)
    port = judge.url.rsplit(":", 1)[1].rstrip("/")
    answer = judge.url + "api/answer"
    assert _request(answer, {"id": q["id"], "answer": "a"}, {"X-Compo-Judge": "0"})[0] == 403
    assert _request(answer, {"id": q["id"], "answer": "a"}, {"Host": f"evil.example:{port}"})[0] == 403
    assert _request(judge.url + "api/state", headers={"Host": f"evil.example:{port}"})[0] == 403
    assert _request(judge.url + "api/state", headers={"Host": "localhost:9"})[0] == 200  # a tunnel's port
    assert _request(answer, {"id": "0-0", "answer": "a"})[0] == 409  # not the current question
    assert _request(answer, {"id": q["id"], "answer": "x"})[0] == 400
    assert _request(judge.url + "api/nothing")[0] == 404
    assert not path.exists() or path.read_text() == ""  # nothing was recorded
    assert _request(answer, {"id": q["id"], "answer": "b"})[0] == 200
    assert _request(answer, {"id": q["id"], "answer": "b"})[0] == 409  # a double press votes once
    assert len(run.wait()) == 1 and len(_lines(path)) == 1

    # quit while no batch is waiting: the next batch stops at once, the one after asks again
    assert _request(answer, {"id": None, "answer": "q"})[1]["status"] == "stopping"
    with pytest.raises(JudgeQuit):
        judge.judge(["p2"], ["x"], ["y"])
    assert _state(judge)["status"] == "stopped"
    run = Background(judge, ["p2"], ["x"], ["y"])
    _asking(judge)
    judge.close()  # closing wakes the waiting judge with an error
    run.thread.join(TIMEOUT)
    assert isinstance(run.error, JudgeError)


def test_a_record_that_cannot_be_written_stops_the_judge(tmp_path, monkeypatch):
    judge = WebHumanJudge(tmp_path / "h.jsonl", output=io.StringIO())

    def full(data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(judge.record, "_append_bytes", full)
    run = Background(judge, ["p"], ["x"], ["y"])
    q = _asking(judge)
    status, state = _request(judge.url + "api/answer", {"id": q["id"], "answer": "a"})
    assert status == 500 and "No space left" in state["error"] and state["batch"]["answered"] == 0
    run.thread.join(TIMEOUT)
    assert isinstance(run.error, JudgeError) and "No space left" in str(run.error)
    judge.close()


def test_a_server_open_to_the_network_warns_once(tmp_path, capsys, monkeypatch):
    from compo.core import progress

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(progress._settings, "level", progress.QUIET)
    capsys.readouterr()
    local = WebHumanJudge(tmp_path / "local.jsonl", output=io.StringIO())
    local.start()
    local.close()
    assert capsys.readouterr().out == ""  # loopback: no warning
    judge = WebHumanJudge(tmp_path / "h.jsonl", host="0.0.0.0", output=io.StringIO())
    url = judge.start()
    assert judge.start() == url  # already running: no second warning
    judge.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: human_web judge: listening on 0.0.0.0, not a loopback")
    assert url in lines[0] and "no login" in lines[0]


def test_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="port"):
        WebHumanJudge(tmp_path / "h.jsonl", port=70000)
    with pytest.raises(ValueError, match="max_calls"):
        WebHumanJudge(tmp_path / "h.jsonl", max_calls=-1)
    with pytest.raises(ValueError, match="host"):
        WebHumanJudge(tmp_path / "h.jsonl", host="")


# -- the page in headless Chromium -----------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("chromium / chromedriver not installed (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e .[dev])")
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900", "--no-first-run"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except WebDriverException as e:
        pytest.skip(f"headless chromium did not start: {str(e).splitlines()[0]}")
    yield driver
    driver.quit()


def _by_id(driver, id_: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, id_)


def _page_question(driver, previous: str) -> tuple[str, str, str]:
    """Wait for the page to show a question other than ``previous``; (id, left, right)."""
    qid = _until(lambda: (v := _by_id(driver, "question").get_attribute("data-id")) not in ("", previous) and v,
                 "the page's next question")
    return qid, _by_id(driver, "left").text, _by_id(driver, "right").text


def _press(driver, how: str, choice: str) -> None:
    """Answer on the page: a click on the button or the keyboard shortcut."""
    from selenium.webdriver.common.keys import Keys

    if how == "click":
        _by_id(driver, {"a": "btn-left", "b": "btn-right", "t": "btn-tie", "s": "btn-skip", "q": "btn-quit"}[choice]).click()
    else:
        key = {"a": Keys.ARROW_LEFT, "b": "2", "t": "t", "s": "s", "q": "q"} if how == "alt-key" else {}
        driver.switch_to.active_element.send_keys(key.get(choice, choice))


def _answer_on_page(driver, n: int, hows: list[str], previous: str = "") -> str:
    for i in range(n):
        previous, left, right = _page_question(driver, previous)
        _press(driver, hows[i % len(hows)], _good_side(left, right))
    return previous


def test_browser_clicks_and_keys_give_the_right_votes(browser, tmp_path):
    judge = WebHumanJudge(tmp_path / "h.jsonl", seed=1, output=io.StringIO())
    run = Background(judge, PROMPTS, A, B)
    browser.get(_until(lambda: judge.url, "the server to start"))
    _answer_on_page(browser, 6, ["click", "key", "alt-key"])
    assert [j.verdict for j in run.wait()] == EXPECTED
    records = _lines(tmp_path / "h.jsonl")
    assert {r["shown_swapped"] for r in records} == {True, False}
    assert [r["answer"] for r in records] == [
        {"a": "a", "b": "b", "t": "t"}[_good_side(*((r["response_b"], r["response_a"]) if r["shown_swapped"]
                                                     else (r["response_a"], r["response_b"])))]
        for r in records]
    _until(lambda: _by_id(browser, "question").get_attribute("data-status") == "waiting", "the waiting page")
    assert _by_id(browser, "answered").text == "6" and _by_id(browser, "remaining").text == "0"
    judge.close()


def test_browser_reload_mid_batch_loses_nothing(browser, tmp_path):
    path = tmp_path / "h.jsonl"
    judge = WebHumanJudge(path, seed=2, max_calls=3, output=io.StringIO())
    run = Background(judge, PROMPTS[:4], A[:4], B[:4])  # the budget allows 3 of the 4 questions
    browser.get(_until(lambda: judge.url, "the server to start"))
    last = _answer_on_page(browser, 2, ["key"])
    _until(lambda: len(path.read_text().splitlines()) == 2, "two recorded answers")
    browser.refresh()
    current = _page_question(browser, "")[0]
    assert current == _state(judge)["question"]["id"] != last
    progress = {k: _by_id(browser, k).text for k in ("answered", "remaining", "total", "budget", "on-record")}
    assert progress == {"answered": "2", "remaining": "1", "total": "3", "budget": "2 / 3 answers", "on-record": "2"}
    _answer_on_page(browser, 1, ["click"])
    assert [j.verdict for j in run.wait()] == EXPECTED[:3] + ["abstain"]
    assert [r["verdict"] for r in _lines(path)] == EXPECTED[:3]
    assert judge.budget_exhausted and judge.budget_refusals == 1
    judge.close()


def test_browser_quit_then_terminal_and_web_resume_each_other(browser, tmp_path):
    path = tmp_path / "h.jsonl"
    judge = WebHumanJudge(path, seed=3, output=io.StringIO())
    run = Background(judge, PROMPTS[:3], A[:3], B[:3])
    browser.get(_until(lambda: judge.url, "the server to start"))
    qid = _answer_on_page(browser, 1, ["click"])
    _page_question(browser, qid)
    _press(browser, "key", "q")
    run.thread.join(TIMEOUT)
    assert isinstance(run.error, JudgeQuit)
    _until(lambda: _by_id(browser, "question").get_attribute("data-status") == "stopped", "the stopped page")
    judge.close()
    web_lines = _lines(path)
    assert len(web_lines) == 1

    # the terminal judge answers only the two pairs the browser did not
    shown: list[str] = []
    out = io.StringIO()

    def person(question: str) -> str:
        screen = out.getvalue()[sum(len(s) for s in shown):]
        shown.append(screen)
        left, right = screen.split("[A]", 1)[1].split("[B]", 1)
        return _good_side(left, right)

    terminal = HumanJudge(path, input_fn=person, output=out, seed=3, width=40)  # stacked columns
    assert [j.verdict for j in terminal.judge(PROMPTS[:3], A[:3], B[:3])] == EXPECTED[:3]
    assert len(shown) == 2
    records = _lines(path)
    assert len(records) == 3 and {tuple(r) for r in records} == {tuple(web_lines[0])}  # one format, same fields

    # and a new browser judge answers the whole batch from the terminal's file, starting no server
    again = WebHumanJudge(path, seed=3, output=io.StringIO())
    assert [j.verdict for j in again.judge(PROMPTS[:3], B[:3], A[:3])] == ["B", "A", "B"]
    assert again.url is None and again.stats()["cache_hits"] == 3
