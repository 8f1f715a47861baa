"""Stage 1: gradient training of the whole model on the clean rows (DPO family, KTO, BCO).

The loop runs on `accelerate` (gradient accumulation, mixed precision, multi-GPU, saved
state). Reference log-probs are precomputed, so only the policy is in memory. Metrics use
TRL's names and go to ``metrics.jsonl`` and the console.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from compo.core import faults
from compo.train import lora
from compo.train import stage1_dist as sd
from compo.core.config import RunConfig
from compo.core.errors import CheckpointError, Diverged
from compo.data.encode import Encoded
from compo.scoring.logprobs import pair_logps
from compo.core.progress import bar as progress_bar, say
from compo.core.rundir import (
    RunDir, atomic_save_dir, atomic_save_dir_all, atomic_write_json, describe_exc, first_few, non_finite_keys,
    read_json,
)

GROUP_WINDOW = 32  # steps whose rows stage1.group_by_length sorts together
PAIRED_LOSSES = {"dpo": "sigmoid", "ipo": "ipo", "hinge": "hinge", "robust": "robust"}


@dataclass
class Stage1Data:
    """Encoded training rows with their precomputed reference log-probs.

    Paired rows: ``ref`` is (N, 2) for (chosen, rejected). Unpaired rows: ``ref`` is (N, 1)
    or (N, 2) with a mismatched-completion column for KTO, and ``labels`` holds thumbs-up.
    """

    items: list[Encoded]
    ref: torch.Tensor
    labels: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


Objective = Callable[[torch.nn.Module, list[Encoded], torch.Tensor, "Stage1Data", list[int]], tuple]


def paired_objective(cfg: RunConfig, pad_id: int) -> Callable:
    """DPO-family loss on a micro-batch: chosen and rejected scored in one forward."""
    from compo.train.losses import dpo_loss

    loss_type = PAIRED_LOSSES[cfg.stage1.loss]

    def run(model, items, ref, _data, _idx):
        s = pair_logps(model, items, pad_id, cfg.model.share_prompt)
        n = len(items)
        ref = ref.to(s.logps.device)
        losses, metrics = dpo_loss(
            s.logps[:n], s.logps[n:], ref[:, 0], ref[:, 1], beta=cfg.stage1.beta, loss_type=loss_type,
            label_smoothing=cfg.stage1.label_smoothing, chosen_tokens=s.n_tokens[:n], rejected_tokens=s.n_tokens[n:],
        )
        return losses.mean(), metrics

    return run


def _as_float(v) -> float:
    return float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)


def step_schedule(n_rows: int, cfg: RunConfig, world: int, rows_per_step: int | None = None) -> tuple[int, int]:
    """(rows per optimizer step across processes, total optimizer steps); ``rows_per_step``: a
    resumed checkpoint's global batch (see compo.train.stage1_dist)."""
    per_step = rows_per_step or cfg.stage1.batch_size * cfg.stage1.grad_accum * world
    steps_per_epoch = max(1, math.ceil(n_rows / per_step))
    total = cfg.stage1.max_steps or cfg.stage1.epochs * steps_per_epoch
    return per_step, total


def step_rows(step: int, n_rows: int, per_step: int, seed: int, lengths: Sequence[int] | None = None) -> list[int]:
    """Row indices of one optimizer step: a seeded permutation per epoch.

    Every step has exactly ``per_step`` rows (so every process runs the same number of
    micro-batches); the last step of an epoch is topped up from the start of its order.
    ``lengths`` (tokens per row) groups rows of similar length into the same steps.
    """
    steps_per_epoch = max(1, math.ceil(n_rows / per_step))
    epoch, k = divmod(step, steps_per_epoch)
    gen = torch.Generator().manual_seed(seed * 1000003 + epoch)
    perm = torch.randperm(n_rows, generator=gen)
    if lengths is not None:
        perm = _grouped(perm, lengths, per_step, gen)
    idx = torch.arange(k * per_step, (k + 1) * per_step) % n_rows
    return perm[idx].tolist()


def _grouped(perm: torch.Tensor, lengths: Sequence[int], per_step: int, gen: torch.Generator,
             window_steps: int = GROUP_WINDOW) -> torch.Tensor:
    """The epoch order with each window of ``window_steps`` steps sorted by length (so a step's
    rows pad to about the same width), then the window's steps shuffled (seeded)."""
    out = []
    size = per_step * window_steps
    for a in range(0, len(perm), size):
        win = perm[a : a + size]
        win = win[torch.tensor([lengths[int(i)] for i in win]).argsort(descending=True, stable=True)]
        steps = list(win.split(per_step))  # only the epoch's last window can end in a short step
        n_full = len(win) // per_step
        out += [steps[j] for j in torch.randperm(n_full, generator=gen).tolist()] + steps[n_full:]
    return torch.cat(out)


