"""The last faults of a run directory: a full disk during a checkpoint, a torn line of a checkpointed step,
state files from someone else, a run that failed before its first step, nonsense rewards, templates and
prompts, Ctrl-C while starting. Each ends in one clear line or a correct run, and no data is lost."""

import errno
import json
import logging
import os
import re
import signal

import pytest
import torch
from test_rl_runs import FAST, FAST_ARGS, metrics, run, strict_json

from cepo_kernels.rl.cli import main
from cepo_kernels.rl.config import TrainConfig
from cepo_kernels.rl.rundir import RunDir, RunDirError
from cepo_kernels.rl.trainer import Trainer


def test_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main([*FAST_ARGS, "--steps", "1", "--out-dir", str(out)]) == 0
    real = torch.save

    def short_write(obj, f, *a, **k):  # torch.save's own error for a full disk, errno in the chain
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2") from None

    monkeypatch.setattr(torch, "save", short_write)
    capsys.readouterr()
    assert main([*FAST_ARGS, "--steps", "2", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert f"cannot write step_000002 in {out / 'checkpoints'}: " in err[0]
    assert "no space left on device" in err[0] and "the last checkpoint is step_000001" in err[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001"]  # no partial one
    monkeypatch.setattr(torch, "save", real)
    assert main([*FAST_ARGS, "--steps", "2", "--resume", str(out)]) == 0
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_a_torn_line_of_a_checkpointed_step_is_restored(tmp_path, caplog):
    run(tmp_path, steps=3)
    path = tmp_path / "run" / "metrics.jsonl"
    rows = path.read_text().splitlines()
    path.write_text("\n".join(rows[:2]) + "\n" + rows[2][:20])  # step 3's line torn, checkpoint 3 exists
    tr = Trainer(TrainConfig(**{**FAST, "resume": str(tmp_path / "run"), "steps": 5}))
    with caplog.at_level(logging.WARNING, logger="cepo_kernels.rl"):
        tr.train()
    assert "restored the metrics of step(s) 3" in caplog.text
    got = metrics(tmp_path / "run")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    assert got[2] == strict_json(rows[2])  # the record itself, not a re-run


def test_state_files_load_without_code(tmp_path, capsys):
    run(tmp_path, steps=1)
    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    assert not (ckpt / "rng.pt").exists() and json.loads((ckpt / "rng.json").read_text())["torch"]
    good = (ckpt / "optimizer.pt").read_bytes()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state": {}, "param_groups": [], "x": Evil()}, ckpt / "optimizer.pt")
    assert main([*FAST_ARGS, "--steps", "2", "--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "optimizer.pt: not loadable as tensors only" in err and "Traceback" not in err
    (ckpt / "optimizer.pt").write_bytes(good)
    (ckpt / "rng.json").rename(ckpt / "rng.pt")
    assert main([*FAST_ARGS, "--steps", "2", "--resume", str(tmp_path / "run")]) == 2
    assert "rng.json: missing (it holds rng.pt, a pickle" in capsys.readouterr().err
    (ckpt / "rng.pt").rename(ckpt / "rng.json")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "step": "1"}))
    assert main([*FAST_ARGS, "--steps", "2", "--resume", str(tmp_path / "run")]) == 2
    assert "trainer_state.json: field 'step': expected int" in capsys.readouterr().err
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "config": {**state["config"], "lr": -1}}))
    assert main([*FAST_ARGS, "--steps", "2", "--resume", str(tmp_path / "run")]) == 2
    assert "trainer_state.json: saved config: lr: " in capsys.readouterr().err


