"""The files of a run directory, read and written the same way by every front end.

Every whole-file write is atomic (a temporary file in the same directory, then `os.replace`), so a
crash, kill -9 or a full disk leaves the previous version or the new one, never a torn file.
`metrics.jsonl` is append-only, one JSON record per step, fsynced; `read_metrics` is its one reader.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
from pathlib import Path

log = logging.getLogger("cepo_kernels")

__all__ = ["atomic_write", "write_json", "write_jsonl", "append_jsonl", "write_json_gz", "read_metrics",
           "json_safe", "MetricsError"]


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
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
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
    """Appends one record as a line and flushes it to disk."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics(path: str | Path, upto_step: int | None = None) -> list[dict]:
    """The step records of a metrics.jsonl (optionally only those with step <= upto_step); [] when the
    file does not exist.

    A torn last line (the process was killed mid-write, or the disk filled up) is dropped with a
    warning; any other unreadable line raises MetricsError naming the file and line.
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
            raise MetricsError(f"{path}:{i}: unreadable metrics line ({e})") from None
        if upto_step is None or row["step"] <= upto_step:
            rows.append(row)
    return rows
