"""`compo study`: sweep injected noise rates x methods x seeds, reusing shared work, resumable.

Every cell is an ordinary run directory made by :func:`compo.pipeline.run_pipeline`. Work is
shared through the run directories' own reuse rules: all methods of one (seed, noise rate)
share the reference scoring (split.jsonl is copied into each stage-1 run and reused because
its fingerprint matches), and stage-2 variants share their stage 1 (a stage-1 run with stage 2
off is cloned, then resumed, so only stage 2 runs). A finished cell writes
``cells/<cell>.json``; rerunning the study skips those and resumes the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compo.core import fingerprint
from compo.core.config import ConfigError, RunConfig, load_config
from compo.core.errors import UserError
from compo.core.progress import duration
from compo.core.rundir import atomic_write_json, atomic_write_text, read_json

#: Method presets: config overrides on top of the study's base config.
PRESETS: dict[str, dict[str, Any]] = {
    "dpo_all": {"stage1.loss": "dpo", "stage1.train_on": "all", "zo.enabled": False},
    "dpo_clean": {"stage1.loss": "dpo", "stage1.train_on": "clean", "zo.enabled": False},
    "cdpo": {"stage1.loss": "dpo", "stage1.label_smoothing": 0.1, "stage1.train_on": "all", "zo.enabled": False},
    "rdpo": {"stage1.loss": "robust", "stage1.label_smoothing": 0.1, "stage1.train_on": "all", "zo.enabled": False},
    "compo_full": {"stage1.loss": "dpo", "stage1.train_on": "clean", "zo.enabled": True, "zo.estimator": "full"},
    "compo_projected": {"stage1.loss": "dpo", "stage1.train_on": "clean", "zo.enabled": True,
                        "zo.estimator": "projected", "zo.sparsity": "top_fraction"},
    "compo_topk": {"stage1.loss": "dpo", "stage1.train_on": "clean", "zo.enabled": True, "zo.estimator": "projected",
                   "zo.sparsity": "top_fraction", "zo.support": "topk"},
    "bco_clean": {"stage1.loss": "bco", "stage1.train_on": "clean", "zo.enabled": False},
    "kto_clean": {"stage1.loss": "kto", "stage1.train_on": "clean", "zo.enabled": False},
}
DEFAULT_METRICS = ["accuracy", "rewards/accuracies", "shift/chosen", "shift/rejected",
                   "displacement/both_down", "displacement/margin_up"]


class NoiseSetting(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rate: float = Field(..., ge=0, le=1, description="Injected label-noise rate.")
    bias: Literal["uniform", "low_margin"] = Field("uniform", description="data.noise.bias of the setting.")


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base: str = Field(..., description="Run config every cell starts from (relative to the study file).")
    study_dir: str = Field("runs/study", description="Directory of the cells, study.csv, study.md and plots/.")
    seeds: list[int] = Field([0], min_length=1, description="Run seeds (data order, noise draw, perturbations).")
    noise_rates: list[float] = Field([0.0, 0.2], min_length=1, description="Injected label-noise rates.")
    noise_kind: Literal["flip", "ambiguous"] = Field("flip", description="data.noise.kind of every cell.")
    noise_bias: Literal["uniform", "low_margin"] = Field("uniform", description="data.noise.bias of every cell.")
    noise: list[NoiseSetting] = Field(default_factory=list, description="Noise settings, each {rate, bias}; given, "
                                      "they replace noise_rates and noise_bias (a study of several biases).")
    methods: dict[str, dict[str, Any]] = Field(..., min_length=1, description="name -> overrides; a preset name "
                                               "(dpo_all, dpo_clean, cdpo, rdpo, compo_full, compo_projected, "
                                               "compo_topk, bco_clean, kto_clean) starts from that preset.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Config overrides applied to every cell.")
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS), description="Metrics in study.md and the plots.")
    baseline: Optional[str] = Field(None, description="A method every other one is compared with on the same held-out "
                                    "pairs (paired intervals per seed: study.md, paired.csv); None = no comparison.")

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, v: Any) -> Any:
        if isinstance(v, list):  # a list of preset names
            return {name: {} for name in v}
        return {k: (o or {}) for k, o in v.items()} if isinstance(v, dict) else v

    @field_validator("noise_rates")
    @classmethod
    def _rates(cls, v: list[float]) -> list[float]:
        bad = [r for r in v if not 0 <= r <= 1]
        if bad:
            raise ValueError(f"noise rates must lie in [0, 1], got {bad}")
        if len(set(v)) != len(v):
            raise ValueError("noise rates must be distinct")
        return v

    @field_validator("noise")
    @classmethod
    def _settings(cls, v: list[NoiseSetting]) -> list[NoiseSetting]:
        keys = [(n.rate, n.bias if n.rate > 0 else "") for n in v]
        if len(set(keys)) != len(keys):
            raise ValueError("noise settings must be distinct")
        return v

    @model_validator(mode="after")
    def _baseline(self) -> "StudyConfig":
        if self.baseline is not None and self.baseline not in self.methods:
            raise ValueError(f"baseline {self.baseline!r} is not one of the methods ({', '.join(self.methods)})")
        return self

    def settings(self) -> list[tuple[float, str]]:
        """(rate, bias) of every noise setting, in order."""
        if self.noise:
            return [(n.rate, n.bias) for n in self.noise]
        return [(r, self.noise_bias) for r in self.noise_rates]

    def mixed(self) -> bool:
        """Do the settings flip with more than one bias (cells and tables then name the bias)?"""
        return len({b for r, b in self.settings() if r > 0}) > 1


def condition(rate: float, bias: str, mixed: bool) -> str:
    """A noise setting's label in cell names and tables: the rate, with the bias where they mix."""
    return f"{rate:g}" if not mixed or rate == 0 else f"{rate:g}{'lm' if bias == 'low_margin' else 'u'}"


