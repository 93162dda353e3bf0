"""`cepo-compare`: CEPO vs GRPO vs RLSD (and any algorithm of the table: OPSD, SDPO) with several seeds
each and everything else equal.

    cepo-compare --out docs/compare-2026-11-30 --seeds 5            # the default cepo-train config
    cepo-compare --out /tmp/c --seeds 2 --steps 3 --sft-steps 10    # any cepo-train flag sets the base
    cepo-compare --out /tmp/c5 --algos cepo,grpo,rlsd,opsd,sdpo     # all five algorithms

Runs every (seed, algo) sequentially, each as its own `cepo-train` process (seed-major, so a stopped
comparison has whole seeds), each into OUT/runs/<algo>-seed<k>/ (metrics.jsonl, summary.json, config.json,
credit/; the model checkpoints are deleted unless --keep-models). A run whose summary.json and metrics.jsonl
exist is not run again (a damaged summary.json, or none, runs it again), so the command can be repeated to
finish a stopped comparison or just to redo the report.
Then it writes:

- OUT/table.md and OUT/results.json: per algorithm, the final held-out accuracy (greedy, the last
  evaluation) and the final reward (mean batch reward of the last `--last` steps): mean, sample standard
  deviation, min and max over seeds; and the paired comparison per seed of CEPO against each baseline
  (difference per seed, its mean with a 95% percentile-bootstrap interval, wins / ties / losses, and the
  exact sign and Wilcoxon signed-rank tests: cepo_kernels.analysis.stats); per algorithm, the credit
  diagnostic of tasks that know their first wrong step (metrics.jsonl's credit_first_wrong_share against
  its uniform baseline, averaged over the steps that have one); the machine, versions and wall times;
- OUT/curves.png: the training curves of all runs (cepo_kernels.analysis.plots), mean and spread per
  algorithm;
- OUT/machine.json: date, machine, versions, the command line and the wall time of every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cepo_kernels.analysis.runs import CREDIT_KEYS, final_numbers, finished, read_summary, run_dir  # noqa: F401
from cepo_kernels.analysis.stats import paired_stats
from cepo_kernels.runfiles import atomic_write, write_json, writing
from cepo_kernels.step.algorithms import ALGORITHMS

DEFAULT_ALGOS = ("cepo", "grpo", "rlsd")


def parse_algos(text: str) -> list[str]:
    """--algos: at least one algorithm of the table (step.algorithms.ALGORITHMS), no repeats."""
    algos, known = [a.strip() for a in text.split(",") if a.strip()], tuple(ALGORITHMS)
    if not algos or any(a not in known for a in algos) or len(set(algos)) != len(algos):
        raise ValueError(f"algos: expected a comma-separated subset of {known} without repeats, got {text!r}")
    return algos


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cepo-compare",
        description="CEPO vs GRPO vs RLSD over several seeds, everything else equal. Flags not listed here "
        "are cepo-train options and set the shared configuration (see cepo-train --help).",
    )
    p.add_argument("--out", required=True, help="output directory (runs/, table.md, curves.png, ...)")
    p.add_argument("--seeds", default="5",
                   help="a count N (seeds 0..N-1) or a comma-separated list (default 5)")
    p.add_argument("--algos", default=",".join(DEFAULT_ALGOS),
                   help=f"comma-separated, of {','.join(ALGORITHMS)} (default {','.join(DEFAULT_ALGOS)})")
    p.add_argument("--last", type=int, default=5, help="steps averaged for the final reward (default 5)")
    p.add_argument("--keep-models", action="store_true", help="keep each run's checkpoints and final model")
    return p


def parse_seeds(text: str) -> list[int]:
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise ValueError(
            f"seeds: expected a count or a comma-separated list of integers, got {text!r}"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected at least one seed and no repeats, got {text!r}")
    return seeds


def _stats(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize(results: dict, algos: list[str], seeds: list[int]) -> dict:
    """Per-algorithm statistics and CEPO's paired differences per seed (seeds with both runs done)."""
    out = {"per_algo": {}, "paired": {}}
    for metric in ("eval_accuracy_end", "reward_end", *CREDIT_KEYS):
        for algo in algos:
            vals = [results[algo][s][metric] for s in seeds if s in results[algo]]
            vals = [v for v in vals if v is not None]
            if vals:
                out["per_algo"].setdefault(algo, {})[metric] = _stats(vals)
        if "cepo" not in algos or metric.startswith("credit"):
            continue
        for base in (a for a in algos if a != "cepo"):
            common = [s for s in seeds if s in results["cepo"] and s in results[base]]
            diffs = {s: results["cepo"][s][metric] - results[base][s][metric] for s in common
                     if results["cepo"][s][metric] is not None and results[base][s][metric] is not None}
            if not diffs:
                continue
            out["paired"].setdefault(f"cepo-{base}", {})[metric] = {
                "per_seed": {str(s): v for s, v in diffs.items()}, **paired_stats(list(diffs.values()))}
    # each algorithm against the untrained model (its own held-out accuracy at step 0), per seed
    for algo in algos:
        gains = {s: results[algo][s]["eval_accuracy_end"] - results[algo][s]["eval_accuracy_start"]
                 for s in seeds if s in results[algo] and results[algo][s]["eval_accuracy_start"] is not None
                 and results[algo][s]["eval_accuracy_end"] is not None}
        if gains:
            out.setdefault("vs_start", {})[algo] = {
                "per_seed": {str(s): v for s, v in gains.items()}, **paired_stats(list(gains.values()))}
    # the credit diagnostic against its uniform baseline, per seed (the teachers' runs only)
    for algo in algos:
        gaps = {s: results[algo][s][CREDIT_KEYS[0]] - results[algo][s][CREDIT_KEYS[1]] for s in seeds
                if s in results[algo] and results[algo][s].get(CREDIT_KEYS[0]) is not None}
        if gaps:
            out.setdefault("credit_vs_uniform", {})[algo] = {
                "per_seed": {str(s): v for s, v in gaps.items()}, **paired_stats(list(gaps.values()))}
    return out


