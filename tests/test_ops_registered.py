"""The kernels as PyTorch operators (torch.ops.cepo_kernels.*): opcheck, torch.compile, fake tensors.

- torch.library.opcheck on every operator (schema, autograd registration, fake implementation, AOT dispatch
  with dynamic shapes), on CPU through Triton's interpreter;
- torch.compile(fullgraph=True, backend="aot_eager") over each public function: one graph (a counting
  backend), the same loss, outputs and gradients as eager (the same kernels run: bitwise equal);
- FakeTensorMode runs the public functions and their backward at real shapes (N = 8192, H = 2560,
  V = 151936) in seconds: no memory, and no data-dependent host synchronisation in the op path (a fake
  tensor raises on .item() / .tolist());
- on a GPU (-m gpu): inductor, and no host synchronisation under torch.cuda.set_sync_debug_mode("error").
"""

import pytest
import torch
import torch._dynamo.testing
from torch._subclasses.fake_tensor import FakeTensorMode

import cepo_kernels as ck
from cepo_kernels.ops import _common
from cepo_kernels.ops import linear as _linear  # noqa: F401  (registers the linear operators)

OPS = torch.ops.cepo_kernels
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy in the interpreter's masked lanes
              pytest.mark.usefixtures("kernel_backend")]  # native CPU kernels and interpreter (conftest)


