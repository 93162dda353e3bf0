"""The fused logits kernels (cepo_kernels.ops.logits) against cepo_ref.

Tolerance (tests/helpers.assert_close): err(kernel, float64 reference) <= 2 * err(cepo_ref in the same
dtype, float64 reference) + atol. The float64 reference is cepo_ref run on .double() inputs.
On CPU the kernels run through Triton's interpreter (tests/conftest.py), so shapes stay small.
"""

import math

import pytest
import torch
from helpers import assert_close, poison

import cepo_kernels
import cepo_ref
import cepo_ref.reference as ref_mod
from cepo_kernels.ops import _common

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy in the interpreter's masked lanes
              pytest.mark.usefixtures("kernel_backend")]  # native CPU kernels and interpreter (conftest)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# log ratios lp - old spread over both sides of both clips, past the dual clip and past the +-20 clamp
LOG_RATIOS = torch.tensor([-1.0, -0.3, -0.1, 0.05, 0.2, 0.35, 0.9, 1.5, 25.0, -25.0, 0.0, 1.2, -0.6])


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernels write starts NaN: an element they forget fails the comparison."""
    monkeypatch.setattr(_common, "alloc", lambda shape, dtype, device: poison(shape, dtype, device))


def scaled_atol(ref, rel=1e-6):
    ref = ref.detach().double()
    finite = ref[torch.isfinite(ref)]
    return rel * max(1.0, float(finite.abs().max()) if finite.numel() else 1.0)


def make_case(B, T, V, dtype, seed, *, sliced=False, per_token=False, temperature=1.0):
    """Policy and teacher logits (as `dtype`) with a fully masked sequence, an all-correct group (A = 0)
    and old log-probs placing the ratios on both sides of both clips."""
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(B, T + int(sliced), V, generator=g) * 2).to(dtype)
    x = full[:, :-1] if sliced else full
    pos = (x.float() + 0.4 * torch.randn(B, T, V, generator=g)).to(dtype)
    neg = (x.float() + 0.4 * torch.randn(B, T, V, generator=g)).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    if per_token:
        adv = torch.randn(B, T, generator=g)
        adv[0, : T // 2] = 0.0
    else:
        adv = torch.randn(B, generator=g)
        adv[0] = 0.0  # an all-correct group
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[-1] = False  # a fully masked sequence
    mask[1] = True
    lp64 = ref_mod.token_logprobs(x.double(), targets, temperature=temperature)
    log_r = LOG_RATIOS[torch.arange(B * T) % len(LOG_RATIOS)].reshape(B, T)
    old = (lp64 - log_r).float()
    return dict(full=full, sliced=sliced, pos=pos, neg=neg, targets=targets, adv=adv, mask=mask, old=old)


def run_loss(impl, case, dtype, teachers, upstream=None, **kw):
    """impl.cepo_loss on the case's logits cast to `dtype`; returns (output, d loss / d logits)."""
    leaf = case["full"].detach().to(dtype).requires_grad_()
    x = leaf[:, :-1] if case["sliced"] else leaf
    extra = {}
    if teachers in ("logits", "rlsd"):
        extra["pos_logits"] = case["pos"].to(dtype)
    if teachers == "logits":
        extra["neg_logits"] = case["neg"].to(dtype)
    if teachers == "logp":
        t, tg = kw.get("temperature", 1.0), case["targets"]
        extra["pos_logp"] = cepo_ref.token_logprobs(case["pos"].double(), tg, temperature=t).float()
        extra["neg_logp"] = cepo_ref.token_logprobs(case["neg"].double(), tg, temperature=t).float()
    if teachers == "rlsd":
        extra["neg_logp"] = case["old"]
    fn = impl.cepo_loss if teachers != "grpo" else impl.grpo_loss
    out = fn(x, case["targets"], case["adv"], case["mask"], old_logp=case["old"], **extra, **kw)
    loss = out.loss if upstream is None else (out.loss * upstream).sum()
    loss.backward()
    grad = leaf.grad[:, :-1] if case["sliced"] else leaf.grad
    return out, grad


