"""The `compo` command: split, train (stage 1), zo (stage 2), pipeline, config."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from compo.config import RunConfig, dump_config, load_config, reference_table
from compo.errors import EXIT_INTERNAL, CompoError, Paused, one_line

SECTIONS = {
    "split": ("seed", "run_dir", "model", "data", "split"),
    "train": ("seed", "run_dir", "model", "data", "split", "stage1"),
    "zo": ("seed", "run_dir", "model", "data", "split", "zo"),
    "pipeline": ("seed", "run_dir", "model", "data", "split", "stage1", "zo", "eval"),
    "eval": ("seed", "run_dir", "model", "data", "eval"),
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
    p = sub.add_parser("study", help="Sweep noise rates x methods x seeds; writes study.csv, study.md and plots.",
                       description="Sweep injected noise rates x methods x seeds over one base run config, sharing "
                                   "reference scoring and stage-1 runs; rerun to resume. Writes study.csv, study.md "
                                   "and plots/*.png in the study directory.")
    p.add_argument("--config", "-c", metavar="FILE", required=True, help="Study YAML (see configs/noise_study.yaml).")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override a run-config key in every cell (repeatable).")
    p.add_argument("--study-dir", metavar="DIR", help="Study directory (overrides study_dir).")
    p.add_argument("--debug", action="store_true", help="Show Python tracebacks on errors.")
    return parser


def resolve(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    return load_config(args.config, overrides)


def _run(args: argparse.Namespace, cfg: RunConfig) -> None:
    from compo import pipeline as pl

    resume = args.resume or args.force_resume
    if args.command == "pipeline":
        pl.run_pipeline(cfg, resume=resume, force_resume=args.force_resume)
        return
    if args.command == "eval":
        from compo.eval_cmd import run_eval

        run_eval(cfg)
        return
    ws = pl.open_workspace(cfg, args.command, resume, args.force_resume)
    try:
        if args.command == "split":
            pl.run_split(ws)
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
    try:
        if args.command == "study":
            from compo.study import run_study

            run_study(args.config, args.overrides, args.study_dir)
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
