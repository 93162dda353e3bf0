"""Peak memory of one OPSD / SDPO update step of a Qwen3-4B-shaped model beside the CEPO step, fake tensors.

Same method, model and shapes as bench/memory_fake.py (its `trace`: transformers' own Qwen3ForCausalLM,
every tensor storage recorded, no weight allocated, full fine-tuning, no optimizer state, gradient
checkpointing, bf16): 4 sequences x (768 prompt + 2048 response) tokens. The distillation step (the
`cepo-train --algo opsd|sdpo` update, docs/divergence.md):

- one teacher forward without gradient over its context + the response: OPSD's context is the prompt
  re-asked with the reference solution (16 answer tokens, as the CEPO anchor's teachers, plus 48 tokens of
  template); SDPO's is the prompt re-asked with a successful peer's whole response (2048 tokens) plus 24
  tokens of template, so its teacher reads 768 + 2072 + 2048 tokens;
- the student's forward and backward through the divergence at the response positions: head `linear`
  (this package: `linear_divergence_loss` on the student's and the teacher's hidden states; OPSD the full
  JSD, SDPO the top-100 JSD with its tail bucket and importance weight) or `hf` (`model(...).logits` for
  both, then the divergence in eager fp32 torch, `cepo_ref.divergence_loss`: the [B, R, V] logits the
  official code bases and TRL's SDPO build);
- teacher weights (`--distill-teacher`): `live` (the policy itself) or a second bf16 copy of the model
  (`initial`, OPSD's default, a frozen copy under full fine-tuning; `ema`, SDPO's default), traced as
  a second fake model whose weights count in the peak.

    python bench/memory_fake_distill.py              # CEPO, OPSD and SDPO, live and copied teachers
    python bench/memory_fake_distill.py --head hf    # the same with full logits
Results: docs/divergence.md ("Memory of the 4B step").
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time

import torch
from memory_fake import ANCHOR, GiB, build, decoder, head_weight, one_step, to_fake, trace

import cepo_kernels as ck
import cepo_ref

TEMPLATE = {"opsd": 48, "sdpo": 24}  # tokens of each teacher template around the question and answer
CASES = (("cepo", "live"), ("opsd", "live"), ("opsd", "initial"), ("sdpo", "live"), ("sdpo", "ema"))


def teacher_context(algo, shape):
    """Tokens of the teacher's context before the response."""
    shown = shape["answer"] if algo == "opsd" else shape["response"]  # the reference, or a peer's response
    return shape["prompt"] + shown + TEMPLATE[algo]


def distill_step(model, head, shape, algo, teacher_meta=None):
    """OPSD's or SDPO's update step on `model` (the policy); the teacher is the policy itself, or a copy
    built from `teacher_meta` (a meta-device model) inside the trace, so its weights count."""
    B, P, R = shape["batch"], shape["prompt"], shape["response"]
    teacher = model
    if teacher_meta is not None:
        teacher = to_fake(teacher_meta, "full").requires_grad_(False).eval()
    targets, mask = torch.zeros(B, R, dtype=torch.long), torch.ones(B, R, dtype=torch.bool)
    kw = dict(beta=0.5, temperature=1.0, metrics=False)
    if algo == "sdpo":
        kw.update(topk=100, topk_from="student", add_tail=True, targets=targets, old_logp=torch.zeros(B, R),
                  is_clip=2.0)
    C = teacher_context(algo, shape)
    with torch.no_grad():
        ids = torch.zeros(B, C + R, dtype=torch.long)
        if head == "hf":
            t = teacher(input_ids=ids, use_cache=False).logits[:, C - 1:-1]
        else:
            t = decoder(teacher)(input_ids=ids, use_cache=False).last_hidden_state[:, C - 1:-1]
    ids = torch.zeros(B, P + R, dtype=torch.long)
    if head == "hf":
        logits = model(input_ids=ids, use_cache=False).logits[:, P - 1:-1]
        loss = cepo_ref.divergence_loss(logits, t, mask, **kw).loss
        del logits
    else:
        h = decoder(model)(input_ids=ids, use_cache=False).last_hidden_state[:, P - 1:-1]
        loss = ck.linear_divergence_loss(h, t, head_weight(model), mask, **kw).loss
        del h
    del t
    loss.backward()


def run_case(algo, teacher, head, dtype):
    if algo == "cepo":
        return trace(head, "full", dtype, ANCHOR, step_fn=one_step)
    meta = build("full", dtype) if teacher != "live" else None
    return trace(head, "full", dtype, ANCHOR, step_fn=functools.partial(distill_step, algo=algo,
                                                                         teacher_meta=meta))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head", choices=("linear", "hf"), default="linear")
    ap.add_argument("--case", action="append", choices=[f"{a}-{t}" for a, t in CASES],
                    help="algo-teacher (default: all)")
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args(argv)
    results = []
    for case in a.case or [f"{x}-{t}" for x, t in CASES]:
        algo, teacher = case.split("-")
        t0 = time.time()
        r = run_case(algo, teacher, a.head, torch.bfloat16)
        r.update(algo=algo, teacher=teacher, head=a.head, seconds=round(time.time() - t0, 1),
                 teacher_context=teacher_context(algo, ANCHOR) if algo != "cepo" else
                 ANCHOR["prompt"] + ANCHOR["answer"])
        results.append(r)
        print(f"{algo:5s} {teacher:8s} {a.head:7s} peak {r['peak'] / GiB:6.2f} GiB  policy weights "
              f"{r['weights'] / GiB:5.2f} GiB  ({r['seconds']} s)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(results=results, torch=torch.__version__, shape=ANCHOR), f, indent=1)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
