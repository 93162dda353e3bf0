"""The leakage diagnostic (cepo_kernels/analysis/leakage.py): its probes on the embedded tasks' responses,
the teacher-forced answer log-probs against a float64 forward, the per-kind means by hand, and the command
end to end on a tiny cepo-compare."""

import copy
import json
import shutil

import torch

from cepo_kernels.analysis import compare, leakage
from cepo_kernels.analysis.leakage import Probe, answer_logprobs, kind_means, probes
from cepo_kernels.rl.task import BOX_TOKEN, build_tiny_model, build_tokenizer
from cepo_kernels.step.contexts import encode, render_prompt
from tests.helpers import assert_close, ulps32

TOK = build_tokenizer()
BOX = TOK.convert_tokens_to_ids(BOX_TOKEN)


def _ids(text):
    return encode(TOK, text)


def _prompt(question):
    return _ids(render_prompt(TOK, question))


def test_probes_of_a_worked_solution():
    prompt, eos = _prompt("47+38="), TOK.eos_token_id
    right = _ids("7+8+0=15,4+3+1=08," + BOX_TOKEN + "85}") + [eos]
    wrong = _ids("7+8+0=15,4+3+0=07," + BOX_TOKEN + "75}") + [eos]
    rows = probes(TOK, [prompt, prompt], [right, wrong], ["85", "85"], BOX)
    pre = [r for r in rows if r.kind == "premature"]
    # "7+8+0=15,4+3+1=" is 15 tokens: the cuts keep 0..15 of them (the last "=" included, its result not)
    assert [len(r.context) - len(prompt) - 1 for r in pre if r.problem == 0] == list(range(16))
    assert TOK.decode(pre[15].context[len(prompt):]) == "7+8+0=15,4+3+1=" + BOX_TOKEN
    assert all(r.context[-1] == BOX and r.answer == _ids("85") for r in pre)
    (sup,) = [r for r in rows if r.kind == "supported"]
    assert sup.problem == 0 and sup.context == prompt + right[: right.index(BOX) + 1]
    (con,) = [r for r in rows if r.kind == "contradicting"]
    (own,) = [r for r in rows if r.kind == "contradicting_own"]
    assert con.problem == own.problem == 1 and con.context == own.context
    assert con.answer == _ids("85") and own.answer == _ids("75")
    assert len(rows) == 16 + 16 + 3
    shown = [_prompt("47+38= 85"), _prompt("47+38= 85")]
    more = probes(TOK, [prompt, prompt], [right, wrong], ["85", "85"], BOX, hinted=shown)
    assert more[:2] == [Probe(shown[0] + right[: right.index(BOX) + 1], _ids("85"), "hinted", 0),
                        Probe(sup.context, _ids("85"), "plain", 0)]
    assert [r for r in more if r.kind not in ("hinted", "plain")] == rows


def test_probes_of_the_arith_box_and_of_no_box():
    prompt = _prompt("3+5=")
    rows = probes(TOK, [prompt, prompt, prompt], [_ids(BOX_TOKEN + "8}"), _ids("8"), _ids(BOX_TOKEN + "7}")],
                  ["8", "8", "8"], BOX)
    # arith has no reasoning before the box: no premature cut; an unboxed response gives no probe
    assert [(r.kind, r.problem, r.answer) for r in rows] == [
        ("supported", 0, _ids("8")), ("contradicting", 2, _ids("8")), ("contradicting_own", 2, _ids("7"))]
    assert all(r.context == prompt + [BOX] for r in rows)


def test_answer_logprobs_against_float64():
    model = build_tiny_model(TOK, seed=3)
    prompt = _prompt("12+34=")
    rows = [Probe(prompt + _ids("6+4+0=10,")[:k] + [BOX], _ids(a), "premature", 0)
            for k, a in [(0, "46"), (3, "5"), (9, "146"), (5, "0")]]
    got = torch.tensor(answer_logprobs(model, rows, TOK.pad_token_id, chunk=3), dtype=torch.float64)

    def one_by_one(m, dtype):
        m = copy.deepcopy(m).to(dtype).eval()
        out = []
        with torch.no_grad():
            for r in rows:
                ids = torch.tensor([r.context + r.answer])
                logp = torch.log_softmax(m(input_ids=ids).logits[0].to(dtype), dim=-1)
                out.append(sum(logp[len(r.context) - 1 + t, a] for t, a in enumerate(r.answer)))
        return torch.stack(out).double()

    ref64, same32 = one_by_one(model, torch.float64), one_by_one(model, torch.float32)
    assert (ref64 < 0).all()
    # batched, right-padded fp32 against unpadded fp64; atol: the compared sums' own resolution
    assert_close(got, ref64, same32, atol=ulps32(ref64, 4), name="answer log-prob")


