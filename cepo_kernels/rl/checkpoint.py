"""Checkpoints: written to a temporary directory and renamed into place (never half-written), keep-last-K,
and everything a resumed run needs to continue exactly (model, optimizer, scheduler, RNG, step)."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

PREFIX = "step_"
STATE = "trainer_state.json"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
) -> Path:
    """Writes ckpt_root/step_{step:06d} atomically and deletes all but the keep_last newest checkpoints."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{PREFIX}{step:06d}-", dir=ckpt_root))
    try:
        torch.save(model_state(model, trainable_only), tmp / "model_state.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        state = {"step": step, "trainable_only": trainable_only, "config": config, **(extra or {})}
        (tmp / STATE).write_text(json.dumps(state, indent=2))
        for f in tmp.iterdir():  # flush file contents before the rename makes the checkpoint visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
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
    raise FileNotFoundError(
        f"resume: no checkpoint found at {str(path)!r} (expected a directory holding "
        f"{STATE}, or a run directory with checkpoints/{PREFIX}NNNNNN)"
    )


def run_dir_of(ckpt: Path) -> Path | None:
    """The run directory holding a checkpoint (RUN/checkpoints/step_NNNNNN), or None."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def read_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / STATE).read_text())


def load_checkpoint(ckpt: Path, *, model, optimizer, scheduler) -> dict:
    """Restores model, optimizer and scheduler; returns the trainer state (step, config...). The RNG state
    is restored separately (set_rng_state(torch.load(ckpt / "rng.pt"))), last, once everything is built."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    params = torch.load(ckpt / "model_state.pt", map_location="cpu", weights_only=True)
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
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True))
    return state


def load_rng(ckpt: Path) -> dict:
    return torch.load(Path(ckpt) / "rng.pt", weights_only=False)
