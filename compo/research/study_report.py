"""A study's numbers: per-cell metrics with intervals, study.csv, study.md and the plots."""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path

import torch

from compo.core.config import RunConfig
from compo.scoring.evaluate import paired_differences, pair_values, stratified_mean, summarise
from compo.scoring.logprobs import PairScores
from compo.core.rundir import atomic_write_text, read_json, read_jsonl

#: two-sided 95% Student t quantiles by degrees of freedom (seeds - 1); normal beyond
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
SPLIT_KEYS = ("n_clean", "n_noisy", "label_correct/noisy", "label_correct/clean", "wrong_labels_in_noisy", "score",
              "flip_detection")
EFFECT_KEYS = ("accuracy", "shift/chosen", "shift/rejected")
STAGE2_KEYS = ("steps", "steps_taken", "mean_frac_minus", "noisy/shift_chosen", "noisy/shift_rejected",
               "noisy_untrained/shift_chosen", "noisy_untrained/shift_rejected")


def tracks_of(metrics_path: Path) -> list[dict]:
    """Per tracked pair: its stage-2 log-probs per step (from metrics.jsonl, zo.track_pairs)."""
    if not metrics_path.exists():
        return []
    recs = [r for r in read_jsonl(metrics_path) if r.get("stage") == "stage2" and "tracked" in r]
    first = next((r for r in recs if "tracked_pairs" in r), None)
    if first is None:
        return []
    out = []
    for j, info in enumerate(first["tracked_pairs"]):
        start = first["tracked_start"][j]
        steps = [0] + [r["step"] for r in recs]
        out.append({"source": info["source"], "trained": info["trained_at"] is not None, "steps": steps,
                    "chosen": [start[0]] + [r["tracked"][j][0] for r in recs],
                    "rejected": [start[1]] + [r["tracked"][j][1] for r in recs]})
    return out


def cell_metrics(run_dir: Path, stage: str, cfg: RunConfig) -> dict:
    """Held-out metrics of a finished run's ``stage`` against the reference, with intervals."""
    saved = read_json(run_dir / "eval_scores.json", required=("reference", stage))
    ref, fin = PairScores.from_json(saved["reference"]), PairScores.from_json(saved[stage])
    vals = pair_values(fin, ref, cfg.stage1.beta)
    margins = {"reference": (ref.chosen - ref.rejected).tolist(), "final": vals.pop("margin").tolist()}
    summary = read_json(run_dir / "summary.json")
    split = {k: summary.get("split", {}).get(k) for k in SPLIT_KEYS}
    stage2 = {k: summary.get("stage2", {}).get(k) for k in STAGE2_KEYS} if stage == "stage2" else {}
    out = {"stage": stage, "metrics": summarise(vals, cfg.eval.bootstrap, cfg.eval.level, cfg.seed),
           "split": split, "stage2": stage2, "margins": margins,
           "tracks": tracks_of(run_dir / "metrics.jsonl") if stage == "stage2" else []}
    if stage == "stage2" and "stage1" in saved:
        before = PairScores.from_json(saved["stage1"])
        out["stage2_effect"] = stage2_effect(before, fin, ref, cfg)
        margins["stage1"] = (before.chosen.double() - before.rejected.double()).tolist()  # pools the effect over seeds
    return out


def stage2_effect(before: PairScores, after: PairScores, ref: PairScores, cfg: RunConfig) -> dict:
    """Stage 2's own effect: after stage 2 minus after stage 1 per held-out pair, with intervals."""
    return summarise(paired_differences(before, after, ref, cfg.stage1.beta), cfg.eval.bootstrap, cfg.eval.level, cfg.seed)


def cond(r: dict) -> str:
    """A result's noise setting label (the rate, with the bias in a study of several biases)."""
    return r.get("condition") or f"{r['noise']:g}"


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of two or more seeds' values with its 95% t interval."""
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = T975.get(len(xs) - 1, 1.96) * sd / math.sqrt(len(xs))
    return mean, mean - half, mean + half


