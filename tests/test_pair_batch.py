"""Shared-prompt rows (model.share_prompt): the layout by hand, log-probs and gradients equal to
one sequence at a time, the eager (additive-mask) path, stage 2's capture, and the start-up check
that refuses a model ignoring 4D masks or position ids."""

import pytest
import torch

from compo.data.encode import Encoded
from compo.core.errors import UserError
from compo.scoring.logprobs import check_shared_prompt, pair_logps, score_pairs, shared_prompt_error
from compo.data.pair_batch import shared_batch, two_row_batch
from compo.zo.head import capture

ITEMS = [Encoded(0, [2, 7, 9], ([11, 12, 3], [13, 3])), Encoded(1, [2, 5], ([14, 15, 16, 17, 3], [18, 19, 3])),
         Encoded(2, [2, 8, 9, 10, 6], ([20, 3], [21, 22, 23, 3]))]


def _hand(model, prompt, completion) -> float:
    """log p(completion | prompt) from one unpadded sequence and a log_softmax."""
    ids = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(logp[t - 1, ids[0, t]] for t in range(len(prompt), len(prompt) + len(completion)))


def test_the_shared_row_by_hand():
    b = shared_batch([Encoded(0, [5, 6, 7], ([8, 9], [10, 11, 12])), Encoded(1, [5], ([8], [10]))], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12], [5, 8, 10, 0, 0, 0, 0, 0]]
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]  # rejected restarts after the prompt
    assert b.position_ids[1, :3].tolist() == [0, 1, 1]
    m = b.attention_mask[0, 0].int()
    assert m[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]  # last chosen token: prompt and chosen
    assert m[5].tolist() == [1, 1, 1, 0, 0, 1, 0, 0]  # first rejected token: prompt and itself
    assert m[7].tolist() == [1, 1, 1, 0, 0, 1, 1, 1]
    assert b.attention_mask[1, 0, 4].int().tolist() == [1, 0, 0, 0, 1, 0, 0, 0]  # padding: the prompt, itself
    # (row, position whose logits predict it, token, sequence): chosen sequences first
    got = list(zip(b.row.tolist(), b.pos.tolist(), b.target.tolist(), b.seq.tolist()))
    assert got == [(0, 2, 8, 0), (0, 3, 9, 0), (1, 0, 8, 1), (0, 2, 10, 2), (0, 5, 11, 2), (0, 6, 12, 2), (1, 0, 10, 3)]
    assert b.slot.tolist() == [0, 1, 0, 0, 1, 2, 0] and b.n_seq == 4
    additive = shared_batch([Encoded(0, [5], ([8], [10]))], 0, torch.float32, bool_mask=False).attention_mask[0, 0]
    assert additive[2].tolist() == [0.0, torch.finfo(torch.float32).min, 0.0]


def test_two_rows_keep_the_plain_layout():
    b = two_row_batch(ITEMS[:2], pad_id=0)
    assert b.input_ids.shape == (4, 7) and b.n_seq == 4
    assert b.input_ids[2].tolist() == [2, 7, 9, 13, 3, 0, 0]
    assert [int((b.seq == s).sum()) for s in range(4)] == [3, 5, 2, 3]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_both_layouts_give_the_log_probs_of_one_sequence_at_a_time(toy_reference, attn):
    model, _ = toy_reference
    model.config._attn_implementation = attn
    try:
        with torch.no_grad():
            expected = torch.tensor([_hand(model, it.prompt, it.completions[k]) for k in (0, 1) for it in ITEMS])
            for shared in (True, False):
                out = pair_logps(model, ITEMS, pad_id=0, shared=shared)
                torch.testing.assert_close(out.logps, expected, atol=2e-5, rtol=0)
                assert out.n_tokens.tolist() == [3, 5, 2, 2, 3, 4]
    finally:
        model.config._attn_implementation = "sdpa"