def rand(*shape, dtype=torch.float32, device="cpu", grad=False, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(grad)


def logits_case(device, B=2, T=5, V=67):
    g = torch.Generator().manual_seed(1)
    return dict(
        x=rand(B, T, V, device=device, grad=True), tg=torch.randint(0, V, (B, T), generator=g).to(device),
        adv=rand(B, device=device, seed=2), mask=(torch.rand(B, T, generator=g) > 0.2).to(device),
        old=(rand(B, T, device=device, seed=3) * 0.1 - 4.0), pos=rand(B, T, V, device=device, seed=4),
        neg=rand(B, T, V, device=device, seed=5))


def linear_case(device, N=37, H=24, V=131):
    g = torch.Generator().manual_seed(7)
    return dict(
        h=rand(N, H, device=device, grad=True), w=(rand(V, H, device=device, seed=8) * 0.2).requires_grad_(),
        b=(rand(V, device=device, seed=9) * 0.5).requires_grad_(),
        tg=torch.randint(0, V, (N,), generator=g).to(device), adv=rand(N, device=device, seed=10),
        mask=(torch.rand(N, generator=g) > 0.2).to(device), old=rand(N, device=device, seed=11) * 0.1 - 4.0,
        ph=rand(N, H, device=device, seed=12), nh=rand(N, H, device=device, seed=13))


# ---- opcheck: every operator ---------------------------------------------------------------------------

def op_samples():
    c, lc = logits_case("cpu"), linear_case("cpu")
    x, n = c["x"], c["x"].shape[0] * c["x"].shape[1]
    tg = c["tg"].reshape(-1)
    adv, old = c["adv"].repeat_interleave(5), c["old"].reshape(-1)
    mask = c["mask"].reshape(-1).to(torch.uint8)
    lse, ent, glp = rand(n, seed=20) + 4.0, rand(n, seed=21).abs(), rand(n, seed=22)
    pos_lp, neg_lp = rand(n, seed=23) - 3.0, rand(n, seed=24) - 3.0
    h, w, b, ltg = lc["h"], lc["w"], lc["b"], lc["tg"]
    N = h.shape[0]
    rows = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    count = torch.tensor([N // 2], dtype=torch.int32)
    lmask, ladv = lc["mask"], lc["adv"]
    return {
        "token_logprobs": (OPS.token_logprobs, (x, tg, 0.7, True, False)),
        "token_logprobs-no-entropy": (OPS.token_logprobs, (x, tg, 1.0, False, False)),
        "cepo_fwd-logits": (OPS.cepo_fwd, (x, tg, adv, mask, old, c["pos"], c["neg"], None, None,
                                           0.9, 0.5, 0.2, 0.2, 0.28, 3.0, False)),
        "cepo_fwd-logp": (OPS.cepo_fwd, (x, tg, adv, mask, None, None, None, pos_lp, neg_lp,
                                         1.0, 0.5, 0.2, 0.2, 0.28, None, False)),
        "cepo_fwd-grpo": (OPS.cepo_fwd, (x, tg, adv, mask, old, None, None, None, None,
                                         1.0, 0.0, 0.2, 0.2, 0.28, 3.0, False)),
        "logprobs_bwd": (OPS.logprobs_bwd, (x.detach(), tg, lse, ent, glp, glp * 0.5, 0.7)),
        "logprobs_bwd_": (OPS.logprobs_bwd_, (x.detach().clone(), tg, lse, lse, glp, None, 1.0)),
        "cepo_advantages": (OPS.cepo_advantages, (adv, pos_lp, neg_lp, mask, 0.5, 0.2)),
        "linear_scores": (OPS.linear_scores, (h, [], w, b, ltg, None, None, 0, 0.8, True)),
        "linear_scores-teachers": (OPS.linear_scores, (h, [lc["ph"], lc["nh"]], w, None, ltg, rows, count, 1,
                                                       1.0, False)),
        "token_loss": (OPS.token_loss, (rand(N, seed=30, grad=True) - 3.0, lc["old"], ladv, rand(N, seed=31),
                                        rand(N, seed=32), lmask, 0.5, 0.2, 0.2, 0.28, 3.0)),
        "token_loss-grpo": (OPS.token_loss, (rand(N, seed=33, grad=True) - 3.0, None, ladv, None, None, lmask,
                                             0.0, 0.2, 0.2, 0.28, None)),
        "linear_bwd": (OPS.linear_bwd, (h.detach(), w.detach(), b.detach(), ltg, rand(N, seed=34) + 5.0,
                                        rand(N, seed=35), rand(N, seed=36).abs(), rand(N, seed=37), 1.0,
                                        True, True, True)),
        "linear_bwd-hidden-only": (OPS.linear_bwd, (h.detach(), w.detach(), None, ltg, rand(N, seed=34) + 5.0,
                                                    rand(N, seed=35), None, None, 0.8, True, False, False)),
    }


SAMPLES = op_samples()


def test_every_operator_is_sampled():
    names = {name.split("-")[0] for name in SAMPLES}
    assert names == {"token_logprobs", "cepo_fwd", "logprobs_bwd", "logprobs_bwd_", "cepo_advantages",
                     "linear_scores", "token_loss", "linear_bwd"}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck(name):
    op, args = SAMPLES[name]
    torch.library.opcheck(op, args)


# ---- torch.compile(fullgraph=True): one graph, the same results ---------------------------------------

def public_cases(device):
    c, lc = logits_case(device), linear_case(device)
    x, tg, adv, mask, old = c["x"], c["tg"], c["adv"], c["mask"], c["old"]
    h, w, b, ltg, ladv, lmask = lc["h"], lc["w"], lc["b"], lc["tg"], lc["adv"], lc["mask"]

    def loss_out(o):
        return (o.loss, o.logp, o.advantages, *o.metrics.values())

    return {
        "token_logprobs": ((x,), lambda x: ck.token_logprobs(x, tg, temperature=0.7, return_entropy=True)),
        "cepo_loss": ((x,), lambda x: loss_out(ck.cepo_loss(
            x, tg, adv, mask, old_logp=old, pos_logits=c["pos"], neg_logits=c["neg"], metrics="tensor"))),
        "cepo_loss-logp": ((x,), lambda x: loss_out(ck.cepo_loss(
            x, tg, adv, mask, pos_logp=old + 0.1, neg_logp=old, reduction="seq-mean-token-mean",
            metrics=False))),
        "grpo_loss": ((x,), lambda x: loss_out(ck.grpo_loss(x, tg, adv, mask, old_logp=old,
                                                            metrics="tensor"))),
        "grpo_loss-inplace": ((x,), lambda x: loss_out(ck.grpo_loss(  # the backward overwrites x * 2
            x * 2.0, tg, adv, mask, old_logp=old, inplace=True, metrics=False))),
        "cepo_advantages": ((), lambda: ck.cepo_advantages(adv, old + 0.1, old, mask, lam=0.5)),
        "group_advantages": ((), lambda: ck.group_advantages(adv.repeat(4), 4)),
        "linear_logprobs": ((h, w, b), lambda h, w, b: ck.linear_logprobs(h, w, ltg, bias=b, temperature=0.8,
                                                                          return_entropy=True)),
        "linear_cepo_loss": ((h, w, b), lambda h, w, b: loss_out(ck.linear_cepo_loss(
            h, w, ltg, ladv, lmask, old_logp=lc["old"], pos_hidden=lc["ph"], neg_hidden=lc["nh"], bias=b,
            metrics="tensor"))),
        "linear_grpo_loss": ((h, w), lambda h, w: loss_out(ck.linear_grpo_loss(
            h, w, ltg, ladv, lmask, old_logp=lc["old"], reduction="sum", metrics=False))),
        "linear_teacher_logprobs": ((), lambda: ck.linear_teacher_logprobs(
            lc["ph"], lc["nh"], w, ltg, bias=b, rows=lmask & (ladv != 0))),
    }


def run_and_grad(fn, leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    out = out if isinstance(out, tuple) else (out,)
    diff = [o for o in out if isinstance(o, torch.Tensor) and o.requires_grad]
    if diff:  # a weighted sum of every differentiable output reaches every backward formula
        total = sum((o.float() * (k + 1.0)).sum() for k, o in enumerate(diff))
        total.backward()
    return [o.detach() for o in out if isinstance(o, torch.Tensor)], [t.grad for t in leaves]


def check_compiled(name, cases, backend):
    leaves, fn = cases[name]
    eager_out, eager_grads = run_and_grad(fn, leaves)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    out, grads = run_and_grad(compiled, leaves)
    assert counter.frame_count == 1, f"{name}: {counter.frame_count} graphs"
    return eager_out, eager_grads, out, grads


@pytest.mark.parametrize("name", sorted(public_cases("cpu")))
def test_compile_fullgraph_matches_eager(name):
    eager_out, eager_grads, out, grads = check_compiled(name, public_cases("cpu"), "aot_eager")
    assert len(out) == len(eager_out) and len(grads) == len(eager_grads)
    for k, (a, e) in enumerate(zip(out, eager_out, strict=True)):  # the same kernels: bitwise equal
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True, msg=f"{name}: output {k}")
    for k, (a, e) in enumerate(zip(grads, eager_grads, strict=True)):
        assert (a is None) == (e is None), f"{name}: gradient {k} present in one run only"
        if a is not None:
            torch.testing.assert_close(a, e, rtol=0, atol=0, msg=f"{name}: gradient {k}")


def test_float_metrics_need_a_host_sync():
    """metrics=True returns Python floats (one device-to-host copy): under fullgraph it is refused, so use
    metrics="tensor" or False there (docs/kernels.md, Operators)."""
    c = logits_case("cpu")

    def fn(x):
        return ck.grpo_loss(x, c["tg"], c["adv"], c["mask"]).loss

    torch._dynamo.reset()
    with pytest.raises(Exception, match="tolist|item|Unsupported|graph break"):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(c["x"])


# ---- FakeTensorMode at real shapes: no memory, no data-dependent sync ---------------------------------

N_REAL, H_REAL, V_REAL = 8192, 2560, 151936


def test_fake_tensors_run_the_linear_path_at_real_shapes(monkeypatch):
    reported = []
    monkeypatch.setattr(_common, "WORKSPACE_HOOKS", [reported.append])
    monkeypatch.delenv("CEPO_LINEAR_CHUNK_BYTES", raising=False)
    with FakeTensorMode():
        h = torch.empty(N_REAL, H_REAL, dtype=torch.bfloat16, requires_grad=True)
        w = torch.empty(V_REAL, H_REAL, dtype=torch.bfloat16, requires_grad=True)
        tg = torch.zeros(N_REAL, dtype=torch.long)
        adv, mask = torch.ones(N_REAL), torch.ones(N_REAL, dtype=torch.bool)
        ph, nh = torch.empty_like(h), torch.empty_like(h)
        out = ck.linear_cepo_loss(h, w, tg, adv, mask, old_logp=torch.zeros(N_REAL), pos_hidden=ph,
                                  neg_hidden=nh, metrics="tensor")
        out.loss.backward()
        pos, neg = ck.linear_teacher_logprobs(ph, nh, w, tg, rows=mask)
        lp, ent = ck.linear_logprobs(h, w, tg, return_entropy=True)
        assert h.grad.shape == h.shape and w.grad.shape == w.shape and h.grad.dtype == torch.bfloat16
        assert out.logp.shape == (N_REAL,) and pos.shape == neg.shape == lp.shape == ent.shape == (N_REAL,)
        assert set(out.metrics) >= {"clip_frac", "delta_mean"} and out.loss.shape == ()
    # the backward's temporaries at the largest GPU budget (docs/memory.md): one 512 MiB G chunk (R = N rows,
    # C = 32768 columns of bf16), the fp32 grad_hidden accumulator, the row list and the masked g_lp
    assert reported[1] == (512 << 20) + 4 * N_REAL * H_REAL + 12 * N_REAL
    # the forward's split stats: 3 sources x 64 row blocks, 1024 / 192 -> 6 splits (of 1187 tiles: 198 each)
    assert reported[0] == 4 * 3 * N_REAL * (3 * 6 + 1)


def test_fake_tensors_run_the_logits_path_at_real_shapes():
    B, T = 4, N_REAL // 4
    with FakeTensorMode():
        x = torch.empty(B, T, V_REAL, dtype=torch.bfloat16, requires_grad=True)
        tg = torch.zeros(B, T, dtype=torch.long)
        adv, mask = torch.ones(B), torch.ones(B, T, dtype=torch.bool)
        pos = torch.empty(B, T, V_REAL, dtype=torch.bfloat16)
        out = ck.cepo_loss(x, tg, adv, mask, pos_logits=pos, neg_logp=torch.zeros(B, T), metrics="tensor")
        out.loss.backward()
        lp, ent = ck.token_logprobs(x, tg, return_entropy=True)
        a_hat = ck.cepo_advantages(adv, torch.zeros(B, T), torch.zeros(B, T), mask, lam=0.5)
        assert x.grad.shape == x.shape and x.grad.dtype == torch.bfloat16
        assert lp.shape == ent.shape == a_hat.shape == out.logp.shape == (B, T)


# ---- on a GPU: inductor, and no host synchronisation inside the operators ------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cepo_loss", "linear_cepo_loss"])  # inductor compiles take seconds each
def test_inductor_matches_eager_on_gpu(name):
    eager_out, eager_grads, out, grads = check_compiled(name, public_cases("cuda"), "inductor")
    for a, e in zip([*out, *grads], [*eager_out, *eager_grads], strict=True):
        if a is not None:  # inductor fuses the torch-side reductions: torch's own fp32 reordering error
            scale = e.double().abs().max().clamp_min(1.0)
            assert float((a.double() - e.double()).abs().max()) <= 64 * torch.finfo(torch.float32).eps * scale


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["token_logprobs", "cepo_loss", "linear_cepo_loss",
                                  "linear_teacher_logprobs"])
def test_no_host_sync_in_the_operators_on_gpu(name):
    leaves, fn = public_cases("cuda")[name]
    run_and_grad(fn, leaves)  # compile the kernels first (their first launch may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_and_grad(fn, leaves)
    finally:
        torch.cuda.set_sync_debug_mode("default")
