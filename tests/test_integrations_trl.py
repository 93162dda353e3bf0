"""CEPOTrainer (cepo_kernels.integrations.trl) on TRL's GRPOTrainer, offline on a CPU with a tiny model.

The kernels run through Triton's interpreter here (tests/conftest.py), so the shapes stay tiny: 8 completions
of <= 6 tokens, an 18-word vocabulary, a 1-layer Qwen2 with hidden size 16.
"""

from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed (pip install -e '.[trl]')")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecations, via TRL

from helpers import assert_close, err, ulps32  # noqa: E402
from trl_helpers import (  # noqa: E402
    always_right,
    boxed_reward,
    recording,
    tiny_config,
    tiny_dataset,
    tiny_model,
    tiny_tokenizer,
)

import cepo_ref  # noqa: E402
from cepo_kernels.integrations import trl as cepo_trl  # noqa: E402
from cepo_kernels.integrations.trl import head as trl_head  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _trainer(cls, tmp_path, reward=boxed_reward, dataset=None, chat=False, **kw):
    args = tiny_config(cepo_trl.CEPOConfig if cls is not cepo_trl.GRPOTrainer else cepo_trl.GRPOConfig,
                       tmp_path / "out", **kw)
    return recording(cls)(model=tiny_model(0), reward_funcs=reward, args=args,
                          train_dataset=dataset if dataset is not None else tiny_dataset(chat),
                          processing_class=tiny_tokenizer(chat))


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_config_and_trainer_checks(tmp_path):
    for kw, name in (({"lam0": 1.5}, "lam0"), ({"eps_w": 1.0}, "eps_w"), ({"t_warm": -1}, "t_warm"),
                     ({"teacher_template": " answer"}, "teacher_template"),
                     ({"teacher_template": "{question} {answer}"}, "teacher_template"),
                     ({"answer_column": ""}, "answer_column"),
                     ({"teacher_batch_size": 0}, "teacher_batch_size")):
        with pytest.raises(ValueError, match=name):
            tiny_config(cepo_trl.CEPOConfig, tmp_path, **kw)
    with pytest.raises(TypeError, match="lam0"):
        tiny_config(cepo_trl.CEPOConfig, tmp_path, lam0="0.5")
    with pytest.raises(ValueError, match="answer_column"):
        _trainer(cepo_trl.CEPOTrainer, tmp_path, dataset=tiny_dataset().rename_column("answer", "solution"))
    with pytest.raises(TypeError, match="CEPOConfig"):
        cepo_trl.CEPOTrainer(model=tiny_model(0), reward_funcs=boxed_reward, train_dataset=tiny_dataset(),
                             args=tiny_config(cepo_trl.GRPOConfig, tmp_path),
                             processing_class=tiny_tokenizer())


def test_trl_version_outside_range_fails_clearly(monkeypatch):
    import trl

    monkeypatch.delenv("CEPO_TRL_ALLOW_ANY_VERSION", raising=False)
    monkeypatch.setattr(trl, "__version__", "1.15.2")
    with pytest.raises(ImportError, match=r"TRL >= 1\.16, < 1\.17; found trl 1\.15\.2"):
        cepo_trl.check_trl_version()
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(ImportError, match="CEPO_TRL_ALLOW_ANY_VERSION"):
        cepo_trl.check_trl_version()
    monkeypatch.setenv("CEPO_TRL_ALLOW_ANY_VERSION", "1")
    cepo_trl.check_trl_version()


@pytest.mark.parametrize("prompts", ["plain", "conversational"])
def test_cepo_per_token_advantages(tmp_path, prompts):
    """2 steps: the loss gets [B, T] A_hat = cepo_advantages(A, teachers), unlike GRPO where Delta != 0."""
    tr = _trainer(cepo_trl.CEPOTrainer, tmp_path, lam0=0.5, t_warm=10, max_steps=2, chat=prompts != "plain")
    tr.train()
    assert tr.state.global_step == 2 and len(tr.scored) == 2 and len(tr.seen) == 2
    changed = 0
    for step, (rec, seen, hist) in enumerate(zip(tr.scored, tr.seen, tr.history, strict=True)):
        adv, a_hat, mask = rec["adv"], rec["a_hat"], rec["mask"]
        B, T = mask.shape
        assert hist["lam"] == pytest.approx(0.5 * (1 - step / 10))
        assert seen["advantages"].shape == (B, T)  # per token, as handed to TRL's loss (rows shuffled by TRL)
        assert torch.equal(seen["advantages"].flatten().sort().values, a_hat.flatten().sort().values)
        active = [i for i in range(B) if adv[i] != 0]
        assert rec.get("rows", []) == active  # teachers ran for exactly the rows with A != 0
        pos, neg = torch.zeros(B, T), torch.zeros(B, T)
        if active:
            pos[active], neg[active] = rec["pos"], rec["neg"]
        check_a_hat(a_hat, adv, pos, neg, mask, hist["lam"])
        evidence = mask & (pos != neg) & (adv[:, None] != 0)
        grpo = adv[:, None].expand(B, T)
        changed += int((a_hat != grpo)[evidence].sum())
        assert torch.all(a_hat[~mask] == 0) and torch.all(torch.sign(a_hat[mask]) == torch.sign(grpo[mask]))
        assert (a_hat != grpo)[evidence].all()  # wherever the teachers disagree, CEPO differs from GRPO
    assert changed > 0
    logged = [h for h in tr.state.log_history if "loss" in h]
    assert [h["cepo/lambda"] for h in logged] == pytest.approx([0.5, 0.45])
    for key in ("cepo/teacher_rows", "cepo/delta_mean_pos", "cepo/delta_mean_neg", "cepo/frac_wrong_dir"):
        assert all(key in h for h in logged), key


