"""`cepo-viz RUN_DIR [RUN_DIR ...]`: credit maps (HTML) and training curves (PNG) of cepo-train runs.

    cepo-viz runs/cepo-20261130-003000                 # -> RUN_DIR/credit.html and RUN_DIR/curves.png
    cepo-viz runs/a runs/b runs/c -o viz/              # several runs: one page, overlaid curves

The credit map is one self-contained HTML page (inline CSS and JavaScript, nothing fetched): for each run
and each saved step (a selector; credit/step_NNNNNN.json.gz, written by the trainer every
`--credit-every` steps), the sampled responses grouped by prompt, with the prompt's r+ (reference) and
r- (the rejected answer the negative teacher saw), each response's reward and advantage A, and its
tokens coloured on a diverging scale (blue < centre < red) by Delta = log P_T+ - log P_T-, or by the
weight w, or by A_hat (a toggle; `credit.html#w` or `#a_hat` opens in that mode); hovering a token shows
its Delta, w and A_hat. The legend gives the scale of the current mode.
Python: `render_credit_html(run_dirs, out_html)`.

Missing data (no such directory, no credit files at all, no metrics.jsonl) stops with a one-line message
naming the path (exit code 2). A corrupt or malformed credit file (truncated, a null or a string where a
number belongs) is skipped with a warning naming the file and field, and the page shows the good steps
(and names the skipped files); a garbage metrics.jsonl line is skipped with a warning naming its line.
`-o` is an output directory, created when missing (the files in it are replaced); a path naming an
existing file is refused. A failed write (a full disk) is one line naming the directory (exit code 2).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import sys
from pathlib import Path

from cepo_kernels.analysis.credit import credit_files, load_credit
from cepo_kernels.analysis.plots import RunDataError, plot_curves, read_json_object
from cepo_kernels.runfiles import atomic_write, writing

log = logging.getLogger("cepo_kernels.analysis")


def load_run_credit(run_dir: str | Path) -> dict:
    """{"name", "config", "steps": {step: record}, "skipped": [one line per unusable credit file]} of a
    run; RunDataError when no credit file is usable."""
    rdir = Path(run_dir)
    if not rdir.is_dir():
        raise RunDataError(f"{rdir}: no such run directory")
    files = credit_files(rdir)
    if not files:
        raise RunDataError(
            f"{rdir}: no credit maps (credit/step_*.json.gz); the run saved none (credit_every=0) or "
            f"was made by an older cepo-train: rerun it with --credit-every K"
        )
    steps, skipped = {}, []
    for f in files:
        try:
            rec = load_credit(f)
        except ValueError as e:
            skipped.append(str(e))
            continue
        steps[rec["step"]] = rec
    if not steps:
        raise RunDataError(f"{rdir}: no usable credit file ({len(files)} unreadable; first: {skipped[0]})")
    for message in skipped:
        log.warning("skipped %s", message)
    return {"name": str(rdir), "config": read_json_object(rdir / "config.json"), "steps": steps,
            "skipped": skipped}


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 16px; color: #222;
       background: #fff; }
h1 { font-size: 20px; margin: 0 0 8px 0; }
h2 { font-size: 16px; margin: 18px 0 6px 0; border-top: 2px solid #ccc; padding-top: 8px; }
.bar { position: sticky; top: 0; background: #fff; padding: 6px 0; border-bottom: 1px solid #ddd;
       z-index: 2; display: flex; gap: 24px; align-items: center; flex-wrap: wrap; }
.legend { display: flex; align-items: center; gap: 6px; font-size: 13px; }
.grad { width: 220px; height: 14px; border: 1px solid #999; }
.meta { font-size: 13px; color: #555; margin: 2px 0 6px 0; }
.group { margin: 10px 0 14px 0; padding: 6px 8px; border: 1px solid #e2e2e2; border-radius: 4px; }
.q { font-family: monospace; font-size: 15px; }
.ans { font-size: 13px; margin: 2px 0 6px 0; }
.ans code { background: #f3f3f3; padding: 1px 4px; }
table { border-collapse: collapse; }
td { padding: 2px 6px; vertical-align: middle; font-size: 13px; }
td.num { text-align: right; font-family: monospace; white-space: nowrap; }
.tok { display: inline-block; font-family: monospace; font-size: 16px; line-height: 22px; padding: 1px 2px;
       margin: 1px 0; border-radius: 2px; white-space: pre; cursor: default; min-width: 8px; }
.tok.special { font-size: 11px; color: #444; }
.tok.first-wrong { outline: 2px solid #000; outline-offset: -1px; }
.correct { color: #1a7f37; font-weight: bold; }
.wrong { color: #b42318; }
"""

