"""cepo_kernels.ops.linear (fused hidden @ lm_head) against cepo_ref, on CPU through Triton's interpreter.

Every output and gradient is compared with the float64 reference under the house rule
err(kernel) <= 2 * err(torch in the same dtype) + atol (tests/helpers.py).
"""

import pytest
import torch
from helpers import assert_close, err, poison

import cepo_kernels
import cepo_ref
from cepo_kernels.ops import _common
from cepo_kernels.ops.linear import (
    linear_cepo_loss,
    linear_grpo_loss,
    linear_logprobs,
    linear_teacher_logprobs,
)

H, V = 123, 507
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}
# the interpreter evaluates masked-out lanes too (0 * inf there is discarded by tl.where)
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy in the interpreter's masked lanes
              pytest.mark.usefixtures("kernel_backend")]  # native CPU kernels and interpreter (conftest)


@pytest.fixture(autouse=True)
def _poisoned_buffers(monkeypatch):
    """Every uninitialised buffer of the linear path starts as NaN, so an unwritten element fails."""
    monkeypatch.setattr(_common, "alloc", lambda shape, dtype, device: poison(shape, dtype, device))


def make_linear(lead, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=g).to(device, dtype)
    weight = (torch.randn(V, H, generator=g) * 0.15).to(device, dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(device, dtype) if bias else None
    targets = torch.randint(0, V, lead, generator=g).to(device)
    return hidden, weight, b, targets


def leaves(*xs, dtype=None):
    """Fresh leaf copies requiring grad (None stays None), optionally cast."""
    return [None if x is None else x.detach().to(dtype or x.dtype).requires_grad_() for x in xs]


def assert_agree(a, b, ref64, torch_same, atol, name):
    """Two kernel paths agree within twice torch's own error against the float64 reference (+ atol)."""
    e = err(a, b.double())
    e_torch = err(torch_same, ref64)
    assert e <= 2 * e_torch + atol, f"{name}: paths differ by {e:.3e} > 2 x torch's {e_torch:.3e} + {atol}"


def grads(xs):
    return [None if x is None else x.grad for x in xs]


def check_grads(kernel, ref64, same, dtype, names=("hidden", "weight", "bias")):
    for k, r, s, name in zip(kernel, ref64, same, names, strict=True):
        if r is None:
            continue
        assert k is not None and k.dtype == s.dtype, name
        assert_close(k, r, s, atol=ATOL[dtype], name=f"grad_{name}")



@pytest.mark.parametrize("dtype,bias,temperature,lead", [
    ("fp32", True, 0.7, (37,)),
    ("bf16", False, 1.0, (37,)),
    ("bf16", True, 1.3, (3, 13)),
    ("fp16", True, 1.0, (37,)),
], ids=["N37-V507-fp32-bias-T0.7", "N37-V507-bf16", "B3T13-V507-bf16-bias-T1.3", "N37-V507-fp16-bias"])
def test_linear_logprobs(dtype, bias, temperature, lead, device):
    dtype = DTYPES[dtype]
    h, w, b, t = make_linear(lead, dtype, device, bias)
    g = torch.Generator().manual_seed(1)
    g_lp, g_ent = (torch.randn(lead, generator=g).to(device) for _ in range(2))
    results = []
    for impl, cast in ((linear_logprobs, None), (cepo_ref.linear_logprobs, torch.float64),
                       (cepo_ref.linear_logprobs, None)):
        xs = leaves(h, w, b, dtype=cast)
        lp, ent = impl(xs[0], xs[1], t, bias=xs[2], temperature=temperature, return_entropy=True)
        ((lp.double() * g_lp).sum() + (ent.double() * g_ent).sum()).backward()
        results.append((lp, ent, grads(xs)))
    (lp, ent, gk), (lp64, ent64, g64), (lps, ents, gs) = results
    assert lp.dtype == torch.float32 and lp.shape == lead and ent.shape == lead
    assert_close(lp, lp64, lps, atol=1e-5, name="logp")
    assert_close(ent, ent64, ents, atol=1e-5, name="entropy")
    check_grads(gk, g64, gs, dtype)


@pytest.mark.parametrize("n,budget", [(37, 40_000), (260, 300_000)],
                         ids=["N37-2-vocab-chunks", "N260-3-row-chunks"])
def test_linear_bwd_chunks(n, budget, device, monkeypatch):
    """A small G budget: several vocabulary chunks (grad_hidden accumulated in fp32), or several row chunks
    (grad_weight accumulated in fp32); rows with a zero upstream gradient skipped, whole blocks too."""
    from cepo_kernels.ops._linear_launch import _chunks

    monkeypatch.setenv("CEPO_LINEAR_CHUNK_BYTES", str(budget))
    R, C = _chunks(n, V, 4, torch.device(device), width=32)
    assert (R < n) == (n > 128) and (C < V) == (n <= 128), (R, C)
    h, w, b, t = make_linear((n,), torch.float32, device, seed=4)
    g = torch.Generator().manual_seed(5)
    g_lp, g_ent = (torch.randn(n, generator=g) for _ in range(2))
    g_lp[torch.rand(n, generator=g) < 0.3] = 0.0
    g_lp[: min(n, 140)], g_ent[: min(n, 140)] = 0.0, 0.0  # a whole row block without gradient
    g_ent[torch.rand(n, generator=g) < 0.5] = 0.0
    g_lp, g_ent = g_lp.to(device), g_ent.to(device)
    results = []
    for impl, cast in ((linear_logprobs, None), (cepo_ref.linear_logprobs, torch.float64),
                       (cepo_ref.linear_logprobs, None)):
        xs = leaves(h, w, b, dtype=cast)
        lp, ent = impl(xs[0], xs[1], t, bias=xs[2], temperature=0.9, return_entropy=True)
        ((lp.double() * g_lp).sum() + (ent.double() * g_ent).sum()).backward()
        results.append(grads(xs))
    check_grads(*results, torch.float32)
    assert (results[0][0][(g_lp == 0) & (g_ent == 0)] == 0).all()


@pytest.mark.triton_only  # a tile-level approximation of the Triton backward; the native kernels are exact
def test_grad_filter_opt_in(device, monkeypatch):
    """CEPO_LINEAR_GRAD_FILTER=1 skips the G tiles with no target and every probability < 2^-12; what it
    drops is bounded by those probabilities (it is not exact, hence off by default; docs/memory.md)."""
    h, w, b, t = make_linear((37,), torch.float32, device, seed=6)
    t = t % 100  # every target in the first vocabulary tile
    b[128:] -= 10.0  # the other tiles: probabilities ~1e-6, below bf16 resolution
    g_lp = torch.randn(37, generator=torch.Generator().manual_seed(7)).to(device)
    runs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("CEPO_LINEAR_GRAD_FILTER", flag)
        xs = leaves(h, w, b)
        (linear_logprobs(xs[0], xs[1], t, bias=xs[2]) * g_lp).sum().backward()
        runs.append(grads(xs))
    (dh, dw, db), (dh_f, dw_f, db_f) = runs
    assert torch.equal(dw_f[:128], dw[:128]) and (dw_f[128:] == 0).all() and torch.equal(db_f, db)
    with torch.no_grad():  # the dropped part of G, from the float64 reference
        z = h.double() @ w.double().T + b.double()
        g_drop = -g_lp.double()[:, None] * torch.softmax(z, dim=-1)[:, 128:]
    bound_h = (g_drop.abs() @ w.double()[128:].abs()).max()
    bound_w = (g_drop.abs().T @ h.double().abs()).max()
    assert 0 < err(dh_f, dh.double()) <= 1.01 * bound_h + 1e-6
    assert 0 < err(dw_f, dw.double()) <= 1.01 * bound_w + 1e-6
    assert bound_h < 1e-3 and bound_w < 1e-3


def test_linear_logprobs_bad_target_is_nan(device):
    h, w, b, t = make_linear((20,), torch.float32, device)
    t[3], t[7] = V, -1
    lp = linear_logprobs(h, w, t, bias=b)
    assert torch.isnan(lp[3]) and lp[7] == 0.0  # >= V: NaN; negative: ignored (log-prob 0)
    ok = torch.ones(20, dtype=torch.bool)
    ok[[3, 7]] = False
    assert torch.isfinite(lp[ok]).all()


def test_linear_logprobs_nan_hidden_propagates(device):
    h, w, b, t = make_linear((9,), torch.float32, device)
    h[2, 5] = float("nan")
    lp = linear_logprobs(h, w, t, bias=b)
    assert torch.isnan(lp[2]) and torch.isfinite(lp[torch.arange(9) != 2]).all()



B, T = 4, 9


def loss_inputs(dtype, device, seed=0, bias=True):
    h, w, b, t = make_linear((B, T), dtype, device, bias, seed)
    g = torch.Generator().manual_seed(seed + 1)
    ph = torch.randn(B, T, H, generator=g).to(device, dtype)
    nh = torch.randn(B, T, H, generator=g).to(device, dtype)
    adv = torch.tensor([1.2, -0.8, 0.0, 0.6], device=device)  # one zero-advantage sequence
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[3] = False  # a fully masked sequence
    with torch.no_grad():
        lp = cepo_ref.linear_logprobs(h.double(), w.double(), t, bias=None if b is None else b.double())
    old = (lp + 0.25 * torch.randn(B, T, generator=g).to(device)).float()  # some tokens clipped
    return h, w, b, t, ph, nh, adv, mask, old


def run_loss(impl, h, w, b, cast=None, **kw):
    xs = leaves(h, w, b, dtype=cast)
    out = impl(xs[0], xs[1], bias=xs[2], **kw)
    (out.loss if out.loss.dim() == 0 else out.loss.sum()).backward()
    return out, grads(xs)


def compare_loss(dtype, h, w, b, kw, skip_metrics=()):
    ko, kg = run_loss(linear_cepo_loss, h, w, b, **kw)
    f64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k.endswith("hidden")
               else v) for k, v in kw.items()}
    ro, rg = run_loss(cepo_ref.linear_cepo_loss, h, w, b, cast=torch.float64, **f64)
    so, sg = run_loss(cepo_ref.linear_cepo_loss, h, w, b, **kw)
    atol = 1e-5
    assert_close(ko.loss, ro.loss, so.loss, atol=atol, name="loss")
    assert_close(ko.logp, ro.logp, so.logp, atol=atol, name="logp")
    assert_close(ko.advantages, ro.advantages, so.advantages, atol=atol, name="advantages")
    assert ko.logp.shape == ro.logp.shape and ko.advantages.shape == ro.advantages.shape
    check_grads(kg, rg, sg, dtype)
    for k, v in ro.metrics.items():
        if k not in skip_metrics:
            assert abs(ko.metrics[k] - v) <= 1e-3 + 2 * abs(so.metrics[k] - v) + 1e-3 * abs(v), k
    return ko, kg


