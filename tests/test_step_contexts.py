"""The step's text phases on hand-written examples: rewards, r- choice and fallbacks, the rows that need
teachers, teacher contexts, packing."""

import pytest
import torch

from cepo_kernels.rl.task import build_tokenizer
from cepo_kernels.step import (
    Negative,
    choose_negatives,
    encode,
    group_advantages,
    negative_answer,
    pack,
    render_prompt,
    teacher_contexts,
    teacher_prefix,
    teacher_rows,
)
from cepo_kernels.step.negatives import fallback_answer
from cepo_kernels.step.rewards import (
    answers_match,
    boxed_reward,
    extract_boxed,
    normalize_answer,
    safe_rewards,
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_extract_boxed_last_and_nested():
    assert extract_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{{a}{b}}") == "{a}{b}"
    assert extract_boxed("no box here") is None
    assert extract_boxed("\\boxed{7} and a truncated \\boxed{12") == "7"  # an unclosed box is not an answer
    assert extract_boxed("\\boxed{") is None


def test_normalisation_and_match():
    assert normalize_answer(" $\\text{ 42 }$. ") == "42"
    assert answers_match("\\dfrac{1}{2}", "0.5")
    assert answers_match("1,000", "1000")
    assert answers_match("x + 1", "x+1")
    assert not answers_match("13", "12")
    assert not answers_match(None, "12")
    assert boxed_reward("so \\boxed{19}", "19") == 1.0
    assert boxed_reward("19", "19") == 0.0  # unboxed answers score 0


def test_safe_rewards_counts_failures():
    def flaky(text, ref):
        if text == "boom":
            raise RuntimeError("reward server down")
        if text == "nan":
            return float("nan")
        return 1.0

    rewards, errors = safe_rewards(flaky, ["ok", "boom", "nan", "ok"], ["1"] * 4)
    assert rewards == [1.0, 0.0, 0.0, 1.0]
    assert errors == 2


def test_negative_answer_takes_lowest_reward_rejected():
    texts = ["\\boxed{5}", "\\boxed{3}", "\\boxed{4}", "\\boxed{9}"]
    ans, idx, how = negative_answer(texts, [1.0, 0.2, 0.1, 0.4], reference="5")
    assert (ans, idx, how) == ("4", 2, "answer")


def test_negative_answer_prefers_an_extractable_answer_among_ties():
    texts = ["\\boxed{5}", "I do not know", "\\boxed{8}", "\\boxed{5}"]
    ans, idx, how = negative_answer(texts, [1.0, 0.0, 0.0, 1.0], reference="5")
    assert (ans, idx, how) == ("8", 2, "answer")


def test_negative_answer_fallback_is_never_none():
    texts = ["\\boxed{5}", "   the answer   is probably " + "x" * 80, "\\boxed{5}"]
    ans, idx, how = negative_answer(texts, [1.0, 0.0, 1.0], reference="5")
    assert how == "fallback" and idx == 1
    assert ans == ("the answer is probably " + "x" * 80)[:50]
    assert len(ans) == 50 and ans != "None"
    # an empty rejected response: the empty string, not "None"
    ans, _, how = negative_answer(["", "\\boxed{5}"], [0.0, 1.0], reference="5")
    assert (ans, how) == ("", "fallback")
    assert fallback_answer(None) == ""
    assert fallback_answer("") == ""


def test_negative_answer_all_correct_group_uses_reference():
    ans, idx, how = negative_answer(["\\boxed{5}"] * 3, [1.0, 1.0, 0.9], reference="5")
    assert (ans, idx, how) == ("5", None, "all-correct")


def test_teacher_prefix_default_inserts_answer_tokens(tok):
    prompt = encode(tok, render_prompt(tok, "2+3="))
    pos = teacher_prefix(tok, "2+3=", prompt, "5")
    assert pos == prompt + encode(tok, " 5")
    assert tok.decode(pos) == "<|user|>2+3=<|assistant|> 5"
    custom = teacher_prefix(tok, "2+3=", prompt, "5", template="{question} answer 5 is {answer}")
    assert tok.decode(custom) == "<|user|>2+3= answer 5 is 5<|assistant|>"


def test_phases_skip_zero_advantage_rows_and_pair_contexts(tok):
    questions = ["2+3=", "4+4=", "1+1="]
    prompts = [encode(tok, render_prompt(tok, q)) for q in questions]
    refs = ["5", "8", "2"]
    texts = [
        "\\boxed{5}", "\\boxed{6}", "\\boxed{5}", "\\boxed{7}",  # mixed group: r- = 6 (first of the ties)
        "\\boxed{8}", "\\boxed{8}", "\\boxed{8}", "\\boxed{8}",  # all correct: A = 0, skipped
        "\\boxed{3}", "oops", "\\boxed{1}", "\\boxed{1}",  # all wrong: A = 0, skipped
    ]
    rewards = [1.0, 0.0, 1.0, 0.0] + [1.0] * 4 + [0.0] * 4
    adv = group_advantages(rewards, 4)
    assert adv.tolist()[:4] == pytest.approx([0.866, -0.866, 0.866, -0.866], abs=1e-3)
    assert adv.tolist()[4:] == [0.0] * 8
    negatives = choose_negatives(texts, rewards, refs, 4)
    assert negatives == [Negative("6", 1, "answer"), Negative("8", None, "all-correct"),
                         Negative("3", 0, "answer")]
    rows = teacher_rows(adv)
    assert rows == [0, 1, 2, 3]
    mask = torch.ones(12, 3, dtype=torch.bool)
    mask[2] = False  # a row without a valid token needs no teacher either
    assert teacher_rows(adv, mask) == [0, 1, 3]
    per_row = lambda xs: [x for x in xs for _ in range(4)]  # noqa: E731
    ctx = teacher_contexts(tok, rows, prompt_ids=per_row(prompts), pos_answers=per_row(refs),
                           neg_answers=per_row([n.answer for n in negatives]))
    assert ctx.rows == rows
    assert all(tok.decode(p) == "<|user|>2+3=<|assistant|> 5" for p in ctx.pos_prefixes)
    assert all(tok.decode(p) == "<|user|>2+3=<|assistant|> 6" for p in ctx.neg_prefixes)
    assert ctx.pos_prefixes[0] is ctx.pos_prefixes[3]  # one token list per group
    with pytest.raises(ValueError, match="texts, rewards"):
        choose_negatives(texts[:-1], rewards[:-1], refs, 4)
    with pytest.raises(ValueError, match="group_size"):
        choose_negatives(texts, rewards, refs, 0)


def test_pack_aligns_responses_and_renumbers_positions():
    packed = pack([[7, 8, 9], [5]], [[1, 2], [3, 4, 6]], pad_id=0)
    assert packed.start == 3
    assert packed.input_ids.tolist() == [[7, 8, 9, 1, 2, 0], [0, 0, 5, 3, 4, 6]]
    assert packed.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert packed.targets.tolist() == [[1, 2, 0], [3, 4, 6]]
    assert packed.mask.tolist() == [[True, True, False], [True, True, True]]
    # a teacher packing of the same responses with longer prefixes keeps the response columns' content
    teacher = pack([[7, 8, 9, 11, 12], [5, 11]], [[1, 2], [3, 4, 6]], pad_id=0, resp_len=3)
    assert torch.equal(teacher.targets, packed.targets) and torch.equal(teacher.mask, packed.mask)
    assert teacher.position_ids[1].tolist() == [0, 0, 0, 0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="prefixes"):
        pack([[]], [[1]], pad_id=0)
