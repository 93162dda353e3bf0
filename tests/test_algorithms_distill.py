"""opsd and sdpo (step.distill, rl.distill): the teacher contexts, the loss against cepo_ref, the masks, and
short cepo-train runs on the embedded task."""

import copy
import json
import math

import pytest
import torch
from helpers import assert_close

import cepo_ref
from cepo_kernels.analysis import compare
from cepo_kernels.rl.cli import main
from cepo_kernels.rl.config import TrainConfig
from cepo_kernels.rl.distill import DistillUpdate
from cepo_kernels.rl.model import apply_lora
from cepo_kernels.rl.task import build_tiny_model, build_tokenizer
from cepo_kernels.rl.trainer import Trainer
from cepo_kernels.rl.update import ppo_update
from cepo_kernels.step import ALGORITHMS, CEPOOptions, RolloutBatch, encode, render_prompt, teacher_prefix
from cepo_kernels.step.contexts import response_targets
from cepo_kernels.step.distill import Teacher, distill_contexts, successful_peer
from cepo_kernels.step.distill_templates import OPSD_TEMPLATE, SDPO_TEMPLATE
from cepo_kernels.step.forward import context_hidden, lm_head

TINY = dict(steps=2, prompts_per_step=2, group_size=4, max_new_tokens=6, micro_batch_size=8,
            mini_batch_prompts=1, sft_steps=150, sft_batch_size=32, eval_every=2, eval_size=8, progress=False,
            lr=3e-4, save_every=0)
G = 4
REWARDS = [1.0, 0.0, 1.0, 0.0,  # two successes: each success's peer is the other one
           1.0, 0.0, 0.0, 0.0,  # one success: it has no successful peer, the others do
           0.0, 0.0, 0.0, 0.0]  # none: no loss