def load_study(path: str | Path, overrides: list[str] | None = None,
               study_dir: str | None = None) -> tuple[StudyConfig, dict[str, RunConfig]]:
    """The study config and every cell's validated run config (so a bad method fails before any work)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise UserError(str(path), f"cannot read the study config: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UserError(str(path), f"not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(str(path), "must hold a mapping of study keys")
    try:
        study = StudyConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError([(f"{path}: {'.'.join(map(str, err['loc']))}", err["msg"].removeprefix("Value error, "))
                           for err in e.errors()]) from None
    if study_dir:
        study.study_dir = study_dir
    base = Path(study.base) if Path(study.base).is_absolute() else path.parent / study.base
    if not base.exists():
        raise UserError(f"{path}: base", f"the base run config {base} does not exist")
    cells = {}
    for seed in study.seeds:
        for rate, bias in study.settings():
            for method, extra in study.methods.items():
                name = cell_name(seed, condition(rate, bias, study.mixed()), method)
                cells[name] = cell_config(base, study, seed, rate, method, extra, overrides or [], name, bias)
    first = next(iter(cells.values()))
    if first.data.path != "toy" and not (first.data.eval_path or first.data.eval_fraction > 0):
        raise UserError(f"{base}: data", "a study scores held-out pairs: set data.eval_path or data.eval_fraction")
    return study, cells


def cell_name(seed: int, cond: str, method: str) -> str:
    return f"s{seed}_n{cond}_{method}"


def _sets(d: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in d.items()]


def cell_config(base: Path, study: StudyConfig, seed: int, rate: float, method: str, extra: dict,
                overrides: list[str], name: str, bias: str | None = None) -> RunConfig:
    if method not in PRESETS and not extra:
        raise UserError(f"methods.{method}", f"unknown preset; presets: {', '.join(PRESETS)} (or give overrides)")
    sets = _sets(study.overrides) + _sets(PRESETS.get(method, {})) + _sets(extra) + list(overrides)
    kind = study.noise_kind if rate > 0 else "none"
    sets += _sets({"seed": seed, "data.noise.kind": kind, "data.noise.rate": rate, "data.noise.bias": bias or study.noise_bias,
                   "run_dir": str(Path(study.study_dir) / "runs" / name)})
    try:
        return load_config(base, sets)
    except ConfigError as e:
        raise ConfigError([(f"cell {name}: {w}", m) for w, m in e.problems]) from None


def _clone(src: Path, dst: Path) -> None:
    """Copy a run directory: weights hard-linked (they are only ever replaced, never edited in
    place), everything else copied (metrics.jsonl is appended to); checkpoints left out."""
    tmp = dst.with_name(f".{dst.name}.clone.tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    def copy(s: str, d: str) -> None:
        if s.endswith((".safetensors", ".bin", ".pt")):
            try:
                os.link(s, d)
                return
            except OSError:
                pass
        shutil.copy2(s, d)

    shutil.copytree(src, tmp, copy_function=copy, ignore=shutil.ignore_patterns("checkpoints", ".*"))
    os.replace(tmp, dst)


def _prefix(cell: str) -> str:
    """``s<seed>_n<condition>`` of a cell's name: the stage-1 runs of a noise setting share it."""
    return "_".join(cell.split("_", 2)[:2])


def _seed_reference(donor: Path, target: Path) -> None:
    """Give a fresh run the reference log-probs (training and held-out pairs) of a run with the
    same reference key; the run checks the key and the pairs before using them."""
    from compo.scoring import ref_cache

    target.mkdir(parents=True, exist_ok=True)
    if (donor / ref_cache.FILE).exists():
        shutil.copy2(donor / ref_cache.FILE, target / ref_cache.FILE)
    if (donor / "eval_scores.json").exists():
        saved = read_json(donor / "eval_scores.json")
        atomic_write_json(target / "eval_scores.json",
                          {k: saved[k] for k in ("sources", "reference", "reference_key") if k in saved})


