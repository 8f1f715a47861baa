"""The single page the browser human judge serves (HTML, CSS and JS in one string, no assets).

The page polls ``GET api/state`` and posts each answer to ``POST api/answer`` with the id of
the question it answers; every text is inserted with ``textContent`` (model output is never
parsed as HTML). Keys: a / 1 / left arrow, b / 2 / right arrow, t / =, s (skip), q (quit).
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>compo human judge</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1400px; padding: 12px 20px; color: #222; }
  header { display: flex; flex-wrap: wrap; gap: 6px 24px; align-items: baseline; border-bottom: 1px solid #ccc; padding-bottom: 8px; }
  h1 { font-size: 18px; margin: 0; }
  #message { color: #555; margin: 12px 0; }
  .text { white-space: pre-wrap; overflow-wrap: anywhere; border: 1px solid #ccc; border-radius: 6px; padding: 10px 12px; margin: 0; }
  #prompt { background: #f6f6f6; max-height: 30vh; overflow: auto; }
  #pair { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; margin-top: 12px; }
  @media (max-width: 760px) { #pair { grid-template-columns: 1fr; } }
  h2 { font-size: 15px; margin: 14px 0 6px; }
  .resp { min-height: 6em; }
  #buttons { display: flex; flex-wrap: wrap; gap: 10px; margin: 16px 0; }
  button { font-size: 15px; padding: 8px 16px; border-radius: 6px; border: 1px solid #888; background: #fff; cursor: pointer; }
  button:disabled { opacity: 0.4; cursor: default; }
  kbd { border: 1px solid #aaa; border-radius: 3px; padding: 0 4px; font-size: 13px; }
  [hidden] { display: none !important; }
</style>
</head>
<body>
<header>
  <h1>Which response is better?</h1>
  <span>batch: <span id="answered">0</span> answered, <span id="remaining">0</span> remaining
    of <span id="total">0</span></span>
  <span>budget: <span id="budget">-</span></span>
  <span>on record: <span id="on-record">0</span></span>
</header>
<p id="message">Connecting...</p>
<div id="question" data-id="" data-status="" hidden>
  <h2>Prompt</h2>
  <pre id="prompt" class="text"></pre>
  <div id="pair">
    <div><h2>A</h2><div id="left" class="text resp"></div></div>
    <div><h2>B</h2><div id="right" class="text resp"></div></div>
  </div>
</div>
<div id="buttons">
  <button id="btn-left" data-key="a" disabled><kbd>A</kbd> A is better</button>
  <button id="btn-right" data-key="b" disabled><kbd>B</kbd> B is better</button>
  <button id="btn-tie" data-key="t" disabled><kbd>T</kbd> Tie</button>
  <button id="btn-skip" data-key="s" disabled><kbd>S</kbd> Skip</button>
  <button id="btn-quit" data-key="q"><kbd>Q</kbd> Quit</button>
</div>
<script>
"use strict";
const KEYS = {a: "a", "1": "a", arrowleft: "a", b: "b", "2": "b", arrowright: "b",
              t: "t", "=": "t", s: "s", q: "q"};
const MESSAGES = {
  waiting: "Every question so far is answered. Waiting for the next batch...",
  stopping: "Quit: the run stops at its next question. Every answer is saved.",
  stopped: "Stopped: the run pauses here. Every answer is saved; resume the run to go on.",
  closed: "The judge has stopped. Every answer is saved; you can close this page.",
};
let state = null, busy = false, shown = "";
const $ = (id) => document.getElementById(id);

function render(s) {
  if (state && s.version < state.version) return;  // a reply overtaken by a newer one
  state = s;
  const b = s.batch;
  $("answered").textContent = b.answered;
  $("remaining").textContent = b.remaining;
  $("total").textContent = b.total;
  $("budget").textContent = s.budget === null ? s.session_answers + " answered (no limit)"
                                               : s.session_answers + " / " + s.budget + " answers";
  $("on-record").textContent = s.on_record;
  const q = s.question, box = $("question");
  box.dataset.status = s.status;
  $("message").textContent = q ? "Pair " + (b.answered + 1) + " of " + b.total + "." : (MESSAGES[s.status] || s.status);
  box.hidden = !q;
  if (q && shown !== q.id) {
    $("prompt").textContent = q.prompt;
    $("left").textContent = q.left;
    $("right").textContent = q.right;
    shown = q.id;
  }
  box.dataset.id = q ? q.id : "";
  for (const k of ["left", "right", "tie", "skip"]) $("btn-" + k).disabled = !q;
  $("btn-quit").disabled = s.status === "closed";
}

async function refresh() {
  if (busy) return;
  try {
    const r = await fetch("api/state", {cache: "no-store"});
    if (!busy) render(await r.json());
  } catch (e) {
    $("message").textContent = "The judge is not reachable (" + e + "); retrying...";
  }
}

async function send(key) {
  if (busy || !state || (!state.question && key !== "q")) return;
  busy = true;
  try {
    const r = await fetch("api/answer", {
      method: "POST", cache: "no-store",
      headers: {"Content-Type": "application/json", "X-Compo-Judge": "1"},
      body: JSON.stringify({id: state.question ? state.question.id : null, answer: key}),
    });
    const s = await r.json();
    if (s.batch) render(s);
    if (s.error) $("message").textContent = "The judge refused the answer: " + s.error;
  } catch (e) {
    $("message").textContent = "Could not send the answer (" + e + "); please answer again.";
  } finally {
    busy = false;
  }
}

document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
  const key = KEYS[e.key.toLowerCase()];
  if (key) { e.preventDefault(); send(key); }
});
for (const btn of document.querySelectorAll("#buttons button")) {
  btn.addEventListener("click", () => send(btn.dataset.key));
}
refresh();
setInterval(refresh, 500);
</script>
</body>
</html>
"""
