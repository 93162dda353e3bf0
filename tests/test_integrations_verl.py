"""CEPO / RLSD in verl: the real verl package (DataProto, core_algos, its padding helpers), a tiny HF model on
CPU behind an in-process stand-in for the actor worker group (tests/verl_helpers.py)."""

import pytest

pytest.importorskip("verl", reason="needs verl 0.9.x with a transformers it accepts: CI runs these tests in "
                    "a second venv (.ci/run, .ci/constraints-verl.txt)")

import copy  # noqa: E402

import torch  # noqa: E402
from helpers import assert_close, assert_within_order_noise, ulps32  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl_helpers import GROUPS, TinyWorkerGroup, make_batch, tiny_model, tiny_tokenizer  # noqa: E402

import cepo_ref  # noqa: E402
from cepo_kernels.integrations import verl as cv  # noqa: E402

T = 0.7


def grpo(data):
    """verl's own GRPO advantages of the batch, through its registry."""
    b = data.batch
    return core_algos.get_adv_estimator_fn("grpo")(token_level_rewards=b["token_level_rewards"],
                                                   response_mask=b["response_mask"],
                                                   index=data.non_tensor_batch["uid"])[0]


def estimated(data, name="cepo"):
    """The batch after verl's advantage stage with adv_estimator=name (inside the CEPO trainer's stage)."""
    b = data.batch
    with cv.cepo_active():
        adv, ret = core_algos.get_adv_estimator_fn(name)(
            token_level_rewards=b["token_level_rewards"], response_mask=b["response_mask"],
            index=data.non_tensor_batch["uid"], config={"norm_adv_by_std_in_grpo": True})
    b["advantages"], b["returns"] = adv, ret
    return data


def run(data, settings, step=0, algo="cepo", world_size=1, model=None):
    tok = tiny_tokenizer()
    wg = TinyWorkerGroup(model or tiny_model(0), world_size)
    scorer = cv.worker_group_scorer(wg, T)
    metrics = cv.cepo_reweight(estimated(data, algo), tok, scorer, settings, step, algo)
    return data, metrics, wg


def reference_logp(model, ctx, resp, dtype):
    """log P(resp | ctx) per token at temperature T, from one plain forward of [ctx | resp] in dtype."""
    m = copy.deepcopy(model).to(dtype)
    ids = torch.tensor([ctx + resp])
    with torch.no_grad():
        logits = m(input_ids=ids).logits[0, len(ctx) - 1: len(ctx) + len(resp) - 1]
    return cepo_ref.token_logprobs(logits, torch.tensor(resp), temperature=T)


def expected_a_hat(settings, lam, dtype, algo="cepo"):
    """A_hat [B, R] by the reference: A from cepo_ref, r- chosen by hand (docs/method.md §2) for GROUPS."""
    tok, model = tiny_tokenizer(), tiny_model(0)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    r_minus = {"0": "4", "1": "6", "2": "6"}  # lowest reward, first with a \boxed{}; group 2 all correct
    data = make_batch(tok)
    R = data.batch["responses"].shape[1]
    rewards = data.batch["token_level_rewards"].sum(-1).double()
    adv = cepo_ref.group_advantages(rewards, 4).double()
    pos, neg = torch.zeros(len(data), R, dtype=dtype), torch.zeros(len(data), R, dtype=dtype)
    rows = 0
    k = 0
    for g, (prompt, ref, rollouts) in enumerate(GROUPS):
        for words, _ in rollouts:
            if adv[k] != 0:
                rows += 1
                resp = enc(words)
                pos[k, :len(resp)] = reference_logp(model, enc(prompt) + enc(" " + ref), resp, dtype)
                neg_ctx = enc(prompt) + enc(" " + r_minus[str(g)])
                neg[k, :len(resp)] = reference_logp(model, neg_ctx, resp, dtype)
            k += 1
    mask = data.batch["response_mask"].bool()
    if algo == "rlsd":
        neg = None
    return adv, pos, neg, mask, rows


def test_estimators_registered_and_refused_outside_the_cepo_trainer():
    assert {"cepo", "rlsd"} <= set(core_algos.ADV_ESTIMATOR_REGISTRY)
    data = make_batch(tiny_tokenizer())
    b = data.batch
    with pytest.raises(ValueError, match="trainer.v1.trainer_mode=cepo"):
        core_algos.get_adv_estimator_fn("cepo")(token_level_rewards=b["token_level_rewards"],
                                                response_mask=b["response_mask"],
                                                index=data.non_tensor_batch["uid"])
    assert torch.equal(estimated(data).batch["advantages"], grpo(make_batch(tiny_tokenizer())))
    cv.register_estimators()  # idempotent