def _seed_split(donor: Path, target: Path) -> None:
    """Give a fresh stage-1 run the split (and reference scoring) of another run of the same split."""
    _seed_reference(donor, target)
    shutil.copy2(donor / "split.jsonl", target / "split.jsonl")
    if (donor / "split_stage1").exists() and not (target / "split_stage1").exists():  # split.score stage1's model
        _clone(donor / "split_stage1", target / "split_stage1")
    if (donor / "reference").exists() and not (target / "reference").exists():
        _clone(donor / "reference", target / "reference")
    atomic_write_json(target / "fingerprint.json", {"split": read_json(donor / "fingerprint.json")["split"]})
    if (donor / "summary.json").exists():  # the split's counts and label quality (a reused split does not redo them)
        summary = read_json(donor / "summary.json")
        atomic_write_json(target / "summary.json", {k: summary[k] for k in ("n_pairs", "n_clean", "n_noisy", "split")
                                                    if k in summary})


#: Eval options that change a cell's intervals (the rest concern `compo eval`).
EVAL_KEYS = ("eval.bootstrap", "eval.level")


def last_stage(cfg: RunConfig) -> str:
    """The stage a cell's result comes from: stage 2 where it runs, else stage 1."""
    return "stage2" if cfg.zo.enabled else "stage1"


def cell_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """What a cell's result depends on: its run's stage fingerprints and the interval options."""
    stages = fingerprint.ORDER[: fingerprint.ORDER.index(last_stage(cfg)) + 1]
    fp = fingerprint.merged(fingerprint.current(cfg, s) for s in stages)
    flat = fingerprint.flatten(cfg.model_dump(mode="json"))
    return fp | {k: flat[k] for k in EVAL_KEYS}


def _run_fingerprints(cfg: RunConfig, run_dir: Path) -> tuple[dict, dict]:
    """(recorded, current) fingerprints of the stages a run directory has recorded."""
    rec = read_json(run_dir / "fingerprint.json") if (run_dir / "fingerprint.json").exists() else {}
    return fingerprint.merged(rec.values()), fingerprint.merged(fingerprint.current(cfg, s) for s in rec)


def _finished(run_dir: Path, stage: str) -> bool:
    """True when ``run_dir`` holds ``stage``'s model and its held-out scores (a run killed between
    saving the model and scoring it has the first without the second: its pipeline still has to run)."""
    marker, scores = run_dir / "model" / "compo_stage.json", run_dir / "eval_scores.json"
    return (marker.exists() and read_json(marker).get("stage") == stage and scores.exists()
            and stage in read_json(scores))


