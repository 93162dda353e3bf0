"""Peak memory of one CEPO update step of a Qwen3-4B-shaped model, traced with fake tensors on any CPU.

The model is transformers' own Qwen3ForCausalLM built from Qwen3Config on the meta device, its parameters
then swapped for fake tensors (FakeTensorMode): no weight is allocated, every op runs its fake (shape-only)
implementation, and a dispatch mode (`Peak`) records every tensor storage as it is created and freed
(MemTracker's storage accounting, without its per-module bookkeeping, which refuses a module called twice
in a step). The step is the anchor of docs/peers.md: 4 sequences x (768 prompt + 2048 response) tokens,
teacher contexts of 768 + 16 answer tokens, two teacher forwards without gradient, then the policy's
forward and backward, gradient checkpointing, bf16, every parameter trainable, no optimizer state. Heads:

- hf:     HF logits (model(...).logits over every position) + log_softmax in fp32 (cepo_ref.token_logprobs),
          all three passes; the CEPO/PPO loss on the [B, R] log-probs in torch (`ppo_loss`).
- cce:    three cut-cross-entropy-style calls: each stores only fp32 per-row results (forward) and, for the
          policy, writes grad_hidden and grad_weight in the input dtype (backward): its kernels keep their
          logit tiles in shared memory/registers, so their global allocations are these outputs alone;
          the PPO on the [B, R] log-probs in torch.
- linear: this package (linear_teacher_logprobs for each teacher, linear_cepo_loss for the policy); the
          operators' fake implementations report their launchers' temporaries (the forward's split stats,
          the backward's G chunk at the GPU budget and its fp32 accumulators), counted on top of what is
          live at that moment (`Peak.workspace`).

Modes (--mode): full (the anchor: all parameters trainable, no optimizer state), lora (rank 16 on q, k, v,
o, gate, up, down via peft, fp32 adapters, AdamW state traced by one optimizer step), full-adamw (bf16
or --dtype float32 weights with torch AdamW, its state traced by one step).

    python bench/memory_fake.py                       # the three heads at the anchor, under a minute
    python bench/memory_fake.py --mode lora --head linear
Results: docs/memory.md ("One CEPO step of a Qwen3-4B-shaped model, traced with fake tensors").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import weakref

os.environ.setdefault("TRITON_INTERPRET", "1")  # importable without a GPU; fake tensors launch nothing

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
from torch.utils.weak import WeakIdKeyDictionary  # noqa: E402

import cepo_kernels as ck  # noqa: E402
import cepo_ref  # noqa: E402
from cepo_kernels.ops import _common  # noqa: E402

GiB = 2 ** 30
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                max_position_embeddings=40960)
ANCHOR = dict(batch=4, prompt=768, response=2048, answer=16)
HEADS = ("hf", "cce", "linear")


class Peak(TorchDispatchMode):
    """Live bytes of every tensor storage an op creates (or `add` registers), and their peak.

    A storage counts from its first sighting until it is freed (a weak reference's callback), at
    nbytes rounded up to the CUDA caching allocator's 512-byte blocks."""

    def __init__(self):
        super().__init__()
        self.seen = WeakIdKeyDictionary()
        self.live = self.peak = self.ws_peak = 0
        self.at = None  # the op at the peak
        self.op = None

    def add(self, *tensors):
        for t in tensors:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st in self.seen:
                    continue
                n = -(-st.nbytes() // 512) * 512
                self.seen[st] = n
                weakref.finalize(st, self._free, n)
                self.live += n
                if self.live > self.peak:
                    self.peak, self.at = self.live, self.op

    def workspace(self, nbytes):
        """Temporaries an operator allocates and frees inside itself (ops/_common.report_workspace)."""
        self.ws_peak = max(self.ws_peak, nbytes)
        if self.live + nbytes > self.peak:
            self.peak, self.at = self.live + nbytes, f"{self.op} (workspace)"

    def _free(self, n):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.op = str(func)
        out = func(*args, **(kwargs or {}))
        self.add(*tree_flatten(out)[0])
        return out


class _CCELike(torch.autograd.Function):
    """Cut-cross-entropy's global memory: fp32 [N] per-row results out; grad_hidden, grad_weight in."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        ctx.save_for_backward(hidden, weight)
        return hidden.new_empty(hidden.shape[0], dtype=torch.float32)  # logp; lse kept as in CCE:
        # one more [N] fp32, negligible

    @staticmethod
    def backward(ctx, grad):
        hidden, weight = ctx.saved_tensors
        return torch.empty_like(hidden), torch.empty_like(weight), None


def ppo_loss(logp, old, adv, mask, pos=None, neg=None, lam=0.5, eps=(0.2, 0.28), eps_w=0.2):
    """The CEPO/PPO token loss on [B, R] log-probs in torch (the cce head's loss; tiny tensors)."""
    a = adv[:, None].expand_as(logp)
    if pos is not None:
        w = torch.exp(torch.sign(a) * (pos - neg)).clamp(1 - eps_w, 1 + eps_w)
        a = a * ((1 - lam) + lam * w)
    ratio = torch.exp(logp - old)
    loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps[0], 1 + eps[1]))
    return (loss * mask).sum() / mask.sum().clamp_min(1)


def build(mode, dtype, lora_rank=16):
    """The model on the meta device (no memory), LoRA adapters added there (outside FakeTensorMode: peft moves
    each adapter to its base layer's device, which a fake parameter refuses)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = on_meta(Qwen3ForCausalLM, Qwen3Config(**QWEN3_4B), dtype)
    return with_lora(model, lora_rank) if mode == "lora" else model


def on_meta(cls, cfg, dtype):
    """cls(cfg) on the meta device with dtype parameters (no memory), SDPA attention."""
    cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return cls(cfg)
    finally:
        torch.set_default_dtype(old)


def with_lora(model, lora_rank, **options):
    """LoRA adapters (alpha = 2 x rank) on the attention and MLP projections, other peft options as given."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=targets,
                                            **options))


