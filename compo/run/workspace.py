"""Opening a run: validate everything a command will use, then load the model.

Order (cheap checks first, nothing written until all pass): run directory, device, model
paths, data (read, normalised and tokenized with the tokenizer alone: zero usable rows is an
error), what the run directory holds (stage marker, fingerprints, saved split, stage-2
checkpoint state), the oracles and judges (constructed, so a bad option or a missing API key
fails here), the model, LoRA target modules and checkpoint tensors against it (the `peft`
package itself is checked before the data). Only then are temp files of
interrupted writes removed and ``config.yaml`` written: a run that fails validation leaves the
run directory as it was (interrupted directory swaps alone are rolled back first, so that
what is read is what the last finished write left).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field

import torch

from compo.core import fingerprint
from compo.core.config import RunConfig, dump_config
from compo.data.encode import EncodeResult, encode_rows, pad_id_of
from compo.core.errors import UserError
from compo.core.progress import say
from compo.data.rows import PairRow
from compo.core.dist import barrier, main_first
from compo.core.rundir import RunDir, atomic_write_text, check_run_dir, is_writer



@dataclass
class Workspace:
    """What every stage needs: config, run directory, model, tokenizer, data."""

    cfg: RunConfig
    run: RunDir
    model: torch.nn.Module
    tokenizer: object
    train: list
    eval: list[PairRow]
    kind: str
    resume: bool = False
    force_resume: bool = False
    done_stage: str | None = None  # the finished stage model/ holds (resume only)
    saved_split: list[dict] | None = None  # split.jsonl rows that match this config
    oracles: tuple | None = None  # (voting oracle, acceptance oracle or None), built at start-up
    forced: dict = field(default_factory=dict)  # stage -> keys that differed under --force-resume
    fingerprints: dict = field(default_factory=dict)  # stage -> its fingerprint for this config
    stages: list = field(default_factory=list)  # what this command runs
    encoded: EncodeResult | None = None  # the training rows, tokenized
    owns_group: bool = False  # this command joined torch.distributed (torchrun): close() leaves it

    @property
    def pad_id(self) -> int:
        return pad_id_of(self.tokenizer)

    def encode(self, rows) -> EncodeResult:
        return encode_rows(rows, self.tokenizer, self.cfg.data.max_length, self.cfg.data.max_prompt_length)

    def close(self) -> None:
        from compo.core.tracking import detach

        for o in self.oracles or ():
            if o is not None:
                o.close()
        self.oracles = None
        detach(self.run)
        if self.owns_group:
            from compo.core.dist import leave_distributed

            self.owns_group = False
            leave_distributed()


def _subset(rows: list, n: int | None, seed: int) -> list:
    """A seeded random subset of n rows, in their original order (all rows when n is None)."""
    if n is None or n >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def load_data(cfg: RunConfig) -> tuple[list, list[PairRow], str]:
    """(training rows, held-out pairs, kind). Held-out pairs come from eval_path, a seeded
    eval_fraction of the data, or, for the toy task, its gold-labelled held-out set.
    ``data.limit`` takes a seeded random subset of the file first (so the held-out fraction is
    a fraction of it), ``data.eval_limit`` one of the held-out pairs."""
    if cfg.data.path == "toy":
        from compo.data import toy

        train, held = toy.toy_dataset(cfg.data.toy, cfg.seed)
        kind = "paired"
        train = _subset(train, cfg.data.limit, cfg.seed + 101)
    else:
        from compo.data.load import load_rows

        res = load_rows(cfg.data.path, kind=cfg.data.kind, rating_threshold=cfg.data.rating_threshold,
                        on_invalid=cfg.data.on_invalid, split=cfg.data.split)
        train, kind = _subset(list(res.rows), cfg.data.limit, cfg.seed + 101), res.kind
        if res.n_skipped:
            say(f"data: skipped {res.n_skipped} invalid rows of {res.source}: {res.skipped}")
        held = []
        if cfg.data.eval_path:
            ev = load_rows(cfg.data.eval_path, kind="paired", on_invalid=cfg.data.on_invalid, split=cfg.data.split)
            held = list(ev.rows)
        elif cfg.data.eval_fraction > 0 and kind == "paired":
            order = list(range(len(train)))
            random.Random(cfg.seed).shuffle(order)
            k = int(len(train) * cfg.data.eval_fraction)
            held_idx = set(order[:k])
            held = [r for i, r in enumerate(train) if i in held_idx]
            train = [r for i, r in enumerate(train) if i not in held_idx]
    held = _subset(held, cfg.data.eval_limit, cfg.seed + 103)
    noise = cfg.data.noise
    if noise.kind == "shift":
        if kind != "unpaired":
            raise UserError("data.noise.kind", "shift skews thumbs-up vs thumbs-down prompts and needs unpaired "
                            "data; use flip or ambiguous for pairs")
        from compo.data.noise import shift_unpaired

        n0 = len(train)
        train, dropped = shift_unpaired(train, noise.rate, cfg.seed if noise.seed is None else noise.seed)
        say(f"data: noise shift dropped {len(dropped)} of {n0} rows (short-prompt thumbs-up, long-prompt thumbs-down)")
    elif noise.kind != "none" and kind != "paired":
        raise UserError("data.noise.kind", f"{noise.kind} noise changes pair labels and needs paired data; "
                        "use shift for thumbs-up/down rows")
    say(f"data: {len(train)} {kind} training rows, {len(held)} held-out pairs")
    return train, held, kind


def stages_of(command: str, cfg: RunConfig, kind: str) -> list[str]:
    """The stages a command runs, in order."""
    paired = kind == "paired"
    if command == "split":
        return ["split"]
    if command == "train":
        return ["split", "stage1"] if paired else ["stage1"]
    if command == "zo":
        return ["split", "stage2"]
    out = ["split"] if paired else []
    out += ["stage1"] if cfg.stage1.enabled else []
    out += ["stage2"] if cfg.zo.enabled and paired else []
    return out


def _check_encoded(cfg: RunConfig, rows: list, tokenizer, what: str) -> EncodeResult:
    enc = encode_rows(rows, tokenizer, cfg.data.max_length, cfg.data.max_prompt_length)
    if rows and not enc.items:
        raise UserError(what, f"all {len(rows)} rows were dropped: every prompt is longer than "
                        f"data.max_prompt_length={cfg.data.max_prompt_length} tokens")
    return enc


def open_workspace(cfg: RunConfig, command: str = "pipeline", resume: bool = False,
                   force_resume: bool = False) -> Workspace:
    from compo.scoring.models import check_device, check_model_path, load_model, load_tokenizer
    from compo.run import checks
    from compo.train import lora

    run = RunDir(cfg.run_dir)
    check_run_dir(run.root)
    device = check_device(cfg.model.device)
    check_model_path("model.path", cfg.model.path, cfg.model.gguf_file)
    if cfg.split.reference:
        check_model_path("split.reference", cfg.split.reference)
    if command == "train" or (command == "pipeline" and cfg.stage1.enabled):
        lora.check_available(cfg)
    train, held, kind = load_data(cfg)
    stages = stages_of(command, cfg, kind)
    if "stage2" in stages and cfg.zo.rng == "philox" and device.type == "mps":
        raise UserError("zo.rng", "philox rounds through float64, which MPS lacks; use zo.rng=torch on MPS")
    if "stage1" in stages and kind != "paired" and cfg.stage1.loss not in ("kto", "bco"):
        from compo.train.stage1_unpaired import paired_data_message

        raise UserError("stage1.loss", paired_data_message(cfg.stage1.loss, cfg.data.path))
    tokenizer = load_tokenizer(cfg, run.reference)
    enc = _check_encoded(cfg, train, tokenizer, cfg.data.path)
    _check_encoded(cfg, held, tokenizer, cfg.data.eval_path or cfg.data.path)
    for line in run.clean_leftovers(restore_only=True):  # rank 0 alone writes the run dir (see RunDir)
        say(f"run dir: {line}")
    barrier()  # under torchrun: the others read the run dir once rank 0 has rolled back interrupted swaps
    ws = Workspace(cfg, run, None, tokenizer, train, held, kind, resume, force_resume, encoded=enc, stages=stages)
    ws.fingerprints = {s: fingerprint.current(cfg, s, after_stage1="stage1" in stages) for s in stages}
    checks.check_saved_state(ws)
    if "stage2" in stages:
        from compo.zo.oracles import build_oracles

        ws.oracles = build_oracles(cfg)
    else:
        ws.oracles = None
    try:
        with main_first() if cfg.model.path == "toy" else contextlib.nullcontext():  # rank 0 builds reference/
            ws.model, ws.tokenizer = load_model(cfg, run.reference if cfg.model.path == "toy" else None)
        if "stage1" in stages:
            lora.check_targets(cfg, ws.model)
        checks.check_checkpoints(ws)
    except BaseException:
        ws.close()
        raise
    for line in run.clean_leftovers():
        say(f"run dir: {line}")
    if is_writer():
        atomic_write_text(run.config, dump_config(cfg))
    barrier()
    return ws
