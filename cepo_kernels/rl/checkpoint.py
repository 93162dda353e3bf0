"""Checkpoints: written to a temporary directory and renamed into place (never half-written), keep-last-K,
and everything a resumed run needs to continue exactly (model, optimizer, scheduler, RNG, step, and the
metrics records of the steps since the previous checkpoint, so a torn metrics.jsonl line is restored).

Every file of a checkpoint loads without running code: the tensors with torch.load(weights_only=True),
the trainer state and the RNG state as JSON; anything else is refused (a run directory may come from
someone else).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from cepo_kernels.runfiles import write_json, writing

PREFIX = "step_"
STATE = "trainer_state.json"
RNG = "rng.json"
log = logging.getLogger("cepo_kernels.rl")


def rng_state() -> dict:
    """The RNG states as JSON: lists of ints (the generators' own state words and bytes)."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict):
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _save(obj, path: Path):
    """torch.save through a Python file, so a full disk surfaces as its errno in the error's chain."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def model_state(model, trainable_only: bool) -> dict:
    """The parameters to save: all of them, or (LoRA on a model loaded from disk) only the trainable ones."""
    if trainable_only:
        return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().cpu() for n, t in model.state_dict().items()}


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    *,
    model,
    optimizer,
    scheduler,
    config: dict,
    trainable_only: bool,
    keep_last: int,
    extra: dict | None = None,
    states: dict | None = None,
) -> Path:
    """Writes ckpt_root/step_{step:06d} atomically and deletes all but the keep_last newest checkpoints.
    states: more state dicts, each saved as NAME.pt (e.g. a distillation teacher's copy)."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"{PREFIX}{step:06d}"
    with writing(final):
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{PREFIX}{step:06d}-", dir=ckpt_root))
    try:
        with writing(final, whole=True):  # a failed write names the checkpoint, not its temporary files
            _save(model_state(model, trainable_only), tmp / "model_state.pt")
            _save(optimizer.state_dict(), tmp / "optimizer.pt")
            _save(scheduler.state_dict(), tmp / "scheduler.pt")
            write_json(tmp / RNG, rng_state(), indent=None)
            for name, state in (states or {}).items():
                _save(state, tmp / f"{name}.pt")
            # written last: a checkpoint is complete when it has its state file (list_checkpoints)
            write_json(tmp / STATE, {"step": step, "trainable_only": trainable_only, "config": config,
                                     **(extra or {})})
            if final.exists():  # re-saving the same step (e.g. a resumed run stopping where it started)
                old = ckpt_root / f".old-{final.name}-{os.getpid()}"
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints under ckpt_root, oldest first (temporary directories are ignored)."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    found = [
        p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from --resume: a checkpoint itself, a run directory or its checkpoints/ folder
    (the newest checkpoint is taken)."""
    path = Path(path)
    if (path / STATE).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    hint = ""
    if (path / "config.json").is_file():
        hint = ("; this run stopped before its first checkpoint: run the same command without --resume "
                "(a run directory with nothing but config.json is started over in place) or delete it")
    raise FileNotFoundError(
        f"resume: no checkpoint found at {str(path)!r} (expected a directory holding "
        f"{STATE}, or a run directory with checkpoints/{PREFIX}NNNNNN){hint}"
    )


def run_dir_of(ckpt: Path) -> Path | None:
    """The run directory holding a checkpoint (RUN/checkpoints/step_NNNNNN), or None."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"resume: {path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"resume: {path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_state(ckpt: Path) -> dict:
    """The checkpoint's trainer state; ValueError naming the file and field when it is not one."""
    path = Path(ckpt) / STATE
    state = _json(path)
    kinds = {"step": int, "trainable_only": bool, "config": dict}
    for key, kind in kinds.items():
        if not isinstance(state.get(key), kind) or (kind is int and isinstance(state[key], bool)):
            raise ValueError(
                f"resume: {path}: field {key!r}: expected {kind.__name__}, got {state.get(key)!r:.60}"
            )
    if state["step"] < 0:
        raise ValueError(f"resume: {path}: field 'step': expected a step >= 0, got {state['step']}")
    metrics = state.get("metrics", [])
    if not isinstance(metrics, list) or not all(isinstance(r, dict) and isinstance(r.get("step"), int)
                                                for r in metrics):
        raise ValueError(f"resume: {path}: field 'metrics': expected a list of step records")
    return state


def _load(path: Path):
    """torch.load(weights_only=True): tensors and plain containers only, never code."""
    if not path.is_file():
        raise ValueError(f"resume: {path}: missing (the checkpoint is incomplete)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling refusal, a truncated zip, ...
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"resume: {path}: not loadable as tensors only (torch.load weights_only=True: {first}); "
            "refusing it: a state file that needs more can run code"
        ) from None


def load_checkpoint(ckpt: Path, *, model, optimizer, scheduler) -> dict:
    """Restores model, optimizer and scheduler; returns the trainer state (step, config...). The RNG state
    is restored separately (set_rng_state(torch.load(ckpt / "rng.pt"))), last, once everything is built."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    params = _load(ckpt / "model_state.pt")
    if not isinstance(params, dict) or not all(isinstance(t, torch.Tensor) for t in params.values()):
        raise ValueError(f"resume: {ckpt / 'model_state.pt'}: expected a dict of tensors")
    own = model.state_dict()
    for name, t in params.items():
        if name in own and tuple(own[name].shape) != tuple(t.shape):
            raise ValueError(
                f"resume: {ckpt} was written with another model or LoRA configuration: parameter {name} "
                f"has shape {tuple(t.shape)} there and {tuple(own[name].shape)} here"
            )
    missing, unexpected = model.load_state_dict(params, strict=not state["trainable_only"])
    if unexpected:
        raise ValueError(f"resume: {ckpt} holds parameters the model does not have: {unexpected[:5]}")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if trainable - set(params):
        raise ValueError(
            f"resume: {ckpt} lacks trainable parameters {sorted(trainable - set(params))[:5]} "
            f"(was it written with another LoRA configuration?)"
        )
    for name, target in (("optimizer.pt", optimizer), ("scheduler.pt", scheduler)):
        try:
            target.load_state_dict(_load(ckpt / name))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            if str(e).startswith("resume:"):
                raise
            raise ValueError(f"resume: {ckpt / name}: not a state of this run's {name[:-3]} ({e})") from None
    return state


def restore_metrics(rows: list[dict], ckpt: Path) -> list[dict]:
    """metrics.jsonl's records up to ckpt's step, with every step the file lacks (a torn or lost line)
    taken from the records saved in ckpt and the checkpoints before it; one record per step, in order."""
    ckpt = Path(ckpt)
    step = read_state(ckpt)["step"]
    by_step = {r["step"]: r for r in rows if r["step"] <= step}
    lacking = set(range(1, step + 1)) - set(by_step)
    restored = []
    if lacking:
        for c in [p for p in list_checkpoints(ckpt.parent) if int(p.name[len(PREFIX):]) <= step] or [ckpt]:
            for rec in read_state(c).get("metrics", []):
                if rec["step"] in lacking and rec["step"] not in by_step:
                    by_step[rec["step"]] = rec
                    restored.append(rec["step"])
    if restored:
        log.warning("resume: restored the metrics of step(s) %s from the checkpoints (missing or torn in "
                    "metrics.jsonl)", ", ".join(map(str, sorted(restored))))
    if lacking - set(restored):
        log.warning("resume: no metrics record of step(s) %s anywhere (metrics.jsonl or checkpoints)",
                    ", ".join(map(str, sorted(lacking - set(restored)))))
    return [by_step[k] for k in sorted(by_step)]


def load_rng(ckpt: Path) -> dict:
    """The RNG state of a checkpoint (rng.json), already restored; ValueError when missing or malformed."""
    ckpt = Path(ckpt)
    path = ckpt / RNG
    if not path.is_file():
        old = " (it holds rng.pt, a pickle written by an older cepo-train: not loaded, as it could run code)"
        raise ValueError(f"resume: {path}: missing{old if (ckpt / 'rng.pt').exists() else ''}")
    state = _json(path)
    try:
        set_rng_state(state)  # restoring it is the check (the trainer restores it last, again)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"resume: {path}: not an RNG state ({type(e).__name__}: {e})") from None
    return state
