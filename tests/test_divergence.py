"""The self-distillation divergences (cepo_kernels.ops.divergence) against cepo_ref.

Tolerance (tests/helpers.assert_close): err(kernel, float64 reference) <= 2 * err(cepo_ref in the same dtype,
float64 reference) + atol. On a CPU every case runs both CPU kernels: "native" (chunked eager torch, the
operators' default there) and "interpreter" (CEPO_KERNELS_CPU=interpreter: the Triton kernels under
TRITON_INTERPRET=1, set by tests/conftest.py); top-k runs chunked torch on every device. On a GPU: the Triton
kernels. Shapes stay small for the interpreter.
"""

import math

import pytest
import torch
from conftest import ON_GPU
from helpers import assert_close, poison

import cepo_kernels
import cepo_ref
from cepo_kernels.ops import _common
from cepo_kernels.ops import _divergence_launch as launch
from cepo_kernels.ops import _divergence_torch as native

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: 0 * -inf

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ["gpu"] if ON_GPU else ["native", "interpreter"]
LOG_RATIOS = torch.tensor([-1.0, -0.3, 0.1, 0.5, 0.9, 1.5])  # importance weights on both sides of is_clip 2


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(_common, "alloc", lambda shape, dtype, device: poison(shape, dtype, device))


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "interpreter":
        monkeypatch.setenv("CEPO_KERNELS_CPU", "interpreter")
    else:
        monkeypatch.delenv("CEPO_KERNELS_CPU", raising=False)
    return request.param


def distinct_top(x, k, g):
    """x [..., V] with k distinct largest entries (exact in bf16): the same top-k ids in every dtype."""
    V = x.shape[-1]
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(x[..., 0].numel())])
    vals = 4.0 + 0.125 * torch.arange(k, dtype=x.dtype)
    flat = x.reshape(-1, V).clamp(max=3.5)
    flat.scatter_(-1, ids, vals.expand(flat.shape[0], k).contiguous())
    return flat.reshape(x.shape)