def compare_loss(case, dtype, teachers, **kw):
    B, T = case["targets"].shape
    upstream = torch.randn(B, T) if kw.get("reduction") == "none" else None
    out, grad = run_loss(cepo_kernels, case, dtype, teachers, upstream, **kw)
    ref64, grad64 = run_loss(cepo_ref, case, torch.float64, teachers, upstream, **kw)
    ref_t, grad_t = run_loss(cepo_ref, case, dtype, teachers, upstream, **kw)
    assert grad.dtype == dtype and out.logp.dtype == out.advantages.dtype == torch.float32
    valid = case["mask"].reshape(out.logp.shape) & (case["targets"].reshape(out.logp.shape) >= 0)
    assert bool((out.logp[~valid] == 0).all())  # a masked row's logits are not read: logp 0 there
    for name in ("loss", "logp", "advantages"):
        a, r64, rt = getattr(out, name), getattr(ref64, name), getattr(ref_t, name)
        assert a.shape == r64.shape, name
        if name == "logp":
            a, r64, rt = a[valid], r64[valid], rt[valid]
        assert_close(a, r64, rt, atol=scaled_atol(r64), name=name)
    assert_close(grad, grad64, grad_t, atol=scaled_atol(grad64, 1e-5), name="dlogits")
    for k, r64 in ref64.metrics.items():  # ratio_mean reaches exp(20): a relative atol
        assert_close(torch.tensor(out.metrics[k]), torch.tensor(r64), torch.tensor(ref_t.metrics[k]),
                     atol=1e-5 * max(1.0, abs(r64)), name=k)
    return out, grad


LOSS_CASES = []
for i, (v, dname) in enumerate([(v, d) for v in (507, 1000, 4099) for d in DTYPES]):
    opts = dict(
        teachers=("logits", "logp", "rlsd", "grpo", "logits")[i % 5],
        per_token=i % 2 == 1,
        sliced=i % 3 == 0,
        temperature=(1.0, 0.7, 1.3)[i % 3],
        reduction=("token-mean", "seq-mean-token-mean", "none", "sum", "seq-mean-token-sum-norm")[i % 5],
        clip_dual=None if i == 4 else 3.0,
    )
    B, T = (4, 5) if v == 4099 else (4, 6)
    tid = (f"N{B * T}-V{v}-{dname}-{opts['teachers']}-{'tok' if opts['per_token'] else 'seq'}"
           f"{'-sliced' if opts['sliced'] else ''}-T{opts['temperature']}-{opts['reduction']}")
    LOSS_CASES.append(pytest.param(B, T, v, dname, opts, id=tid))


@pytest.mark.parametrize("B, T, V, dname, opts", LOSS_CASES)
def test_loss_matches_reference(B, T, V, dname, opts):
    dtype = DTYPES[dname]
    case = make_case(B, T, V, dtype, seed=V + B * T + len(dname), sliced=opts["sliced"],
                     per_token=opts["per_token"], temperature=opts["temperature"])
    kw = {k: opts[k] for k in ("temperature", "reduction", "clip_dual")}
    if opts["teachers"] != "grpo":
        kw["lam"] = 0.5
    out, grad = compare_loss(case, dtype, opts["teachers"], **kw)
    # rows with zero gradient (masked, A = 0) are exactly zero, never NaN
    dead = ~case["mask"] | (out.advantages.reshape(B, T) == 0)
    assert bool((grad[dead] == 0).all())


@pytest.mark.parametrize("reduction, num_tokens", [
    pytest.param(r, None, id=f"N18-V507-fp32-{r}") for r in
    ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "sum", "none")
] + [pytest.param("token-mean", 40, id="N18-V507-fp32-num_tokens-int"),
     pytest.param("token-mean", torch.tensor(33.0), id="N18-V507-fp32-num_tokens-tensor")])
def test_reductions(reduction, num_tokens):
    case = make_case(3, 6, 507, torch.float32, seed=11, per_token=True, temperature=0.7)
    compare_loss(case, torch.float32, "logits", reduction=reduction, num_tokens=num_tokens, temperature=0.7)


