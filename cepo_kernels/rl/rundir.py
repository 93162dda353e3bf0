"""A run directory belongs to one run: claimed with a lock, refused when it already holds another run,
and its files (metrics.jsonl, partial checkpoints) repaired after a crash, kill -9 or a full disk."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Linux/macOS: no lock, the emptiness check still applies
    fcntl = None

log = logging.getLogger("cepo_kernels.rl")
LOCK = ".lock"


class RunDirError(ValueError):
    """The run directory cannot be used (in use, holds another run, not writable)."""


class RunDir:
    """Claims `path` for one run: creates it, takes an exclusive lock (held until release()) and, unless
    the run is resumed there, requires it to be empty. acquire() takes the lock again for a later session
    of the same run (the emptiness check is done once, at the claim)."""

    def __init__(self, path: str | Path, *, resuming: bool):
        self.path = Path(path).absolute()
        self.acquire()
        others = sorted(p.name for p in self.path.iterdir() if p.name != LOCK)
        if others and not resuming and self._never_stepped(others):
            log.warning("out_dir: %s holds a run that stopped before its first step finished (%s, no "
                        "checkpoint, no metrics): starting it over in place", self.path, ", ".join(others))
            for name in others:
                p = self.path / name
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            others = []
        if others and not resuming:
            self.release()
            from cepo_kernels.rl.checkpoint import list_checkpoints

            if not list_checkpoints(self.path / "checkpoints"):
                raise RunDirError(
                    f"out_dir: {str(self.path)!r} holds a run that stopped before its first checkpoint "
                    f"({', '.join(others[:4])}): there is nothing to resume; delete the directory to start "
                    "over there, or choose a new --out-dir"
                )
            raise RunDirError(
                f"out_dir: {str(self.path)!r} already holds a run ({', '.join(others[:4])}"
                f"{', ...' if len(others) > 4 else ''}); resume it with --resume {self.path}, "
                "or choose a new --out-dir"
            )

    def _never_stepped(self, names: list[str]) -> bool:
        """Only what a run writes before its first step (config.json, an empty metrics.jsonl, empty or
        partial checkpoint and credit folders): nothing would be lost by starting over."""
        if not set(names) <= {"config.json", "metrics.jsonl", "checkpoints", "credit"}:
            return False
        metrics, ckpts, credit = (self.path / n for n in ("metrics.jsonl", "checkpoints", "credit"))
        if metrics.exists() and (not metrics.is_file() or metrics.stat().st_size > 0):
            return False
        if credit.exists() and (not credit.is_dir() or any(credit.iterdir())):
            return False
        if ckpts.exists() and (not ckpts.is_dir() or any(not p.name.startswith((".tmp-", ".old-"))
                                                         for p in ckpts.iterdir())):
            return False
        return True

    def acquire(self):
        if getattr(self, "_fh", None) is not None and not self._fh.closed:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path / LOCK, "a+")  # noqa: SIM115 (held until release())
        except OSError as e:
            raise RunDirError(f"out_dir: cannot create or write {str(self.path)!r} ({e.strerror})") from None
        if fcntl is not None:
            try:
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._fh.seek(0)
                owner = self._fh.read().strip() or "unknown"
                self._fh.close()
                raise RunDirError(
                    f"out_dir: {str(self.path)!r} is in use by another cepo-train run (pid {owner}); "
                    "wait for it to finish or choose another --out-dir"
                ) from None
        try:
            self._fh.seek(0)
            self._fh.truncate()
            self._fh.write(str(os.getpid()))
            self._fh.flush()
        except OSError as e:
            self.release()
            raise RunDirError(f"out_dir: cannot write in {str(self.path)!r} ({e.strerror})") from None

    def release(self):
        if getattr(self, "_fh", None) is not None and not self._fh.closed:
            self._fh.close()  # releases the lock

    close = release

    def __del__(self):
        fh = getattr(self, "_fh", None)
        if fh is not None and not fh.closed:
            fh.close()


def clean_partial_checkpoints(ckpt_root: Path) -> list[str]:
    """Removes the temporary directories a crash or kill -9 during a save leaves behind."""
    removed = []
    if Path(ckpt_root).is_dir():
        for p in Path(ckpt_root).iterdir():
            if p.is_dir() and p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    if removed:
        log.warning("removed %d partial checkpoint(s) left by an interrupted save: %s", len(removed),
                    ", ".join(sorted(removed)))
    return removed


def resolve_out_dir(out_dir: str | None, algo: str, resume_from: Path | None) -> tuple[Path, bool]:
    """(run directory, whether it is the resumed run's own). A resumed run continues where it was
    resumed from; an --out-dir elsewhere branches it into that new directory."""
    from cepo_kernels.rl.checkpoint import run_dir_of

    if resume_from is None:
        default = Path("runs") / f"{algo}-{time.strftime('%Y%m%d-%H%M%S')}"
        return Path(out_dir or default).absolute(), False
    source = run_dir_of(resume_from)
    if out_dir is None or (source is not None and Path(out_dir).resolve() == source.resolve()):
        if source is None:
            raise ValueError(
                f"out_dir: the checkpoint {str(resume_from)!r} is not inside a run directory "
                "(RUN/checkpoints/step_NNNNNN): give --out-dir for the continued run"
            )
        return source.absolute(), True
    return Path(out_dir).absolute(), False
