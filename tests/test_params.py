"""The public boundary as a user meets it: numbers in any scalar form, num_tokens, lam without teachers."""

import numpy as np
import pytest
import torch

import cepo_kernels
import cepo_ref

IMPLS = [pytest.param(cepo_ref, id="ref"), pytest.param(cepo_kernels, id="kernels")]


def inputs(B=2, T=5, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    adv = torch.tensor([0.8, -0.8])
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    pos = torch.randn(B, T, generator=g) - 2.0
    neg = torch.randn(B, T, generator=g) - 2.0
    return logits, targets, adv, mask, pos, neg


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lam", [np.float32(0.3), np.float64(0.3), torch.tensor(0.3), torch.tensor([0.3])],
                         ids=["np32", "np64", "t0d", "t1"])
def test_lam_as_numpy_scalar_or_tensor(impl, lam):
    logits, targets, adv, mask, pos, neg = inputs()
    want = impl.cepo_loss(logits, targets, adv, mask, pos_logp=pos, neg_logp=neg, lam=float(np.float32(0.3)))
    got = impl.cepo_loss(logits, targets, adv, mask, pos_logp=pos, neg_logp=neg, lam=lam)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    a = impl.cepo_advantages(adv, pos, neg, mask, lam=lam, eps_w=np.float64(0.2))
    torch.testing.assert_close(a, want.advantages, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_scalars_name_the_argument(impl):
    logits, targets, adv, mask, pos, neg = inputs()
    with pytest.raises(TypeError, match="lam: expected a number or a one-element real tensor"):
        impl.cepo_loss(logits, targets, adv, mask, pos_logp=pos, neg_logp=neg, lam=torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="lam: expected a float, got str"):
        impl.cepo_loss(logits, targets, adv, mask, pos_logp=pos, neg_logp=neg, lam="0.5")
    with pytest.raises(TypeError, match="lam: expected a float, got NoneType"):
        impl.cepo_advantages(adv, pos, neg, mask, lam=None)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_tokens", [0, 0.0, -3])
def test_num_tokens_must_be_positive(impl, num_tokens):
    logits, targets, adv, mask, _, _ = inputs()
    with pytest.raises(ValueError, match="num_tokens: expected a positive count"):
        impl.grpo_loss(logits, targets, adv, mask, num_tokens=num_tokens)


@pytest.mark.parametrize("impl", IMPLS)
def test_num_tokens_divides_the_sum(impl):
    logits, targets, adv, mask, _, _ = inputs()
    total = impl.grpo_loss(logits, targets, adv, mask, reduction="sum").loss
    for n in (7, torch.tensor(7)):
        got = impl.grpo_loss(logits, targets, adv, mask, num_tokens=n).loss
        torch.testing.assert_close(got, total / 7)


@pytest.mark.parametrize("impl", IMPLS)
def test_lam_without_teachers_is_refused(impl):
    logits, targets, adv, mask, pos, neg = inputs()
    with pytest.raises(ValueError, match="lam: 0.5 given without teachers"):
        impl.cepo_loss(logits, targets, adv, mask, lam=0.5)
    h = torch.randn(2, 5, 6)
    w = torch.randn(11, 6)
    with pytest.raises(ValueError, match="lam: 0.3 given without teachers"):
        impl.linear_cepo_loss(h, w, targets, adv, mask, lam=0.3)
    # no lam: GRPO without teachers, lam = 0.5 with them; lam = 0 is GRPO either way
    plain = impl.cepo_loss(logits, targets, adv, mask)
    torch.testing.assert_close(plain.loss, impl.grpo_loss(logits, targets, adv, mask).loss)
    torch.testing.assert_close(plain.loss, impl.cepo_loss(logits, targets, adv, mask, lam=0.0).loss)
    default = impl.cepo_loss(logits, targets, adv, mask, pos_logp=pos, neg_logp=neg)
    half = impl.cepo_loss(logits, targets, adv, mask, pos_logp=pos, neg_logp=neg, lam=0.5)
    torch.testing.assert_close(default.loss, half.loss, rtol=0, atol=0)
    assert not torch.equal(default.advantages, plain.advantages)
