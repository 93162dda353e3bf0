"""The authors' options beside this package's defaults: their r- choice (mode="official"), their
chain-of-thought teacher (cot_answers), their filter of overlong prompts (filter_long_prompts)."""

import pytest

from cepo_kernels.rl.config import TrainConfig
from cepo_kernels.rl.task import Problem, drop_long_prompts
from cepo_kernels.rl.trainer import Trainer
from cepo_kernels.step.contexts import cot_answers, teacher_contexts, teacher_prefix
from cepo_kernels.step.negatives import Negative, choose_negatives, official_negative

B = "\\boxed{"


@pytest.mark.parametrize("texts,rewards,expected", [
    ([B + "3}", B + "4}", B + "5}"], [1.0, 0.0, 0.0], Negative("4", 1, "answer")),  # the first lowest
    ([B + "3}", B + "4}", B + "5}"], [1.0, 0.1, 0.0], Negative("5", 2, "answer")),
    ([B + "3}", "x " + B + "4", B + "5}"], [1.0, 0.0, 0.0], Negative("None", 1, "fallback")),  # truncated
    ([B + "3}", "no box", B + "5}"], [1.0, 0.0, 0.0], Negative("None", 1, "fallback")),
    ([B + "3}", B + "} tail", B + "5}"], [1.0, 0.0, 0.0], Negative(B + "} tail", 1, "fallback")),  # empty box
    ([B + "3}", B + " {1}/2 }", "x"], [1.0, 0.0, 0.0], Negative("{1}/2", 1, "answer")),  # nested braces
    ([B + "3}", B + "3}"], [1.0, 1.0], Negative("7", None, "all-correct")),
])
def test_official_negative_by_hand(texts, rewards, expected):
    assert official_negative(texts, rewards, "7") == expected


def test_choose_negatives_modes_differ_on_a_truncated_box():
    texts = [B + "3}", "x " + B + "4", B + "5}", B + "6}"]
    rewards = [1.0, 0.0, 0.0, 1.0]
    ours = choose_negatives(texts, rewards, ["3", "6"], 2)
    theirs = choose_negatives(texts, rewards, ["3", "6"], 2, mode="official")
    assert ours == [Negative("x \\boxed{4", 1, "fallback"), Negative("5", 0, "answer")]
    assert theirs == [Negative("None", 1, "fallback"), Negative("5", 0, "answer")]
    with pytest.raises(ValueError, match="mode: expected one of"):
        choose_negatives(texts, rewards, ["3", "6"], 2, mode="paper")


def test_cot_answers_by_hand():
    responses = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12], [13, 14, 15]]
    rewards = [0.0, 1.0, 1.0, 0.0, 0.0, 0.0]  # group 0: one correct; group 1: none correct
    negatives = [Negative("x", 0, "answer"), Negative("y", 1, "answer")]
    pos, neg = cot_answers(responses, rewards, negatives, ["r0", "r1"], 3, k=2)
    assert pos == [[4, 5]] * 3 + ["r1"] * 3  # best correct: the first of the tied (row 1); else r+ text
    assert neg == [[1, 2]] * 3 + [[11, 12]] * 3
    pos, neg = cot_answers(responses, rewards, negatives, ["r0", "r1"], 3, k=2, suffix=True)
    assert pos[0] == [4, 5] and neg[0] == [2, 3] and neg[3] == [11, 12]
    all_right = [Negative("r0", None, "all-correct")]
    pos, neg = cot_answers(responses[:3], [1.0, 1.0, 1.0], all_right, ["r0"], 3, k=1)
    assert pos == neg == [[1]] * 3
    with pytest.raises(ValueError, match="cot_prefix_len: expected a positive"):
        cot_answers(responses, rewards, negatives, ["r0", "r1"], 3, k=0)


class _Tok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_token_answers_follow_the_prompt_untemplated():
    assert teacher_prefix(_Tok(), "q", [1, 2], [7, 8], template=" {answer}") == [1, 2, 7, 8]
    assert teacher_prefix(_Tok(), "q", [1, 2], "ab", template=" {answer}") == [1, 2, 32, 97, 98]
    ctx = teacher_contexts(_Tok(), [0, 1], prompt_ids=[[1], [1]], pos_answers=[[5], [5]],
                           neg_answers=["z", "z"])
    assert ctx.pos_prefixes == [[1, 5], [1, 5]] and ctx.neg_prefixes == [[1, 32, 122]] * 2
    assert ctx.pos_prefixes[0] is ctx.pos_prefixes[1]  # one list per group, as for text answers


def test_drop_long_prompts():
    probs = [Problem("a" * n, "1") for n in (1, 5, 3)]
    n_tokens = lambda p: len(p.prompt)  # noqa: E731
    train, held = drop_long_prompts(probs, probs[:1], n_tokens, 3)
    assert [p.prompt for p in train] == ["a", "aaa"] and len(held) == 1
    with pytest.raises(ValueError, match="max_prompt_tokens: every data prompt is longer than 0 tokens"):
        drop_long_prompts(probs, [], n_tokens, 0)


TINY = dict(steps=1, prompts_per_step=6, group_size=4, max_new_tokens=6, micro_batch_size=24,
            mini_batch_prompts=3, sft_steps=60, sft_batch_size=32, eval_every=1, eval_size=8, progress=False,
            save_every=0, credit_every=1)


def test_trainer_runs_the_authors_options(tmp_path):
    cfg = TrainConfig(**TINY, out_dir=str(tmp_path / "run"), r_minus="official", cot_teacher=True,
                      cot_prefix_len=3, filter_long_prompts=True)
    tr = Trainer(cfg)
    try:
        rec = tr.step()
    finally:
        tr.close()
    assert rec["step"] == 1 and rec["teacher_rows"] > 0 and tr.cfg.cot_teacher
    with pytest.raises(ValueError, match="max_prompt_tokens: every data prompt is longer than 2 tokens"):
        Trainer(TrainConfig(**TINY, out_dir=str(tmp_path / "short"), max_prompt_tokens=2,
                            filter_long_prompts=True))
