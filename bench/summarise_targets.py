"""docs/peers.md's targets, each computed from a device run's records (bench/summarise.py prints them).

Each target is a function of a summarise.Results returning rows (label, measured or None, target, met or
None, why it is missing). The ratios use numbers timed side by side in one run: a kernel against the floor
timed with it (a logits copy, a matmul) and against the peers' implementations at the same shapes.
"""

from __future__ import annotations

import re

LOGITS, LOGITS_FLOOR = "test_logits_loss_fwd_bwd", "test_logits_floor_copy"
LINEAR, LINEAR_FLOOR = "test_linear_loss", "test_linear_floor_matmul"
STEP = "test_step"
STEP_AT = dict(mode="full", shape="4x1")  # the anchor of docs/peers.md: every parameter trainable, 4 x 2048
COMPILE_HOW = ("not in these results: `python bench/compile_report.py > report.jsonl` on any machine, "
               "then pass that file too")


def dlogits_gib(group):
    """GiB of one bf16 dlogits buffer for a logits benchmark's group ("... B=4 T=2048 V=151936 bf16")."""
    dims = dict(re.findall(r"\b([BTV])=(\d+)", group or ""))
    b, t, v = (int(dims.get(k, d)) for k, d in (("B", 4), ("T", 2048), ("V", 151936)))
    return b * t * v * 2 / 2**30


def _ratio(res, label, num, den, bound, ok, den_scale=1.0, fmt="{:.2f} x"):
    """One row: num / (den_scale x den) of two (test, key, params) lookups; ok(ratio) -> met."""
    a, why_a = res.value(*num[:2], **num[2])
    b, why_b = res.value(*den[:2], **den[2])
    if a is None or b is None:
        return [(label, None, bound, None, "; ".join(w for w in (why_a, why_b) if w))]
    r = a / (den_scale * b)
    return [(label, fmt.format(r), bound, ok(r), None)]


def _at_most(res, label, test, key, params, limit, bound, unit="GiB"):
    v, why = res.value(test, key, **params)
    if v is None:
        return [(label, None, bound, None, why)]
    return [(label, f"{v:.2f} {unit}", bound, v <= limit, None)]


def cepo_logits_floor(res):
    return [row for p in ("cepo", "cepo-inplace") for row in _ratio(
        res, f"`cepo_loss` ({p}) on logits / the 4-pass byte floor (2 x a logits copy)",
        (LOGITS, "median", dict(provider=p)), (LOGITS_FLOOR, "median", {}), "<= 1.25 x (goal 1.1 x)",
        lambda r: r <= 1.25, den_scale=2.0)]


def cepo_logits_vs_eager(res):
    return _ratio(res, "torch eager CEPO / `cepo_loss` on logits (speed-up)",
                  (LOGITS, "median", dict(provider="torch-cepo")), (LOGITS, "median", dict(provider="cepo")),
                  ">= 12 x", lambda r: r >= 12)


def cepo_logits_memory(res):
    rec = res.find(LOGITS, provider="cepo") or res.find(LOGITS, provider="cepo-inplace") or {}
    one = dlogits_gib(rec.get("group"))
    return [*_at_most(res, "`cepo_loss` on logits, extra memory", LOGITS, "peak_extra_gib",
                      dict(provider="cepo"), one, f"<= {one:.2f} GiB (one dlogits)"),
            *_at_most(res, "`cepo_loss` in place, extra memory", LOGITS, "peak_extra_gib",
                      dict(provider="cepo-inplace"), 0.1 * one, f"none (< {0.1 * one:.2f} GiB, 0.1 dlogits)")]


def grpo_logits_vs_liger(res):
    return [row for p in ("grpo", "grpo-inplace") for row in _ratio(
        res, f"`grpo_loss` ({p}) on logits / Liger's `triton_grpo_loss`",
        (LOGITS, "median", dict(provider=p)), (LOGITS, "median", dict(provider="liger-grpo")), "<= 1.0 x",
        lambda r: r <= 1.0)]


def linear_vs_cce(res):
    return _ratio(res, "`linear_cepo_loss` (dense) / 3 cut-cross-entropy calls",
                  (LINEAR, "median", dict(provider="cepo", loss="cepo", case="dense")),
                  (LINEAR, "median", dict(provider="cce", loss="cepo", case="dense")),
                  "<= 0.75 x (goal 0.65 x)", lambda r: r <= 0.75)


def linear_half_zero_floor(res):
    return _ratio(res, "`linear_cepo_loss`, half the rows at A = 0 / the dense 6-matmul floor",
                  (LINEAR, "median", dict(provider="cepo", loss="cepo", case="half-zero")),
                  (LINEAR_FLOOR, "median", {}), "< 1.0 x", lambda r: r < 1.0, den_scale=6.0)


def linear_memory(res):
    return [row for case in ("dense", "half-zero") for row in _at_most(
        res, f"`linear_cepo_loss` ({case}), extra memory", LINEAR, "extra_GiB",
        dict(provider="cepo", loss="cepo", case=case), 1.0, "< 1 GiB")]


def step_peak(res):
    return _at_most(res, "CEPO step, 4B shape (full parameters, 4 x 2048), peak", STEP, "peak_gib",
                    dict(case="cepo", **STEP_AT), 19.5, "<= 19.5 GiB")


def step_half_zero(res):
    return _ratio(res, "CEPO step with half the groups at A = 0 / the GRPO step (4B, full)",
                  (STEP, "median", dict(case="cepo-half-zero", **STEP_AT)),
                  (STEP, "median", dict(case="grpo", **STEP_AT)), "<= 1.25 x", lambda r: r <= 1.25)


def compile_level(res):
    recs, rows = res.compile, []
    labels = ("compile: no spills at any launcher config",
              "compile: 128-bit global loads in the logits kernels",
              "compile: wgmma N >= 128 in the linear forward")
    if not recs:
        return [(label, None, bound, None, COMPILE_HOW)
                for label, bound in zip(labels, ("0 B", ">= 128", ">= 128"), strict=True)]
    spill = max(r.get("spill_bytes", 0) for r in recs)
    rows.append((labels[0], f"{spill} B ({len(recs)} kernels)", "0 B", spill == 0, None))
    bits = [r.get("loop_load_bits") for r in recs if "linear" not in r["kernel"] and r.get("loop_load_bits")]
    rows.append((labels[1], f"{min(bits)} bits" if bits else None, ">= 128", bits and min(bits) >= 128,
                 None if bits else "no logits kernel in the compile report"))
    ns = [int(m) for r in recs if r["kernel"] == "_linear_fwd_kernel" for s in r.get("mma") or []
          for m in re.findall(r"wgmma m\d+n(\d+)", s)]
    rows.append((labels[2], f"N = {min(ns)}" if ns else None, ">= 128", ns and min(ns) >= 128,
                 None if ns else "no wgmma in the linear forward's records"))
    return rows


def divergence(res):
    return [("divergence loss vs TRL's chunked divergence (time, memory)", None,
             "<= 0.8 x time, <= 1 x memory", None, "no device benchmark in bench/ records it yet")]


TARGETS = [cepo_logits_floor, cepo_logits_vs_eager, cepo_logits_memory, grpo_logits_vs_liger, linear_vs_cce,
           linear_half_zero_floor, linear_memory, step_peak, step_half_zero, compile_level, divergence]
