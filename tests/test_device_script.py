"""bench/run_device.sh, the one GPU call, checked on a CPU so that a typo cannot cost a device session.

The script's quick rehearsal (every phase invoked, the GPU parts stubbed, no wheels), its phase list and
time box, the pytest plugin that writes each test's result as it finishes (bench/device_results.py), and
bench/summarise.py on the rehearsal's stub records: every target of docs/peers.md as measured / target, a
missing number named with its reason, a retry's results completing a first run's. No network, no wheels,
no GPU; a few seconds. The full rehearsal (`bash bench/run_device.sh --rehearse`: the pytest commands
collected, the carried wheels installed offline and imported) is the manual check before a device run.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SCRIPT = BENCH / "run_device.sh"
STUBS = BENCH / "rehearsal.jsonl"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def bash(*args, env=None, timeout=120):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHON": sys.executable, **(env or {})})


@pytest.fixture(scope="module")
def summarise():
    sys.path.insert(0, str(BENCH))
    try:
        import summarise
        import summarise_targets

        yield summarise, summarise_targets
    finally:
        sys.path.remove(str(BENCH))


def phases():
    """[(name, cap)] from `--list`, and the default deadline it states."""
    out = bash("--list").stdout
    rows = re.findall(r"^(\S+)\s+(\d+) s  ", out, re.M)
    deadline = int(re.search(r"deadline of (\d+) s", out).group(1))
    return [(n, int(c)) for n, c in rows], deadline


def test_shell_syntax_and_phase_list():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    rows, deadline = phases()
    default = [(n, c) for n, c in rows if c > 0]
    # the most valuable numbers first: the kernel ratios, then the 4B step, then correctness at large shapes
    names = [n for n, _ in default]
    assert names.index("logits") < names.index("step") < names.index("gpu-tests")
    assert names.index("linear") < names.index("step")
    # every default phase fits in the deadline together with the setup, and the deadline leaves a device
    # session (15 minutes, 1-2 to start a machine, 10 a command) room for one retry
    assert sum(c for _, c in default) < deadline <= 7.5 * 60
    assert bash("--only", "nosuchphase", "--rehearse", "--quick").returncode == 2


def test_quick_rehearsal_runs_every_phase_without_wheels(tmp_path):
    out = tmp_path / "out"
    r = bash("--rehearse", "--quick", str(out), env={"RUN_DEVICE_WHEELS": str(tmp_path / "no-wheels")})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MISSING peer wheels" in r.stdout and "--fetch-wheels" in r.stdout
    files = sorted(p.name.split("-", 3)[-1] for p in out.iterdir())
    assert files == ["bench-json.tgz", "log.txt", "results.jsonl", "summary.md"]
    records = [json.loads(line) for line in next(out.glob("*-results.jsonl")).read_text().splitlines()]
    ran = [r["phase"] for r in records if r.get("kind") == "phase"]
    assert ran == [n for n, c in phases()[0] if c > 0]
    assert all(r["status"] == "ok" for r in records if r.get("kind") == "phase")
    stubs = [json.loads(line) for line in STUBS.read_text().splitlines()]
    assert sum(r.get("kind") == "test" for r in records) == sum(
        r.get("kind") == "test" and r["phase"] in ran for r in stubs)
    summary = next(out.glob("*-summary.md")).read_text()
    assert "STUB RESULTS" in summary and "TRITON_DEFAULT_FP_FUSION=1" in summary


def _load(summarise, records):
    res = summarise.Results()
    for r in records:
        res.add(r)
    return res


def _rows(summarise, targets, res):
    return {label: (measured, ok, why) for t in targets.TARGETS for label, measured, _, ok, why in t(res)}


def test_summary_computes_every_target_from_the_records(summarise):
    summarise, targets = summarise
    stubs = [json.loads(line) for line in STUBS.read_text().splitlines()]
    rows = _rows(summarise, targets, _load(summarise, stubs))
    med = {r["nodeid"].split("::")[1]: r["stats"]["median"] for r in stubs if r.get("stats")}
    extra = {r["nodeid"].split("::")[1]: r["extra_info"] for r in stubs if r.get("stats")}
    cepo_floor = med["test_logits_loss_fwd_bwd[cepo]"] / (2 * med["test_logits_floor_copy"])
    half = med["test_step[full-4x1-cepo-half-zero]"] / med["test_step[full-4x1-grpo]"]
    vs_cce = med["test_linear_loss[cepo-cepo-dense]"] / med["test_linear_loss[cce-cepo-dense]"]
    peak = extra["test_step[full-4x1-cepo]"]["peak_gib"]
    by_text = {
        "(cepo) on logits / the 4-pass byte floor": (f"{cepo_floor:.2f} x", cepo_floor <= 1.25),
        "half the groups at A = 0 / the GRPO step": (f"{half:.2f} x", half <= 1.25),
        "(dense) / 3 cut-cross-entropy calls": (f"{vs_cce:.2f} x", vs_cce <= 0.75),
        "4B shape (full parameters, 4 x 2048), peak": (f"{peak:.2f} GiB", peak <= 19.5),
    }
    for text, want in by_text.items():
        (label,) = [k for k in rows if text in k]
        assert rows[label][:2] == want, label
    # every device target has a number from a complete run; the compile level and the divergence loss
    # are not in a device run's records, and say so
    missing = {k for k, (m, _, _) in rows.items() if m is None}
    assert all(k.startswith("compile:") or k.startswith("divergence") for k in missing), missing
    assert all(rows[k][2] for k in missing)


def test_summary_names_what_is_missing_and_a_retry_completes_it(summarise, tmp_path, capsys):
    summarise, targets = summarise
    stubs = [json.loads(line) for line in STUBS.read_text().splitlines()]
    first = []
    for r in stubs:
        if r.get("nodeid", "").endswith("[liger-grpo]"):
            r = {k: v for k, v in r.items() if k not in ("stats", "extra_info")}
            r.update(outcome="skipped", message="Skipped: liger_kernel is not installed")
        if r.get("phase") != "step":  # the step phase was cut before its first test
            first.append(r)
    first.append({"kind": "phase", "phase": "step", "cap": 70, "seconds": 90, "exit": 124,
                  "status": "cut at its cap (70 s)"})
    (tmp_path / "first").mkdir()
    (tmp_path / "first" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first))
    missing = summarise.main([str(tmp_path / "first")])
    text = capsys.readouterr().out
    assert any("liger-grpo: skipped (Skipped: liger_kernel is not installed)" in m for m in missing)
    assert any("peak" in m and summarise.NOT_RUN in m for m in missing)
    assert "phase step: cut at its cap (70 s)" in text
    # the retry (--only step) in a second folder, given after the first: its numbers fill the gaps
    (tmp_path / "retry").mkdir()
    (tmp_path / "retry" / "results.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in stubs if r.get("phase") == "step"))
    missing = summarise.main([str(tmp_path / "first"), str(tmp_path / "retry")])
    capsys.readouterr()
    assert not any("peak" in m or "GRPO step" in m for m in missing)
    assert any("liger-grpo: skipped" in m for m in missing)


PLUGIN_TESTS = """
import os, signal, pytest

