"""The files of a run directory, read and written the same way by every front end.

Every whole-file write is atomic (a temporary file in the same directory, then `os.replace`), so a
crash, kill -9 or a full disk leaves the previous version or the new one, never a torn file.
`metrics.jsonl` is append-only, one JSON record per step, fsynced; `read_metrics` is its one reader.
A failed write (a full disk, a read-only or vanished directory) raises WriteFailed, an OSError whose
message is one line naming the directory and the cause; `writing(path)` gives any other writer
(torch.save, save_pretrained, matplotlib) the same error.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger("cepo_kernels")

__all__ = ["atomic_write", "write_json", "write_jsonl", "append_jsonl", "write_json_gz", "read_metrics",
           "json_safe", "MetricsError", "WriteFailed", "writing"]
# torch.save's C++ writer reports a short write as these, without an errno
_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")
_LOW_SPACE = 1 << 20  # bytes free below which a write error without an errno is a full disk


class WriteFailed(OSError):
    """A write into a run or output directory failed; str() is one line: file, directory and cause."""

    def __str__(self):
        return self.strerror


def _os_error(e: BaseException) -> OSError | None:
    """The first OSError with an errno in e's chain of causes (torch.save wraps it in a RuntimeError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e
        e = e.__cause__ or e.__context__
    return None


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def write_failed(e: BaseException, path: str | Path, whole: bool = False) -> WriteFailed | None:
    """The WriteFailed naming path for an error raised while writing it, or None when e is not a write
    error. A WriteFailed of a file inside path is kept, or with whole=True renamed to path (a checkpoint
    directory named as one thing, not by its temporary files)."""
    path = Path(path)
    os_err = _os_error(e)
    if isinstance(e, WriteFailed):
        if not whole:
            return e
        code, cause = e.errno, getattr(e, "cause", e.strerror)
    elif os_err is not None:
        code = os_err.errno
        cause = os.strerror(code).lower()
    elif _ERRNO_IN_TEXT.search(str(e)):  # safetensors: "I/O error: No space left on device (os error 28)"
        code = int(next(g for g in _ERRNO_IN_TEXT.search(str(e)).groups() if g))
        cause = os.strerror(code).lower()
    elif isinstance(e, RuntimeError) and any(m in str(e) for m in _SHORT_WRITE):
        free = _free_bytes(path.parent)
        code = errno.ENOSPC if free is not None and free < _LOW_SPACE else errno.EIO
        cause = "no space left on device" if code == errno.ENOSPC else f"write failed ({str(e).strip()[:80]})"
    else:
        return None
    err = WriteFailed(code, f"cannot write {path.name} in {path.parent}: {cause}")
    err.cause = cause
    return err


@contextlib.contextmanager
def writing(path: str | Path, whole: bool = False):
    """Turns a failed write of path (an OSError, torch.save's RuntimeError for a short write, another
    library's error carrying an errno in its text) into WriteFailed (see write_failed for `whole`); other
    errors pass through."""
    try:
        yield
    except Exception as e:
        err = write_failed(e, path, whole)
        if err is None:
            raise
        raise err from None


class MetricsError(ValueError):
    """A metrics.jsonl line other than the last is unreadable (the message names the file and line)."""


def json_safe(obj):
    """obj with every NaN/inf float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Writes data to path atomically (temporary sibling, fsync, rename); returns the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
    return path


def write_json(path: str | Path, obj, indent: int | None = 2) -> Path:
    """A JSON file, atomically, with non-finite numbers as null (valid JSON)."""
    return atomic_write(path, json.dumps(json_safe(obj), indent=indent, allow_nan=False).encode("utf-8"))


def write_json_gz(path: str | Path, obj) -> Path:
    """A gzip-compressed compact JSON file, atomically."""
    text = json.dumps(json_safe(obj), separators=(",", ":"), allow_nan=False)
    return atomic_write(path, gzip.compress(text.encode("utf-8"), mtime=0))


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Rewrites path with one JSON line per row, atomically."""
    text = "".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in rows)
    return atomic_write(path, text.encode("utf-8"))


def append_jsonl(path: str | Path, row: dict):
    """Appends one record as a line and flushes it to disk; a failed write is cut off again (the file ends
    with the previous complete line) and raises WriteFailed."""
    line = (json.dumps(json_safe(row), allow_nan=False) + "\n").encode("utf-8")
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def read_metrics(path: str | Path, upto_step: int | None = None, strict: bool = True) -> list[dict]:
    """The step records of a metrics.jsonl (optionally only those with step <= upto_step); [] when the
    file does not exist.

    A torn last line (the process was killed mid-write, or the disk filled up) is dropped with a
    warning; any other unreadable line (not a JSON object with an integer "step" >= 1) raises
    MetricsError naming the file and line, or with strict=False is dropped with a warning naming them.
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
            step = row["step"]
            if not isinstance(step, int) or isinstance(step, bool) or step < 1:
                raise ValueError(f"step {step!r:.20}: expected an integer >= 1")
        except ValueError as e:
            if all(not rest.strip() for rest in lines[i:]):
                log.warning("%s:%d: dropped a torn last line (%s): %.60r", path, i, e, line)
                continue
            if not strict:
                log.warning("%s:%d: skipped an unreadable metrics line (%s): %.60r", path, i, e, line)
                continue
            raise MetricsError(f"{path}:{i}: unreadable metrics line ({e})") from None
        if upto_step is None or row["step"] <= upto_step:
            rows.append(row)
    return rows
