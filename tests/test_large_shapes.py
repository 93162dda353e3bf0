"""N x V above 2^31 elements (int64 addressing) for the logits and the linear kernels, on a GPU only.

Logits [16385, 151936] bf16 are 2.49e9 elements (5 GB): the rows from 14134 on start past 2^31, where an
int32 offset wraps. Each output and gradient is compared, over every row, with the float64 reference
(computed in row chunks) under the house rule: err(kernel) <= 2 x err(cepo_ref in bf16) + atol. About
45 GB of GPU memory at the peak (the bf16 reference materialises fp32 log-softmaxes); ~60 s on an H200.
"""

import pytest
import torch
from helpers import err

import cepo_ref
from cepo_kernels import linear_logprobs, token_logprobs

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::UserWarning")]

N, V, H = 16385, 151936, 128
CHUNK = 1024  # rows per float64 reference chunk (1.2 GB of fp64 logits)
ATOL = 1e-3  # bf16, as in tests/test_linear.py


def inputs(seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    upstream = torch.randn(N, device="cuda", generator=g)  # d loss / d logp: every row its own weight
    return g, targets, upstream


def check(name, kernel_parts, ref64_parts, same_parts):
    e_kernel = max(err(k, r) for k, r in zip(kernel_parts, ref64_parts, strict=True))
    e_torch = max(err(s, r) for s, r in zip(same_parts, ref64_parts, strict=True))
    assert e_kernel <= 2 * e_torch + ATOL, f"{name}: kernel {e_kernel:.3e} > 2 x torch {e_torch:.3e} + {ATOL}"


def test_token_logprobs_past_2_31_elements():
    assert N * V > 2**31
    g, targets, upstream = inputs()
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=g).mul_(2).requires_grad_()
    lp = token_logprobs(logits, targets)
    (lp * upstream).sum().backward()
    lp, grad = lp.detach(), logits.grad
    logits.grad = None
    same = logits.detach().clone().requires_grad_()
    lp_same = cepo_ref.token_logprobs(same, targets)
    (lp_same * upstream).sum().backward()
    lp_same, grad_same = lp_same.detach(), same.grad
    del same
    torch.cuda.empty_cache()
    for i in range(0, N, CHUNK):
        j = min(N, i + CHUNK)
        x = logits.detach()[i:j].double().requires_grad_()
        lp64 = cepo_ref.token_logprobs(x, targets[i:j])
        (lp64 * upstream[i:j].double()).sum().backward()
        check(f"logp rows {i}..{j}", [lp[i:j]], [lp64.detach()], [lp_same[i:j]])
        check(f"grad rows {i}..{j}", [grad[i:j]], [x.grad], [grad_same[i:j]])
    assert grad.dtype == torch.bfloat16 and torch.isfinite(lp).all()


def test_linear_logprobs_past_2_31_elements():
    g, targets, upstream = inputs(1)
    hidden = torch.randn(N, H, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, H, device="cuda", generator=g) / H**0.5 * 2).to(torch.bfloat16).requires_grad_()
    lp = linear_logprobs(hidden, weight, targets)
    (lp * upstream).sum().backward()
    lp, gh, gw = lp.detach(), hidden.grad, weight.grad
    hs, ws = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    lp_same = cepo_ref.linear_logprobs(hs, ws, targets)  # materialises the [N, V] logits
    (lp_same * upstream).sum().backward()
    lp_same, gh_same, gw_same = lp_same.detach(), hs.grad, ws.grad
    del hs, ws
    torch.cuda.empty_cache()
    w64 = weight.detach().double().requires_grad_()  # its gradient accumulates over the row chunks
    for i in range(0, N, CHUNK):
        j = min(N, i + CHUNK)
        h64 = hidden.detach()[i:j].double().requires_grad_()
        lp64 = cepo_ref.linear_logprobs(h64, w64, targets[i:j])
        (lp64 * upstream[i:j].double()).sum().backward()
        check(f"logp rows {i}..{j}", [lp[i:j]], [lp64.detach()], [lp_same[i:j]])
        check(f"grad_hidden rows {i}..{j}", [gh[i:j]], [h64.grad], [gh_same[i:j]])
    check("grad_weight", [gw], [w64.grad], [gw_same])