def test_cepo_advantages_equal_the_reference():
    settings = cv.CEPOSettings(lam0=0.5, t_warm=10, eps_w=0.2)
    data, metrics, wg = run(make_batch(tiny_tokenizer()), settings, step=2)
    lam = 0.5 * (1 - 2 / 10)
    adv, pos, neg, mask, rows = expected_a_hat(settings, lam, torch.float64)
    ref64 = cepo_ref.cepo_advantages(adv, pos, neg, mask, lam=lam, eps_w=0.2)
    _, pos32, neg32, _, _ = expected_a_hat(settings, lam, torch.float32)
    torch32 = cepo_ref.cepo_advantages(adv.float(), pos32, neg32, mask, lam=lam, eps_w=0.2)
    assert_close(data.batch["advantages"], ref64, torch32, name="A_hat")
    assert not torch.equal(data.batch["advantages"], grpo(make_batch(tiny_tokenizer())))  # the teachers count
    assert torch.equal(data.batch["returns"], data.batch["advantages"])
    assert metrics["cepo/lambda"] == pytest.approx(lam)
    assert metrics["cepo/teacher_rows"] == rows == 8  # group 2 (all correct, A = 0) gets no teacher pass
    assert metrics["cepo/r_minus_fallbacks"] == 0.0
    assert {"cepo/delta_mean_pos", "cepo/delta_mean_neg", "cepo/frac_wrong_dir"} <= set(metrics)
    assert wg.calls == [(2 * rows, T, False)]  # both teachers in one no-grad call, at the rollout temperature


def test_rlsd_scores_only_the_positive_teacher_against_the_old_log_probs():
    tok = tiny_tokenizer()
    data = make_batch(tok)
    old = torch.randn(data.batch["responses"].shape, generator=torch.Generator().manual_seed(0)) - 2.0
    data.batch["old_log_probs"] = old
    settings = cv.CEPOSettings(lam0=1.0, t_warm=4)
    data, metrics, wg = run(data, settings, step=0, algo="rlsd")
    adv, pos, _, mask, rows = expected_a_hat(settings, 1.0, torch.float64, "rlsd")
    ref64 = cepo_ref.cepo_advantages(adv, pos, old.double(), mask, lam=1.0, eps_w=0.2)
    _, pos32, _, _, _ = expected_a_hat(settings, 1.0, torch.float32, "rlsd")
    torch32 = cepo_ref.cepo_advantages(adv.float(), pos32, old, mask, lam=1.0, eps_w=0.2)
    assert_close(data.batch["advantages"], ref64, torch32, name="A_hat (RLSD)")
    assert wg.calls == [(rows, T, False)]
    with pytest.raises(KeyError, match="old_log_probs"):
        run(make_batch(tok), settings, algo="rlsd")


@pytest.mark.parametrize("lam0, step", [(0.0, 0), (0.5, 10)])
def test_lambda_zero_gives_verl_grpo_exactly_and_no_teacher_pass(lam0, step):
    data, metrics, wg = run(make_batch(tiny_tokenizer()), cv.CEPOSettings(lam0=lam0, t_warm=10), step=step)
    assert torch.equal(data.batch["advantages"], grpo(make_batch(tiny_tokenizer())))
    assert wg.calls == [] and metrics == {"cepo/lambda": 0.0, "cepo/teacher_rows": 0.0}


ORDER = [5, 0, 11, 2, 7, 9, 1, 4, 10, 3, 8, 6]  # as verl's balance_batch may reorder: groups interleaved


def in_order(data, width, order=ORDER):
    """A_hat [B, width] of a batch built in `order`, rows put back in the original order."""
    back = torch.empty_like(data.batch["advantages"])
    back[order] = data.batch["advantages"]
    return back[:, :width]


def reordered(settings, step=0):
    """A_hat of one shard with the rows in ORDER (the teacher batches composed and padded otherwise), put back
    in the original order: its distance from the plain run is what reordering this arithmetic makes, the
    measure of the tolerance (tests/helpers.assert_within_order_noise: factor 2, plus an ulp of |A_hat|)."""
    data, _, _ = run(make_batch(tiny_tokenizer(), order=ORDER), settings, step=step)
    return data


def test_groups_split_over_two_data_parallel_shards_match_one_shard():
    tok = tiny_tokenizer()
    settings = cv.CEPOSettings(lam0=0.5, t_warm=10)
    one, m1, _ = run(make_batch(tok), settings)
    two, m2, wg = run(make_batch(tok, order=ORDER), settings, world_size=2)
    assert wg.calls[0][0] % 2 == 0
    want = one.batch["advantages"]
    R = want.shape[1]
    assert_within_order_noise(in_order(two, R), want, in_order(reordered(settings), R), floor=ulps32(want),
                              name="A_hat over 2 shards")
    assert m1 == pytest.approx(m2)
    texts = [tok.decode(r, skip_special_tokens=True) for r in make_batch(tok).batch["responses"].tolist()]
    rewards = make_batch(tok).batch["token_level_rewards"].sum(-1).tolist()
    refs = [g[1] for g in GROUPS for _ in range(4)]
    uids = [str(g) for g in range(3) for _ in range(4)]
    whole = cv.negatives_by_uid(texts, rewards, uids, refs)
    split = cv.negatives_by_uid([texts[i] for i in ORDER], [rewards[i] for i in ORDER],
                                [uids[i] for i in ORDER], [refs[i] for i in ORDER])
    assert {u: n.answer for u, n in whole.items()} == {u: n.answer for u, n in split.items()} == {
        "0": "4", "1": "6", "2": "6"}


