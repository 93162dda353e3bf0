"""Training curves of one or several run directories as one PNG (matplotlib, headless Agg backend).

Ten panels from each run's metrics.jsonl: batch reward, held-out accuracy (greedy; step 0 is the
evaluation before training, from summary.json), lambda, mean Delta on the responses with A > 0 (solid)
and A < 0 (dashed), the wrong-direction fraction, the PPO clip fraction, the policy entropy, the
teacher cost (sequences given teacher passes per step, and the seconds per step of the no-grad scoring
sweep, `time_teachers`: the old log-probs of every run, plus the teachers' for CEPO and RLSD), and the
credit diagnostic of tasks that know a wrong response's first wrong step: the share of |A_hat - A| on
that step's tokens (solid; none for GRPO, whose A_hat = A) against the share of a uniform credit
(dashed).
Runs whose config.json files are equal except for seed, out_dir, resume and progress are seeds of one
configuration: they are drawn as their mean with a band of +- one standard deviation (over the steps
all of them have). Otherwise each run is its own line.
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

from cepo_kernels.runfiles import MetricsError, atomic_write, read_metrics, writing

log = logging.getLogger("cepo_kernels.analysis")

PANELS = (
    ("reward (batch mean)", ("reward_mean",)),
    ("held-out accuracy (greedy)", ("eval_accuracy",)),
    ("lambda", ("lambda",)),
    ("mean Delta: A>0 solid, A<0 dashed", ("delta_mean_pos", "delta_mean_neg")),
    ("wrong-direction fraction", ("frac_wrong_dir",)),
    ("clip fraction", ("clip_frac",)),
    ("entropy", ("entropy",)),
    ("teacher rows per step", ("teacher_rows",)),
    ("scoring time per step (s): old + teacher log-probs", ("time_teachers",)),
    ("first wrong step: credit share, uniform dashed",
     ("credit_first_wrong_share", "credit_first_wrong_baseline")),
)
GRID = (4, 3)  # rows, columns of the panels (the last two cells stay empty)
SEED_KEYS = ("seed", "out_dir", "resume", "progress")


class RunDataError(ValueError):
    """A run directory with missing or unreadable data (the message names the path and what is missing)."""


def read_json_object(path: Path) -> dict | None:
    """A run's config.json or summary.json as a dict; None (with a warning naming it) when it is
    absent, unreadable or not a JSON object."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s: unreadable (%s); ignored", path, e)
        return None
    if not isinstance(data, dict):
        log.warning("%s: expected a JSON object, got %s; ignored", path, type(data).__name__)
        return None
    return data


def load_run(run_dir: str | Path) -> dict:
    """{"dir", "rows" (metrics.jsonl lines), "config" (or None), "summary" (or None)} of a run directory."""
    rdir = Path(run_dir)
    if not rdir.is_dir():
        raise RunDataError(f"{rdir}: no such run directory")
    path = rdir / "metrics.jsonl"
    if not path.is_file():
        raise RunDataError(f"{rdir}: no metrics.jsonl (not a cepo-train run directory, or no step finished)")
    try:
        rows = read_metrics(path, strict=False)  # a garbage line is skipped with a warning naming it
    except MetricsError as e:
        raise RunDataError(str(e)) from None
    if not rows:
        raise RunDataError(f"{path}: empty (no step finished yet)")
    extra = {}
    for name in ("config", "summary"):
        extra[name] = read_json_object(rdir / f"{name}.json")
    return {"dir": rdir, "rows": rows, **extra}


def group_runs(runs: list[dict]) -> list[dict]:
    """Groups of runs that are seeds of one configuration, with a label naming what differs between groups."""
    groups: list[dict] = []
    for run in runs:
        cfg = run["config"]
        key = None if cfg is None else json.dumps({k: v for k, v in cfg.items() if k not in SEED_KEYS},
                                                  sort_keys=True)
        for g in groups:
            if key is not None and g["key"] == key:
                g["runs"].append(run)
                break
        else:
            groups.append({"key": key, "runs": [run], "config": cfg})
    configs = [g["config"] for g in groups if g["config"] is not None]
    differ = sorted({k for c in configs for k in c if k not in SEED_KEYS and any(
        d.get(k) != c.get(k) for d in configs)})
    for g in groups:
        cfg = g["config"]
        if cfg is None:
            g["label"] = g["runs"][0]["dir"].name
            continue
        if differ:
            parts = [str(cfg.get(k)) if k == "algo" else f"{k}={cfg.get(k)}" for k in differ]
            label = ", ".join(parts)
        else:
            label = str(cfg.get("algo", g["runs"][0]["dir"].name))
        n = len(g["runs"])
        g["label"] = label + (f" ({n} seeds)" if n > 1 else (f" (seed {cfg.get('seed')})" if len(groups) > 1
                                                            else ""))
    return groups


def _series(run: dict, key: str) -> dict[int, float]:
    out = {}
    start = (run["summary"] or {}).get("eval_accuracy_start")
    if key == "eval_accuracy" and isinstance(start, (int, float)) and not isinstance(start, bool):
        out[0] = float(start)
    for row in run["rows"]:
        v = row.get(key)
        if key == "time_teachers" and isinstance(v, (int, float)):
            v += row.get("time_old_logp", 0.0)  # logged apart since 2026-11-30; the panel shows their sum
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[int(row["step"])] = float(v)
    return out


def plot_curves(run_dirs, out_png: str | Path, title: str | None = None, dpi: int = 100) -> dict:
    """Writes the PNG; returns {"path", "panels" (axes titles), "labels" (legend entries)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise RunDataError("no run directories given")
    groups = group_runs(runs)
    fig, axes = plt.subplots(*GRID, figsize=(15, 11))
    for ax in axes.flat[len(PANELS):]:
        ax.set_visible(False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, keys) in zip(axes.flat[:len(PANELS)], PANELS, strict=True):
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        for gi, g in enumerate(groups):
            color = colors[gi % len(colors)]
            for ki, key in enumerate(keys):
                style = "-" if ki == 0 else "--"
                label = g["label"] if ki == 0 else None
                series = [_series(r, key) for r in g["runs"]]
                series = [s for s in series if s]
                if not series:
                    continue
                marker = "o" if key == "eval_accuracy" else None
                if len(series) == 1:
                    xs = sorted(series[0])
                    ax.plot(xs, [series[0][x] for x in xs], style, color=color, label=label, marker=marker,
                            markersize=4)
                    continue
                xs = sorted(set.intersection(*(set(s) for s in series)))
                vals = np.array([[s[x] for x in xs] for s in series])
                mean, std = vals.mean(axis=0), vals.std(axis=0, ddof=1)
                ax.plot(xs, mean, style, color=color, label=label, marker=marker, markersize=4)
                ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.18, linewidth=0)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=11,
                   bbox_to_anchor=(0.5, 0.0))
    if title:
        fig.suptitle(title, fontsize=13)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97 if title else 1))
    panels = [ax.get_title() for ax in axes.flat[:len(PANELS)]]
    out_png = Path(out_png)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    plt.close(fig)
    with writing(out_png):
        out_png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_png, buf.getvalue())
    return {"path": out_png, "panels": panels, "labels": labels}
