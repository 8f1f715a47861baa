"""Warnings that save stage-2 runs: each fires once, from the step records alone.

* ``aggregation``: with ``all``/``majority`` over several pairs per step, a candidate must improve
  every (most) pair(s) at once, which almost never happens: the first steps are all skipped.
* ``vote_collapse``: almost no perturbation is ever "better" (a radius outside the linear
  regime, or an oracle that never prefers the candidate).
* ``wrong_sign``: taken steps lower the trained pairs' margin on average (the radius is too
  large for the local linear picture the estimator relies on).
* ``low_signal``: the signal cosine over a window of steps is near 0: the updates are mostly
  noise (the mean first-order cosine for the likelihood rule, else the pooled moment estimate).
* ``support_energy``: less than 90% of the expected direction lies in the step's vocabulary
  support (zo.support): the support drops signal; use a larger zo.support_k or zo.support=all.
"""

from __future__ import annotations

from compo.zo.estimator import signal_cosine
from compo.zo.support import LOW_ENERGY

FIRST_STEPS = 5  # aggregation: warn when the first this-many steps are all skipped
COLLAPSE_STEPS, COLLAPSE_RATE = 10, 0.01
SIGN_STEPS = 5  # taken steps before the own-pair sign is judged
SIGNAL_WINDOW, SIGNAL_MIN = 20, 0.05


def new_state() -> dict:
    return {"fired": [], "n": 0, "skipped_first": 0, "frac_first": 0.0, "taken": 0, "own_margin": 0.0,
            "window": []}


def observe(state: dict, rec: dict, pairs_per_step: int, aggregation: str | None, dim: int,
            sphere: bool = False) -> list[str]:
    """Update ``state`` (JSON-safe, kept in checkpoints) with one step record; return new warnings."""
    state["n"] += 1
    n = state["n"]
    out = []
    if n <= FIRST_STEPS:
        state["skipped_first"] += bool(rec["skipped"])
    if n <= COLLAPSE_STEPS:
        state["frac_first"] += rec["frac_minus"]
    if not rec["skipped"]:
        state["taken"] += 1
        state["own_margin"] += sum((p["logp_chosen_after"] - p["logp_chosen_before"])
                                   - (p["logp_rejected_after"] - p["logp_rejected_before"]) for p in rec["pairs"])
    if "u_sq_norm" in rec:
        first = rec["signal_cos"] if rec.get("signal_cos_source") == "first_order" else None
        state["window"] = (state["window"] + [[rec["u_sq_norm"], rec["signal_mu2"], rec.get("n_votes", 0),
                                               first]])[-SIGNAL_WINDOW:]

    def fire(key: str, msg: str) -> None:
        if key not in state["fired"]:
            state["fired"].append(key)
            out.append(msg)

    if (n == FIRST_STEPS and state["skipped_first"] == FIRST_STEPS and pairs_per_step > 1
            and aggregation in ("all", "majority")):
        fire("aggregation", f"the first {FIRST_STEPS} steps were all skipped: with aggregation '{aggregation}' over "
             f"{pairs_per_step} pairs per step a candidate must improve {aggregation} pairs at once, which random "
             "perturbations almost never do; use aggregation 'any' or zo.pairs_per_step=1")
    if n == COLLAPSE_STEPS and state["frac_first"] / COLLAPSE_STEPS < COLLAPSE_RATE:
        fire("vote_collapse", f"over the first {COLLAPSE_STEPS} steps only {100 * state['frac_first'] / COLLAPSE_STEPS:.2f}% "
             "of the perturbations were voted better: zo.radius is probably outside the linear regime (lower it), "
             "or the oracle never prefers a perturbed head")
    if state["taken"] >= SIGN_STEPS and state["own_margin"] < 0:
        fire("wrong_sign", f"after {state['taken']} taken steps the trained pairs' margin fell on average "
             f"({state['own_margin'] / state['taken']:+.4f} per step): the steps go the wrong way, which happens "
             "outside the linear regime: lower zo.radius (and zo.gamma)")
    if rec.get("support_energy", 1.0) < LOW_ENERGY:
        fire("support_energy", f"only {100 * rec['support_energy']:.1f}% of the expected direction lies in the "
             f"step's {rec['support_size']} support rows (< {100 * LOW_ENERGY:.0f}%): the support drops signal; "
             "raise zo.support_k or use zo.support=topk / all")
    win = state["window"]
    if len(win) == SIGNAL_WINDOW and all(len(w) > 3 and w[3] is not None for w in win):
        cos = sum(w[3] for w in win) / len(win)
        if cos < SIGNAL_MIN:
            fire("low_signal", f"the mean first-order signal cosine over the last {SIGNAL_WINDOW} steps is {cos:.3f} "
                 f"(< {SIGNAL_MIN}): the updates are almost pure noise; raise zo.m, use zo.support=topk, "
                 "or more pairs per step")
    elif len(win) == SIGNAL_WINDOW and all(w[2] >= 2 for w in win):
        usq = sum(w[0] for w in win) / len(win)
        mu2 = sum(w[1] for w in win) / len(win)
        votes = sum(w[2] for w in win) / len(win)
        cos = signal_cosine(usq, max(2, round(votes)), dim, sphere, mu2=mu2)
        if cos < SIGNAL_MIN:
            fire("low_signal", f"the estimated signal cosine over the last {SIGNAL_WINDOW} steps is {cos:.3f} "
                 f"(< {SIGNAL_MIN}): the updates are almost pure noise; raise zo.m, use zo.estimator=projected, "
                 "or more pairs per step")
    return out

