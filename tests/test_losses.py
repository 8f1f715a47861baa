"""Hand-checkable values from DESIGN.md section 3 (beta 0.1, lr_c 0.5, lr_r -0.5)."""

import json
import math

import pytest
import torch

from compo.train.losses import dpo_loss
from compo.train.unpaired_losses import (
    RewardShift,
    bco_loss,
    bco_rewards,
    kto_loss,
    kto_weight_warning,
    mismatched_indices,
)

LN2 = math.log(2.0)
T = torch.tensor


def close(x, y, tol=1e-6):
    return abs(float(x) - float(y)) < tol


def all_finite(metrics):
    return all(math.isfinite(float(v)) for v in metrics.values())


# policy/ref log-probs with lr_c = 0.5, lr_r = -0.5 (D = 1, beta D = 0.1)
PC, RC = T([-1.0]), T([-1.5])
PR, RR = T([-3.0]), T([-2.5])


# ------------------------------------------------------------------------------------ DPO
def test_dpo_sigmoid_hinge_robust_values():
    # -logsigmoid(0.1) = log(1 + e^-0.1) = 0.644397
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=0.1)
    assert close(loss[0], 0.644397)
    # relu(1 - 0.1) = 0.9
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge")
    assert close(loss[0], 0.9)
    # (0.9 * 0.644397 - 0.1 * 0.744397) / 0.8 = 0.631897
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="robust", label_smoothing=0.1)
    assert close(loss[0], 0.631897)
    # robust with eps 0 == sigmoid
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="robust")
    assert close(loss[0], 0.644397)
    # cDPO (sigmoid + label smoothing 0.1): 0.9 * 0.644397 + 0.1 * 0.744397 = 0.654397
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    assert close(loss[0], 0.654397)


def test_dpo_ipo_per_token_means():
    # chosen: policy sum -6 over 4 tokens -> -1.5, ref sum -8 / 4 -> -2.0  => lr_c = 0.5
    # rejected: policy sum -9 over 3 tokens -> -3.0, ref sum -6 / 3 -> -2.0 => lr_r = -1.0
    # D = 1.5, 1/(2 beta) = 5  => (1.5 - 5)^2 = 12.25
    loss, m = dpo_loss(T([-6.0]), T([-9.0]), T([-8.0]), T([-6.0]), beta=0.1, loss_type="ipo",
                       chosen_tokens=4, rejected_tokens=T([3]))
    assert close(loss[0], 12.25)
    assert close(m["rewards/chosen"], 0.05) and close(m["rewards/rejected"], -0.1)
    assert close(m["logps/chosen"], -1.5)
    # caller passes the means directly
    loss2, _ = dpo_loss(T([-1.5]), T([-3.0]), T([-2.0]), T([-2.0]), beta=0.1, loss_type="ipo")
    assert close(loss2[0], 12.25)
    # token counts are ignored for the other loss types
    loss3, _ = dpo_loss(PC, PR, RC, RR, chosen_tokens=7, rejected_tokens=3)
    assert close(loss3[0], 0.644397)


@pytest.mark.parametrize("lt,expected", [("sigmoid", LN2), ("robust", LN2), ("hinge", 1.0),
                                         ("ipo", 25.0)])
def test_dpo_policy_equals_reference(lt, expected):
    p = T([-3.0, -7.5, -0.2])
    q = T([-4.0, -1.0, -9.0])
    eps = 0.2 if lt == "robust" else 0.0
    loss, m = dpo_loss(p, q, p.clone(), q.clone(), loss_type=lt, label_smoothing=eps)
    assert torch.allclose(loss, torch.full((3,), expected), atol=1e-6)
    assert close(m["rewards/margins"], 0.0) and close(m["rewards/accuracies"], 0.0)


