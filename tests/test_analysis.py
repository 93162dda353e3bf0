"""Credit maps (HTML, rendered in headless Chromium), training curves (PNG), cepo-compare end to end on a
tiny setting, the format bonus, and clear messages for missing or partial run data."""

import errno
import gzip
import json
import re
import shutil
import subprocess

import pytest
import torch

import cepo_ref
from cepo_kernels.analysis import compare, viz
from cepo_kernels.analysis.credit import (
    credit_files,
    credit_path,
    credit_record,
    load_credit,
    should_save,
    write_credit,
)
from cepo_kernels.analysis.plots import PANELS, RunDataError, plot_curves
from cepo_kernels.rl.config import TrainConfig
from cepo_kernels.rl.task import build_tokenizer
from cepo_kernels.runfiles import write_json_gz
from cepo_kernels.step import CEPOOptions, RolloutBatch, reweight
from cepo_kernels.step.rewards import boxed_reward, with_format_bonus

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the same tiny setting as tests/test_rl_train.py, fewer steps: 2 seeds x 3 algorithms
TINY = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "4",
        "--micro-batch-size", "8", "--mini-batch-prompts", "2", "--sft-steps", "10", "--sft-batch-size", "16",
        "--eval-every", "2", "--eval-size", "4", "--save-every", "0", "--credit-every", "1",
        "--credit-samples", "2"]
POS_RGB, NEG_RGB = (178, 24, 43), (33, 102, 172)  # the ends of the page's diverging scale


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """cepo-compare on the tiny setting: 2 seeds of CEPO, GRPO and RLSD."""
    out = tmp_path_factory.mktemp("compare")
    assert compare.main(["--out", str(out), "--seeds", "2", "--last", "2", *TINY]) == 0
    return out


def test_compare_end_to_end(compared):
    for algo in ("cepo", "grpo", "rlsd"):
        for seed in (0, 1):
            rdir = compared / "runs" / f"{algo}-seed{seed}"
            cfg = json.loads((rdir / "config.json").read_text())
            assert (cfg["algo"], cfg["seed"], cfg["steps"]) == (algo, seed, 2)
            assert not (rdir / "checkpoints").exists() and not (rdir / "final_model").exists()
            assert [p.name for p in sorted((rdir / "credit").iterdir())] == [
                "step_000001.json.gz", "step_000002.json.gz"]
    res = json.loads((compared / "results.json").read_text())
    assert set(res["per_algo"]) == {"cepo", "grpo", "rlsd"}
    for algo in res["per_algo"]:
        st = res["per_algo"][algo]["eval_accuracy_end"]
        assert st["n"] == 2 and st["min"] <= st["mean"] <= st["max"]
    paired = res["paired"]["cepo-grpo"]["eval_accuracy_end"]
    runs = res["runs"]
    for s in ("0", "1"):
        diff = runs["cepo"][s]["eval_accuracy_end"] - runs["grpo"][s]["eval_accuracy_end"]
        assert paired["per_seed"][s] == pytest.approx(diff)
    assert paired["wins"] + paired["ties"] + paired["losses"] == 2
    table = (compared / "table.md").read_text()
    assert "| cepo | 2 |" in table and "cepo-rlsd" in table
    machine = json.loads((compared / "machine.json").read_text())
    assert machine["torch"] == torch.__version__ and len(machine["run_wall_s"]) == 6
    assert (compared / "curves.png").stat().st_size > 10_000
    # a second call reruns nothing (every run has its summary.json) and rewrites the report
    before = (compared / "runs" / "cepo-seed0" / "metrics.jsonl").stat().st_mtime_ns
    assert compare.main(["--out", str(compared), "--seeds", "2", "--last", "2", *TINY]) == 0
    assert (compared / "runs" / "cepo-seed0" / "metrics.jsonl").stat().st_mtime_ns == before


