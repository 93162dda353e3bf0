"""TRL's own GRPOTrainer tests (tests/test_grpo_trainer.py of huggingface/trl, read and rewritten here on
the local tiny model, tokenizer and dataset of trl_helpers: nothing is downloaded), each run on GRPOTrainer
and on CEPOTrainer with the same options: whatever passes on the first must pass on the second.

Each test trains a few steps and checks what TRL's test checks: a loss was logged and the trainable
parameters moved (or, where TRL's test says so, did not)."""

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed (pip install -e '.[trl]')")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

from trl_helpers import boxed_reward, tiny_config, tiny_dataset, tiny_model, tiny_tokenizer  # noqa: E402

from cepo_kernels.integrations import trl as cepo_trl  # noqa: E402

TRAINERS = ["grpo", "cepo"]


def _make(kind, tmp_path, reward=boxed_reward, dataset=None, chat=False, eval_dataset=None, **kw):
    cls = cepo_trl.GRPOTrainer if kind == "grpo" else cepo_trl.CEPOTrainer
    cfg = cepo_trl.GRPOConfig if kind == "grpo" else cepo_trl.CEPOConfig
    args = tiny_config(cfg, tmp_path / kind, **{"learning_rate": 0.1, "max_steps": 2, **kw})
    return cls(model=tiny_model(0), reward_funcs=reward, args=args,
               train_dataset=dataset if dataset is not None else tiny_dataset(chat),
               eval_dataset=eval_dataset, processing_class=tiny_tokenizer(chat))


def _train_and_check(trainer, moved=True):
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    changed = [n for n, p in before.items() if not torch.equal(p, trainer.model.get_parameter(n))]
    if moved:
        assert changed, "no trainable parameter changed"
    else:
        assert not changed, f"parameters changed: {changed[:3]}"
    return trainer


@pytest.mark.parametrize("kind", TRAINERS)
@pytest.mark.parametrize("chat", [False, True], ids=["standard", "conversational"])
def test_train_dataset_format(tmp_path, kind, chat):
    _train_and_check(_make(kind, tmp_path, chat=chat))


@pytest.mark.parametrize("kind", TRAINERS)
def test_train_with_eval(tmp_path, kind):
    tr = _make(kind, tmp_path, eval_dataset=tiny_dataset(), eval_strategy="steps", eval_steps=1,
               num_generations_eval=4, per_device_eval_batch_size=8)
    _train_and_check(tr)
    assert any("eval_loss" in h for h in tr.state.log_history)


@pytest.mark.parametrize("kind", TRAINERS)
def test_train_with_iterable_dataset(tmp_path, kind):
    ds = tiny_dataset().to_iterable_dataset()
    _train_and_check(_make(kind, tmp_path, dataset=ds))


@pytest.mark.parametrize("kind", TRAINERS)
def test_train_multiple_reward_funcs_with_weights_and_none(tmp_path, kind):
    def length_reward(completions, **kw):
        return [float(len(c)) / 20 for c in completions]

    def partly_none(completions, prompts, **kw):  # None: "this function does not apply to that sample"
        return [None if "1 plus" in p else 0.5 for p in prompts]

    tr = _make(kind, tmp_path, reward=[boxed_reward, length_reward, partly_none],
               reward_weights=[1.0, 0.5, 0.2])
    _train_and_check(tr)


@pytest.mark.parametrize("kind", TRAINERS)
def test_train_reward_func_additional_column(tmp_path, kind):
    seen = []

    def reward(completions, answer, difficulty, **kw):
        seen.extend(difficulty)
        return boxed_reward(completions, answer)

    ds = tiny_dataset().map(lambda row: {"difficulty": len(row["prompt"])})
    _train_and_check(_make(kind, tmp_path, reward=reward, dataset=ds))
    assert seen and all(isinstance(d, int) for d in seen)


@pytest.mark.parametrize("kind", TRAINERS)
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_train_scale_rewards(tmp_path, kind, scale_rewards):
    _train_and_check(_make(kind, tmp_path, scale_rewards=scale_rewards))


@pytest.mark.parametrize("kind", TRAINERS)
def test_train_delta_clipping_and_clip_higher(tmp_path, kind):
    _train_and_check(_make(kind, tmp_path, delta=3.0, epsilon_high=0.28))


@pytest.mark.parametrize("kind", TRAINERS)
def test_train_with_cast_lm_head_to_fp32(tmp_path, kind):
    _train_and_check(_make(kind, tmp_path, cast_lm_head_to_fp32=True))


@pytest.mark.parametrize("kind", TRAINERS)
def test_train_with_entropy_filter(tmp_path, kind):
    _train_and_check(_make(kind, tmp_path, top_entropy_quantile=0.2))


@pytest.mark.parametrize("kind", TRAINERS)
def test_train_with_pad_to_multiple_of(tmp_path, kind):
    _train_and_check(_make(kind, tmp_path, pad_to_multiple_of=8))


@pytest.mark.parametrize("kind", TRAINERS)
def test_train_generation_batch_larger_than_batch(tmp_path, kind):
    _train_and_check(_make(kind, tmp_path, per_device_train_batch_size=4, generation_batch_size=16,
                           num_generations=8))


@pytest.mark.parametrize("kind", TRAINERS)
def test_train_with_mask_truncated_completions_all_masked(tmp_path, kind):
    """Every completion is cut at 1 token (truncated: the end-of-sequence token is suppressed) and masked:
    the loss is zero and no parameter moves (TRL's own expectation). One step: the suppression held for the
    first generation only here (TRL 1.16), so later steps would see terminated completions."""
    tr = _make(kind, tmp_path, mask_truncated_completions=True, max_completion_length=1, max_steps=1,
               generation_kwargs={"suppress_tokens": [tiny_tokenizer().eos_token_id]})
    _train_and_check(tr, moved=False)


@pytest.mark.parametrize("kind", TRAINERS)
def test_no_reward_source_raises(tmp_path, kind):
    """reward_funcs is optional (an environment may own the reward), and without any reward source both
    trainers raise GRPOTrainer's own ValueError."""
    cls = cepo_trl.GRPOTrainer if kind == "grpo" else cepo_trl.CEPOTrainer
    cfg = cepo_trl.GRPOConfig if kind == "grpo" else cepo_trl.CEPOConfig
    with pytest.raises(ValueError, match="No reward source provided"):
        cls(model=tiny_model(0), args=tiny_config(cfg, tmp_path / kind), train_dataset=tiny_dataset(),
            processing_class=tiny_tokenizer())
