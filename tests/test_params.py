"""The public boundary as a user meets it: numbers in any scalar form, num_tokens, lam without teachers."""

import math

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


@pytest.mark.parametrize("impl", IMPLS)
def test_num_tokens_number_is_used_as_given(impl):
    logits, targets, adv, mask, _, _ = inputs()
    total = impl.grpo_loss(logits, targets, adv, mask, reduction="sum").loss
    torch.testing.assert_close(impl.grpo_loss(logits, targets, adv, mask, num_tokens=0.5).loss, total * 2)
    torch.testing.assert_close(impl.grpo_loss(logits, targets, adv, mask, num_tokens=np.int64(4)).loss,
                               total / 4)
    for bad, exc in ((True, TypeError), ("7", TypeError), (float("nan"), ValueError), (-0.5, ValueError),
                     (torch.tensor([1.0, 2.0]), ValueError), (torch.tensor(True), TypeError)):
        with pytest.raises(exc, match="num_tokens"):
            impl.grpo_loss(logits, targets, adv, mask, num_tokens=bad)


@pytest.mark.parametrize("impl", IMPLS)
def test_num_tokens_tensor_is_used_as_given(impl):
    """A tensor is not read on the host: 0 means no valid tokens (zero loss and gradient), a negative or
    NaN value gives a NaN loss (never a silent 1)."""
    logits, targets, adv, mask, _, _ = inputs()
    total = impl.grpo_loss(logits, targets, adv, mask, reduction="sum").loss
    torch.testing.assert_close(impl.grpo_loss(logits, targets, adv, mask, num_tokens=torch.tensor(0.5)).loss,
                               total * 2)
    leaf = logits.clone().requires_grad_()
    out = impl.grpo_loss(leaf, targets, adv, mask, num_tokens=torch.tensor(0))
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and bool((leaf.grad == 0).all())
    for bad in (torch.tensor(-3), torch.tensor(float("nan"))):
        assert math.isnan(float(impl.grpo_loss(logits, targets, adv, mask, num_tokens=bad).loss))


def test_float64_is_refused_by_the_kernels_and_accepted_by_the_reference():
    logits, targets, adv, mask, _, _ = inputs()
    x64 = logits.double()
    h, w = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(11, 6, dtype=torch.float64)
    calls = {
        "logits": [lambda m: m.token_logprobs(x64, targets), lambda m: m.grpo_loss(x64, targets, adv, mask),
                   lambda m: m.cepo_loss(x64, targets, adv, mask, pos_logits=logits, neg_logits=logits)],
        "pos_logits": [lambda m: m.cepo_loss(logits, targets, adv, mask, pos_logits=x64, neg_logits=logits)],
        "hidden": [lambda m: m.linear_logprobs(h, w, targets),
                   lambda m: m.linear_grpo_loss(h, w, targets, adv, mask)],
    }
    for name, fns in calls.items():
        for fn in fns:
            with pytest.raises(TypeError, match=f"^{name}: expected dtype float32, bfloat16 or float16"):
                fn(cepo_kernels)
            fn(cepo_ref)  # the float64 ground truth
    with pytest.raises(TypeError, match="^weight: expected dtype float32"):
        cepo_kernels.linear_teacher_logprobs(h, None, w, targets)
    assert cepo_ref.token_logprobs(x64, targets).dtype == torch.float64


@pytest.mark.parametrize("impl", IMPLS)
def test_meta_tensors_and_empty_hidden_size_name_the_argument(impl):
    logits, targets, adv, mask, pos, neg = inputs()
    meta = logits.to("meta")
    with pytest.raises(ValueError, match="^logits: device 'meta' is not supported"):
        impl.token_logprobs(meta, targets.to("meta"))
    with pytest.raises(ValueError, match="^logits: device 'meta' is not supported"):
        impl.cepo_loss(meta, targets.to("meta"), adv.to("meta"), mask.to("meta"))
    with pytest.raises(ValueError, match="^pos_logp: device 'meta' is not supported"):
        impl.cepo_advantages(adv.to("meta"), pos.to("meta"), neg.to("meta"), mask.to("meta"), lam=0.5)
    with pytest.raises(ValueError, match="^hidden: device 'meta' is not supported"):
        impl.linear_logprobs(torch.empty(2, 5, 6, device="meta"), torch.empty(11, 6, device="meta"),
                             targets.to("meta"))
    with pytest.raises(ValueError, match="^hidden: expected a hidden size >= 1"):
        impl.linear_logprobs(torch.empty(2, 5, 0), torch.empty(11, 0), targets)
    with pytest.raises(ValueError, match="^hidden: expected a hidden size >= 1"):
        impl.linear_grpo_loss(torch.empty(2, 5, 0), torch.empty(11, 0), targets, adv, mask)
    with pytest.raises(ValueError, match=r"^weight: expected shape \[V, H\] with V >= 1"):
        impl.linear_logprobs(torch.randn(2, 5, 6), torch.empty(0, 6), targets)
