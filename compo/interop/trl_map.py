"""The TRL -> compo key map, as data: one :class:`Key` per TRL config key.

Each key is *mapped* (to compo keys, with a value conversion), *inert* (no compo equivalent,
accepted while its value is one under which TRL trains the way compo does), or *ignored* (no
effect on the trained model: logging, hub, evaluation schedule, data loading, memory, speed).
compo/interop/from_trl.py applies it; docs/from_trl.md shows it (a test keeps the two in step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

ARGS, DPO, KTO, BCO = "TrainingArguments", "DPOConfig", "KTOConfig", "BCOConfig"
MODEL, SCRIPT = "ModelConfig", "ScriptArguments"
TRAINERS = {"dpo": DPO, "kto": KTO, "bco": BCO}
ALL3 = (DPO, KTO, BCO)
DPO_LOSSES = {"sigmoid": "dpo", "ipo": "ipo", "hinge": "hinge", "robust": "robust"}


class Bad(ValueError):
    """A value with no compo equivalent (the message says why and what to do)."""


Convert = Callable[[Any, dict], dict]


@dataclass(frozen=True)
class Key:
    trl: str
    where: tuple[str, ...]  # the TRL classes that define it
    target: str = ""  # compo key(s) shown in the table; "" = no equivalent
    convert: Convert | None = None  # (value, whole TRL dict) -> {compo key: value}; raises Bad
    inert: Callable[[Any, dict], bool] | None = None  # no equivalent: accepted when this holds
    accepts: str = ""  # the inert values, for the table and the error
    ignored: bool = False  # no effect on the trained model: accepted with a warning
    note: str = ""
    warning: Callable[[Any, dict], str | None] | None = None  # converted, but worth a warning (the text)


def to(key: str, fn: Callable[[Any], Any] = lambda v: v) -> Convert:
    return lambda v, src: {key: fn(v)}


def is_(*values) -> Callable[[Any, dict], bool]:
    """Inert at exactly these values (``False`` is not ``0``)."""
    return lambda v, src: any(v is x or (type(v) is type(x) and v == x) for x in values)


def unless(switch: str) -> Callable[[Any, dict], bool]:
    """Inert while the TRL flag ``switch`` is not true (the key only matters with it)."""
    return lambda v, src: src.get(switch) is not True


def _whole(what: str, lo: int = 1, ratio_hint: str = "") -> Callable[[Any], int]:
    def conv(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or int(v) < lo:
            raise Bad(f"{v!r}: compo takes a whole number >= {lo} of {what}{ratio_hint}")
        return int(v)
    return conv


def _opt_int(key: str, what: str) -> Convert:
    """A count where TRL's None (or -1 for max_steps) means 'not set'."""
    conv = _whole(what)
    return lambda v, src: {} if v is None or v == -1 else {key: conv(v)}


def _epochs(v, src) -> dict:
    return {"stage1.epochs": _whole("epochs", ratio_hint="; use max_steps for part of an epoch")(v)}


def _precision(name: str) -> Convert:
    def conv(v, src) -> dict:
        if v is True and src.get("bf16") is True and src.get("fp16") is True:
            if name == "fp16":
                return {}  # reported once, under bf16
            raise Bad("bf16 and fp16 are both true; set one")
        if v is True:
            return {"stage1.mixed_precision": name}
        if v in (False, None):
            return {}
        raise Bad(f"{v!r}: expected true or false")
    return conv


def _warmup_steps(v, src) -> dict:
    if v in (0, None):
        return {}
    if isinstance(v, float) and 0 < v < 1:  # recent transformers: a float below 1 is a ratio
        return {"stage1.warmup_ratio": v}
    steps = src.get("max_steps")
    if isinstance(steps, int) and steps > 0 and isinstance(v, int) and 0 < v < steps:
        return {"stage1.warmup_ratio": v / steps}
    raise Bad(f"{v!r}: compo takes a warmup fraction (stage1.warmup_ratio); give warmup_ratio, or max_steps "
              "so the steps can be converted")


