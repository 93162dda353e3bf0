"""CEPOTrainer's opsd and sdpo modes and FusedSDPOTrainer (cepo_kernels.integrations.trl), offline on a CPU.

Tiny models as in tests/test_integrations_trl.py (tests/trl_helpers.py): 8 completions of <= 6 tokens, an
18-word vocabulary, a 1-layer Qwen2 with hidden size 16.
"""

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed (pip install -e '.[trl]')")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

from helpers import assert_close, assert_within_order_noise, ulps32  # noqa: E402
from test_integrations_trl_distributed import _torchrun, reference_runs  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl_helpers import any_boxed, tiny_config, tiny_dataset, tiny_model, tiny_tokenizer  # noqa: E402

import cepo_ref  # noqa: E402
from cepo_kernels.integrations import trl as cepo_trl  # noqa: E402
from cepo_kernels.step.distill import successful_peer  # noqa: E402
from cepo_kernels.step.distill_templates import OPSD_TEMPLATE, SDPO_TEMPLATE  # noqa: E402

boxed_any = any_boxed


def first_boxed(completions, **kwargs):
    """1 for the first completion of the batch with a \\boxed{} only: one success, whose own row has no
    successful peer (never itself), while every other row has it."""
    hits = boxed_any(completions)
    first = hits.index(1.0) if 1.0 in hits else None
    return [float(i == first) for i in range(len(hits))]


