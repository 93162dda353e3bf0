"""What the trainer saves for the credit maps: per-token Delta, w and A_hat of a few sampled groups.

Every `credit_every` steps (and at step 1) the trainer hands the tensors of the step it already has to
`CreditRecorder.record`, which writes `credit/step_NNNNNN.json.gz` into the run directory: the first
`credit_samples` groups of the rollout batch, each with its question, r+ and r-, and for every response
its text, reward, advantage A and, token by token, the token string, Delta = log P_T+ - log P_T-, the
weight w = clip(exp(sign(A) Delta), 1 - eps_w, 1 + eps_w) and A_hat, as the step's reweight phase
(cepo_kernels.step.reweight) computed them. A file is under 1 kB on the embedded task (it grows linearly
with the saved tokens: a string and three numbers each), so they are kept by default. `cepo-viz`
(cepo_kernels.analysis.viz) renders them.

GRPO runs no teacher (Delta = 0, w = 1, A_hat = A); RLSD's Delta is log P_T+ - log P_old.

On a task that knows its problems' solution steps (the embedded tasks), a wrong response also records
`first_wrong` and `first_wrong_end`: the token indices [first, end) of its first wrong step (null when
unknown); cepo-viz marks the first.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from cepo_kernels.runfiles import write_json_gz, writing

CREDIT_DIR = "credit"
FORMAT_VERSION = 1


def credit_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CREDIT_DIR / f"step_{step:06d}.json.gz"


def should_save(step: int, every: int) -> bool:
    """Step (1-based) gets a credit file: step 1 and every `every` steps; never when every == 0."""
    return every > 0 and (step == 1 or step % every == 0)


def _r4(values) -> list[float]:
    return [round(float(v), 4) for v in values]


def credit_record(*, step: int, algo: str, tokenizer, questions: list[str], batch, result, n_groups: int,
                  first_wrong=None) -> dict:
    """The JSON-able record of the first n_groups groups of a step (see the module docstring): `batch` is
    the step's RolloutBatch (the whole batch, groups of group_size), `result` its reweight phase
    (step.reweight: Delta, w and A_hat are read off it, not recomputed)."""
    G = batch.group_size
    n = min(n_groups, len(questions)) * G
    m = result.mask[:n]
    zero = torch.zeros_like(result.a_hat[:n])
    delta = torch.where(m, result.delta[:n].float(), zero).cpu()
    w = torch.where(m, result.weights[:n], torch.ones_like(zero)).cpu()
    a_hat, adv_l = result.a_hat[:n].cpu(), result.advantages[:n].cpu().tolist()
    negatives, rewards = result.negatives, batch.rewards
    groups = []
    for g in range(n // G):
        resp = []
        for i in range(g * G, (g + 1) * G):
            ids = batch.responses[i][: delta.shape[1]]
            k = len(ids)
            resp.append({
                "text": batch.texts[i],
                "reward": round(float(rewards[i]), 4),
                "adv": round(adv_l[i], 4),
                "tokens": [tokenizer.decode([t]) for t in ids],
                "delta": _r4(delta[i, :k]),
                "w": _r4(w[i, :k]),
                "a_hat": _r4(a_hat[i, :k]),
            })  # fmt: skip
            if first_wrong is not None:
                span = first_wrong[i] if rewards[i] < 0.5 else None
                resp[-1]["first_wrong"], resp[-1]["first_wrong_end"] = span if span else (None, None)
        groups.append({
            "question": questions[g],
            "r_plus": batch.references[g * G],
            "r_minus": negatives[g].answer if negatives is not None else None,
            "r_minus_how": negatives[g].how if negatives is not None else None,
            "responses": resp,
        })  # fmt: skip
    return {"version": FORMAT_VERSION, "step": step, "algo": algo, "lambda": result.lam,
            "eps_w": result.eps_w, "group_size": G, "groups": groups}  # fmt: skip


def write_credit(out_dir: str | Path, record: dict) -> Path:
    """Writes the record atomically (temporary file, then rename) and returns its path."""
    path = credit_path(out_dir, record["step"])
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    return write_json_gz(path, record)


class CreditRecorder:
    """The training loop's one hook into the analysis tools: `record(...)` writes
    credit/step_NNNNNN.json.gz into the run directory when the (1-based) step is due, else does nothing."""

    def __init__(self, out_dir: str | Path, *, every: int, samples: int, algo: str, tokenizer):
        self.out_dir, self.every, self.samples = Path(out_dir), every, samples
        self.algo, self.tokenizer = algo, tokenizer

    def due(self, step: int) -> bool:
        return self.samples > 0 and should_save(step, self.every)

    def record(self, *, step, batch, result, questions, first_wrong=None) -> Path | None:
        """`batch`: the step's RolloutBatch; `result`: its reweight phase (step.reweight)."""
        if not self.due(step):
            return None
        rec = credit_record(step=step, algo=self.algo, tokenizer=self.tokenizer, questions=questions,
                            batch=batch, result=result, n_groups=self.samples, first_wrong=first_wrong)
        return write_credit(self.out_dir, rec)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_KINDS = {  # kind: (test of one value, test of a list's item or None, what the message says)
    "number": (_is_number, None, "a number"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), None, "an integer"),
    "str": (lambda v: isinstance(v, str), None, "a string"),
    "str|null": (lambda v: v is None or isinstance(v, str), None, "a string or null"),
    "numbers": (None, _is_number, "a list of numbers"),
    "strs": (None, lambda v: isinstance(v, str), "a list of strings"),
}


