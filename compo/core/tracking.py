"""Experiment trackers (``report_to``): accelerate's tracker classes, fed from ``RunDir.log``.

Every metrics record written to ``metrics.jsonl`` also goes to the trackers, under the names a
TRL run reports: stage 1 as ``train/<metric>`` at its optimizer step (``train/loss``,
``train/rewards/chosen``, ...), stage 2 as ``stage2/<metric>`` at its step (plus
``stage2/logps/chosen|rejected``: the step's pairs after the update), held-out metrics as
``eval/<model>/<metric>``. The redacted run config is stored once (tensorboard: hparams and a
``config`` text; others: accelerate's ``store_init_configuration``). Trackers run on the main
process only and are closed when the workspace closes (or at exit after a failure).

``run_dir/tensorboard/`` mirrors metrics.jsonl: it is rewritten from metrics.jsonl when a command
starts and whenever a stage cuts metrics.jsonl back (a fresh stage drops the old records, a
resumed one those after its checkpoint), so no step is ever in the event files twice.
"""

from __future__ import annotations

import atexit
import importlib.util
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import yaml

from compo.core.config import RunConfig
from compo.core.redact import redact
from compo.core.errors import UserError
from compo.core.progress import main_process, warn
from compo.core.rundir import RunDir, describe_exc, read_jsonl

#: record stage -> (metric prefix, the step's own metric for trackers that need one, wandb)
GROUPS = {"stage1": ("train/", "train/global_step"), "stage2": ("stage2/", "stage2/step"),
          "eval": ("eval/", "eval/step")}
EXTRAS = ("tensorboard", "wandb")  # compo's pip extras of the same name
TB_DIR = "tensorboard"  # run_dir/tensorboard: `tensorboard --logdir runs/` shows every run
#: the keyword of each tracker's own run name (logging.run_name); the others have none
RUN_NAME_KWARG = {"wandb": "name", "mlflow": "run_name", "trackio": "name", "swanlab": "experiment_name",
                  "clearml": "task_name"}


def pip_name(tracker: str) -> str:
    return tracker.replace("_", "-")


def check(cfg: RunConfig) -> None:
    """Before any work: options are only given for ``report_to`` trackers, and every one of them
    has its package installed and a tracker class in the installed accelerate."""
    for name in cfg.logging.tracker_options:
        if name not in cfg.report_to:
            raise UserError(f"logging.tracker_options.{name}", f"options for the {name} tracker, which is not in "
                            f"report_to ({', '.join(cfg.report_to) or 'none'}): add {name} to report_to or "
                            "remove these options")
    for name in cfg.report_to:
        if importlib.util.find_spec(name) is None:
            extra = f" (or pip install 'compo[{name}]')" if name in EXTRAS else ""
            raise UserError("report_to", f"the {name} tracker needs the {pip_name(name)} package, which is not "
                            f"installed: pip install {pip_name(name)}{extra}")
    if cfg.report_to:
        import accelerate
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        for name in cfg.report_to:
            if name not in LOGGER_TYPE_TO_CLASS:
                raise UserError("report_to", f"the installed accelerate {accelerate.__version__} has no {name} "
                                f"tracker (it has {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}): "
                                "pip install -U accelerate")


def config_values(cfg: RunConfig) -> dict[str, Any]:
    """The redacted config as flat ``{section.key: bool|int|float|str|None}`` (lists as YAML)."""
    from compo.core.fingerprint import flatten

    out = {}
    for k, v in flatten(redact(cfg.model_dump(mode="json"))).items():
        out[k] = v if v is None or isinstance(v, (bool, int, float, str)) else yaml.safe_dump(v, default_flow_style=True).strip()
    return out


def record_values(record: dict) -> tuple[str, dict[str, float], int]:
    """(group, {tracker name: number}, step) of one metrics.jsonl record."""
    group = record.get("stage", "")
    prefix = GROUPS[group][0]
    values: dict[str, float] = {}
    for k, v in record.items():
        if k in ("stage", "step") or isinstance(v, str) or v is None:
            continue
        if isinstance(v, bool):
            values[prefix + k] = int(v)
        elif isinstance(v, (int, float)):
            values[prefix + k] = v
    pairs = record.get("pairs")
    if group == "stage2" and pairs:
        for side in ("chosen", "rejected"):
            values[f"{prefix}logps/{side}"] = sum(p[f"logp_{side}_after"] for p in pairs) / len(pairs)
    return group, values, int(record["step"])