class Stash(cepo_trl.CEPOTrainer):
    """Keeps the first micro-batch the distillation loss sees, and records the policy and the teacher copy
    after every optimizer step."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.first_inputs, self.snapshots = None, []
        trainer = self

        class Snap(TrainerCallback):  # added after the teacher's own callback: sees the moved copy
            def on_step_end(self, args, state, control, **kwargs):
                copy = trainer.distill_teacher.copy
                trainer.snapshots.append(([p.detach().clone() for p in trainer.model.parameters()],
                                          None if copy is None else [p.clone() for p in copy.parameters()]))

        self.add_callback(Snap())

    def _distill_loss(self, model, inputs):
        if self.first_inputs is None:
            self.first_inputs = {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
        return super()._distill_loss(model, inputs)


def _trainer(tmp_path, chat=False, reward=boxed_any, dataset=None, **kw):
    args = tiny_config(cepo_trl.CEPOConfig, tmp_path / "out", **kw)
    return Stash(model=tiny_model(0), reward_funcs=reward, args=args,
                 train_dataset=dataset if dataset is not None else tiny_dataset(chat),
                 processing_class=tiny_tokenizer(chat))


def _logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def test_config_checks(tmp_path):
    for kw, name in (({"algo": "nope"}, "algo"), ({"algo": "rlsd"}, "algo"), ({"algo": "grpo"}, "algo"),
                     ({"algo": "opsd", "distill_beta": 1.5}, "distill_beta"),
                     ({"algo": "sdpo", "distill_teacher": "frozen"}, "distill_teacher"),
                     ({"algo": "sdpo", "sdpo_topk": -1}, "sdpo_topk"),
                     ({"algo": "sdpo", "sdpo_is_clip": 0.0}, "sdpo_is_clip"),
                     ({"algo": "sdpo", "distillation_weight": 2.0}, "distillation_weight"),
                     ({"algo": "sdpo", "distill_ema_rate": 0.0}, "distill_ema_rate"),
                     ({"algo": "opsd", "opsd_template": "{question} solve it"}, "opsd_template"),
                     ({"algo": "sdpo", "sdpo_template": "{question} {peer}"}, "sdpo_template")):
        with pytest.raises(ValueError, match=name):
            tiny_config(cepo_trl.CEPOConfig, tmp_path, **kw)
    # the authors' teacher weights by default, any of them on request
    assert tiny_config(cepo_trl.CEPOConfig, tmp_path, algo="opsd").options.distill_teacher == "initial"
    assert tiny_config(cepo_trl.CEPOConfig, tmp_path, algo="sdpo").options.distill_teacher == "ema"
    cfg = tiny_config(cepo_trl.CEPOConfig, tmp_path, algo="opsd", distill_teacher="live")
    assert cfg.options.distill_teacher == "live" and cfg.options.distill_beta == 0.5
    sd = tiny_config(cepo_trl.CEPOConfig, tmp_path, algo="sdpo").options
    assert (sd.sdpo_topk, sd.sdpo_is_clip, sd.distill_ema_rate, sd.distillation_weight) == \
        (100, 2.0, 0.05, 1.0)
    # opsd reads the reference answers; sdpo does not need them
    no_answers = tiny_dataset().rename_column("answer", "solution")
    with pytest.raises(ValueError, match="answer_column"):
        _trainer(tmp_path, dataset=no_answers, algo="opsd")
    _trainer(tmp_path, dataset=no_answers, algo="opsd", answer_column="solution")
    _trainer(tmp_path, dataset=no_answers, algo="sdpo")


def test_opsd_trains_on_reference_contexts(tmp_path):
    """opsd, 2 steps: every row's teacher reads the prompt re-asked with its reference answer; the frozen
    initial teacher (a copy: no LoRA) stays put while the policy moves; the divergence metrics are logged."""
    tr = _trainer(tmp_path, algo="opsd", max_steps=2)
    initial = [p.detach().clone() for p in tr.model.parameters()]
    tr.train()
    tok, last = tr._tokenizer, tr.distill_last
    batch = last["batch"]
    assert last["rows"] == [i for i in range(8) if bool(batch.mask[i].any())] and last["rows"]
    for i, prefix in zip(last["rows"], last["prefixes"], strict=True):
        question = tok.decode(batch.prompt_ids[i])
        message = OPSD_TEMPLATE.replace("{question}", question).replace("{answer}", batch.references[i])
        assert prefix == tok(message)["input_ids"]  # TRL's own rendering of a plain prompt
        assert batch.references[i] in tok.decode(prefix)
    logs = _logs(tr)
    assert len(logs) == 2
    for h in logs:
        assert h["distill/teacher_rows"] == 8 and h["distill/tokens"] > 0
        assert h["distill/divergence_mean"] > 0 and h["distill/is_weight_mean"] == 1.0
        assert h["distill/is_clip_frac"] == 0.0
        assert h["loss"] == pytest.approx(h["distill/divergence_mean"], rel=1e-5)  # token-mean, weight 1
    assert any(not torch.equal(p, q) for p, q in zip(tr.model.parameters(), initial, strict=True))
    for p, q in zip(tr.distill_teacher.copy.parameters(), initial, strict=True):
        assert torch.equal(p, q)


def test_sdpo_trains_on_peer_contexts(tmp_path):
    """sdpo, conversational prompts, 2 steps: a row's teacher reads the prompt re-asked with the first
    successful rollout of its group other than itself; rows without one get no teacher and no loss; the
    EMA copy moves by 0.05 of the way to the policy after every optimizer step."""
    tr = _trainer(tmp_path, chat=True, reward=first_boxed, algo="sdpo", sdpo_topk=5, max_steps=2)
    tr.train()
    tok, last = tr._tokenizer, tr.distill_last
    batch = last["batch"]
    expected = []
    for i in range(8):
        peer = successful_peer(batch.rewards, list(range(8)), i)
        if peer is not None and bool(batch.mask[i].any()):
            expected.append((i, peer))
    assert [i for i, _ in expected] == last["rows"]
    success = batch.rewards.index(1.0)
    assert success not in last["rows"] and len(expected) >= 5  # the success itself has no successful peer
    for (i, peer), prefix in zip(expected, last["prefixes"], strict=True):
        assert peer != i and batch.rewards[peer] >= 0.5
        question = tok.decode(batch.prompt_ids[i]).strip()
        message = SDPO_TEMPLATE.replace("{question}", question).replace("{answer}", batch.texts[peer])
        assert prefix == tok.apply_chat_template([{"role": "user", "content": message}],
                                                 add_generation_prompt=True, tokenize=True)["input_ids"]
    inputs = tr.first_inputs
    lens = inputs["distill_prefix_len"]
    assert int((lens > 0).sum()) <= 8 and inputs["distill_tokens"].ndim == 0
    for h in _logs(tr):
        assert all(f"distill/{k}" in h for k in ("divergence_mean", "is_weight_mean", "is_clip_frac"))
        assert h["distill/tokens"] > 0
    # the EMA teacher: t_k = t_{k-1} + 0.05 (p_k - t_{k-1}) after each optimizer step
    before = [p.detach().clone() for p in tiny_model(0).parameters()]
    for params, copy in tr.snapshots:
        for t, b, p in zip(copy, before, params, strict=True):
            torch.testing.assert_close(t, b + 0.05 * (p - b), rtol=0, atol=4 * ulps32(p) + 1e-12)
        before = copy
    assert any(not torch.equal(t, b) for t, b in zip(tr.snapshots[-1][1], tiny_model(0).parameters(),
                                                     strict=True))


@pytest.mark.parametrize("algo", ["opsd", "sdpo"])
def test_loss_equals_reference(tmp_path, algo):
    """The trainer's distillation loss and its lm_head gradient on a micro-batch equal
    cepo_ref.linear_divergence_loss on the same student and teacher hidden states (house rule); sdpo with
    the top-k (5 of 18) + tail and rollout log-probs on both sides of the importance clip."""
    kw = dict(sdpo_topk=5, distill_teacher="live") if algo == "sdpo" else dict(distill_teacher="live")
    tr = _trainer(tmp_path, algo=algo, max_steps=1, **kw)
    tr.train()
    inputs = dict(tr.first_inputs)
    model = tr.model
    with torch.no_grad():  # sharper distributions than the random init's, for a loss well above rounding
        model.lm_head.weight.mul_(8.0)
    R = inputs["completion_ids"].size(1)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        hidden = tr._cepo_hidden(model, ids, attn, R)
        teacher_hidden = tr._distill_teacher_hidden(inputs, hidden, inputs["distill_prefix_len"])
    targets = inputs["completion_ids"]
    W = model.lm_head.weight
    logp = cepo_ref.linear_logprobs(hidden.double(), W.detach().double(), targets, temperature=tr.temperature)
    kw_ref = {}
    if algo == "sdpo":
        g = torch.Generator().manual_seed(0)
        old = (logp.float() + (torch.rand(targets.shape, generator=g) * 3.0 - 1.5)).detach()
        inputs["old_per_token_logps"] = old
        kw_ref = dict(targets=targets, old_logp=old, is_clip=2.0, topk=5, topk_from="student", add_tail=True)
    dm = inputs["completion_mask"].bool() & (inputs["distill_prefix_len"] > 0)[:, None]
    scale = tr.args.steps_per_generation / tr.current_gradient_accumulation_steps if model.training else 1.0
    num_tokens = float(inputs["distill_tokens"].clamp_min(1.0)) / scale
    model.zero_grad()
    loss = tr._distill_loss(model, inputs)
    loss.backward()
    refs = {}
    for dtype in (torch.float64, torch.float32):
        w = W.detach().to(dtype).requires_grad_(True)
        out = cepo_ref.linear_divergence_loss(hidden.to(dtype), teacher_hidden.to(dtype), w, dm, beta=0.5,
                                              temperature=tr.temperature, reduction="token-mean",
                                              num_tokens=num_tokens, **kw_ref)
        out.loss.backward()
        refs[dtype] = (out.loss.detach(), w.grad)
    if algo == "sdpo":  # both sides of the clip were exercised
        ratio = torch.exp(logp.float() - old)[dm]
        assert bool((ratio > 2.0).any()) and bool((ratio < 2.0).any())
    assert float(refs[torch.float64][0]) > 100 * ulps32(refs[torch.float64][0])
    (l64, g64), (l32, g32) = refs[torch.float64], refs[torch.float32]
    assert_close(loss.detach(), l64, l32, name="loss")  # the house rule's atol, as tests/test_divergence
    assert_close(W.grad, g64, g32, name="lm_head gradient")


# ---- FusedSDPOTrainer: TRL's SDPOTrainer with the fused head ---------------------------------------------


def _sdpo_batch(V, B=4, P=5, R=6):
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_ids[0, :2], prompt_mask[0, :2] = 0, 0  # left padding
    comp = torch.randint(3, V, (B, R), generator=g)
    cm = torch.ones(B, R, dtype=torch.long)
    comp[1, 4:], cm[1, 4:] = 0, 0  # right padding
    tp = torch.randint(3, V, (B, P + 2), generator=g)  # another prompt, the same completion
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=comp, completion_mask=cm,
                teacher_input_ids=torch.cat([tp, comp], 1),
                teacher_attention_mask=torch.cat([torch.ones_like(tp), cm], 1),
                self_distillation_mask=torch.tensor([1.0, 1.0, 0.0, 1.0]),
                old_per_token_logps=-torch.rand(B, R, generator=g) * 6.0)


@pytest.mark.parametrize("mode", ["topk_logits", "full_logits"])
def test_fused_sdpo_equals_trl(tmp_path, mode):
    """FusedSDPOTrainer's loss and parameter gradients equal TRL's own SDPOTrainer.compute_loss on the same
    batch and weights (house rule against TRL's loss in float64): an EMA teacher copy with its own weights
    (its own lm_head), top-k 5 + tail or the full vocabulary, JSD 0.5, temperature 0.9, IS clip 2."""
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    path = tmp_path / "tiny"
    tiny_model(0).save_pretrained(path)
    tok = tiny_tokenizer()
    args = tiny_config(SDPOConfig, tmp_path / "out", distillation_mode=mode, distillation_alpha=0.5,
                       distillation_topk=5 if mode == "topk_logits" else None, distillation_add_tail=True,
                       distillation_is_clip=2.0, teacher_model_kind="ema", temperature=0.9)
    tr = cepo_trl.FusedSDPOTrainer(model=str(path), reward_funcs=boxed_any, args=args,
                                   train_dataset=tiny_dataset(), processing_class=tok)
    assert tr.teacher_model is not tr.model and tr.fused_loss_applies()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        tr.model.lm_head.weight.mul_(8.0)
        tr.teacher_model.lm_head.weight.mul_(6.0)  # its own head, sharper than the student's
        for p in tr.teacher_model.model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    inputs = _sdpo_batch(18)
    model = tr.model

    def run(loss_fn, dtype):
        model.to(dtype), tr.teacher_model.to(dtype)
        batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        model.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    fused = run(tr.compute_loss, torch.float32)
    trl32 = run(lambda m, b: SDPOTrainer.compute_loss(tr, m, b), torch.float32)
    trl64 = run(lambda m, b: SDPOTrainer.compute_loss(tr, m, b), torch.float64)
    assert float(trl64[0]) > 100 * ulps32(trl64[0])
    assert_close(fused[0], trl64[0], trl32[0], name="loss")  # the house rule's atol, as tests/test_divergence
    for a, b64, b32 in zip(fused[1], trl64[1], trl32[1], strict=True):
        assert_close(a, b64, b32, name="parameter gradient")
    # what the fused head leaves to TRL: the same call as SDPOTrainer's
    tr.args.distillation_weight = 0.5
    assert not tr.fused_loss_applies()


def test_sdpo_blends_grpo_loss(tmp_path):
    """distillation_weight w: the loss is (1 - w) x GRPOTrainer's own loss + w x the distillation loss, on
    the same micro-batch; w = 0 is GRPO's loss alone."""
    tr = _trainer(tmp_path, algo="sdpo", sdpo_topk=5, distill_teacher="live", distillation_weight=0.25,
                  max_steps=1)
    tr.train()
    inputs, model = tr.first_inputs, tr.model
    with torch.no_grad():
        grpo = cepo_trl.GRPOTrainer._compute_loss(tr, model, inputs)
        distill = tr._distill_loss(model, inputs)
        blended = tr._compute_loss(model, inputs)
        assert float(distill) > 0 and float(grpo) != 0
        torch.testing.assert_close(blended, 0.75 * grpo + 0.25 * distill, rtol=0, atol=0)
        tr.args.distillation_weight = 0.0
        torch.testing.assert_close(tr._compute_loss(model, inputs), grpo, rtol=0, atol=0)


def test_opsd_lora_teacher_is_the_initial_policy(tmp_path):
    """opsd's default teacher on a LoRA policy: the adapter disabled (no copy), i.e. the initial weights,
    while the adapter trains."""
    from peft import LoraConfig

    args = tiny_config(cepo_trl.CEPOConfig, tmp_path / "out", algo="opsd", max_steps=1)
    tr = Stash(model=tiny_model(0), reward_funcs=boxed_any, args=args, train_dataset=tiny_dataset(),
               processing_class=tiny_tokenizer(),
               peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    teacher = tr.distill_teacher
    assert teacher.copy is None and teacher.disable
    lora = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "lora_" in n}
    tr.train()
    assert any(not torch.equal(p, lora[n]) for n, p in tr.model.named_parameters() if "lora_" in n)
    ids = torch.tensor([[3, 4, 7, 5, 8, 6]])
    model, context = teacher.model_and_context()
    with torch.no_grad(), context:
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, tiny_model(0)(input_ids=ids).logits.detach(), rtol=0, atol=0)
    with torch.no_grad():  # and the policy itself is not (its adapter is on, init_lora_weights=False)
        assert not torch.equal(tr.model(input_ids=ids).logits, got)