def test_shared_rows_give_the_gradients_of_two_rows(tiny_model):
    grads = []
    for shared in (True, False):
        tiny_model.zero_grad()
        out = pair_logps(tiny_model, ITEMS, pad_id=0, shared=shared)
        (out.logps * torch.arange(1.0, 7.0)).sum().backward()
        grads.append([p.grad.clone() for p in tiny_model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_score_pairs_and_stage2_capture_agree_across_layouts(toy_reference):
    model, _ = toy_reference
    s, p = (score_pairs(model, ITEMS, 0, batch_size=2, progress=False, shared=sh) for sh in (True, False))
    for a, b in ((s.chosen, p.chosen), (s.rejected, p.rejected)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    assert s.chosen_tokens.tolist() == [3, 5, 2] and s.rejected_tokens.tolist() == [2, 3, 4]
    for check in (True, False):
        a, b = (capture(model, ITEMS, 0, check=check, shared=sh) for sh in (True, False))
        torch.testing.assert_close(a.h, b.h, atol=1e-5, rtol=0)
        assert torch.equal(a.targets, b.targets) and torch.equal(a.seq, b.seq) and a.n_seq == b.n_seq == 6


class _Ignores(torch.nn.Module):
    """A causal LM that drops one of its inputs, as a model with its own mask logic would."""

    def __init__(self, inner, drop: str):
        super().__init__()
        self.inner, self.drop, self.config = inner, drop, inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kw):
        if self.drop == "attention_mask":
            kw["attention_mask"] = None  # plain causal attention: rejected tokens see the chosen ones
        else:
            kw.pop(self.drop)
        return self.inner(**kw)


@pytest.mark.parametrize("drop", ["attention_mask", "position_ids"])
def test_a_model_that_ignores_the_mask_or_positions_is_refused(toy_reference, drop):
    model, _ = toy_reference
    assert shared_prompt_error(model) < 1e-5
    bad = _Ignores(model, drop)
    assert shared_prompt_error(bad) > 1e-2
    with pytest.raises(UserError, match=r"model\.share_prompt.*ignores the 4D attention mask or position ids"):
        check_shared_prompt(bad)
    assert pair_logps(bad, ITEMS, 0, shared=False).logps.shape == (6,)  # two rows still work


class _Bf16(_Ignores):
    """_Ignores with its forward run under bf16 autocast, as accelerate's mixed precision wraps it."""

    def forward(self, **kw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().forward(**kw)


def test_the_tolerance_is_that_of_the_dtype_the_head_computes_in(toy_reference):
    """1e-3 nats/token in fp32; 64 bf16 ulps (0.5) when the forward runs in bf16, whether the
    caller or a wrapper set the autocast. The toy ignoring its mask is off by ~1.35 either way."""
    model, _ = toy_reference
    with pytest.raises(UserError, match=r"tolerance 0\.001\)"):
        check_shared_prompt(_Ignores(model, "attention_mask"))
    with pytest.raises(UserError, match=r"tolerance 0\.5\)"):
        check_shared_prompt(_Bf16(model, "attention_mask"))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(UserError, match=r"tolerance 0\.5\)"):
        check_shared_prompt(_Ignores(model, "attention_mask"))


def test_the_pipeline_splits_the_same_pairs_with_either_layout(tmp_path, capsys):
    from compo.cli import main
    from compo.core.rundir import read_jsonl

    sets = ["data.toy.n_train=96", "data.toy.n_eval=32", "model.toy.sft_steps=40", "stage1.epochs=1",
            "zo.m=32", "zo.max_steps=2"]
    splits = {}
    for shared in ("true", "false"):
        run = tmp_path / shared
        args = ["pipeline", "-c", "tests/tiny.yaml", "--run-dir", str(run), "--set", f"model.share_prompt={shared}"]
        for s in sets:
            args += ["--set", s]
        assert main(args) == 0
        splits[shared] = read_jsonl(run / "split.jsonl")
    a, b = splits["true"], splits["false"]
    assert len(a) == len(b) == 96
    assert max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("logp_chosen", "logp_rejected")) < 1e-4
    assert [x["noisy"] for x in a] == [y["noisy"] for y in b]
