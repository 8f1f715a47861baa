"""Non-finite numbers never reach a file compo writes (JSON has no NaN / Infinity: null, or the
run stops), and a head that overflows the model's dtype is caught instead of being saved."""

from __future__ import annotations

import json
import math

import pytest
import torch

from compo.core.errors import Diverged
from compo.core.rundir import RunDir, atomic_write_json, write_jsonl
from compo.train.stage1 import save_model
from compo.core.files import STAGE_FILE
from compo.zo.estimator import dtype_overflow, fits_dtype

NAN, INF = float("nan"), float("inf")


def strict_loads(text: str):
    """json.loads that refuses the NaN / Infinity / -Infinity Python's parser accepts."""

    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_a_metrics_record_holds_null_for_non_finite_numbers(tmp_path):
    run = RunDir(tmp_path / "run")
    run.log({"step": 1, "u_sq_norm": INF, "loss": NAN, "pairs": [{"logp": -INF, "ok": -1.5}]})
    rec = strict_loads(run.metrics.read_text())
    assert rec == {"step": 1, "u_sq_norm": None, "loss": None, "pairs": [{"logp": None, "ok": -1.5}]}


def test_rewritten_json_lines_are_strict(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", [{"a": INF}, {"b": [NAN, 2.0]}])
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert [strict_loads(s) for s in lines] == [{"a": None}, {"b": [None, 2.0]}]


def test_a_json_file_with_a_non_finite_number_stops_the_run_unwritten(tmp_path):
    with pytest.raises(Diverged, match=r"non-finite a\.b\[1\]"):
        atomic_write_json(tmp_path / "x.json", {"a": {"b": [1.0, NAN]}, "c": 2.0})
    assert list(tmp_path.iterdir()) == []


def test_fits_dtype():
    f16 = torch.float16
    assert fits_dtype(torch.tensor([-65504.0, 0.0, 65504.0]), f16)
    assert fits_dtype(torch.tensor([65519.0]), f16)  # rounds down to 65504
    assert not fits_dtype(torch.tensor([0.0, 65520.0]), f16)  # rounds up to inf
    assert not fits_dtype(torch.tensor([-1e5, 1.0]), f16)
    assert not fits_dtype(torch.tensor([1.0, NAN]), f16)
    assert fits_dtype(torch.tensor([1e30]), torch.bfloat16) and fits_dtype(torch.empty(0), f16)


def test_dtype_overflow_names_the_head_or_its_logits():
    h = torch.full((3, 4), 100.0)
    w = torch.full((5, 4), 100.0)  # logits 4e4: inside float16's 65504
    assert dtype_overflow(w, torch.float16, h) is None
    assert "logits overflow the model's float16: max |logit| = 80000 > 65504" in dtype_overflow(2 * w, torch.float16, h)
    assert "logits overflow" in dtype_overflow(w, torch.float16, h, bias=torch.full((5,), 3e4))
    last_big = torch.cat([h, 2 * h[:1]])  # only the last row's logits overflow: found block by block
    assert dtype_overflow(w, torch.float16, last_big, block=5) is not None
    assert dtype_overflow(w, torch.float16, last_big[:-1], block=5) is None
    big = w.clone()
    big[1, 2] = 7e4
    msg = dtype_overflow(big, torch.float16, h)
    assert "the updated head overflows the model's float16: max |w| = 70000 > 65504" in msg
    assert dtype_overflow(2 * w, torch.bfloat16, h) is None and dtype_overflow(big * 1e30, torch.float32, h) is None


def test_save_model_refuses_non_finite_metrics_or_weights(tiny_model, toy_tokenizer, tmp_path):
    target = tmp_path / "model"
    save_model(target, tiny_model, toy_tokenizer, "stage1", {"loss": 0.5})
    marker = (target / STAGE_FILE).read_text()
    with pytest.raises(Diverged, match=r"stage2: the trained model gives non-finite noisy/shift_chosen"):
        save_model(target, tiny_model, toy_tokenizer, "stage2", {"noisy/shift_chosen": NAN, "steps": 4})
    tiny_model.get_output_embeddings().weight.data[0, 0] = INF
    with pytest.raises(Diverged, match=r"non-finite .*weight.*model/ was not written"):
        save_model(target, tiny_model, toy_tokenizer, "stage2", {"steps": 4})
    assert (target / STAGE_FILE).read_text() == marker  # stage 1's model/ is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp leftovers
    assert not math.isnan(strict_loads(marker)["metrics"]["loss"])
