"""Loss from hidden states + lm_head, fwd+bwd: cepo_kernels vs torch eager, cut-cross-entropy, Liger and TRL.

Shapes of docs/peers.md (a Qwen3-4B head): B=4, T=2048, H=2560, V=151936, bf16, 1/8 of the tokens
masked, fp32 advantages and old log-probs. "dense": every sequence has a non-zero advantage;
"half-zero": half the sequences have A = 0 (an all-correct or all-wrong group), whose rows the fused kernels
skip. Run on a GPU: `pytest bench/test_linear_loss.py --benchmark-columns=median,min,max`; each result's
extra_info holds the peak memory beyond the live inputs (GiB) of one fwd+bwd. TRL's chunked log-prob
head (`trl.kernels.ChunkedLogProbFunction`, what `add_fused_lm_head` runs: cuBLAS tiles of 32768 vocabulary
columns folded by a Triton kernel, only the valid positions) is called once per pass, as cut-cross-entropy.
The floor is timed in the same run: one bf16 matmul [N, H] x [H, V], which bench/summarise.py scales to the
6 matmuls of CEPO and the 4 of GRPO with the logits never stored (docs/peers.md).
"""

import importlib.util

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("benchmarks need a CUDA GPU (the CPU interpreter is for correctness only)",
                allow_module_level=True)

from cepo_kernels import linear_cepo_loss, linear_grpo_loss, linear_logprobs  # noqa: E402

