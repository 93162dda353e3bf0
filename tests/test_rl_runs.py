"""A run directory as a user treats it: reused, shared, copied, resumed, interrupted, out of disk; options
mistyped; reward functions that fail. Every case ends in a clear message or a correct run, never a
traceback or lost data."""

import errno
import json
import logging
import os
import shutil
import signal

import pytest
import torch

import cepo_kernels.rl.loop as loop_mod
from cepo_kernels.rl.cli import main
from cepo_kernels.rl.config import TrainConfig
from cepo_kernels.rl.errors import RewardFunctionError
from cepo_kernels.rl.options import parse_args
from cepo_kernels.rl.reward import load_reward_fn
from cepo_kernels.rl.rundir import RunDir, RunDirError
from cepo_kernels.rl.task import build_tiny_model, build_tokenizer
from cepo_kernels.rl.trainer import Trainer

FAST = dict(steps=2, prompts_per_step=2, group_size=2, max_new_tokens=3, micro_batch_size=8,
            mini_batch_prompts=0, sft_steps=0, eval_every=0, eval_size=4, progress=False, save_every=1,
            lr_warmup_steps=2)
FAST_ARGS = ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "3", "--sft-steps", "0",
             "--eval-every", "0", "--no-progress", "--save-every", "1"]


def strict_json(text):
    def no_nan(name):
        raise ValueError(f"{name} is not valid JSON")

    return json.loads(text, parse_constant=no_nan)


def metrics(path):
    return [strict_json(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def run(tmp_path, name="run", **kw):
    cfg = TrainConfig(**{**FAST, "out_dir": str(tmp_path / name), **kw})
    tr = Trainer(cfg)
    return tr, tr.train()


def test_reusing_a_finished_run_dir_is_refused(tmp_path, capsys):
    run(tmp_path)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match="already holds a run .*resume it with --resume"):
        Trainer(TrainConfig(**{**FAST, "out_dir": str(tmp_path / "run")}))
    assert main([*FAST_ARGS, "--steps", "1", "--out-dir", str(tmp_path / "run")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_000001", "step_000002"]


def test_a_run_dir_in_use_is_refused(tmp_path, capsys):
    held = RunDir(tmp_path / "busy", resuming=False)  # another run holds the lock
    assert main([*FAST_ARGS, "--steps", "1", "--out-dir", str(tmp_path / "busy")]) == 2
    assert f"in use by another cepo-train run (pid {os.getpid()})" in capsys.readouterr().err
    held.release()
    assert main([*FAST_ARGS, "--steps", "1", "--out-dir", str(tmp_path / "busy")]) == 0


def test_resume_continues_in_the_given_directory(tmp_path, monkeypatch):
    tr, _ = run(tmp_path, "orig", steps=3, keep_last=3)
    orig = tmp_path / "orig"
    for p in (orig / "checkpoints" / "step_000003", orig / "final_model"):
        shutil.rmtree(p)  # as if stopped after step 2
    rows = (orig / "metrics.jsonl").read_text().splitlines()
    (orig / "metrics.jsonl").write_text("\n".join(rows[:2]) + "\n" + rows[2][:25])  # killed mid-write
    (orig / "checkpoints" / ".tmp-step_000003-x1y2").mkdir()  # kill -9 during a save
    copy = tmp_path / "copy"
    shutil.copytree(orig, copy)
    snapshot = {p: p.read_bytes() for p in orig.rglob("*") if p.is_file()}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["--resume", str(copy)]) == 0
    assert {p: p.read_bytes() for p in orig.rglob("*") if p.is_file()} == snapshot  # original untouched
    assert list(elsewhere.iterdir()) == []  # nothing created relative to the working directory
    assert [r["step"] for r in metrics(copy)] == [1, 2, 3]
    assert not any(p.name.startswith(".tmp-") for p in (copy / "checkpoints").iterdir())
    assert json.loads((copy / "config.json").read_text())["out_dir"] == str(copy)
    summary = strict_json((copy / "summary.json").read_text())
    assert summary["steps_done"] == 3 and summary["reward_first"] == metrics(copy)[0]["reward_mean"]


def test_torn_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    run(tmp_path, steps=1)
    path = tmp_path / "run" / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 2, "lambda": 0.4, "lr"')
    tr = Trainer(TrainConfig(**{**FAST, "resume": str(tmp_path / "run"), "steps": 2}))
    with caplog.at_level(logging.WARNING, logger="cepo_kernels.rl"):
        tr.train()
    assert "dropped a torn last line" in caplog.text
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')  # damage in the middle is not a torn line
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: unreadable metrics line"):
        Trainer(TrainConfig(**{**FAST, "resume": str(tmp_path / "run"), "steps": 3}))


def test_summary_after_resume_covers_the_whole_run(tmp_path):
    cfg = TrainConfig(**{**FAST, "out_dir": str(tmp_path / "run"), "steps": 2, "eval_every": 1,
                         "eval_size": 4, "data": None})
    Trainer(cfg).train(stop_after=1)
    first = metrics(tmp_path / "run")[0]
    tr = Trainer(TrainConfig(**{**FAST, "resume": str(tmp_path / "run"), "steps": 2, "eval_every": 1}))
    summary = tr.train()
    assert summary["eval_accuracy_start"] is not None and summary["reward_first"] == first["reward_mean"]
    assert summary["steps_done"] == 2 and summary["wall_s"] > 0


def test_no_held_out_problems_gives_valid_json(tmp_path):
    data = tmp_path / "four.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": a + 1}) + "\n" for a in range(4)))
    _, summary = run(tmp_path, data=str(data), eval_every=1, steps=1)
    assert summary["eval_accuracy_start"] is None and summary["eval_accuracy_end"] is None
    strict_json((tmp_path / "run" / "summary.json").read_text())
    (row,) = metrics(tmp_path / "run")
    assert row["eval_accuracy"] is None