def check_a_hat(a_hat, adv, pos, neg, mask, lam):
    """The trainer's A_hat against cepo_ref.cepo_advantages of the same inputs, by the house rule (its error
    against the float64 reference within twice float32 torch's, plus an ulp of |A|)."""
    ref = [cepo_ref.cepo_advantages(adv.to(d), pos.to(d), neg.to(d), mask, lam=lam, eps_w=0.2)
           for d in (torch.float64, torch.float32)]
    assert_close(a_hat, *ref, atol=ulps32(adv), name="A_hat")


def test_lam0_zero_equals_grpo_trainer(tmp_path):
    """Bit-exact by construction: with lambda = 0 CEPOTrainer runs no teacher pass and hands the loss A
    broadcast over the tokens (A * mask, the same floats GRPO's [B] advantages broadcast to), so both trainers
    do the same float operations in the same order."""
    grpo = _trainer(cepo_trl.GRPOTrainer, tmp_path / "grpo", max_steps=2)
    grpo.train()
    cepo = _trainer(cepo_trl.CEPOTrainer, tmp_path / "cepo", max_steps=2, lam0=0.0)
    cepo.train()
    assert cepo.teacher_calls == 0 and all(h["teacher_rows"] == 0 for h in cepo.history)
    assert _losses(cepo) == _losses(grpo) and len(_losses(cepo)) == 2
    for a, b in zip(cepo.seen, grpo.seen, strict=True):
        assert a["advantages"].dim() == 2 and b["advantages"].dim() == 1
        assert torch.equal(a["advantages"], b["advantages"][:, None] * a["mask"])
    for (n, p), (_, q) in zip(cepo.model.named_parameters(), grpo.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_all_correct_groups_get_zero_advantage_and_no_teacher_pass(tmp_path):
    tr = _trainer(cepo_trl.CEPOTrainer, tmp_path / "all", reward=always_right, max_steps=2)
    tr.train()
    assert tr.teacher_calls == 0
    assert all(h["neg_how"] == ["all-correct"] and h["teacher_rows"] == 0 for h in tr.history)
    assert all(torch.all(s["advantages"] == 0) for s in tr.seen)

    # one all-correct group ("1 plus 1": always rewarded) beside a mixed one in the same batch
    def reward(completions, answer, prompts, **kw):
        scores = boxed_reward(completions, answer)
        return [1.0 if "1 plus 1" in p else r for p, r in zip(prompts, scores, strict=True)]

    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": "what is 1 plus 1 ?", "answer": "2"},
                            {"prompt": "what is 1 plus 2 ?", "answer": "3"}])
    tr = _trainer(cepo_trl.CEPOTrainer, tmp_path / "mixed", reward=reward, dataset=ds, max_steps=2,
                  per_device_train_batch_size=16, lam0=0.5)
    tr.train()
    mixed_seen = 0
    for rec, hist in zip(tr.scored, tr.history, strict=True):
        for g in range(2):
            rows = range(8 * g, 8 * g + 8)
            if hist["neg_how"][g] == "all-correct":
                assert all(rec["adv"][i] == 0 and torch.all(rec["a_hat"][i] == 0) for i in rows)
                assert not set(rows) & set(rec.get("rows", []))
            elif any(rec["adv"][i] != 0 for i in rows):
                mixed_seen += 1
                assert {i for i in rows if rec["adv"][i] != 0} <= set(rec["rows"])
        assert "all-correct" in hist["neg_how"]
    assert mixed_seen > 0


