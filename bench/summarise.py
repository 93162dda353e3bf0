"""Every number a device run promises, as measured / target (docs/peers.md's targets), from its result files.

    python bench/summarise.py PATH [PATH ...]

PATH: a results folder (what bench/run_device.sh writes to $OUT: every *.jsonl and *.json in it), a results
JSON-lines file (bench/device_results.py), a pytest-benchmark JSON (--benchmark-json), a tuning JSON
(bench/tune_logits.py) or a compile report (bench/compile_report.py's JSON lines). Later paths complete
earlier ones test by test (a test that ran replaces one that did not), so a retry's folder given after the
first run's fills its gaps. Missing or unreadable files are noted, not fatal; nothing here imports torch.

Prints markdown: the card and versions, the phases, every benchmark, each kernel's ratios to its floor and
to the peers timed in the same run, every target as measured / target (met, NOT met, or missing and why),
the correctness tests, the config sweep, and the list of what is missing.

Floors (timed in the same run, so the card's bandwidth and FLOP rate cancel): on logits, a bf16 copy of the
logits (2 passes over their bytes) x 2 for CEPO (read 3 logits tensors, write dlogits) and x 1.5 for GRPO
(read logits, read + write dlogits); from hidden states, one [N, H] x [H, V] matmul x 6 for CEPO (3 forward
passes, recompute, 2 gradient matmuls) and x 4 for GRPO.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from summarise_targets import TARGETS

# provider of the logits benchmarks -> loss; the floor rows have provider "floor-*"
_LOGITS = {"grpo": "grpo", "grpo-inplace": "grpo", "cepo": "cepo", "cepo-inplace": "cepo",
           "torch-grpo": "grpo", "torch-cepo": "cepo", "liger-grpo": "grpo"}
_OURS = {"grpo", "grpo-inplace", "cepo", "cepo-inplace"}
FLOOR_FACTOR = {("logits", "cepo"): 2.0, ("logits", "grpo"): 1.5, ("linear", "cepo"): 6.0,
                ("linear", "grpo"): 4.0}
NOT_RUN = "no record: its phase did not run or was cut before it"


class Results:
    """The records of one or more device runs: tests by node id, the environment, phases, sweeps, compile."""

    def __init__(self):
        self.tests, self.env, self.phases, self.sweeps, self.compile, self.notes = {}, [], [], [], [], []
        self.stub = False

    # ---------------------------------------------------------------- loading

    def load(self, path):
        path = Path(path)
        if path.is_dir():
            files = sorted([*path.glob("*.jsonl"), *path.glob("*.json")])
            if not files:
                self.notes.append(f"{path}: no result files")
            for f in files:
                self.load(f)
            return
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".jsonl":
                docs = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                docs = [json.loads(text)]
        except (OSError, ValueError) as e:
            self.notes.append(f"{path}: no results ({e})")
            return
        for doc in docs:
            self.add(doc)

    def add(self, doc):
        if not isinstance(doc, dict):
            return
        self.stub |= bool(doc.get("stub"))
        if "benchmarks" in doc:  # pytest-benchmark's JSON
            info = doc.get("machine_info", {})
            self.env.append({"card": info.get("gpu", "?"), "torch": info.get("torch"),
                             "triton": info.get("triton"), "time": doc.get("datetime")})
            for b in doc["benchmarks"]:
                name = b.get("name", "")
                self.add_test({"kind": "test", "nodeid": b.get("fullname", name), "outcome": "passed",
                               "name": name, "params": b.get("params") or {}, **b})
        elif "kernel" in doc and "spill_bytes" in doc:
            self.compile.append(doc)
        elif doc.get("kind") == "sweep" or ("results" in doc and "card" in doc):
            self.sweeps.append(doc)
        elif doc.get("kind") == "env":
            self.env.append(doc)
        elif doc.get("kind") == "phase":
            self.phases.append(doc)
        elif doc.get("kind") == "test":
            self.add_test(doc)

    def add_test(self, rec):
        old = self.tests.get(rec["nodeid"])
        if old is None or rec.get("outcome") == "passed" or old.get("outcome") != "passed":
            self.tests[rec["nodeid"]] = rec

    # ---------------------------------------------------------------- lookups

    def find(self, test, **params):
        """The record of test function `test` whose parameters / extra_info match, or None."""
        for rec in self.tests.values():
            if rec.get("name", "").split("[")[0] != test:
                continue
            fields = {**rec.get("params", {}), **rec.get("extra_info", {})}
            if all(str(fields.get(k)) == str(v) for k, v in params.items()):
                return rec
        return None

    def value(self, test, key, **params):
        """(number, None) or (None, why it is missing). key: "median" (seconds) or an extra_info field."""
        rec = self.find(test, **params)
        label = test + "".join(f" {v}" for v in params.values())
        if rec is None:
            return None, f"{label}: {NOT_RUN}"
        if rec.get("outcome") != "passed":
            msg = (rec.get("message") or "").strip().splitlines()
            return None, f"{label}: {rec.get('outcome')}" + (f" ({msg[-1][:160]})" if msg else "")
        v = rec.get("stats", {}).get("median") if key == "median" else rec.get("extra_info", {}).get(key)
        if not isinstance(v, (int, float)):
            return None, f"{label}: no {key} recorded"
        return v, None


# -------------------------------------------------------------------- printing


def _num(x, fmt=".2f"):
    return format(x, fmt) if isinstance(x, (int, float)) else ""


def _fit(extra):
    """bench/test_train_step.py's max-length search: the longest that ran (< the first that did not)."""
    if "max_fit" not in extra:
        return ""
    oom = extra.get("first_oom")
    return f"{extra['max_fit']} (< {oom})" if oom else f">= {extra['max_fit']} (time out)"


