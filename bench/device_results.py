"""The device run's records, one JSON line each, written as soon as each result exists (bench/run_device.sh).

As a pytest plugin (`python -m pytest -p device_results ...`, with bench/ on PYTHONPATH), active when
CEPO_RESULTS_JSONL names a file:

- appends one line per test as soon as it finishes: its node id, parameters, outcome (with the skip reason
  or the failure's last lines), and for a benchmark its group, extra_info and timing statistics (seconds),
  so a phase stopped at its cap keeps every test it finished (pytest-benchmark's own --benchmark-json is
  written only at the end of the session);
- runs the tests in the priority order CEPO_RESULTS_ORDER gives: comma-separated substrings of node ids, a
  test ranked by the first one its id contains, the tests matching none after the rest in their own order.
  A pattern that matches nothing changes the order of nothing and deselects nothing.
CEPO_RESULTS_PHASE is the phase name written with each line.

As a script:

    python bench/device_results.py env OUT.jsonl [PEER==VERSION ...]   the card, the versions and the peers,
        each peer imported as the benchmarks import it (exit status 3 if one is missing or mismatched)
    python bench/device_results.py stub OUT.jsonl PHASE    the rehearsal: appends bench/rehearsal.jsonl's
        records of PHASE, marked "stub" (made-up numbers that exercise the summary, never measurements)
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import sys
from pathlib import Path

import pytest

STUBS = Path(__file__).with_name("rehearsal.jsonl")
# a peer's distribution -> (module, attribute) that the benchmarks import from it
PEER_IMPORTS = {
    "liger-kernel": [("liger_kernel.transformers.grpo_loss", "triton_grpo_loss"),
                     ("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss")],
    "cut-cross-entropy": [("cut_cross_entropy", "linear_cross_entropy")],
    "trl": [("trl.kernels", "ChunkedLogProbFunction")],
}


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def append(path, record):
    """One JSON line, flushed to the file system before returning (a killed process loses nothing written)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------ pytest plugin


def pytest_collection_modifyitems(config, items):
    order = [p for p in os.environ.get("CEPO_RESULTS_ORDER", "").split(",") if p]
    if order:
        items[:] = sorted(items, key=lambda it: next((i for i, p in enumerate(order) if p in it.nodeid),
                                                     len(order)))


def _message(report):
    if report.passed:
        return ""
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    return report.longreprtext[-2000:]


def _bench(fixture):
    """group, extra_info and statistics of a pytest-benchmark fixture that ran (else {})."""
    if fixture is None or not hasattr(fixture, "extra_info"):
        return {}
    out = {"group": getattr(fixture, "group", None), "extra_info": dict(fixture.extra_info)}
    stats = getattr(getattr(fixture, "stats", None), "stats", None)
    if stats:
        fields = getattr(stats, "fields", ("min", "max", "mean", "median", "stddev", "rounds"))
        out["stats"] = {}
        for f in fields:
            try:
                out["stats"][f] = getattr(stats, f)
            except Exception:  # e.g. a statistic undefined for one round
                continue
    return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """One line per test, written as it is reported: its call, or the setup that skipped or failed it."""
    outcome = yield
    report = outcome.get_result()
    path = os.environ.get("CEPO_RESULTS_JSONL")
    if not path or not (report.when == "call" or (report.when == "setup" and not report.passed)):
        return
    params = getattr(getattr(item, "callspec", None), "params", {})
    record = {"kind": "test", "phase": os.environ.get("CEPO_RESULTS_PHASE", ""), "nodeid": item.nodeid,
              "name": item.name, "outcome": report.outcome, "message": _message(report),
              "params": {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
                         for k, v in params.items()},
              "duration": round(report.duration, 3), "time": _now()}
    if report.when == "call":
        record.update(_bench(getattr(item, "funcargs", {}).get("benchmark")))
    append(path, record)


# ------------------------------------------------------------------------------------------ script


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def peers(expected):
    """{distribution: {"version", "ok", "detail"}} for every pinned peer NAME==VERSION."""
    out = {}
    for spec in expected:
        dist, _, want = spec.partition("==")
        got, problems, where = _version(dist), [], []
        if got is None:
            problems.append("not installed")
        elif want and got != want:
            problems.append(f"version {got}, not the pinned {want}")
        for module, attr in PEER_IMPORTS.get(dist, []):
            try:
                mod = importlib.import_module(module)
                getattr(mod, attr)
                where.append(str(Path(mod.__file__).parent))
            except Exception as e:  # noqa: BLE001 - any failure means the peer's benchmarks will skip
                problems.append(f"{module}.{attr}: {type(e).__name__}: {e}"[:300])
        out[dist] = {"version": got, "ok": not problems, "detail": "; ".join(problems) or where[0]}
    return out


def env(path, expected):
    import torch
    import triton

    rec = {"kind": "env", "time": _now(), "python": sys.version.split()[0], "torch": torch.__version__,
           "triton": triton.__version__, "cuda": torch.version.cuda,
           "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU",
           "fp_fusion": os.environ.get("TRITON_DEFAULT_FP_FUSION", "unset")}
    for dist in ("transformers", "peft", "accelerate", "pytest", "pytest-benchmark"):
        rec[dist] = _version(dist)
    if torch.cuda.is_available():
        rec["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    rec["peers"] = peers(expected)
    append(path, rec)
    print(f"card: {rec['card']}; torch {rec['torch']}; triton {rec['triton']}; "
          f"transformers {rec['transformers']}; TRITON_DEFAULT_FP_FUSION={rec['fp_fusion']}; {rec['time']}")
    for dist, p in rec["peers"].items():
        state = "ok" if p["ok"] else "MISSING (its benchmarks will skip, its ratios will be missing)"
        print(f"peer {dist} {p['version'] or '-'}: {state}: {p['detail']}")
    return all(p["ok"] for p in rec["peers"].values())


def stub(path, phase):
    n = 0
    for line in STUBS.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("phase") == phase:
            append(path, {**rec, "stub": True, "time": _now()})
            n += 1
    print(f"rehearsal: {n} stub records for phase {phase} (made-up numbers, not measurements)")
    return n


def main(argv):
    if len(argv) >= 2 and argv[0] == "env":
        sys.exit(0 if env(argv[1], argv[2:]) else 3)
    elif len(argv) == 3 and argv[0] == "stub":
        if stub(argv[1], argv[2]) == 0:
            sys.exit(f"device_results: no stub records for phase {argv[2]!r} in {STUBS}")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