def test_dpo_metrics_hand_made_batch():
    # lr_c = [0.5, -1.0], lr_r = [-0.5, 1.0]
    pc, rc = T([-1.0, -2.0]), T([-1.5, -1.0])
    pr, rr = T([-3.0, -1.0]), T([-2.5, -2.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert close(loss[0], 0.644397) and close(loss[1], 0.798139)  # log(1 + e^0.2)
    assert close(m["rewards/chosen"], (0.05 - 0.1) / 2)
    assert close(m["rewards/rejected"], (-0.05 + 0.1) / 2)
    assert close(m["rewards/accuracies"], 0.5)
    assert close(m["rewards/margins"], (0.1 - 0.2) / 2)
    assert close(m["logps/chosen"], -1.5)
    assert close(m["logps/rejected"], -2.0)
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies",
                      "rewards/margins", "logps/chosen", "logps/rejected"}


def test_dpo_gradients_and_detached_rewards():
    pc = T([-1.0, -2.0], requires_grad=True)
    pr = T([-3.0, -1.0], requires_grad=True)
    loss, m = dpo_loss(pc, pr, T([-1.5, -1.0]), T([-2.5, -2.0]))
    loss.mean().backward()
    assert pc.grad is not None and (pc.grad < 0).all() and (pr.grad > 0).all()
    assert all(not v.requires_grad for v in m.values())


def test_dpo_bf16_inputs_upcast():
    loss, _ = dpo_loss(PC.bfloat16(), PR.bfloat16(), RC.bfloat16(), RR.bfloat16())
    assert loss.dtype == torch.float32 and close(loss[0], 0.644397)


def test_dpo_bad_args():
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, loss_type="nope")
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, loss_type="hinge", label_smoothing=0.1)


# ------------------------------------------------------------------------------------ KTO
# mismatched log-ratios 0.3 and 0.1 -> z = 0.2
KLP, KLR = T([-1.0, -2.0]), T([-1.3, -2.1])


def test_kto_values_z_02():
    # lr = [0.5, -0.5]; desirable 1 - sigmoid(0.1 (0.5 - 0.2)) = 0.492501,
    # undesirable 1 - sigmoid(0.1 (0.2 + 0.5)) = 0.482507
    loss, m = kto_loss(T([-1.0, -3.0]), T([-1.5, -2.5]), T([True, False]), KLP, KLR, beta=0.1)
    assert close(loss[0], 0.492501) and close(loss[1], 0.482507)
    assert close(m["kl"], 0.2)
    assert close(m["rewards/chosen"], 0.05) and close(m["rewards/rejected"], -0.05)
    assert close(m["rewards/margins"], 0.1)
    assert close(m["logps/chosen"], -1.0) and close(m["logps/rejected"], -3.0)
    assert close(m["count/chosen"], 1) and close(m["count/rejected"], 1)


def test_kto_weights():
    loss, _ = kto_loss(T([-1.0, -3.0]), T([-1.5, -2.5]), [1, 0], KLP, KLR,
                       desirable_weight=2.0, undesirable_weight=0.5)
    assert close(loss[0], 2 * 0.492501) and close(loss[1], 0.5 * 0.482507)


def test_kto_policy_equals_reference():
    p = T([-2.0, -5.0, -1.0])
    loss, m = kto_loss(p, p.clone(), T([True, False, True]), p, p.clone())
    assert torch.allclose(loss, torch.full((3,), 0.5), atol=1e-6)
    assert close(m["kl"], 0.0)


def test_kto_z_clamped_at_zero():
    # mismatched log-ratios -0.3, -0.1 -> mean -0.2 -> z = 0
    loss, m = kto_loss(T([-1.0]), T([-1.5]), T([True]), T([-1.3, -2.1]), T([-1.0, -2.0]))
    assert close(m["kl"], 0.0)
    assert close(loss[0], 0.487503)  # 1 - sigmoid(0.05)


def test_kto_z_detached():
    klp = KLP.clone().requires_grad_(True)
    pl = T([-1.0, -3.0], requires_grad=True)
    loss, _ = kto_loss(pl, T([-1.5, -2.5]), T([True, False]), klp, KLR)
    loss.sum().backward()
    assert klp.grad is None and pl.grad is not None


@pytest.mark.parametrize("label", [True, False])
def test_kto_one_class_batch_finite(label):
    labels = T([label, label, label])
    loss, m = kto_loss(T([-1.0, -2.0, -3.0]), T([-1.2, -2.5, -2.0]), labels,
                       T([-1.0, -2.0, -3.0]), T([-1.1, -2.1, -3.1]))
    assert torch.isfinite(loss).all() and all_finite(m)
    present, absent = ("chosen", "rejected") if label else ("rejected", "chosen")
    assert f"rewards/{present}" in m and f"rewards/{absent}" not in m
    assert close(m[f"count/{absent}"], 0) and close(m[f"rewards/{absent}_sum"], 0)
    assert close(m[f"count/{present}"], 3)
    assert "rewards/margins" not in m