_JS = r"""
const DATA = JSON.parse(document.getElementById('credit-data').textContent);
let MODE = 'delta';
const MODES = {delta: {label: 'Delta = log P_T+ - log P_T-', center: 0},
               w: {label: 'w = clip(exp(sign(A) Delta), 1-eps_w, 1+eps_w)', center: 1},
               a_hat: {label: 'A_hat', center: 0}};
const NEG = [33, 102, 172], MID = [247, 247, 247], POS = [178, 24, 43];
function mix(a, b, t) { return a.map((x, i) => Math.round(x + (b[i] - x) * t)); }
function color(v, center, range) {
  let t = range > 0 ? (v - center) / range : 0;
  t = Math.max(-1, Math.min(1, t));
  const c = t >= 0 ? mix(MID, POS, t) : mix(MID, NEG, -t);
  return 'rgb(' + c.join(',') + ')';
}
function textColor(v, center, range) {
  const t = range > 0 ? Math.abs(v - center) / range : 0;
  return t > 0.6 ? '#fff' : '#111';
}
function scaleOf(rec, mode) {
  if (mode === 'w') return rec.eps_w > 0 ? rec.eps_w : 1;
  let m = 0;
  for (const g of rec.groups)
    for (const r of g.responses) for (const v of r[mode]) m = Math.max(m, Math.abs(v));
  return m > 0 ? m : 1;
}
function fmt(v) { return (v >= 0 ? '+' : '') + v.toFixed(3); }
function shown(tok) {
  if (/^<\|.*\|>$|^<pad>$|^<unk>$/.test(tok)) return [tok, true];
  return [tok.replace(/\n/g, '\u21b5').replace(/\t/g, '\u21e5').replace(/ /g, '\u00b7'), false];
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function renderStep(box, run, step) {
  box.innerHTML = '';
  const rec = run.steps[step];
  const range = scaleOf(rec, MODE), center = MODES[MODE].center;
  box.dataset.range = range;
  const meta = el('div', 'meta', 'step ' + rec.step + ' \u00b7 algo ' + rec.algo + ' \u00b7 lambda ' +
    rec.lambda.toFixed(3) + ' \u00b7 eps_w ' + rec.eps_w + ' \u00b7 colour scale of this step: ' +
    MODES[MODE].label + ' in [' + (center - range).toFixed(3) + ', ' + (center + range).toFixed(3) + ']');
  box.appendChild(meta);
  rec.groups.forEach((g, gi) => {
    const gd = el('div', 'group');
    gd.appendChild(el('div', 'q', 'prompt ' + (gi + 1) + ': ' + g.question));
    const ans = el('div', 'ans');
    ans.innerHTML = 'r+ (reference): <code></code> &nbsp; r- (negative teacher): <code></code> ';
    ans.querySelectorAll('code')[0].textContent = g.r_plus;
    ans.querySelectorAll('code')[1].textContent =
      g.r_minus === null ? '(no teacher: GRPO)' : (g.r_minus === '' ? '(empty)' : g.r_minus);
    if (g.r_minus_how) ans.appendChild(el('span', 'meta', '(' + g.r_minus_how + ')'));
    gd.appendChild(ans);
    const tbl = el('table');
    const head = el('tr');
    ['reward', 'A', 'response (token by token)'].forEach(h => head.appendChild(el('td', 'meta', h)));
    tbl.appendChild(head);
    const order = g.responses.map((r, i) => i).sort((a, b) => g.responses[b].reward - g.responses[a].reward);
    for (const i of order) {
      const r = g.responses[i];
      const tr = el('tr');
      tr.appendChild(el('td', 'num ' + (r.reward >= 0.5 ? 'correct' : 'wrong'), r.reward.toFixed(2)));
      tr.appendChild(el('td', 'num', fmt(r.adv)));
      const td = el('td');
      r.tokens.forEach((tok, t) => {
        const [txt, special] = shown(tok);
        const fw = r.first_wrong !== undefined && r.first_wrong !== null && t === r.first_wrong;
        const s = el('span', 'tok' + (special ? ' special' : '') + (fw ? ' first-wrong' : ''), txt);
        const v = r[MODE][t];
        s.style.background = color(v, center, range);
        s.style.color = textColor(v, center, range);
        s.title = 'token ' + JSON.stringify(tok) + '\nDelta = ' + fmt(r.delta[t]) + '\nw = ' +
          r.w[t].toFixed(3) + '\nA_hat = ' + fmt(r.a_hat[t]) + '\nA = ' + fmt(r.adv) +
          (fw ? '\nfirst wrong token (the first wrong step starts here)' : '');
        td.appendChild(s);
      });
      tr.appendChild(td);
      tbl.appendChild(tr);
    }
    gd.appendChild(tbl);
    box.appendChild(gd);
  });
}
function renderAll() {
  document.getElementById('mode-label').textContent = MODES[MODE].label;
  const c = MODES[MODE].center;
  document.getElementById('leg-lo').textContent = MODE === 'w' ? '1 - eps_w' : '-max|' +
    (MODE === 'delta' ? 'Delta' : 'A_hat') + '|';
  document.getElementById('leg-mid').textContent = String(c);
  document.getElementById('leg-hi').textContent = MODE === 'w' ? '1 + eps_w' : '+max|' +
    (MODE === 'delta' ? 'Delta' : 'A_hat') + '|';
  DATA.runs.forEach((run, ri) => {
    const sel = document.getElementById('step-' + ri);
    renderStep(document.getElementById('run-' + ri), run, sel.value);
  });
}
const HASH = window.location.hash.slice(1);  // credit.html#w or #a_hat opens in that mode
if (HASH in MODES) { MODE = HASH; document.querySelector('input[value=' + HASH + ']').checked = true; }
document.getElementById('grad').style.background =
  'linear-gradient(to right, rgb(' + NEG + '), rgb(' + MID + '), rgb(' + POS + '))';
document.querySelectorAll('input[name=mode]').forEach(i => i.addEventListener('change', e => {
  MODE = e.target.value; renderAll();
}));
DATA.runs.forEach((run, ri) => {
  const sel = document.getElementById('step-' + ri);
  Object.keys(run.steps).map(Number).sort((a, b) => a - b).forEach(s => {
    const o = el('option', null, 'step ' + s); o.value = s; sel.appendChild(o);
  });
  sel.value = String(run.initial);
  sel.addEventListener('change', renderAll);
});
renderAll();
document.body.dataset.rendered = '1';
"""