def table_markdown(summary: dict, results: dict, algos: list[str], seeds: list[int], last: int,
                   machine: dict | None = None) -> str:
    names = {"eval_accuracy_end": "final held-out accuracy",
             "reward_end": f"final reward (last {last} steps)"}
    lines = ["| algo | seeds | " + " | ".join(f"{n}: mean ± std [min, max]" for n in names.values()) + " |",
             "|---|---|" + "---|" * len(names)]
    for algo in algos:
        st = summary["per_algo"].get(algo, {})
        cells = []
        for m in names:
            s = st.get(m)
            cells.append(f"{s['mean']:.3f} ± {s['std']:.3f} [{s['min']:.3f}, {s['max']:.3f}]" if s else "-")
        lines.append(f"| {algo} | {len(results[algo])} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (held-out accuracy start -> end; final reward):", "",
              "| seed | " + " | ".join(algos) + " |", "|---|" + "---|" * len(algos)]
    for s in seeds:
        cells = []
        for algo in algos:
            r = results[algo].get(s)
            cells.append(
                f"{r['eval_accuracy_start']:.3f} -> {r['eval_accuracy_end']:.3f}; {r['reward_end']:.3f}"
                if r and r["eval_accuracy_start"] is not None and r["eval_accuracy_end"] is not None
                else "-"
            )
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if summary["paired"]:
        method = next(iter(next(iter(summary["paired"].values())).values()))["ci_method"]
        lines += ["", f"Paired by seed (CEPO minus the baseline; 95% interval: {method}; exact two-sided "
                  "sign test and Wilcoxon signed-rank test, ties dropped):", "",
                  "| comparison | metric | mean difference [95% CI] | W / T / L | sign p | Wilcoxon p | "
                  "per seed |", "|---|---|---|---|---|---|---|"]
        for name, per in summary["paired"].items():
            for m, d in per.items():
                seeds_txt = ", ".join(f"{k}: {v:+.3f}" for k, v in d["per_seed"].items())
                lines.append(f"| {name} | {names[m]} | {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, "
                             f"{d['ci95'][1]:+.3f}] | {d['wins']} / {d['ties']} / {d['losses']} | "
                             f"{d['sign_test_p']:.3f} | {d['wilcoxon_p']:.3f} | {seeds_txt} |")
    if summary.get("vs_start"):
        lines += ["", "Against the untrained model (held-out accuracy at the end minus at step 0, per seed; "
                  "the same interval and tests; W / T / L: seeds above / level with / below step 0):", "",
                  "| algo | mean change [95% CI] | W / T / L | sign p | Wilcoxon p | per seed |",
                  "|---|---|---|---|---|---|"]
        for algo, d in summary["vs_start"].items():
            seeds_txt = ", ".join(f"{k}: {v:+.3f}" for k, v in d["per_seed"].items())
            lines.append(f"| {algo} | {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | "
                         f"{d['wins']} / {d['ties']} / {d['losses']} | {d['sign_test_p']:.3f} | "
                         f"{d['wilcoxon_p']:.3f} | {seeds_txt} |")
    credit = [(a, summary["per_algo"].get(a, {})) for a in algos]
    if any("credit_first_wrong_baseline" in st for _, st in credit):
        lines += ["", "Credit diagnostic (wrong responses with A != 0): the share of |A_hat - A| on the "
                  "first wrong step's tokens, and the share a uniform credit gives (that step's tokens / "
                  "response tokens); per run the mean over the steps where the teachers moved A (GRPO: "
                  "A_hat = A, uniform by construction; its baseline over all steps), then mean ± std over "
                  "seeds.", "",
                  "| algo | share on the first wrong step | uniform baseline | share minus baseline [95% CI] "
                  "| W / T / L | sign p | Wilcoxon p | runs |", "|---|---|---|---|---|---|---|---|"]
        for algo, st in credit:
            sh, bl = st.get("credit_first_wrong_share"), st.get("credit_first_wrong_baseline")
            fmt = lambda x: f"{x['mean']:.3f} ± {x['std']:.3f}" if x else "-"  # noqa: E731
            gap = summary.get("credit_vs_uniform", {}).get(algo)
            stats = (f"{gap['mean']:+.3f} [{gap['ci95'][0]:+.3f}, {gap['ci95'][1]:+.3f}] | {gap['wins']} / "
                     f"{gap['ties']} / {gap['losses']} | {gap['sign_test_p']:.3f} | {gap['wilcoxon_p']:.3f}"
                     if gap else "- | - | - | -")
            lines.append(f"| {algo} | {fmt(sh)} | {fmt(bl)} | {stats} | {sh['n'] if sh else 0} |")
    if machine:
        walls = machine.get("run_wall_s", {})
        lines += ["", f"Machine: {machine.get('cpu_model') or machine.get('processor')}, "
                  f"{machine.get('cpu_count')} CPUs, GPU {machine.get('cuda') or 'none'}"
                  f"{' (Triton interpreter)' if machine.get('triton_interpret') else ''}; Python "
                  f"{machine.get('python')}, torch {machine.get('torch')}, triton {machine.get('triton')}, "
                  f"transformers {machine.get('transformers')}; "
                  f"OMP_NUM_THREADS={machine.get('OMP_NUM_THREADS')}; "
                  f"started {machine.get('started_utc')} UTC, reported {machine.get('date_utc')} UTC."]
        for algo in algos:
            w = [v for k, v in walls.items() if k.startswith(f"{algo}-seed")]
            if w:
                lines.append(f"Wall time per {algo} run (process, s): mean {statistics.fmean(w):.1f}, "
                             f"min {min(w):.1f}, max {max(w):.1f}, total {sum(w):.0f} over {len(w)} runs.")
    return "\n".join(lines) + "\n"