def print_header(res):
    if res.stub:
        print("**STUB RESULTS from a rehearsal (bench/run_device.sh --rehearse): made-up numbers that "
              "exercise this summary, not measurements.**\n")
    env = next((e for e in reversed(res.env) if e.get("card")), {})
    print(f"# Device run, {env.get('time', '?')}\n")
    keys = ("torch", "triton", "cuda", "transformers", "peft", "python")
    versions = ", ".join(f"{k} {env[k]}" for k in keys if env.get(k))
    print(f"card: {env.get('card', '?')}; {versions or 'versions not recorded'}; "
          f"TRITON_DEFAULT_FP_FUSION={env.get('fp_fusion', '?')}")
    for dist, p in (env.get("peers") or {}).items():
        state = "ok" if p.get("ok") else "MISSING: " + p.get("detail", "")
        print(f"- peer {dist} {p.get('version') or '-'}: {state}")
    for note in res.notes:
        print(f"- {note}")
    if res.phases:
        print("\n| phase | cap s | ran s | status |\n|---|---:|---:|---|")
        for p in res.phases:
            print("| " + " | ".join(str(p.get(k, "")) for k in ("phase", "cap", "seconds", "status")) + " |")
    print()


def print_benchmarks(res):
    rows = [r for r in res.tests.values() if r.get("stats")]
    if not rows:
        return
    print("| benchmark | median ms | min ms | peak extra GiB | peak GiB | longest response fitting |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        s, extra = r["stats"], r.get("extra_info", {})
        cells = [_num(extra.get("peak_extra_gib", extra.get("extra_GiB"))), _num(extra.get("peak_gib")),
                 _fit(extra)]
        print(f"| {r['name']} | {_num(s.get('median', 0) * 1e3)} | {_num(s.get('min', 0) * 1e3)} | "
              + " | ".join(cells) + " |")
    table = ratios(rows)
    if table:
        print("\nRatios (median / median; < 1 is faster than the floor or the peer):\n")
        print("| kernel | vs floor | vs peers |\n|---|---:|---|")
        for name, floor, peers in table:
            peer_cells = ", ".join(f"{p} {r:.2f}" for p, r in peers) or "-"
            print(f"| {name} | {_num(floor)} | {peer_cells} |")
    print()


def _key(rec):
    """(family, provider, loss, case) of a kernel benchmark, or None for another benchmark."""
    extra = rec.get("extra_info", {})
    provider, name = extra.get("provider"), rec.get("name", "")
    if provider is None:
        return None
    if "logits" in name:
        return "logits", provider, _LOGITS.get(provider), ""
    if "linear" in name:
        return "linear", provider, extra.get("loss"), extra.get("case", "")
    return None


def ratios(benchmarks):
    """[(kernel name, ratio to its floor or None, [(peer, ratio)])] for this package's kernels."""
    med, floors = {}, {}
    for b in benchmarks:
        k = _key(b)
        if k is None:
            continue
        family, provider, loss, case = k
        if provider.startswith("floor"):
            floors[family] = b["stats"]["median"]
        else:
            med[(family, provider, loss, case)] = b["stats"]["median"]
    rows = []
    for (family, provider, loss, case), t in sorted(med.items()):
        if not (provider in _OURS if family == "logits" else provider == "cepo"):
            continue
        floor = None
        if family in floors and (family, loss) in FLOOR_FACTOR:
            floor = t / (FLOOR_FACTOR[(family, loss)] * floors[family])
        peers = [(p, t / tp) for (f, p, lo, c), tp in sorted(med.items())
                 if f == family and lo == loss and c == case and p != provider
                 and not (p in _OURS if family == "logits" else p == "cepo")]
        label = f"{family} {provider}" + (f" {loss} {case}" if family == "linear" else "")
        rows.append((label, floor, peers))
    return rows


def print_targets(res):
    """The targets table; returns the missing targets' reasons."""
    print("## Targets (docs/peers.md): measured / target\n")
    print("| target | measured | target | status |\n|---|---:|---:|---|")
    missing = []
    for target in TARGETS:
        for label, measured, bound, ok, why in target(res):
            status = "missing" if measured is None else "met" if ok else "**NOT met**"
            if measured is None:
                missing.append(f"{label}: {why}")
            print(f"| {label} | {measured if measured is not None else '-'} | {bound} | {status} |")
    print()
    return missing


def print_correctness(res):
    rows = [r for r in res.tests.values()
            if r.get("phase") == "gpu-tests" or r["nodeid"].startswith("tests/")]
    print("## Correctness at large shapes (pytest -m gpu)\n")
    if not rows:
        print(f"- {NOT_RUN}\n")
        return ["correctness tests: " + NOT_RUN]
    counts = {}
    for r in rows:
        counts[r.get("outcome")] = counts.get(r.get("outcome"), 0) + 1
    print("- " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    for r in rows:
        if r.get("outcome") != "passed":
            msg = (r.get("message") or "").strip().splitlines()
            print(f"- {r.get('outcome')}: {r['nodeid']}" + (f": {msg[-1][:200]}" if msg else ""))
    print()
    return [f"correctness: {r['nodeid']} {r.get('outcome')}" for r in rows if r.get("outcome") == "failed"]


def print_sweep(res):
    for s in res.sweeps:
        best = {k: v.get("best") for k, v in s.get("results", {}).items()}
        cells = "; ".join(f"{k}: {b['BLOCK_V']}/{b['num_warps']}" if b else f"{k}: none"
                          for k, b in best.items())
        print(f"Config sweep on {s.get('card', '?')} (BLOCK_V/num_warps): {cells or 'no results'}\n")


def main(paths):
    res = Results()
    for p in paths:
        res.load(p)
    print_header(res)
    print_benchmarks(res)
    missing = print_targets(res)
    missing += print_correctness(res)
    print_sweep(res)
    cut = [p.get("phase") for p in res.phases if p.get("status") not in ("ok", None)]
    print("## Missing\n")
    for m in missing:
        print(f"- {m}")
    for name in cut:
        print(f"- phase {name}: {next(p['status'] for p in res.phases if p.get('phase') == name)}")
    if not missing and not cut:
        print("- nothing: every target has a number")
    return missing


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
