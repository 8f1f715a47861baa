"""Stage 1's speed paths give the numbers of the plain ones: logits kept only from the batch's
first scored position, gradient checkpointing."""

import torch

from compo.data.encode import collate, encode_rows
from compo.scoring.logprobs import sequence_logps, token_logps
from compo.core.rundir import RunDir, read_jsonl
from compo.train.stage1 import Stage1Data, paired_objective, train_stage1
from compo.config import load_config
from compo.scoring.logprobs import score_pairs


def _full_logps(model, batch):
    """The reference: logits at every position, then the completion tokens' log-probs summed."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    scored = batch["completion_mask"][:, 1:] & batch["attention_mask"][:, 1:].bool()
    return (token_logps(out.logits[:, :-1], batch["input_ids"][:, 1:]) * scored).sum(-1)


def test_kept_logits_equal_the_full_forward_and_its_gradient(toy_reference, toy_pairs):
    model, tok = toy_reference
    items = encode_rows(toy_pairs[0][:6], tok, 32, 16).items
    seqs = [(it.prompt, it.completions[0]) for it in items] + [(it.prompt, it.completions[1]) for it in items]
    results = {}
    for side in ("right", "left"):
        batch = collate(seqs, 0, side)
        start = int((batch["completion_mask"][:, 1:] & batch["attention_mask"][:, 1:].bool()).any(0).nonzero()[0])
        assert start > 0  # the path under test: the prompt-only positions are dropped
        model.zero_grad()
        kept = sequence_logps(model, **batch)
        kept.logps.sum().backward()
        results[side] = kept.logps.detach()
        assert kept.n_tokens.tolist() == [len(s[1]) for s in seqs]
    g_kept = model.get_output_embeddings().weight.grad.clone()
    model.zero_grad()
    full = _full_logps(model, collate(seqs, 0, "right"))  # right padding: default positions are the mask's
    full.sum().backward()
    assert torch.allclose(results["right"], full, atol=1e-5)
    assert torch.allclose(results["left"], full, atol=1e-5)
    assert torch.allclose(g_kept, model.get_output_embeddings().weight.grad, atol=1e-6)
    model.zero_grad()


def _train(tmp_path, toy_reference, toy_pairs, **kw):
    model, tok = toy_reference
    model = type(model)(model.config)
    model.load_state_dict(toy_reference[0].state_dict())
    enc = encode_rows(toy_pairs[0][:16], tok, 32, 16)
    ref = score_pairs(model, enc.items, 0, progress=False)
    over = ["stage1.max_steps=3", "stage1.learning_rate=1e-3", "stage1.batch_size=4", "stage1.warmup_ratio=0",
            f"run_dir={tmp_path}"] + [f"{k}={v}" for k, v in kw.items()]
    cfg = load_config(None, over)
    run = RunDir(tmp_path)
    train_stage1(model, tok, Stage1Data(enc.items, torch.stack([ref.chosen, ref.rejected], 1)), cfg, run,
                 paired_objective(cfg, 0), progress=False)
    return model, [r for r in read_jsonl(run.metrics) if r["stage"] == "stage1"]


def test_gradient_checkpointing_trains_the_same_model(tmp_path, toy_reference, toy_pairs):
    plain, log_a = _train(tmp_path / "a", toy_reference, toy_pairs)
    ckpt, log_b = _train(tmp_path / "b", toy_reference, toy_pairs, **{"stage1.gradient_checkpointing": "true"})
    assert [round(r["loss"], 5) for r in log_a] == [round(r["loss"], 5) for r in log_b]
    assert log_a[-1]["loss"] != log_a[0]["loss"]
    on = "is_activation_checkpointing" if hasattr(plain, "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert getattr(ckpt, on) and not getattr(plain, on)
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_length_grouped_steps_cover_the_epoch_and_pad_less():
    from compo.train.stage1 import step_rows

    n, per = 200, 4
    lengths = [int(x) for x in torch.randint(5, 300, (n,), generator=torch.Generator().manual_seed(1))]
    plain = [step_rows(s, n, per, 3) for s in range(n // per)]
    grouped = [step_rows(s, n, per, 3, lengths) for s in range(n // per)]
    assert sorted(r for st in grouped for r in st) == list(range(n))  # every row once per epoch
    assert grouped == [step_rows(s, n, per, 3, lengths) for s in range(n // per)]  # a pure function
    assert [step_rows(s, n, per, 3, None) for s in range(3)] == plain[:3]  # off: today's order

    def waste(steps):  # padded tokens: every row pads to its step's longest
        return sum(max(lengths[r] for r in st) * len(st) - sum(lengths[r] for r in st) for st in steps)

    assert waste(grouped) < waste(plain) / 5
    firsts = [max(lengths[r] for r in st) for st in grouped[:32]]
    assert firsts != sorted(firsts, reverse=True)  # steps are shuffled within the window