def test_kind_means_by_hand():
    rows = [Probe([], [], "premature", 0), Probe([], [], "premature", 0), Probe([], [], "premature", 1),
            Probe([], [], "contradicting", 1), Probe([], [], "contradicting_own", 1),
            Probe([], [], "supported", 0), Probe([], [], "hinted", 0), Probe([], [], "plain", 0),
            Probe([], [], "hinted", 1), Probe([], [], "plain", 1)]
    out = kind_means(rows, [-1.0, -3.0, -4.0, -2.5, -0.5, -0.25, -0.5, -2.0, -1.0, -1.5])
    # each problem's probes averaged first: premature = mean(mean(-1, -3), -4) = -3
    assert out == {"premature": -3.0, "premature_problems": 2, "contradicting": -2.5,
                   "contradicting_problems": 1, "contradicting_own": -0.5, "contradicting_own_problems": 1,
                   "supported": -0.25, "supported_problems": 1, "preference": -2.0, "hinted": -0.75,
                   "hinted_problems": 2, "plain": -1.75, "plain_problems": 2, "hint_gain": 1.0}


TINY = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "4",
        "--micro-batch-size", "8", "--mini-batch-prompts", "2", "--sft-steps", "10", "--sft-batch-size", "16",
        "--eval-every", "2", "--eval-size", "8", "--save-every", "0", "--credit-every", "0"]


def test_leakage_end_to_end(tmp_path, capsys):
    out = tmp_path / "c"
    assert compare.main(["--out", str(out), "--seeds", "1", "--algos", "cepo,opsd", "--keep-models",
                         *TINY]) == 0
    capsys.readouterr()
    assert leakage.main(["--out", str(out), "--seeds", "1", "--algos", "cepo,opsd"]) == 0
    data = json.loads((out / "leakage.json").read_text())
    seed = data["per_seed"]["0"]
    runs = seed["runs"]
    assert set(runs) == {"cepo", "opsd"}
    # one rebuilt initial policy for both runs; its held-out accuracy is the runs' recorded one
    assert runs["cepo"]["initial"] == runs["opsd"]["initial"]
    summary = json.loads((out / "runs" / "cepo-seed0" / "summary.json").read_text())
    assert seed["eval_accuracy_start"] == summary["eval_accuracy_start"]
    assert runs["cepo"]["hint_gain_initial"] == runs["cepo"]["initial"]["hint_gain"]
    for r in runs.values():
        for kind in ("contradicting", "supported"):
            if f"rise_{kind}" in r:
                assert r[f"rise_{kind}"] == r["final"][kind] - r["initial"][kind]
    diff = data["paired_vs_cepo"]["opsd"]["final_boxed_share"]["per_seed"]["0"]
    assert diff == runs["opsd"]["final_boxed_share"] - runs["cepo"]["final_boxed_share"]
    assert "| opsd | 1 |" in (out / "leakage.md").read_text()
    # a measured seed is kept in leakage/seed0.json: its models may go, the report is the same
    for algo in ("cepo", "opsd"):
        shutil.rmtree(out / "runs" / f"{algo}-seed0" / "final_model")
    assert leakage.main(["--out", str(out), "--seeds", "1", "--algos", "cepo,opsd"]) == 0
    assert json.loads((out / "leakage.json").read_text())["per_seed"] == data["per_seed"]


def test_leakage_bad_input(tmp_path, capsys):
    assert leakage.main(["--out", str(tmp_path)]) == 2
    assert leakage.main(["--out", str(tmp_path), "--algos", "cepo,ppo"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("leakage: --out: expected a cepo-compare directory")
    assert err[1].startswith("leakage: algos:")
    run = tmp_path / "runs" / "cepo-seed0"  # a finished run whose model was not kept
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"sft_steps": 2, "eval_size": 4}))
    (run / "summary.json").write_text("{}")
    assert leakage.main(["--out", str(tmp_path), "--seeds", "1", "--algos", "cepo"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"leakage: {run}: no final_model/model.safetensors (run cepo-compare with --keep-models)")