B, T, H, V = 4, 2048, 2560, 151936
LAM, EPS_W, EPS_LOW, EPS_HIGH, CLIP_DUAL = 0.5, 0.2, 0.2, 0.28, 3.0
HAS_CCE = importlib.util.find_spec("cut_cross_entropy") is not None
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
HAS_TRL = importlib.util.find_spec("trl") is not None
TRL_CHUNK = 32768  # TRL 1.16's vocabulary chunk for its fused head


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator(device="cuda").manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    hidden = torch.randn(B, T, H, device=dev, dtype=dt, generator=g)
    weight = (torch.randn(V, H, device=dev, generator=g) * 0.02).to(dt)
    targets = torch.randint(0, V, (B, T), device=dev, generator=g)
    pos_hidden = hidden + 0.1 * torch.randn(B, T, H, device=dev, dtype=dt, generator=g)
    neg_hidden = hidden + 0.1 * torch.randn(B, T, H, device=dev, dtype=dt, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    mask[:, -T // 8:] = False
    with torch.no_grad():
        old = linear_logprobs(hidden, weight, targets) + 0.05 * torch.randn(B, T, device=dev, generator=g)
    return dict(hidden=hidden, weight=weight, targets=targets, pos_hidden=pos_hidden, neg_hidden=neg_hidden,
                mask=mask, old_logp=old)


def advantages(case):
    adv = torch.tensor([1.1, -0.9, 0.7, -0.5], device="cuda")
    if case == "half-zero":
        adv[:2] = 0.0
    return adv


def ppo(lp, a_hat, old, mask):
    """Torch PPO-clip with dual clip, token-mean: what a user writes around per-token log-probs."""
    ratio = torch.exp((lp - old).clamp(-20, 20))
    loss = torch.maximum(-a_hat * ratio, -a_hat * ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH))
    loss = torch.where(a_hat < 0, torch.minimum(loss, -CLIP_DUAL * a_hat), loss)
    return (loss * mask).sum() / mask.sum().clamp_min(1)


def reweight(adv, pos, neg):
    w = torch.exp(torch.sign(adv)[:, None] * (pos - neg)).clamp(1 - EPS_W, 1 + EPS_W)
    return adv[:, None] * ((1 - LAM) + LAM * w)


def eager_logp(h, w, t):
    logits = (h @ w.T).float()
    return logits.log_softmax(-1).gather(-1, t[..., None]).squeeze(-1)


def torch_loss(x, h, w, adv, teachers):
    lp = eager_logp(h, w, x["targets"])
    if teachers:
        with torch.no_grad():
            a_hat = reweight(adv, eager_logp(x["pos_hidden"], w, x["targets"]),
                             eager_logp(x["neg_hidden"], w, x["targets"]))
    else:
        a_hat = adv[:, None].expand(B, T)
    return ppo(lp, a_hat, x["old_logp"], x["mask"])


def cepo_loss_fn(x, h, w, adv, teachers):
    kw = {}
    if teachers:
        kw = dict(pos_hidden=x["pos_hidden"], neg_hidden=x["neg_hidden"], lam=LAM, eps_w=EPS_W)
    fn = linear_cepo_loss if teachers else linear_grpo_loss
    return fn(h, w, x["targets"], adv, x["mask"], old_logp=x["old_logp"], eps_low=EPS_LOW, eps_high=EPS_HIGH,
              clip_dual=CLIP_DUAL, **kw).loss


def cce_loss(x, h, w, adv, teachers):
    from cut_cross_entropy import linear_cross_entropy

    def logp(hh, ww):  # CCE returns per-token -log p with reduction="none"
        return -linear_cross_entropy(hh, ww, x["targets"], reduction="none").float()

    lp = logp(h, w)
    if teachers:
        with torch.no_grad():
            a_hat = reweight(adv, logp(x["pos_hidden"], w), logp(x["neg_hidden"], w))
    else:
        a_hat = adv[:, None].expand(B, T)
    return ppo(lp, a_hat, x["old_logp"], x["mask"])


def trl_loss(x, h, w, adv, teachers):
    from trl.kernels import ChunkedLogProbFunction

    mask = x["mask"]

    def logp(hh):  # TRL scores only the valid positions and scatters them back (zeros elsewhere)
        out = ChunkedLogProbFunction.apply(hh[mask], w, None, x["targets"][mask], 1.0, TRL_CHUNK, None, 1.0,
                                           ())
        return hh.new_zeros(mask.shape, dtype=torch.float32).masked_scatter(mask, out[0].float())

    lp = logp(h)
    if teachers:
        with torch.no_grad():
            a_hat = reweight(adv, logp(x["pos_hidden"]), logp(x["neg_hidden"]))
    else:
        a_hat = adv[:, None].expand(B, T)
    return ppo(lp, a_hat, x["old_logp"], mask)


_LIGER = {}


def liger_loss(x, h, w, adv, teachers):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    if "fn" not in _LIGER:
        _LIGER["fn"] = LigerFusedLinearGRPOLoss(beta=0.0, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                                                temperature=1.0, use_ref_model=False)
    # (input, weight, selected_token_ids, attention_mask, advantages, bias, ref_logps, old_logps)
    loss, _ = _LIGER["fn"](h, w, x["targets"], x["mask"].float(), adv, None, None, x["old_logp"])
    return loss


PROVIDERS = {
    "torch": torch_loss,
    "cepo": cepo_loss_fn,
    "cce": cce_loss,
    "liger": liger_loss,
    "trl": trl_loss,
}


@pytest.mark.parametrize("case", ["dense", "half-zero"])
@pytest.mark.parametrize("loss", ["cepo", "grpo"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_linear_loss(benchmark, inputs, provider, loss, case):
    if provider == "cce" and not HAS_CCE:
        pytest.skip("cut_cross_entropy is not installed")
    if provider == "liger" and not HAS_LIGER:
        pytest.skip("liger_kernel is not installed")
    if provider == "trl" and (not HAS_TRL or importlib.util.find_spec("trl.kernels") is None):
        pytest.skip("trl >= 1.16 (trl.kernels) is not installed")
    if provider == "liger" and loss == "cepo":
        pytest.skip("Liger cannot express CEPO (one advantage per sequence, no teachers)")
    fn = PROVIDERS[provider]
    teachers = loss == "cepo"
    adv = advantages(case)
    h = inputs["hidden"].detach().requires_grad_()
    w = inputs["weight"].detach().requires_grad_()

    def step():
        h.grad = w.grad = None
        fn(inputs, h, w, adv, teachers).backward()
        torch.cuda.synchronize()

    step()  # compile / warm up outside the memory measurement
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    benchmark.extra_info["extra_GiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
    benchmark.extra_info["shape"] = f"B{B}-T{T}-H{H}-V{V}-bf16"
    benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
    benchmark.extra_info.update(provider=provider, loss=loss, case=case)
    benchmark.pedantic(step, rounds=10, warmup_rounds=2, iterations=1)


def test_linear_floor_matmul(benchmark, inputs):
    """The FLOP floor's unit: one bf16 matmul of the linear path's shape, [N, H] x [H, V]."""
    h = inputs["hidden"].reshape(B * T, H)
    w = inputs["weight"]
    out = torch.empty(B * T, V, device="cuda", dtype=h.dtype)

    def step():
        torch.mm(h, w.T, out=out)
        torch.cuda.synchronize()

    step()
    benchmark.extra_info.update(provider="floor-matmul", shape=f"B{B}-T{T}-H{H}-V{V}-bf16",
                                gpu=torch.cuda.get_device_name())
    benchmark.pedantic(step, rounds=10, warmup_rounds=2, iterations=1)
