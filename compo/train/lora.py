"""LoRA stage 1 (``stage1.peft``, the optional ``peft`` package): every peft-specific piece.

Stage 1 with ``stage1.peft`` wraps the model in LoRA adapters on the chosen linear layers,
trains only the adapters, then merges them, so stage 2 and evaluation get a plain model with a
plain output layer (which is never a LoRA target: stage 2 perturbs it). The reference policy is
the same model with its adapters switched off (:func:`reference`), so no second copy is ever
held; stage 1's losses use precomputed reference log-probs and need no reference forward at all.

Checkpoints hold the adapter tensors alone (with the optimizer, scheduler and RNG states), so a
resumed LoRA run is bit-identical to an uninterrupted one. At the end ``run_dir/adapter/`` gets
the adapter (``PeftModel.save_pretrained``) and ``run_dir/model/`` the merged model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from compo.core.errors import CheckpointError, UserError

ADAPTER_DIR = "adapter"  # inside the run directory
ALL_LINEAR = "all-linear"
INSTALL_HINT = "pip install compo[peft]"
KEY = "stage1.peft"
_PREFIX = "base_model.model."  # where a PeftModel keeps the wrapped model
_NAME = re.compile(r"[\w.]+")  # a target string without regex syntax is a module name


def enabled(cfg) -> bool:
    """Whether this run's stage 1 trains LoRA adapters."""
    p = cfg.stage1.peft
    return p is not None and p.enabled


def check_available(cfg) -> None:
    """``stage1.peft`` needs the ``peft`` package: a UserError saying how to install it."""
    if enabled(cfg) and importlib.util.find_spec("peft") is None:
        raise UserError(KEY, f"LoRA needs the peft package, which is not installed: run `{INSTALL_HINT}` "
                        "(or drop stage1.peft for full training)")
    sharded = [name for name, var in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
               if os.environ.get(var, "").lower() in ("1", "true", "yes")]
    if enabled(cfg) and sharded:
        raise UserError(KEY, f"LoRA stage 1 under {sharded[0]} is not supported yet (the adapter would be saved "
                        "from sharded weights): run LoRA under DDP or one process (it fits a 7B model on one GPU), "
                        "or drop stage1.peft for sharded full training")


def _linear_types() -> tuple:
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def _matches(name: str, spec) -> bool:
    if isinstance(spec, str) and not _NAME.fullmatch(spec):
        return re.fullmatch(spec, name) is not None
    names = [spec] if isinstance(spec, str) else spec
    return any(name == k or name.endswith("." + k) for k in names)


def target_names(model, spec) -> list[str]:
    """Full names of the modules ``spec`` selects: all-linear (every linear layer but the output
    layer), module names (``q_proj`` matches every ``*.q_proj``) or a regex of full names."""
    if isinstance(spec, str) and spec.lower() == ALL_LINEAR:
        head = model.get_output_embeddings()
        return [n for n, m in model.named_modules() if isinstance(m, _linear_types()) and m is not head]
    return [n for n, _ in model.named_modules() if n and _matches(n, spec)]


def check_targets(cfg, model) -> None:
    """``stage1.peft.target_modules`` must select linear layers of ``model``, and not its output layer."""
    if not enabled(cfg):
        return
    key, spec = f"{KEY}.target_modules", cfg.stage1.peft.target_modules
    try:
        names = target_names(model, spec)
    except re.error as e:
        raise UserError(key, f"{spec!r} is not a valid regular expression ({e})") from None
    linear, head = _linear_types(), model.get_output_embeddings()
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, linear) and m is not head})
        raise UserError(key, f"{spec!r} matches no module of the model; its linear layers are named "
                        f"{', '.join(leaves[:12])} (or use {ALL_LINEAR})")
    for name in names:
        mod = model.get_submodule(name)
        if mod is head:
            raise UserError(key, f"{spec!r} selects the output layer {name}, which stage 2 fine-tunes: "
                            "leave it out (all-linear does)")
        if head is not None and getattr(mod, "weight", None) is head.weight:
            raise UserError(key, f"{spec!r} selects {name}, whose weights are the output layer's (tied "
                            "embeddings), which stage 2 fine-tunes: leave it out")
        if not isinstance(mod, linear):
            raise UserError(key, f"{spec!r} selects {name} ({type(mod).__name__}), not a linear layer: "
                            "name linear layers only")


