"""`python -m cepo_kernels.analysis.leakage`: what a finished `cepo-compare` comparison's runs learned to say
about the reference answer where their own reasoning does not support it (the leakage diagnostic).

    python -m cepo_kernels.analysis.leakage --out docs/compare-2026-12-08-five     # needs --keep-models runs

For each seed the initial policy (the warm-up, rebuilt exactly as the runs built it: same config, same
seed; its greedy held-out accuracy must equal the runs' `eval_accuracy_start`) answers the held-out
problems greedily. On those fixed texts (its own reasoning), every run's final model and the initial model
score log p(reference answer's tokens | context), teacher-forced right after the `\\boxed{` token, at
three kinds of position:

- premature: the reasoning cut at each token up to and including the last "=" before the box (the last
  step's result is not written yet, so the reasoning has not produced the answer), `\\boxed{` appended;
  the embedded digits task has them, the arith task (the response is only the box) has none;
- contradicting: after the whole reasoning of a response whose own boxed answer is wrong (the written
  steps say another answer); also log p(own answer) there;
- supported: after the whole reasoning of a response whose boxed answer is right.

Per run: each kind's mean log-prob (initial, final, rise = final - initial), and at the contradicting
positions the rise of log p(reference) - log p(own answer), the preference for the answer the reasoning
does not give. A method that copies the answer from a teacher that was shown it raises the reference
where the reasoning cannot support it (premature, contradicting); one that learns the task raises it
where the reasoning supports it. Also the hint gain: log p(reference) after the whole reasoning with the
reference shown in the CEPO r+ teacher's context (cfg.teacher_template) minus without it, for the initial
and the final model: how much a teacher made of these weights knows from the answer it is shown.
Paired by seed against CEPO (analysis.stats). Writes OUT/leakage.json
and OUT/leakage.md; each seed's numbers are kept in OUT/leakage/seed<k>.json (reused on the next call, so
the models of a measured seed can be deleted).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from cepo_kernels.analysis.runs import read_summary, run_dir
from cepo_kernels.analysis.stats import paired_stats
from cepo_kernels.runfiles import atomic_write, write_json
from cepo_kernels.step.contexts import encode, teacher_prefix

KINDS = ("premature", "contradicting", "supported")


class Probe(NamedTuple):
    context: list[int]  # prompt + (part of) the reasoning + the \boxed{ token
    answer: list[int]  # the scored tokens
    kind: str  # KINDS, or "contradicting_own" (the response's own answer after the same context)
    problem: int


def probes(tokenizer, prompts: list[list[int]], responses: list[list[int]], references: list[str],
           box_id: int, hinted: list[list[int]] | None = None) -> list[Probe]:
    """The probes of greedy responses (see the module doc). A response without a box token gets none.
    With `hinted` (each prompt with the reference shown, the CEPO r+ teacher's context), also the kinds
    "hinted" and "plain": log p(reference) after the whole reasoning with and without the reference shown."""
    eq_ids = set(encode(tokenizer, "="))
    out = []
    for j, (prompt, resp, ref) in enumerate(zip(prompts, responses, references, strict=True)):
        if box_id not in resp:
            continue
        box = resp.index(box_id)
        reasoning, ref_ids = resp[:box], encode(tokenizer, ref)
        if hinted is not None:
            out.append(Probe(hinted[j] + reasoning + [box_id], ref_ids, "hinted", j))
            out.append(Probe(prompt + reasoning + [box_id], ref_ids, "plain", j))
        eqs = [k for k, t in enumerate(reasoning) if t in eq_ids]
        for k in range(eqs[-1] + 2 if eqs else 0):  # the prefix ends at or before the last "="
            out.append(Probe(prompt + reasoning[:k] + [box_id], ref_ids, "premature", j))
        context = prompt + reasoning + [box_id]
        own = tokenizer.decode(resp[box + 1:], skip_special_tokens=True).split("}")[0]
        if own == ref:
            out.append(Probe(context, ref_ids, "supported", j))
        else:
            out.append(Probe(context, ref_ids, "contradicting", j))
            if own:
                out.append(Probe(context, encode(tokenizer, own), "contradicting_own", j))
    return out


@torch.no_grad()
def answer_logprobs(model, rows: list[Probe], pad_id: int, chunk: int = 512) -> list[float]:
    """sum_t log p(answer_t | context, answer_<t) per probe, teacher-forced (right-padded batches; padding
    after a row's last token cannot reach it under causal attention)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for lo in range(0, len(rows), chunk):
            part = rows[lo : lo + chunk]
            seqs = [r.context + r.answer for r in part]
            L = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
            attn = torch.zeros((len(seqs), L), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = torch.tensor(s)
                attn[i, : len(s)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            for i, r in enumerate(part):
                pos = torch.arange(len(r.context) - 1, len(r.context) + len(r.answer) - 1)
                out.append(float(logp[i, pos, torch.tensor(r.answer)].double().sum()))
    finally:
        model.train(was_training)
    return out


def kind_means(rows: list[Probe], logps: list[float]) -> dict:
    """Per kind: the mean log-prob over problems (each problem's probes averaged first) and the count of
    problems; plus 'preference' = mean over contradicting problems of log p(ref) - log p(own answer)."""
    per: dict[str, dict[int, list[float]]] = {}
    for r, v in zip(rows, logps, strict=True):
        per.setdefault(r.kind, {}).setdefault(r.problem, []).append(v)
    out = {}
    for kind, probs in per.items():
        out[kind] = statistics.fmean(statistics.fmean(v) for v in probs.values())
        out[f"{kind}_problems"] = len(probs)
    shown = [j for j in per.get("hinted", {}) if j in per.get("plain", {})]
    if shown:
        out["hint_gain"] = statistics.fmean(per["hinted"][j][0] - per["plain"][j][0] for j in shown)
    both = [j for j in per.get("contradicting_own", {}) if j in per.get("contradicting", {})]
    if both:
        out["preference"] = statistics.fmean(per["contradicting"][j][0] - per["contradicting_own"][j][0]
                                             for j in both)
    return out


def initial_policy(config: dict, workdir: Path):
    """A Trainer built from a run's config.json in workdir: its model is the run's initial policy (the
    warm-up is deterministic for a given config and seed on this machine)."""
    from cepo_kernels.rl.config import config_from_dict
    from cepo_kernels.rl.trainer import Trainer

    cfg = config_from_dict({**config, "out_dir": str(workdir), "resume": None})
    return Trainer(cfg)


def load_final(rdir: Path, like):
    """The run's final_model weights in a copy of `like` (the same architecture)."""
    from safetensors.torch import load_file

    path = rdir / "final_model" / "model.safetensors"
    if not path.is_file():
        raise ValueError(f"{rdir}: no final_model/model.safetensors (run cepo-compare with --keep-models)")
    import copy

    model = copy.deepcopy(like)
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not fit the run's model ({e})") from None
    return model


def measure_seed(out: Path, seed: int, algos: list[str], log=print) -> dict:
    """Every algo's leakage numbers for one seed (runs that exist), against the rebuilt initial policy."""
    import json

    first = next((a for a in algos if (run_dir(out, a, seed) / "config.json").is_file()), None)
    if first is None:
        return {}
    config = json.loads((run_dir(out, first, seed) / "config.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = initial_policy(config, Path(tmp) / "run")
        try:
            start = trainer.evaluate()
            tok, init = trainer.tok, trainer.model
            prompts = [trainer.prompt_ids(p) for p in trainer.eval_set]
            from cepo_kernels.rl.rollout import generate

            resp = generate(init, prompts, pad_id=tok.pad_token_id, eos_id=trainer.eos_ids,
                            max_new_tokens=trainer.cfg.max_new_tokens, greedy=True, chunk=256)
            box_id = tok.convert_tokens_to_ids("\\boxed{")
            refs = [p.answer for p in trainer.eval_set]
            hinted = [teacher_prefix(tok, trainer.question(p), q, p.answer, trainer.cfg.teacher_template,
                                     trainer.cfg.system_prompt) for p, q in zip(trainer.eval_set, prompts,
                                                                                 strict=True)]
            rows = probes(tok, prompts, resp, refs, box_id, hinted)
            base = answer_logprobs(init, rows, tok.pad_token_id)
            result = {}
            for algo in algos:
                rdir = run_dir(out, algo, seed)
                if not (rdir / "summary.json").is_file():
                    continue
                recorded = read_summary(rdir).get("eval_accuracy_start")
                if recorded is not None and abs(recorded - start) > 1e-9:
                    raise ValueError(f"{rdir}: the rebuilt initial policy's held-out accuracy {start} is not "
                                     f"the run's eval_accuracy_start {recorded} (another machine or code?)")
                final = load_final(rdir, init)
                got = answer_logprobs(final, rows, tok.pad_token_id)
                b, f = kind_means(rows, base), kind_means(rows, got)
                own = generate(final, prompts, pad_id=tok.pad_token_id, eos_id=trainer.eos_ids,
                               max_new_tokens=trainer.cfg.max_new_tokens, greedy=True, chunk=256)
                texts = tok.batch_decode(own, skip_special_tokens=True)
                result[algo] = {
                    "initial": b, "final": f,
                    **{f"rise_{k}": f[k] - b[k] for k in (*KINDS, "preference") if k in b and k in f},
                    "hint_gain_initial": b.get("hint_gain"), "hint_gain_final": f.get("hint_gain"),
                    "final_boxed_share": sum("\\boxed{" in t for t in texts) / len(texts),
                    "final_examples": texts[:3],
                }
                log(f"leakage: {algo} seed {seed}: " + ", ".join(
                    f"{k} {v:+.3f}" for k, v in result[algo].items() if k.startswith("rise_")))
            return {"eval_accuracy_start": start, "probes": len(rows), "runs": result,
                    "initial_examples": tok.batch_decode(resp[:3], skip_special_tokens=True)}
        finally:
            trainer.close()


def cached_seed(out: Path, seed: int, algos: list[str]) -> dict:
    """measure_seed, kept in OUT/leakage/seed<k>.json and reused while it holds every finished run of the
    seed (so the models of measured seeds can be deleted and the command run again)."""
    import json

    path = out / "leakage" / f"seed{seed}.json"
    done = [a for a in algos if (run_dir(out, a, seed) / "summary.json").is_file()]
    if path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if set(done) <= set(cached.get("runs", {})):
            cached["runs"] = {a: cached["runs"][a] for a in algos if a in cached["runs"]}
            return cached
    result = measure_seed(out, seed, algos)
    if result:
        path.parent.mkdir(exist_ok=True)
        write_json(path, result)
    return result


METRICS = ("rise_premature", "rise_contradicting", "rise_preference", "rise_supported", "hint_gain_final",
           "final_boxed_share")
NAMES = {"rise_premature": "premature: rise of log p(ref)",
         "rise_contradicting": "after wrong reasoning: rise of log p(ref)",
         "rise_preference": "after wrong reasoning: rise of log p(ref) - log p(own)",
         "rise_supported": "after right reasoning: rise of log p(ref)",
         "hint_gain_final": "final: log p(ref) with the reference shown minus without",
         "final_boxed_share": "final greedy responses with a box"}


def summarize(per_seed: dict, algos: list[str]) -> dict:
    """Per algo mean ± std over seeds of METRICS; per baseline the paired difference (algo minus CEPO)."""
    out = {"per_algo": {}, "paired_vs_cepo": {}}
    for algo in algos:
        for m in METRICS:
            vals = [r["runs"][algo][m] for r in per_seed.values()
                    if r.get("runs", {}).get(algo, {}).get(m) is not None]
            if vals:
                out["per_algo"].setdefault(algo, {})[m] = {
                    "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "n": len(vals)}
            if algo == "cepo":
                continue
            diffs = {s: r["runs"][algo][m] - r["runs"]["cepo"][m] for s, r in per_seed.items()
                     if r.get("runs", {}).get(algo, {}).get(m) is not None
                     and r["runs"].get("cepo", {}).get(m) is not None}
            if diffs:
                out["paired_vs_cepo"].setdefault(algo, {})[m] = {"per_seed": diffs,
                                                                 **paired_stats(list(diffs.values()))}
    return out


def markdown(summary: dict, per_seed: dict, algos: list[str]) -> str:
    counts = next((r for r in per_seed.values() if r.get("runs")), {})
    any_run = next(iter(counts.get("runs", {}).values()), {}).get("initial", {})
    n = {k: any_run.get(f"{k}_problems", 0) for k in KINDS}
    gains = [r["runs"][a]["hint_gain_initial"] for r in per_seed.values() for a in list(r.get("runs", {}))[:1]
             if r["runs"][a].get("hint_gain_initial") is not None]
    hint = (f"{statistics.fmean(gains):+.3f} ± {statistics.stdev(gains) if len(gains) > 1 else 0.0:.3f} over "
            f"{len(gains)} seeds" if gains else "-")
    lines = ["Leakage diagnostic (cepo_kernels/analysis/leakage.py): log p(reference answer) teacher-forced "
             "after the initial policy's own greedy reasoning, final model minus initial model, nats; per "
             "run the mean over held-out problems, then mean ± std over seeds. Problems of seed "
             f"{next(iter(per_seed), '-')}: premature {n['premature']}, wrong reasoning "
             f"{n['contradicting']}, right reasoning {n['supported']}. Hint gain of the initial models: "
             f"{hint}.", "",
             "| algo | runs | " + " | ".join(NAMES[m] for m in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for algo in algos:
        st = summary["per_algo"].get(algo, {})
        cells = [f"{st[m]['mean']:+.3f} ± {st[m]['std']:.3f}" if m in st else "-" for m in METRICS]
        runs = max((st[m]["n"] for m in st), default=0)
        lines.append(f"| {algo} | {runs} | " + " | ".join(cells) + " |")
    if summary["paired_vs_cepo"]:
        lines += ["", "Paired by seed, the algorithm minus CEPO (95% percentile-bootstrap interval, 10,000 "
                  "resamples; the algorithm's wins / ties / losses = seeds where its value is above / equal "
                  "/ below CEPO's; exact two-sided sign and Wilcoxon signed-rank tests):", "",
                  "| algo | metric | mean difference [95% CI] | above / tie / below | sign p | Wilcoxon p |",
                  "|---|---|---|---|---|---|"]
        for algo, per in summary["paired_vs_cepo"].items():
            for m, d in per.items():
                lines.append(f"| {algo} | {NAMES[m]} | {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, "
                             f"{d['ci95'][1]:+.3f}] | {d['wins']} / {d['ties']} / {d['losses']} | "
                             f"{d['sign_test_p']:.3f} | {d['wilcoxon_p']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from cepo_kernels.analysis.compare import parse_algos, parse_seeds

    p = argparse.ArgumentParser(prog="python -m cepo_kernels.analysis.leakage", description=__doc__.split(
        "\n")[0])
    p.add_argument("--out", required=True, help="a cepo-compare directory whose runs kept their models")
    p.add_argument("--seeds", default="10", help="a count N (seeds 0..N-1) or a comma-separated list")
    p.add_argument("--algos", default="cepo,grpo,rlsd,opsd,sdpo", help="comma-separated (CEPO first)")
    args = p.parse_args(argv)
    try:
        algos, seeds = parse_algos(args.algos), parse_seeds(args.seeds)
    except ValueError as e:
        print(f"leakage: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if not (out / "runs").is_dir():
        print(f"leakage: --out: expected a cepo-compare directory with runs/, got {str(out)!r}",
              file=sys.stderr)
        return 2
    try:
        per_seed = {s: r for s in seeds if (r := cached_seed(out, s, algos))}
    except ValueError as e:
        print(f"leakage: {e}", file=sys.stderr)
        return 2
    summary = summarize(per_seed, algos)
    command = ["python", "-m", "cepo_kernels.analysis.leakage", *(sys.argv[1:] if argv is None else argv)]
    write_json(out / "leakage.json", {"per_seed": per_seed, **summary, "command": command})
    atomic_write(out / "leakage.md", markdown(summary, per_seed, algos).encode("utf-8"))
    print((out / "leakage.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
