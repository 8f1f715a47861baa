"""The `compo` command: split, train (stage 1), zo (stage 2), pipeline, config."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from compo.config import ConfigError, RunConfig, dump_config, load_config, reference_table

SECTIONS = {
    "split": ("seed", "run_dir", "model", "data", "split"),
    "train": ("seed", "run_dir", "model", "data", "split", "stage1"),
    "zo": ("seed", "run_dir", "model", "data", "split", "zo"),
    "pipeline": ("seed", "run_dir", "model", "data", "split", "stage1", "zo"),
}

DESCRIPTIONS = {
    "split": "Score every pair with the reference model and split it into clean and noisy by |margin|; writes split.jsonl.",
    "train": "Stage 1: train the whole model on the clean pairs (DPO, IPO, hinge, robust, KTO, BCO); writes model/.",
    "zo": "Stage 2 (ComPO): fine-tune only the output layer on the noisy pairs with a comparison oracle; writes model/.",
    "pipeline": "split -> stage 1 -> stage 2 -> held-out evaluation, all into one run directory.",
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
                   help="Continue the run in --run-dir from its last checkpoint and reuse finished artifacts.")


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
    return parser


def resolve(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        cfg = resolve(args)
    except ConfigError as e:
        print(f"compo: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        text = config_epilog(tuple(RunConfig.model_fields)) + "\n" if args.list else dump_config(cfg)
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # `compo config --list | head`: the reader left; end quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    from compo import pipeline as pl

    try:
        if args.command == "pipeline":
            pl.run_pipeline(cfg, resume=args.resume)
        elif args.command == "split":
            ws = pl.open_workspace(cfg)
            pl.run_split(ws, resume=args.resume)
        elif args.command == "train":
            ws = pl.open_workspace(cfg)
            split = pl.run_split(ws, resume=True) if ws.kind == "paired" else None
            pl.run_stage1(ws, split, resume=args.resume)
            pl.print_summary(ws.run.summary())
        elif args.command == "zo":
            from compo.zo.run import run_stage2

            ws = pl.open_workspace(cfg)
            split = pl.run_split(ws, resume=True)
            run_stage2(ws, split, resume=args.resume)
            pl.print_summary(ws.run.summary())
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print("compo: error: " + "\n".join(textwrap.wrap(str(e), 100, subsequent_indent="  ")), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
