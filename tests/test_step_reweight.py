"""The rollout batch, the reweight phase, the CEPO options and the algorithm table (cepo_kernels.step),
each against hand-computed values or the reference."""

import dataclasses

import pytest
import torch

import cepo_ref
from cepo_kernels.rl.task import build_tokenizer
from cepo_kernels.step import (
    ALGORITHMS,
    Algorithm,
    CEPOOptions,
    RolloutBatch,
    delta_metrics,
    encode,
    register_algorithm,
    reweight,
)

G = 3
TEXTS = ["\\boxed{5}", "\\boxed{4}", "\\boxed{7}",  # group 0: r+ 5; 4 and 7 rejected, tied: 4 is r-
         "\\boxed{2}", "\\boxed{2}", "\\boxed{2}"]  # group 1: all correct, A = 0, r- = r+
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
REFS = ["5"] * G + ["2"] * G


def _batch(old=True, **kw):
    g = torch.Generator().manual_seed(0)
    responses = [[7, 8, 9], [7, 8], [7, 8, 9], [7], [7, 8], [7, 8, 9]]
    mask = torch.tensor([[len(r) > t for t in range(3)] for r in responses])
    adv = cepo_ref.group_advantages(torch.tensor(REWARDS), G)
    old_logp = -torch.rand(6, 3, generator=g) * 3 if old else None
    prompts = [[1, 2]] * G + [[3, 4]] * G
    return RolloutBatch(prompts, responses, adv, mask, G, texts=TEXTS, rewards=REWARDS, references=REFS,
                        old_logp=old_logp, **kw)


