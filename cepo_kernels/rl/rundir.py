"""A run directory belongs to one run: claimed with a lock, refused when it already holds another run,
and its files (metrics.jsonl, partial checkpoints) repaired after a crash, kill -9 or a full disk."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
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
        if others and not resuming:
            self.release()
            raise RunDirError(
                f"out_dir: {str(self.path)!r} already holds a run ({', '.join(others[:4])}"
                f"{', ...' if len(others) > 4 else ''}); resume it with --resume {self.path}, "
                "or choose a new --out-dir"
            )

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


def read_metrics(path: Path, upto_step: int | None = None) -> list[dict]:
    """The records of a metrics.jsonl, optionally only those with step <= upto_step.

    A torn last line (the process was killed mid-write, or the disk filled up) is dropped with a
    warning; any other unreadable line is an error naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError("not a step record")
        except ValueError as e:
            if all(not rest.strip() for rest in lines[i:]):
                log.warning("%s:%d: dropped a torn last line (%s): %.60r", path, i, e, line)
                continue
            raise ValueError(f"resume: {path}:{i}: unreadable metrics line ({e})") from None
        if upto_step is None or row["step"] <= upto_step:
            rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]):
    """Rewrites path with rows, atomically (a temporary file renamed over it)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def append_jsonl(path: Path, row: dict):
    """Appends one record as a line and flushes it to disk."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_json(path: Path, obj):
    """Writes a JSON file atomically, with non-finite numbers as null (valid JSON)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)


def json_safe(obj):
    """obj with every NaN/inf float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