def latest_checkpoint(root: Path) -> Path | None:
    done = [p for p in root.glob("step-*") if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _check_finite(step: int, what: str, value: float, last: Path | None) -> None:
    """Stop the run (nothing saved) when a loss or gradient norm is not finite."""
    if math.isfinite(value):
        return
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written (stage1.save_steps=0)"
    raise Diverged(f"stage1 step {step}: non-finite {what} ({value}); model/ was not written and {kept}; "
                   "lower stage1.learning_rate (or check the data), then rerun (or --resume --force-resume)")


def train_stage1(
    model, tokenizer, data: Stage1Data, cfg: RunConfig, run: RunDir, objective: Callable,
    resume: bool = False, hooks: dict | None = None, progress: bool = True,
) -> dict:
    """Train ``model`` in place (with ``stage1.peft``: LoRA adapters, merged into it at the end, see
    compo.train.lora); save it to ``run.model``; return the last step's metrics."""
    hooks = hooks or {}
    s1 = cfg.stage1
    device = next(model.parameters()).device
    accelerator = Accelerator(mixed_precision=s1.mixed_precision, cpu=device.type == "cpu")
    set_seed(cfg.seed)
    if s1.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora.enabled(cfg):
        model = lora.wrap(model, s1.peft, say)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=s1.learning_rate, weight_decay=s1.weight_decay)
    world, rank = accelerator.num_processes, accelerator.process_index
    ckpt_root = run.checkpoints / "stage1"
    last = latest_checkpoint(ckpt_root) if resume else None
    state_file = last / "trainer_state.json" if last is not None else None
    state = read_json(state_file, required=("step",)) if state_file is not None else None
    per_step, total = step_schedule(len(data.items), cfg, world, sd.rows_per_step(cfg, world, state))  # resume: as saved
    sd.prepare_accumulation(accelerator, s1, sd.check_rows(state_file or ckpt_root, per_step, s1.batch_size, world))
    warmup = int(s1.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: min(1.0, (t + 1) / warmup) if warmup else 1.0
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if lora.enabled(cfg):
        lora.register_checkpoint_hooks(accelerator)
    else:
        sd.register_plain_weights(accelerator)
    start = 0
    from compo.core.files import check_step

    if last is not None:
        start = check_step(state_file, state["step"], 1, total, "stage-1")
        try:
            accelerator.load_state(str(last))
            if "state" in hooks and state.get("objective_state") is not None:
                hooks["state"][1](state["objective_state"])
        except Exception as e:  # noqa: BLE001 - damaged optimizer / scheduler / RNG files
            raise CheckpointError(last, f"cannot restore the checkpoint ({describe_exc(e)})") from None
        say(f"stage1: resumed from {last} at step {start}/{total}" + (
            f" with {world} process{'es' if world > 1 else ''}, {state.get('world_size')} saved it; {per_step} rows "
            "per step as before" if state.get("world_size", world) != world else ""))
    elif not resume and accelerator.is_main_process:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run.truncate_metrics("stage1", start)
    metrics: dict = {}
    lengths = [len(it.prompt) + max(map(len, it.completions)) for it in data.items] if s1.group_by_length else None
    bar = progress_bar(range(start, total), "stage1", total=total, initial=start, unit="step",
                       enabled=progress and accelerator.is_main_process)
    for step in bar:
        rows = step_rows(step, len(data.items), per_step, cfg.seed, lengths)
        micro = sd.micro_batches(rows, s1.batch_size, world, rank)  # this process's share (see stage1_dist)
        sums: dict[str, float] = {}
        accelerator.step = 0  # accumulation syncs on this step's last micro-batch (whatever a load restored)
        for j, mb in micro:
            with accelerator.accumulate(model):  # backward scales by 1/len(micro); DDP averages over processes
                torch.manual_seed(sd.micro_seed(cfg.seed, step, j))
                loss, m = objective(model, [data.items[i] for i in mb], data.ref[mb], data, mb)
                if faults.poisoned("stage1.loss"):
                    loss = loss * float("nan")
                _check_finite(step + 1, "loss", float(loss.detach()), last)
                accelerator.backward(loss)
            for k, v in {"loss": loss, **m}.items():
                sums[k] = sums.get(k, 0.0) + _as_float(v) / len(micro)
        grad_norm = sd.grad_norm_value(accelerator.clip_grad_norm_(model.parameters(), s1.max_grad_norm))
        if grad_norm is not None:
            _check_finite(step + 1, "gradient norm", grad_norm, last)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if "after_step" in hooks:
            hooks["after_step"]()
        keys = sorted(sums)  # objectives must return the same keys on every micro-batch and process
        metrics = dict(zip(keys, sd.reduce_mean([sums[k] for k in keys], accelerator)))
        metrics.update({"learning_rate": scheduler.get_last_lr()[0], "epoch": (step + 1) * per_step / len(data.items)})
        if accelerator.is_main_process and ((step + 1) % s1.logging_steps == 0 or step + 1 == total):
            run.log({"stage": "stage1", "step": step + 1, **metrics})
            shown = {"loss": f"{metrics['loss']:.4f}"}
            for key, label in (("rewards/accuracies", "acc"), ("rewards/margins", "margin")):
                if key in metrics:
                    shown[label] = f"{metrics[key]:.3f}"
            bar.set_postfix(shown)
        if s1.save_steps and (step + 1) % s1.save_steps == 0 and step + 1 < total:
            if not sd.params_finite(model, accelerator):
                _check_finite(step + 1, "weights", float("nan"), last)
            _save_checkpoint(accelerator, ckpt_root / f"step-{step + 1}", step + 1, hooks, per_step)
            last = ckpt_root / f"step-{step + 1}"
        faults.point("stage1.step")
    accelerator.wait_for_everyone()
    full = sd.full_state_dict(accelerator, model)  # FSDP / ZeRO-3: gathered on every process
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    if not sd.params_finite(unwrapped, accelerator):
        _check_finite(total, "weights", float("nan"), last)
    unwrapped = lora.finish(unwrapped, cfg, run, accelerator.is_main_process)  # LoRA: adapter saved, merged
    if accelerator.is_main_process:
        save_model(run.model, unwrapped, tokenizer, "stage1", metrics, state_dict=full)
        faults.point("stage1.saved")
        run.drop_checkpoints("stage1")
    accelerator.wait_for_everyone()  # model/ is in place before any process reads it
    return metrics


def save_model(target: Path, model, tokenizer, stage: str, metrics: dict, extra=None, state_dict=None) -> None:
    """model/ with the stage marker inside it, swapped in as one directory (see compo.run.workspace);
    ``state_dict``: the weights to write instead of ``model``'s own (gathered from shards).
    A non-finite weight or metric is :class:`Diverged`: model/ and the checkpoints stay as they were."""
    from compo.core.files import STAGE_FILE

    bad = non_finite_weights(model, state_dict) or non_finite_keys(metrics)
    if bad:
        raise Diverged(f"{stage}: the trained model gives non-finite {first_few(bad)} (in float16 / bfloat16 "
                       "too large a step overflows the model's range); model/ was not written and the last "
                       "checkpoint is kept")

    def save(d: Path) -> None:
        model.save_pretrained(d, **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(d)
        if extra is not None:
            extra(d)
        atomic_write_json(d / STAGE_FILE, {"stage": stage, "metrics": metrics})

    atomic_save_dir(target, save)


def non_finite_weights(model, state_dict: dict | None = None) -> list[str]:
    """Names of ``model``'s parameters holding NaN or inf, read from ``state_dict`` when given
    (gathered shards). Buffers are left out: some models keep -inf attention masks."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors = state_dict if state_dict is not None else params
    return [k for k, v in tensors.items() if k in params and torch.is_tensor(v) and v.is_floating_point()
            and not bool(torch.isfinite(v).all())]


def _save_checkpoint(accelerator: Accelerator, path: Path, step: int, hooks: dict, per_step: int) -> None:
    """accelerate's state (every process writes its part) plus trainer_state.json: the step and
    the global batch, so the checkpoint resumes with another number of processes."""

    def save(tmp: Path) -> None:
        accelerator.save_state(str(tmp))
        faults.point("stage1.checkpoint")
        if accelerator.is_main_process:
            obj_state = hooks["state"][0]() if "state" in hooks else None
            atomic_write_json(tmp / "trainer_state.json", {"step": step, "objective_state": obj_state,
                                                           "rows_per_step": per_step,
                                                           "world_size": accelerator.num_processes})

    atomic_save_dir_all(path, save)
