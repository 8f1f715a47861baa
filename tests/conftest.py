"""Shared fixtures: the embedded toy model and tokenizer, built in-process (no download)."""

from __future__ import annotations

import pytest
import torch

from compo import toy
from compo.config import ToyDataConfig, ToyModelConfig


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The toy models' ops are tiny: a second intra-op thread only adds synchronisation (and on a
    busy 2-core machine it made the suite many times slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _default_output():
    """compo.progress keeps the CLI's verbosity and progress cadence in module globals: every test
    starts from the defaults, whatever an earlier `--quiet` / `--verbose` run left behind."""
    from compo import progress

    yield
    progress.set_verbosity(progress.NORMAL)
    progress.configure(steps=0, seconds=30.0)


@pytest.fixture(scope="session")
def toy_tokenizer():
    return toy.build_tokenizer()


@pytest.fixture()
def tiny_model(toy_tokenizer):
    """A random tiny Llama with a tied head (fresh per test: tests may modify it)."""
    return toy.build_model(ToyModelConfig(hidden_size=32, num_layers=2, num_heads=4), len(toy_tokenizer), seed=0)


@pytest.fixture(scope="session")
def toy_reference():
    """The SFT'd toy reference model of the quickstart (shared, treat as read-only)."""
    torch.manual_seed(0)
    return toy.build_reference(ToyModelConfig(sft_steps=60), ToyDataConfig(), seed=0)


@pytest.fixture(scope="session")
def toy_pairs():
    train, held = toy.toy_dataset(ToyDataConfig(n_train=64, n_eval=32), seed=0)
    return train, held
