"""Loading the model and tokenizer (a checkpoint, a GGUF file, or the embedded toy), and head surgery."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compo.core.config import RunConfig
from compo.core.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")  # one GPU per torchrun process
    return torch.device(name)


def check_device(name: str) -> torch.device:
    """The device ``model.device`` names, or a UserError when it does not exist here."""
    try:
        dev = resolve_device(name)
    except (RuntimeError, ValueError):
        raise UserError("model.device", f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise UserError("model.device", f"{name!r} asked for CUDA, which is not available here (torch "
                            f"{torch.__version__} is {build}); use model.device=cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError("model.device", f"{name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("model.device", f"{name!r}: MPS is not available here; use model.device=cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError("model.device", f"unsupported device type {dev.type!r}; use auto, cpu, cuda or cuda:N")
    return dev


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).exists()


def check_model_path(key: str, path: str, gguf_file: str | None = None) -> None:
    """A local checkpoint must exist and hold a config (or the GGUF file); hub names pass."""
    if path == "toy":
        return
    p = Path(path).expanduser()
    if not p.exists():
        if _looks_local(path):
            raise UserError(key, f"no such model directory: {path}")
        return
    if not p.is_dir():
        raise UserError(key, f"{path} is a file; give the directory written by save_pretrained")
    if gguf_file:
        if not (p / gguf_file).is_file():
            raise UserError("model.gguf_file", f"no file {gguf_file} in {path}")
    elif not (p / "config.json").is_file():
        raise UserError(key, f"{path} has no config.json: not a directory written by save_pretrained")


def _load_error(path: str, e: BaseException) -> UserError:
    hint = "" if _looks_local(path) else " (not a local directory, and the hub is not reachable from here?)"
    from compo.core.rundir import describe_exc

    return UserError(path, f"cannot load the model{hint}: {describe_exc(e)}")


def _tokenizer(path: str, gguf_file: str | None = None):
    local = Path(path).exists()
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local, **({"gguf_file": gguf_file} if gguf_file else {}))
    except Exception as e:  # noqa: BLE001 - damaged or missing tokenizer files
        raise _load_error(path, e) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(cfg: RunConfig, reference_dir: Path | None = None):
    """The tokenizer alone (cheap), to tokenize and check the data before the model loads."""
    if cfg.model.path != "toy":
        return _tokenizer(cfg.model.path, cfg.model.gguf_file)
    if reference_dir is not None and (reference_dir / "tokenizer.json").exists():
        return _tokenizer(str(reference_dir))
    from compo.data import toy

    return toy.build_tokenizer()


def load_pretrained(path: str, cfg: RunConfig, gguf_file: str | None = None):
    """(model, tokenizer) from a local directory or hub name; a UserError naming it where neither works."""
    kwargs = {"dtype": DTYPES[cfg.model.dtype], "trust_remote_code": cfg.model.trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    tokenizer = _tokenizer(path, gguf_file)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=Path(path).exists(), **kwargs)
    except Exception as e:  # noqa: BLE001 - damaged weights, wrong config, no network ...
        raise _load_error(path, e) from None
    return model.to(resolve_device(cfg.model.device)).eval(), tokenizer


def load_model(cfg: RunConfig, reference_dir: Path | None = None):
    """The starting model: the toy (built, SFT'd and saved to ``reference_dir``) or a checkpoint."""
    if cfg.model.path != "toy":
        return load_pretrained(cfg.model.path, cfg, cfg.model.gguf_file)
    if reference_dir is not None and (reference_dir / "config.json").exists():
        return load_pretrained(str(reference_dir), cfg)
    from compo.data import toy
    from compo.core.rundir import atomic_save_dir

    model, tokenizer = toy.build_reference(cfg.model.toy, cfg.data.toy, cfg.seed)
    if reference_dir is not None:
        atomic_save_dir(reference_dir, lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d)))
    return model.to(DTYPES[cfg.model.dtype]).to(resolve_device(cfg.model.device)), tokenizer


def untie_head(model) -> bool:
    """Give the output layer its own weights when tied to the input embeddings.

    Returns True when it untied. The saved config then says ``tie_word_embeddings: false``
    so reloading keeps the two apart.
    """
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight.data_ptr() != emb.weight.data_ptr():
        return False
    head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_cfg = getattr(model.config, "get_text_config", lambda: None)()
    if text_cfg is not None:
        text_cfg.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None if not isinstance(model._tied_weights_keys, dict) else {}
    return True