def test_mismatched_indices():
    assert mismatched_indices(0) == []
    assert mismatched_indices(1) == []
    assert mismatched_indices(2) == [1, 0]
    assert mismatched_indices(4) == [3, 0, 1, 2]
    for n in range(2, 9):
        idx = mismatched_indices(n)
        assert sorted(idx) == list(range(n)) and all(i != j for i, j in enumerate(idx))


def test_kto_batch_size_one_uses_fallback():
    # one row: no mismatched completion -> empty KL tensors -> z = kl_fallback (default 0)
    idx = mismatched_indices(1)
    assert idx == []
    empty = torch.zeros(0)
    loss, m = kto_loss(T([-1.0]), T([-1.5]), T([True]), empty, empty)
    assert close(m["kl"], 0.0) and close(loss[0], 0.487503)
    loss, m = kto_loss(T([-1.0]), T([-1.5]), T([True]), empty, empty, kl_fallback=0.2)
    assert close(m["kl"], 0.2) and close(loss[0], 0.492501)
    loss, m = kto_loss(T([-1.0]), T([-1.5]), T([True]), empty, empty, kl_fallback=-1.0)
    assert close(m["kl"], 0.0)  # still clamped


def test_kto_reduce_kl_across_processes():
    calls = []

    def reduce(t):  # another process holds 2 mismatched pairs with sum 1.0: global mean
        calls.append(t.clone())
        return (t + T([1.0, 2.0])) / 2.0  # all-reduce *mean* of [sum, count]

    loss, m = kto_loss(T([-1.0]), T([-1.5]), T([True]), KLP, KLR, reduce_kl=reduce)
    assert len(calls) == 1 and torch.allclose(calls[0], T([0.4, 2.0]))
    assert close(m["kl"], (0.4 + 1.0) / 4)
    # a process with no mismatched pair still takes part and gets the global mean
    empty = torch.zeros(0)
    _, m = kto_loss(T([-1.0]), T([-1.5]), T([True]), empty, empty,
                    reduce_kl=lambda t: t + T([0.6, 2.0]))
    assert close(m["kl"], 0.3)


def test_kto_weight_warning():
    assert kto_weight_warning(100, 100) is None
    assert kto_weight_warning(120, 100) is None
    assert kto_weight_warning(4, 3) is None  # exactly 4/3
    assert kto_weight_warning(100, 300) is not None  # ratio 1/3
    assert kto_weight_warning(100, 300, desirable_weight=3.5) is None  # 350/300
    assert kto_weight_warning(200, 100) is not None  # ratio 2
    assert kto_weight_warning(200, 100, undesirable_weight=1.6) is None  # 200/160 = 1.25
    msg = kto_weight_warning(100, 300)
    assert "[3, 4]" in msg  # suggested desirable_weight range
    assert kto_weight_warning(10, 0) is not None and kto_weight_warning(0, 10) is not None


# ------------------------------------------------------------------------------------ BCO
def test_bco_policy_equals_reference_delta0():
    p = T([-2.0, -5.0, -1.0])
    loss, m = bco_loss(p, p.clone(), T([True, False, True]), delta=0.0)
    assert torch.allclose(loss, torch.full((3,), LN2), atol=1e-6)
    assert close(m["delta"], 0.0)


def test_bco_values_and_metrics():
    # r = [0.05, -0.05], delta 0.02: up -logsigmoid(0.03) = 0.678260,
    # down -logsigmoid(0.07) = 0.658760; weight 2 on the down row, ignored on the up row
    pl, rl = T([-1.0, -3.0]), T([-1.5, -2.5])
    loss, m = bco_loss(pl, rl, T([True, False]), delta=T(0.02), beta=0.1)
    assert close(loss[0], 0.678260) and close(loss[1], 0.658760)
    assert close(m["delta"], 0.02)
    assert close(m["rewards/chosen"], 0.05) and close(m["rewards/rejected"], -0.05)
    assert close(m["logps/chosen"], -1.0) and close(m["logps/rejected"], -3.0)
    loss_w, _ = bco_loss(pl, rl, T([True, False]), delta=0.02, weights=T([5.0, 2.0]))
    assert close(loss_w[0], 0.678260) and close(loss_w[1], 2 * 0.658760)
    assert torch.allclose(bco_rewards(pl, rl, 0.1), T([0.05, -0.05]))


