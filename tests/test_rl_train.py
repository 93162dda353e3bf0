"""End-to-end runs of the training loop on the embedded task (tiny settings), resume, real checkpoints."""

import copy
import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_close

import cepo_kernels.rl.update as update_mod
from cepo_kernels.rl.checkpoint import resolve_checkpoint
from cepo_kernels.rl.cli import main
from cepo_kernels.rl.config import TrainConfig
from cepo_kernels.rl.options import parse_args
from cepo_kernels.rl.task import Problem, build_tiny_model, build_tokenizer
from cepo_kernels.rl.trainer import NaNLossError, Trainer
from cepo_kernels.step import (
    choose_negatives,
    group_advantages,
    lam_at,
    micro_batches,
    policy_logprobs,
    teacher_contexts,
    teacher_logprobs,
    teacher_rows,
)
from cepo_kernels.step.forward import lm_head

TINY = dict(steps=3, prompts_per_step=2, group_size=4, max_new_tokens=6, micro_batch_size=8,
            mini_batch_prompts=1, sft_steps=30, sft_batch_size=32, eval_every=3, eval_size=8, progress=False,
            lr=3e-4, t_warm=4, save_every=0)
METRIC_KEYS = ["step", "lambda", "lr", "reward_mean", "accuracy", "reward_errors", "delta_mean", "delta_std",
               "delta_mean_pos", "delta_mean_neg", "frac_wrong_dir", "clip_frac", "adv_abs_mean",
               "adv_hat_abs_mean", "entropy", "response_len_mean", "teacher_rows", "r_minus_fallbacks",
               "loss", "grad_norm", "tokens_per_s", "peak_mem_mb", "time_rollout", "time_teachers",
               "time_update"]


def tiny(tmp_path, name="run", **kw):
    return TrainConfig(**{**TINY, "out_dir": str(tmp_path / name), **kw})


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("algo", ["cepo", "rlsd", "grpo"])
def test_three_steps_write_metrics(tmp_path, algo):
    cfg = tiny(tmp_path, algo=algo, save_every=1, keep_last=2)
    summary = Trainer(cfg).train()
    out = tmp_path / "run"
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for k in METRIC_KEYS:
            assert k in r, k
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (k, r[k])
        assert 0.0 <= r["reward_mean"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
        assert 0.0 <= r["clip_frac"] <= 1.0 and 0.0 <= r["frac_wrong_dir"] <= 1.0
        assert r["response_len_mean"] > 0 and r["time_update"] > 0 and r["peak_mem_mb"] > 0
        assert r["skipped"] is False and r["reward_errors"] == 0
    expected_lam = [lam_at(s, 0.5, 4) for s in range(3)] if algo != "grpo" else [0.0] * 3
    assert [r["lambda"] for r in rows] == pytest.approx(expected_lam)
    assert expected_lam[:2] == ([0.5, 0.375] if algo != "grpo" else [0.0, 0.0])
    if algo == "grpo":  # no teachers: no evidence, A_hat = A
        assert all(r["teacher_rows"] == 0 and r["delta_std"] == 0.0 for r in rows)
        assert all(r["adv_hat_abs_mean"] == pytest.approx(r["adv_abs_mean"]) for r in rows)
    if algo != "grpo" and any(r["teacher_rows"] for r in rows):
        assert any(r["delta_std"] > 0 for r in rows if r["teacher_rows"])
    assert "eval_accuracy" in rows[-1] and 0.0 <= rows[-1]["eval_accuracy"] <= 1.0
    assert summary["steps_done"] == 3 and summary["reward_last"] == rows[-1]["reward_mean"]
    assert (out / "final_model" / "config.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    partial = out / "checkpoints" / ".tmp-step_000004-crashed"  # what a crash during a save leaves
    partial.mkdir()
    (partial / "model_state.pt").write_bytes(b"half")
    assert resolve_checkpoint(out) == out / "checkpoints" / "step_000003"


def test_resume_continues_exactly(tmp_path):
    straight = Trainer(tiny(tmp_path, "straight", steps=4, eval_every=2))
    straight.train()
    a = read_metrics(tmp_path / "straight" / "metrics.jsonl")

    first = Trainer(tiny(tmp_path, "split", steps=4, eval_every=2, keep_last=1))
    first.train(stop_after=2)
    assert not (tmp_path / "split" / "final_model").exists()
    ckpts = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert ckpts == ["step_000002"]  # atomic rename: no temporary directory is left behind
    cfg = parse_args(["--resume", str(tmp_path / "split")])  # the CLI path: the saved config comes back
    assert cfg == tiny(tmp_path, "split", steps=4, eval_every=2, keep_last=1, resume=str(tmp_path / "split"),
                       out_dir=None)  # the run continues where it is resumed from, not at a recorded out_dir
    resumed = Trainer(cfg)
    assert resumed.step_idx == 2 and resumed.out == tmp_path / "split"
    resumed.train()
    b = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for k in ("loss", "lambda", "lr", "reward_mean", "delta_mean", "clip_frac", "entropy", "grad_norm"):
            assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])
    assert a[-1]["eval_accuracy"] == b[-1]["eval_accuracy"]
    params = zip(straight.model.named_parameters(), resumed.model.named_parameters(), strict=True)
    for (n, p), (_, q) in params:
        assert torch.equal(p, q), n


