"""One RL update step of a Qwen3-4B-shaped model: GRPO, CEPO, CEPO with half the groups at A = 0, naive CEPO.

GPU (the anchor shape of docs/peers.md): a Qwen3-4B-shaped model from its config with random weights,
bf16, gradient checkpointing; 768 prompt + 2048 response tokens, 16 answer tokens in the teacher contexts;
"4x1": 4 sequences with their own prompts, "1x8": 8 responses sharing one prompt (a group). Modes: LoRA
(rank 16, peft) and full-parameter. A step = the teacher passes (no grad) + the policy's forward and backward
(bench/step_harness.py), the old log-probs given; each result's extra_info holds the peak memory of one step
(peak_gib: all allocated, weights included, as the anchors' step table; peak_extra_gib: beyond what was live
before it) and the tokens run. `test_max_response_len` searches, by doubling, the longest response length
whose step fits in 80 GB (the card's memory capped with set_per_process_memory_fraction), bounded in time.
Run: `pytest bench/test_train_step.py --benchmark-columns=median,min,max`.

CPU (no GPU; tiny Qwen3 from its config, Triton interpreter): the token accounting of the shared-prefix path
and its equality with the plain path, for the policy, both teachers and the loss, LoRA and full.
"""

import copy
import gc
import importlib.util
import time

import pytest
import torch
from step_harness import (
    PAD,
    TokenCounter,
    context,
    forward_of,
    make_batch,
    old_logprobs,
    step,
    teacher_logprobs,
)

GIB = 2**30
ON_GPU = torch.cuda.is_available()
HAS_PEFT = importlib.util.find_spec("peft") is not None
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                max_position_embeddings=40960, rope_theta=1_000_000.0)
PROMPT, RESPONSE, ANSWER = 768, 2048, 16
SHAPES = {"4x1": (4, 1), "1x8": (1, 8)}  # (groups, responses per group)
CASES = [  # (case, algo, path, groups at A = 0 out of 4); a single group cannot have half its groups at A = 0
    ("grpo", "grpo", "shared", 0),
    ("cepo", "cepo", "shared", 0),
    ("cepo-half-zero", "cepo", "shared", 2),
    ("naive-cepo", "cepo", "naive", 0),
]
PARAMS = [pytest.param(shape, *case, id=f"{shape}-{case[0]}") for shape in SHAPES for case in CASES
          if not (shape == "1x8" and case[3])]


def build_model(config_kwargs, *, dtype, device, lora, checkpointing, seed=0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**config_kwargs, pad_token_id=0, attention_dropout=0.0)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    if checkpointing:  # as rl/model.load_model_and_tokenizer does
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora:
        from peft import LoraConfig, get_peft_model

        # init_lora_weights=False: random B too, so the adapters change the outputs (as after some training)
        model = get_peft_model(model, LoraConfig(r=lora, lora_alpha=2 * lora, target_modules=LORA_TARGETS,
                                                 init_lora_weights=False))
    return model


# ---------------------------------------------------------------- GPU: the 4B step


_HELD = {}  # one 4B model at a time (mode -> model), so no test measures memory with another one alive


def model_4b(mode):
    if mode == "lora" and not HAS_PEFT:
        pytest.skip("LoRA mode needs peft (pip install peft)")
    if mode not in _HELD:
        _HELD.clear()
        gc.collect()
        torch.cuda.empty_cache()
        _HELD[mode] = build_model(QWEN3_4B, dtype=torch.bfloat16, device="cuda",
                                  lora=16 if mode == "lora" else 0, checkpointing=True)
    return _HELD[mode]


def gpu_batch(shape, zero_groups, resp_len=RESPONSE):
    groups, size = SHAPES[shape]
    return make_batch(QWEN3_4B["vocab_size"], groups, size, PROMPT, resp_len, ANSWER, zero_groups=zero_groups,
                      seed=1, device="cuda")