def test_sdpo_two_processes_match_one(tmp_path):
    """sdpo (EMA teacher, top-5 + tail) on 2 processes (DDP, gloo) x 4 completions vs 1 process x 8, each
    completion sampled with the seed of its global row: a group spans both ranks, so a row's successful peer
    may be the other rank's; the same teacher contexts for every row, SGD updates and losses. Updates: as
    tests/test_integrations_trl_distributed.py (within factor 2 of the same run reordered, plus an ulp of
    the parameter per step). Losses: the same factor, plus the float32 resolution of what the JSD sums:
    p log(p / M) terms with |log p| <= ln V for these near-uniform distributions, so eps32 x ln V; the loss
    itself (~5e-5, two nearly equal distributions) is far below the terms it is the sum of (measured: the
    2-process loss 3.2e-10 from the 1-process one, the reordered run's 3.6e-12)."""
    import json
    import math

    env = {"CEPO_TEST_ALGO": "sdpo"}
    two = tmp_path / "two"
    two.mkdir()
    proc = _torchrun(two, env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single, split = reference_runs(tmp_path, env, 8)
    r0, r1 = (json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == 2 and single["world_size"] == 1
    assert single["distill"] and {**r0["distill"], **r1["distill"]} == single["distill"] == split["distill"]
    assert set(r0["distill"]) <= {"0", "1", "2", "3"} and set(r1["distill"]) <= {"4", "5", "6", "7"}
    steps = len(single["losses"])
    assert steps == 2 and any(max(map(abs, u)) > 0 for u in single["updates"].values())
    for rank, r in enumerate((r0, r1)):
        assert_within_order_noise(r["losses"], single["losses"], split["losses"], floor=ulps32(math.log(18)),
                                  name=f"rank {rank} losses")
        for n, u in single["updates"].items():
            assert_within_order_noise(r["updates"][n], u, split["updates"][n],
                                      floor=ulps32(single["param_absmax"][n], steps), name=f"update of {n}")
