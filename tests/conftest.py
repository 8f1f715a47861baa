"""Shared fixtures: the embedded toy model and tokenizer, built in-process (no download)."""

from __future__ import annotations

import os

import pytest
import torch

from compo.data import toy
from compo.config import ToyDataConfig, ToyModelConfig

# One intra-op thread in every process a test starts too (`compo` subprocesses, mp.spawn'd ranks):
# they inherit this environment. scripts/test.sh runs the suite in 2 pytest-xdist workers, so
# two-thread children would oversubscribe a 2-core machine (a toy pipeline subprocess took 16 s
# on 2 threads, 7 s on 1). Tests that want more threads ask for them explicitly (threads=...).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

# The files that take longest (mostly `compo` runs in subprocesses and mp.spawn'd ranks), longest
# first. Under pytest-xdist (scripts/test.sh: --dist loadfile --no-loadscope-reorder) a file's tests
# run in one worker, files in collection order: starting these first lets the many short files
# fill in behind them, so both workers finish together instead of one waiting on a long last file.
SLOW_FILES_FIRST = (
    "test_reliability.py", "test_bad_inputs.py", "test_commstats.py", "test_progress.py", "test_zo_support.py",
    "test_study.py", "test_judges_api.py", "test_judges_stage2.py", "test_distributed_pipeline.py", "test_stage1_distributed.py",
    "test_judges_distributed.py", "test_tracking.py", "test_zo_distributed.py", "test_zo_monitor.py",
    "test_zo_signal.py",
)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # (a plain run keeps the file order)
        first = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
        items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: a file's order kept


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
    """compo.core.progress keeps the CLI's verbosity and progress cadence in module globals: every test
    starts from the defaults, whatever an earlier `--quiet` / `--verbose` run left behind."""
    from compo.core import progress

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


@pytest.fixture
def serve(monkeypatch):
    """``serve(flavor, behave=fair)`` starts a fake OpenAI / Anthropic server (tests/fake_llm.py),
    stopped after the test; the judges' key is in the environment and no proxy is in the way."""
    from fake_llm import SECRET, FakeLLM, fair

    monkeypatch.setenv("COMPO_TEST_KEY", SECRET)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    servers = []

    def start(flavor: str, behave=fair):
        s = FakeLLM(flavor, behave)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def judges():
    """``judges(flavor, server, cache_path=None, **options)``: an API judge aimed at a fake server,
    with fast retries; closed after the test."""
    from oracles.judges import AnthropicJudge, OpenAIJudge

    made = []

    def make(flavor: str, server, cache_path=None, **kw):
        opts = dict(base_url=server.base_url, api_key_env="COMPO_TEST_KEY", cache_path=cache_path, timeout=5,
                    max_retries=3, retry_initial=0.01, retry_max_wait=0.05)
        opts.update(kw)
        j = (OpenAIJudge if flavor == "openai" else AnthropicJudge)(model=f"{flavor}-judge", **opts)
        made.append(j)
        return j

    yield make
    for j in made:
        j.close()