def test_flattened_input_matches_batched():
    case = make_case(3, 5, 507, torch.bfloat16, seed=3, per_token=True)
    x = case["full"].requires_grad_()
    kw = dict(old_logp=case["old"], pos_logits=case["pos"], neg_logits=case["neg"])
    out = cepo_kernels.cepo_loss(x, case["targets"], case["adv"], case["mask"], **kw)
    out.loss.backward()
    xf = case["full"].detach().reshape(15, 507).requires_grad_()
    flat = {k: v.reshape(15, -1).squeeze(-1) for k, v in kw.items()}
    outf = cepo_kernels.cepo_loss(xf, case["targets"].reshape(-1), case["adv"].reshape(-1),
                                  case["mask"].reshape(-1), **flat)
    outf.loss.backward()
    assert outf.logp.shape == (15,) and outf.advantages.shape == (15,)
    torch.testing.assert_close(outf.loss, out.loss, rtol=0, atol=0)
    torch.testing.assert_close(outf.advantages, out.advantages.reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(xf.grad, x.grad.reshape(15, 507), rtol=0, atol=0)


def test_teacher_forms_agree_and_grpo_is_lam_zero():
    case = make_case(3, 6, 1000, torch.float32, seed=5, temperature=0.7)
    x, tg, adv, mask, old = (case[k] for k in ("full", "targets", "adv", "mask", "old"))

    def run(**kw):
        leaf = x.detach().clone().requires_grad_()
        if "grpo" in kw:
            out = cepo_kernels.grpo_loss(leaf, tg, adv, mask, old_logp=old, temperature=0.7)
        else:
            out = cepo_kernels.cepo_loss(leaf, tg, adv, mask, old_logp=old, temperature=0.7, **kw)
        out.loss.backward()
        return out.loss, out.advantages, leaf.grad

    pos_lp = cepo_kernels.token_logprobs(case["pos"], tg, temperature=0.7)
    neg_lp = cepo_kernels.token_logprobs(case["neg"], tg, temperature=0.7)
    as_logits = run(pos_logits=case["pos"], neg_logits=case["neg"])
    for other in (run(pos_logp=pos_lp, neg_logp=neg_lp), run(pos_logits=case["pos"], neg_logp=neg_lp),
                  run(pos_logp=pos_lp, neg_logits=case["neg"])):
        for a, b in zip(as_logits, other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    grpo = run(grpo=True)
    lam0 = run(pos_logits=case["pos"], neg_logits=case["neg"], lam=0.0)
    for a, b in zip(grpo, lam0, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_zero_gradient_rows_are_not_read():
    """Masked, clipped and A_hat = 0 rows: zero gradient, computed without reading their logits."""
    case = make_case(4, 6, 507, torch.float32, seed=9)
    leaf = case["full"].detach().clone().requires_grad_()
    out = cepo_kernels.cepo_loss(leaf, case["targets"], case["adv"], case["mask"], old_logp=case["old"],
                                 pos_logits=case["pos"], neg_logits=case["neg"])
    ratio = torch.exp((out.logp - case["old"]).clamp(-20, 20))
    a = out.advantages
    clipped = ((a > 0) & (ratio > 1.28)) | ((a < 0) & (ratio < 0.8)) | ((a < 0) & (ratio > 3.0))
    dead = ~case["mask"] | (a == 0) | clipped | ((out.logp - case["old"]).abs() > 20)
    assert 0 < int(dead.sum()) < dead.numel()
    leaf.data[dead] = float("nan")  # behind autograd's back: the backward must not read these rows
    out.loss.backward()
    assert bool((leaf.grad[dead] == 0).all())
    assert bool(torch.isfinite(leaf.grad).all()) and bool((leaf.grad[~dead] != 0).any())


@pytest.mark.parametrize("fn", ["cepo_loss", "token_logprobs"])
def test_inplace_gives_the_same_gradient(fn):
    case = make_case(3, 6, 1000, torch.bfloat16, seed=13, sliced=True)

    def run(inplace):
        leaf = case["full"].detach().clone().requires_grad_()
        x = leaf[:, :-1] * 1  # a non-leaf view, as the output of an lm_head would be
        before = x.detach().clone()
        if fn == "cepo_loss":
            teachers = dict(pos_logits=case["pos"], neg_logits=case["neg"])
            loss = cepo_kernels.cepo_loss(x, case["targets"], case["adv"], case["mask"], old_logp=case["old"],
                                          inplace=inplace, **teachers).loss
        else:
            lp, ent = cepo_kernels.token_logprobs(x, case["targets"], return_entropy=True, inplace=inplace)
            loss = (lp * case["adv"][:, None]).sum() + 0.1 * ent.sum()
        loss.backward()
        return leaf.grad[:, :-1], x.detach(), before

    g_new, x_after, before = run(False)
    assert torch.equal(x_after, before)  # the default never touches the caller's logits
    g_in, x_in, _ = run(True)
    torch.testing.assert_close(g_in, g_new, rtol=0, atol=0)
    torch.testing.assert_close(x_in, g_new, rtol=0, atol=0)  # the logits' storage holds dlogits


TOKEN_CASES = []
for i, (v, dname) in enumerate([(v, d) for v in (507, 1000, 4099) for d in DTYPES]):
    layout = ("sliced", "3d", "4d", "2d")[i % 4]
    ent = i % 3 != 2
    TOKEN_CASES.append(pytest.param(v, dname, layout, ent, (0.7, 1.0, 1.6)[i % 3],
                                    id=f"N12-V{v}-{dname}-{layout}{'-entropy' if ent else ''}"))


@pytest.mark.parametrize("V, dname, layout, with_entropy, temperature", TOKEN_CASES)
def test_token_logprobs_matches_reference(V, dname, layout, with_entropy, temperature):
    dtype = DTYPES[dname]
    g = torch.Generator().manual_seed(V + len(layout))
    shape = {"sliced": (2, 7), "3d": (2, 6), "4d": (2, 3, 2), "2d": (12,)}[layout]
    base = (torch.randn(*shape, V, generator=g) * 3).to(dtype)
    targets = torch.randint(0, V, shape, generator=g)
    if layout == "sliced":
        targets = targets[:, :-1]
    g_lp, g_ent = torch.randn(targets.shape, generator=g), torch.randn(targets.shape, generator=g)

    def run(impl, dt):
        leaf = base.detach().to(dt).requires_grad_()
        x = leaf[:, :-1] if layout == "sliced" else leaf
        res = impl.token_logprobs(x, targets, temperature=temperature, return_entropy=with_entropy)
        lp, ent = res if with_entropy else (res, None)
        loss = (lp * g_lp).sum() + (0.0 if ent is None else (ent * g_ent).sum())
        loss.backward()
        return lp, ent, leaf.grad

    lp, ent, grad = run(cepo_kernels, dtype)
    lp64, ent64, grad64 = run(cepo_ref, torch.float64)
    lpt, entt, gradt = run(cepo_ref, dtype)
    assert lp.dtype == torch.float32 and lp.shape == targets.shape and grad.dtype == dtype
    assert_close(lp, lp64, lpt, atol=scaled_atol(lp64), name="logp")
    if with_entropy:
        assert ent.dtype == torch.float32 and ent.shape == targets.shape
        assert_close(ent, ent64, entt, atol=scaled_atol(ent64), name="entropy")
    assert_close(grad, grad64, gradt, atol=scaled_atol(grad64, 1e-5), name="dlogits")


def test_out_of_range_targets_give_nan_without_reading_out_of_bounds():
    case = make_case(3, 6, 507, torch.float32, seed=17)
    targets = case["targets"].clone()
    targets[1, 0], targets[1, 1] = 507, -1  # unmasked (row 1 is fully valid)
    targets[2, 0] = 10**9
    lp = cepo_kernels.token_logprobs(case["full"], targets)
    bad = (targets < 0) | (targets >= 507)
    assert bool(lp[targets >= 507].isnan().all()) and bool(torch.isfinite(lp[~bad]).all())
    assert float(lp[1, 1]) == 0.0  # a negative id: ignored (log-prob 0)
    torch.testing.assert_close(lp[~bad], cepo_ref.token_logprobs(case["full"], targets)[~bad])
    out = cepo_kernels.cepo_loss(case["full"], targets, case["adv"], case["mask"], old_logp=case["old"])
    assert bool(out.loss.isnan())
    masked = case["mask"].clone()
    masked[bad] = False  # masked garbage targets never leak
    for impl in (cepo_kernels, cepo_ref):
        leaf = case["full"].clone().requires_grad_()
        out = impl.cepo_loss(leaf, targets, case["adv"], masked, old_logp=case["old"], pos_logits=case["pos"],
                             neg_logits=case["neg"])
        out.loss.backward()
        assert bool(torch.isfinite(out.loss)) and bool(torch.isfinite(leaf.grad).all())
        if impl is cepo_kernels:
            ours = (out.loss, leaf.grad)
    torch.testing.assert_close(ours[0], out.loss)
    torch.testing.assert_close(ours[1], leaf.grad)


def test_vocab_masking_with_minus_inf():
    case = make_case(3, 6, 1000, torch.bfloat16, seed=19, per_token=True)
    x = case["full"].clone()
    g = torch.Generator().manual_seed(0)
    banned = torch.rand(x.shape, generator=g) < 0.5
    banned.scatter_(-1, case["targets"].unsqueeze(-1), False)
    x[banned] = float("-inf")
    x[0, 0] = float("-inf")  # all but the target
    x[0, 0, case["targets"][0, 0]] = 1.0
    case["full"] = x
    out, grad = compare_loss(case, torch.bfloat16, "logits", temperature=0.7)
    assert bool(torch.isfinite(out.loss)) and bool(torch.isfinite(grad).all())
    assert bool((grad[banned] == 0).all())
    lp, ent = cepo_kernels.token_logprobs(x, case["targets"], return_entropy=True)
    assert float(lp[0, 0]) == 0.0 and float(ent[0, 0]) == 0.0 and bool(torch.isfinite(ent).all())


def test_nan_propagates_but_masked_garbage_does_not():
    case = make_case(3, 6, 507, torch.float32, seed=23)
    x, tg, adv, mask, old = (case[k].clone() for k in ("full", "targets", "adv", "mask", "old"))
    clean = cepo_kernels.cepo_loss(x, tg, adv, mask, old_logp=old, pos_logits=case["pos"],
                                   neg_logits=case["neg"]).loss
    masked_row = (~mask).nonzero()[0].tolist()
    for t in (x, case["pos"], case["neg"]):
        t[masked_row[0], masked_row[1], :7] = float("nan")
    old[masked_row[0], masked_row[1]] = float("nan")
    case["pos"][0] = float("nan")  # sequence 0 has A = 0: its teachers may be unscored and are ignored
    out = cepo_kernels.cepo_loss(x, tg, adv, mask, old_logp=old, pos_logits=case["pos"],
                                 neg_logits=case["neg"])
    torch.testing.assert_close(out.loss, clean, rtol=0, atol=0)
    assert all(math.isfinite(v) for v in out.metrics.values())
    x[1, 2, 5] = float("nan")  # row 1 is unmasked
    leaf = x.requires_grad_()
    out = cepo_kernels.cepo_loss(leaf, tg, adv, mask, old_logp=old, pos_logits=case["pos"],
                                 neg_logits=case["neg"])
    assert bool(out.loss.isnan()) and bool(out.logp[1, 2].isnan())
    out.loss.backward()
    assert bool(leaf.grad[1, 2].isnan().all())
    assert bool(torch.isnan(cepo_kernels.token_logprobs(x.detach(), tg)[1, 2]))


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0,)], ids=["B0", "T0", "N0"])
@pytest.mark.parametrize("reduction", ["token-mean", "seq-mean-token-mean", "none"])
def test_empty_batch(shape, reduction):
    x = torch.randn(*shape, 33, requires_grad=True)
    tg = torch.zeros(shape, dtype=torch.long)
    adv = torch.zeros(shape[:1] if len(shape) == 2 else shape)
    out = cepo_kernels.cepo_loss(x, tg, adv, torch.ones(shape, dtype=torch.bool), pos_logits=x.detach(),
                                 neg_logits=x.detach(), reduction=reduction)
    assert out.logp.shape == shape and out.advantages.shape == shape
    out.loss.sum().backward()
    assert x.grad.shape == x.shape and bool((out.loss == 0).all())
    lp, ent = cepo_kernels.token_logprobs(x, tg, return_entropy=True)
    assert lp.shape == ent.shape == shape