def _save_steps(v, src) -> dict:
    if src.get("save_strategy", "steps") == "no":
        return {"stage1.save_steps": 0}
    return {"stage1.save_steps": _whole("steps", ratio_hint=" (TRL's float ratios are not supported)")(v)}


def _save_strategy(v, src) -> dict:
    if v == "no":
        return {"stage1.save_steps": 0}
    if v == "steps":
        return {}
    raise Bad(f"{v!r}: compo checkpoints every stage1.save_steps steps (use 'steps' or 'no')")


def _loss_type(v, src) -> dict:
    if isinstance(v, list) and len(v) == 1:  # recent TRL takes a list of losses
        v = v[0]
    if src.get("_trainer") == "kto":
        if v == "kto":
            return {"stage1.loss": "kto"}
        raise Bad(f"{v!r}: compo's KTO loss is 'kto'")
    if v in DPO_LOSSES:
        if v in ("ipo", "hinge") and src.get("label_smoothing") not in (None, 0, 0.0):
            raise Bad(f"{v!r} with label_smoothing={src['label_smoothing']!r}: label smoothing applies to "
                      "sigmoid and robust only")
        return {"stage1.loss": DPO_LOSSES[v]}
    hint = " (compo's bco is unpaired BCO: stage1.loss=bco turns pairs into thumbs-up/down rows)" if v == "bco_pair" else ""
    raise Bad(f"{v!r} has no compo equivalent; compo's paired losses: {', '.join(DPO_LOSSES)}{hint}")


def _scheduler(v, src) -> dict:
    if v == "constant_with_warmup":
        return {}
    if v == "constant":  # TRL's constant schedule has no warmup
        return {"stage1.warmup_ratio": 0.0}
    raise Bad(f"{v!r}: compo's schedule is a linear warmup, then constant (TRL 'constant_with_warmup'); "
              "drop the key or use constant_with_warmup to train with it")


def _dtype(v, src) -> dict:
    names = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
             "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}
    if v in (None, "auto"):
        return {}
    if v in names:
        return {"model.dtype": names[v]}
    raise Bad(f"{v!r}: compo loads float32, bfloat16 or float16")


def _grad_norm(v, src) -> dict:
    if v in (None, 0, 0.0):
        raise Bad(f"{v!r}: compo always clips gradients; give a positive max_grad_norm")
    return {"stage1.max_grad_norm": v}


def _report_to(v, src) -> dict:
    names = [] if v in (None, "none") else [v] if isinstance(v, str) else list(v)
    if "all" in names:
        raise Bad("'all' (every installed tracker) has no compo equivalent: name the trackers")
    return {"report_to": [n for n in names if n != "none"]}


def _device(v, src) -> dict:
    return {"model.device": "cpu"} if v is True else {}


def _flag(key: str) -> Convert:
    """A TRL bool (null: not set, compo's default)."""
    def conv(v, src) -> dict:
        if v is None:
            return {}
        if not isinstance(v, bool):
            raise Bad(f"{v!r}: expected true or false")
        return {key: v}
    return conv


def _checkpointing(v, src) -> dict:
    """transformers 5's ``activation_checkpointing`` (``gradient_checkpointing`` is its old name)."""
    other = src.get("gradient_checkpointing")
    if isinstance(v, bool) and isinstance(other, bool) and v != other:
        raise Bad(f"{v!r} with gradient_checkpointing={other!r} (its older name): set one")
    return _flag("stage1.gradient_checkpointing")(v, src)


def _name(key: str) -> Convert:
    """A TRL name (null: not set, compo's default)."""
    return lambda v, src: {} if v is None else {key: v}


def _use_peft(v, src) -> dict:
    if v is not True:
        return {}
    if src.get("lora_target_modules") is None:
        return {"stage1.peft.enabled": True, "stage1.peft.target_modules": "all-linear"}
    return {"stage1.peft.enabled": True}