def measure_step(model, batch, algo, path, old):
    """(peak GiB allocated, peak GiB beyond the live memory before it, tokens run) of one step."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    counter = TokenCounter(PAD).attach(model)
    try:
        step(model, batch, algo=algo, path=path, old=old, device="cuda")
    finally:
        counter.detach()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    model.zero_grad(set_to_none=True)
    return peak / GIB, (peak - base) / GIB, counter.tokens


@pytest.mark.parametrize("shape, case, algo, path, zero_groups", PARAMS)
@pytest.mark.parametrize("mode", ["lora", "full"])  # slowest-varying: each 4B model is built once
def test_step(benchmark, mode, shape, case, algo, path, zero_groups):
    model = model_4b(mode)
    batch = gpu_batch(shape, zero_groups)
    old = old_logprobs(model, batch, path, "cuda")
    peak, extra, tokens = measure_step(model, batch, algo, path, old)

    def run():
        step(model, batch, algo=algo, path=path, old=old, device="cuda")
        torch.cuda.synchronize()

    benchmark.extra_info.update(mode=mode, shape=shape, case=case, peak_gib=peak, peak_extra_gib=extra,
                                tokens_run=tokens, weights_gib=sum(p.numel() * p.element_size()
                                                                   for p in model.parameters()) / GIB)
    benchmark.pedantic(run, setup=lambda: model.zero_grad(set_to_none=True), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("path", ["shared", "naive"], ids=["cepo", "naive-cepo"])
def test_max_response_len(benchmark, path, budget_s=90.0, card_gb=80.0):
    """Doubling search from 2048 response tokens (4x1 shape, full parameters) until a step runs out of the
    memory of an 80 GB card or budget_s has passed; records the longest length that ran (max_fit) and the
    first that did not (first_oom, None when the time ran out first)."""
    model = model_4b("full")
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, card_gb * 1e9 / total))
    fit, oom, peaks, T, t0 = None, None, {}, RESPONSE, time.perf_counter()
    try:
        while time.perf_counter() - t0 < budget_s:
            batch = gpu_batch("4x1", 0, resp_len=T)
            try:
                old = old_logprobs(model, batch, path, "cuda")
                peaks[T] = measure_step(model, batch, "cepo", path, old)[0]
                fit = T
            except torch.OutOfMemoryError:
                oom = T
                break
            finally:
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
            T *= 2
        benchmark.extra_info.update(mode="full", case=path, max_fit=fit, first_oom=oom, card_gb=card_gb,
                                    peak_gib_by_len={str(k): v for k, v in peaks.items()},
                                    search_s=time.perf_counter() - t0)
        assert fit is not None, f"{path}: not even {RESPONSE} response tokens fit in {card_gb} GB"
        batch = gpu_batch("4x1", 0, resp_len=fit)
        old = old_logprobs(model, batch, path, "cuda")

        def run():
            step(model, batch, algo="cepo", path=path, old=old, device="cuda")
            torch.cuda.synchronize()

        benchmark.pedantic(run, setup=lambda: model.zero_grad(set_to_none=True), rounds=1)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- CPU: tiny config, accounting and equality

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, max_position_embeddings=64)


def tiny_model(mode):
    return build_model(TINY, dtype=torch.float32, device="cpu", lora=4 if mode == "lora" else 0,
                       checkpointing=False)


def tiny_batch(zero_groups=0):
    # 2 groups of 3 ragged responses (lengths in [3, 6]), prompts of 5, answers of 2 tokens
    return make_batch(TINY["vocab_size"], 2, 3, 5, 6, 2, zero_groups=zero_groups, ragged=True, seed=4)


@pytest.mark.cpu
@pytest.mark.parametrize("kind", ["policy", "pos", "neg"])
def test_cpu_shared_prefix_runs_fewer_tokens(kind):
    """Tokens fed to the model (counted at its embedding): the shared path runs each group's context once and
    never a response's last token (nothing follows it); the plain path runs every row's context in full."""
    model = tiny_model("full").eval()
    batch = tiny_batch()
    rows = list(range(len(batch.responses)))
    ran = {}
    for path in ("shared", "plain"):
        counter = TokenCounter(PAD).attach(model)
        with torch.no_grad():
            forward_of(model, batch, path, "cpu")([context(batch, kind, r) for r in rows],
                                                  [batch.responses[r] for r in rows])
        counter.detach()
        ran[path] = counter.tokens
    ctx = [len(context(batch, kind, r)) for r in rows]
    lens = [len(r) for r in batch.responses]
    R = max(lens)
    n_groups = len(batch.extra["pos_answers"])
    distinct = sum(len(context(batch, kind, g * batch.group_size)) for g in range(n_groups))
    assert ran["plain"] == sum(ctx) + sum(lens)
    assert ran["shared"] == distinct + sum(min(n, R - 1) for n in lens)
    assert ran["plain"] - ran["shared"] == (sum(ctx) - distinct) + sum(n == R for n in lens)
    assert ran["shared"] < ran["plain"]


@pytest.mark.cpu
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_cpu_shared_step_equals_plain(mode):
    """Old log-probs, both teachers' log-probs and the CEPO loss (half the groups at A = 0, their teachers
    skipped) of the shared path against a float64 run of the plain path (every context in full, padded, HF
    logits) of the same model: no further from it than torch's own fp32 plain run (err <= 2 x torch's error
    + atol). tests/test_rl_prefix.py compares the kernels' plain path too, and the gradients."""
    if mode == "lora" and not HAS_PEFT:
        pytest.skip("LoRA mode needs peft")
    model = tiny_model(mode)
    model64 = copy.deepcopy(model).double()
    batch = tiny_batch(zero_groups=1)
    lens = torch.tensor([len(r) for r in batch.responses])
    mask = torch.arange(int(lens.max()))[None] < lens[:, None]
    old64 = old_logprobs(model64, batch, "naive", "cpu")
    ref = dict(old=old64)
    ref["pos"], ref["neg"] = teacher_logprobs(model64, batch, "naive", old64, "cpu")
    got = {}
    for path in ("shared", "naive"):
        old = old_logprobs(model, batch, path, "cpu")
        pos, neg = teacher_logprobs(model, batch, path, old64.float(), "cpu")
        loss = step(model, batch, algo="cepo", path=path, old=old64.float(), backward=False)["loss"]
        got[path] = dict(old=old, pos=pos, neg=neg, loss=loss)
    batch64 = copy.copy(batch)
    batch64.advantages = batch.advantages.double()
    ref["loss"] = step(model64, batch64, algo="cepo", path="naive", old=old64, backward=False)["loss"]
    for key in ("old", "pos", "neg", "loss"):
        x, r, t = got["shared"][key], ref[key], got["naive"][key]
        if key != "loss":
            x, r, t = x[mask], r[mask], t[mask]
        e, e_torch = _err(x, r), _err(t, r)
        assert e <= 2 * e_torch + 1e-6, f"shared {key}: error {e:.2e} > 2 x torch's {e_torch:.2e} + 1e-6"
    # the rows at A = 0 had no teacher pass: pos = neg = old there
    zero = batch.advantages == 0
    assert torch.equal(got["shared"]["pos"][zero], old64.float()[zero])


def _err(x, ref):
    return float((x.double() - ref.double()).abs().max())

