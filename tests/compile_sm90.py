"""Compiles every kernel for a Hopper GPU (sm_90, through ptxas) at the configs the launchers use.

Run by tests/test_compile.py in a subprocess without TRITON_INTERPRET (under the interpreter the kernels
are not compilable objects). Arguments: the case ids (default all). Prints one JSON object: case id ->
null (compiled) or the error.
"""

import inspect
import json
import sys
import traceback

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from cepo_kernels.ops import linear, linear_bwd, logits

H100 = GPUTarget("cuda", 90, 32)
FLOATS = ("inv_temp", "lam", "eps_w", "eps_low", "eps_high", "clip_dual", "filter_eps")


def jit_function(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # through triton.heuristics / autotune wrappers
    return kernel


def compile_sm90(kernel, pointers, constants, wide=()):
    """pointers: name -> triton pointer type ("*bf16"); other arguments are i32 (i64 when in `wide`)."""
    fn = jit_function(kernel)
    signature = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if name in wide else "i32"
    compiled = triton.compile(ASTSource(fn, signature, constants), target=H100)
    assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin produced"


DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def logits_loss_kernels(dtype, teachers):
    block_v, _ = logits._GPU_CONFIG["fwd"]
    ptr = DTYPES[dtype]
    pointers = {n: ptr for n in ("logits", "pos_logits", "neg_logits")}
    pointers.update({n: "*fp32" for n in ("adv", "old_logp", "pos_logp", "neg_logp", "lp", "lse", "a_hat",
                                          "loss", "coef", "delta")})
    pointers.update(targets="*i64", mask="*u8")
    constants = dict(HAS_POS_LOGITS=teachers in ("logits", "mixed"), HAS_NEG_LOGITS=teachers == "logits",
                     HAS_TEACHERS=teachers != "none", HAS_OLD=True, HAS_DUAL=True, BLOCK_V=block_v)
    compile_sm90(logits._cepo_fwd_kernel, pointers, constants,
                 wide=("s_b", "s_t", "s_pb", "s_pt", "s_nb", "s_nt"))


def logprobs_kernels(dtype):
    ptr = DTYPES[dtype]
    block_v, _ = logits._GPU_CONFIG["fwd"]
    compile_sm90(logits._logprobs_fwd_kernel,
                 dict(logits=ptr, targets="*i64", lp="*fp32", lse="*fp32", ent="*fp32"),
                 dict(BLOCK_V=block_v), wide=("s_b", "s_t"))
    block_v, _ = logits._GPU_CONFIG["bwd"]
    for grad_ent in (False, True):
        compile_sm90(logits._logprobs_bwd_kernel,
                     dict(logits=ptr, dlogits=ptr, targets="*i64", lse="*fp32", ent="*fp32", grad_lp="*fp32",
                          grad_ent="*fp32"),
                     dict(HAS_GRAD_ENT=grad_ent, ROUND_BF16=False, BLOCK_V=block_v),
                     wide=("s_b", "s_t", "s_db", "s_dt"))
    compile_sm90(logits._cepo_advantages_fwd_kernel,
                 dict(adv="*fp32", pos_logp="*fp32", neg_logp="*fp32", mask="*u8", a_hat="*fp32"),
                 dict(BLOCK=1024), wide=("N",))


def _compile_linear_case(kernel, pointers, constants, cfg):
    """One case of linear.compile_cases / linear_bwd.compile_cases, with its launch config's num_warps."""
    fn = jit_function(kernel)
    constants = {**constants, **{k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}}
    signature = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    compiled = triton.compile(ASTSource(fn, signature, constants), target=H100,
                              options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin produced"


def _precision(dtype):
    return "ieee" if dtype == "fp32" else "tf32"


def linear_forward_kernel(dtype, n_src):
    for _, kernel, pointers, constants, cfg in linear.compile_cases(DTYPES[dtype], _precision(dtype)):
        if constants.get("N_SRC") == n_src:
            _compile_linear_case(kernel, pointers, constants, cfg)


def linear_token_kernel():
    for _, kernel, pointers, constants, cfg in linear.compile_cases("*bf16", "tf32"):
        if "N_SRC" not in constants:  # the combine and per-token kernels
            _compile_linear_case(kernel, pointers, constants, cfg)


def linear_backward_kernels(dtype):
    for _, kernel, pointers, constants, cfg in linear_bwd.compile_cases(DTYPES[dtype], _precision(dtype)):
        _compile_linear_case(kernel, pointers, constants, cfg)


CASES = {
    **{f"logits-loss-{t}-{d}": (logits_loss_kernels, d, t) for d in DTYPES
       for t in ("none", "logits", "logp", "mixed")},
    **{f"logprobs-{d}": (logprobs_kernels, d) for d in DTYPES},
    **{f"linear-fwd-src{n}-{d}": (linear_forward_kernel, d, n) for d in DTYPES for n in (1, 2, 3)},
    "linear-token": (linear_token_kernel,),
    **{f"linear-bwd-{d}": (linear_backward_kernels, d) for d in DTYPES},
}


def main(case_ids):
    results = {}
    for case in case_ids or CASES:
        fn, *args = CASES[case]
        try:
            fn(*args)
            results[case] = None
        except Exception:  # reported per case by the test
            results[case] = traceback.format_exc(limit=3)[-3000:]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