def test_compare_bad_options(tmp_path, capsys):
    assert compare.main(["--out", str(tmp_path), "--seeds", "x"]) == 2
    assert compare.main(["--out", str(tmp_path), "--algos", "cepo,ppo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("cepo-compare: error: seeds:")
    assert err[1].startswith("cepo-compare: error: algos:")


def test_curves_png_panels(compared):
    from PIL import Image

    dirs = sorted((compared / "runs").iterdir())
    info = plot_curves(dirs, compared / "again.png", title="t")
    assert info["panels"] == [name for name, _ in PANELS]
    assert {"reward (batch mean)", "held-out accuracy (greedy)", "lambda", "entropy", "clip fraction",
            "wrong-direction fraction", "teacher rows per step"} <= set(info["panels"])
    # seeds of one configuration share a line (mean and band); the label says what differs: the algorithm
    assert sorted(info["labels"]) == ["cepo (2 seeds)", "grpo (2 seeds)", "rlsd (2 seeds)"]
    with Image.open(info["path"]) as im:
        assert im.size == (1500, 1100)
    one = plot_curves([dirs[0]], compared / "one.png")
    assert len(one["labels"]) == 1


def test_credit_record_matches_the_method():
    tok = build_tokenizer()
    G, T = 4, 5
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(2 * G, T, generator=g), torch.randn(2 * G, T, generator=g)
    mask = torch.ones(2 * G, T, dtype=torch.bool)
    mask[1, 3:] = False
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    adv = cepo_ref.group_advantages(torch.tensor(rewards), G)
    responses = [[10, 11, 12, 13, 14]] * (2 * G)
    responses[1] = [10, 11, 12]
    batch = RolloutBatch([[5, 6]] * (2 * G), responses, adv, mask, G, texts=["t"] * (2 * G), rewards=rewards,
                         references=["3"] * G + ["4"] * G)
    # the reweight phase at lambda 0.3, its scorer handing back the given log-probs of the teacher rows
    result = reweight(batch, lambda ctx, teachers: {"pos": pos[ctx.rows], "neg": neg[ctx.rows]},
                      CEPOOptions(lam0=0.3, t_warm=10**6), 0, tokenizer=tok)
    rec = credit_record(step=3, algo="cepo", tokenizer=tok, questions=["1+2=", "2+2="], batch=batch,
                        result=result, n_groups=1)
    assert rec["lambda"] == 0.3 and rec["eps_w"] == 0.2 and rec["groups"][0]["r_plus"] == "3"
    assert rec["groups"][0]["r_minus"] == "t"  # no boxed answer: the rejected rollout's first characters
    assert len(rec["groups"]) == 1
    resp = rec["groups"][0]["responses"]
    a_hat = cepo_ref.cepo_advantages(adv[:G], pos[:G], neg[:G], mask[:G], lam=0.3, eps_w=0.2)
    for i, r in enumerate(resp):
        n = len(responses[i])
        assert r["tokens"] == [tok.decode([t]) for t in responses[i]]
        delta = (pos[i, :n] - neg[i, :n]).tolist()
        w = torch.exp(torch.sign(adv[i]) * (pos[i, :n] - neg[i, :n])).clamp(0.8, 1.2).tolist()
        assert r["delta"] == pytest.approx(delta, abs=1e-4)
        assert r["w"] == pytest.approx(w, abs=1e-4)
        assert r["a_hat"] == pytest.approx(a_hat[i, :n].tolist(), abs=1e-4)
        assert r["adv"] == pytest.approx(float(adv[i]), abs=1e-4)
    assert [should_save(s, 10) for s in (1, 2, 10, 11, 20)] == [True, False, True, False, True]
    assert not should_save(1, 0)


def test_format_bonus():
    fn = with_format_bonus(boxed_reward, 0.1)
    assert fn("\\boxed{3}", "3") == pytest.approx(1.0)
    assert fn("\\boxed{4}", "3") == pytest.approx(0.1)
    assert fn("3", "3") == 0.0
    assert fn("\\boxed{3", "3") == 0.0  # an unclosed box is no answer
    with pytest.raises(ValueError, match="format_bonus"):
        TrainConfig(format_bonus=1.5)
    with pytest.raises(ValueError, match="credit_every"):
        TrainConfig(credit_every=-1)


def _synthetic_run(root):
    """A run directory with one credit file of known values: strongly red and strongly blue tokens."""
    tokens = list("\\boxed{12}") * 3

    def resp(reward, adv, sign):
        n = len(tokens)
        return {"text": "".join(tokens), "reward": reward, "adv": adv, "tokens": tokens,
                "delta": [sign * 2.0] * n, "w": [1.0 + sign * 0.2] * n, "a_hat": [adv] * n}

    rec = {"version": 1, "step": 7, "algo": "cepo", "lambda": 0.2, "eps_w": 0.2, "group_size": 2,
           "groups": [{"question": "5+7=", "r_plus": "12", "r_minus": "11", "r_minus_how": "answer",
                       "responses": [resp(1.0, 1.0, +1), resp(0.0, -1.0, -1)]}]}
    write_credit(root, rec)
    return root


def _screenshot(html_path, png, fragment=""):
    profile = png.parent / f"profile-{png.stem}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--window-size=1000,700", f"--screenshot={png}", html_path.resolve().as_uri() + fragment]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(png) as im:
        rgb = im.convert("RGB")
        return [rgb.getpixel((x, y)) for y in range(0, rgb.height, 2) for x in range(0, rgb.width, 2)]


def _near(pixels, rgb, tol=12):
    return sum(all(abs(p[i] - rgb[i]) <= tol for i in range(3)) for p in pixels)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: .ci/run must `apt-get install -y "
                    "chromium` (Debian's package) for this test")
def test_credit_map_renders_in_chromium(tmp_path, compared):
    run = _synthetic_run(tmp_path / "run")
    page = viz.render_credit_html([run], tmp_path / "credit.html")
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "<script src" not in text  # self-contained
    # Delta mode: the correct response's tokens at the red end, the wrong one's at the blue end
    pixels = _screenshot(page, tmp_path / "delta.png")
    assert _near(pixels, POS_RGB) > 150 and _near(pixels, NEG_RGB) > 150
    # w mode (the toggle, opened through the URL fragment): w = 1.2 red, 0.8 blue; the same picture
    pixels_w = _screenshot(page, tmp_path / "w.png", "#w")
    assert _near(pixels_w, POS_RGB) > 150 and _near(pixels_w, NEG_RGB) > 150
    # control: GRPO has no teachers (Delta = 0): white tokens, only the legend's gradient is red and blue
    grpo = viz.render_credit_html([compared / "runs" / "grpo-seed0"], tmp_path / "grpo.html")
    pixels_0 = _screenshot(grpo, tmp_path / "grpo.png")
    assert _near(pixels_0, POS_RGB) < 100 and _near(pixels_0, NEG_RGB) < 100
    # a real run's page: the script renders one span per saved token
    real = compared / "runs" / "cepo-seed0"
    page = viz.render_credit_html([real], tmp_path / "real.html", step=2)
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          "--no-first-run", f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom",
                          page.resolve().as_uri()], check=True, capture_output=True, text=True, timeout=120)
    assert 'data-rendered="1"' in dom.stdout
    rec = load_credit(credit_path(real, 2))
    n_tokens = sum(len(r["tokens"]) for g in rec["groups"] for r in g["responses"])
    assert len(re.findall(r'<span class="tok', dom.stdout)) == n_tokens > 0


