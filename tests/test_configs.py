"""Every shipped config in configs/ validates, and says what it claims (no silent defaults)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compo.config import RunConfig, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ALL = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("accelerate_"))  # launcher configs: test_stage1_distributed.py


def is_study(path: Path) -> bool:
    """A `compo study` file (a sweep over a ``base`` run config), not a run config."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return "base" in data and "study_dir" in data


def test_configs_are_found():
    names = {p.name for p in ALL}
    assert {"quickstart.yaml", "oasst.yaml", "mistral-7b-paper.yaml", "llama3-8b-paper.yaml"} <= names


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_every_config_validates(path: Path):
    if is_study(path):
        from compo.research.study import load_study

        _, cells = load_study(path)
        assert cells and all(isinstance(c, RunConfig) for c in cells.values())
        return
    cfg = load_config(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    # every key written in the file is the value loaded (nothing silently dropped or defaulted)
    dumped = cfg.model_dump(mode="json")
    for key, value in _leaves(data):
        got = dumped
        for part in key:
            got = got[part]
        assert got == value, f"{path.name}: {'.'.join(key)}"


def _leaves(d: dict, prefix: tuple = ()):
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "options":
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


@pytest.mark.parametrize("name, model, m, radius, lambda_g", [
    ("mistral-7b-paper.yaml", "mistralai/Mistral-7B-Instruct-v0.2", 1600, 5e-4, 2.2e-4),
    ("llama3-8b-paper.yaml", "meta-llama/Meta-Llama-3-8B-Instruct", 1800, 7.5e-4, 8e-5),
])
def test_paper_configs_hold_the_paper_hyperparameters(name, model, m, radius, lambda_g):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.path == model and cfg.model.dtype == "bfloat16"
    assert cfg.stage1.mixed_precision == "bf16" and cfg.stage1.loss == "dpo"
    z = cfg.zo
    assert (z.m, z.radius, z.lambda_g, z.skip_threshold, z.gamma) == (m, radius, lambda_g, 0.2, 0.035)
    assert (z.estimator, z.sparsity, z.distribution, z.pairs_per_step) == ("full", "absolute", "gaussian", 1)
    assert (cfg.split.rule, cfg.split.delta, cfg.split.margin) == ("absolute", 3.0, "sum")
    assert cfg.data.path != "toy"


def test_oasst_config():
    cfg = load_config(CONFIGS / "oasst.yaml")
    assert cfg.model.path == ".models/smollm2-135m"
    assert cfg.data.path == "../shared/data/oasst-en_100_tree.jsonl" and cfg.data.kind == "paired"
    assert (cfg.data.eval_fraction, cfg.data.max_length, cfg.data.max_prompt_length) == (0.2, 256, 128)
    assert cfg.data.limit is not None
    assert (cfg.split.margin, cfg.split.rule, cfg.split.quantile) == ("mean", "quantile", 0.3)
    assert (cfg.stage1.loss, cfg.stage1.learning_rate, cfg.stage1.batch_size) == ("dpo", 5e-6, 8)
    z = cfg.zo
    assert (z.estimator, z.sparsity, z.m, z.max_steps) == ("projected", "top_fraction", 400, 30)