class Runner:
    """Runs the cells of a study in order, sharing splits and stage-1 runs."""

    def __init__(self, study: StudyConfig, cells: dict[str, RunConfig], say=print):
        self.study, self.cells, self.say = study, cells, say
        self.root = Path(study.study_dir)
        self.splits: dict[str, Path] = {}  # split fingerprint key -> a run dir holding that split
        self.references: dict[str, Path] = {}  # reference key -> a run dir holding those reference scores

    def cell_result(self, name: str) -> Path:
        return self.root / "cells" / f"{name}.json"

    def _stage1_dir(self, cfg: RunConfig, name: str) -> Path:
        group = cfg.model_copy(deep=True)
        group.zo.enabled = False
        fp1 = fingerprint.current(group, "stage1")
        d = self.root / "runs" / f"{_prefix(name)}_stage1-{fingerprint.digest(fp1, 10)}"
        group.run_dir = str(d)
        split_key, ref_key = fingerprint.digest(fingerprint.current(group, "split"), 10), fingerprint.reference_key(group)
        if not _finished(d, "stage1"):
            donor = self.splits.get(split_key)
            if donor is not None and not (d / "split.jsonl").exists():
                _seed_split(donor, d)
            elif donor is None and ref_key in self.references:
                _seed_reference(self.references[ref_key], d)
            self._pipeline(group)
        self.splits.setdefault(split_key, d)
        self.references.setdefault(ref_key, d)
        return d

    def _pipeline(self, cfg: RunConfig) -> None:
        from compo.pipeline import run_pipeline

        self.say(f"study: running {cfg.run_dir}")
        run_pipeline(cfg, resume=True)

    def run_cell(self, name: str) -> dict:
        """Run (or finish) one cell and write its result file."""
        from compo.research.study_report import cell_metrics

        cfg = self.cells[name]
        if not cfg.stage1.enabled:
            raise UserError(f"methods of {name}", "a study cell needs stage1.enabled (it compares trained models)")
        s1 = self._stage1_dir(cfg, name)
        run_dir, stage = s1, last_stage(cfg)
        if stage == "stage2":
            run_dir = Path(cfg.run_dir)
            if not _finished(run_dir, "stage2"):
                if not run_dir.exists():
                    _clone(s1, run_dir)
                self._pipeline(cfg)
        result = cell_metrics(run_dir, stage, cfg)
        result.update(cell=name, method=name.split("_", 2)[2], seed=cfg.seed, noise=cfg.data.noise.rate,
                      bias=cfg.data.noise.bias, condition=name.split("_", 2)[1][1:],
                      run_dir=str(run_dir), fingerprint=cell_fingerprint(cfg))
        atomic_write_json(self.cell_result(name), result)
        return result

    def check_recorded(self) -> None:
        """Refuse, before any work, a study directory whose cells ran with another config: a
        finished cell would otherwise be reported with results of settings it no longer has."""
        for name, cfg in self.cells.items():
            path, stage = self.cell_result(name), last_stage(cfg)
            if path.exists():
                saved = read_json(path)
                if saved.get("stage") != stage:
                    raise UserError(str(path), f"cell {name} holds {saved.get('stage')} results but its config now "
                                    f"ends with {stage} (zo.enabled: {not cfg.zo.enabled} -> {cfg.zo.enabled}); "
                                    f"give a new --study-dir, or move {self.root} away to start over")
                old, new = saved.get("fingerprint"), cell_fingerprint(cfg)
                if old is None:  # written before cells recorded theirs: compare the run's own record
                    run_dir = Path(saved["run_dir"]) if saved.get("run_dir") else None
                    if run_dir is None or not (run_dir / "fingerprint.json").exists():
                        raise UserError(str(path), f"cell {name} records no fingerprint and its run directory "
                                        f"{run_dir} has none, so it cannot be checked against this config; delete "
                                        "the cell's file to redo it, or give a new --study-dir")
                    old, _ = _run_fingerprints(cfg, run_dir)
                    new = {k: v for k, v in new.items() if k not in EVAL_KEYS}
            elif stage == "stage2" and Path(cfg.run_dir).exists():
                path = Path(cfg.run_dir) / "fingerprint.json"
                old, new = _run_fingerprints(cfg, Path(cfg.run_dir))
            else:
                continue
            diff = fingerprint.differences(old, new)
            if diff:
                raise UserError(str(path), f"cell {name} ran with another config ({fingerprint.describe(diff, old, new, 3)}); "
                                f"give a new --study-dir, or move {self.root} away to start over")

    def report(self) -> int:
        """The report of the cells finished so far (checked against this config first); runs
        nothing. Returns how many cells it covers."""
        from compo.research.study_report import write_report

        self.check_recorded()
        results = [read_json(self.cell_result(n)) for n in self.cells if self.cell_result(n).exists()]
        if not results:
            raise UserError(str(self.root / "cells"), "no finished cell to report yet")
        missing = [n for n in self.cells if not self.cell_result(n).exists()]
        if missing:
            self.say(f"study: {len(missing)} of {len(self.cells)} cells not finished yet (first: {missing[0]}); "
                     "the report covers the others")
        write_report(self.root, self.study, results, self.say)
        return len(results)

    def run(self) -> list[dict]:
        """Every cell (finished ones read back), then the CSV, Markdown and plots."""
        from compo.research.study_report import write_report

        self.check_recorded()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / "study.yaml", yaml.safe_dump(self.study.model_dump(mode="json"), sort_keys=False))
        results, ran, start = [], 0, time.monotonic()
        for i, name in enumerate(self.cells, 1):
            path = self.cell_result(name)
            if path.exists():
                self.say(f"study: cell {i}/{len(self.cells)} {name}: done earlier, skipping")
                results.append(read_json(path))
                continue
            pace = ""
            if ran:  # the cells run by this process so far set the pace for the ones left
                spent = time.monotonic() - start
                left = sum(1 for n in list(self.cells)[i - 1:] if not self.cell_result(n).exists())
                pace = (f" ({ran} cell{'s' * (ran > 1)} run here in {duration(spent)}; about "
                        f"{duration(spent / ran * left)} left for {left} at that pace)")
            self.say(f"study: cell {i}/{len(self.cells)} {name}{pace}")
            results.append(self.run_cell(name))
            ran += 1
        write_report(self.root, self.study, results, self.say)
        return results


def run_study(path: str | Path, overrides: list[str] | None = None, study_dir: Optional[str] = None,
              say=print) -> list[dict]:
    study, cells = load_study(path, overrides, study_dir)
    return Runner(study, cells, say).run()