def test_cli_writes_html_and_png(compared, tmp_path, capsys):
    runs = [str(compared / "runs" / f"{a}-seed0") for a in ("cepo", "rlsd")]
    assert viz.main([*runs, "-o", str(tmp_path / "v")]) == 0
    html_text = (tmp_path / "v" / "credit.html").read_text()
    assert html_text.count('<select id="step-') == 2 and "credit-data" in html_text
    assert (tmp_path / "v" / "curves.png").stat().st_size > 10_000
    assert "cepo-viz: wrote" in capsys.readouterr().out


def test_missing_or_partial_data_gives_one_line(tmp_path, compared, capsys):
    def error_of(*argv):
        assert viz.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cepo-viz: error: ")
        return err[0]

    assert "no such run directory" in error_of(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "no credit maps" in error_of(tmp_path / "empty")
    assert "no metrics.jsonl" in error_of(tmp_path / "empty", "--no-html")
    run = tmp_path / "partial"
    shutil.copytree(compared / "runs" / "cepo-seed0", run)
    assert "no credit map saved at step 5" in error_of(run, "--step", "5")
    good = {f: f.read_bytes() for f in credit_files(run)}
    for f, data in good.items():
        f.write_bytes(data[: len(data) // 2])  # every file truncated: nothing to show
    assert "no usable credit file" in error_of(run) and "unreadable credit file" in error_of(run)
    for f, data in good.items():
        f.write_bytes(data)
    with gzip.open(credit_path(run, 2), "wt") as fh:
        json.dump({"step": 2, "algo": "cepo"}, fh)
    assert "missing field 'lambda'" in load_error(credit_path(run, 2))
    credit_path(run, 2).unlink()
    (run / "metrics.jsonl").write_text("")
    assert "empty" in error_of(run, "--no-html")
    with pytest.raises(RunDataError, match="no run directories"):
        plot_curves([], tmp_path / "x.png")


def load_error(path):
    with pytest.raises(ValueError) as e:
        load_credit(path)
    return str(e.value)


def test_bad_credit_files_are_named_and_the_good_steps_shown(tmp_path, compared, capsys):
    run = tmp_path / "run"
    shutil.copytree(compared / "runs" / "cepo-seed0", run)
    saved = [load_credit(f)["step"] for f in credit_files(run)]
    bad = credit_path(run, saved[-1])
    rec = load_credit(bad)
    rec["groups"][0]["responses"][0]["w"] = None
    write_json_gz(bad, rec)
    assert re.search(r"group 0 response 0: field 'w': expected a list of numbers, got None", load_error(bad))
    rec["groups"][0]["responses"][0]["w"] = ["0.5"] * len(rec["groups"][0]["responses"][0]["tokens"])
    write_json_gz(bad, rec)
    assert "field 'w': expected a list of numbers, got '0.5'" in load_error(bad)
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + "garbage\n{\"step\": 99}\n")
    assert viz.main([str(run), "-o", str(tmp_path / "v")]) == 0
    captured = capsys.readouterr()
    assert f"cepo-viz: warning: skipped {bad}: group 0 response 0: field 'w'" in captured.err
    assert "metrics.jsonl:" in captured.err and "skipped an unreadable metrics line" in captured.err
    page = (tmp_path / "v" / "credit.html").read_text()
    assert "skipped: " in page and (tmp_path / "v" / "curves.png").stat().st_size > 10_000
    (tmp_path / "file").write_text("x")
    assert viz.main([str(run), "-o", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cepo-viz: error: -o/--out: {str(tmp_path / 'file')!r} is a file; expected a directory "
                   "(new or existing)"]


def test_viz_full_disk_is_one_line(tmp_path, compared, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cepo_kernels.runfiles.os.fsync", full)
    assert viz.main([str(compared / "runs" / "cepo-seed0"), "-o", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cepo-viz: error: cannot write credit.html in {tmp_path / 'v'}: no space left on device"]


def test_compare_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    from cepo_kernels.runfiles import WriteFailed

    monkeypatch.setattr(compare, "base_config", lambda rest: {})

    def own_write_fails(*a, **k):
        raise WriteFailed(errno.ENOSPC, f"cannot write table.md in {tmp_path}: no space left on device")

    monkeypatch.setattr(compare, "compare", own_write_fails)
    assert compare.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cepo-compare: error: cannot write table.md in {tmp_path}: no space left on device; the "
                   "finished runs are kept (once it can be written, the same command finishes the "
                   "comparison)"]

    def run_fails(*a, **k):  # a child cepo-train's disk filled up
        raise RuntimeError("cepo-compare: the cepo run with seed 0 failed (exit 2):\nINFO x\n"
                           f"cepo-train: error: cannot write step_000002 in {tmp_path}: no space left")

    monkeypatch.setattr(compare, "compare", run_fails)
    assert compare.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cepo-compare: the cepo run with seed 0 failed (exit 2): cepo-train: error: cannot write "
                   f"step_000002 in {tmp_path}: no space left"]


def test_compare_damaged_run_files_are_run_again_or_one_line(tmp_path, compared, capsys, monkeypatch):
    """A damaged summary.json, or a run without metrics.jsonl, is run again (and said so); a damaged
    machine.json, or a run that still has no metrics.jsonl, is one line (exit 2), never a traceback."""
    out = tmp_path / "c"
    shutil.copytree(compared, out)
    monkeypatch.setattr(compare, "base_config", lambda rest: {})
    calls = []

    def rerun(base, algo, seed, rdir, keep_models, metrics=True):  # stands in for a cepo-train run
        calls.append((algo, seed))
        shutil.rmtree(rdir)
        shutil.copytree(compared / "runs" / f"{algo}-seed{seed}", rdir)
        if not metrics:
            (rdir / "metrics.jsonl").unlink()
        return 1.0

    monkeypatch.setattr(compare, "run_one", rerun)
    args = ["--out", str(out), "--seeds", "2", "--last", "2"]
    (out / "runs" / "cepo-seed0" / "summary.json").write_text('{"eval_accuracy_start": 0.')
    (out / "runs" / "grpo-seed1" / "metrics.jsonl").unlink()
    assert compare.main(args) == 0
    assert calls == [("cepo", 0), ("grpo", 1)]
    said = capsys.readouterr().out
    assert f"cepo-compare: {out / 'runs' / 'cepo-seed0' / 'summary.json'}: damaged (" in said
    assert "running cepo-seed0 again" in said and "without metrics.jsonl; running grpo-seed1 again" in said

    def one_line():
        assert compare.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cepo-compare: error: "), err
        return err[0]

    machine = (out / "machine.json").read_text()
    (out / "machine.json").write_text(machine[:20])
    assert f"{out / 'machine.json'}: damaged (" in one_line() and "move it aside" in one_line()
    (out / "machine.json").write_text(machine)
    monkeypatch.setattr(compare, "run_one", lambda *a: rerun(*a, metrics=False))
    (out / "runs" / "rlsd-seed0" / "summary.json").write_text("[]")
    assert f"{out / 'runs' / 'rlsd-seed0'}: no metrics.jsonl" in one_line()


def test_compare_out_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert compare.main(["--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cepo-compare: error: out: {tmp_path / 'f'} is a file; expected a directory (a new one, "
                   "or the --out of an earlier comparison to finish or re-report)"]