@pytest.mark.parametrize("teachers", ["hidden", "logp", "rlsd"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_linear_cepo_loss(dtype, teachers, device):
    dtype = DTYPES[dtype]
    h, w, b, t, ph, nh, adv, mask, old = loss_inputs(dtype, device, bias=dtype == torch.float32)
    kw = dict(targets=t, advantages=adv, mask=mask, old_logp=old, lam=0.5, temperature=0.9)
    skip = ()
    if teachers == "logp":
        g = torch.Generator().manual_seed(5)
        kw.update(pos_logp=-3 * torch.rand(B, T, generator=g), neg_logp=-3 * torch.rand(B, T, generator=g))
    elif teachers == "hidden":
        kw.update(pos_hidden=ph, neg_hidden=nh)
        skip = ("delta_mean", "delta_std")  # Delta is not computed where A = 0 (those rows are not scored)
    else:  # RLSD: positive teacher as hidden states, negative = the old student log-probs
        kw.update(pos_hidden=ph, neg_logp=old)
        skip = ("delta_mean", "delta_std")
    compare_loss(dtype, h, w, b, kw, skip)


def test_teachers_as_hidden_or_logp_agree(device):
    """Teachers scored inside the loss, or first by linear_teacher_logprobs: both as close to the float64
    reference as torch's own fp32 error allows, and to each other (no bare tolerance)."""
    h, w, b, t, ph, nh, adv, mask, old = loss_inputs(torch.float32, device)
    base = dict(targets=t, advantages=adv, mask=mask, old_logp=old, temperature=1.1)
    o1, g1 = run_loss(linear_cepo_loss, h, w, b, pos_hidden=ph, neg_hidden=nh, **base)
    rows = mask & (adv != 0)[:, None]
    pos, neg = linear_teacher_logprobs(ph, nh, w, t, bias=b, temperature=1.1, rows=rows)
    o2, g2 = run_loss(linear_cepo_loss, h, w, b, pos_logp=pos, neg_logp=neg, **base)
    ro, rg = run_loss(cepo_ref.linear_cepo_loss, h, w, b, cast=torch.float64, pos_hidden=ph.double(),
                      neg_hidden=nh.double(), **base)
    so, sg = run_loss(cepo_ref.linear_cepo_loss, h, w, b, pos_hidden=ph, neg_hidden=nh, **base)
    for o, g in ((o1, g1), (o2, g2)):
        assert_close(o.loss, ro.loss, so.loss, atol=1e-6, name="loss")
        assert_close(o.advantages, ro.advantages, so.advantages, atol=1e-6, name="advantages")
        check_grads(g, rg, sg, torch.float32)
    assert_agree(o1.loss, o2.loss, ro.loss, so.loss, atol=1e-6, name="loss")
    assert_agree(o1.advantages, o2.advantages, ro.advantages, so.advantages, atol=1e-6, name="advantages")
    for a, c, r, x, name in zip(g1, g2, rg, sg, ("hidden", "weight", "bias"), strict=True):
        assert_agree(a, c, r, x, atol=1e-6, name=f"grad_{name}")


def test_teachers_not_scored_where_advantage_is_zero(device):
    """docs/method.md §4: NaN teacher states at A = 0 or masked rows change nothing."""
    h, w, b, t, ph, nh, adv, mask, old = loss_inputs(torch.float32, device)
    base = dict(targets=t, advantages=adv, mask=mask, old_logp=old)
    o1, g1 = run_loss(linear_cepo_loss, h, w, b, pos_hidden=ph, neg_hidden=nh, **base)
    ph2, nh2 = ph.clone(), nh.clone()
    skip = ~(mask & (adv != 0)[:, None])
    ph2[skip] = float("nan")
    nh2[skip] = float("nan")
    o2, g2 = run_loss(linear_cepo_loss, h, w, b, pos_hidden=ph2, neg_hidden=nh2, **base)
    assert torch.equal(o1.loss, o2.loss)
    for a, c in zip(g1, g2, strict=True):
        assert torch.equal(a, c)
    # rows with zero gradient (A = 0 or masked) have exactly zero grad_hidden
    assert (g1[0][skip] == 0).all()


def test_no_gradient_to_teachers(device):
    h, w, b, t, ph, nh, adv, mask, old = loss_inputs(torch.float32, device)
    ph, nh = ph.requires_grad_(), nh.requires_grad_()
    out = linear_cepo_loss(h.requires_grad_(), w, t, adv, mask, pos_hidden=ph, neg_hidden=nh)
    out.loss.backward()
    assert ph.grad is None and nh.grad is None and h.grad is not None


@pytest.mark.parametrize("reduction,num_tokens,clip_dual,on_policy", [
    ("token-mean", None, 3.0, False),
    ("token-mean", 50, None, True),
    ("seq-mean-token-mean", None, 3.0, False),
    ("seq-mean-token-sum-norm", None, 3.0, True),
    ("sum", None, 2.0, False),
    ("none", None, 3.0, False),
])
def test_linear_grpo_loss_reductions(reduction, num_tokens, clip_dual, on_policy, device):
    h, w, b, t, _, _, adv, mask, old = loss_inputs(torch.float32, device, seed=3)
    g = torch.Generator().manual_seed(4)
    kw = dict(targets=t, advantages=adv[:, None] * torch.rand(B, T, generator=g), mask=mask,
              old_logp=None if on_policy else old, clip_dual=clip_dual, reduction=reduction,
              num_tokens=num_tokens, _g=torch.randn(B, T, generator=g))
    outs = []
    for impl, cast in ((linear_grpo_loss, None), (cepo_ref.linear_grpo_loss, torch.float64),
                       (cepo_ref.linear_grpo_loss, None)):
        kw2 = {k: v for k, v in kw.items() if k != "_g"}
        xs = leaves(h, w, b, dtype=cast)
        out = impl(xs[0], xs[1], bias=xs[2], **kw2)
        (out.loss if reduction != "none" else (out.loss * kw["_g"]).sum()).backward()
        outs.append((out, grads(xs)))
    (ko, kg), (ro, rg), (so, sg) = outs
    assert ko.loss.shape == ro.loss.shape
    assert_close(ko.loss, ro.loss, so.loss, atol=1e-5, name="loss")
    check_grads(kg, rg, sg, torch.float32)


def test_flat_inputs(device):
    h, w, b, t, ph, nh, adv, mask, old = loss_inputs(torch.float32, device, seed=7)
    kw = dict(targets=t.reshape(-1), advantages=adv[:, None].expand(B, T).reshape(-1), mask=mask.reshape(-1),
              old_logp=old.reshape(-1), pos_hidden=ph.reshape(B * T, H), neg_hidden=nh.reshape(B * T, H),
              reduction="none")
    ko, _ = run_loss(linear_cepo_loss, h.reshape(B * T, H), w, b, **kw)
    so, _ = run_loss(cepo_ref.linear_cepo_loss, h.reshape(B * T, H), w, b, **kw)
    kw64 = dict(kw, pos_hidden=kw["pos_hidden"].double(), neg_hidden=kw["neg_hidden"].double())
    ro, _ = run_loss(cepo_ref.linear_cepo_loss, h.reshape(B * T, H), w, b, cast=torch.float64, **kw64)
    assert ko.loss.shape == (B * T,) and ko.logp.shape == (B * T,)
    assert_close(ko.loss, ro.loss, so.loss, atol=1e-6, name="loss")


def test_matches_cepo_loss_on_logits(device):
    """The fused path equals the logits kernel on materialised logits (teachers as logits there)."""
    from cepo_kernels.ops.logits import cepo_loss

    h, w, b, t, ph, nh, adv, mask, old = loss_inputs(torch.float32, device, seed=11)
    mask[2] = True  # dense valid rows with zero advantage: teachers scored everywhere they matter
    kw = dict(advantages=adv, mask=mask, old_logp=old, lam=0.3, eps_w=0.3, temperature=0.8)
    ko, kg = run_loss(linear_cepo_loss, h, w, b, targets=t, pos_hidden=ph, neg_hidden=nh, **kw)
    xs = leaves(h, w, b)
    logits = xs[0] @ xs[1].T + xs[2]
    with torch.no_grad():
        pl, nl = ph @ w.T + b, nh @ w.T + b
    lo = cepo_loss(logits, t, pos_logits=pl, neg_logits=nl, **kw)
    lo.loss.backward()
    ro, rg = run_loss(cepo_ref.linear_cepo_loss, h, w, b, cast=torch.float64, targets=t,
                      pos_hidden=ph.double(), neg_hidden=nh.double(), **kw)
    so, sg = run_loss(cepo_ref.linear_cepo_loss, h, w, b, targets=t, pos_hidden=ph, neg_hidden=nh, **kw)
    assert_agree(ko.loss, lo.loss, ro.loss, so.loss, atol=1e-6, name="loss")
    v = mask.bool()  # the logits path does not read masked rows (logp 0 there)
    assert_agree(ko.logp[v], lo.logp[v], ro.logp[v], so.logp[v], atol=1e-6, name="logp")
    assert_agree(ko.advantages, lo.advantages, ro.advantages, so.advantages, atol=1e-6, name="advantages")
    for a, c, r, x, name in zip(kg, grads(xs), rg, sg, ("hidden", "weight", "bias"), strict=True):
        assert_agree(a, c, r, x, atol=1e-6, name=f"grad_{name}")


def test_empty_and_fully_masked(device):
    h, w, b, t, ph, nh, adv, mask, old = loss_inputs(torch.float32, device)
    xs = leaves(h, w, b)
    out = linear_cepo_loss(xs[0], xs[1], t, adv, torch.zeros_like(mask), old_logp=old, bias=xs[2],
                           pos_hidden=ph, neg_hidden=nh)
    out.loss.backward()
    assert out.loss.item() == 0.0 and (out.advantages == 0).all()
    assert all((g == 0).all() for g in grads(xs))
    xs = leaves(h[:0], w, b)
    out = linear_cepo_loss(xs[0], xs[1], t[:0], adv[:0], mask[:0], bias=xs[2], pos_hidden=ph[:0],
                           neg_hidden=nh[:0])
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.logp.shape == (0, T)
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads(xs))
    assert linear_logprobs(h[:0], w, t[:0]).shape == (0, T)


def test_deterministic(device):
    h, w, b, t, ph, nh, adv, mask, old = loss_inputs(torch.float32, device, seed=2)
    runs = [run_loss(linear_grpo_loss, h, w, b, targets=t, advantages=adv, mask=mask, old_logp=old)
            for _ in range(2)]
    assert torch.equal(runs[0][0].loss, runs[1][0].loss)
    for a, c in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(a, c)



@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_linear_teacher_logprobs(dtype, device):
    dtype = DTYPES[dtype]
    h, w, b, t = make_linear((B, T), dtype, device)
    g = torch.Generator().manual_seed(9)
    nh = torch.randn(B, T, H, generator=g).to(device, dtype)
    rows = torch.rand(B, T, generator=g) > 0.5
    pos, neg = linear_teacher_logprobs(h, nh, w, t, bias=b, temperature=0.8, rows=rows)
    for got, x in ((pos, h), (neg, nh)):
        ref64 = cepo_ref.linear_logprobs(x.double(), w.double(), t, bias=b.double(), temperature=0.8)
        same = cepo_ref.linear_logprobs(x, w, t, bias=b, temperature=0.8)
        assert got.shape == (B, T) and got.dtype == torch.float32 and not got.requires_grad
        assert (got[~rows] == 0).all()
        assert_close(got[rows], ref64[rows], same[rows], atol=1e-5, name="teacher logp")
    idx = rows.reshape(-1).nonzero().squeeze(1)
    pos2, none = linear_teacher_logprobs(h, None, w, t, bias=b, temperature=0.8, rows=idx)
    full, _ = linear_teacher_logprobs(h, nh, w, t, bias=b, temperature=0.8)
    assert none is None and (pos2[~rows] == 0).all() and (full != 0).all()
    ref64 = cepo_ref.linear_logprobs(h.double(), w.double(), t, bias=b.double(), temperature=0.8)
    same = cepo_ref.linear_logprobs(h, w, t, bias=b, temperature=0.8)
    assert_close(pos2[rows], ref64[rows], same[rows], atol=1e-5, name="teacher logp (index rows)")
    assert_close(full, ref64, same, atol=1e-5, name="teacher logp (all rows)")



def test_bad_input(device):
    h, w, b, t, ph, nh, adv, mask, old = loss_inputs(torch.float32, device)
    with pytest.raises(TypeError, match="hidden and weight"):
        linear_logprobs(h, w.half(), t)
    with pytest.raises(ValueError, match="hidden"):
        linear_logprobs(h[..., :-1], w, t)
    with pytest.raises(TypeError, match="targets"):
        linear_logprobs(h, w, t.float())
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="bias"):
        linear_logprobs(h, w, t, bias=b[:-1])
    with pytest.raises(ValueError, match="lam"):
        linear_cepo_loss(h, w, t, adv, mask, lam=1.5)
    with pytest.raises(ValueError, match="reduction"):
        linear_cepo_loss(h, w, t, adv, mask, reduction="mean")
    with pytest.raises(ValueError, match="teachers"):
        linear_cepo_loss(h, w, t, adv, mask, pos_hidden=ph)
    with pytest.raises(ValueError, match="pos_hidden"):
        linear_cepo_loss(h, w, t, adv, mask, pos_hidden=ph[:, :-1], neg_hidden=nh)
    with pytest.raises(ValueError, match="advantages"):
        linear_cepo_loss(h, w, t, adv[:-1], mask)
    with pytest.raises(ValueError, match="mask"):
        linear_cepo_loss(h, w, t, adv, mask.float() * 2)
    with pytest.raises(ValueError, match="pos_hidden and neg_hidden"):
        linear_teacher_logprobs(None, None, w, t)
    with pytest.raises(TypeError, match="rows"):
        linear_teacher_logprobs(ph, nh, w, t, rows=torch.ones(3))
    with pytest.raises(ValueError, match="rows"):
        linear_teacher_logprobs(ph, nh, w, t, rows=torch.tensor([B * T]))