def wrap(model, pcfg, say=print):
    """``model`` with LoRA adapters on the selected layers (in place: peft injects them into
    ``model``'s own modules); only adapter parameters require gradients."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = target_names(model, pcfg.target_modules)
    lcfg = LoraConfig(r=pcfg.r, lora_alpha=pcfg.alpha, lora_dropout=pcfg.dropout, target_modules=names,
                      bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lcfg)
    wrapped = sorted(n.removeprefix(_PREFIX) for n, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer))
    if wrapped != sorted(names):
        raise RuntimeError(f"peft wrapped {len(wrapped)} modules, compo selected {len(names)}")
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in peft_model.parameters())
    say(f"stage1: LoRA r={pcfg.r} alpha={pcfg.alpha:g} on {len(names)} linear layers: {n_train:,} trainable "
        f"parameters of {n_all:,} ({100 * n_train / n_all:.2f}%)")
    return peft_model


@contextlib.contextmanager
def reference(model):
    """The reference policy of a LoRA run: the same model with its adapters switched off.

    Stage 1 scores the reference once before training, so its losses never need this; it is
    for reference forwards on new data (``with reference(model): sequence_logps(model, ...)``)."""
    from peft import PeftModel

    inner = getattr(model, "module", model)  # DistributedDataParallel
    if not isinstance(inner, PeftModel):
        raise TypeError("reference() needs a model wrapped by compo.train.lora.wrap")
    with inner.disable_adapter():
        yield model


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter tensors (the trainable parameters) of a wrapped model, by parameter name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def adapter_shapes(model, pcfg) -> dict[str, tuple]:
    """Names and shapes of the adapter tensors :func:`wrap` gives the *unwrapped* ``model``
    (to check a checkpoint before any work)."""
    out = {}
    for name in target_names(model, pcfg.target_modules):
        mod = model.get_submodule(name)
        n_in, n_out = (mod.in_features, mod.out_features) if isinstance(mod, torch.nn.Linear) else tuple(mod.weight.shape)
        out[f"{_PREFIX}{name}.lora_A.default.weight"] = (pcfg.r, n_in)
        out[f"{_PREFIX}{name}.lora_B.default.weight"] = (n_out, pcfg.r)
    return out


def load_adapter_state(model, path: Path) -> None:
    """Put the adapter tensors of a checkpoint file into a wrapped model (exactly its names)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    want = set(adapter_state(model))
    if set(state) != want:
        odd = sorted(set(state) ^ want)
        raise CheckpointError(path, f"holds other adapter tensors than this run's stage1.peft (e.g. {odd[0]})")
    model.load_state_dict(state, strict=False)


def register_checkpoint_hooks(accelerator) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` write and read the adapter alone as
    ``model.safetensors`` (the frozen base weights are never copied into checkpoints)."""

    def save(models, weights, _out) -> None:
        for i in range(len(weights)):
            weights[i] = adapter_state(accelerator.unwrap_model(models[i]))

    def load(models, input_dir) -> None:
        if len(models) != 1:
            raise RuntimeError(f"LoRA checkpoints hold one model, the accelerator has {len(models)}")
        load_adapter_state(accelerator.unwrap_model(models[0]), Path(input_dir) / "model.safetensors")
        models.clear()  # loaded here: accelerate must not load the file as a full state dict

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def base_model_name(cfg, run) -> str:
    """What ``adapter_config.json`` names as the base model: a local directory as an absolute path
    (so ``AutoPeftModelForCausalLM.from_pretrained`` finds it from any working directory; the toy
    model's is ``run_dir/reference``), a hub name as given."""
    if cfg.model.path == "toy":
        return str(Path(run.reference).resolve())
    path = Path(cfg.model.path).expanduser()
    return str(path.resolve()) if path.is_dir() else cfg.model.path


def finish(model, cfg, run, main: bool = True):
    """After stage 1: save the adapter to ``run_dir/adapter`` (main process) and return the merged,
    plain model (the same object the caller passed to :func:`wrap`, now without LoRA layers and
    with every parameter trainable again, as ``from_pretrained`` loads it). Without
    ``stage1.peft`` the model is returned as is and an old ``adapter/`` is removed."""
    from compo.core.rundir import atomic_save_dir

    target = Path(run.root) / ADAPTER_DIR
    if not enabled(cfg):
        if main and target.exists():
            shutil.rmtree(target)  # from an earlier LoRA stage 1 in this run directory
        return model
    if main:
        model.peft_config["default"].base_model_name_or_path = base_model_name(cfg, run)
        atomic_save_dir(target, lambda d: model.save_pretrained(d, save_embedding_layers=False))
    merged = model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged
