"""The method's invariants (docs/method.md), hand-worked cases and the bad-input contract.

Each test runs on the reference (cepo_ref) and on the kernels (cepo_kernels): both must satisfy the
method, independently of their agreement with each other (tested in test_logits.py/test_linear.py).
"""

import math

import pytest
import torch
from helpers import assert_close, ulps32

import cepo_kernels
import cepo_ref

IMPLS = [pytest.param(cepo_ref, id="ref"), pytest.param(cepo_kernels, id="kernels")]


def make_inputs(B=4, T=6, V=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    old = torch.randn(B, T, generator=g) * 0.4 - 2.0
    pos = torch.randn(B, T, V, generator=g).to(dtype)
    neg = torch.randn(B, T, V, generator=g).to(dtype)
    return logits, targets, adv, mask, old, pos, neg


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("eps_w", [0.0, 0.2, 0.9])
def test_sign_and_magnitude_bounds(impl, lam, eps_w):
    g = torch.Generator().manual_seed(1)
    B, T = 8, 9
    adv = torch.randn(B, generator=g) * 2
    adv[0] = 0.0
    pos, neg = torch.randn(B, T, generator=g) * 3, torch.randn(B, T, generator=g) * 3
    mask = torch.rand(B, T, generator=g) > 0.2
    a_hat = impl.cepo_advantages(adv, pos, neg, mask, lam=lam, eps_w=eps_w)
    a = adv[:, None].expand(B, T)
    valid = mask & (a != 0)
    # property 1: the verifier alone decides the direction
    assert torch.equal(torch.sign(a_hat[valid]), torch.sign(a[valid]))
    # property 2: |A_hat| in [|A|(1 - lam eps_w), |A|(1 + lam eps_w)]
    lo, hi = a.abs() * (1 - lam * eps_w), a.abs() * (1 + lam * eps_w)
    assert bool((a_hat.abs()[mask] >= lo[mask] * (1 - 1e-6) - 1e-7).all())
    assert bool((a_hat.abs()[mask] <= hi[mask] * (1 + 1e-6) + 1e-7).all())
    # property 4 and masking: A = 0 and masked tokens give exactly 0
    assert bool((a_hat[0] == 0).all()) and bool((a_hat[~mask] == 0).all())


@pytest.mark.parametrize("impl", IMPLS)
def test_cepo_advantages_values(impl):
    adv = torch.tensor([2.0, -1.0])
    pos = torch.tensor([[0.0, math.log(2.0)], [0.5, -0.1]])
    neg = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    out = impl.cepo_advantages(adv, pos, neg, mask, lam=0.5, eps_w=0.2)
    # w = exp(sign(A) Delta): 1, 2 -> 1.2 (clipped); exp(-0.5) = 0.607 -> 0.8; masked -> 0
    expected = torch.tensor(
        [[2.0 * (0.5 + 0.5 * 1.0), 2.0 * (0.5 + 0.5 * 1.2)], [-1.0 * (0.5 + 0.5 * 0.8), 0.0]]
    )
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_special_cases(impl):
    """Property 3: lam = 0, or r- = r+ (Delta = 0), gives the GRPO loss and gradient exactly: bit-exact by
    construction (A_hat = A * (1 + lam * w(Delta)) is A itself when lam * w(Delta) = 0, and the loss and its
    gradient are then the same float operations on the same A)."""
    logits, targets, adv, mask, old, pos, _ = make_inputs()
    results = []
    for kwargs in (
        {},
        {"pos_logits": pos, "neg_logits": pos.clone()},
        {"pos_logits": pos, "neg_logits": torch.randn_like(pos), "lam": 0.0},
    ):
        x = logits.clone().requires_grad_()
        fn = impl.cepo_loss if kwargs else impl.grpo_loss
        out = fn(x, targets, adv, mask, old_logp=old, **kwargs)
        out.loss.backward()
        results.append((out.loss.detach(), x.grad, out.advantages))
    for loss, grad, a_hat in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])
        assert torch.equal(a_hat, results[0][2])


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_advantage_gives_zero_loss_and_gradient(impl):
    logits, targets, _, mask, old, pos, neg = make_inputs()
    x = logits.clone().requires_grad_()
    out = impl.cepo_loss(x, targets, torch.zeros(4), mask, old_logp=old, pos_logits=pos, neg_logits=neg)
    out.loss.backward()
    assert float(out.loss) == 0.0
    assert bool((x.grad == 0).all())
    assert bool((out.advantages == 0).all())


@pytest.mark.parametrize("impl", IMPLS)
def test_no_gradient_reaches_teachers(impl):
    logits, targets, adv, mask, old, pos, neg = make_inputs()
    x, p, n = (t.clone().requires_grad_() for t in (logits, pos, neg))
    out = impl.cepo_loss(x, targets, adv, mask, old_logp=old, pos_logits=p, neg_logits=n)
    out.loss.backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert p.grad is None and n.grad is None
    pl, nl = (torch.randn(4, 6, requires_grad=True) for _ in range(2))
    out = impl.cepo_loss(logits.clone().requires_grad_(), targets, adv, mask, pos_logp=pl, neg_logp=nl)
    out.loss.backward()
    assert pl.grad is None and nl.grad is None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradient_closed_form(impl, temperature):
    """dL/dz = g_t (onehot - softmax(z/T)) / T, g_t = -A_hat rho / n when unclipped, else 0."""
    B, T, V = 3, 40, 13
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, T, V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    adv = torch.tensor([1.5, -0.7, -2.0])
    mask = torch.rand(B, T, generator=g) > 0.2
    lp = torch.log_softmax(logits / temperature, -1).gather(-1, targets[..., None])[..., 0]
    # log-ratios spread over both clips and past the dual clip (ratio > 3)
    old = lp - torch.linspace(-1.6, 1.6, T).expand(B, T)
    pos, neg = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    x = logits.clone().requires_grad_()
    out = impl.cepo_loss(
        x, targets, adv, mask, old_logp=old, pos_logp=pos, neg_logp=neg, temperature=temperature
    )
    out.loss.backward()
    a_hat = out.advantages
    rho = torch.exp(lp - old)
    clipped = ((a_hat > 0) & (rho > 1.28)) | ((a_hat < 0) & (rho < 0.8)) | ((a_hat < 0) & (rho > 3.0))
    assert bool(clipped[mask].any()) and bool((~clipped[mask]).any())
    assert bool(((a_hat < 0) & (rho > 3.0) & mask).any())  # the dual clip is exercised
    n = mask.sum()
    g_t = torch.where(clipped | ~mask, torch.zeros_like(rho), -a_hat * rho / n)
    onehot = torch.nn.functional.one_hot(targets, V).float()
    expected = g_t[..., None] * (onehot - torch.softmax(logits / temperature, -1)) / temperature
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-6)
    assert out.metrics["dual_clip_frac"] > 0 and out.metrics["clip_frac"] > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_worked_example(impl):
    """2 tokens, 3-word vocabulary, one sequence with A = 1, worked out by hand.

    Policy logits: token 0 = [0, 0, 0] (target 0), token 1 = [ln 2, 0, 0] (target 0).
    lp0 = ln(1/3), lp1 = ln(2/4) = ln(1/2). Teachers as log-probs: Delta0 = 0 -> w = 1;
    Delta1 = ln 1.5 -> w = 1.5 -> clipped to 1.2. lam = 0.5: A_hat = [1, 1.1].
    old_logp = lp + [0, ln(1/1.5)]: ratio = [1, 1.5]; token 1 exceeds 1 + eps_high = 1.28 with A > 0,
    so its loss is -1.28 * 1.1 = -1.408 and its gradient is 0. Token 0: loss -1, gradient
    -1 * (onehot - softmax) / 2 (token-mean over 2 tokens).
    """
    logits = torch.tensor([[[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]]], requires_grad=True)
    targets = torch.tensor([[0, 0]])
    lp = torch.tensor([[math.log(1 / 3), math.log(1 / 2)]])
    old = lp + torch.tensor([[0.0, math.log(1 / 1.5)]])
    out = impl.cepo_loss(
        logits,
        targets,
        torch.tensor([1.0]),
        torch.ones(1, 2, dtype=torch.bool),
        old_logp=old,
        pos_logp=torch.tensor([[-1.0, math.log(1.5) - 1.0]]),
        neg_logp=torch.tensor([[-1.0, -1.0]]),
        lam=0.5,
        eps_w=0.2,
    )
    out.loss.backward()
    torch.testing.assert_close(out.logp, lp)
    torch.testing.assert_close(out.advantages, torch.tensor([[1.0, 1.1]]))
    torch.testing.assert_close(out.loss, torch.tensor((-1.0 - 1.408) / 2))
    expected = torch.zeros(1, 2, 3)
    expected[0, 0] = -0.5 * torch.tensor([1 - 1 / 3, -1 / 3, -1 / 3])
    torch.testing.assert_close(logits.grad, expected)
    assert out.metrics["clip_frac"] == pytest.approx(0.5)
    assert out.metrics["delta_mean"] == pytest.approx(math.log(1.5) / 2, rel=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_reductions(impl):
    logits, targets, adv, mask, old, pos, neg = make_inputs()
    mask[1] = False  # an empty sequence
    kw = dict(old_logp=old, pos_logits=pos, neg_logits=neg)
    per_tok = impl.cepo_loss(logits, targets, adv, mask, reduction="none", **kw).loss
    assert per_tok.shape == (4, 6) and bool((per_tok[~mask] == 0).all())
    n, B, T = mask.sum(), 4, 6
    per_seq = per_tok.sum(1) / mask.sum(1).clamp_min(1)
    expected = {
        "token-mean": per_tok.sum() / n,
        "sum": per_tok.sum(),
        "seq-mean-token-mean": per_seq.sum() / B,
        "seq-mean-token-sum-norm": per_tok.sum() / (B * T),
    }
    # each reduction against the same sums of the per-token losses in float64, by the house rule: within
    # twice float32 torch's own error of that sum, plus an ulp
    p64 = per_tok.double()
    per_seq64 = p64.sum(1) / mask.sum(1).clamp_min(1)
    exact = {"token-mean": p64.sum() / n, "sum": p64.sum(), "seq-mean-token-mean": per_seq64.sum() / B,
             "seq-mean-token-sum-norm": p64.sum() / (B * T)}
    for reduction, value in expected.items():
        got = impl.cepo_loss(logits, targets, adv, mask, reduction=reduction, **kw).loss
        assert_close(got, exact[reduction], value, atol=ulps32(exact[reduction]), name=reduction)
    for num_tokens in (100, torch.tensor(100)):
        got = impl.cepo_loss(logits, targets, adv, mask, num_tokens=num_tokens, **kw).loss
        want = p64.sum() / 100
        assert_close(got, want, per_tok.sum() / 100, atol=ulps32(want), name="num_tokens")


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_accumulation_with_num_tokens(impl):
    """Two micro-batches with num_tokens = total valid tokens give the full batch's gradient, bit for bit: by
    construction, as each row's gradient is computed from that row alone and divided by the same num_tokens,
    and the micro-batches touch disjoint rows (no sum of two contributions)."""
    logits, targets, adv, mask, old, pos, neg = make_inputs(B=4)
    full = logits.clone().requires_grad_()
    impl.cepo_loss(full, targets, adv, mask, old_logp=old, pos_logits=pos, neg_logits=neg).loss.backward()
    acc = logits.clone().requires_grad_()
    n = mask.sum()
    for sl in (slice(0, 2), slice(2, 4)):
        impl.cepo_loss(
            acc[sl],
            targets[sl],
            adv[sl],
            mask[sl],
            old_logp=old[sl],
            pos_logits=pos[sl],
            neg_logits=neg[sl],
            num_tokens=n,
        ).loss.backward()
    assert torch.equal(acc.grad, full.grad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["empty", "fully-masked"])
def test_empty_and_fully_masked(impl, case):
    B = 0 if case == "empty" else 3
    logits = torch.randn(B, 5, 7, requires_grad=True)
    targets = torch.randint(0, 7, (B, 5))
    mask = torch.zeros(B, 5, dtype=torch.bool)
    for reduction in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "sum"):
        out = impl.cepo_loss(
            logits,
            targets,
            torch.randn(B),
            mask,
            old_logp=torch.randn(B, 5),
            pos_logp=torch.randn(B, 5),
            neg_logp=torch.randn(B, 5),
            reduction=reduction,
        )
        assert float(out.loss) == 0.0 and not math.isnan(float(out.loss))
        out.loss.backward()
        assert bool((logits.grad == 0).all())
        assert all(not math.isnan(v) for v in out.metrics.values())


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_is_not_silenced_but_masked_garbage_is_ignored(impl):
    logits, targets, adv, mask, old, pos, neg = make_inputs()
    mask[0, 0], mask[0, 1] = True, False
    bad = logits.clone()
    bad[0, 1] = float("nan")  # masked position: ignored
    out = impl.cepo_loss(bad, targets, adv, mask, old_logp=old)
    assert math.isfinite(float(out.loss))
    bad[0, 0, 3] = float("nan")  # valid position: NaN loss
    assert math.isnan(float(impl.cepo_loss(bad, targets, adv, mask, old_logp=old).loss))
    nan_adv = adv.clone()
    nan_adv[0] = float("nan")
    assert math.isnan(float(impl.cepo_loss(logits, targets, nan_adv, mask, old_logp=old).loss))


@pytest.mark.parametrize("impl", IMPLS)
def test_vocab_masking_and_out_of_range_targets(impl):
    logits, targets, adv, mask, old, _, _ = make_inputs()
    masked = logits.clone()
    masked[..., 5:] = float("-inf")  # vocabulary masking, targets below 5
    t = targets % 5
    out = impl.cepo_loss(masked, t, adv, mask, old_logp=old)
    assert math.isfinite(float(out.loss))
    lp, ent = impl.token_logprobs(masked, t, return_entropy=True)
    torch.testing.assert_close(lp, torch.log_softmax(logits[..., :5], -1).gather(-1, t[..., None])[..., 0])
    assert bool(torch.isfinite(ent).all())
    bad = targets.clone()
    bad[0, 0], bad[1, 1] = 11, -100  # V = 11: out of range; -100: Hugging Face's ignore index
    lp = impl.token_logprobs(logits, bad)
    assert math.isnan(float(lp[0, 0])) and float(lp[1, 1]) == 0.0
    assert bool(torch.isfinite(lp[2:]).all())


def test_group_advantages_values():
    for impl in (cepo_ref, cepo_kernels):
        r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
        a = impl.group_advantages(r, 4)
        std = torch.tensor([1.0, 0.0, 1.0, 1.0]).std()
        torch.testing.assert_close(a[:4], (torch.tensor([1.0, 0.0, 1.0, 1.0]) - 0.75) / (std + 1e-6))
        assert bool((a[4:] == 0).all())
        torch.testing.assert_close(
            impl.group_advantages(r, 4, scale="none")[:4], torch.tensor([0.25, -0.75, 0.25, 0.25])
        )
        torch.testing.assert_close(
            impl.group_advantages(r, 4, scale="batch")[:4],
            (torch.tensor([1.0, 0.0, 1.0, 1.0]) - 0.75) / (r.std() + 1e-6),
        )
        assert bool((impl.group_advantages(r, 1) == 0).all())
        g = torch.Generator().manual_seed(0)
        rr = torch.rand(24, generator=g)
        for scale in ("group", "batch", "none"):
            torch.testing.assert_close(
                cepo_kernels.group_advantages(rr, 6, scale=scale),
                cepo_ref.group_advantages(rr, 6, scale=scale),
            )


@pytest.mark.parametrize("impl", IMPLS)
def test_flattened_inputs_match_batched(impl):
    logits, targets, _, mask, old, pos, neg = make_inputs()
    adv_tok = torch.randn(4, 6)
    out = impl.cepo_loss(logits, targets, adv_tok, mask, old_logp=old, pos_logits=pos, neg_logits=neg)
    flat = impl.cepo_loss(
        logits.reshape(24, 11),
        targets.reshape(24),
        adv_tok.reshape(24),
        mask.reshape(24),
        old_logp=old.reshape(24),
        pos_logits=pos.reshape(24, 11),
        neg_logits=neg.reshape(24, 11),
    )
    torch.testing.assert_close(flat.loss, out.loss)
    torch.testing.assert_close(flat.logp, out.logp.reshape(24))
    assert flat.advantages.shape == (24,)
    per_tok = impl.cepo_loss(
        logits.reshape(24, 11), targets.reshape(24), adv_tok.reshape(24), mask.reshape(24), reduction="none"
    ).loss
    assert per_tok.shape == (24,)
    with pytest.raises(ValueError, match="logits"):
        impl.cepo_loss(logits[None], targets[None], adv_tok[None], mask[None])


def test_linear_reference_matches_materialised_logits():
    g = torch.Generator().manual_seed(5)
    h, W, b = torch.randn(3, 4, 8, generator=g), torch.randn(10, 8, generator=g), torch.randn(10, generator=g)
    ph, nh = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    t = torch.randint(0, 10, (3, 4), generator=g)
    adv, mask, old = torch.randn(3, generator=g), torch.ones(3, 4), torch.randn(3, 4, generator=g) - 2
    out = cepo_ref.linear_cepo_loss(h, W, t, adv, mask, old_logp=old, pos_hidden=ph, neg_hidden=nh, bias=b)
    ref = cepo_ref.cepo_loss(
        h @ W.T + b, t, adv, mask, old_logp=old, pos_logits=ph @ W.T + b, neg_logits=nh @ W.T + b
    )
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(
        cepo_ref.linear_logprobs(h, W, t, bias=b), cepo_ref.token_logprobs(h @ W.T + b, t)
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_grpo_gradients_follow_the_chain_rule(impl):
    """d/dhidden = G @ W, d/dW = G^T @ hidden, d/db = colsum(G), with G the gradient w.r.t. the logits."""
    g = torch.Generator().manual_seed(6)
    h, W, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 5, 16), (19, 16), (19,)))
    t = torch.randint(0, 19, (2, 5), generator=g)
    adv, mask = torch.tensor([0.8, -1.1]), torch.rand(2, 5, generator=g) > 0.3
    old = torch.randn(2, 5, generator=g, dtype=torch.float64) * 0.3 - 3.0
    hh, WW, bb = (x.clone().float().requires_grad_() for x in (h, W, b))
    out = impl.linear_grpo_loss(hh, WW, t, adv, mask, old_logp=old.float(), bias=bb)
    out.loss.backward()
    z = (h @ W.T + b).float().requires_grad_()
    ref = impl.grpo_loss(z, t, adv, mask, old_logp=old.float())
    ref.loss.backward()
    G = z.grad.double()
    torch.testing.assert_close(out.loss.double(), ref.loss.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hh.grad.double(), G @ W, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        WW.grad.double(), G.reshape(-1, 19).T @ h.reshape(-1, 16), rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(bb.grad.double(), G.sum((0, 1)), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="hidden"):
        impl.linear_grpo_loss(hh[None], WW, t[None], adv[None], mask[None])


BAD_CASES = {
    "targets-float": (lambda a: a.update(targets=a["targets"].float()), TypeError, "targets"),
    "targets-shape": (lambda a: a.update(targets=a["targets"][:, :3]), ValueError, "targets"),
    "mask-values": (lambda a: a.update(mask=torch.full((4, 6), 2)), ValueError, "mask"),
    "mask-shape": (lambda a: a.update(mask=torch.ones(4, 5, dtype=torch.bool)), ValueError, "mask"),
    "adv-shape": (lambda a: a.update(advantages=torch.randn(5)), ValueError, "advantages"),
    "adv-int": (lambda a: a.update(advantages=torch.ones(4, dtype=torch.long)), TypeError, "advantages"),
    "old-shape": (lambda a: a.update(old_logp=torch.randn(4, 5)), ValueError, "old_logp"),
    "logits-int": (lambda a: a.update(logits=torch.ones(4, 6, 11, dtype=torch.long)), TypeError, "logits"),
    "pos-shape": (
        lambda a: a.update(pos_logits=torch.randn(4, 6, 10), neg_logits=torch.randn(4, 6, 11)),
        ValueError,
        "pos_logits",
    ),
    "only-pos": (lambda a: a.update(pos_logp=torch.randn(4, 6)), ValueError, "teachers"),
    "both-forms": (
        lambda a: a.update(
            pos_logp=torch.randn(4, 6), pos_logits=torch.randn(4, 6, 11), neg_logp=torch.randn(4, 6)
        ),
        ValueError,
        "pos_logits",
    ),
    "device": (
        lambda a: a.update(mask=torch.ones(4, 6, dtype=torch.bool, device="meta")),
        ValueError,
        "mask",
    ),
    "lam": (lambda a: a.update(lam=1.5), ValueError, "lam"),
    "eps_w": (lambda a: a.update(eps_w=1.0), ValueError, "eps_w"),
    "eps_low": (lambda a: a.update(eps_low=-0.1), ValueError, "eps_low"),
    "temperature": (lambda a: a.update(temperature=0.0), ValueError, "temperature"),
    "reduction": (lambda a: a.update(reduction="mean"), ValueError, "reduction"),
    "num_tokens-reduction": (lambda a: a.update(num_tokens=10, reduction="sum"), ValueError, "num_tokens"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input(impl, case):
    logits, targets, adv, mask, old, _, _ = make_inputs()
    args = dict(logits=logits, targets=targets, advantages=adv, mask=mask, old_logp=old)
    edit, exc, name = BAD_CASES[case]
    edit(args)
    with pytest.raises(exc, match=name):
        impl.cepo_loss(
            args.pop("logits"), args.pop("targets"), args.pop("advantages"), args.pop("mask"), **args
        )


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_other_functions(impl):
    with pytest.raises(ValueError, match="temperature"):
        impl.token_logprobs(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), temperature=-1.0)
    with pytest.raises(TypeError, match="targets"):
        impl.token_logprobs(torch.randn(3, 5), torch.zeros(3))
    with pytest.raises(TypeError, match="hidden and weight"):
        impl.linear_logprobs(
            torch.randn(3, 8), torch.randn(5, 8, dtype=torch.float16), torch.zeros(3, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="hidden"):
        impl.linear_logprobs(torch.randn(3, 7), torch.randn(5, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="bias"):
        impl.linear_logprobs(
            torch.randn(3, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long), bias=torch.randn(4)
        )
    with pytest.raises(ValueError, match="lam"):
        impl.cepo_advantages(torch.randn(2), torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3), lam=-0.1)
    with pytest.raises(ValueError, match="group_size"):
        impl.group_advantages(torch.randn(6), 4)
    with pytest.raises(ValueError, match="scale"):
        impl.group_advantages(torch.randn(8), 4, scale="global")