def test_settings_from_verl_config_and_bad_values():
    got = cv.CEPOSettings.from_config({"cepo": {"lam0": 0.3, "t_warm": 5}})
    assert got == cv.CEPOSettings(lam0=0.3, t_warm=5)
    assert cv.CEPOSettings.from_config({}) == cv.CEPOSettings()
    with pytest.raises(ValueError, match=r"algorithm.cepo: unknown option\(s\) \['lam'\]"):
        cv.CEPOSettings.from_config({"cepo": {"lam": 0.3}})
    with pytest.raises(ValueError, match="algorithm.cepo.lam0"):
        cv.CEPOSettings(lam0=1.5)
    with pytest.raises(ValueError, match="algorithm.cepo.teacher_template"):
        cv.CEPOSettings(teacher_template="no answer")
    data = make_batch(tiny_tokenizer())
    with pytest.raises(ValueError, match="algo: expected one of"):
        cv.cepo_reweight(estimated(data), tiny_tokenizer(), None, cv.CEPOSettings(), 0, algo="ppo")


def test_version_outside_the_supported_range_is_refused(monkeypatch):
    import verl

    monkeypatch.setattr(verl, "__version__", "0.8.2")
    monkeypatch.delenv("CEPO_VERL_ALLOW_ANY_VERSION", raising=False)
    with pytest.raises(ImportError, match=r"supports verl >= 0.9, < 0.10; found verl 0.8.2"):
        cv.check_verl_version()


def test_cepo_trainer_in_verl_trainer_registry():
    try:
        from verl.trainer.ppo.v1 import PPOTrainerSync, get_trainer_cls
    except ImportError as e:  # TransferQueue, torchdata, its server stack: not in CI's light install
        pytest.skip(f"verl's v1 trainer does not import here: {e}")

    from cepo_kernels.integrations.verl.trainer import CEPOPPOTrainer

    assert get_trainer_cls("cepo") is CEPOPPOTrainer and issubclass(CEPOPPOTrainer, PPOTrainerSync)


def test_cepo_trainer_advantage_stage_through_verl_v1(monkeypatch):
    """The CEPO trainer's advantage stage, verl's own v1 stage underneath (its reads, its
    compute_advantage with the registered estimator, its writes), on an in-memory TransferQueue: the
    advantages it writes back per row equal cepo_reweight on the padded batch."""
    try:
        import transfer_queue

        from cepo_kernels.integrations.verl.trainer import CEPOPPOTrainer
    except ImportError as e:  # TransferQueue, torchdata, its server stack: not in CI's light install
        pytest.skip(f"verl's v1 trainer does not import here: {e}")
    from omegaconf import OmegaConf
    from verl_helpers import FakeTransferQueue

    tok = tiny_tokenizer()
    data = make_batch(tok)
    data.batch["old_log_probs"] = torch.zeros(data.batch["responses"].shape)
    fake = FakeTransferQueue()
    meta = fake.put_batch(data)
    monkeypatch.setattr(transfer_queue, "kv_batch_get", fake.kv_batch_get)
    monkeypatch.setattr(transfer_queue, "kv_batch_put", fake.kv_batch_put)
    trainer = CEPOPPOTrainer.__new__(CEPOPPOTrainer)  # the stage only: no Ray workers behind it
    trainer.config = OmegaConf.create({
        "algorithm": {"adv_estimator": "cepo", "use_kl_in_reward": False, "gamma": 1.0, "lam": 1.0,
                      "norm_adv_by_std_in_grpo": True, "cepo": {"lam0": 0.5, "t_warm": 10}},
        "actor_rollout_ref": {"rollout": {"n": 4, "temperature": T}}})
    trainer.tokenizer, trainer.global_steps = tok, 3  # verl counts from 1: the third rollout batch, step 2
    trainer.actor_rollout_wg = TinyWorkerGroup(tiny_model(0))
    metrics = {}
    trainer._compute_advantage(meta, metrics)
    expected, m, _ = run(make_batch(tok), cv.CEPOSettings(lam0=0.5, t_warm=10), step=2)
    assert metrics == pytest.approx(m) and metrics["cepo/lambda"] == pytest.approx(0.4)
    want = expected.batch["advantages"]
    variant = in_order(reordered(cv.CEPOSettings(lam0=0.5, t_warm=10), step=2), want.shape[1])
    for i, key in enumerate(meta.keys):
        row = fake.rows[("train", key)]
        n = row["response_mask"].numel()
        assert_within_order_noise(row["advantages"], want[i, :n], variant[i, :n], floor=ulps32(want),
                                  name=f"A_hat of row {i}")