def to_fake(model, mode):
    """Every parameter and buffer replaced by a fake tensor (call inside FakeTensorMode)."""
    fakes = {}  # id(meta tensor) -> fake: a tied weight stays one tensor
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if id(p) not in fakes:
                fakes[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
            mod._parameters[name] = fakes[id(p)]
        for name, b in list(mod.named_buffers(recurse=False)):
            mod._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if mode == "lora":
        model.enable_input_require_grads()
    model.train()
    return model


def decoder(model):
    return model.get_base_model().model if hasattr(model, "get_base_model") else model.model


def head_weight(model):
    return model.get_output_embeddings().weight


def one_step(model, head, shape):
    B, P, R, A = shape["batch"], shape["prompt"], shape["response"], shape["answer"]
    V = QWEN3_4B["vocab_size"]
    targets = torch.zeros(B, R, dtype=torch.long)
    mask = torch.ones(B, R, dtype=torch.bool)
    adv = torch.ones(B)
    old = torch.zeros(B, R)
    w = head_weight(model)
    teachers = []
    with torch.no_grad():  # the two teacher passes: prompt + answer + response
        for _ in range(2):
            ids = torch.zeros(B, P + A + R, dtype=torch.long)
            if head == "hf":
                logits = model(input_ids=ids, use_cache=False).logits[:, P + A - 1:-1]
                teachers.append(cepo_ref.token_logprobs(logits, targets))
                del logits
                continue
            h = decoder(model)(input_ids=ids, use_cache=False).last_hidden_state[:, P + A - 1:-1]
            if head == "cce":
                teachers.append(_CCELike.apply(h.reshape(B * R, -1), w, targets.reshape(-1)).reshape(B, R))
            else:
                teachers.append(ck.linear_teacher_logprobs(h, None, w, targets)[0])
            del h
    ids = torch.zeros(B, P + R, dtype=torch.long)
    pos, neg = teachers
    if head == "hf":
        logits = model(input_ids=ids, use_cache=False).logits[:, P - 1:-1]
        loss = ppo_loss(cepo_ref.token_logprobs(logits, targets), old, adv, mask.float(), pos, neg)
        del logits
    else:
        h = decoder(model)(input_ids=ids, use_cache=False).last_hidden_state[:, P - 1:-1]
        if head == "cce":
            lp = _CCELike.apply(h.reshape(B * R, -1), w, targets.reshape(-1)).reshape(B, R)
            loss = ppo_loss(lp, old, adv, mask.float(), pos, neg)
        else:
            loss = ck.linear_cepo_loss(h, w, targets, adv, mask, old_logp=old, pos_logp=pos, neg_logp=neg,
                                       metrics=False).loss
        del h
    loss.backward()
    assert V == w.shape[0]


def trace(head, mode="full", dtype=torch.bfloat16, shape=ANCHOR, optimizer=False, build_fn=build,
          step_fn=one_step):
    """{peak, weights, after_step} in bytes for one step (and one AdamW step when `optimizer`); build_fn(mode,
    dtype) gives the model on the meta device (bench/memory_fake_vl.py passes a vision-language one);
    step_fn(model, head, shape) is the step (bench/memory_fake_distill.py passes OPSD's and SDPO's)."""
    model = build_fn(mode, dtype)
    with FakeTensorMode():
        model = to_fake(model, mode)
        tracker = Peak()
        tracker.add(*model.parameters(), *model.buffers())
        weights = tracker.live
        opt = None
        if optimizer:
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-6, foreach=False)
        _common.WORKSPACE_HOOKS.append(tracker.workspace)
        try:
            with tracker:
                step_fn(model, head, shape)
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=False)  # the gradients stay allocated (the next step's)
                    step_fn(model, head, shape)  # the second step holds the optimizer state throughout
        finally:
            _common.WORKSPACE_HOOKS.remove(tracker.workspace)
        peak = tracker.peak
        print(f"  peak at {tracker.at}; largest operator workspace {tracker.ws_peak / GiB:.2f} GiB",
              flush=True)
    return dict(peak=peak, weights=weights)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head", choices=HEADS, action="append", help="loss head(s); default: all three")
    ap.add_argument("--mode", choices=("full", "lora", "full-adamw"), default="full")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    results = []
    for head in a.head or HEADS:
        t0 = time.time()
        r = trace(head, a.mode, dtype, optimizer=a.mode != "full")
        r.update(head=head, mode=a.mode, dtype=a.dtype, seconds=round(time.time() - t0, 1))
        results.append(r)
        print(f"{a.mode:10s} {a.dtype:8s} {head:7s} peak {r['peak'] / GiB:6.2f} GiB  "
              f"weights {r['weights'] / GiB:5.2f} GiB  ({r['seconds']} s)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(results=results, torch=torch.__version__, shape=ANCHOR), f, indent=1)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