def aggregate(results: list[dict], metrics: list[str]) -> list[dict]:
    """(method, noise setting, metric) rows: mean over seeds with a t interval, or with one seed
    the run's own bootstrap interval."""
    groups: dict[tuple, list[dict]] = {}
    setting: dict[str, tuple] = {}
    for r in results:
        setting[cond(r)] = (r["noise"], r.get("bias", "uniform"))
        for m in metrics:
            if m in r["metrics"]:
                groups.setdefault((r["method"], cond(r), m), []).append(r["metrics"][m])
    rows = []
    for (method, label, metric), vals in groups.items():
        noise, bias = setting[label]
        xs = [v["value"] for v in vals if v["value"] is not None and math.isfinite(v["value"])]
        if len(xs) >= 2:
            mean, lo, hi = t_interval(xs)
        else:
            mean = xs[0] if xs else math.nan
            lo, hi = vals[0]["ci_low"], vals[0]["ci_high"]
        rows.append({"method": method, "noise": noise, "bias": bias, "condition": label, "metric": metric,
                     "mean": mean, "ci_low": lo, "ci_high": hi, "n": len(xs)})
    return rows


def _csv(results: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["cell", "method", "noise", "bias", "seed", "metric", "value", "ci_low", "ci_high", "n"])
    for r in results:
        for name, m in r["metrics"].items():
            w.writerow([r["cell"], r["method"], r["noise"], r.get("bias", "uniform") if r["noise"] > 0 else "none",
                        r["seed"], name, m["value"], m["ci_low"], m["ci_high"], m["n"]])
    return buf.getvalue()


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def markdown(study, results: list[dict], rows: list[dict], pooled: dict | None = None) -> str:
    """study.md: one table per metric (methods x noise rates, mean [interval]), stage 2's own
    effect (with ``pooled``, see :func:`pooled_stage2_effects`, its accuracy over seeds with the
    pairs resampled) and the split's label quality per noise rate."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    rates = list(dict.fromkeys(cond(r) for r in results))
    seeds = sorted(dict.fromkeys(r["seed"] for r in results))
    by = {(r["method"], r["condition"], r["metric"]): r for r in rows}
    ci = "95% t interval over seeds" if len(seeds) > 1 else "bootstrap interval over held-out pairs (eval.level)"
    biases = "mixed: u = uniform, lm = low_margin" if study.mixed() else study.settings()[0][1]
    out = [f"# Noise study: {study.noise_kind} noise ({biases}), seeds {seeds}", "",
           f"Each cell: mean [{ci}]; `n` = seeds. Labels are scored against the original (un-noised) labels.", ""]
    for metric in study.metrics:
        out += [f"## {metric}", "", "| method | " + " | ".join(f"noise {r}" for r in rates) + " |",
                "|---|" + "---|" * len(rates)]
        for m in methods:
            cells = []
            for rate in rates:
                row = by.get((m, rate, metric))
                cells.append("" if row is None else f"{_num(row['mean'])} [{_num(row['ci_low'])}, {_num(row['ci_high'])}]")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    effects = [dict(r, metrics=r["stage2_effect"]) for r in results if r.get("stage2_effect")]
    if effects:
        erows = {(e["method"], e["condition"], e["metric"]): e for e in aggregate(effects, list(EFFECT_KEYS))}
        pooled = pooled or {}
        extra = ["delta accuracy, mean of seeds [pairs resampled within each seed]"] if pooled else []
        out += ["## Stage 2's own effect (after stage 2 minus after stage 1, same held-out pairs, paired interval)", "",
                "| method | noise | " + " | ".join([f"delta {k}" for k in EFFECT_KEYS] + extra) + " |",
                "|---|---|" + "---|" * (len(EFFECT_KEYS) + len(extra))]
        num = lambda v, lo, hi: f"{_num(v, 4)} [{_num(lo, 4)}, {_num(hi, 4)}]"  # noqa: E731
        for m in dict.fromkeys(e["method"] for e in effects):
            for rate in rates:
                cells = [erows.get((m, rate, k)) for k in EFFECT_KEYS]
                if any(cells):
                    shown = ["" if c is None else num(c["mean"], c["ci_low"], c["ci_high"]) for c in cells]
                    if pooled:
                        shown.append(num(*pooled[m, rate]) if (m, rate) in pooled else "")
                    out.append(f"| {m} | {rate} | " + " | ".join(shown) + " |")
        out.append("")
    out += ["## Split quality (share of correct labels among noisy vs clean pairs)", "",
            "| noise | seed | n_noisy | n_clean | correct (noisy) | correct (clean) | wrong labels in noisy |", "|---|---|---|---|---|---|---|"]
    seen = set()
    for r in results:
        key = (cond(r), r["seed"])
        if key in seen:
            continue
        seen.add(key)
        s = r["split"]
        out.append(f"| {cond(r)} | {r['seed']} | {s.get('n_noisy')} | {s.get('n_clean')} | "
                   f"{_num(s.get('label_correct/noisy'))} | {_num(s.get('label_correct/clean'))} | "
                   f"{_num(s.get('wrong_labels_in_noisy'))} |")
    return "\n".join(out + flip_table(results)) + "\n"


def flip_table(results: list[dict]) -> list[str]:
    """study.md's flip recall / precision per noise setting, seed and split rule, beside a random
    split of the same size (rows only where labels were flipped)."""
    out, seen = [], set()
    for r in results:
        det = (r.get("split") or {}).get("flip_detection") or {}
        key = (cond(r), r["seed"])
        if not det or key in seen or r["noise"] == 0:
            continue
        seen.add(key)
        for rule, d in det.items():
            out.append(f"| {cond(r)} | {r['seed']} | {rule} | {d['n_noisy']} | {_num(d['recall'])} | "
                       f"{_num(d['random_recall'])} | {_num(d['precision'])} | {_num(d['random_precision'])} |")
    if not out:
        return []
    return ["", "## Flip detection (recall: share of flipped pairs in the noisy part; precision: share of the noisy "
            "part that is flipped; random: a random split of the same size)", "",
            "| noise | seed | rule | n_noisy | recall | random recall | precision | random precision |",
            "|---|---|---|---|---|---|---|---|"] + out


PAIRED_KEYS = ("accuracy", "rewards/accuracies")


def _per_pair(cell: dict) -> dict[str, torch.Tensor]:
    """A cell's per-held-out-pair accuracy and implicit-reward accuracy, from its margins."""
    fin = torch.tensor(cell["margins"]["final"], dtype=torch.float64)
    ref = torch.tensor(cell["margins"]["reference"], dtype=torch.float64)
    return {"accuracy": (fin > 0).double(), "rewards/accuracies": (fin > ref).double()}


