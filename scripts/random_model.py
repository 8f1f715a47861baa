#!/usr/bin/env python
"""Save a causal LM with random weights in the shape of a given config, with its tokenizer.

For timing on a machine where the real weights cannot be carried (the GPU check,
scripts/gpu_check.sh): throughput does not depend on the weights' values. ``SRC`` holds a
transformers ``config.json`` and tokenizer files (e.g. SmolLM2's, without its weights); ``OUT``
gets the same files plus ``model.safetensors`` initialised from ``--seed``.

    python scripts/random_model.py .gpu/smollm2 /tmp/smollm2
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def build(src: Path, out: Path, seed: int = 0) -> Path:
    """Random-weight model of ``src``'s config saved to ``out`` with ``src``'s other files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (src / "config.json").is_file():
        raise SystemExit(f"{src}/config.json: not found (a transformers config is needed)")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    model.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="directory with config.json and tokenizer files")
    ap.add_argument("out", type=Path, help="output model directory (replaced)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(build(args.src, args.out, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