class Scorer:
    """Fixed teacher log-probs per row (pos, neg [6, 3]); records what it was asked."""

    def __init__(self, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.pos, self.neg = -torch.rand(6, 3, generator=g) * 3, -torch.rand(6, 3, generator=g) * 3
        self.calls = []

    def __call__(self, ctx, teachers):
        self.calls.append((list(ctx.rows), tuple(teachers), ctx))
        return {name: getattr(self, name)[ctx.rows] for name in teachers}


def test_cepo_reweight_by_hand():
    tok, batch, scorer = build_tokenizer(), _batch(), Scorer()
    opts = CEPOOptions(lam0=0.5, t_warm=10, eps_w=0.2)
    out = reweight(batch, scorer, opts, 2, tokenizer=tok)
    lam = 0.5 * (1 - 2 / 10)
    assert out.lam == pytest.approx(lam) and out.scored and out.rows == [0, 1, 2]
    negatives = [(n.answer, n.index, n.how) for n in out.negatives]
    assert negatives == [("4", 1, "answer"), ("2", None, "all-correct")]
    (rows, teachers, ctx), = scorer.calls
    assert rows == [0, 1, 2] and teachers == ("pos", "neg")
    assert ctx.pos_prefixes[0] == [1, 2] + encode(tok, " 5")
    assert ctx.neg_prefixes[0] == [1, 2] + encode(tok, " 4")
    pos, neg = batch.old_logp.clone(), batch.old_logp.clone()  # rows without teachers keep the old ones
    pos[:3], neg[:3] = scorer.pos[:3], scorer.neg[:3]
    assert torch.equal(out.pos_logp, pos) and torch.equal(out.neg_logp, neg)
    ref = cepo_ref.cepo_advantages(batch.advantages.double(), pos.double(), neg.double(), batch.mask, lam=lam,
                                   eps_w=0.2)
    torch.testing.assert_close(out.a_hat.double(), ref, rtol=0, atol=4 * torch.finfo(torch.float32).eps)
    w = torch.exp(torch.sign(batch.advantages)[:, None] * (pos - neg)).clamp(0.8, 1.2)
    w = torch.where(batch.mask & (batch.advantages != 0)[:, None], w, torch.ones_like(w))
    torch.testing.assert_close(out.weights, w, rtol=2 * torch.finfo(torch.float32).eps, atol=0)
    assert out.delta_metrics == delta_metrics(pos - neg, batch.advantages, batch.mask)
    # teacher contexts run in full, whatever lambda: 3 rows x 2 teachers x (context + response)
    prefixes = ctx.pos_prefixes + ctx.neg_prefixes
    plain = sum(len(p) + len(batch.responses[r]) for p, r in zip(prefixes, rows * 2, strict=True))
    assert out.teacher_tokens_plain(batch.responses) == plain


def test_lambda_zero_runs_no_teacher_and_a_hat_is_a():
    scorer = Scorer()
    out = reweight(_batch(), scorer, CEPOOptions(lam0=0.5, t_warm=2), 2, tokenizer=build_tokenizer())
    assert out.lam == 0.0 and not out.scored and scorer.calls == []
    assert out.negatives is not None and out.rows == [0, 1, 2]  # r- is still chosen (diagnostics read it)
    b = _batch()
    assert torch.equal(out.a_hat, b.advantages[:, None] * b.mask)
    assert all(v == 0.0 for v in out.delta_metrics.values())


def test_rlsd_scores_the_positive_teacher_against_the_old_log_probs_and_grpo_none():
    batch, scorer = _batch(), Scorer()
    opts = CEPOOptions(algo="rlsd", lam0=1.0, t_warm=4)
    out = reweight(batch, scorer, opts, 0, tokenizer=build_tokenizer())
    assert [c[1] for c in scorer.calls] == [("pos",)]
    assert torch.equal(out.neg_logp, batch.old_logp) and torch.equal(out.pos_logp[:3], scorer.pos[:3])
    with pytest.raises(ValueError, match="old_logp: rlsd needs"):
        reweight(_batch(old=False), scorer, CEPOOptions(algo="rlsd"), 0, tokenizer=build_tokenizer())
    out = reweight(_batch(), scorer, CEPOOptions(algo="grpo", lam0=1.0), 0, tokenizer=build_tokenizer())
    assert out.lam == 0.0 and out.negatives is None and out.rows == [] and len(scorer.calls) == 1


def test_a_new_algorithm_is_one_entry():
    entry = Algorithm("posonly", ("pos",), "old", "test entry")
    register_algorithm(entry)
    try:
        scorer = Scorer()
        opts = CEPOOptions(algo="posonly", lam0=1.0)
        out = reweight(_batch(), scorer, opts, 0, tokenizer=build_tokenizer())
        assert scorer.calls[0][1] == ("pos",) and out.algorithm is entry
        with pytest.raises(ValueError, match="registered already"):
            register_algorithm(dataclasses.replace(entry, teachers=("pos", "neg"), baseline="neg"))
    finally:
        del ALGORITHMS["posonly"]
    with pytest.raises(ValueError, match="baseline: expected 'neg'"):
        Algorithm("bad", ("pos", "neg"), "old")
    with pytest.raises(ValueError, match="algo: expected one of"):
        CEPOOptions(algo="posonly")


def test_rows_of_one_process_and_groups_in_any_order():
    """Process 1 of 2 holds rows 3..5 of the whole batch; groups listed explicitly (verl's uid order)."""
    whole, scorer = _batch(), Scorer()
    part = RolloutBatch(whole.prompt_ids[3:], whole.responses[3:], whole.advantages[3:], whole.mask[3:], G,
                        texts=TEXTS, rewards=REWARDS, references=REFS, offset=3)
    assert [part.group_of(i) for i in range(3)] == [1, 1, 1]
    out = reweight(part, scorer, CEPOOptions(), 0, tokenizer=build_tokenizer())
    assert out.rows == [] and len(out.negatives) == 2  # r- of every group; no local row with A != 0
    order = [3, 0, 4, 1, 5, 2]
    mixed = RolloutBatch([whole.prompt_ids[i] for i in order], [whole.responses[i] for i in order],
                         whole.advantages[order], whole.mask[order], None, texts=[TEXTS[i] for i in order],
                         rewards=[REWARDS[i] for i in order], references=[REFS[i] for i in order],
                         groups=[[0, 2, 4], [1, 3, 5]])
    out = reweight(mixed, Scorer(), CEPOOptions(), 0, tokenizer=build_tokenizer())
    assert [n.answer for n in out.negatives] == ["2", "4"] and out.rows == [1, 3, 5]


def test_batch_checks_name_the_argument():
    b = _batch()
    with pytest.raises(ValueError, match="advantages: expected a tensor of shape"):
        RolloutBatch(b.prompt_ids, b.responses, b.advantages[:2], b.mask, G)
    with pytest.raises(ValueError, match="group_size: expected the whole batch"):
        RolloutBatch(b.prompt_ids, b.responses, b.advantages, b.mask, 4, texts=TEXTS, rewards=REWARDS,
                     references=REFS)
    with pytest.raises(ValueError, match="offset"):
        RolloutBatch(b.prompt_ids, b.responses, b.advantages, b.mask, G, texts=TEXTS, rewards=REWARDS,
                     references=REFS, offset=1)
    with pytest.raises(ValueError, match="step: expected the 0-based"):
        reweight(b, Scorer(), CEPOOptions(), -1, tokenizer=build_tokenizer())
    with pytest.raises(TypeError, match="options: expected a CEPOOptions"):
        reweight(b, Scorer(), {"lam0": 0.5}, 0, tokenizer=build_tokenizer())


@pytest.mark.parametrize("kw, error, match", [
    ({"lam0": 1.5}, ValueError, r"lam0: expected a value in \[0, 1\]"),
    ({"lam0": "0.5"}, TypeError, "lam0: expected a float"),
    ({"eps_w": 1.0}, ValueError, r"eps_w: expected a value in \[0, 1\)"),
    ({"t_warm": -1}, ValueError, "t_warm: expected an int >= 0"),
    ({"teacher_template": " {oops}"}, ValueError, r"teacher_template: unknown placeholder \{oops\}"),
    ({"teacher_template": " answer"}, ValueError, "teacher_template: expected a string containing"),
    ({"r_minus": "worst"}, ValueError, "r_minus: expected one of"),
    ({"cot_prefix_len": 0}, ValueError, "cot_prefix_len: expected a positive"),
])
def test_options_one_validator(kw, error, match):
    with pytest.raises(error, match=match):
        CEPOOptions(**kw)
    opts = CEPOOptions(teacher_template="\\boxed{x} {answer}")  # braces after a backslash are text
    assert opts.lam(0) == 0.5 and opts.lam(25) == 0.0 and CEPOOptions(algo="grpo").lam(0) == 0.0


def test_every_front_end_refuses_an_unknown_placeholder(tmp_path):
    """cepo-train, TRL's CEPOConfig and verl's settings refuse `{oops}` with the same message (one
    validator)."""
    from cepo_kernels.rl.config import TrainConfig

    match = r"teacher_template: unknown placeholder \{oops\} in ' \{oops\}'"
    with pytest.raises(ValueError, match=match):
        TrainConfig(teacher_template=" {oops}")
    try:
        from cepo_kernels.integrations.trl import CEPOConfig
    except ImportError:
        CEPOConfig = None
    if CEPOConfig is not None:
        with pytest.raises(ValueError, match=match):
            CEPOConfig(str(tmp_path), teacher_template=" {oops}", report_to="none", use_cpu=True, bf16=False)
    try:
        from cepo_kernels.integrations.verl import CEPOSettings
    except ImportError:
        CEPOSettings = None
    if CEPOSettings is not None:
        with pytest.raises(ValueError, match="algorithm.cepo." + match):
            CEPOSettings(teacher_template=" {oops}")
    if CEPOConfig is None and CEPOSettings is None:
        pytest.skip("neither trl nor verl is installed: only cepo-train's refusal was checked")