def _peft_default_modules(v, src) -> str | None:
    if v is True and src.get("lora_target_modules") is None:
        return ("true with lora_target_modules unset: compo puts adapters on all-linear (every linear layer but the "
                "output layer); TRL would use PEFT's per-architecture default (q_proj, v_proj for Llama and "
                "Mistral): set lora_target_modules to train what TRL trains")
    return None


def _lora(name: str) -> Convert:
    return lambda v, src: {f"stage1.peft.{name}": v} if src.get("use_peft") is True else {}


def _peft_keys() -> tuple[Key, ...]:
    lora = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_target_modules": "target_modules"}
    return (Key("use_peft", (MODEL,), "stage1.peft", _use_peft, warning=_peft_default_modules,
                note="true -> LoRA adapters in stage 1 (without lora_target_modules: all-linear, with a warning)"),
            *(Key(k, (MODEL,), f"stage1.peft.{c}", _lora(c), note="used with use_peft: true") for k, c in lora.items()),
            Key("lora_modules_to_save", (MODEL,), inert=is_(None), accepts="null"),
            Key("lora_task_type", (MODEL,), inert=is_("CAUSAL_LM"), accepts="CAUSAL_LM"),
            Key("lora_target_parameters", (MODEL,), inert=is_(None), accepts="null"),
            Key("use_rslora", (MODEL,), inert=is_(False), accepts="false"),
            Key("use_dora", (MODEL,), inert=is_(False), accepts="false"))