def _config_line(cfg: dict | None) -> str:
    if not cfg:
        return "(no config.json)"
    keys = ("algo", "seed", "steps", "prompts_per_step", "group_size", "lam0", "t_warm", "eps_w", "lr",
            "format_bonus", "model", "data")
    return ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def render_credit_html(run_dirs, out_html: str | Path, step: int | None = None,
                       title: str = "CEPO credit maps") -> Path:
    """Writes the self-contained credit-map page of the runs; `step` (when saved) is shown first."""
    runs = [load_run_credit(d) for d in run_dirs]
    if not runs:
        raise RunDataError("no run directories given")
    data = {"runs": []}
    sections = []
    for ri, run in enumerate(runs):
        saved = sorted(run["steps"])
        if step is not None and step not in run["steps"]:
            raise RunDataError(f"{run['name']}: no credit map saved at step {step} (saved: {saved})")
        initial = step if step is not None else saved[0]
        data["runs"].append({"name": run["name"], "initial": initial,
                             "steps": {str(s): rec for s, rec in run["steps"].items()}})
        skipped = "".join(f'<div class="meta wrong">skipped: {html.escape(m)}</div>' for m in run["skipped"])
        sections.append(
            f'<h2>{html.escape(run["name"])}</h2><div class="meta">{html.escape(_config_line(run["config"]))}'
            f' &nbsp; <label>saved step: <select id="step-{ri}"></select></label></div>{skipped}'
            f'<div id="run-{ri}"></div>'
        )
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<div class="meta">Each token of a sampled response is coloured by the selected quantity (hover a token for
its Delta, w and A_hat). Delta &gt; 0: the teacher that saw the reference answer (r+) finds the token more
likely than the one that saw the rejected answer (r-). Responses are grouped by prompt, best reward first.
A black outline marks a wrong response's first wrong token (tasks that know their solution's steps).
</div>
<div class="bar">
  <span>colour by:
    <label><input type="radio" name="mode" value="delta" checked> Delta</label>
    <label><input type="radio" name="mode" value="w"> w</label>
    <label><input type="radio" name="mode" value="a_hat"> A_hat</label></span>
  <span class="legend"><span id="leg-lo"></span><span id="grad" class="grad"></span><span id="leg-hi"></span>
    <span class="meta">(centre <span id="leg-mid"></span>; <span id="mode-label"></span>)</span></span>