def _over_seeds(by_seed: list[tuple[int, torch.Tensor]], n_boot: int, level: float) -> tuple[float, float, float]:
    """(value, low, high): the mean over seeds of per-pair differences, the pairs resampled within
    each seed (seeded by the first seed)."""
    return stratified_mean([d for _, d in by_seed], n_boot, level, min(s for s, _ in by_seed))


def paired_vs_baseline(results: list[dict], baseline: str, n_boot: int, level: float) -> list[dict]:
    """Per (method, noise setting, seed): the method minus ``baseline`` on the same held-out pairs,
    with a paired bootstrap interval (the pairs resampled together, seeded by the seed)."""
    base = {(cond(r), r["seed"]): r for r in results if r["method"] == baseline}
    rows, strata = [], {}
    for r in results:
        b = base.get((cond(r), r["seed"]))
        if r["method"] == baseline or b is None or len(b["margins"]["final"]) != len(r["margins"]["final"]):
            continue
        mine, theirs = _per_pair(r), _per_pair(b)
        diff = {k: mine[k] - theirs[k] for k in PAIRED_KEYS}
        head = {"method": r["method"], "baseline": baseline, "noise": r["noise"], "bias": r.get("bias", "uniform"),
                "condition": cond(r)}
        for k, v in summarise(diff, n_boot, level, r["seed"]).items():
            rows.append({"cell": r["cell"], **head, "seed": r["seed"], "metric": k, **v})
            strata.setdefault((r["method"], cond(r), k), (head, []))[1].append((r["seed"], diff[k]))
    for (method, label, k), (head, by_seed) in strata.items():
        if len(by_seed) >= 2:
            value, lo, hi = _over_seeds(by_seed, n_boot, level)
            rows.append({"cell": f"pooled_{_slug(label)}_{method}", **head, "seed": "pooled", "metric": k,
                         "value": value, "ci_low": lo, "ci_high": hi, "n": sum(len(d) for _, d in by_seed)})
    return rows