@pytest.mark.parametrize("label", [True, False])
def test_bco_one_class_finite(label):
    loss, m = bco_loss(T([-1.0, -2.0]), T([-1.5, -1.0]), T([label, label]), delta=0.1)
    assert torch.isfinite(loss).all() and all_finite(m)


# ------------------------------------------------------------------------------------ RewardShift
# step 1: micro-batch A [0.3 up, -0.1 down], micro-batch B [0.5 up, 0.1 up, -0.3 down]
# step 2: micro-batch C [1.1 up, -0.5 down]
A = (T([0.3, -0.1]), T([True, False]))
B = (T([0.5, 0.1, -0.3]), T([True, True, False]))
C = (T([1.1, -0.5]), T([True, False]))


def test_reward_shift_midpoint_and_micro_batches():
    s = RewardShift()
    assert s.delta == 0.0
    s.accumulate(*A)
    assert s.delta == 0.0  # unchanged inside an optimizer step
    s.accumulate(*B)
    assert s.delta == 0.0
    s.step()
    # up mean (0.3+0.5+0.1)/3 = 0.3, down mean (-0.1-0.3)/2 = -0.2 -> midpoint 0.05
    assert close(s.delta, 0.05)
    s.accumulate(*C)
    assert close(s.delta, 0.05)
    s.step()
    # up mean 2.0/4 = 0.5, down mean -0.9/3 = -0.3 -> midpoint 0.1
    assert close(s.delta, 0.1)
    assert close(s.mean_up, 0.5) and close(s.mean_down, -0.3)


def test_reward_shift_mean_mode():
    s = RewardShift(mode="mean")
    for mb in (A, B):
        s.accumulate(*mb)
    s.step()
    assert close(s.delta, 0.5 / 5)
    s.accumulate(*C)
    s.step()
    assert close(s.delta, 1.1 / 7)


def test_reward_shift_one_class_fallback():
    s = RewardShift()
    s.accumulate(T([0.2, 0.4]), T([True, True]))
    s.step()
    assert close(s.delta, 0.3)  # only thumbs-up seen so far: mean of all rewards
    s.step()  # empty step changes nothing
    assert close(s.delta, 0.3)


def test_reward_shift_state_dict_roundtrip():
    s = RewardShift()
    s.accumulate(*A)
    s.accumulate(*B)
    s.step()
    s.accumulate(*C)  # pending micro-batch is kept too
    state = json.loads(json.dumps(s.state_dict()))
    t = RewardShift()
    t.load_state_dict(state)
    assert t.delta == s.delta
    t.step()
    s.step()
    assert t.delta == s.delta and close(t.delta, 0.1)


def test_reward_shift_all_reduce_hook():
    seen = []

    def hook(t):  # the other process contributed [0.7 up, -0.3 down]
        seen.append(t.clone())
        return t + torch.tensor([0.7, 1.0, -0.3, 1.0], dtype=t.dtype)

    s = RewardShift(all_reduce=hook)
    s.accumulate(*A)
    s.step()
    assert torch.allclose(seen[0], torch.tensor([0.3, 1.0, -0.1, 1.0], dtype=torch.float64))
    # up mean (0.3+0.7)/2 = 0.5, down mean (-0.1-0.3)/2 = -0.2 -> 0.15
    assert close(s.delta, 0.15)
    s.step()  # hook is called even with nothing buffered (collective stays in lockstep)
    assert len(seen) == 2
    # an all-reduce mean instead of sum gives the same delta
    m = RewardShift(all_reduce=lambda t: (t + torch.tensor([0.7, 1.0, -0.3, 1.0],
                                                           dtype=t.dtype)) / 2)
    m.accumulate(*A)
    m.step()
    assert close(m.delta, 0.15)


def test_reward_shift_bad_mode():
    with pytest.raises(ValueError):
        RewardShift(mode="ema")