def machine_info() -> dict:
    import torch

    info = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton_interpret": os.environ.get("CEPO_KERNELS_CPU") == "interpreter",  # else native CPU kernels
    }
    for mod in ("triton", "transformers", "numpy", "matplotlib"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        with open("/proc/cpuinfo") as fh:
            models = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        info["cpu_model"] = models[0] if models else None
    except OSError:
        pass
    return info


def _cepo_train(args: list[str], **kw) -> subprocess.CompletedProcess:
    """`cepo-train ARGS` in a child process (the comparison drives the loop through its command line)."""
    return subprocess.run([sys.executable, "-m", "cepo_kernels.rl.cli", *args], text=True, **kw)


def base_config(args: list[str]) -> dict:
    """The cepo-train config that `args` (cepo-train flags) give; ValueError with cepo-train's own message
    when it refuses them."""
    done = _cepo_train(["--print-config", *args], capture_output=True)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        raise ValueError(lines[-1].removeprefix("cepo-train: error: ") if lines else
                         f"cepo-train --print-config exited with {done.returncode}")
    return json.loads(done.stdout)


def run_one(base: dict, algo: str, seed: int, rdir: Path, keep_models: bool) -> float:
    """Trains one run into rdir (replacing an unfinished one) with cepo-train; returns its wall time."""
    if rdir.exists():
        shutil.rmtree(rdir)
    rdir.parent.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in {**base, "algo": algo, "seed": seed, "out_dir": str(rdir), "progress": False,
                             "resume": None}.items() if v is not None}
    cfg_path = write_json(rdir.parent / f".{rdir.name}.config.json", cfg)
    t0 = time.perf_counter()
    done = _cepo_train(["--config", str(cfg_path)], capture_output=True)
    wall = time.perf_counter() - t0
    cfg_path.unlink(missing_ok=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"cepo-compare: the {algo} run with seed {seed} failed (exit {done.returncode}):\n"
                           f"{tail}")
    if not keep_models:
        for sub in ("checkpoints", "final_model"):
            shutil.rmtree(rdir / sub, ignore_errors=True)
    return wall


