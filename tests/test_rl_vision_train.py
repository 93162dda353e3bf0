"""cepo-train with a vision-language policy: the embedded `--task count` run, a saved tiny Qwen3-VL checkpoint
with an image JSONL (LoRA, the vision tower frozen), and the one-line error of a missing image."""

import json
import math
import random

import pytest
import torch

from cepo_kernels.rl.cli import main
from cepo_kernels.rl.options import parse_args
from cepo_kernels.rl.vision_model import load_processor, load_vision_model, save_tiny_vl
from cepo_kernels.rl.vision_task import draw_shapes
from cepo_kernels.rl.vision_trainer import VisionTrainer, make_trainer
from cepo_kernels.step.vision import multimodal_model

FAST = ["--eval-every", "0", "--no-progress", "--max-new-tokens", "6", "--micro-batch-size", "4"]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_count_task_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    rc = main(["--task", "count", "--steps", "2", "--prompts-per-step", "2", "--group-size", "4",
               "--sft-steps", "10", "--sft-batch-size", "8", "--out-dir", str(out), *FAST])
    assert rc == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        # the tower runs once per generate chunk (8 rows / 4) and once for every later pass of the step
        assert r["vision_encoder_calls"] == 2 + 1
        assert r["policy_tokens"] > 0 and math.isfinite(r["loss"]) and 0.0 <= r["reward_mean"] <= 1.0
    model, processor = load_vision_model(out / "final_model"), load_processor(out / "final_model")
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert processor.image_token_id is not None


def _image_data(tmp_path, n=6, missing=None):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rng = random.Random(0)
    lines = []
    for i in range(n):
        k = rng.randint(1, 4)
        if i != missing:
            draw_shapes(k, rng).save(data / "images" / f"{i}.png")
        lines.append(json.dumps({"problem": "<image>how many shapes?", "images": [f"images/{i}.png"],
                                 "answer": str(k)}))
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    return data / "train.jsonl"


def test_saved_qwen3_vl_checkpoint_trains_with_lora_and_a_frozen_tower(tmp_path):
    ckpt = save_tiny_vl(tmp_path / "ckpt", "qwen3_vl")
    data = _image_data(tmp_path)
    reward = tmp_path / "reward.py"  # responses of odd length score 1: A != 0, so the teachers run
    reward.write_text("def f(text, ref):\n    return float(len(text) % 2)\n")
    cfg = parse_args(["--model", str(ckpt), "--data", str(data), "--prompt-key", "problem", "--steps", "2",
                      "--prompts-per-step", "2", "--group-size", "2", "--eval-size", "2", "--lora-rank", "4",
                      "--lam0", "1", "--reward-fn", f"{reward}:f", "--out-dir", str(tmp_path / "run"), *FAST])
    trainer = make_trainer(cfg)
    try:
        assert isinstance(trainer, VisionTrainer)
        tower = multimodal_model(trainer.model).visual
        before = {k: v.detach().clone() for k, v in tower.state_dict().items()}
        lora = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_B" in k}
        assert lora and not any(p.requires_grad for p in tower.parameters())
        trainer.train()
    finally:
        trainer.close()
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 2 and all(r["vision_encoder_calls"] == 2 for r in rows)
    assert sum(r["teacher_tokens"] for r in rows) > 0  # the teachers ran (with the images)
    after = tower.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    moved = dict(trainer.model.named_parameters())
    assert any(not torch.equal(lora[k], moved[k]) for k in lora)  # the LoRA weights were updated


def test_missing_image_is_one_line_naming_the_row(tmp_path, capsys):
    ckpt = save_tiny_vl(tmp_path / "ckpt", "qwen2_5_vl")
    data = _image_data(tmp_path, n=3, missing=1)
    rc = main(["--model", str(ckpt), "--data", str(data), "--prompt-key", "problem", "--steps", "1",
               "--out-dir", str(tmp_path / "run"), *FAST])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"{data}:2" in err[0] and "images/1.png" in err[0] and "not found" in err[0]


def test_count_task_with_a_text_model_is_refused(tmp_path, capsys):
    from cepo_kernels.rl.task import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    build_tiny_model(tok).save_pretrained(tmp_path / "text")
    tok.save_pretrained(tmp_path / "text")
    rc = main(["--model", str(tmp_path / "text"), "--task", "count", "--out-dir", str(tmp_path / "run"),
               *FAST])
    assert rc == 2
    assert "--task count needs a vision-language policy" in capsys.readouterr().err


