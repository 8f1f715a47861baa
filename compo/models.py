"""Loading the model and tokenizer (a checkpoint, a GGUF file, or the embedded toy), and head surgery."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compo.config import RunConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")  # one GPU per torchrun process
    return torch.device(name)


def load_pretrained(path: str, cfg: RunConfig, gguf_file: str | None = None):
    """(model, tokenizer) from a local directory or hub name; a clear error where neither works."""
    kwargs = {"dtype": DTYPES[cfg.model.dtype], "trust_remote_code": cfg.model.trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    local = Path(path).exists()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local, **({"gguf_file": gguf_file} if gguf_file else {}))
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=local, **kwargs)
    except OSError as e:
        hint = "" if local else " (it is not a local directory; is there network access to the hub?)"
        raise RuntimeError(f"cannot load model '{path}'{hint}: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(resolve_device(cfg.model.device)).eval(), tokenizer


def load_model(cfg: RunConfig, reference_dir: Path | None = None):
    """The starting model: the toy (built, SFT'd and saved to ``reference_dir``) or a checkpoint."""
    if cfg.model.path != "toy":
        return load_pretrained(cfg.model.path, cfg, cfg.model.gguf_file)
    if reference_dir is not None and (reference_dir / "config.json").exists():
        return load_pretrained(str(reference_dir), cfg)
    from compo import toy
    from compo.rundir import atomic_save_dir

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