def test_a_run_that_failed_before_its_first_step_restarts_in_place(tmp_path, capsys, caplog):
    (tmp_path / "bad_reward.py").write_text("def fn(text, ref):\n    return {}['x']\n")
    (tmp_path / "good_reward.py").write_text("def fn(text, ref):\n    return 1.0\n")
    out = str(tmp_path / "run")
    args = [*FAST_ARGS, "--steps", "1", "--out-dir", out, "--reward-fn"]
    assert main([*args, str(tmp_path / "bad_reward.py") + ":fn"]) == 2
    assert sorted(os.listdir(out)) == [".lock", "config.json"]
    assert main([*FAST_ARGS, "--resume", out]) == 2
    assert "run the same command without --resume" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="cepo_kernels.rl"):
        assert main([*args, str(tmp_path / "good_reward.py") + ":fn"]) == 0
    assert "starting it over in place" in caplog.text
    (tmp_path / "run2" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run2" / "metrics.jsonl").write_text('{"step": 1}\n')  # a step finished, no checkpoint
    with pytest.raises(RunDirError, match="stopped before its first checkpoint .* delete the directory"):
        RunDir(tmp_path / "run2", resuming=False)


@pytest.mark.parametrize("value, message", [
    (1e30, "absurd reward 1e\\+30"), ("1.0", "expected a real number .* got str '1.0'"),
    (None, "got NoneType"), (float("nan"), "non-finite"),
])
def test_nonsense_rewards_are_failures(value, message):
    from cepo_kernels.step import safe_rewards

    failures = []
    rewards, errors = safe_rewards(lambda t, r: value, ["a", "b"], ["1", "1"], failures=failures)
    assert rewards == [0.0, 0.0] and errors == 2 and re.search(message, failures[0])
    import numpy as np

    good, errors = safe_rewards(lambda t, r: np.float32(0.5), ["a"], ["1"])
    assert good == [0.5] and errors == 0
    assert safe_rewards(lambda t, r: True, ["a"], ["1"]) == ([1.0], 0)


def test_eval_accuracy_counts_correct_answers(tmp_path):
    tr, _ = run(tmp_path, steps=1, format_bonus=0.5)
    probs = tr.eval_set[:2]
    right = [f"\\boxed{{{p.answer}}}" for p in probs]
    tr.tok.batch_decode = lambda resp, **k: [right[0], "\\boxed{nope}"]  # one right, one boxed but wrong
    assert tr.evaluate(probs) == 0.5  # the mean reward would read (1 + 0.5) / 2 = 0.75
    tr.grade = lambda text, ref: 0.6  # a user reward function: reward >= 0.5 counts as correct
    assert tr.evaluate(probs) == 1.0


def test_templates_prompts_and_resume_help(tmp_path, capsys, caplog):
    for template, bad in ((" {answer} {oops}", "{oops}"), ("{questoin}: {answer}", "{questoin}")):
        with pytest.raises(ValueError, match=f"teacher_template: unknown placeholder {bad}.*allowed: "
                                             "{answer}, {question}"):
            TrainConfig(teacher_template=template)
    TrainConfig(teacher_template=" \\boxed{{answer}} \\text{ok}")  # LaTeX braces are text
    with caplog.at_level(logging.WARNING, logger="cepo_kernels.rl"):
        run(tmp_path, steps=1, max_prompt_tokens=1)
    assert "2 of 2 prompts are longer than max_prompt_tokens=1" in caplog.text
    assert metrics(tmp_path / "run")[0]["prompts_truncated"] == 2
    from cepo_kernels.rl.options import build_parser

    assert "continue a run" in build_parser().format_help()


def test_ctrl_c_while_starting_prints_one_line(tmp_path):
    import subprocess
    import sys

    code = "import time, os, signal; os.kill(os.getpid(), signal.SIGINT); time.sleep(5)"
    env = {**os.environ, "CEPO_CLI": "cepo-train", "PYTHONPATH": os.pathsep.join(sys.path)}
    # SIGINT's default action in the child, whatever this process has: a shell's background job inherits
    # SIGINT ignored, and Python then leaves it ignored, so Ctrl-C would never reach the child
    done = subprocess.run([sys.executable, "-c", f"import cepo_kernels\n{code}"], env=env,
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode in (130, -signal.SIGINT)
    assert done.stderr.strip() == "cepo-train: stopped (Ctrl-C) while starting; nothing was written"