@pytest.mark.parametrize("provider", ["slow", "fast"])
def test_bench(benchmark, provider):
    benchmark.extra_info["provider"] = provider
    benchmark.pedantic(lambda: None, rounds=3)

def test_skipped():
    pytest.skip("no peer here")

def test_cut_by_the_cap():
    os.kill(os.getpid(), signal.SIGINT)  # what `timeout -s INT` does at a phase's cap

def test_never_reached():
    pass
"""


def test_plugin_writes_each_test_as_it_finishes_and_orders_them(tmp_path):
    pytest.importorskip("pytest_benchmark")
    (tmp_path / "test_plugin_probe.py").write_text(PLUGIN_TESTS)
    jsonl, bench_json = tmp_path / "results.jsonl", tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(BENCH), "CEPO_RESULTS_JSONL": str(jsonl),
           "CEPO_RESULTS_PHASE": "probe", "CEPO_RESULTS_ORDER": "[fast],skipped,no-such-test"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "device_results", "-p",
                        "no:cacheprovider", str(tmp_path / "test_plugin_probe.py"),
                        f"--benchmark-json={bench_json}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr  # interrupted
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(x["name"], x["outcome"]) for x in records] == [
        ("test_bench[fast]", "passed"), ("test_skipped", "skipped"), ("test_bench[slow]", "passed")]
    fast = records[0]
    assert fast["phase"] == "probe" and fast["params"] == {"provider": "fast"}
    assert fast["extra_info"] == {"provider": "fast"} and fast["stats"]["rounds"] == 3
    assert fast["stats"]["min"] <= fast["stats"]["median"] <= fast["stats"]["max"]
    assert records[1]["message"] == "Skipped: no peer here"
    # pytest stops cleanly on SIGINT: pytest-benchmark's own JSON is written too
    assert {b["name"] for b in json.loads(bench_json.read_text())["benchmarks"]} == {
        "test_bench[fast]", "test_bench[slow]"}
