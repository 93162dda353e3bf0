"""fwd+bwd of the CEPO/GRPO loss on logits at the docs/peers.md shape (Qwen3-4B head).

B=4 sequences x T=2048 tokens, V=151936, bf16 policy logits [B, T, V] (Liger: [B, T+1, V]), the last
1/8 of each sequence masked, fp32 per-sequence advantages and old log-probs; CEPO also reads two
teacher logits tensors. Time: pytest-benchmark over a function that synchronises the GPU; memory:
peak allocated beyond the live inputs during one fwd+bwd, in benchmark.extra_info["peak_extra_gib"].
The floor is timed in the same run: a bf16 copy of the policy logits' bytes (read once, write once:
2 passes), scaled by bench/summarise.py to the 4 passes of CEPO and the 3 of GRPO (docs/peers.md).
Run: `pytest bench/test_logits_loss.py` (skipped on a machine without a GPU).
"""

import pytest
import torch
import triton

import cepo_kernels

B, T, V = 4, 2048, 151936
LAM, EPS_W, EPS_LOW, EPS_HIGH, CLIP_DUAL = 0.5, 0.2, 0.2, 0.28, 3.0


def torch_eager_loss(logits, targets, adv, mask, old, pos=None, neg=None):
    """What users run: log_softmax + gather (+ two teacher log_softmax under no_grad) + PPO clip."""
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    a = adv[:, None].expand_as(lp)
    if pos is not None:
        with torch.no_grad():
            pos_lp = torch.log_softmax(pos.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
            neg_lp = torch.log_softmax(neg.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
            w = torch.exp(torch.sign(a) * (pos_lp - neg_lp)).clamp(1 - EPS_W, 1 + EPS_W)
            a = a * ((1 - LAM) + LAM * w)
    ratio = torch.exp((lp - old).clamp(-20, 20))
    per_token = torch.maximum(-a * ratio, -a * ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH))
    per_token = torch.where(a < 0, torch.minimum(per_token, -CLIP_DUAL * a), per_token)
    m = mask.float()
    return (per_token * m).sum() / m.sum().clamp_min(1)


def _liger():
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError:
        return None
    return triton_grpo_loss


PROVIDERS = ["torch-grpo", "torch-cepo", "grpo", "grpo-inplace", "cepo", "cepo-inplace", "liger-grpo"]


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator(device="cuda").manual_seed(0)
    full = torch.randn(B, T + 1, V, device="cuda", dtype=torch.bfloat16, generator=g)  # Liger's layout
    pos = torch.randn(B, T, V, device="cuda", dtype=torch.bfloat16, generator=g)
    neg = torch.randn(B, T, V, device="cuda", dtype=torch.bfloat16, generator=g)
    targets = torch.randint(0, V, (B, T), device="cuda", generator=g)
    adv = torch.randn(B, device="cuda", generator=g)
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    mask[:, T - T // 8:] = False
    with torch.no_grad():
        old = cepo_kernels.token_logprobs(full[:, :-1], targets)
    old = old + 0.1 * torch.randn(B, T, device="cuda", generator=g)
    return dict(full=full, pos=pos, neg=neg, targets=targets, adv=adv, mask=mask, old=old)


def _step_fns(provider, d):
    """(step, setup): step = one synchronised fwd+bwd; setup restores logits an in-place provider clobbered.

    The policy input is a [B, T, V] leaf (Liger: its [B, T+1, V] layout), so autograd adds no buffer of
    its own and the measured memory is the loss's: one dlogits buffer, or none in place.
    """
    liger = provider == "liger-grpo"
    pristine = d["full"] if liger else d["full"][:, :-1]
    leaf = pristine.clone().requires_grad_()
    tg, adv, mask, old = d["targets"], d["adv"], d["mask"], d["old"]
    if liger:
        triton_grpo_loss = _liger()
        if triton_grpo_loss is None:
            pytest.skip("liger_kernel is not installed (pip install liger-kernel)")

        def loss_fn():
            res = triton_grpo_loss(leaf, old, None, tg, adv, mask.int(), temperature=1.0, beta=0.0,
                                   eps_low=EPS_LOW, eps_high=EPS_HIGH, inplace=True)
            per_token = res[0] if isinstance(res, tuple) else res
            m = mask.float()
            return (per_token * m).sum() / m.sum()
    elif provider.startswith("torch"):
        extra = dict(pos=d["pos"], neg=d["neg"]) if provider == "torch-cepo" else {}

        def loss_fn():
            return torch_eager_loss(leaf, tg, adv, mask, old, **extra)
    else:
        fn = cepo_kernels.cepo_loss if provider.startswith("cepo") else cepo_kernels.grpo_loss
        kw = dict(pos_logits=d["pos"], neg_logits=d["neg"]) if provider.startswith("cepo") else {}
        kw["inplace"] = provider.endswith("inplace")

        def loss_fn():
            return fn(leaf, tg, adv, mask, old_logp=old, **kw).loss

    def step():
        leaf.grad = None
        loss_fn().backward()
        torch.cuda.synchronize()

    def setup():
        if liger or provider.endswith("inplace"):
            with torch.no_grad():
                leaf.copy_(pristine)
        torch.cuda.synchronize()

    return step, setup


def test_logits_floor_copy(benchmark, inputs):
    """The byte floor's unit: one device copy of [B, T, V] bf16 logits."""
    src = inputs["full"][:, :-1].contiguous()
    dst = torch.empty_like(src)

    def step():
        dst.copy_(src)
        torch.cuda.synchronize()

    step()
    benchmark.group = f"logits loss fwd+bwd B={B} T={T} V={V} bf16"
    benchmark.extra_info.update(provider="floor-copy", passes=2, device=torch.cuda.get_device_name(),
                                torch=torch.__version__, triton=triton.__version__)
    benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_logits_loss_fwd_bwd(benchmark, peak_extra_gib, inputs, provider):
    step, setup = _step_fns(provider, inputs)
    step()  # compile / warm up
    setup()
    extra = peak_extra_gib(step)
    benchmark.group = f"logits loss fwd+bwd B={B} T={T} V={V} bf16"
    benchmark.extra_info.update(provider=provider, peak_extra_gib=round(extra, 3),
                                device=torch.cuda.get_device_name(), torch=torch.__version__,
                                triton=triton.__version__)
    benchmark.pedantic(step, setup=setup, rounds=20, warmup_rounds=3, iterations=1)