def test_kernel_logprobs_match_trl_head(tmp_path, monkeypatch):
    """cepo_kernel_logprobs=True (linear_logprobs / linear_teacher_logprobs) against TRL's own chunked head.
    Each teacher launch's log-probs against float64 torch on the same inputs (the house rule); then the
    first step, where both runs start from the same parameters and completions, against the TRL head's run:
    the teachers' log-probs within the kernel's error plus torch's own (3 x torch's float32 error), A_hat
    equal to cepo_ref's of the run's own log-probs, and the loss (on-policy, beta = 0: minus a weighted mean
    of A_hat whose weights sum to 1) within the largest A_hat difference plus the rounding of its sum."""
    calls = {"linear_logprobs": 0, "linear_teacher_logprobs": 0}
    launches = []  # each teacher launch: its inputs and outputs

    def counting(name, real):
        def counted(*args, **kwargs):
            calls[name] += 1
            out = real(*args, **kwargs)
            if name == "linear_teacher_logprobs":
                # copies: the weight is the live parameter, which the optimizer updates in place
                launches.append(([t.detach().clone() for t in args], kwargs, out))
            return out

        return counted

    for name in calls:
        monkeypatch.setattr(trl_head, name, counting(name, getattr(trl_head, name)))
    runs = []
    for kernels in (False, True):
        tr = _trainer(cepo_trl.CEPOTrainer, tmp_path / f"k{kernels}", cepo_kernel_logprobs=kernels)
        tr.train()
        runs.append(tr)
    base, fused = runs
    # the loss of each step (no old log-probs needed: one update per generation) and the teachers ran on them
    assert calls["linear_logprobs"] == 2 and calls["linear_teacher_logprobs"] >= 1
    assert any(s.get("rows") for s in fused.scored)  # the kernels scored teacher rows
    torch_err = 0.0
    for (pos_h, neg_h, w, targets), kw, outs in launches:
        rows = kw["rows"].bool() & (targets >= 0)
        for h, out in zip((pos_h, neg_h), outs, strict=True):
            ref = [cepo_ref.linear_logprobs(h.to(d), w.to(d), targets.clamp_min(0), bias=kw["bias"],
                                            temperature=kw["temperature"]).masked_fill(~rows, 0.0)
                   for d in (torch.float64, torch.float32)]
            assert_close(out, *ref, atol=ulps32(ref[0]), name="teacher log-probs")
            torch_err = max(torch_err, err(ref[1], ref[0]))
    for run in runs:
        for rec, hist in zip(run.scored, run.history, strict=True):
            pos, neg = torch.zeros_like(rec["a_hat"]), torch.zeros_like(rec["a_hat"])
            if rec.get("rows"):
                pos[rec["rows"]], neg[rec["rows"]] = rec["pos"], rec["neg"]
            check_a_hat(rec["a_hat"], rec["adv"], pos, neg, rec["mask"], hist["lam"])
    a, b = fused.scored[0], base.scored[0]
    assert a.get("rows") == b.get("rows") and torch.equal(a["adv"], b["adv"])
    if b.get("rows"):
        for key in ("pos", "neg"):
            assert err(a[key], b[key]) <= 3 * torch_err + ulps32(b[key]), key
    n = int(b["mask"].sum())
    bound = err(a["a_hat"], b["a_hat"]) + ulps32(b["a_hat"], n)  # (n - 1) roundings of a sum of n terms
    assert abs(_losses(fused)[0] - _losses(base)[0]) <= bound


@pytest.mark.parametrize("kw", [{"steps_per_generation": 2, "gradient_accumulation_steps": 1},
                                {"num_iterations": 2}])
def test_lambda_counts_generation_batches_not_optimizer_steps(tmp_path, kw):
    """4 optimizer steps, one generation batch every 2: lambda(0), lambda(0), lambda(1), lambda(1)
    (docs/method.md §7: lambda counts rollout batches), and the A_hat of a batch is computed when it is
    generated."""
    tr = _trainer(cepo_trl.CEPOTrainer, tmp_path, max_steps=4, lam0=0.5, t_warm=4,
                  per_device_train_batch_size=4 if "steps_per_generation" in kw else 8, **kw)
    tr.train()
    assert [h["step"] for h in tr.history] == [0, 1]
    assert [h["lam"] for h in tr.history] == [0.5, 0.5 * (1 - 1 / 4)]
    assert len(tr.seen) == 4 and tr.state.global_step == 4