def test_lr_is_the_rate_each_update_used(tmp_path):
    run(tmp_path, steps=3, lr=1e-3, lr_warmup_steps=2, min_lr_ratio=0.0)
    lrs = [r["lr"] for r in metrics(tmp_path / "run")]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3])  # warm-up (step + 1) / 2, then the cosine from its top


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    real_step = Trainer.step

    def interrupted_step(self):
        if self.step_idx == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 2
        return real_step(self)

    monkeypatch.setattr(Trainer, "step", interrupted_step)
    out = tmp_path / "run"
    assert main([*FAST_ARGS, "--steps", "4", "--save-every", "0", "--out-dir", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"stopped after step 2 of 4; continue with: cepo-train --resume {out}" in err
    assert "Traceback" not in err
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert (out / "checkpoints" / "step_000002").is_dir() and strict_json((out / "summary.json").read_text())[
        "interrupted"]
    monkeypatch.setattr(Trainer, "step", real_step)
    assert main(["--resume", str(out)]) == 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


def test_second_ctrl_c_stops_at_once(tmp_path, monkeypatch, capsys):
    real_update = Trainer.update

    def twice(self, *args):
        if self.step_idx == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_update(self, *args)

    monkeypatch.setattr(Trainer, "update", twice)
    out = tmp_path / "run"
    assert main([*FAST_ARGS, "--steps", "4", "--out-dir", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"the last checkpoint is step_000001: continue with: cepo-train --resume {out}" in err
    assert "Traceback" not in err and [r["step"] for r in metrics(out)] == [1]


def test_full_disk_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    def full(path, row):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(loop_mod, "append_jsonl", full)
    out = tmp_path / "run"
    assert main([*FAST_ARGS, "--steps", "2", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "no checkpoint was written yet" in err
    assert "Traceback" not in err


def alternating():
    calls = {"n": 0}

    def reward(text, ref):  # mixed rewards in every group of 2, so every advantage is +-0.71
        calls["n"] += 1
        return float(calls["n"] % 2)

    return reward


def test_grad_norm_zero_means_no_clipping_and_group_size_one_is_refused(tmp_path):
    moved = {}
    for name, max_norm in (("off", 0.0), ("tight", 1e-6)):
        cfg = TrainConfig(**{**FAST, "out_dir": str(tmp_path / name), "steps": 1, "max_grad_norm": max_norm})
        tr = Trainer(cfg, reward_fn=alternating())
        tr.train()
        base = build_tiny_model(build_tokenizer(), seed=0)
        moved[name] = sum((p - q).abs().sum().item()
                          for p, q in zip(tr.model.parameters(), base.parameters(), strict=True))
        assert metrics(tmp_path / name)[0]["grad_norm"] > 0
    assert moved["off"] > 10 * moved["tight"] > 0  # 0 turns clipping off; it does not zero the gradient
    with pytest.raises(ValueError, match="group_size: expected at least 2"):
        TrainConfig(group_size=1)


def test_reward_function_failing_everywhere_stops(tmp_path, caplog, capsys):
    def broken(text, ref):
        raise KeyError("answer")

    with pytest.raises(RewardFunctionError, match="raised on every one of the 4 responses; first error: K"):
        Trainer(TrainConfig(**{**FAST, "out_dir": str(tmp_path / "a")}), reward_fn=broken).train()
    calls = {"n": 0}

    def flaky(text, ref):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ZeroDivisionError("oops")
        return 1.0

    with caplog.at_level(logging.WARNING, logger="cepo_kernels.rl"):
        Trainer(TrainConfig(**{**FAST, "out_dir": str(tmp_path / "b"), "steps": 1}), reward_fn=flaky).train()
    assert "raised on 1 of 4 responses (scored 0); first error: ZeroDivisionError: oops" in caplog.text
    (tmp_path / "bad_reward.py").write_text("def fn(text, ref):\n    return {}['x']\n")
    assert main([*FAST_ARGS, "--steps", "1", "--reward-fn", str(tmp_path / "bad_reward.py") + ":fn",
                 "--out-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "cepo-train: error: step 1: the reward function raised on every one" in err
    assert "Traceback" not in err


def test_reward_fn_from_the_working_directory_or_a_file(tmp_path, monkeypatch):
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "myrewards_cwd.py").write_text("def score(text, ref):\n    return 0.25\n")
    monkeypatch.chdir(folder)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(folder))])
    assert load_reward_fn("myrewards_cwd:score")("x", "y") == 0.25
    assert load_reward_fn("./myrewards_cwd.py:score")("x", "y") == 0.25
    assert load_reward_fn(str(folder / "myrewards_cwd.py") + ":score")("x", "y") == 0.25
    with pytest.raises(ValueError, match="reward_fn: file 'nope.py' does not exist"):
        load_reward_fn("nope.py:score")
    with pytest.raises(ValueError, match="reward_fn: cannot import 'no_such_module_x'"):
        load_reward_fn("no_such_module_x:score")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_reward_fn("myrewards_cwd:missing")


@pytest.mark.parametrize("args, message", [
    (["--device", "gpu0"], "device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu0'"),
    (["--lr", "nan"], "lr: expected a finite number, got nan"),
    (["--max-grad-norm", "nan"], "max_grad_norm: expected a finite number, got nan"),
    (["--lora-dropout", "2"], r"lora_dropout: expected a value in [0, 1), got 2.0"),
    (["--group-size", "1"], "group_size: expected at least 2"),
    (["--reward-fn", "nocolon"], "reward_fn: expected 'module:function' or 'path/to/file.py:function'"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, args, message):
    assert main([*FAST_ARGS, "--out-dir", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path, capsys):
    assert main([*FAST_ARGS, "--out-dir", str(tmp_path / "x"), "--device", "cuda"]) == 2
    assert "device: 'cuda' asked for, but this torch" in capsys.readouterr().err


def test_bad_files_are_one_line_errors(tmp_path, capsys):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "caf\xe9", "answer": "1"}\n')
    toml = tmp_path / "run.toml"
    toml.write_text("steps = 3\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [
        (["--data", str(latin)], f"data: {latin}:2: not UTF-8 text"),
        (["--data", str(tmp_path)], f"data: '{tmp_path}' is a directory, expected a JSONL file"),
        (["--config", str(toml)], "unsupported file type '.toml'; expected .json, .yaml or .yml"),
        (["--config", str(tmp_path)], "is a directory, expected a .json or .yaml file"),
        (["--out-dir", str(blocker / "sub")], "out_dir: cannot create or write"),
    ]
    for args, message in cases:
        assert main([*FAST_ARGS, "--out-dir", str(tmp_path / "x"), *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)


def test_yaml_numbers_as_users_write_them(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 5e-6\nsteps: '7'\nlam0: .3\nprogress: 'false'\n")
    cfg = parse_args(["--config", str(y)])
    assert (cfg.lr, cfg.steps, cfg.lam0, cfg.progress) == (5e-6, 7, 0.3, False)
    y.write_text("lr: fast\n")
    with pytest.raises(TypeError, match="lr: expected float, got str 'fast'"):
        parse_args(["--config", str(y)])


def test_diverged_weights_abort_with_exit_3(tmp_path, capsys):
    reward = tmp_path / "alternating.py"
    reward.write_text("n = [0]\n\n\ndef fn(text, ref):\n    n[0] += 1\n    return float(n[0] % 2)\n")
    assert main([*FAST_ARGS, "--steps", "3", "--lr", "1e30", "--max-grad-norm", "0", "--reward-fn",
                 f"{reward}:fn", "--out-dir", str(tmp_path / "x")]) == 3
    err = capsys.readouterr().err
    assert "cepo-train: aborted" in err and "lower --lr" in err and "Traceback" not in err


def test_resume_with_another_lora_rank_is_refused(tmp_path, capsys):
    tok = build_tokenizer()
    model_dir = tmp_path / "m"
    build_tiny_model(tok, seed=1).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "lora"
    common = [*FAST_ARGS, "--model", str(model_dir), "--lora-target-modules", "q_proj"]
    assert main([*common, "--steps", "1", "--lora-rank", "2", "--out-dir", str(out)]) == 0
    capsys.readouterr()
    assert main(["--resume", str(out), "--lora-rank", "4", "--steps", "2"]) == 2
    assert "lora_rank: the checkpoint was trained with lora_rank=2" in capsys.readouterr().err
    cfg = TrainConfig(**{**FAST, "model": str(model_dir), "lora_rank": 4, "lora_target_modules": "q_proj",
                         "resume": str(out), "steps": 2})
    with pytest.raises(ValueError, match="written with another model or LoRA configuration"):
        Trainer(cfg)

