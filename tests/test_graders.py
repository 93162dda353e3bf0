"""The graders users already trust (step/graders.py) on a table of equivalent and non-equivalent answers,
as plain fn(text, reference), as TRL and verl reward functions, and as cepo-train's --reward."""

import pytest

from cepo_kernels.rl.config import TrainConfig
from cepo_kernels.step import graders
from cepo_kernels.step.graders import grader, official_accuracy, trl_reward, verl_reward
from cepo_kernels.step.rewards import extract_boxed

# (response, reference, mathruler's verdict, math-verify's verdict)
TABLE = [
    ("so \\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", True, True),  # \dfrac
    ("\\boxed{0.5}", "\\frac{1}{2}", True, True),  # a decimal for a fraction
    ("\\boxed{1/2}", "1/2", True, True),
    ("\\boxed{2/4}", "\\frac{1}{2}", False, True),  # an unreduced fraction: mathruler refuses it
    ("\\boxed{3\\text{ cm}}", "3", True, True),  # units
    ("\\boxed{\\text{(A)}}", "A", True, True),  # \text{}
    ("\\boxed{12^\\circ}", "12", True, True),
    ("\\boxed{(1,2]}", "(1,2]", True, True),  # intervals
    ("\\boxed{[1,2]}", "(1,2]", False, False),
    ("\\boxed{-3}", "-3", True, True),  # negative numbers
    ("\\boxed{- 3}", "-3", True, True),
    ("\\boxed{3}", "-3", False, False),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", True, True),
    ("the answer is \\boxed{1/", "1/2", False, False),  # a truncated box
    ("\\boxed{5} then \\boxed{6", "5", False, True),  # the last box truncated: math-verify reads the first
    ("no box, 5", "5", False, True),  # math-verify reads unboxed answers too
    ("\\boxed{7}", "5", False, False),
]


@pytest.fixture
def mathruler():
    return pytest.importorskip("mathruler.grader", reason="mathruler is not installed (extra [official])")


@pytest.fixture
def math_verify():
    return pytest.importorskip("math_verify", reason="math-verify is not installed (extra [math-verify])")


@pytest.mark.parametrize("text,ref,ruler,_", TABLE)
def test_official_table(mathruler, text, ref, ruler, _):
    assert official_accuracy(text, ref) == float(ruler)
    complete_box = extract_boxed(text) is not None
    assert grader("official")(text, ref) == pytest.approx(0.9 * ruler + 0.1 * complete_box)


def test_official_format_part(mathruler):
    assert grader("official")("\\boxed{7}", "5") == pytest.approx(0.1)  # boxed, wrong
    assert grader("official")("7", "5") == 0.0  # unboxed
    assert grader("official")("\\boxed{5", "5") == 0.0  # truncated: no complete box


@pytest.mark.parametrize("text,ref,_,verdict", TABLE)
def test_math_verify_table(math_verify, text, ref, _, verdict):
    assert grader("math-verify")(text, ref) == float(verdict)


def test_trl_and_verl_signatures(math_verify):
    fn = trl_reward(grader("math-verify"), answer_key="solution")
    plain = ["\\boxed{\\dfrac{1}{2}}", "\\boxed{3}"]
    chat = [[{"role": "assistant", "content": t}] for t in plain]
    cols = {"solution": ["0.5", "-3"], "prompt": ["a", "b"]}
    assert fn(plain, **cols) == fn(chat, **cols) == [1.0, 0.0]
    assert fn.__name__ == "math_verify_reward"
    with pytest.raises(KeyError, match="answer_key: the dataset has no column 'solution'"):
        fn(plain, answer=["1", "2"])
    assert verl_reward(grader("math-verify"))("geometry3k", "x = \\boxed{4}", "4", extra_info={}) == 1.0


def test_boxed_needs_no_extra():
    assert grader("boxed")("\\boxed{\\dfrac{1}{2}}", "1/2") == 1.0
    with pytest.raises(ValueError, match="reward: expected one of"):
        grader("exact")


def test_missing_package_is_named(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mathruler.grader", None)  # an import of it raises ImportError
    with pytest.raises(ImportError, match=r"reward: 'official' needs the package 'mathruler'.*\[official\]"):
        graders.grader("official")
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(ImportError, match=r"`pip install math-verify` \(or, in a clone of cepo_kernels, "
                                          r"`pip install -e \"\.\[math-verify\]\"`\)"):
        graders.math_verify_reward("\\boxed{1}", "1")
    with pytest.raises(ImportError, match=r"`pip install mathruler pylatexenc`"):
        graders.official_reward("\\boxed{1}", "1")


def test_config_reward_checks():
    assert TrainConfig(reward="math-verify").reward == "math-verify"
    with pytest.raises(ValueError, match="reward: expected one of"):
        TrainConfig(reward="exact")
    with pytest.raises(ValueError, match="reward: 'official' and reward_fn"):
        TrainConfig(reward="official", reward_fn="m:f")
    with pytest.raises(ValueError, match="format_bonus: reward='official' includes"):
        TrainConfig(reward="official", format_bonus=0.1)