def test_default_config_without_args(tmp_path, monkeypatch):
    """No `args`: a default CEPOConfig named after the model, as GRPOTrainer builds its GRPOConfig (here with
    the CPU defaults this machine needs: TRL's own default asks for bf16 on a GPU)."""
    from dataclasses import dataclass

    from cepo_kernels.integrations.trl import trainer as trl_trainer

    @dataclass
    class CPUConfig(cepo_trl.CEPOConfig):
        use_cpu: bool = True
        bf16: bool = False
        report_to: str = "none"

    monkeypatch.setattr(trl_trainer, "CEPOConfig", CPUConfig)
    monkeypatch.chdir(tmp_path)
    tr = cepo_trl.CEPOTrainer(model=tiny_model(0), reward_funcs=boxed_reward, train_dataset=tiny_dataset(),
                              processing_class=tiny_tokenizer())
    assert type(tr.args) is CPUConfig and tr.args.output_dir.endswith("-CEPO")
    assert (tr.args.lam0, tr.args.t_warm, tr.args.eps_w) == (0.5, 25, 0.2)


LOSS_TYPES = ["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_trains_on_per_token_advantages(tmp_path, loss_type):
    kw = {"importance_sampling_level": "sequence"} if loss_type == "luspo" else {}
    tr = _trainer(cepo_trl.CEPOTrainer, tmp_path, max_steps=1, loss_type=loss_type, **kw)
    tr.train()
    assert tr.seen[0]["advantages"].dim() == 2 and all(map(torch.isfinite, map(torch.tensor, _losses(tr))))
    assert any(s.get("rows") for s in tr.scored)


@pytest.mark.parametrize("kw", [{"importance_sampling_level": "sequence", "loss_type": "grpo"},
                                {"mask_truncated_completions": True, "max_completion_length": 2},
                                {"beta": 0.1}])
def test_gspo_truncation_masking_and_reference_model(tmp_path, kw):
    """GSPO (sequence-level ratio), mask_truncated_completions and a KL to a reference model (beta > 0, the
    reference loaded by TRL from the policy's path) with CEPO's per-token A_hat."""
    if kw.get("beta"):
        tiny_model(0).save_pretrained(tmp_path / "policy")
        tr = recording(cepo_trl.CEPOTrainer)(
            model=str(tmp_path / "policy"), reward_funcs=boxed_reward, train_dataset=tiny_dataset(),
            args=tiny_config(cepo_trl.CEPOConfig, tmp_path / "out", max_steps=2, **kw),
            processing_class=tiny_tokenizer())
    else:
        tr = _trainer(cepo_trl.CEPOTrainer, tmp_path, max_steps=2, **kw)
    tr.train()
    for rec in tr.scored:
        rows = set(rec.get("rows") or [])
        assert rows == {i for i in range(len(rec["adv"])) if rec["adv"][i] != 0 and rec["mask"][i].any()}
        # GSPO / truncation keep A_hat per token: 0 at masked tokens, sign(A) elsewhere
        assert torch.all(rec["a_hat"][~rec["mask"]] == 0)
        assert torch.all(torch.sign(rec["a_hat"][rec["mask"]]) == torch.sign(
            rec["adv"][:, None].expand_as(rec["a_hat"])[rec["mask"]]))
    if kw.get("beta"):
        assert tr.ref_model is not None and any("kl" in h for h in tr.state.log_history)
    assert all(map(lambda x: x == x, _losses(tr)))


def test_peft_lora(tmp_path):
    peft = pytest.importorskip("peft")
    args = tiny_config(cepo_trl.CEPOConfig, tmp_path / "out", max_steps=1)
    tr = recording(cepo_trl.CEPOTrainer)(
        model=tiny_model(0), reward_funcs=boxed_reward, args=args, train_dataset=tiny_dataset(),
        processing_class=tiny_tokenizer(),
        peft_config=peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    tr.train()
    assert any(s.get("rows") for s in tr.scored) and len(_losses(tr)) == 1


def test_constructor_forms_of_grpo_trainer(tmp_path):
    """As GRPOTrainer accepts them: positional (model, reward_funcs, args), a model path with no
    processing_class (TRL loads the tokenizer saved beside it), and a list of reward functions with
    weights."""
    tiny_model(0).save_pretrained(tmp_path / "policy")
    tiny_tokenizer().save_pretrained(tmp_path / "policy")
    args = tiny_config(cepo_trl.CEPOConfig, tmp_path / "a", max_steps=1)
    positional = cepo_trl.CEPOTrainer(tiny_model(0), boxed_reward, args, tiny_dataset(),
                                      processing_class=tiny_tokenizer())
    assert positional.args is args
    tr = recording(cepo_trl.CEPOTrainer)(
        model=str(tmp_path / "policy"), reward_funcs=[boxed_reward, always_right],
        train_dataset=tiny_dataset(),
        args=tiny_config(cepo_trl.CEPOConfig, tmp_path / "b", max_steps=1, reward_weights=[1.0, 0.5]))
    assert tr.processing_class.name_or_path == str(tmp_path / "policy")
    tr.train()
    assert len(_losses(tr)) == 1 and tr.history[0]["teacher_rows"] > 0
