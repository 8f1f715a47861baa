"""eval.cache_hidden_mb: stage 2 evaluated from the stage-1 hidden states, head only."""

import json
from pathlib import Path

import pytest
import torch

from compo.cli import main
from compo.core.config import load_config
from compo.data.encode import Encoded
from compo.run import head_eval
from compo.scoring.logprobs import score_pairs
from compo.scoring.models import load_pretrained

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "tiny.yaml")
SETS = ["data.toy.n_train=96", "data.toy.n_eval=40", "model.toy.sft_steps=40", "stage1.epochs=1", "zo.m=32",
        "zo.max_steps=3", "eval.bootstrap=0"]


def _pipeline(run_dir: Path, sets: list[str]) -> dict:
    args = ["pipeline", "-c", TINY, "--run-dir", str(run_dir)]
    for s in SETS + sets:
        args += ["-s", s]
    assert main(args) == 0
    return json.loads((run_dir / "eval_scores.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("head_eval")
    answers = []  # what each stage-2 evaluation got from the kept hidden states (None: a full forward)
    real = head_eval.head_only
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(head_eval, "head_only", lambda *a: answers.append(real(*a)) or answers[-1])
        kept = _pipeline(root / "kept", ["eval.cache_hidden_mb=64"])
        plain = _pipeline(root / "plain", [])
    return root, kept, plain, answers


def test_stage2_is_scored_from_the_kept_hidden_states(runs):
    root, kept, plain, answers = runs
    assert (root / "kept" / head_eval.FILE).exists() and not (root / "plain" / head_eval.FILE).exists()
    # the kept run's stage 2 went through the head alone; the plain run never asked
    assert len(answers) == 1 and answers[0] is not None
    assert answers[0].chosen.tolist() == kept["stage2"]["logp_chosen"]
    # the same numbers a full forward gives, to float rounding
    for label in ("stage1", "stage2"):
        for k in ("logp_chosen", "logp_rejected"):
            a, b = torch.tensor(kept[label][k]), torch.tensor(plain[label][k])
            assert torch.allclose(a, b, atol=1e-4, rtol=0), (label, k, float((a - b).abs().max()))
        for k in ("chosen_tokens", "rejected_tokens"):
            assert kept[label][k] == plain[label][k]
    cfg = load_config(TINY, SETS)
    model, tok = load_pretrained(str(root / "kept" / "model"), cfg)
    from compo.run.workspace import open_workspace

    ws = open_workspace(cfg.model_copy(update={"run_dir": str(root / "kept")}), "eval", resume=True)
    try:
        items = ws.encode(ws.eval).items
        full = score_pairs(model, items, ws.pad_id, 8)
    finally:
        ws.close()
    assert torch.allclose(full.chosen, torch.tensor(kept["stage2"]["logp_chosen"]), atol=1e-4, rtol=0)
    assert torch.allclose(full.rejected, torch.tensor(kept["stage2"]["logp_rejected"]), atol=1e-4, rtol=0)


def test_another_stage1_or_other_pairs_fall_back_to_a_full_forward(runs):
    root, kept, _, _ = runs
    cfg = load_config(TINY, SETS)
    model, _ = load_pretrained(str(root / "kept" / "model"), cfg)
    path = root / "kept" / head_eval.FILE
    sources = torch.load(path, weights_only=True)["sources"]
    key = head_eval.cache_key(cfg)
    out = head_eval.head_only(model, path, key, sources)
    assert torch.allclose(out.chosen, torch.tensor(kept["stage2"]["logp_chosen"]), atol=0, rtol=0)
    assert head_eval.head_only(model, path, key, sources[:-1]) is None
    other = load_config(TINY, SETS + ["stage1.learning_rate=0.002"])
    assert head_eval.head_only(model, path, head_eval.cache_key(other), sources) is None
    assert head_eval.head_only(model, root / "nothing.pt", key, sources) is None


def test_size_mb_counts_every_scored_token():
    items = [Encoded(0, [1, 2, 3], ([4, 5], [6])), Encoded(1, [1], ([7, 8, 9, 10], [11, 12]))]
    assert head_eval.size_mb(items, 64) == (3 + 6) * 64 * 4 / 2**20