def test_fully_masked_batch_gives_zero_loss_and_gradient():
    case = make_case(3, 6, 507, torch.float32, seed=29)
    for reduction in ("token-mean", "seq-mean-token-mean", "sum"):
        leaf = case["full"].clone().requires_grad_()
        out = cepo_kernels.cepo_loss(leaf, case["targets"], case["adv"], torch.zeros(3, 6, dtype=torch.bool),
                                     old_logp=case["old"], pos_logits=case["pos"], neg_logits=case["neg"],
                                     reduction=reduction)
        out.loss.backward()
        assert float(out.loss) == 0.0 and bool((leaf.grad == 0).all()) and bool((out.advantages == 0).all())
        assert all(math.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("per_token, flat", [(False, False), (True, False), (True, True)],
                         ids=["N40-seq", "N40-tok", "N40-flat"])
def test_cepo_advantages_matches_reference(per_token, flat):
    g = torch.Generator().manual_seed(31)
    B, T = 5, 8
    adv = torch.randn(B, T, generator=g) if per_token else torch.randn(B, generator=g)
    adv[0] = 0.0
    pos, neg = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).int()
    pos[mask == 0] = float("nan")  # masked garbage
    args = (adv, pos, neg, mask)
    if flat:
        args = tuple(a.reshape(-1) for a in args)
    for lam, eps_w in ((0.5, 0.2), (1.0, 0.5), (0.0, 0.2)):
        got = cepo_kernels.cepo_advantages(*args, lam=lam, eps_w=eps_w)
        want = cepo_ref.cepo_advantages(*args, lam=lam, eps_w=eps_w)
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def _bad_cases():
    x, tg = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    adv, mask = torch.randn(2), torch.ones(2, 3, dtype=torch.bool)
    meta = torch.empty(2, 3, 11, device="meta")
    return [
        ("pos_logits", dict(pos_logits=torch.randn(2, 3, 12), neg_logits=x)),
        ("pos_logits", dict(pos_logits=meta, neg_logits=x)),
        ("neg_logits", dict(pos_logits=x, neg_logits=torch.randn(2, 3, 11).int())),
        ("pos_logp", dict(pos_logits=x, pos_logp=tg.float(), neg_logp=tg.float())),
        ("teachers", dict(pos_logits=x)),
        ("targets", dict(targets=tg.float())),
        ("targets", dict(targets=tg[:, :2])),
        ("advantages", dict(advantages=torch.randn(3))),
        ("mask", dict(mask=torch.full((2, 3), 2))),
        ("old_logp", dict(old_logp=torch.randn(2, 4))),
        ("lam", dict(lam=1.5)),
        ("eps_w", dict(eps_w=1.0)),
        ("eps_low", dict(eps_low=-0.1)),
        ("temperature", dict(temperature=0.0)),
        ("reduction", dict(reduction="mean")),
        ("num_tokens", dict(num_tokens=5, reduction="sum")),
        ("logits", dict(logits=torch.randn(2, 3, 1, 11), targets=tg[..., None])),
        ("logits", dict(logits=tg)),
    ], dict(logits=x, targets=tg, advantages=adv, mask=mask)


