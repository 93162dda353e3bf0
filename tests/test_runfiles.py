"""The run directory's files: atomic writes leave no partial file; the metrics.jsonl reader drops only a
torn last line."""

import gzip
import json
import logging

import pytest

from cepo_kernels.runfiles import (
    MetricsError,
    append_jsonl,
    atomic_write,
    read_metrics,
    write_json,
    write_json_gz,
    write_jsonl,
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
    with pytest.raises(OSError, match="No space left"):
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