def test_nan_loss_skips_then_aborts(tmp_path, monkeypatch, caplog):
    real = update_mod.policy_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan"))

    monkeypatch.setattr(update_mod, "policy_loss", poisoned)
    tr = Trainer(tiny(tmp_path, steps=5, max_nan_steps=2, sft_steps=0, eval_every=0))
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="cepo_kernels.rl"):
        with pytest.raises(NaNLossError, match="2 steps"):
            tr.train()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2 and all(r["skipped"] and r["nan_updates"] == 2 for r in rows)
    assert "non-finite loss" in caplog.text
    assert all(torch.equal(before[n], p) for n, p in tr.model.named_parameters())  # no update applied


def test_raising_reward_counts_errors(tmp_path):
    calls = {"n": 0}

    def flaky(text, ref):
        calls["n"] += 1
        if calls["n"] % 2:
            raise KeyError("grader crashed")
        return float(text.strip().endswith(ref + "}"))

    Trainer(tiny(tmp_path, steps=1, eval_every=0), reward_fn=flaky).train()
    (row,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert row["reward_errors"] == 4  # half of the 2 x 4 rollouts


def test_real_checkpoint_lora_jsonl(tmp_path, monkeypatch, capsys):
    """The --model / --data path: a Hugging Face directory written with save_pretrained, LoRA, custom keys,
    given relative to the working directory, with a reward module found there."""
    tok = build_tokenizer()
    model_dir = tmp_path / "hf-model"
    build_tiny_model(tok, seed=3).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{b}=", "solution": a + b}) + "\n"
                            for a in range(4) for b in range(4)))
    (tmp_path / "myreward.py").write_text(
        "def reward(text, ref):\n    return float(len(text) % 2)\n")  # a dense signal so teachers run
    monkeypatch.chdir(tmp_path)  # found in the working directory, without touching sys.path
    capsys.readouterr()
    rc = main(["--model", "hf-model", "--data", "train.jsonl", "--prompt-key", "question", "--answer-key",
               "solution", "--lora-rank", "4", "--lora-target-modules", "q_proj,v_proj", "--steps", "2",
               "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "5", "--eval-every", "2",
               "--eval-size", "4", "--reward-fn", "myreward:reward", "--out-dir", "lora-run", "--no-progress",
               "--gradient-checkpointing", "--lr", "1e-2"])
    assert rc == 0
    out = tmp_path / "lora-run"
    captured = capsys.readouterr()
    assert "cepo-train: done" in captured.out and str(out / "metrics.jsonl") in captured.out
    for noise in ("%|", "it/s]", "Warning", "Loading"):  # --no-progress: no bars or advisories
        assert noise not in captured.err and noise not in captured.out, noise
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 2 and sum(r["teacher_rows"] for r in rows) > 0
    adapter = json.loads((out / "final_model" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(model_dir)  # absolute: loadable from anywhere
    saved = torch.load(out / "checkpoints" / "step_000002" / "model_state.pt", weights_only=True)
    assert saved and all("lora_" in k for k in saved)  # LoRA on a model from disk: adapters only
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in saved.items() if "lora_B" in k)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU kernels' switch")
def test_cli_runs_the_native_cpu_kernels_and_the_interpreter_on_request(tmp_path):
    """Without TRITON_INTERPRET the command runs the native CPU kernels in place (no restart);
    CEPO_KERNELS_CPU=interpreter without TRITON_INTERPRET=1 is a clear error (exit 2)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CEPO_KERNELS_CPU")}
    args = "--steps 1 --prompts-per-step 1 --group-size 2 --sft-steps 0 --eval-every 0 --max-new-tokens 3"
    cmd = [sys.executable, "-m", "cepo_kernels.rl.cli", *args.split(), "--no-progress", "--out-dir"]
    proc = subprocess.run([*cmd, str(tmp_path / "native")], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(native CPU kernels)" in proc.stdout
    assert len(read_metrics(tmp_path / "native" / "metrics.jsonl")) == 1
    proc = subprocess.run([*cmd, str(tmp_path / "interp")], env={**env, "CEPO_KERNELS_CPU": "interpreter"},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2 and "TRITON_INTERPRET=1" in proc.stderr, proc.stderr[-2000:]


def test_teacher_logprobs_match_the_model_on_the_context(tmp_path):
    """The packed, padded teacher pass equals the model run alone on prompt + " answer" + response."""
    tr = Trainer(tiny(tmp_path, sft_steps=20, eval_every=0))
    tok = tr.tok
    questions = ["2+3=", "11-4="]
    prompts = [tr.prompt_ids(Problem(q, "")) for q in questions]
    refs = ["5", "7"]
    texts = ["\\boxed{5}", "\\boxed{6}", "\\boxed{77}", "\\boxed{7}"]
    responses = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    responses[2] = responses[2][:-1]  # one truncated response: shorter, no eos
    rewards = [1.0, 0.0, 0.0, 1.0]
    adv = group_advantages(rewards, 2)
    negatives = choose_negatives(texts, rewards, refs, 2)
    assert [n.answer for n in negatives] == ["6", "77"]
    per_row = lambda xs: [x for x in xs for _ in range(2)]  # noqa: E731
    ctx = teacher_contexts(tok, teacher_rows(adv), prompt_ids=per_row(prompts), pos_answers=per_row(refs),
                           neg_answers=per_row([n.answer for n in negatives]))
    weight, bias = lm_head(tr.model)
    tr.model.eval()
    lengths = [len(r) for r in responses]
    batches = lambda rows: micro_batches(rows, lengths, 2, 3)  # noqa: E731 (split across micro-batches)
    old = policy_logprobs(tr.forward, weight, bias, per_row(prompts), responses, batches,
                          pad_id=tok.pad_token_id, device="cpu")
    assert old.tokens == old.tokens_plain - len(prompts[0]) - len(prompts[1])  # once per group
    pos, neg, tokens = teacher_logprobs(tr.forward, weight, bias, ctx, responses, batches, default=old.logp,
                                        lam=0.5, pad_id=tok.pad_token_id)
    assert tokens > 0
    skipped = teacher_logprobs(tr.forward, weight, bias, ctx, responses, batches, default=old.logp, lam=0.0,
                               pad_id=tok.pad_token_id)
    assert skipped.tokens == 0 and torch.equal(skipped.pos, old.logp) and torch.equal(skipped.neg, old.logp)
    model64 = copy.deepcopy(tr.model).double()  # the float64 reference of the same weights
    for i, resp in enumerate(responses):
        for prefix_answer, got in ((refs[i // 2], pos), (negatives[i // 2].answer, neg)):
            ctx = prompts[i // 2] + tok(" " + prefix_answer, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + resp])
            want = {}
            for name, m in (("fp32", tr.model), ("fp64", model64)):
                with torch.no_grad():
                    logits = m(ids).logits[0, len(ctx) - 1:-1]
                want[name] = torch.log_softmax(logits, -1).gather(-1, torch.tensor(resp)[:, None])[:, 0]
            # the padded, batched teacher pass is no further from float64 than torch's own unpadded fp32 run
            assert_close(got[i, :len(resp)], want["fp64"], want["fp32"], atol=1e-5, name="teacher logp")
    assert not torch.equal(pos, neg)


def test_all_correct_groups_skip_the_teachers(tmp_path):
    Trainer(tiny(tmp_path, steps=1, eval_every=0), reward_fn=lambda text, ref: 1.0).train()
    (row,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert row["reward_mean"] == 1.0 and row["teacher_rows"] == 0
    assert row["adv_abs_mean"] == 0.0 and row["adv_hat_abs_mean"] == 0.0 and row["loss"] == 0.0
    assert row["delta_mean"] == 0.0 and row["delta_std"] == 0.0
