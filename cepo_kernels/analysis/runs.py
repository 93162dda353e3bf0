"""One finished `cepo-train` run directory as `cepo-compare` reads it: where it lives, whether it finished,
and its final numbers (held-out accuracy, final reward, the credit diagnostic)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from cepo_kernels.runfiles import read_metrics

CREDIT_KEYS = ("credit_first_wrong_share", "credit_first_wrong_baseline")


def run_dir(out: Path, algo: str, seed: int) -> Path:
    return out / "runs" / f"{algo}-seed{seed}"


def read_summary(rdir: Path) -> dict:
    """A run's summary.json; ValueError naming the file when it is missing or not a JSON object."""
    path = rdir / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(summary, dict):
            raise ValueError(f"expected a JSON object, got {type(summary).__name__}")
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (the run did not finish)") from None
    except ValueError as e:  # also a UnicodeDecodeError
        raise ValueError(f"{path}: damaged ({e})") from None
    return summary


def finished(rdir: Path, log=print) -> bool:
    """True when the run has a readable summary.json and its metrics.jsonl (it is not run again); a run with
    a summary.json that is damaged, or without metrics.jsonl, says so and is run again."""
    if not (rdir / "summary.json").is_file():
        return False
    try:
        read_summary(rdir)
        if not (rdir / "metrics.jsonl").is_file():
            raise ValueError(f"{rdir}: summary.json without metrics.jsonl")
        return True
    except ValueError as e:
        log(f"cepo-compare: {e}; running {rdir.name} again")
        return False


def final_numbers(rdir: Path, last: int) -> dict:
    """Final held-out accuracy (the last evaluation) and the mean batch reward of the last `last` steps.
    ValueError naming the file when the run's metrics.jsonl or summary.json is missing or damaged."""
    if not (rdir / "metrics.jsonl").is_file():
        raise ValueError(f"{rdir}: no metrics.jsonl (not a finished cepo-train run)")
    rows = read_metrics(rdir / "metrics.jsonl")  # MetricsError (a ValueError) names a damaged line
    evals = [r["eval_accuracy"] for r in rows if r.get("eval_accuracy") is not None]
    summary = read_summary(rdir)
    tail = rows[-last:]
    # the credit diagnostic (rl/task.first_wrong_credit) over the steps where the teachers moved A; without
    # any (GRPO), the baseline over the steps that have one
    credit = [r for r in rows if r.get(CREDIT_KEYS[0]) is not None] or [
        r for r in rows if r.get(CREDIT_KEYS[1]) is not None]
    return {
        **{k: statistics.fmean(r[k] for r in credit) if credit and credit[0].get(k) is not None else None
           for k in CREDIT_KEYS},
        "eval_accuracy_start": summary.get("eval_accuracy_start"),
        "eval_accuracy_end": evals[-1] if evals else None,
        "reward_end": sum(r["reward_mean"] for r in tail) / len(tail) if tail else None,
        "steps": len(rows),
        "wall_s": summary.get("wall_s"),
    }
