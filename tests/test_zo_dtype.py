"""Stage 2's first-step self-check in bf16 / fp16: rounding passes, logit post-processing fails."""

import pytest
import torch

from compo.config import ZOConfig
from compo.data.encode import encode_rows
from compo.scoring.models import untie_head
from compo.zo.head import base_logits, capture, logits_logps, self_check, self_check_tolerance
from compo.zo.trainer import CHECK_ATOL_PER_TOKEN, ZOTrainer
from oracles import LikelihoodOracle

OLD_ATOL = 2e-3  # the fixed per-token tolerance the check used before it followed the dtype


def _realistic(model, std=8.0, seed=1):
    """Untie the head and rescale it so logits look like a real LM's (std ~8, max |logit| ~30)."""
    untie_head(model)
    w = model.get_output_embeddings().weight
    g = torch.Generator().manual_seed(seed)
    w.data = torch.randn(w.shape, generator=g) * (std / w.shape[1] ** 0.5)
    return model


def _trainer(model):
    cfg = ZOConfig(m=16, radius=5e-3, sparsity="top_fraction", rho=0.05, skip_threshold=0.05, gamma=0.5,
                   checkpoint_every=0)
    return ZOTrainer(model, cfg, 0, LikelihoodOracle(), pad_id=0)


def _pairs(tok, toy_pairs, n=8):
    return encode_rows(toy_pairs[0][:n], tok, 32, 16).items, toy_pairs[0][:n]


def _old_error(model, items) -> float:
    """The old check: the fp32 head on upcast hidden states against the forward, per token."""
    inp = capture(model, items, 0)
    w = model.get_output_embeddings().weight.detach().float()
    n_tok = torch.bincount(inp.seq, minlength=inp.n_seq).float()
    return float(((logits_logps(base_logits(w, inp), inp) - inp.forward_logps).abs() / n_tok).max())


def test_tolerance_rule():
    assert CHECK_ATOL_PER_TOKEN == OLD_ATOL
    assert self_check_tolerance(torch.float32, 30.0) == OLD_ATOL  # fp32 keeps the fixed tolerance
    assert self_check_tolerance(torch.bfloat16, 30.0) == pytest.approx(2**-7 * 30)
    assert self_check_tolerance(torch.float16, 30.0) == pytest.approx(2**-10 * 30)
    assert self_check_tolerance(torch.bfloat16, 0.1) == OLD_ATOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_passes_the_self_check(dtype, tiny_model, toy_tokenizer, toy_pairs):
    model = _realistic(tiny_model).to(dtype)
    items, texts = _pairs(toy_tokenizer, toy_pairs)
    inp = capture(model, items, 0)
    logits = base_logits(model.get_output_embeddings().weight.detach().float(), inp)
    assert 6 < float(logits.std()) < 10 and 20 < float(logits.abs().max()) < 40  # a realistic logit scale
    # the test is meaningful: the old fixed rule flags this (fine) model
    assert _old_error(model, items) > OLD_ATOL
    chk = self_check(inp, model.get_output_embeddings().weight.detach())
    assert chk.ok and chk.max_err < 1e-3 * chk.tol
    tr = _trainer(model)
    rec = tr.step(0, items, texts)  # no RuntimeError
    assert tr.checked and rec["step"] == 1
    assert tr.w.dtype == torch.float32 and tr.head.weight.dtype == dtype


def _softcap(c):
    return lambda _m, _i, out: c * torch.tanh(out / c)


def _scale(s):
    return lambda _m, _i, out: out * s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("post", [_softcap(5.0), _softcap(30.0), _scale(0.5)], ids=["softcap5", "softcap30", "scale0.5"])
def test_post_processed_logits_fail_the_self_check(post, dtype, tiny_model, toy_tokenizer, toy_pairs):
    model = _realistic(tiny_model).to(dtype)
    items, texts = _pairs(toy_tokenizer, toy_pairs, 2)
    tr = _trainer(model)
    tr.head.register_forward_hook(post)
    with pytest.raises(RuntimeError, match="post-processes logits .*soft-capping or scaling.*") as e:
        tr.step(0, items, texts)
    assert "tolerance" in str(e.value)
    assert not tr.checked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma2_final_softcapping_fails_the_self_check(dtype, toy_tokenizer, toy_pairs):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=len(toy_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=8, max_position_embeddings=64,
                       final_logit_softcapping=5.0, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    model = _realistic(Gemma2ForCausalLM(cfg).eval()).to(dtype)
    items, texts = _pairs(toy_tokenizer, toy_pairs, 2)
    with pytest.raises(RuntimeError, match="post-processes logits"):
        _trainer(model).step(0, items, texts)
    model.config.final_logit_softcapping = None  # the same model without the capping is fine
    _trainer(model).step(0, items, texts)