BAD, GOOD = _bad_cases()


@pytest.mark.parametrize("name, change", [pytest.param(n, c, id=f"{i}-{n}") for i, (n, c) in enumerate(BAD)])
def test_bad_input_raises_naming_the_argument(name, change):
    kw = {**GOOD, **change}
    with pytest.raises((ValueError, TypeError), match=name):
        args = [kw.pop(k) for k in ("logits", "targets", "advantages", "mask")]
        cepo_kernels.cepo_loss(*args, **kw)


def test_bad_input_other_functions():
    x, tg = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    with pytest.raises(ValueError, match="temperature"):
        cepo_kernels.token_logprobs(x, tg, temperature=-1.0)
    with pytest.raises(ValueError, match="targets"):
        cepo_kernels.token_logprobs(x, tg[:, :1])
    with pytest.raises(TypeError, match="targets"):
        cepo_kernels.token_logprobs(x, tg.float())
    with pytest.raises(ValueError, match="logits"):
        cepo_kernels.token_logprobs(torch.randn(2, 0), tg[:, 0])
    lp, mask = torch.randn(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="lam"):
        cepo_kernels.cepo_advantages(torch.randn(2), lp, lp, mask, lam=-0.1)
    with pytest.raises(ValueError, match="neg_logp"):
        cepo_kernels.cepo_advantages(torch.randn(2), lp, lp[:, :2], mask, lam=0.5)
    with pytest.raises(TypeError, match="pos_logp"):
        cepo_kernels.cepo_advantages(torch.randn(2), lp.long(), lp, mask, lam=0.5)