def _batch(tok, responses=None):
    n = len(REWARDS)
    questions = [f"{g}+{g}=?" for g in range(n // G) for _ in range(G)]
    prompts = [encode(tok, render_prompt(tok, q)) for q in questions]
    responses = responses or [encode(tok, f"{i % 10}{i % 7}") for i in range(n)]
    _, mask = response_targets(responses, max(map(len, responses)), tok.pad_token_id, "cpu")
    texts = [f"answer {i}" for i in range(n)]  # distinct, so the chosen text names its row
    return RolloutBatch(prompts, responses, torch.zeros(n), mask, G, texts=texts, rewards=list(REWARDS),
                        references=[str(2 * (i // G)) for i in range(n)], questions=questions)


def test_table_entries():
    assert set(ALGORITHMS) >= {"cepo", "rlsd", "grpo", "opsd", "sdpo"}
    assert [ALGORITHMS[a].context for a in ("opsd", "sdpo")] == ["reference", "peer"]
    assert all(ALGORITHMS[a].distills and not ALGORITHMS[a].weighted for a in ("opsd", "sdpo"))
    assert not any(ALGORITHMS[a].distills for a in ("cepo", "rlsd", "grpo"))
    assert CEPOOptions(algo="opsd").lam(0) == 0.0  # no reweight teachers
    with pytest.raises(ValueError, match="distillation_weight"):
        CEPOOptions(algo="sdpo", distillation_weight=1.5)
    with pytest.raises(ValueError, match="distill_teacher: expected one of"):
        TrainConfig(algo="opsd", distill_teacher="frozen")
    with pytest.raises(ValueError, match="distill_ema_rate"):
        TrainConfig(algo="sdpo", distill_ema_rate=0.0)


def test_sdpo_context_is_a_successful_peer_never_the_sample():
    tok = build_tokenizer()
    batch = _batch(tok)
    ctx = distill_contexts(batch, CEPOOptions(algo="sdpo"), tok)
    assert ctx.rows == [0, 1, 2, 3, 5, 6, 7]  # row 4 is its group's only success; group 3 has none
    expected_peer = {0: 2, 1: 0, 2: 0, 3: 0, 5: 4, 6: 4, 7: 4}
    for row, prefix in zip(ctx.rows, ctx.prefixes, strict=True):
        peer = expected_peer[row]
        assert peer != row and REWARDS[peer] >= 0.5
        assert successful_peer(REWARDS, batch.groups[row // G], row) == peer
        assert prefix == teacher_prefix(tok, batch.questions[row], batch.prompt_ids[row], batch.texts[peer],
                                        SDPO_TEMPLATE)
        assert prefix != teacher_prefix(tok, batch.questions[row], batch.prompt_ids[row], batch.texts[row],
                                        SDPO_TEMPLATE)
    opsd = distill_contexts(batch, CEPOOptions(algo="opsd"), tok)
    assert opsd.rows == list(range(len(REWARDS)))
    assert opsd.prefixes[5] == teacher_prefix(tok, batch.questions[5], batch.prompt_ids[5],
                                              batch.references[5], OPSD_TEMPLATE)


def _setup(algo, seed=0):
    torch.manual_seed(seed)
    tok = build_tokenizer()
    model = build_tiny_model(tok, seed=seed)
    batch = _batch(tok)
    opts = CEPOOptions(algo=algo)

    def forward(contexts, responses, m=None):
        return context_hidden(m or model, contexts, responses, pad_id=tok.pad_token_id, device="cpu",
                              share=False)

    return tok, model, batch, opts, forward


@pytest.mark.parametrize("algo,topk", [("opsd", 0), ("sdpo", 100), ("sdpo", 8)])
def test_loss_matches_cepo_ref_and_rows_without_a_peer_get_nothing(algo, topk):
    tok, model, batch, opts, forward = _setup(algo)
    opts = CEPOOptions(algo=algo, sdpo_topk=topk)
    ctx = distill_contexts(batch, opts, tok)
    upd = DistillUpdate(ctx, opts, Teacher(model, opts), forward, batch.n_rows, "cpu")
    rows = list(range(batch.n_rows))
    h = forward(batch.prompt_ids, batch.responses)[0].detach().requires_grad_(True)
    R = h.shape[1]
    targets, m = response_targets(batch.responses, R, tok.pad_token_id, "cpu")
    weight, bias = lm_head(model)
    weight = weight.detach()
    logp = torch.log_softmax(h.detach() @ weight.T, -1).gather(-1, targets[..., None])[..., 0]
    old_logp = logp - torch.linspace(-1.0, 1.0, R)[None]  # importance weights on both sides of the clip 2
    num = upd.num_tokens(m, 0, batch.n_rows)
    loss = upd.loss(rows, h, weight, None, targets, m, old_logp, num, 1.0, batch.responses)
    loss.backward()
    with torch.no_grad():
        th = torch.zeros_like(h)
        th[ctx.rows] = forward(ctx.prefixes, [batch.responses[r] for r in ctx.rows])[0]
    dm = m.clone()
    dm[[r for r in rows if r not in ctx.rows]] = False
    kw = dict(beta=0.5, num_tokens=int(dm.sum()))
    if algo == "sdpo":  # V = 56 < 100: the full JSD (what a top-k >= V is)
        kw.update(targets=targets, old_logp=old_logp, is_clip=2.0)
        if topk < weight.shape[0]:
            kw.update(topk=topk, topk_from="student", add_tail=True)
    refs = {}
    for dt in (torch.float64, torch.float32):
        hh = h.detach().to(dt).requires_grad_(True)
        out = cepo_ref.linear_divergence_loss(hh, th.to(dt), weight.to(dt), dm, **kw)
        out.loss.backward()
        refs[dt] = (out.loss, hh.grad)
    assert_close(loss, refs[torch.float64][0], refs[torch.float32][0], name="loss")
    assert_close(h.grad, refs[torch.float64][1], refs[torch.float32][1], name="d hidden")
    assert float(loss.detach()) > 0
    missing = [r for r in rows if r not in ctx.rows]
    assert (algo == "sdpo") == bool(missing)
    assert torch.equal(h.grad[missing], torch.zeros_like(h.grad[missing]))
    met = upd.metrics()
    assert met["teacher_rows"] == len(ctx.rows) and met["distill_tokens"] == int(dm.sum())
    pairs = zip(ctx.prefixes, ctx.rows, strict=True)  # the teacher ran on the rows with a loss only
    assert met["teacher_tokens"] == sum(len(p) + len(batch.responses[r]) for p, r in pairs)
    top = {k: kw[k] for k in ("topk", "topk_from", "add_tail") if k in kw}
    plain = [cepo_ref.linear_divergence_loss(h.detach().to(dt), th.to(dt), weight.to(dt), dm, beta=0.5,
                                             **top).loss
             for dt in (torch.float64, torch.float32)]  # D before SDPO's weight
    assert_close(torch.tensor(met["divergence_mean"]), *plain, name="divergence_mean")


@pytest.mark.parametrize("mode", ["initial", "ema"])
def test_teacher_copy_scores_with_its_own_head(mode):
    """A teacher copy (initial without LoRA, ema) reads its hidden states through its own lm_head, not the
    policy's: after the policy's head moves, the loss is the divergence with the copy's head."""
    tok, model, batch, _, forward = _setup("opsd")
    opts = CEPOOptions(algo="opsd", distill_teacher=mode)
    teacher = Teacher(model, opts)
    with torch.no_grad():  # the policy's head moves after the copy was made (a step of full fine-tuning)
        lm_head(model)[0].add_(0.5 * torch.randn_like(lm_head(model)[0]))
    ctx = distill_contexts(batch, opts, tok)
    upd = DistillUpdate(ctx, opts, teacher, forward, batch.n_rows, "cpu")
    h = forward(batch.prompt_ids, batch.responses)[0].detach()
    targets, m = response_targets(batch.responses, h.shape[1], tok.pad_token_id, "cpu")
    weight = lm_head(model)[0].detach()
    loss = upd.loss(list(range(batch.n_rows)), h, weight, None, targets, m, None,
                    upd.num_tokens(m, 0, batch.n_rows), 1.0, batch.responses)
    with torch.no_grad():
        th = forward(ctx.prefixes, batch.responses, teacher.copy)[0]
    t_weight = lm_head(teacher.copy)[0]
    assert not torch.equal(t_weight, weight)
    refs = [cepo_ref.linear_divergence_loss(h.to(dt), th.to(dt), weight.to(dt), m, beta=0.5,
                                            teacher_weight=t_weight.to(dt)).loss
            for dt in (torch.float64, torch.float32)]
    assert_close(loss, *refs, name="loss with the copy's head")
    wrong = cepo_ref.linear_divergence_loss(h.double(), th.double(), weight.double(), m, beta=0.5).loss
    assert abs(float(wrong) - float(refs[0])) > 100 * abs(float(loss) - float(refs[0]))


class _Recorder(torch.optim.SGD):
    """lr 0: records the gradient each step sees, changes nothing."""

    def __init__(self, params):
        self.params = list(params)
        super().__init__(self.params, lr=0.0)
        self.grads = []

    def step(self, closure=None):
        self.grads.append([p.grad.clone() for p in self.params])


def test_opsd_gradient_is_the_divergence_gradient_only():
    tok, model, batch, opts, forward = _setup("opsd")
    cfg = TrainConfig(algo="opsd", prompts_per_step=3, group_size=G, mini_batch_prompts=0, max_grad_norm=0.0)
    ctx = distill_contexts(batch, opts, tok)
    n, R = batch.mask.shape
    old = torch.zeros(n, R)
    grads = []
    for adv in (torch.zeros(n), torch.randn(n, generator=torch.Generator().manual_seed(1)) * 3):
        rec = _Recorder(model.parameters())
        upd = DistillUpdate(ctx, opts, Teacher(model, opts), forward, n, "cpu")
        ppo_update(model, rec, forward, cfg, pad_id=tok.pad_token_id, prompts=batch.prompt_ids,
                   responses=batch.responses, mask=batch.mask, adv=adv, old_logp=old, pos_logp=old,
                   neg_logp=old, lam=0.5, distill=upd)
        grads.append(rec.grads[0])
    for a, b in zip(*grads, strict=True):  # the advantages do not enter: no policy-gradient term
        assert torch.equal(a, b)
    refs = {}
    for dt in (torch.float64, torch.float32):
        m2 = copy.deepcopy(model).to(dt)
        kw = dict(pad_id=tok.pad_token_id, device="cpu", share=False)
        h, _, _ = context_hidden(m2, batch.prompt_ids, batch.responses, **kw)
        with torch.no_grad():
            th, _, _ = context_hidden(m2, ctx.prefixes, batch.responses, **kw)
        w, _ = lm_head(m2)
        cepo_ref.linear_divergence_loss(h, th, w, batch.mask, beta=0.5).loss.backward()
        refs[dt] = [p.grad for p in m2.parameters()]
    assert any(bool(g.abs().max() > 0) for g in grads[0])
    for g, r64, r32 in zip(grads[0], refs[torch.float64], refs[torch.float32], strict=True):
        assert_close(g, r64, r32, name="parameter gradient")


def _check_run(out_dir, algo):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["skipped"] is False
        assert r["lambda"] == 0.0 and r["teacher_rows"] <= 8
        if r["teacher_rows"]:
            assert r["divergence_mean"] >= 0 and r["teacher_tokens"] > 0 and r["distill_tokens"] > 0
            assert 0 < r["is_weight_mean"] <= 2.0 and 0 <= r["is_clip_frac"] <= 1
        else:  # sdpo without a successful peer anywhere: no loss, no teacher pass
            assert algo == "sdpo" and r["loss"] == 0.0 and r["teacher_tokens"] == 0
    if algo == "opsd":
        assert all(r["teacher_rows"] == 8 for r in rows)  # every row with a token
        assert all(r["is_weight_mean"] == 1.0 for r in rows)
    return rows


def test_cepo_train_opsd(tmp_path):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "progress"]
    assert main(["--algo", "opsd", "--no-progress", "--out-dir", str(tmp_path / "opsd"), *flags]) == 0
    _check_run(tmp_path / "opsd", "opsd")


def test_cepo_train_sdpo_blend(tmp_path):
    Trainer(TrainConfig(**TINY, algo="sdpo", distillation_weight=0.5, distill_teacher="ema",
                        out_dir=str(tmp_path / "sdpo"))).train()
    rows = _check_run(tmp_path / "sdpo", "sdpo")
    assert any(r["teacher_rows"] for r in rows)  # the warm-up makes some groups partly right
    assert all(r["clip_frac"] is not None for r in rows)  # the blend runs the GRPO loss too


def test_compare_takes_the_table():
    assert compare.parse_algos("cepo,grpo,rlsd,opsd,sdpo") == ["cepo", "grpo", "rlsd", "opsd", "sdpo"]
    for bad in ("cepo,ppo", "", "opsd,opsd"):
        with pytest.raises(ValueError, match="algos: expected a comma-separated subset of"):
            compare.parse_algos(bad)
    assert "sdpo" in compare.build_parser().format_help()


def test_compare_runs_opsd_and_sdpo(tmp_path, capsys):
    flags = ["--steps", "1", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "4",
             "--micro-batch-size", "8", "--sft-steps", "10", "--sft-batch-size", "16", "--eval-every", "1",
             "--eval-size", "4", "--save-every", "0"]
    assert compare.main(["--out", str(tmp_path), "--seeds", "1", "--algos", "opsd,sdpo", "--last", "1",
                         *flags]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["algos"] == ["opsd", "sdpo"]
    table = (tmp_path / "table.md").read_text()
    assert "| opsd | 1 |" in table and "| sdpo | 1 |" in table
    assert compare.main(["--out", str(tmp_path), "--algos", "opsd,grpo2"]) == 2
    assert "algos: expected" in capsys.readouterr().err


def test_teacher_weights():
    tok, model, batch, _, forward = _setup("sdpo")
    before = [p.detach().clone() for p in model.parameters()]
    live = Teacher(model, CEPOOptions(algo="sdpo"))
    initial = Teacher(model, CEPOOptions(algo="sdpo", distill_teacher="initial"))  # no LoRA: a frozen copy
    ema = Teacher(model, CEPOOptions(algo="sdpo", distill_teacher="ema", distill_ema_rate=0.25))
    assert live.model_and_context()[0] is model and initial.copy is not None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for t in (live, initial, ema):
        t.after_step()
    for b, p, i, e in zip(before, model.parameters(), initial.copy.parameters(), ema.copy.parameters(),
                          strict=True):
        assert torch.equal(i, b) and not i.requires_grad
        torch.testing.assert_close(e, b + 0.25 * (p.detach() - b), rtol=0, atol=4 * torch.finfo(b.dtype).eps
                                   * float(b.abs().max() + 1))


def test_initial_teacher_disables_lora():
    tok, model, batch, _, forward = _setup("opsd")
    plain = forward(batch.prompt_ids[:2], batch.responses[:2])[0].detach()
    lora = apply_lora(model, TrainConfig(lora_rank=4))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
    teacher = Teacher(lora, CEPOOptions(algo="opsd", distill_teacher="initial"))
    assert teacher.copy is None
    m, context = teacher.model_and_context()
    with torch.no_grad(), context:
        off = forward(batch.prompt_ids[:2], batch.responses[:2], m)[0]
    with torch.no_grad():
        on = forward(batch.prompt_ids[:2], batch.responses[:2], lora)[0]
    assert torch.equal(off, plain) and not torch.allclose(on, plain)


def test_teacher_copy_is_checkpointed_and_resumed(tmp_path):
    cfg = TrainConfig(**{**TINY, "sft_steps": 10, "eval_every": 0, "save_every": 1}, algo="opsd",
                      distill_teacher="ema", distill_ema_rate=0.5, out_dir=str(tmp_path / "run"))
    Trainer(cfg).train()
    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    saved = torch.load(ckpt / "distill_teacher.pt", weights_only=True)
    policy = torch.load(ckpt / "model_state.pt", weights_only=True)
    assert any(not torch.equal(saved[k], policy[k]) for k in saved)  # the EMA lags the policy
    resumed = Trainer(TrainConfig(**{**TINY, "sft_steps": 10, "eval_every": 0}, algo="opsd",
                                  distill_teacher="ema", resume=str(ckpt)))
    try:
        teacher = resumed.distill_teacher()
        for k, v in teacher.copy.state_dict().items():
            assert torch.equal(v, saved[k]), k
    finally:
        resumed.close()