def compare(base: dict, out: Path, algos: list[str], seeds: list[int], last: int = 5,
            keep_models: bool = False, argv: list[str] | None = None, log=print) -> dict:
    """Runs the missing runs, then writes table.md, results.json, curves.png and machine.json into out."""
    out.mkdir(parents=True, exist_ok=True)
    machine_path = out / "machine.json"
    try:
        machine = json.loads(machine_path.read_text(encoding="utf-8")) if machine_path.is_file() else {}
        if not isinstance(machine, dict):
            raise ValueError(f"expected a JSON object, got {type(machine).__name__}")
    except ValueError as e:
        raise ValueError(f"{machine_path}: damaged ({e}); move it aside and the comparison starts a new one "
                         "(the runs are kept; their earlier wall times are only in the old file)") from None
    info = machine_info()
    machine.setdefault("started_utc", machine.get("date_utc", info["date_utc"]))  # the first invocation
    machine.setdefault("command", ["cepo-compare", *(argv or [])])
    machine.update(info)  # date_utc: this (latest) invocation
    machine["latest_command"] = ["cepo-compare", *(argv or [])]
    machine["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    machine.setdefault("run_wall_s", {})
    for seed in seeds:
        for algo in algos:
            rdir = run_dir(out, algo, seed)
            if finished(rdir, log):
                continue
            log(f"cepo-compare: {algo} seed {seed} -> {rdir}")
            wall = run_one(base, algo, seed, rdir, keep_models)
            machine["run_wall_s"][f"{algo}-seed{seed}"] = round(wall, 1)
            write_json(machine_path, machine)
            log(f"cepo-compare: {algo} seed {seed} done in {wall:.0f} s: "
                f"{json.dumps(final_numbers(rdir, last))}")
    results = {a: {s: final_numbers(run_dir(out, a, s), last) for s in seeds} for a in algos}
    summary = summarize(results, algos, seeds)
    write_json(out / "results.json",
               {"base_config": base, "algos": algos, "seeds": seeds, "last": last, "machine": machine,
                "runs": {a: {str(s): v for s, v in r.items()} for a, r in results.items()}, **summary})
    table = table_markdown(summary, results, algos, seeds, last, machine)
    atomic_write(out / "table.md", table.encode("utf-8"))
    from cepo_kernels.analysis.plots import plot_curves

    plot_curves([run_dir(out, a, s) for a in algos for s in seeds], out / "curves.png",
                title=f"{' vs '.join(a.upper() for a in algos)}, {len(seeds)} seeds each (mean ± std band)")
    write_json(machine_path, machine)
    log(table)
    log(f"cepo-compare: wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'curves.png'}")
    return summary


def main(argv=None) -> int:
    """Exit codes: 0 done, 1 a run failed (its message), 2 bad input or a failed write, 130 Ctrl-C."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    args, rest = build_parser().parse_known_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        algos = parse_algos(args.algos)
        if args.last < 1:
            raise ValueError(f"last: expected a positive value, got {args.last}")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"out: {args.out} is a file; expected a directory (a new one, or the --out of "
                             "an earlier comparison to finish or re-report)")
        base = base_config(rest)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"cepo-compare: error: {e}", file=sys.stderr)
        return 2
    try:
        with writing(Path(args.out)):
            compare(base, Path(args.out), algos, seeds, args.last, args.keep_models, argv,
                    log=lambda m: print(m, flush=True))
    except OSError as e:  # runfiles.WriteFailed: a full disk, a read-only directory (one line)
        print(f"cepo-compare: error: {e}; the finished runs are kept (once it can be written, the same "
              "command finishes the comparison)", file=sys.stderr)
        return 2
    except ValueError as e:  # a damaged machine.json, or a run's files (read_summary, final_numbers)
        print(f"cepo-compare: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a run failed: its own message, and the finished runs are kept
        lines = str(e).splitlines()
        full = [ln for ln in lines if ln.startswith("cepo-train: error: cannot write")]
        if full:  # the run's disk filled up: the same one line as any other writer (exit code 2)
            print(f"{lines[0].rstrip(':')}: {full[-1]}", file=sys.stderr)
            return 2
        print(e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncepo-compare: stopped (Ctrl-C); the finished runs are kept (run the same command again)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
