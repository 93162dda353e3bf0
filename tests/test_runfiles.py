"""The run directory's files: atomic writes leave no partial file; the metrics.jsonl reader drops only a
torn last line."""

import errno
import gzip
import json
import logging
import os
import subprocess

import pytest
import torch

from cepo_kernels.runfiles import (
    MetricsError,
    WriteFailed,
    append_jsonl,
    atomic_write,
    read_metrics,
    write_json,
    write_json_gz,
    write_jsonl,
    writing,
)


def test_json_writers_round_trip_with_nan_as_null(tmp_path):
    write_json(tmp_path / "a.json", {"x": float("nan"), "y": [1.0, float("inf")]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": None, "y": [1.0, None]}
    write_json_gz(tmp_path / "b.json.gz", {"step": 3})
    assert json.loads(gzip.decompress((tmp_path / "b.json.gz").read_bytes())) == {"step": 3}
    write_jsonl(tmp_path / "m.jsonl", [{"step": 1}, {"step": 2}])
    append_jsonl(tmp_path / "m.jsonl", {"step": 3, "v": float("nan")})
    assert read_metrics(tmp_path / "m.jsonl") == [{"step": 1}, {"step": 2}, {"step": 3, "v": None}]
    assert read_metrics(tmp_path / "m.jsonl", upto_step=2) == [{"step": 1}, {"step": 2}]
    assert read_metrics(tmp_path / "missing.jsonl") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json.gz", "m.jsonl"]  # no .tmp left


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    write_json(path, {"v": 1})

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cepo_kernels.runfiles.os.fsync", full)
    with pytest.raises(WriteFailed, match=f"^cannot write f.json in {tmp_path}: no space left on device$"):
        atomic_write(path, b'{"v": 2}')
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # the temporary file is removed


def test_torn_last_line_dropped_with_a_warning_other_garbage_refused(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING, logger="cepo_kernels"):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert "metrics.jsonl:3: dropped a torn last line" in caplog.text
    path.write_text('{"step": 1}\ngarbage\n{"step": 3}\n')
    with pytest.raises(MetricsError, match=r"metrics.jsonl:2: unreadable metrics line"):
        read_metrics(path)
    path.write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(MetricsError, match="not a step record"):
        read_metrics(path)


def test_a_failed_append_leaves_the_previous_lines(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1})
    real = os.write

    def half(fd, data):  # writes part of the line, then the disk is full
        if len(data) > 4:
            return real(fd, bytes(data[:4]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cepo_kernels.runfiles.os.write", half)
    with pytest.raises(WriteFailed, match="cannot write metrics.jsonl in .*: no space left on device"):
        append_jsonl(path, {"step": 2, "reward_mean": 0.5})
    assert path.read_text() == '{"step": 1}\n'


def test_torch_save_short_write_is_named(tmp_path):
    """torch.save's C++ writer reports a full disk as RuntimeError('unexpected pos ...'); with the errno
    in the chain (a Python file), or by the free space of the directory, it becomes one line."""
    cause = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(WriteFailed, match="cannot write m.pt in .*: no space left on device"), \
            writing(tmp_path / "m.pt"):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") from cause
    with pytest.raises(WriteFailed, match="m.pt in .*: write failed"), writing(tmp_path / "m.pt"):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(WriteFailed, match="final_model in .*: no space left on device"), \
            writing(tmp_path / "final_model"):  # safetensors' own error type, the errno in its text
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(RuntimeError, match="unrelated"), writing(tmp_path / "m.pt"):
        raise RuntimeError("unrelated")  # not a write error: passes through


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MB tmpfs (needs root and mount); skipped where the machine does not allow it."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()[:80]})")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_a_real_full_disk_is_one_line_and_keeps_the_files(tiny_disk):
    write_json(tiny_disk / "small.json", {"v": 1})
    with pytest.raises(WriteFailed, match=f"cannot write big.bin in {tiny_disk}: no space left on device"):
        atomic_write(tiny_disk / "big.bin", b"x" * (2 << 20))
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["small.json"]
    with pytest.raises(WriteFailed, match="no space left on device"), writing(tiny_disk / "t.pt"), \
            open(tiny_disk / "t.pt", "wb") as fh:
        torch.save(torch.zeros(1 << 19), fh)


def test_garbage_lines_warn_when_not_strict(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\ngarbage\n{"step": "2"}\n{"step": 3}\n')
    with caplog.at_level(logging.WARNING, logger="cepo_kernels"):
        assert [r["step"] for r in read_metrics(path, strict=False)] == [1, 3]
    assert "metrics.jsonl:2: skipped an unreadable" in caplog.text
    assert "metrics.jsonl:3: skipped an unreadable metrics line (step '2': expected an integer" in caplog.text
