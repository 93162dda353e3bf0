"""Configuration, command-line parsing, schedules and bad input (data files, config keys, values)."""

import json
import re

import pytest

from cepo_kernels.rl.checkpoint import resolve_checkpoint
from cepo_kernels.rl.cli import main
from cepo_kernels.rl.config import TrainConfig, config_from_dict, lr_factor, valid_keys
from cepo_kernels.rl.options import parse_args
from cepo_kernels.rl.task import arithmetic_problems, load_jsonl
from cepo_kernels.step import lam_at


def test_defaults_follow_the_paper_for_the_method():
    cfg = TrainConfig()
    assert (cfg.algo, cfg.lam0, cfg.t_warm, cfg.eps_w, cfg.eps_low, cfg.eps_high, cfg.clip_dual) == (
        "cepo", 0.5, 25, 0.2, 0.2, 0.28, 3.0)
    assert cfg.reduction == "token-mean" and cfg.teacher_template == " {answer}"
    assert cfg.model is None and cfg.data is None  # the embedded default


def test_lambda_is_a_pure_function_of_the_step():
    assert [lam_at(s, 0.5, 25) for s in (0, 5, 24, 25, 40)] == pytest.approx([0.5, 0.4, 0.02, 0.0, 0.0])
    assert lam_at(3, 0.5, 0) == 0.0
    assert lr_factor(0, 2, 10, 0.1) == 0.5 and lr_factor(1, 2, 10, 0.1) == 1.0
    assert lr_factor(2, 2, 10, 0.1) == pytest.approx(1.0) and lr_factor(10, 2, 10, 0.1) == pytest.approx(0.1)


def test_flags_are_generated_from_the_fields():
    cfg = parse_args(["--algo", "rlsd", "--lam0", "0.3", "--no-progress", "--lora-rank", "8",
                      "--system-prompt", "Be brief."])
    assert (cfg.algo, cfg.lam0, cfg.progress, cfg.lora_rank) == ("rlsd", 0.3, False, 8)
    assert cfg.system_prompt == "Be brief."
    with pytest.raises(SystemExit):
        parse_args(["--algo", "ppo"])
    with pytest.raises(SystemExit):
        parse_args(["--no-such-flag", "1"])


def test_config_file_json_and_yaml_with_flag_override(tmp_path):
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"steps": 7, "group-size": 4, "algo": "grpo"}))
    cfg = parse_args(["--config", str(j), "--steps", "9"])
    assert (cfg.steps, cfg.group_size, cfg.algo) == (9, 4, "grpo")
    y = tmp_path / "c.yaml"
    y.write_text("steps: 5\nlr: 1.0e-5\n")
    cfg = parse_args(["--config", str(y)])
    assert (cfg.steps, cfg.lr) == (5, 1e-5)


def test_unknown_config_keys_list_the_valid_ones(tmp_path):
    msg = r"unknown option\(s\) \['learning_rate'\]; valid options are: model, "
    with pytest.raises(ValueError, match=msg):
        config_from_dict({"learning_rate": 1e-3})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stepz": 3}))
    with pytest.raises(ValueError, match="bad.json.*stepz.*" + ", ".join(valid_keys()[:3])):
        parse_args(["--config", str(bad)])
    broken = tmp_path / "broken.json"
    broken.write_text('{"steps": 3,\n "lr": }')
    with pytest.raises(ValueError, match=r"broken.json:2: invalid JSON"):
        parse_args(["--config", str(broken)])


@pytest.mark.parametrize("kw, match", [
    ({"algo": "dpo"}, "algo: expected one of"),
    ({"steps": 0}, "steps: expected a positive value"),
    ({"lam0": 1.5}, r"lam0: expected a value in \[0, 1\]"),
    ({"eps_w": 1.0}, r"eps_w: expected a value in \[0, 1\)"),
    ({"top_p": 0.0}, "top_p"),
    ({"teacher_template": "no placeholder"}, "teacher_template"),
    ({"reward_fn": "module_without_colon"}, "reward_fn: expected 'module:function'"),
    ({"reduction": "mean"}, "reduction: expected one of"),
    ({"reduction": "none"}, "reduction: expected one of"),
    ({"clip_dual": 1.1}, "clip_dual: expected None or a number > 1 \\+ eps_high"),
])
def test_bad_values_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_bad_types_name_the_field():
    with pytest.raises(TypeError, match="group_size: expected int"):
        TrainConfig(group_size="8")
    assert TrainConfig(lr=1).lr == 1.0  # an int where a float is expected is fine