</div>
{"".join(sections)}
<script type="application/json" id="credit-data">{payload}</script>
<script>{_JS}</script>
</body></html>
"""
    out_html = Path(out_html)
    with writing(out_html):
        out_html.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_html, page.encode("utf-8"))
    return out_html


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cepo-viz",
        description="Credit maps (self-contained HTML) and training curves (PNG) of cepo-train run "
        "directories.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--out", help="output directory, created when missing; credit.html and curves.png "
                   "in it are replaced (default: the run directory for one run, else ./cepo-viz)")
    p.add_argument("--step", type=int, help="the saved step shown first (default: the first saved)")
    p.add_argument("--no-html", action="store_true", help="only the curves")
    p.add_argument("--no-curves", action="store_true", help="only the credit map")
    return p


def main(argv=None) -> int:
    """Exit codes: 0 written (a skipped credit file is a warning), 2 bad input, missing data or a failed
    write, 130 Ctrl-C."""
    warnings = logging.StreamHandler(sys.stderr)  # skipped files and lines, one line each
    warnings.setFormatter(logging.Formatter("cepo-viz: warning: %(message)s"))
    warnings.setLevel(logging.WARNING)
    logger = logging.getLogger("cepo_kernels")
    logger.addHandler(warnings)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("\ncepo-viz: stopped (Ctrl-C); the files already written are complete", file=sys.stderr)
        return 130
    finally:
        logger.removeHandler(warnings)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out) if args.out else (Path(args.run_dirs[0]) if len(args.run_dirs) == 1
                                           else Path("cepo-viz"))
    if out.exists() and not out.is_dir():
        print(f"cepo-viz: error: -o/--out: {str(out)!r} is a file; expected a directory (new or existing)",
              file=sys.stderr)
        return 2
    written = []
    try:
        if not args.no_html:
            written.append(render_credit_html(args.run_dirs, out / "credit.html", step=args.step))
        if not args.no_curves:
            written.append(plot_curves(args.run_dirs, out / "curves.png")["path"])
    except (RunDataError, OSError) as e:  # OSError: runfiles.WriteFailed (a full disk), one line
        for path in written:
            print(f"cepo-viz: wrote {path}")
        print(f"cepo-viz: error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"cepo-viz: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
