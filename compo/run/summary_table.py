"""The run summary a command prints at its end: summary.json as aligned tables, and the one
final line every verbosity prints (``--quiet`` included)."""

from __future__ import annotations

from typing import Iterable

RULE = "=" * 72
STAGE1_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "kl", "delta")
EVAL_KEYS = ("accuracy", "shift/chosen", "shift/rejected")
WIDTH = 120


def _g(x) -> str:
    return "n/a" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))


def grid(cells: Iterable[tuple[str, str]], indent: str = "  ", width: int = WIDTH) -> list[str]:
    """(name, value) cells as right-aligned columns, names over values, wrapped at ``width``."""
    lines: list[str] = []
    names: list[str] = []
    values: list[str] = []
    used = len(indent)
    for name, value in cells:
        w = max(len(name), len(value))
        if names and used + 2 + w > width:
            lines += [indent + "  ".join(names), indent + "  ".join(values)]
            names, values, used = [], [], len(indent)
        names.append(name.rjust(w))
        values.append(value.rjust(w))
        used += w + 2
    if names:
        lines += [indent + "  ".join(names), indent + "  ".join(values)]
    return lines


def table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Rows (labels indented) under a header: the first column left-aligned, the others right-aligned."""
    rows = [[indent + r[0]] + r[1:] for r in rows]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return [(r[0].ljust(widths[0]) + "".join("  " + c.rjust(w) for c, w in zip(r[1:], widths[1:]))).rstrip()
            for r in [header] + rows]


def _with_ci(m: dict, key: str, sign: str = "") -> str:
    if key not in m:
        return ""
    lo, hi = m.get("ci", {}).get(key, (None, None))
    text = f"{m[key]:{sign}.4f}"
    return text + (f" [{lo:{sign}.4f}, {hi:{sign}.4f}]" if lo is not None and lo == lo else "")


def _stage2(s: dict) -> list[str]:
    if "stopped" in s:
        return ["stage 2 (ComPO)", f"  stopped: {s['stopped']}"]
    cells = [("steps", _g(s.get("steps"))), ("taken", _g(s.get("steps_taken"))),
             ("skipped", _g(s.get("steps_skipped"))), ("mean N-/m", _g(s.get("mean_frac_minus"))),
             ("mean signal cosine", _g(s.get("mean_signal_cos"))),
             ("energy kept by sparsity", _g(s.get("mean_energy_kept")))]
    if "mean_agree_rate" in s:
        cells.append(("votes agreeing (no signal: 0.5)", _g(s["mean_agree_rate"])))
    out = ["stage 2 (ComPO)"] + grid(cells)
    if s.get("skip_reasons"):
        out.append("  skipped by reason: " + ", ".join(f"{k} {v}" for k, v in s["skip_reasons"].items()))
    parts = [p for p in ("noisy_trained", "noisy_untrained") if f"{p}/shift_chosen" in s]
    if parts:
        rows = [[p.replace("_", " ") + " pairs", _g(s.get(p + "/n")), _g(s[p + "/shift_chosen"]),
                 _g(s[p + "/shift_rejected"])] for p in parts]
        out += table(["  stage2 log-prob shift", "pairs", "chosen", "rejected"], rows, "    ")
    from oracles.judges import totals_line

    out += [f"  stage2 {line}" for line in filter(None, (totals_line(s, p) for p in ("oracle/", "accept_oracle/")))]
    return out


def _held_out(evals: dict) -> list[str]:
    models = [(name, m) for name, m in evals.items() if m and name != "stage2_effect"]
    eff = evals.get("stage2_effect")
    if not models and not eff:
        return []
    keys = [k for k in EVAL_KEYS if any(k in m for _, m in models) or (eff and k in eff)]
    rows = [[name if name == "reference" else f"after {name}"] + [_with_ci(m, k) for k in keys] for name, m in models]
    if eff:
        rows.append(["stage 2's own effect"] + [_with_ci(eff, k, "+") for k in keys])
    n = next((m["n_pairs"] for _, m in models if "n_pairs" in m), None)
    head = "held-out" + (f" ({n} pairs)" if n is not None else "")
    out = table([head] + keys, rows)
    if eff:
        out.append("  (stage 2's own effect: after stage2 minus after stage1 on the same pairs, paired bootstrap)")
    return out


def summary_lines(summary: dict) -> list[str]:
    """Every part of summary.json a person reads at the end of a run, as aligned tables."""
    out = [RULE, "run summary" + (f"  (wall {summary['wall_s']:.1f} s)" if "wall_s" in summary else "")]
    if "n_pairs" in summary:
        out.append(f"  pairs {summary['n_pairs']}   clean {summary['n_clean']}   noisy {summary['n_noisy']}")
    if "stage1" in summary:
        s = summary["stage1"]
        out += ["stage 1, last step"] + grid((k, f"{s[k]:.4f}") for k in STAGE1_KEYS if k in s)
    if "stage2" in summary:
        s = summary["stage2"]
        out += _stage2(s)
        out += [f"  warning: {w}" for w in s.get("warnings", [])]
    out += _held_out(summary.get("eval", {}))
    out.append(RULE)
    return out


def final_line(command: str, summary: dict) -> str:
    """``compo <command>: done ...``: the run's headline numbers on one line."""
    parts = [f"compo {command}: done" + (f" in {summary['wall_s']:.1f} s" if "wall_s" in summary else "")]
    if "n_pairs" in summary:
        parts.append(f"{summary['n_pairs']} pairs ({summary['n_clean']} clean, {summary['n_noisy']} noisy)")
    acc = [(name, m["accuracy"]) for name, m in summary.get("eval", {}).items()
           if m and name != "stage2_effect" and "accuracy" in m]
    if acc:
        parts.append("held-out accuracy " + ", ".join(f"{name} {v:.4f}" for name, v in acc))
    return "; ".join(parts)
