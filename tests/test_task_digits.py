"""The digits task: worked solutions, noisy demonstrations, the first wrong step, the credit diagnostic."""

import random

import pytest
import torch

from cepo_kernels.rl.config import TrainConfig
from cepo_kernels.rl.task import (
    DIGITS_EVAL,
    DIGITS_MAX_TOKENS,
    SPECIALS,
    Problem,
    build_tokenizer,
    digit_steps,
    digits_problems,
    first_wrong_credit,
    first_wrong_span,
    first_wrong_tokens,
    load_problems,
    noisy_steps,
    sft_texts,
)
from cepo_kernels.step.rewards import answers_match, extract_boxed


def test_worked_solutions_by_hand():
    assert digit_steps(47, "+", 38) == ("7+8+0=15,", "4+3+1=08,", "\\boxed{85}")
    assert digit_steps(47, "+", 58) == ("7+8+0=15,", "4+5+1=10,", "\\boxed{105}")
    assert digit_steps(47, "-", 38) == ("7-8-0=19,", "4-3-1=00,", "\\boxed{9}")
    assert digit_steps(5, "-", 5) == ("5-5-0=00,", "0-0-0=00,", "\\boxed{0}")
    # a wrong carry at step 0 of 47+38: 7+8+1=16, and step 1 continues from the written carry
    assert digit_steps(47, "+", 38, (0, "carry", 1)) == ("7+8+1=16,", "4+3+1=08,", "\\boxed{86}")
    # a sum off by one at step 1 of 47-38: 4-3-1=0 written as -1 (borrow 1, digit 9)
    assert digit_steps(47, "-", 38, (1, "sum", -1)) == ("7-8-0=19,", "4-3-1=19,", "\\boxed{99}")


def test_every_solution_boxes_the_right_answer():
    for a in range(100):
        for b in range(100):
            for op in "+-":
                if op == "-" and a < b:
                    continue
                ref = str(a + b if op == "+" else a - b)
                assert answers_match(extract_boxed("".join(digit_steps(a, op, b))), ref)


def test_problems_held_out_and_tokenizer_covers_them():
    probs = digits_problems(3)
    assert len(probs) == len({p.prompt for p in probs}) == 2000 + DIGITS_EVAL
    assert probs == digits_problems(3) and probs != digits_problems(4)
    train, held = load_problems(TrainConfig(task="digits", max_new_tokens=DIGITS_MAX_TOKENS, seed=3))
    assert len(held) == DIGITS_EVAL >= 200 and not {p.prompt for p in train} & {p.prompt for p in held}
    tok = build_tokenizer()
    longest = 0
    for p in probs:
        for text in (p.prompt, "".join(p.solution)):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids and tok.decode(ids) == text
        longest = max(longest, len(tok("".join(p.solution), add_special_tokens=False)["input_ids"]))
    assert longest + 1 == DIGITS_MAX_TOKENS  # + eos


def test_digits_needs_room_for_the_solution():
    with pytest.raises(ValueError, match="max_new_tokens: .* expected >= 24 with task='digits', got 8"):
        TrainConfig(task="digits")
    with pytest.raises(ValueError, match="task: expected one of"):
        TrainConfig(task="words")


def test_noisy_demonstrations_go_wrong_at_one_step():
    rng = random.Random(0)
    seen_steps = set()
    for p in digits_problems(0)[:300]:
        wrong = noisy_steps(p, rng)
        assert wrong[-1] != p.solution[-1]
        k = next(i for i, (a, b) in enumerate(zip(wrong, p.solution, strict=True)) if a != b)
        seen_steps.add(k)
        text = "".join(wrong)
        start, end = first_wrong_span(p, text)
        assert text[start:end] == wrong[k]
    assert seen_steps == {0, 1}


def test_sft_texts_noise_fraction_and_shown_answer():
    tok = build_tokenizer()
    probs = digits_problems(0)[:400]
    demos = sft_texts(tok, probs, noise=0.3, seed=0)
    wrong = 0
    for p, (_, target, shown) in zip(probs, demos, strict=True):
        text = tok.decode(target, skip_special_tokens=True)
        assert target[-1] == tok.eos_token_id and extract_boxed(text) == shown
        wrong += shown != p.answer
    assert 0.25 < wrong / len(probs) < 0.35
    clean = sft_texts(tok, probs, noise=0.0)
    assert all(shown == p.answer for p, (_, _, shown) in zip(probs, clean, strict=True))