@pytest.mark.parametrize("algo", ["opsd", "sdpo"])
def test_distillation_with_a_vision_policy_is_refused(tmp_path, capsys, algo):
    rc = main(["--task", "count", "--algo", algo, "--out-dir", str(tmp_path / "run"), *FAST])
    assert rc == 2
    assert f"algo: --algo {algo} is text-only in cepo-train" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_teacher_sees_image_knob_reaches_the_teachers(tmp_path):
    # same seed, same rollouts; only the teachers' input differs, so step 1's Delta differs
    ckpt = save_tiny_vl(tmp_path / "ckpt", "qwen3_vl")
    data = _image_data(tmp_path)
    reward = tmp_path / "reward.py"
    reward.write_text("def f(text, ref):\n    return float(len(text) % 2)\n")
    deltas = {}
    for flag in ("--teacher-sees-image", "--no-teacher-sees-image"):
        out = tmp_path / flag
        rc = main(["--model", str(ckpt), "--data", str(data), "--prompt-key", "problem", "--steps", "1",
                   "--prompts-per-step", "2", "--group-size", "2", "--eval-size", "2", "--lam0", "1",
                   "--reward-fn", f"{reward}:f", "--out-dir", str(out), flag, *FAST])
        assert rc == 0
        (row,) = _metrics(out)
        assert row["teacher_tokens"] > 0
        deltas[flag] = (row["response_len_mean"], row["reward_mean"], row["delta_mean_pos"])
    (len_a, rew_a, d_a), (len_b, rew_b, d_b) = deltas.values()
    assert (len_a, rew_a) == (len_b, rew_b) and d_a != d_b


def test_count_run_resumed_equals_the_uninterrupted_run(tmp_path):
    """A `--task count` run stopped after 2 of 3 steps and resumed (the warm-up is not run again: the
    checkpoint holds the warmed-up weights) gives the same metrics and weights as the run without a stop."""
    reward = tmp_path / "reward.py"  # responses of odd length score 1: A != 0, so the update and teachers run
    reward.write_text("def f(text, ref):\n    return float(len(text) % 2)\n")
    args = ["--task", "count", "--steps", "3", "--prompts-per-step", "2", "--group-size", "4",
            "--sft-steps", "5", "--sft-batch-size", "8", "--lam0", "1", "--t-warm", "8", "--save-every", "0",
            "--reward-fn", f"{reward}:f", *FAST]
    straight = make_trainer(parse_args([*args, "--out-dir", str(tmp_path / "straight")]))
    try:
        straight.train()
    finally:
        straight.close()
    first = make_trainer(parse_args([*args, "--out-dir", str(tmp_path / "split")]))
    try:
        first.train(stop_after=2)
    finally:
        first.close()
    resumed = make_trainer(parse_args(["--resume", str(tmp_path / "split")]))
    try:
        assert isinstance(resumed, VisionTrainer) and resumed.step_idx == 2
        resumed.train()
    finally:
        resumed.close()
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    assert [r["step"] for r in b] == [1, 2, 3]
    assert all(r["teacher_tokens"] > 0 and r["loss"] != 0.0 for r in a)  # the steps did train
    for ra, rb in zip(a, b, strict=True):
        for k in ("loss", "lambda", "lr", "reward_mean", "delta_mean", "entropy", "grad_norm",
                  "teacher_tokens", "policy_tokens", "response_len_mean", "vision_encoder_calls"):
            assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])
    params = zip(straight.model.named_parameters(), resumed.model.named_parameters(), strict=True)
    for (n, p), (_, q) in params:
        assert torch.equal(p, q), n
    assert load_processor(tmp_path / "split" / "final_model").image_token_id is not None


def test_shared_prompt_cache_counts_its_saving(tmp_path):
    """The group's image prompt runs once per pass with --share-prefix (the default): teacher_tokens and
    policy_tokens count each [prompt | answer] once per group, --no-share-prefix runs every row in full; the
    same rollouts either way (the model is the same before step 1's update; that the shared path's log-probs
    equal the plain path's is tests/test_step_vision_shared.py's)."""
    reward = tmp_path / "reward.py"
    reward.write_text("def f(text, ref):\n    return float(len(text) % 2)\n")
    rows = {}
    for flag in ("--share-prefix", "--no-share-prefix"):
        out = tmp_path / flag
        assert main(["--task", "count", "--steps", "1", "--prompts-per-step", "2", "--group-size", "4",
                     "--sft-steps", "5", "--sft-batch-size", "8", "--lam0", "1", "--reward-fn", f"{reward}:f",
                     "--out-dir", str(out), flag, *FAST]) == 0
        (rows[flag],) = _metrics(out)
    a, b = rows.values()
    assert a["response_len_mean"] == b["response_len_mean"] and a["reward_mean"] == b["reward_mean"]
    assert 0 < a["teacher_tokens"] < a["teacher_tokens_naive"] == b["teacher_tokens_naive"]
    assert b["teacher_tokens"] == b["teacher_tokens_naive"]
    assert a["policy_tokens"] < a["policy_tokens_naive"] == b["policy_tokens_naive"] == b["policy_tokens"]


def test_count_task_has_its_own_warm_up_default(tmp_path):
    """--task count warms up for 400 steps unless --sft-steps (or a config file) says otherwise; the text
    tasks keep TrainConfig's 150, and the resolved value is what a resumed run reads back."""
    from cepo_kernels.rl.config import TrainConfig

    assert parse_args(["--task", "count"]).sft_steps == 400
    assert parse_args(["--task", "count", "--sft-steps", "7"]).sft_steps == 7
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"task": "count", "sft_steps": 20}))
    assert parse_args(["--config", str(cfg_file)]).sft_steps == 20
    assert parse_args([]).sft_steps == parse_args(["--task", "digits", "--max-new-tokens", "24"]).sft_steps
    assert parse_args([]).sft_steps == TrainConfig().sft_steps == 150
