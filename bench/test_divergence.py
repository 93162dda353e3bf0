"""Self-distillation divergence from hidden states, fwd+bwd: cepo_kernels vs TRL 1.16's chunked divergence and
full-logit eager torch (what TRL's SDPO trainer computes).

Providers, each the per-token generalized JSD (beta 0.5, token-mean over the mask) from student and teacher
hidden states through one lm_head, gradient to the student's hidden states and the weight:
  cepo:  cepo_kernels.linear_divergence_loss (row chunks of logits scored by the Triton kernels on a GPU,
         chunked eager torch on a CPU);
  trl:   trl.kernels.chunked_divergence.ChunkedDivergenceFunction (TRL 1.16; Triton on a GPU, its own torch
         tiles on a CPU);
  torch: eager logits = hidden @ W.T, log_softmax, the mixture and F.kl_div as trl.experimental.sdpo's
         compute_divergence.
GPU: `pytest bench/test_divergence.py --benchmark-columns=median,min,max` (Qwen3-4B head shapes; peak extra
memory in extra_info). CPU ratio run (one process; each provider's peak RSS measured in a forked child):
`python bench/test_divergence.py --cpu [--n 2048 --v 32768 --h 256]`. Results: docs/divergence.md.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

HAS_TRL = importlib.util.find_spec("trl") is not None
BETA = 0.5


def eager(hidden, teacher_hidden, weight, mask, beta=BETA):
    """Full-logit eager torch, as TRL's SDPO computes the divergence (trl/experimental/sdpo/loss_utils.py)."""
    s = torch.log_softmax((hidden @ weight.T).float(), -1)
    with torch.no_grad():
        t = torch.log_softmax((teacher_hidden @ weight.T).float(), -1)
    mix = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
    kl_t = F.kl_div(mix, t, reduction="none", log_target=True)
    kl_s = F.kl_div(mix, s, reduction="none", log_target=True)
    per_token = torch.lerp(kl_s, kl_t, beta).sum(-1)
    m = mask.float()
    return (per_token * m).sum() / m.sum()


def trl_chunked(hidden, teacher_hidden, weight, mask, beta=BETA):
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    div, _ = ChunkedDivergenceFunction.apply(hidden, weight, None, teacher_hidden, weight.detach(), None,
                                             beta)
    m = mask.float()
    return (div * m).sum() / m.sum()


def cepo(hidden, teacher_hidden, weight, mask, beta=BETA):
    from cepo_kernels import linear_divergence_loss

    return linear_divergence_loss(hidden, teacher_hidden, weight, mask, beta=beta, metrics=False).loss


PROVIDERS = {"cepo": cepo, "trl": trl_chunked, "torch": eager}


def make_inputs(N, H, V, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(N, H, device=device, generator=g).to(dtype)
    teacher = (hidden.float() + 0.3 * torch.randn(N, H, device=device, generator=g)).to(dtype)
    weight = (torch.randn(V, H, device=device, generator=g) / math.sqrt(H) * 3).to(dtype)
    mask = torch.ones(N, dtype=torch.bool, device=device)
    mask[-N // 8:] = False
    return hidden.requires_grad_(), teacher, weight.requires_grad_(), mask


def step(fn, inputs):
    hidden, teacher, weight, mask = inputs
    hidden.grad = weight.grad = None
    loss = fn(hidden, teacher, weight, mask)
    loss.backward()
    return loss


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_divergence_fwd_bwd(benchmark, peak_extra_gib, provider):
    """Qwen3-4B head: N = 4 x 2048 tokens, H = 2560, V = 151936, bf16 (GPU only: bench/conftest.py)."""
    if provider == "trl" and not HAS_TRL:
        pytest.skip("trl not installed")
    inputs = make_inputs(8192, 2560, 151936, torch.bfloat16, "cuda")
    fn = PROVIDERS[provider]

    def run():
        step(fn, inputs)
        torch.cuda.synchronize()

    run()
    benchmark.extra_info["peak_extra_gib"] = peak_extra_gib(run)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


def _vm(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def peak_rss(provider, N, V, H, threads):
    """Peak RSS above the RSS after making the inputs and one warm-up step, of one fwd+bwd (this process)."""
    torch.set_num_threads(threads)
    inputs = make_inputs(N, H, V, torch.float32, "cpu")
    step(PROVIDERS[provider], inputs)
    inputs[0].grad = inputs[2].grad = None
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    base = _vm("VmRSS:")
    step(PROVIDERS[provider], inputs)
    return _vm("VmHWM:") - base


def _peak_child(provider, N, V, H, threads):
    """peak_rss in a fresh interpreter (a fork would inherit this process's heap and OpenMP state)."""
    out = subprocess.run([sys.executable, "-W", "ignore", __file__, "--peak", provider, "--n", str(N), "--v",
                          str(V), "--h", str(H), "--threads", str(threads)], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


def cpu_ratio(N, V, H, reps, threads):
    import triton

    torch.set_num_threads(threads)
    inputs = make_inputs(N, H, V, torch.float32, "cpu")
    names = [p for p in PROVIDERS if p != "trl" or HAS_TRL]
    losses = {p: float(step(PROVIDERS[p], inputs).detach()) for p in names}  # warm-up, and the values agree
    grads = {}
    for p in names:
        step(PROVIDERS[p], inputs)
        grads[p] = (inputs[0].grad.clone(), inputs[2].grad.clone())
    times = {p: [] for p in names}
    cpu = {p: [] for p in names}
    for _ in range(reps):  # interleaved, so that load on the shared machine hits every provider alike
        for p in names:
            t0, c0 = time.perf_counter(), time.process_time()
            step(PROVIDERS[p], inputs)
            times[p].append(time.perf_counter() - t0)
            cpu[p].append(time.process_time() - c0)
    peaks = {p: _peak_child(p, N, V, H, threads) for p in names}
    trl_version = importlib.import_module("trl").__version__ if HAS_TRL else "-"
    print(f"# divergence fwd+bwd on CPU: N={N} V={V} H={H} fp32 beta={BETA}, {threads} threads, {reps} reps; "
          f"torch {torch.__version__}, triton {triton.__version__}, trl {trl_version}, "
          f"{time.strftime('%Y-%m-%d')}, load average {os.getloadavg()[0]:.1f}")
    print("| provider | loss | max abs d grad_hidden vs torch | wall s (median, min) | CPU s (median) |"
          " peak extra MiB | CPU time / torch | memory / torch |")
    print("|---|---|---|---|---|---|---|---|")
    c_torch = statistics.median(cpu["torch"])
    for p in names:
        dh = float((grads[p][0] - grads["torch"][0]).abs().max())
        med, c_med = statistics.median(times[p]), statistics.median(cpu[p])
        print(f"| {p} | {losses[p]:.6f} | {dh:.2e} | {med:.2f}, {min(times[p]):.2f} | {c_med:.2f} | "
              f"{peaks[p] / 2**20:.0f} | {c_med / c_torch:.2f} | {peaks[p] / peaks['torch']:.2f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--peak", choices=list(PROVIDERS))
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--v", type=int, default=32768)
    ap.add_argument("--h", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.peak:
        print(peak_rss(args.peak, args.n, args.v, args.h, args.threads))
    else:
        cpu_ratio(args.n, args.v, args.h, args.reps, args.threads)