def _build(name: str, cfg: RunConfig, root: Path):
    """One accelerate tracker, constructed as ``Accelerator.init_trackers`` does (project name,
    then the logging directory when the tracker needs one), then started. tensorboard starts
    on an empty ``run_dir/tensorboard/`` (see :meth:`Trackers.replay`)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    cls = LOGGER_TYPE_TO_CLASS[name]
    opts = dict(cfg.logging.tracker_options.get(name, {}))
    if name in RUN_NAME_KWARG:
        opts = {RUN_NAME_KWARG[name]: cfg.logging.run_name or root.name, **opts}
    if name == "tensorboard":
        shutil.rmtree(root / TB_DIR, ignore_errors=True)  # event files of an earlier command in this run dir
        tracker = cls(TB_DIR, str(root), **opts)
    elif name == "wandb":
        tracker = cls(cfg.logging.project, **{"dir": str(root), **opts})
    elif cls.requires_logging_directory:
        tracker = cls(cfg.logging.project, str(root), **opts)
    else:
        tracker = cls(cfg.logging.project, **opts)
    tracker.main_process_only = False  # built on the main process only: keep accelerate's PartialState out
    if hasattr(tracker, "start"):
        tracker.start()
    return tracker


class Trackers:
    """The started trackers of one run; a tracker that fails to log is dropped with a warning
    (metrics.jsonl keeps every record). ``rebuild(name)`` starts a tracker afresh (tensorboard,
    when metrics.jsonl is cut back: see :meth:`rewind`)."""

    def __init__(self, trackers: list, rebuild: Callable[[str], Any] | None = None):
        self.trackers = list(trackers)
        self.rebuild = rebuild
        self.config: dict[str, Any] | None = None
        if any(t.name == "wandb" for t in self.trackers):
            run = next(t for t in self.trackers if t.name == "wandb").tracker
            for prefix, step_key in GROUPS.values():  # stage 2 restarts at step 1: one step axis per group
                run.define_metric(step_key)
                run.define_metric(prefix + "*", step_metric=step_key)

    def store_config(self, values: dict[str, Any]) -> None:
        self.config = values
        for t in list(self.trackers):
            self._call(t, self._store, t, values)

    def replay(self, records: list[dict]) -> None:
        """Write metrics.jsonl's ``records`` into the tensorboard event files (just started, so
        empty): the other trackers keep their own history (a wandb run per command)."""
        for t in [t for t in self.trackers if t.name == "tensorboard"]:
            self._call(t, self._replay, t, records)

    @staticmethod
    def _replay(t, records: list[dict]) -> None:
        for rec in records:
            if rec.get("stage") in GROUPS:
                _, values, step = record_values(rec)
                for k, v in values.items():
                    t.writer.add_scalar(k, v, global_step=step)
        t.writer.flush()

    def rewind(self, records: list[dict]) -> None:
        """metrics.jsonl now holds ``records`` alone (a stage starts again): tensorboard's event
        files, which cannot drop points, are written anew from them."""
        for t in list(self.trackers):
            if t.name != "tensorboard" or self.rebuild is None:
                continue
            self._finish(t)
            try:
                self.trackers[self.trackers.index(t)] = fresh = self.rebuild(t.name)
            except Exception as e:  # noqa: BLE001 - as a failing log: switch it off, keep training
                warn(f"the {t.name} tracker could not restart and is switched off for this run "
                     f"({describe_exc(e)}); metrics.jsonl still has every record")
                self.trackers.remove(t)
                continue
            if self.config is not None:
                self._call(fresh, self._store, fresh, self.config)
            if fresh in self.trackers:
                self._call(fresh, self._replay, fresh, records)

    @staticmethod
    def _store(t, values: dict[str, Any]) -> None:
        if t.name == "tensorboard":  # next to the scalars, not in accelerate's timestamped folders
            t.writer.add_hparams({k: v for k, v in values.items() if v is not None}, {}, run_name=".")
            text = yaml.safe_dump(values, sort_keys=False)
            t.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()))
            t.writer.flush()
        else:
            t.store_init_configuration(values)

    def log_values(self, group: str, values: dict[str, float], step: int) -> None:
        step_key = GROUPS[group][1]
        for t in list(self.trackers):
            if t.name == "wandb":
                self._call(t, t.log, {**values, step_key: step})
            else:
                self._call(t, t.log, values, step=step)

    def log(self, record: dict) -> None:
        if record.get("stage") in GROUPS:
            self.log_values(*record_values(record))

    def log_eval(self, evals: dict) -> None:
        """Held-out metrics per model (reference, stage1, stage2, stage2_effect) at step 0."""
        values = {f"eval/{label}/{k}": v for label, m in evals.items() for k, v in (m or {}).items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if values:
            self.log_values("eval", values, 0)

    def _call(self, t, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a tracker's own failure must not stop training
            warn(f"the {t.name} tracker failed and is switched off for this run ({describe_exc(e)}); "
                 "metrics.jsonl still has every record")
            self.trackers.remove(t)
            self._finish(t)

    @staticmethod
    def _finish(t) -> None:
        try:
            t.finish()
        except Exception as e:  # noqa: BLE001
            warn(f"the {t.name} tracker did not close cleanly ({describe_exc(e)})")

    def close(self) -> None:
        while self.trackers:
            self._finish(self.trackers.pop())


def attach(run: RunDir, cfg: RunConfig, cpu: bool = True) -> Trackers | None:
    """Start ``cfg.report_to``'s trackers on ``run`` (main process only), store the config, and
    route every ``run.log`` record to them until :func:`detach`.

    accelerate's trackers log through its state: every process sets it up here, as stage 1's
    ``Accelerator(cpu=...)`` would (``cpu``: the model is on the CPU)."""
    if not cfg.report_to or run.trackers is not None:
        return run.trackers
    from accelerate import PartialState

    PartialState(cpu=cpu)
    if not main_process():
        return None
    started: list = []
    try:
        for name in cfg.report_to:
            try:
                started.append(_build(name, cfg, run.root))
            except Exception as e:  # noqa: BLE001 - e.g. wandb online without a login
                raise UserError("report_to", f"cannot start the {name} tracker: {describe_exc(e)}") from None
    except BaseException:
        for t in started:
            Trackers._finish(t)
        raise
    trackers = Trackers(started, rebuild=lambda name: _build(name, cfg, run.root))
    trackers.store_config(config_values(cfg))
    trackers.replay(read_jsonl(run.metrics) if run.metrics.exists() else [])
    run.trackers = trackers
    atexit.register(trackers.close)
    return trackers


def detach(run: RunDir) -> None:
    """Close ``run``'s trackers (flushes event files, finishes the wandb run)."""
    trackers, run.trackers = run.trackers, None
    if trackers is not None:
        trackers.close()
        atexit.unregister(trackers.close)


def log_eval(run: RunDir, evals: dict) -> None:
    if run.trackers is not None:
        run.trackers.log_eval(evals)