def make_case(B, T, V, seed, *, H=None, topk=None, topk_from="student", sliced=False, temperature=1.0):
    """Student/teacher logits (or hidden states + weight) in fp64, a fully masked sequence, a -100 target
    and old log-probs placing SDPO's importance weights on both sides of the clip."""
    g = torch.Generator().manual_seed(seed)
    if H is None:
        x = torch.randn(B, T + int(sliced), V, generator=g, dtype=torch.float64) * 1.5
        y = x[:, :T] + torch.randn(B, T, V, generator=g, dtype=torch.float64)
        if topk:
            src = x if topk_from == "student" else y
            src.copy_(distinct_top(src, topk, g))
        case = dict(x=x, y=y)
        logits = x[:, :T]
    else:
        w = torch.randn(V, H, generator=g, dtype=torch.float64) / math.sqrt(H) * 2
        case = dict(h=torch.randn(B, T, H, generator=g, dtype=torch.float64), w=w,
                    th=torch.randn(B, T, H, generator=g, dtype=torch.float64),
                    b=0.3 * torch.randn(V, generator=g, dtype=torch.float64))
        logits = case["h"] @ w.T + case["b"]
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 0] = -100
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[-1] = False
    mask[0, 1:] = True
    lp64 = torch.log_softmax(logits / temperature, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    log_r = LOG_RATIOS[torch.arange(B * T) % len(LOG_RATIOS)].reshape(B, T)
    case.update(targets=targets, mask=mask, old=(lp64 - log_r).float(), sliced=sliced, T=T)
    return case


def run(impl, case, dtype, upstream=None, **kw):
    """(output, grads) of impl's loss on the case's inputs cast to dtype."""
    extra = {}
    if kw.pop("sdpo", False):
        old = case["old"].to(torch.promote_types(dtype, torch.float32))
        extra = dict(targets=case["targets"], old_logp=old, is_clip=2.0)
    if "x" in case:
        leaf = case["x"].detach().to(dtype).clone().requires_grad_()
        out = impl.divergence_loss(leaf[:, :case["T"]], case["y"].to(dtype), case["mask"], **extra, **kw)
        leaves = [leaf]
    else:
        leaves = [case[k].detach().to(dtype).clone().requires_grad_() for k in ("h", "w", "b")]
        if "tw" in case:
            extra.update(teacher_weight=case["tw"].to(dtype), teacher_bias=None)
        out = impl.linear_divergence_loss(leaves[0], case["th"].to(dtype), leaves[1], case["mask"],
                                          bias=leaves[2], **extra, **kw)
    loss = out.loss if upstream is None else (out.loss * upstream).sum()
    loss.backward()
    grads = [lf.grad for lf in leaves]
    if case.get("sliced"):
        grads[0] = grads[0][:, :case["T"]]
    return out, grads


def compare(case, dtype, **kw):
    B, T = case["mask"].shape
    upstream = torch.randn(B, T) if kw.get("reduction") == "none" else None
    out, grads = run(cepo_kernels, case, dtype, upstream, **kw)
    ref64, grads64 = run(cepo_ref, case, torch.float64, upstream, **kw)
    ref_t, grads_t = run(cepo_ref, case, dtype, upstream, **kw)
    assert out.per_token.dtype == torch.float32 and out.per_token.shape == (B, T)
    for name in ("loss", "per_token"):
        r64 = getattr(ref64, name).detach().double()
        assert_close(getattr(out, name), r64, getattr(ref_t, name),
                     atol=1e-6 * max(1.0, float(r64.abs().max())), name=name)
    for i, (a, r64, rt) in enumerate(zip(grads, grads64, grads_t, strict=True)):
        assert a.dtype == dtype
        assert_close(a, r64, rt, atol=1e-5 * max(1.0, float(r64.abs().max())), name=f"grad{i}")
    assert out.metrics["is_clip_frac"] == pytest.approx(ref64.metrics["is_clip_frac"])
    for k, r64 in ref64.metrics.items():
        assert_close(torch.tensor(out.metrics[k]), torch.tensor(r64), torch.tensor(ref_t.metrics[k]),
                     atol=1e-5 * max(1.0, abs(r64)), name=k)
    return out, grads


REDUCTIONS = ("token-mean", "seq-mean-token-mean", "none", "sum", "seq-mean-token-sum-norm")
FULL_CASES = []
for i, (beta, dname) in enumerate([(b, d) for b in (0.0, 0.3, 0.5, 1.0) for d in DTYPES]):
    V = (507, 1000)[i % 2]
    opts = dict(beta=beta, reduction=REDUCTIONS[i % 5], temperature=(1.0, 0.7, 1.3)[i % 3], sdpo=i % 2 == 0)
    tid = (f"N12-V{V}-{dname}-b{beta}-{opts['reduction']}-T{opts['temperature']}"
           f"{'-sdpo' if opts['sdpo'] else ''}")
    FULL_CASES.append(pytest.param(V, dname, i % 3 == 0, opts, id=tid))


@pytest.mark.parametrize("V, dname, sliced, opts", FULL_CASES)
def test_divergence_full_vocab(backend, V, dname, sliced, opts):
    case = make_case(3, 4, V, seed=V + len(dname), sliced=sliced, temperature=opts["temperature"])
    out, _ = compare(case, DTYPES[dname], **opts)
    assert bool((out.per_token[~case["mask"]] == 0).all())


TOPK_CASES = []
for i, (src, tail) in enumerate([(s, t) for s in ("student", "teacher") for t in (True, False)]):
    for j, dname in enumerate(DTYPES):
        beta = (0.0, 0.5, 1.0, 0.3)[(i + j) % 4]
        tid = f"V507-k7-{src}-{'tail' if tail else 'renorm'}-{dname}-b{beta}"
        TOPK_CASES.append(pytest.param(src, tail, dname, beta, id=tid))


@pytest.mark.parametrize("src, tail, dname, beta", TOPK_CASES)
def test_divergence_topk(src, tail, dname, beta):
    case = make_case(2, 5, 507, seed=11 + len(src), topk=7, topk_from=src)
    compare(case, DTYPES[dname], beta=beta, topk=7, topk_from=src, add_tail=tail, sdpo=beta == 0.5)


LINEAR_CASES = [
    pytest.param(dname, beta, topk, id=f"N8-V507-H123-{dname}-b{beta}{'-k7' if topk else ''}")
    for dname, beta, topk in [("fp32", 0.5, None), ("bf16", 0.0, None), ("fp16", 1.0, None),
                              ("fp32", 0.3, 7), ("bf16", 0.5, 7)]
]


@pytest.mark.parametrize("dname, beta, topk", LINEAR_CASES)
def test_linear_divergence(backend, dname, beta, topk):
    if topk and backend == "interpreter":
        pytest.skip("top-k runs chunked torch on every backend (covered by the native run)")
    case = make_case(2, 4, 507, seed=5, H=123)
    if beta == 0.3:  # the teacher's own head (an EMA teacher), without a bias
        case["tw"] = case["w"] + 0.05 * torch.randn(case["w"].shape, dtype=torch.float64)
    compare(case, DTYPES[dname], beta=beta, topk=topk, sdpo=beta == 0.5, reduction="seq-mean-token-mean")


def test_linear_divergence_chunks(monkeypatch):
    """Several row chunks (forced small) give the one-chunk result."""
    case = make_case(2, 5, 507, seed=9, H=123)
    one, g_one = run(cepo_kernels, case, torch.float32, beta=0.3)
    monkeypatch.setattr(launch, "_linear_rows", lambda V, dtype, device: 3)
    many, g_many = run(cepo_kernels, case, torch.float32, beta=0.3)
    torch.testing.assert_close(many.per_token, one.per_token)
    for a, b in zip(g_many, g_one, strict=True):
        torch.testing.assert_close(a, b)


def test_launchers_match_native():
    """The Triton launchers (interpreter on a CPU) against the chunked torch implementation, directly."""
    case = make_case(2, 3, 1000, seed=3, sliced=True)
    x, y = case["x"][:, :3].float(), case["y"].float()
    m = case["mask"].reshape(-1).to(torch.uint8)
    tg = case["targets"].reshape(-1)
    for beta in (0.0, 0.5, 1.0):
        p = cepo_kernels.DivergenceParams(beta=beta, temperature=0.8)
        got = launch.divergence_fwd(x, y, tg, m, p)
        want = native.torch_fwd(x, y, tg, m, p)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
        grad = torch.randn(6)
        torch.testing.assert_close(launch.divergence_bwd(x, y, m, got[2], grad, p),
                                   native.torch_bwd(x, y, m, want[2], grad, p), atol=1e-7, rtol=1e-5)


def test_empty_and_fully_masked(backend):
    """No tokens, or every token masked (with NaN logits there, which are never read): zero loss and zero
    gradient, not NaN."""
    for B, T in ((0, 4), (2, 3)):
        x = torch.full((B, T, 507), float("nan")).requires_grad_()
        out = cepo_kernels.divergence_loss(x, torch.randn(B, T, 507), torch.zeros(B, T, dtype=torch.bool))
        out.loss.backward()
        assert float(out.loss) == 0.0 and out.per_token.shape == (B, T)
        assert bool((x.grad == 0).all())
        h = torch.randn(B, T, 16, requires_grad=True)
        w = torch.randn(507, 16, requires_grad=True)
        out = cepo_kernels.linear_divergence_loss(h, torch.randn(B, T, 16), w, torch.zeros(B, T), topk=5)
        out.loss.backward()
        assert float(out.loss) == 0.0 and bool((h.grad == 0).all()) and bool((w.grad == 0).all())


def test_nan_is_not_swallowed(backend):
    x = torch.randn(2, 3, 507)
    x[0, 1, 7] = float("nan")
    for topk in (None, 5):
        out = cepo_kernels.divergence_loss(x, torch.randn(2, 3, 507), torch.ones(2, 3), topk=topk)
        assert math.isnan(float(out.loss))


@pytest.mark.parametrize("reduction", ["sum", "token-mean", "seq-mean-token-mean", "none"])
def test_sampled_token_kl_loss(reduction):
    """L_t = sg(lp - lp_T) * lp at the sampled token against cepo_ref in fp64 (the house rule: no worse than
    twice cepo_ref's own error in fp32), loss, per-token estimate and the gradient through the log-probs."""
    g = torch.Generator().manual_seed(4)
    x64, y64 = torch.randn(2, 5, 300, generator=g, dtype=torch.float64), torch.randn(2, 5, 300, generator=g)
    tg = torch.randint(0, 300, (2, 5), generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.3
    lp_t64 = cepo_ref.token_logprobs(y64.double(), tg)
    runs = {}
    for name, lib, dt in (("kernel", cepo_kernels, torch.float32), ("ref64", cepo_ref, torch.float64),
                          ("ref32", cepo_ref, torch.float32)):
        x = x64.detach().to(dt).clone().requires_grad_()
        # the same log-probs into both (token_logprobs itself is tested in test_logits.py)
        lp = cepo_ref.token_logprobs(x, tg)
        out = lib.sampled_token_kl_loss(lp, lp_t64.to(dt), mask, reduction=reduction)
        out.loss.sum().backward()
        runs[name] = (out, x.grad)
    (k, gk), (r64, g64), (r32, g32) = runs["kernel"], runs["ref64"], runs["ref32"]
    assert_close(k.loss, r64.loss, r32.loss, name="loss")
    assert_close(k.per_token, r64.per_token.double(), r32.per_token, name="per_token")
    assert_close(gk, g64, g32, name="grad")
    assert k.metrics["num_tokens"] == r64.metrics["num_tokens"] == float(mask.sum())



@pytest.mark.parametrize("is_clip", [0.9, 2.0])
def test_sampled_token_kl_loss_is_weight(is_clip):
    """SDPO's importance weight min(exp(sg(lp - old)), is_clip) on the sampled-token surrogate, on both sides
    of the clip, against cepo_ref in fp64 (house rule): loss, gradient and the weight's metrics."""
    g = torch.Generator().manual_seed(5)
    x64 = torch.randn(3, 6, 200, generator=g, dtype=torch.float64)
    tg = torch.randint(0, 200, (3, 6), generator=g)
    mask = torch.rand(3, 6, generator=g) > 0.2
    lp_t64 = cepo_ref.token_logprobs(torch.randn(3, 6, 200, generator=g, dtype=torch.float64), tg)
    old64 = cepo_ref.token_logprobs(x64, tg) + torch.randn(3, 6, generator=g, dtype=torch.float64)
    runs = {}
    for name, lib, dt in (("kernel", cepo_kernels, torch.float32), ("ref64", cepo_ref, torch.float64),
                          ("ref32", cepo_ref, torch.float32)):
        x = x64.detach().to(dt).clone().requires_grad_()
        out = lib.sampled_token_kl_loss(cepo_ref.token_logprobs(x, tg), lp_t64.to(dt), mask,
                                        old_logp=old64.to(dt), is_clip=is_clip)
        out.loss.backward()
        runs[name] = (out, x.grad)
    (k, gk), (r64, g64), (r32, g32) = runs["kernel"], runs["ref64"], runs["ref32"]
    assert_close(k.loss, r64.loss, r32.loss, name="loss")
    assert_close(gk, g64, g32, name="grad")
    w64 = torch.exp(cepo_ref.token_logprobs(x64, tg) - old64).clamp(max=is_clip)[mask]
    assert 0.0 < float((w64 >= is_clip).double().mean()) < 1.0  # both sides of the clip
    for key in ("is_weight_mean", "is_clip_frac"):
        assert_close(torch.tensor(k.metrics[key]), torch.tensor(r64.metrics[key]),
                     torch.tensor(r32.metrics[key]), name=key)
    with pytest.raises(ValueError, match="old_logp and is_clip"):
        cepo_kernels.sampled_token_kl_loss(gk[..., 0], gk[..., 0], mask, is_clip=2.0)

def test_opcheck():
    """Fake implementations, schemas and registered autograd of the operators (torch.library.opcheck)."""
    x, y = torch.randn(2, 3, 50, requires_grad=True), torch.randn(2, 3, 50)
    m = torch.ones(6, dtype=torch.uint8)
    torch.library.opcheck(torch.ops.cepo_kernels.divergence_fwd.default,
                          (x, y, None, m, 1.0, 0.5, 0, "student", True))
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.cepo_kernels.linear_divergence_fwd.default,
                          (h, torch.randn(6, 8), w, None, None, None, None, m, 1.0, 0.3, 3, "teacher", False))
    torch.library.opcheck(torch.ops.cepo_kernels.linear_divergence_fwd.default,
                          (h, torch.randn(6, 8), w, torch.randn(50, requires_grad=True), torch.randn(50, 8),
                           None, None, m, 0.9, 0.0, 0, "student", True))


BAD = [
    (dict(beta=1.5), ValueError, "beta"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(topk=0), ValueError, "topk"),
    (dict(topk=600), ValueError, "topk"),
    (dict(topk=2.5), TypeError, "topk"),
    (dict(topk_from="both"), ValueError, "topk_from"),
    (dict(add_tail="yes"), TypeError, "add_tail"),
    (dict(is_clip=2.0), ValueError, "old_logp and is_clip"),
    (dict(old_logp=torch.zeros(2, 3), is_clip=2.0), ValueError, "targets"),
    (dict(is_clip=-1.0, old_logp=torch.zeros(2, 3), targets=torch.zeros(2, 3, dtype=torch.long)), ValueError,
     "is_clip"),
    (dict(targets=torch.zeros(2, 3)), TypeError, "targets"),
    (dict(reduction="mean"), ValueError, "reduction"),
    (dict(reduction="sum", num_tokens=4), ValueError, "num_tokens"),
]


@pytest.mark.parametrize("kw, exc, name", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_input(kw, exc, name):
    x, y, m = torch.randn(2, 3, 507), torch.randn(2, 3, 507), torch.ones(2, 3, dtype=torch.bool)
    for impl in (cepo_kernels, cepo_ref):
        with pytest.raises(exc, match=name):
            impl.divergence_loss(x, y, m, **kw)


def test_bad_tensors():
    x, m = torch.randn(2, 3, 50), torch.ones(2, 3)
    with pytest.raises(ValueError, match="teacher_logits"):
        cepo_kernels.divergence_loss(x, torch.randn(2, 3, 49), m)
    with pytest.raises(TypeError, match="logits"):
        cepo_kernels.divergence_loss(x.double(), x.double(), m)
    with pytest.raises(ValueError, match="mask"):
        cepo_kernels.divergence_loss(x, x, m * 2)
    with pytest.raises(ValueError, match="mask"):
        cepo_kernels.divergence_loss(x, x, torch.ones(2, 4))
    h, w = torch.randn(2, 3, 8), torch.randn(50, 8)
    with pytest.raises(TypeError, match="hidden and weight"):
        cepo_kernels.linear_divergence_loss(h.half(), h.half(), w, m)
    with pytest.raises(ValueError, match="teacher_hidden"):
        cepo_kernels.linear_divergence_loss(h, torch.randn(2, 3, 7), w, m)
    with pytest.raises(ValueError, match="teacher_bias"):
        cepo_kernels.linear_divergence_loss(h, h, w, m, teacher_bias=torch.zeros(50))
    with pytest.raises(ValueError, match="teacher_weight"):
        cepo_kernels.linear_divergence_loss(h, h, w, m, teacher_weight=torch.zeros(49, 8))
    with pytest.raises(ValueError, match="teacher_logp"):
        cepo_kernels.sampled_token_kl_loss(torch.randn(2, 3), torch.randn(3, 2), m)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_vocabulary_masking(backend, beta):
    """-inf logits at the same non-target entries of both (vocabulary masking) are valid: D as the reference,
    a finite gradient, zero at those entries."""
    case = make_case(2, 3, 507, seed=21)
    x, y = case["x"][:, :3].clone(), case["y"].clone()
    x[..., 100:140] = float("-inf")
    y[..., 100:140] = float("-inf")
    for topk in (None, 6):
        xx = x.float().requires_grad_()
        out = cepo_kernels.divergence_loss(xx, y.float(), case["mask"], beta=beta, topk=topk)
        ref = cepo_ref.divergence_loss(x, y, case["mask"], beta=beta, topk=topk)
        torch.testing.assert_close(out.per_token.double(), ref.per_token.double(), atol=1e-5, rtol=1e-5)
        out.loss.backward()
        assert bool(torch.isfinite(xx.grad).all()) and bool((xx.grad[..., 100:140] == 0).all())


@pytest.mark.gpu
def test_large_rows_int64():
    """N * V > 2**31 elements: int64 addressing in both kernels (the last rows against the reference)."""
    B, T, V = 8, 2048, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, V, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    y = torch.randn(B, T, V, device="cuda", dtype=torch.bfloat16, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    out = cepo_kernels.divergence_loss(x, y, mask, reduction="sum")
    out.loss.backward()
    ref = cepo_ref.divergence_loss(x[-1, -4:].detach().double(), y[-1, -4:].double(), mask[-1, -4:],
                                   reduction="none")
    torch.testing.assert_close(out.per_token[-1, -4:].double(), ref.per_token.double(), atol=1e-4, rtol=1e-4)
    xr = x[-1, -4:].detach().double().requires_grad_()
    cepo_ref.divergence_loss(xr, y[-1, -4:].double(), mask[-1, -4:], reduction="sum").loss.backward()
    torch.testing.assert_close(x.grad[-1, -4:].double(), xr.grad, atol=2e-3, rtol=2e-2)


def test_flat_inputs_and_tensor_metrics(backend):
    """[N, V] inputs give the [B, T, V] results flattened; metrics="tensor" gives the same values as 0-dim
    tensors; num_tokens as a tensor is used as given."""
    case = make_case(2, 3, 507, seed=2)
    x, y, m = case["x"][:, :3].float(), case["y"].float(), case["mask"]
    full = cepo_kernels.divergence_loss(x, y, m, beta=0.3, reduction="none")
    flat = cepo_kernels.divergence_loss(x.reshape(6, -1), y.reshape(6, -1), m.reshape(6), beta=0.3,
                                        reduction="none", metrics="tensor")
    assert flat.loss.shape == flat.per_token.shape == (6,)
    torch.testing.assert_close(flat.per_token, full.per_token.reshape(6))
    for k, v in full.metrics.items():
        assert isinstance(flat.metrics[k], torch.Tensor) and flat.metrics[k].dim() == 0
        assert float(flat.metrics[k]) == pytest.approx(v, rel=1e-6)
    mean = cepo_kernels.divergence_loss(x, y, m, beta=0.3, num_tokens=torch.tensor(10.0)).loss
    torch.testing.assert_close(mean, full.per_token.sum() / 10)


def test_reference_without_metrics_reads_nothing_back():
    """cepo_ref.divergence_loss(metrics=False): the same loss, no metrics, and no value read back (so it
    runs under fake tensors, as bench/memory_fake_distill.py traces it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = torch.Generator().manual_seed(0)
    z, zt = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    mask, tgt = torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.long)
    kw = dict(topk=4, targets=tgt, old_logp=torch.zeros(2, 3), is_clip=2.0)
    off = cepo_ref.divergence_loss(z, zt, mask, metrics=False, **kw)
    on = cepo_ref.divergence_loss(z, zt, mask, **kw)
    assert off.metrics == {} and on.metrics["num_tokens"] == 6.0
    assert torch.equal(off.loss, on.loss) and torch.equal(off.per_token, on.per_token)
    with FakeTensorMode():
        fake = cepo_ref.divergence_loss(torch.empty(2, 3, 11), torch.empty(2, 3, 11),
                                        torch.ones(2, 3, dtype=torch.bool), metrics=False)
        assert fake.loss.shape == () and fake.per_token.shape == (2, 3)