def test_jsonl_errors_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_jsonl(tmp_path / "missing.jsonl")
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2=", "answer": 4\n')
    with pytest.raises(ValueError, match=r"d.jsonl:3: invalid JSON"):
        load_jsonl(f)
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n{"question": "2+2=", "answer": "4"}\n')
    msg = r"d.jsonl:2: missing key 'prompt' \(keys present: \['answer', 'question'\]"
    with pytest.raises(ValueError, match=msg):
        load_jsonl(f)
    f.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: expected a JSON object"):
        load_jsonl(f)
    f.write_text('{"prompt": "1+1=", "answer": null}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: 'answer' must be a string or a number"):
        load_jsonl(f)
    f.write_text("\n")
    with pytest.raises(ValueError, match="no problems found"):
        load_jsonl(f)
    f.write_text('{"q": "1+1=", "a": 2}\n')
    assert load_jsonl(f, "q", "a")[0].answer == "2"


def test_cli_reports_bad_data_without_a_traceback(tmp_path, capsys):
    f = tmp_path / "train.jsonl"
    f.write_text('{"prompt": "1+1=", "answer": "2"}\nnot json\n')
    assert main(["--data", str(f), "--no-progress", "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cepo-train: error: data: ") and "train.jsonl:2: invalid JSON" in err
    assert main(["--data", str(tmp_path / "nope.jsonl"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--out-dir", str(tmp_path / "o")]) == 2
    assert "not a local Hugging Face model directory" in capsys.readouterr().err


def test_resume_of_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume: no checkpoint found"):
        resolve_checkpoint(tmp_path)


def test_embedded_task_is_deterministic_and_boxed():
    a, b = arithmetic_problems(0), arithmetic_problems(0)
    assert a == b and len(a) == 64 + 36
    assert {p.prompt[-1] for p in a} == {"="}
    assert all(str(eval(p.prompt[:-1])) == p.answer for p in a)


@pytest.mark.parametrize("argv, match", [
    (["--task", "digits", "--data", "train.jsonl", "--max-new-tokens", "24"],
     "task: --task digits is an embedded task and --data 'train.jsonl' a data file; give one of them"),
    (["--cot-prefix-len", "64"], "cot_prefix_len: applies to the chain-of-thought teacher only"),
    (["--cot-suffix"], "cot_suffix: applies to the chain-of-thought teacher only"),
    (["--teacher-template", " {oops}"], r"teacher_template: unknown placeholder \{oops\}"),
])
def test_ignored_or_unknown_options_are_refused_in_one_line(argv, match, capsys):
    """Options the run would silently ignore (or a template it would use literally) stop cepo-train with exit
    code 2 and one line on stderr, before any work."""
    with pytest.raises(ValueError, match=match):
        parse_args(argv)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cepo-train: error: ") and re.search(match, err[0])


def test_cot_options_with_the_cot_teacher_and_a_dumped_config_are_accepted(tmp_path):
    assert parse_args(["--cot-teacher", "--cot-prefix-len", "64", "--cot-suffix"]).cot_prefix_len == 64
    dumped = tmp_path / "all.json"  # a dumped config (every key, defaults included): nothing is "given"
    dumped.write_text(json.dumps(TrainConfig().to_dict()))
    assert parse_args(["--config", str(dumped)]).cot_prefix_len == 512


def test_every_option_has_a_one_line_help():
    """Flag help is data (each field's metadata["help"]), shown by --help for every option."""
    from dataclasses import fields

    from cepo_kernels.rl.options import build_parser

    helps = {f.name: f.metadata.get("help", "") for f in fields(TrainConfig)}
    missing = [n for n, h in helps.items() if not h.strip() or "\n" in h]
    assert not missing, f"options without a one-line help: {missing}"
    actions = {a.dest: a.help for a in build_parser()._actions if a.dest in helps}
    assert set(actions) == set(helps)
    for name, text in actions.items():
        assert text.startswith(helps[name]) and "(default: " in text
    assert "rollout batch" in actions["prompts_per_step"] and "cepo" in actions["algo"]