@pytest.mark.gpu
def test_large_vocab_int64_addressing(device):
    """N * V > 2**31 (the Qwen vocabulary): logp, loss and gradient on sampled rows, incl. the last ones."""
    N, V = 14200, 151936
    assert N * V > 2**31
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, V, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    pos = torch.randn(N, V, device=device, dtype=torch.bfloat16, generator=g)
    targets = torch.randint(0, V, (N,), device=device, generator=g)
    targets[-1] = V - 1
    adv = torch.randn(N, device=device, generator=g)
    mask = torch.rand(N, device=device, generator=g) > 0.1
    old = cepo_kernels.token_logprobs(x.detach(), targets) - 0.3 * torch.randn(N, device=device, generator=g)
    neg_logp = old
    out = cepo_kernels.cepo_loss(x, targets, adv, mask, old_logp=old, pos_logits=pos, neg_logp=neg_logp,
                                 temperature=0.8, reduction="sum")
    out.loss.backward()
    rows = torch.tensor([0, 1, N // 2, N - 3, N - 2, N - 1], device=device)
    rows = rows[mask[rows]]

    def ref(dt):
        leaf = x.detach()[rows].to(dt).requires_grad_()
        r = cepo_ref.cepo_loss(leaf, targets[rows], adv[rows], mask[rows], old_logp=old[rows],
                               pos_logits=pos[rows].to(dt), neg_logp=neg_logp[rows], temperature=0.8,
                               reduction="none")
        r.loss.sum().backward()
        return r, leaf.grad

    r64, g64 = ref(torch.float64)
    rt, gt = ref(torch.bfloat16)
    with torch.no_grad():
        per_token = cepo_kernels.cepo_loss(x, targets, adv, mask, old_logp=old, pos_logits=pos,
                                           neg_logp=neg_logp, temperature=0.8, reduction="none").loss
    assert_close(per_token[rows], r64.loss, rt.loss, atol=scaled_atol(r64.loss), name="loss")
    assert_close(out.logp[rows], r64.logp, rt.logp, atol=scaled_atol(r64.logp), name="logp")
    assert_close(out.advantages[rows], r64.advantages, rt.advantages, atol=1e-6, name="advantages")
    assert_close(x.grad[rows], g64, gt, atol=scaled_atol(g64, 1e-5), name="dlogits")


@pytest.mark.triton_only  # the native CPU kernels read row counts on the host (free there) to skip rows
@pytest.mark.parametrize("fn", ["cepo_loss", "grpo_loss", "token_logprobs", "cepo_advantages"])
def test_no_host_sync_with_tensor_metrics(fn):
    """With metrics="tensor" (or none), a bool mask and num_tokens as a tensor, forward and backward never
    read a tensor on the host (what CUDA graph capture needs); the metrics equal the default floats."""
    case = make_case(3, 6, 507, torch.float32, seed=37, per_token=True)
    x, tg, adv, mask, old = (case[k] for k in ("full", "targets", "adv", "mask", "old"))
    leaf = x.clone().requires_grad_()
    kw = dict(old_logp=old, num_tokens=torch.tensor(20.0))
    if fn == "cepo_loss":
        kw.update(pos_logits=case["pos"], neg_logits=case["neg"])
    with pytest.MonkeyPatch.context() as mp:
        def refuse(self, *args, **kwargs):
            raise AssertionError("host sync: a tensor was read on the host")

        for name in ("item", "tolist", "nonzero", "__bool__", "__float__", "__int__"):
            mp.setattr(torch.Tensor, name, refuse)
        if fn == "token_logprobs":
            lp, ent = cepo_kernels.token_logprobs(leaf, tg, return_entropy=True)
            (lp.sum() + ent.sum()).backward()
            return
        if fn == "cepo_advantages":
            cepo_kernels.cepo_advantages(adv, case["pos"][..., 0], case["neg"][..., 0], mask, lam=0.5)
            return
        out = getattr(cepo_kernels, fn)(leaf, tg, adv, mask, metrics="tensor", **kw)
        out.loss.backward()
        none = getattr(cepo_kernels, fn)(leaf.detach(), tg, adv, mask, metrics=False, **kw)
    assert none.metrics == {}
    floats = getattr(cepo_kernels, fn)(leaf.detach(), tg, adv, mask, **kw).metrics
    assert set(out.metrics) == set(floats)
    for k, v in out.metrics.items():
        assert v.dim() == 0 and v.dtype == torch.float32 and float(v) == floats[k], k


def test_bad_metrics_option():
    x, tg = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    with pytest.raises(ValueError, match="metrics"):
        cepo_kernels.cepo_loss(x, tg, torch.randn(2), torch.ones(2, 3, dtype=torch.bool), metrics="floats")


@pytest.mark.parametrize("fn", ["cepo_loss", "token_logprobs"])
def test_inplace_backward_invalidates_the_saved_logits(fn):
    """inplace=True overwrites the logits with dlogits: a second backward through the same graph (or any
    other reader of the saved logits) must raise, not compute with the gradients as if they were logits."""
    case = make_case(3, 6, 507, torch.float32, seed=41)
    leaf = case["full"].detach().clone().requires_grad_()
    x = leaf * 1  # a non-leaf, as the output of an lm_head
    version = x._version
    if fn == "cepo_loss":
        loss = cepo_kernels.cepo_loss(x, case["targets"], case["adv"], case["mask"], old_logp=case["old"],
                                      pos_logits=case["pos"], neg_logits=case["neg"], inplace=True).loss
    else:
        loss = cepo_kernels.token_logprobs(x, case["targets"], inplace=True).sum()
    loss.backward(retain_graph=True)
    assert x._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # without inplace the graph can be re-run
    y = leaf.detach().clone().requires_grad_() * 1
    loss = cepo_kernels.token_logprobs(y, case["targets"]).sum()
    loss.backward(retain_graph=True)
    loss.backward()


def _ignored(shape):
    ign = torch.zeros(shape, dtype=torch.bool)
    ign[0, 2] = ign[1, 0] = ign[1, 4] = ign[2, 5] = True  # unmasked positions (row 1 is fully valid)
    return ign


@pytest.mark.parametrize("teachers", ["logits", "grpo"])
@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_ignore_index_equals_masking(dname, teachers):
    """Hugging Face's -100 targets count as masked: the loss, the gradient, the outputs and the metrics
    equal those of mask=False there, for the kernels and the reference (whose float64 run the kernels
    match under the house rule)."""
    dtype = DTYPES[dname]
    case = make_case(3, 6, 507, dtype, seed=23)
    ign = _ignored((3, 6))
    assert bool(case["mask"][ign].any())
    ignored = dict(case, targets=case["targets"].masked_fill(ign, -100))
    masked = dict(case, mask=case["mask"] & ~ign)
    compare_loss(ignored, dtype, teachers, temperature=0.7)
    for impl, dt in ((cepo_kernels, dtype), (cepo_ref, torch.float64)):
        for reduction in ("token-mean", "seq-mean-token-mean"):
            a, ga = run_loss(impl, ignored, dt, teachers, reduction=reduction)
            b, gb = run_loss(impl, masked, dt, teachers, reduction=reduction)
            torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
            torch.testing.assert_close(ga, gb, rtol=0, atol=0)
            torch.testing.assert_close(a.advantages, b.advantages, rtol=0, atol=0)
            torch.testing.assert_close(a.logp[~ign], b.logp[~ign], rtol=0, atol=0)
            assert bool((a.logp[ign] == 0).all()) and bool((ga[ign] == 0).all())
            assert a.metrics == b.metrics
            assert a.metrics["num_tokens"] == float((masked["mask"]).sum())


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_token_logprobs_ignore_index(dname):
    """A -100 target: logp 0 with no gradient, the entropy and its gradient as usual (kernel vs the float64
    reference under the house rule, and the reference gives the same 0)."""
    dtype = DTYPES[dname]
    case = make_case(3, 6, 507, dtype, seed=29)
    ign = _ignored((3, 6))
    targets = case["targets"].masked_fill(ign, -100)
    g = torch.Generator().manual_seed(30)
    g_lp, g_ent = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)

    def run(impl, dt):
        leaf = case["full"].detach().to(dt).requires_grad_()
        lp, ent = impl.token_logprobs(leaf, targets, temperature=0.8, return_entropy=True)
        (lp * g_lp.to(lp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
        return lp, ent, leaf.grad

    lp, ent, grad = run(cepo_kernels, dtype)
    lp64, ent64, grad64 = run(cepo_ref, torch.float64)
    lpt, entt, gradt = run(cepo_ref, dtype)
    assert bool((lp[ign] == 0).all()) and bool((lp64[ign] == 0).all())
    _, ent_valid = cepo_ref.token_logprobs(case["full"].double(), case["targets"], temperature=0.8,
                                           return_entropy=True)
    torch.testing.assert_close(ent64, ent_valid, rtol=0, atol=0)  # the entropy ignores the target
    assert_close(lp, lp64, lpt, atol=scaled_atol(lp64), name="logp")
    assert_close(ent, ent64, entt, atol=scaled_atol(ent64), name="entropy")
    assert_close(grad, grad64, gradt, atol=scaled_atol(grad64, 1e-5), name="dlogits")


@pytest.mark.parametrize("teachers", ["none", "logits"])
def test_masked_rows_are_not_read(teachers, device):
    """A masked row's logits (and an unused row's teacher logits) are never read: NaN there changes nothing,
    the loss and the gradient equal the clean run's bit for bit; logp is 0 at masked rows."""
    g = torch.Generator().manual_seed(3)
    B, T, V = 2, 6, 333
    x = torch.randn(B, T, V, generator=g).to(device)
    tg = torch.randint(0, V, (B, T), generator=g).to(device)
    adv = torch.tensor([0.7, -1.2], device=device)
    mask = (torch.rand(B, T, generator=g) > 0.4).to(device)
    old = (torch.randn(B, T, generator=g) * 0.1 - 5.0).to(device)
    kw = {}
    if teachers == "logits":
        kw = dict(pos_logits=torch.randn(B, T, V, generator=g).to(device),
                  neg_logits=torch.randn(B, T, V, generator=g).to(device))
    runs = []
    for poisoned in (False, True):
        xi = x.clone()
        ti = {k: v.clone() for k, v in kw.items()}
        if poisoned:
            xi[~mask] = float("nan")
            for v in ti.values():
                v[~mask] = float("nan")
        xi.requires_grad_()
        out = cepo_kernels.cepo_loss(xi, tg, adv, mask, old_logp=old, metrics=False, **ti)
        out.loss.backward()
        runs.append((out, xi.grad))
    (clean, g_clean), (bad, g_bad) = runs
    assert bool(torch.isfinite(bad.loss)) and bool(torch.isfinite(g_bad).all())
    torch.testing.assert_close(bad.loss, clean.loss, rtol=0, atol=0)
    torch.testing.assert_close(g_bad, g_clean, rtol=0, atol=0)
    torch.testing.assert_close(bad.advantages, clean.advantages, rtol=0, atol=0)
    assert bool((bad.logp[~mask] == 0).all()) and bool((g_bad[~mask] == 0).all())
    ref64, ref32 = (cepo_ref.cepo_loss(x.to(dt), tg, adv, mask, old_logp=old,
                                       **{k: v.to(dt) for k, v in kw.items()})
                    for dt in (torch.float64, torch.float32))
    assert_close(bad.logp[mask], ref64.logp[mask], ref32.logp[mask], atol=1e-6, name="logp")
    assert_close(bad.loss, ref64.loss, ref32.loss, atol=1e-6, name="loss")