def all_keys() -> tuple[Key, ...]:
    """Every TRL key compo knows, in table order."""
    ign = dict(ignored=True)
    dk = (DPO, KTO)
    return (
        # the model and the data (TRL CLI YAML)
        Key("model_name_or_path", (MODEL,), "model.path", to("model.path")),
        Key("torch_dtype", (MODEL,), "model.dtype", _dtype, note="'auto' keeps compo's model.dtype"),
        Key("dtype", (MODEL,), "model.dtype", _dtype, note="'auto' keeps compo's model.dtype"),
        Key("trust_remote_code", (MODEL, *ALL3), "model.trust_remote_code", to("model.trust_remote_code")),
        Key("model_revision", (MODEL,), inert=is_("main", None), accepts="main"),
        Key("attn_implementation", (MODEL,), **ign, note="compo uses the model's default attention"),
        *_peft_keys(),
        Key("load_in_8bit", (MODEL,), inert=is_(False), accepts="false"),
        Key("load_in_4bit", (MODEL,), inert=is_(False), accepts="false"),
        *(Key(k, (MODEL,), inert=unless("load_in_4bit"), accepts="any, while load_in_4bit is not true")
          for k in ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage")),
        Key("dataset_name", (SCRIPT,), "data.path", to("data.path")),
        Key("dataset_train_split", (SCRIPT,), "data.split", to("data.split")),
        Key("dataset_test_split", (SCRIPT,), **ign, note="held-out pairs come from data.eval_path or data.eval_fraction"),
        Key("dataset_config", (SCRIPT,), inert=is_(None), accepts="null"),
        Key("dataset_streaming", (SCRIPT,), inert=is_(False), accepts="false"),
        Key("gradient_checkpointing_use_reentrant", (SCRIPT,), **ign),
        Key("ignore_bias_buffers", (SCRIPT,), **ign),
        # the loss
        Key("loss_type", dk, "stage1.loss", _loss_type,
            note="sigmoid -> dpo, ipo, hinge, robust; kto (KTOConfig) -> kto"),
        Key("beta", ALL3, "stage1.beta", to("stage1.beta")),
        Key("label_smoothing", (DPO,), "stage1.label_smoothing", to("stage1.label_smoothing"),
            note="sigmoid: conservative DPO; robust: rDPO's eps"),
        Key("desirable_weight", (KTO,), "stage1.kto.desirable_weight", to("stage1.kto.desirable_weight")),
        Key("undesirable_weight", (KTO,), "stage1.kto.undesirable_weight", to("stage1.kto.undesirable_weight")),
        Key("min_density_ratio", (BCO,), "stage1.bco.udm_clip_min", to("stage1.bco.udm_clip_min"),
            note="used with stage1.bco.udm: true (TRL: with an embedding_func)"),
        Key("max_density_ratio", (BCO,), "stage1.bco.udm_clip_max", to("stage1.bco.udm_clip_max"),
            note="used with stage1.bco.udm: true (TRL: with an embedding_func)"),
        Key("prompt_sample_size", (BCO,), **ign, note="compo fits the UDM classifier on every training prompt"),
        Key("precompute_ref_log_probs", ALL3, inert=is_(True, False), accepts="true, false",
            note="compo always precomputes: the split scores every pair with the reference once and stage 1 "
                 "reuses those log-probs, so no reference model is held during training"),
        Key("precompute_ref_batch_size", ALL3, "split.batch_size", _opt_int("split.batch_size", "pairs")),
        Key("reference_free", (DPO,), inert=is_(False), accepts="false"),
        Key("f_divergence_type", (DPO,), inert=is_("reverse_kl"), accepts="reverse_kl"),
        Key("f_alpha_divergence_coef", (DPO,), inert=lambda v, s: s.get("f_divergence_type", "reverse_kl") == "reverse_kl",
            accepts="any, with f_divergence_type reverse_kl"),
        Key("rpo_alpha", (DPO,), inert=is_(None), accepts="null"),
        Key("use_weighting", (DPO,), inert=is_(False), accepts="false"),
        Key("discopop_tau", (DPO,), inert=lambda v, s: s.get("loss_type") != "discopop",
            accepts="any, unless loss_type is discopop"),
        Key("ld_alpha", (DPO,), inert=is_(None), accepts="null"),
        Key("loss_weights", (DPO,), inert=is_(None), accepts="null"),
        Key("sync_ref_model", dk, inert=is_(False), accepts="false"),
        Key("ref_model_mixup_alpha", dk, inert=unless("sync_ref_model"), accepts="any, while sync_ref_model is not true"),
        Key("ref_model_sync_steps", dk, inert=unless("sync_ref_model"), accepts="any, while sync_ref_model is not true"),
        Key("use_liger_loss", dk, inert=is_(False, None), accepts="false"),
        # lengths and preprocessing
        Key("max_length", ALL3, "data.max_length", _opt_int("data.max_length", "tokens"),
            note="prompt + completion; null keeps compo's data.max_length"),
        Key("max_prompt_length", ALL3, "data.max_prompt_length", _opt_int("data.max_prompt_length", "tokens"),
            note="compo drops longer prompts (and counts them), TRL truncates them; null keeps compo's"),
        Key("max_completion_length", ALL3, inert=is_(None), accepts="null",
            note="compo truncates completions to fit data.max_length"),
        Key("max_target_length", (DPO,), inert=is_(None), accepts="null", note="encoder-decoder models only"),
        Key("truncation_mode", ALL3, inert=is_("keep_end"), accepts="keep_end"),
        Key("is_encoder_decoder", ALL3, inert=is_(None, False), accepts="null, false"),
        Key("model_init_kwargs", ALL3, inert=is_(None, {}), accepts="null, {}", note="see model.dtype, model.trust_remote_code"),
        Key("ref_model_init_kwargs", ALL3, inert=is_(None, {}), accepts="null, {}"),
        Key("model_adapter_name", (DPO,), inert=is_(None), accepts="null"),
        Key("ref_adapter_name", (DPO,), inert=is_(None), accepts="null"),
        Key("force_use_ref_model", (DPO,), inert=is_(False), accepts="false"),
        Key("tools", (DPO,), inert=is_(None), accepts="null"),
        Key("disable_dropout", ALL3, **ign, note="compo keeps the model's dropout settings (0 in most current causal LMs)"),
        *(Key(k, ALL3, **ign) for k in ("padding_free", "use_logits_to_keep", "padding_value", "label_pad_token_id",
                                        "pad_to_multiple_of", "generate_during_eval", "dataset_num_proc",
                                        "activation_offloading", "base_model_attribute_name")),
        # the optimizer and the schedule (TrainingArguments)
        Key("output_dir", (ARGS,), "run_dir", to("run_dir")),
        Key("seed", (ARGS,), "seed", to("seed")),
        Key("data_seed", (ARGS,), inert=is_(None), accepts="null", note="compo shuffles with seed"),
        Key("per_device_train_batch_size", (ARGS,), "stage1.batch_size", to("stage1.batch_size")),
        Key("gradient_accumulation_steps", (ARGS,), "stage1.grad_accum", to("stage1.grad_accum")),
        Key("learning_rate", (ARGS,), "stage1.learning_rate", to("stage1.learning_rate")),
        Key("weight_decay", (ARGS,), "stage1.weight_decay", to("stage1.weight_decay")),
        Key("num_train_epochs", (ARGS,), "stage1.epochs", _epochs, note="whole epochs only"),
        Key("max_steps", (ARGS,), "stage1.max_steps", _opt_int("stage1.max_steps", "steps"), note="-1 -> not set"),
        Key("warmup_ratio", (ARGS,), "stage1.warmup_ratio", to("stage1.warmup_ratio")),
        Key("warmup_steps", (ARGS,), "stage1.warmup_ratio", _warmup_steps,
            note="a float below 1 (a ratio), or steps / max_steps"),
        Key("lr_scheduler_type", (ARGS,), "stage1.warmup_ratio", _scheduler,
            note="compo: linear warmup, then constant: constant_with_warmup (or constant: no warmup)"),
        Key("lr_scheduler_kwargs", (ARGS,), inert=is_(None, {}), accepts="null, {}"),
        Key("max_grad_norm", (ARGS,), "stage1.max_grad_norm", _grad_norm),
        Key("optim", (ARGS,), inert=is_("adamw_torch", "adamw_torch_fused"), accepts="adamw_torch, adamw_torch_fused"),
        Key("optim_args", (ARGS,), inert=is_(None), accepts="null"),
        Key("optim_target_modules", (ARGS,), inert=is_(None), accepts="null"),
        Key("adam_beta1", (ARGS,), inert=is_(0.9), accepts="0.9"),
        Key("adam_beta2", (ARGS,), inert=is_(0.999), accepts="0.999"),
        Key("adam_epsilon", (ARGS,), inert=is_(1e-8), accepts="1e-8"),
        Key("label_smoothing_factor", (ARGS,), inert=is_(0, 0.0), accepts="0"),
        Key("neftune_noise_alpha", (ARGS,), inert=is_(None), accepts="null"),
        Key("auto_find_batch_size", (ARGS,), inert=is_(False), accepts="false"),
        Key("adafactor", (ARGS,), inert=is_(False), accepts="false"),
        Key("per_gpu_train_batch_size", (ARGS,), inert=is_(None), accepts="null", note="use per_device_train_batch_size"),
        Key("bf16", (ARGS,), "stage1.mixed_precision", _precision("bf16"), note="true -> bf16"),
        Key("fp16", (ARGS,), "stage1.mixed_precision", _precision("fp16"), note="true -> fp16"),
        Key("use_cpu", (ARGS,), "model.device", _device, note="true -> cpu"),
        Key("no_cuda", (ARGS,), "model.device", _device, note="true -> cpu"),
        Key("logging_steps", (ARGS,), "stage1.logging_steps",
            to("stage1.logging_steps", _whole("steps", ratio_hint=" (TRL's float ratios are not supported)"))),
        Key("save_steps", (ARGS,), "stage1.save_steps", _save_steps),
        Key("save_strategy", (ARGS,), "stage1.save_steps", _save_strategy, note="no -> 0"),
        Key("resume_from_checkpoint", (ARGS,), inert=is_(None), accepts="null", note="use compo --resume"),
        Key("group_by_length", (ARGS,), "stage1.group_by_length", _flag("stage1.group_by_length"),
            note="compo sorts the rows of 32-step windows by length: less padding, another row order than TRL's sampler"),
        Key("gradient_checkpointing", (ARGS,), "stage1.gradient_checkpointing", _flag("stage1.gradient_checkpointing"),
            note="compo always uses non-reentrant checkpointing"),
        Key("activation_checkpointing", (ARGS,), "stage1.gradient_checkpointing", _checkpointing,
            note="transformers 5's name for gradient_checkpointing"),
        Key("train_sampling_strategy", (ARGS, KTO), **ign, note="compo draws rows in a seeded random order per epoch"),
        Key("full_determinism", (ARGS,), **ign, note="compo's runs are seeded and resume bit-identically"),
        Key("report_to", (ARGS,), "report_to", _report_to, note="'none' -> []"),
        Key("project", (ARGS,), "logging.project", _name("logging.project")),
        Key("run_name", (ARGS,), "logging.run_name", _name("logging.run_name"), note="null -> the run directory's name"),
        *(Key(k, (ARGS,), **ign) for k in (
            "logging_dir", "logging_strategy", "logging_first_step", "logging_nan_inf_filter", "log_level",
            "log_level_replica", "log_on_each_node", "trackio_space_id", "trackio_bucket_id",
            "trackio_static_space_id", "disable_tqdm", "overwrite_output_dir", "do_train", "do_eval", "do_predict",
            "eval_strategy", "evaluation_strategy", "eval_steps", "eval_delay", "eval_on_start",
            "per_device_eval_batch_size", "eval_accumulation_steps", "eval_do_concat_batches",
            "eval_use_gather_object", "include_for_metrics", "batch_eval_metrics", "prediction_loss_only",
            "load_best_model_at_end", "metric_for_best_model", "greater_is_better", "save_total_limit",
            "save_only_model", "save_safetensors", "save_on_each_node", "enable_jit_checkpoint", "ignore_data_skip",
            "restore_callback_states_from_checkpoint", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token",
            "hub_private_repo", "hub_always_push", "hub_revision", "dataloader_num_workers", "dataloader_pin_memory",
            "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_drop_last",
            "dataloader_multiprocessing_context", "dataloader_in_order", "remove_unused_columns", "label_names",
            "length_column_name", "gradient_checkpointing_kwargs", "activation_checkpointing_kwargs", "torch_compile", "torch_compile_backend", "torch_compile_mode", "tf32",
            "use_liger_kernel", "liger_kernel_config", "use_cache", "bf16_full_eval", "fp16_full_eval",
            "average_tokens_across_devices", "torch_empty_cache_steps", "include_num_input_tokens_seen",
            "skip_memory_metrics", "accelerator_config", "parallelism_config", "local_rank", "ddp_backend",
            "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph",
            "ddp_timeout", "deepspeed", "fsdp", "fsdp_config", "debug",
            # older transformers releases
            "per_gpu_eval_batch_size", "fp16_opt_level", "fp16_backend", "half_precision_backend", "tpu_num_cores",
            "tpu_metrics_debug", "jit_mode_eval", "use_ipex", "past_index", "ray_scope", "mp_parameters",
            "sharded_ddp", "fsdp_min_num_params", "fsdp_transformer_layer_cls_to_wrap", "xpu_backend",
            "use_mps_device", "torchdynamo", "split_batches", "dispatch_batches", "include_tokens_per_second",
            "include_inputs_for_metrics", "use_legacy_prediction_loop", "push_to_hub_model_id",
            "push_to_hub_organization", "push_to_hub_token", "tp_size")),
    )


def keys() -> dict[str, Key]:
    """TRL key -> its entry."""
    return {k.trl: k for k in all_keys()}
