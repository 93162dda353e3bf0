"""cepo-train's options: the command-line flags generated from TrainConfig, --config files, and the
options of a resumed run (the checkpoint's, overridden by those given now)."""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import fields
from pathlib import Path

from cepo_kernels.rl.config import CHOICES, TrainConfig, _base_type, config_from_dict, valid_keys


def load_config_file(path: str | Path) -> dict:
    """A dict of options from a .json or .yaml/.yml file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config: {str(path)!r} is a directory, expected a .json or .yaml file")
    if not path.is_file():
        raise FileNotFoundError(f"config: file {str(path)!r} does not exist")
    if path.suffix.lower() not in (".json", ".yaml", ".yml"):
        raise ValueError(
            f"config: {str(path)!r}: unsupported file type {path.suffix or '(none)'!r}; "
            "expected .json, .yaml or .yml"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"config: {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"config: {path}: invalid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config: {path}:{e.lineno}: invalid JSON ({e.msg})") from None
    return {} if data is None else data


class _Parser(argparse.ArgumentParser):
    """Exact option names only (no silent abbreviations), and a suggestion for a mistyped one."""

    def error(self, message):
        import difflib

        if message.startswith("unrecognized arguments:"):
            known = [o for a in self._actions for o in a.option_strings]
            hints = []
            for word in message.split(":", 1)[1].split():
                if word.startswith("--"):
                    close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.6)
                    if close:
                        hints.append(f"{word} -> did you mean {close[0]}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        super().error(message)


# an embedded task's defaults where they differ from TrainConfig's (applied by parse_args to the options not
# given): the count task's 3 x 3 images take a longer warm-up before its greedy answers read the image
TASK_DEFAULTS = {"count": {"sft_steps": 400}}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        allow_abbrev=False,
        prog="cepo-train",
        description="RLVR training with CEPO / RLSD / GRPO on fused Triton kernels. With no arguments: the "
        "embedded arithmetic task on a tiny model, runnable on a CPU in a few minutes.",
    )
    parser.add_argument("--config", help="a .json or .yaml file of options (flags override it)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved options as JSON and exit without training")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        base, _ = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata['help']} (default: {f.default!r}"
        text += "".join(f"; --task {t}: {d[f.name]!r}" for t, d in TASK_DEFAULTS.items() if f.name in d) + ")"
        if base is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            choices = CHOICES.get(f.name)
            parser.add_argument(flag, dest=f.name, type=base, default=None, choices=choices, help=text)
    return parser


def parse_args(argv=None) -> TrainConfig:
    """The config of a command line: defaults < --config file < flags. With --resume, the resumed
    checkpoint's config replaces the defaults, so `cepo-train --resume DIR` alone continues the same run."""
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config")
    args.pop("print_config")
    values = load_config_file(path) if path else {}
    if path:
        config_from_dict(values, source=f"config file {path}")  # reject unknown keys before merging
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    defaults = TrainConfig()
    # what the user chose: the flags, and a file's values other than the defaults (a dumped config has all)
    given = {k for k, v in values.items() if getattr(defaults, k, None) != v}
    values.update({k: v for k, v in args.items() if v is not None})
    given |= {k for k, v in args.items() if v is not None}
    if not values.get("resume") and not values.get("data"):  # an embedded task's own defaults
        task = values.get("task", defaults.task)
        values.update({k: v for k, v in TASK_DEFAULTS.get(task, {}).items() if k not in given})
    if values.get("resume"):
        from cepo_kernels.rl.checkpoint import STATE, read_state, resolve_checkpoint

        ckpt = resolve_checkpoint(values["resume"])
        saved = read_state(ckpt)["config"]
        try:  # a run directory may come from anywhere: its options are checked like the command line's
            config_from_dict(merge_resumed(saved, {}), source=f"resume: {ckpt / STATE}")
        except (ValueError, TypeError) as e:
            raise ValueError(f"resume: {ckpt / STATE}: saved config: {e}") from None
        values = merge_resumed(saved, values)
    cfg = config_from_dict(values)
    check_given(cfg, given)
    return cfg


def check_given(cfg: TrainConfig, given) -> None:
    """Options given (flags or --config) that this run would ignore: ValueError, one line."""
    for name in ("cot_prefix_len", "cot_suffix"):
        if name in given and not cfg.cot_teacher:
            raise ValueError(f"{name}: applies to the chain-of-thought teacher only; add --cot-teacher or "
                             f"drop --{name.replace('_', '-')}")


# options that fix the shape of the trained parameters: a resumed run cannot change them
STRUCTURAL = ("model", "lora_rank", "lora_target_modules")


def merge_resumed(saved: dict, given: dict) -> dict:
    """The config of a resumed run: the checkpoint's options, overridden by the ones given now.

    The run continues in the directory it is resumed from (Trainer resolves it), not in the out_dir
    recorded in the checkpoint, so a copied run directory is resumed in place of the copy.
    """
    for key in STRUCTURAL:
        if key in given and key in saved and given[key] != saved[key]:
            raise ValueError(
                f"{key}: the checkpoint was trained with {key}={saved[key]!r}; a resumed run cannot change "
                f"it (got {given[key]!r}). Start a new run instead"
            )
    kept = {k: v for k, v in saved.items() if k in valid_keys() and k != "out_dir"}
    return {**kept, **given}


__all__ = ["TASK_DEFAULTS", "build_parser", "check_given", "load_config_file", "merge_resumed", "parse_args"]
