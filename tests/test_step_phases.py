"""The step's tensor phases called directly: A_hat, the evidence statistics, the loss of a micro-batch,
micro-batches, lambda; each against the reference or a hand-computed value."""

import math

import pytest
import torch
from helpers import assert_close

import cepo_ref
from cepo_kernels import linear_cepo_loss
from cepo_kernels.step import cepo_advantages, delta_metrics, lam_at, micro_batches, policy_loss


def _inputs(seed=0, B=4, T=5, H=12, V=37):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / math.sqrt(H)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    adv = torch.tensor([1.2, -0.7, 0.0, 0.4])
    pos = -torch.rand(B, T, generator=g) * 3
    neg = -torch.rand(B, T, generator=g) * 3
    old = -torch.rand(B, T, generator=g) * 3
    return hidden, weight, targets, mask, adv, pos, neg, old


def test_token_advantages_equal_the_reference_and_keep_the_sign():
    _, _, _, mask, adv, pos, neg, _ = _inputs()
    got = cepo_advantages(adv, pos, neg, mask, lam=0.5, eps_w=0.2)
    ref64 = cepo_ref.cepo_advantages(adv.double(), pos.double(), neg.double(), mask, lam=0.5, eps_w=0.2)
    ref32 = cepo_ref.cepo_advantages(adv, pos, neg, mask, lam=0.5, eps_w=0.2)
    assert_close(got, ref64, ref32, atol=1e-7, name="A_hat")
    a = adv[:, None].expand_as(got)
    assert torch.all(torch.sign(got[mask]) == torch.sign(a[mask]))  # invariant 1
    assert torch.all(got[~mask] == 0) and torch.all(got[2] == 0)  # masked tokens, and A = 0
    bound = a.abs() * (1 + 0.5 * 0.2) + 1e-6
    assert torch.all(got.abs() <= bound) and torch.all(got.abs()[mask] >= (a.abs() * 0.9 - 1e-6)[mask])


def test_evidence_stats_by_hand():
    delta = torch.tensor([[0.5, -0.2, 9.0], [-1.0, 0.3, 0.0], [7.0, 7.0, 7.0]])
    adv = torch.tensor([1.0, -2.0, 0.0])  # the last row (A = 0) does not count
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, True]])
    stats = delta_metrics(delta, adv, mask)
    used = [0.5, -0.2, -1.0, 0.3, 0.0]
    mean = sum(used) / 5
    assert stats["delta_mean"] == pytest.approx(mean)
    assert stats["delta_std"] == pytest.approx(math.sqrt(sum((u - mean) ** 2 for u in used) / 4))
    assert stats["delta_mean_pos"] == pytest.approx(0.15)
    assert stats["delta_mean_neg"] == pytest.approx(-0.7 / 3)
    assert stats["frac_wrong_dir"] == pytest.approx(2 / 5)  # -0.2 on A > 0, 0.3 on A < 0


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_policy_loss_is_the_fused_loss(lam):
    hidden, weight, targets, mask, adv, pos, neg, old = _inputs(1)
    h1 = hidden.clone().requires_grad_()
    out = policy_loss(h1, weight, targets, adv, mask, old_logp=old, pos_logp=pos, neg_logp=neg, lam=lam,
                      metrics=True)
    out.loss.backward()
    h2 = hidden.clone().requires_grad_()
    teachers = dict(pos_logp=pos, neg_logp=neg) if lam > 0 else {}
    want = linear_cepo_loss(h2, weight, targets, adv, mask, old_logp=old, lam=lam, **teachers)
    want.loss.backward()
    assert torch.equal(out.loss, want.loss) and torch.equal(h1.grad, h2.grad)
    assert torch.equal(out.advantages, want.advantages)
    if lam == 0.0:  # GRPO exactly: A_hat = A at every valid token, whatever the teachers say
        assert torch.equal(out.advantages, (adv[:, None] * mask).expand_as(out.advantages).float())
    t64 = {k: v.double() for k, v in teachers.items()}
    ref64 = cepo_ref.linear_cepo_loss(hidden.double(), weight.double(), targets, adv.double(), mask,
                                      old_logp=old.double(), lam=lam, **t64)
    ref32 = cepo_ref.linear_cepo_loss(hidden, weight, targets, adv, mask, old_logp=old, lam=lam, **teachers)
    assert_close(out.loss.detach(), ref64.loss, ref32.loss, atol=1e-6, name="loss")


def test_policy_loss_without_teachers_ignores_lambda():
    hidden, weight, targets, mask, adv, _, _, old = _inputs(2)
    a = policy_loss(hidden, weight, targets, adv, mask, old_logp=old, lam=0.5, metrics=True)
    b = linear_cepo_loss(hidden, weight, targets, adv, mask, old_logp=old, lam=0.0)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.advantages, b.advantages)


def test_micro_batches_keep_groups_whole_and_longest_first():
    lengths = [3, 9, 2, 2, 5, 5, 1, 1]  # groups of 2: (3, 9), (2, 2), (5, 5), (1, 1)
    chunks = micro_batches(range(8), lengths, 2, 4)
    assert chunks == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert sorted(r for c in chunks for r in c) == list(range(8))
    assert micro_batches([5, 4, 7], lengths, 2, 1) == [[5], [4], [7]]  # a group larger than a batch splits
    assert all(len(c) <= 3 for c in micro_batches(range(8), lengths, 2, 3))
    assert micro_batches([], lengths, 2, 4) == []


def test_lambda_schedule():
    assert [lam_at(s, 0.5, 25) for s in (0, 5, 24, 25, 40)] == pytest.approx([0.5, 0.4, 0.02, 0.0, 0.0])
    assert lam_at(0, 0.5, 0) == 0.0
