"""The `compo` command: split, train (stage 1), zo (stage 2), pipeline, config."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from compo.core.config import RunConfig, dump_config, load_config, reference_table
from compo.core.errors import EXIT_INTERNAL, CompoError, Paused, one_line
from compo.core import progress

OUTPUT = ("report_to", "logging")  # trackers and console progress: every command that trains
SECTIONS = {
    "split": ("seed", "run_dir", "model", "data", "split") + OUTPUT,
    "train": ("seed", "run_dir", "model", "data", "split", "stage1") + OUTPUT,
    "zo": ("seed", "run_dir", "model", "data", "split", "zo") + OUTPUT,
    "pipeline": ("seed", "run_dir", "model", "data", "split", "stage1", "zo", "eval") + OUTPUT,
    "eval": ("seed", "run_dir", "model", "data", "eval", "logging"),
}

DESCRIPTIONS = {
    "split": "Score every pair with the reference model and split it into clean and noisy by |margin|; writes split.jsonl.",
    "train": "Stage 1: train the whole model on the clean pairs (DPO, IPO, hinge, robust, KTO, BCO); writes model/.",
    "zo": "Stage 2 (ComPO): fine-tune only the output layer on the noisy pairs with a comparison oracle; writes model/.",
    "pipeline": "split -> stage 1 -> stage 2 -> held-out evaluation, all into one run directory.",
    "eval": "Held-out metrics of a saved model (or run dir) against the reference, with bootstrap intervals; writes eval.json.",
}


def config_epilog(sections: tuple[str, ...]) -> str:
    rows = [r for r in reference_table() if r[0].split(".")[0] in sections]
    width = max(len(r[0]) for r in rows)
    lines = ["config keys (YAML or --set KEY=VALUE):"]
    for key, default, desc in rows:
        lines.append(f"  {key:<{width}}  {desc} [default: {default}]")
    return "\n".join(lines)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML run config (see configs/); defaults when omitted.")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override one config key, e.g. --set stage1.beta=0.2 (repeatable; values parsed as YAML).")
    p.add_argument("--run-dir", metavar="DIR", help="Run directory (overrides run_dir in the config).")
    p.add_argument("--resume", action="store_true",
                   help="Continue the run in --run-dir from its last checkpoint and reuse finished artifacts; "
                        "refused when the config, data or model differ from the run's.")
    p.add_argument("--force-resume", action="store_true",
                   help="--resume even though the config, data or model differ (recorded in summary.json).")
    p.add_argument("--debug", action="store_true", help="Show Python tracebacks on errors.")
    _verbosity(p)


def _verbosity(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quiet", "-q", action="store_true",
                   help="Print only warnings, errors and the final line (no progress, no tables).")
    g.add_argument("--verbose", "-v", action="store_true",
                   help="Also a progress line per step off a terminal, and the Hugging Face libraries' own bars on one.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compo",
        description="Align language models on noisy preference data: a clean/noisy split by the reference "
                    "margin, stage 1 (DPO/BCO/KTO) on clean pairs, stage 2 (ComPO, zeroth-order output-layer "
                    "fine-tuning with a comparison oracle) on noisy pairs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `compo COMMAND --help` for a command's options and config keys.\n"
               "Quickstart: compo pipeline --config configs/quickstart.yaml",
    )
    parser.add_argument("--version", action="version", version=f"compo {__import__('compo').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, desc in DESCRIPTIONS.items():
        p = sub.add_parser(name, help=desc, description=desc, epilog=config_epilog(SECTIONS[name]),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(p)
    p = sub.add_parser("config", help="Print the resolved config (secrets redacted) or every key with its default.",
                       description="Print the resolved config as YAML (secrets redacted), or with --list every key.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--list", action="store_true", help="List every config key with its default and description.")
    p.add_argument("--from-trl", metavar="FILE", help="Convert a TRL DPOConfig/KTOConfig/BCOConfig YAML or JSON "
                   "(TrainingArguments keys included) into a compo config (see docs/from_trl.md); --set applies on top.")
    p.add_argument("--trl-trainer", choices=("dpo", "kto", "bco"),
                   help="The TRL trainer the --from-trl file configures (default: from its keys, else dpo).")
    p.add_argument("--output", "-o", metavar="OUT", help="With --from-trl: write the compo YAML here instead of stdout.")
    p = sub.add_parser("study", help="Sweep noise rates x methods x seeds; writes study.csv, study.md and plots.",
                       description="Sweep injected noise rates x methods x seeds over one base run config, sharing "
                                   "reference scoring and stage-1 runs; rerun to resume. Writes study.csv, study.md "
                                   "and plots/*.png in the study directory.")
    p.add_argument("--config", "-c", metavar="FILE", required=True, help="Study YAML (see configs/noise_study.yaml).")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override a run-config key in every cell (repeatable).")
    p.add_argument("--study-dir", metavar="DIR", help="Study directory (overrides study_dir).")
    p.add_argument("--report-only", action="store_true", help="Write study.csv, study.md and the plots from the "
                   "cells finished so far (of a running or interrupted study); run nothing.")
    p.add_argument("--debug", action="store_true", help="Show Python tracebacks on errors.")
    _verbosity(p)
    return parser


def resolve_overrides(args: argparse.Namespace) -> list[str]:
    """The --set items, with --run-dir as one more."""
    return list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])


def resolve(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, resolve_overrides(args))


def _run(args: argparse.Namespace, cfg: RunConfig) -> None:
    from compo import pipeline as pl

    from compo.run.summary_table import final_line

    resume = args.resume or args.force_resume
    if args.command == "pipeline":
        summary = pl.run_pipeline(cfg, resume=resume, force_resume=args.force_resume)
        progress.result(final_line("pipeline", summary))
        return
    if args.command == "eval":
        from compo.research.eval_cmd import run_eval

        progress.configure(cfg.logging.progress_steps, cfg.logging.progress_seconds)
        progress.library_bars()
        res = run_eval(cfg)
        acc = res["metrics"].get("accuracy")
        progress.result(f"compo eval: done, {res['model']} on {res['n_pairs']} held-out pairs"
                        + (f"; accuracy {acc['value']:.4f} [{acc['ci_low']:.4f}, {acc['ci_high']:.4f}]" if acc else ""))
        return
    ws = pl.open_workspace(cfg, args.command, resume, args.force_resume)
    try:
        if args.command == "split":
            pl.run_split(ws)
            progress.result(final_line("split", ws.run.summary()))
            return
        split = pl.run_split(ws) if ws.kind == "paired" else None
        if args.command == "train":
            if ws.done_stage == "stage1":
                pl.say(f"resume: {ws.run.model} holds the finished stage1; nothing to do")
            else:
                pl.run_stage1(ws, split, resume=resume)
        else:
            from compo.zo.run import run_stage2

            if ws.done_stage == "stage2":
                pl.say(f"resume: {ws.run.model} holds the finished stage2; nothing to do")
            else:
                run_stage2(ws, split, resume=resume)
        pl.print_summary(ws.run.summary())
        progress.result(final_line(args.command, ws.run.summary()))
    finally:
        ws.close()


def report(e: BaseException, debug: bool) -> int:
    """Print an error the one-line way and return its exit code."""
    if debug:
        traceback.print_exception(e)
    if isinstance(e, CompoError):
        prefix = "compo: paused: " if isinstance(e, Paused) else "compo: error: "
        for line in e.lines():
            print(prefix + line, file=sys.stderr)
        return e.exit_code
    if isinstance(e, KeyboardInterrupt):
        print("compo: interrupted", file=sys.stderr)
        return 130
    hint = "" if debug else "; rerun with --debug for the traceback"
    print(f"compo: internal error: {one_line(f'{type(e).__name__}: {e}', 300)}{hint}", file=sys.stderr)
    return EXIT_INTERNAL


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    progress.set_verbosity(progress.QUIET if args.quiet else progress.VERBOSE if args.verbose else progress.NORMAL)
    try:
        if args.command == "study":
            from compo.research.study import Runner, load_study
            from compo.core.tracking import check

            study, cells = load_study(args.config, args.overrides, args.study_dir)
            for cell in cells.values():  # a missing tracker package fails before the first cell
                check(cell)
            if args.report_only:
                done = Runner(study, cells, progress.say).report()
                progress.result(f"compo study: reported {done} of {len(cells)} cells; {study.study_dir}/study.md")
                return 0
            Runner(study, cells, progress.say).run()
            progress.result(f"compo study: done, {len(cells)} cells; results in {study.study_dir}/study.md")
            return 0
        if args.command == "config" and (args.from_trl or args.output or args.trl_trainer):
            from compo.interop import from_trl

            from_trl.main(args.from_trl, args.trl_trainer, resolve_overrides(args), args.output, args.config, args.list)
            return 0
        cfg = resolve(args)
        if args.command == "config":
            text = config_epilog(tuple(RunConfig.model_fields)) + "\n" if args.list else dump_config(cfg)
            try:
                sys.stdout.write(text)
                sys.stdout.flush()
            except BrokenPipeError:  # `compo config --list | head`: the reader left; end quietly
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        _run(args, cfg)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the one error path
        return report(e, args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