@pytest.mark.gpu
def test_realistic_shape_sampled_rows():
    """Qwen3-4B head (H=2560, V=151936) in bf16; N*V > 2**31 exercises int64 addressing.

    The upstream gradient is non-zero on 64 sampled rows only, so the float64 reference (and torch's bf16
    error) can be computed on those rows alone while the kernels run on all of them.
    """
    torch.manual_seed(0)
    N, Hr, Vr = 16384, 2560, 151936
    dev, dt = "cuda", torch.bfloat16
    h = torch.randn(N, Hr, device=dev, dtype=dt)
    w = (torch.randn(Vr, Hr, device=dev) * 0.02).to(dt)
    t = torch.randint(0, Vr, (N,), device=dev)
    rows = torch.randperm(N, device=dev)[:64]
    rows[0] = N - 1  # the last row: the largest offsets
    g = torch.zeros(N, device=dev)
    g[rows] = torch.randn(64, device=dev)
    hk, wk = leaves(h, w)
    lp = linear_logprobs(hk, wk, t)
    (lp * g).sum().backward()
    res = []
    for cast in (torch.float64, None):
        hs, ws = leaves(h[rows], w, dtype=cast)
        lps = cepo_ref.linear_logprobs(hs, ws, t[rows])
        (lps.double() * g[rows]).sum().backward()
        res.append((lps, hs.grad, ws.grad))
    (l64, gh64, gw64), (ls, ghs, gws) = res
    assert_close(lp[rows], l64, ls, atol=1e-4, name="logp")
    assert_close(hk.grad[rows], gh64, ghs, atol=1e-3, name="grad_hidden")
    assert_close(wk.grad, gw64, gws, atol=1e-3, name="grad_weight")
    others = torch.ones(N, dtype=torch.bool, device=dev)
    others[rows] = False
    assert (hk.grad[others] == 0).all()
    del hk, wk, res
    # the loss with both teachers at N = 4096, half the sequences at zero advantage
    Bq, Tq = 2, 2048
    hq, tq = h[: Bq * Tq].reshape(Bq, Tq, Hr), t[: Bq * Tq].reshape(Bq, Tq)
    ph, nh = torch.randn_like(hq), torch.randn_like(hq)
    adv = torch.tensor([1.0, 0.0], device=dev)
    mask = torch.ones(Bq, Tq, dtype=torch.bool, device=dev)
    hk, wk = leaves(hq, w)
    out = linear_cepo_loss(hk, wk, tq, adv, mask, pos_hidden=ph, neg_hidden=nh)
    out.loss.backward()
    sel = torch.arange(0, Tq, 37, device=dev)
    with torch.no_grad():
        for x, lp_k in ((hq, out.logp),):
            ref = cepo_ref.linear_logprobs(x[0, sel].double(), w.double(), tq[0, sel])
            same = cepo_ref.linear_logprobs(x[0, sel], w, tq[0, sel])
            assert_close(lp_k[0, sel], ref, same, atol=1e-4, name="policy logp")
    assert torch.isfinite(out.loss) and (hk.grad[1] == 0).all() and torch.isfinite(wk.grad).all()