def test_first_wrong_span_on_any_response():
    p = Problem("47+38=", "85", digit_steps(47, "+", 38))
    assert first_wrong_span(p, "7+8+0=15,4+3+1=08,\\boxed{85}") is None
    assert first_wrong_span(p, "7+8+0=15,4+3+0=07,\\boxed{75}") == (9, 18)
    assert first_wrong_span(p, "7+8+0=15,4+3+1=08,\\boxed{84}") == (18, 28)
    assert first_wrong_span(p, "7+8+0=15,\\boxed{85}") == (9, 19)  # a skipped step: the box in its place
    assert first_wrong_span(p, "7+8+0=15,4+3") == (9, 12)  # cut off: to the end of the text
    assert first_wrong_span(p, "") == (0, 0)
    assert first_wrong_span(Problem("q", "1"), "anything") is None  # no known solution (a JSONL problem)
    arith = Problem("3+5=", "8", ("\\boxed{8}",))
    assert first_wrong_span(arith, "\\boxed{9}") == (0, 9)


def test_first_wrong_tokens_maps_characters_to_tokens():
    tok = build_tokenizer()
    p = Problem("47+38=", "85", digit_steps(47, "+", 38))
    text = "7+8+0=15,4+3+1=08,\\boxed{84}"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert first_wrong_tokens(tok, p, ids, decoded) == (18, 22)  # "\boxed{" is one token, then 8, 4, }
    assert first_wrong_tokens(tok, p, ids[:18], decoded[:18]) is None  # cut off before the wrong step


def test_first_wrong_credit_shares():
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 3] = False
    adv = torch.tensor([-1.0, 0.0, -2.0])
    a_hat = adv[:, None].repeat(1, 4)
    a_hat[0] = torch.tensor([-1.0, -1.3, -1.1, -1.0])  # |A_hat - A| = 0, .3, .1, 0
    a_hat[2] = torch.tensor([-2.2, -2.0, -2.0, 0.0])  # .2, 0, 0 on its 3 valid tokens
    spans = [(1, 2), (0, 4), (2, 3)]  # row 1 has A = 0: not counted
    out = first_wrong_credit(spans, adv, a_hat, mask)
    assert out["credit_first_wrong_rows"] == 2
    assert out["credit_first_wrong_share"] == pytest.approx((0.3 / 0.4 + 0.0) / 2, rel=1e-6)
    assert out["credit_first_wrong_baseline"] == pytest.approx((1 / 4 + 1 / 3) / 2)
    grpo = first_wrong_credit(spans, adv, None, mask)  # no teachers: A_hat = A, uniform credit
    assert grpo["credit_first_wrong_share"] is None and grpo["credit_first_wrong_rows"] == 2
    none = first_wrong_credit([None] * 3, adv, a_hat, mask)
    assert none == {"credit_first_wrong_share": None, "credit_first_wrong_baseline": None,
                    "credit_first_wrong_rows": 0}


def test_trainer_records_the_first_wrong_step(tmp_path):
    from cepo_kernels.analysis.credit import credit_files, load_credit
    from cepo_kernels.analysis.viz import render_credit_html
    from cepo_kernels.rl.trainer import Trainer

    cfg = TrainConfig(task="digits", max_new_tokens=DIGITS_MAX_TOKENS, steps=1, prompts_per_step=2,
                      group_size=4, micro_batch_size=8, mini_batch_prompts=1, sft_steps=10, sft_batch_size=16,
                      eval_every=0, progress=False, save_every=0, credit_every=1,
                      out_dir=str(tmp_path / "run"))
    tr = Trainer(cfg)
    try:
        assert len(tr.eval_set) == DIGITS_EVAL
        rec = tr.step()
    finally:
        tr.close()
    for key in ("credit_first_wrong_share", "credit_first_wrong_baseline", "credit_first_wrong_rows"):
        assert key in rec
    credit = load_credit(credit_files(tmp_path / "run")[0])
    problems = {p.prompt: p for p in tr.batch_problems(0)}
    wrong = 0
    for g in credit["groups"]:
        for r in g["responses"]:
            if r["reward"] >= 0.5:
                assert r["first_wrong"] is None
                continue
            span = first_wrong_span(problems[g["question"]], r["text"])
            if r["first_wrong"] is not None:
                wrong += 1
                shown = [t if t not in SPECIALS else "" for t in r["tokens"]]  # as in the decoded text
                before = len("".join(shown[:r["first_wrong"]]))
                assert before <= span[0] < before + len(shown[r["first_wrong"]])
    assert wrong > 0
    render_credit_html([tmp_path / "run"], tmp_path / "credit.html")
    assert "first-wrong" in (tmp_path / "credit.html").read_text()