def _check(path, where: str, key: str, value, kind: str):
    """ValueError naming the file and the field when value is not of kind (a key of _KINDS)."""
    one, item, what = _KINDS[kind]
    if one is not None and one(value):
        return
    if item is not None and isinstance(value, list):
        bad = [x for x in value if not item(x)]
        if not bad:
            return
        value = bad[0]
    raise ValueError(f"{path}: {where}field {key!r}: expected {what}, got {value!r:.40}")


def load_credit(path: str | Path) -> dict:
    """A credit file; ValueError naming the file and the field when it is unreadable, lacks a field or
    holds a value of the wrong type (a null or a string where a number belongs)."""
    path = Path(path)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            rec = json.load(fh)
    except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path}: unreadable credit file ({type(e).__name__}: {e}); truncated or corrupt?"
        ) from None
    if not isinstance(rec, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(rec).__name__}")
    for key, kind in (("step", "int"), ("algo", "str"), ("lambda", "number"), ("eps_w", "number"),
                      ("groups", None)):
        if key not in rec:
            raise ValueError(f"{path}: missing field {key!r} (fields present: {sorted(rec)})")
        if kind:
            _check(path, "", key, rec[key], kind)
    if not isinstance(rec["groups"], list) or not all(isinstance(g, dict) for g in rec["groups"]):
        raise ValueError(f"{path}: field 'groups': expected a list of objects")
    for g, group in enumerate(rec["groups"]):
        for key, kind in (("question", "str"), ("r_plus", "str"), ("r_minus", "str|null"),
                          ("responses", None)):
            if key not in group:
                raise ValueError(f"{path}: group {g}: missing field {key!r}")
            if kind:
                _check(path, f"group {g}: ", key, group[key], kind)
        responses = group["responses"]
        if not isinstance(responses, list) or not all(isinstance(r, dict) for r in responses):
            raise ValueError(f"{path}: group {g}: field 'responses': expected a list of objects")
        for r, resp in enumerate(group["responses"]):
            for key, kind in (("reward", "number"), ("adv", "number"), ("tokens", "strs"),
                              ("delta", "numbers"), ("w", "numbers"), ("a_hat", "numbers")):
                if key not in resp:
                    raise ValueError(f"{path}: group {g} response {r}: missing field {key!r}")
                _check(path, f"group {g} response {r}: ", key, resp[key], kind)
            n = len(resp["tokens"])
            if not len(resp["delta"]) == len(resp["w"]) == len(resp["a_hat"]) == n:
                raise ValueError(
                    f"{path}: group {g} response {r}: tokens, delta, w and a_hat differ in length"
                )
    return rec


def credit_files(run_dir: str | Path) -> list[Path]:
    return sorted((Path(run_dir) / CREDIT_DIR).glob("step_*.json.gz"))
