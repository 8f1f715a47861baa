"""Sequence log-probs against a hand computation from log_softmax, with padding on both sides."""

import torch

from compo.data.encode import collate, encode_rows
from compo.scoring.logprobs import score_pairs, sequence_logps
from compo.data.rows import PairRow


def _hand(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(float(logp[t - 1, ids[0, t]]) for t in range(len(prompt), len(prompt) + len(completion)))


def test_sequence_logps_match_hand_computation_left_and_right_padding(tiny_model):
    seqs = [([2, 7, 9], [11, 12, 3]), ([2, 5], [13, 14, 15, 16, 3]), ([2, 8, 9, 10, 6], [17, 3])]
    expected = torch.tensor([_hand(tiny_model, p, c) for p, c in seqs])
    for side in ("right", "left"):
        batch = collate(seqs, pad_id=0, padding_side=side)
        with torch.no_grad():
            out = sequence_logps(tiny_model, **batch)
        torch.testing.assert_close(out.logps, expected, atol=1e-5, rtol=0)
        assert out.n_tokens.tolist() == [3, 5, 2]


def test_captured_hidden_states_reproduce_the_logits(tiny_model):
    seqs = [([2, 7, 9], [11, 12, 3]), ([2, 5], [13, 14, 3])]
    batch = collate(seqs, pad_id=0, padding_side="left")
    with torch.no_grad():
        out = sequence_logps(tiny_model, **batch, capture_hidden=True)
    w = tiny_model.get_output_embeddings().weight
    for j in range(2):
        logp = torch.log_softmax(out.hidden[j] @ w.T, -1)
        total = logp.gather(-1, out.targets[j][:, None]).sum()
        torch.testing.assert_close(total, out.logps[j], atol=1e-5, rtol=0)
    assert [len(t) for t in out.targets] == [3, 3]
    assert out.targets[0].tolist() == [11, 12, 3]


def test_score_pairs_and_truncation(tiny_model, toy_tokenizer):
    rows = [PairRow("Q: music A:", " please thanks", " ugh no"), PairRow("Q: " + "art " * 30 + "A:", " sure", " meh")]
    enc = encode_rows(rows, toy_tokenizer, max_length=8, max_prompt_length=6)
    assert enc.n_dropped == 1 and len(enc.items) == 1
    it = enc.items[0]
    assert it.completions[0][-1] == toy_tokenizer.eos_token_id
    s = score_pairs(tiny_model, enc.items, pad_id=0, progress=False)
    assert abs(float(s.chosen[0]) - _hand(tiny_model, it.prompt, it.completions[0])) < 1e-5
    assert abs(float(s.rejected[0]) - _hand(tiny_model, it.prompt, it.completions[1])) < 1e-5
    enc2 = encode_rows([rows[0]], toy_tokenizer, max_length=5, max_prompt_length=4)
    assert enc2.n_truncated == 2  # prompt is 3 tokens, room 2: the eos is cut from both
    assert enc2.items[0].completions[0] == toy_tokenizer.convert_tokens_to_ids(["please", "thanks"])