def pooled_stage2_effects(results: list[dict], n_boot: int, level: float) -> dict[tuple[str, str], tuple]:
    """(method, noise setting) -> (value, low, high): stage 2's own accuracy effect as the mean
    over two or more seeds of each seed's paired difference, its interval from the held-out pairs
    resampled within each seed (cells that kept their stage-1 margins)."""
    strata: dict[tuple[str, str], list[tuple[int, torch.Tensor]]] = {}
    for r in results:
        if "stage1" in r.get("margins", {}):
            before = torch.tensor(r["margins"]["stage1"], dtype=torch.float64) > 0
            diff = _per_pair(r)["accuracy"] - before.double()
            strata.setdefault((r["method"], cond(r)), []).append((r["seed"], diff))
    return {k: _over_seeds(v, n_boot, level) for k, v in strata.items() if len(v) >= 2}


def paired_table(rows: list[dict], baseline: str) -> list[str]:
    """study.md's paired comparison: per method and noise setting, each seed's difference and, with
    several seeds, their mean with a t interval."""
    if not rows:
        return []
    out = ["", f"## Paired against {baseline} (method minus {baseline}, same held-out pairs; points)", "",
           "Over seeds: the mean of the seeds' differences with two intervals, one resampling the held-out",
           "pairs within each seed (the training runs held fixed), one a t interval over the seeds.", "",
           "| method | noise | metric | per seed: difference [paired 95% interval] | mean over seeds "
           "[pairs resampled] [t over seeds] |",
           "|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["condition"], r["metric"]), []).append(r)
    pts = lambda v, lo, hi: f"{100 * v:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"  # noqa: E731
    for (method, label, metric), rs in groups.items():
        seeds = [r for r in rs if r["seed"] != "pooled"]
        per = "; ".join(f"s{r['seed']} {pts(r['value'], r['ci_low'], r['ci_high'])}" for r in seeds)
        mean = ""
        for r in rs:
            if r["seed"] == "pooled":
                _, lo, hi = t_interval([s["value"] for s in seeds])
                mean = f"{pts(r['value'], r['ci_low'], r['ci_high'])} [{100 * lo:+.2f}, {100 * hi:+.2f}]"
        out.append(f"| {method} | {label} | {metric} | {per} | {mean} |")
    return out


def _paired_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = ["cell", "method", "baseline", "noise", "bias", "seed", "metric", "value", "ci_low", "ci_high", "n"]
    w.writerow(cols)
    for r in rows:
        w.writerow([r[c] if c != "bias" or r["noise"] > 0 else "none" for c in cols])
    return buf.getvalue()


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", s).strip("_")


def write_plots(root: Path, study, results: list[dict], rows: list[dict]) -> list[Path]:
    """metric vs noise per method; held-out margins before/after per noise rate (first seed);
    stage-2 log-prob trajectories of tracked noisy pairs per stage-2 cell (first seed)."""
    from compo.research.plots import plot_margin_histograms, plot_metric_vs_noise, plot_trajectories

    plots = root / "plots"
    out = []
    biases = sorted({r["bias"] for r in rows if r["noise"] > 0}) or ["uniform"]
    for bias in biases:  # one curve per method over the rates of each bias (noise 0 in every one)
        part = [r for r in rows if r["noise"] == 0 or r["bias"] == bias]
        tag, what = (f"_{bias}", f" ({bias} flips)") if len(biases) > 1 else ("", "")
        out += [plot_metric_vs_noise(part, m, plots / f"{_slug(m)}_vs_noise{tag}.png", f"{m} vs label noise{what}")
                for m in study.metrics]
    seed0 = min(r["seed"] for r in results)
    for label in dict.fromkeys(cond(r) for r in results):
        cells = [r for r in results if cond(r) == label and r["seed"] == seed0]
        margins = {"reference": cells[0]["margins"]["reference"]}
        margins.update({r["method"]: r["margins"]["final"] for r in cells})
        out.append(plot_margin_histograms(margins, plots / f"margins_noise{label}.png",
                                          f"held-out margins, noise {label} (seed {seed0})"))
        for r in cells:
            if r["stage"] == "stage2":
                out.append(plot_trajectories(r["tracks"], plots / f"trajectories_{_slug(r['method'])}_noise{label}.png",
                                             f"{r['method']}: tracked noisy pairs during stage 2 (noise {label})"))
    return out


def write_report(root: Path, study, results: list[dict], say=print) -> dict:
    """study.csv (one row per cell and metric), study.md and plots/*.png."""
    rows = aggregate(results, study.metrics)
    atomic_write_text(root / "study.csv", _csv(results))
    fp = results[0].get("fingerprint") or {}
    n_boot, level = fp.get("eval.bootstrap", 1000), fp.get("eval.level", 0.95)
    md = markdown(study, results, rows, pooled_stage2_effects(results, n_boot, level))
    if study.baseline:
        paired = paired_vs_baseline(results, study.baseline, n_boot, level)
        atomic_write_text(root / "paired.csv", _paired_csv(paired))
        md += "\n".join(paired_table(paired, study.baseline)) + "\n"
        for r in paired:
            if r["metric"] == "accuracy":
                who = "mean over seeds" if r["seed"] == "pooled" else f"seed {r['seed']}"
                say(f"  {r['method']} minus {study.baseline} at noise {r['condition']}, {who}: accuracy "
                    f"{100 * r['value']:+.2f} pts [{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}] (paired)")
    atomic_write_text(root / "study.md", md)
    plots = write_plots(root, study, results, rows)
    say(f"study: wrote {root / 'study.csv'}, {root / 'study.md'} and {len(plots)} plots in {root / 'plots'}")
    for r in rows:
        if r["metric"] == study.metrics[0]:
            say(f"  {r['method']:18s} noise {r['condition']:<5s} {r['metric']} = {_num(r['mean'])} "
                f"[{_num(r['ci_low'])}, {_num(r['ci_high'])}]  (n={r['n']})")
    effects = [dict(r, metrics=r["stage2_effect"]) for r in results if r.get("stage2_effect")]
    for e in aggregate(effects, ["accuracy"]):
        seeds = [r for r in effects if (r["method"], cond(r)) == (e["method"], e["condition"])]
        if e["n"] > 1:  # each seed's paired interval, then the mean with its t interval over seeds
            for r in seeds:
                v = r["metrics"]["accuracy"]
                say(f"  stage 2 effect of {e['method']} at noise {e['condition']}, seed {r['seed']}: accuracy "
                    f"{100 * v['value']:+.2f} pts [{100 * v['ci_low']:+.2f}, {100 * v['ci_high']:+.2f}]")
        over = f", mean of {e['n']} seeds" if e["n"] > 1 else ""
        say(f"  stage 2 effect of {e['method']} at noise {e['condition']}{over}: accuracy {100 * e['mean']:+.2f} pts "
            f"[{100 * e['ci_low']:+.2f}, {100 * e['ci_high']:+.2f}]")
    return {"rows": rows, "plots": plots}