@pytest.mark.triton_only  # the native CPU kernels read row counts on the host (free there) to skip rows
@pytest.mark.parametrize("fn", ["linear_cepo_loss", "linear_grpo_loss"])
def test_linear_loss_without_host_syncs(fn, device):
    """metrics="tensor", a bool mask and num_tokens as a tensor: forward and backward never read a tensor on
    the host (what CUDA graph capture needs), and the metrics equal the default floats."""
    hidden, weight, bias, targets = make_linear((2, 5), torch.float32, device, seed=41)
    g = torch.Generator().manual_seed(42)
    adv = torch.tensor([0.7, -0.7], device=device)
    mask = torch.ones(2, 5, dtype=torch.bool, device=device)
    mask[1, 3:] = False
    kw = dict(bias=bias, old_logp=-torch.rand(2, 5, generator=g).to(device) - 5.0,
              num_tokens=torch.tensor(8.0, device=device))
    if fn == "linear_cepo_loss":
        kw.update(pos_hidden=torch.randn(2, 5, H, generator=g).to(device), neg_logp=kw["old_logp"])
    h, w = leaves(hidden, weight)
    with pytest.MonkeyPatch.context() as mp:
        def refuse(self, *args, **kwargs):
            raise AssertionError("host sync: a tensor was read on the host")

        for name in ("item", "tolist", "nonzero", "__bool__", "__float__", "__int__"):
            mp.setattr(torch.Tensor, name, refuse)
        out = getattr(cepo_kernels, fn)(h, w, targets, adv, mask, metrics="tensor", **kw)
        out.loss.backward()
    floats = getattr(cepo_kernels, fn)(hidden, weight, targets, adv, mask, **kw).metrics
    assert set(out.metrics) == set(floats)
    for k, v in out.metrics.items():
        assert v.dim() == 0 and float(v) == floats[k], k
    assert getattr(cepo_kernels, fn)(hidden, weight, targets, adv, mask, metrics=False, **kw).metrics == {}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_ignore_index_equals_masking(dtype, device):
    """Hugging Face's -100 targets count as masked: linear_cepo_loss gives the loss, gradients, outputs and
    metrics of mask=False there (and matches the float64 reference under the house rule); linear_logprobs
    gives them logp 0 with no gradient."""
    dtype = DTYPES[dtype]
    h, w, b, t, ph, nh, adv, mask, old = loss_inputs(dtype, device, bias=dtype == torch.float32)
    ign = torch.zeros(B, T, dtype=torch.bool, device=device)
    ign[0, 1] = ign[0, 5] = ign[1, 2] = ign[2, 0] = True
    mask[ign] = True
    t_ign = t.masked_fill(ign, -100)
    kw = dict(advantages=adv, old_logp=old, pos_hidden=ph, neg_hidden=nh)
    compare_loss(dtype, h, w, b, dict(targets=t_ign, mask=mask, **kw))
    for fn in (linear_cepo_loss, cepo_ref.linear_cepo_loss):
        cast = torch.float64 if fn is cepo_ref.linear_cepo_loss else None
        kw_fn = dict(kw, pos_hidden=ph.to(cast or dtype), neg_hidden=nh.to(cast or dtype))
        a, ga = run_loss(fn, h, w, b, cast=cast, targets=t_ign, mask=mask, **kw_fn)
        r, gr = run_loss(fn, h, w, b, cast=cast, targets=t, mask=mask & ~ign, **kw_fn)
        torch.testing.assert_close(a.loss, r.loss, rtol=0, atol=0)
        for x, y in zip(ga, gr, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        torch.testing.assert_close(a.advantages, r.advantages, rtol=0, atol=0)
        torch.testing.assert_close(a.logp[~ign], r.logp[~ign], rtol=0, atol=0)
        assert bool((a.logp[ign] == 0).all())
        assert a.metrics == r.metrics and a.metrics["num_tokens"] == float((mask & ~ign).sum())
    g = torch.Generator().manual_seed(3)
    g_lp, g_ent = (torch.randn(B, T, generator=g).to(device) for _ in range(2))
    outs = []
    for impl, cast in ((linear_logprobs, None), (cepo_ref.linear_logprobs, torch.float64),
                       (cepo_ref.linear_logprobs, None)):
        xs = leaves(h, w, b, dtype=cast)
        lp, ent = impl(xs[0], xs[1], t_ign, bias=xs[2], return_entropy=True)
        ((lp.double() * g_lp).sum() + (ent.double() * g_ent).sum()).backward()
        assert bool((lp[ign] == 0).all())
        outs.append((lp, ent, grads(xs)))
    (lp, ent, kg), (lp64, ent64, rg), (lpt, entt, sg) = outs
    assert_close(lp, lp64, lpt, atol=ATOL[dtype], name="logp")
    assert_close(ent, ent64, entt, atol=ATOL[dtype], name="entropy")
    check_grads(kg, rg, sg, dtype)
