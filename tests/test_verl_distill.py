"""OPSD and SDPO in verl (cepo_kernels/integrations/verl/distill.py): the registered policy losses against
cepo_ref, the teacher contexts and signal on a verl DataProto scored by an in-process worker group
(tests/verl_helpers.py), and a short run of verl's own trainer on a CPU (tests/verl_real_harness.py) for
each algorithm."""


import pytest

for _module in ("verl", "ray", "transfer_queue", "pandas"):
    pytest.importorskip(_module, reason="needs verl 0.9.x, Ray and TransferQueue with a transformers verl "
                        "accepts: CI runs this in a second venv (.ci/run, .ci/constraints-verl.txt)")

import torch  # noqa: E402
from helpers import assert_close  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl_distill_helpers import driver_batch, record_distill_stage  # noqa: E402
from verl_helpers import GROUPS, TinyWorkerGroup, tiny_model, tiny_tokenizer  # noqa: E402

import cepo_ref  # noqa: E402
from cepo_kernels.integrations import verl as cv  # noqa: E402
from cepo_kernels.integrations.verl import distill as D  # noqa: E402
from cepo_kernels.step.distill import successful_peer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
T = 0.7
WATCHDOG_S = 600


def inputs(seed, B=4, R=7, V=50):
    """Student logits (fp64), sampled tokens, response mask, teacher / old log-probs and a teacher row mask
    (row 1 has no teacher, as an SDPO row without a successful peer)."""
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(B, R, V, generator=g, dtype=torch.float64)
    tg = torch.randint(0, V, (B, R), generator=g)
    mask = torch.rand(B, R, generator=g) > 0.2
    teacher = cepo_ref.token_logprobs(torch.randn(B, R, V, generator=g, dtype=torch.float64), tg)
    old = cepo_ref.token_logprobs(x64, tg) + torch.randn(B, R, generator=g, dtype=torch.float64)
    rows = torch.ones(B, R, dtype=torch.bool)
    rows[1] = False
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, R)
    return x64, tg, mask, teacher, old, rows, adv


def run_loss(name, dt, x64, tg, mask, teacher, old, rows, adv, *, weight=1.0, config=None, is_clip=2.0):
    x = x64.detach().to(dt).clone().requires_grad_()
    lp = cepo_ref.token_logprobs(x, tg)
    signal = D.TeacherSignal(teacher.to(dt), rows, is_clip, weight)
    with D.teacher_signal(signal):
        loss, metrics = core_algos.get_policy_loss_fn(name)(
            old_log_prob=old.to(dt), log_prob=lp, advantages=adv.to(dt), response_mask=mask,
            loss_agg_mode="token-mean", config=config, rollout_is_weights=None)
    loss.backward()
    return loss, x.grad, metrics


def reference(name, dt, x64, tg, mask, teacher, old, rows, *, is_clip=2.0, reduction="token-mean", **kw):
    """cepo_ref's sampled-token loss (SDPO: with its importance weight) on the tokens with a teacher."""
    x = x64.detach().to(dt).clone().requires_grad_()
    w = dict(old_logp=old.to(dt), is_clip=is_clip) if name == "sdpo" else {}
    out = cepo_ref.sampled_token_kl_loss(cepo_ref.token_logprobs(x, tg), teacher.to(dt), mask & rows,
                                         reduction=reduction, **w, **kw)
    out.loss.backward()
    return out.loss, x.grad, out.metrics


def test_registered_in_verls_registries():
    for name in cv.DISTILL_ALGOS:
        assert core_algos.get_policy_loss_fn(name) is D._REGISTERED[name]
        assert core_algos.get_adv_estimator_fn(name).__name__ == f"compute_{name}_outcome_advantage"
    assert cv.DISTILL_ALGOS == ("opsd", "sdpo")


@pytest.mark.parametrize("name", ["opsd", "sdpo"])
def test_policy_loss_equals_the_reference(name):
    """Value and gradient of the registered loss (fp32) against cepo_ref in fp64, house rule; the row without
    a teacher gets exactly no gradient."""
    case = inputs(1)
    x64, tg, mask, teacher, old, rows, adv = case
    loss, grad, metrics = run_loss(name, torch.float32, *case)
    r64, g64, m64 = reference(name, torch.float64, *case[:-1])
    r32, g32, _ = reference(name, torch.float32, *case[:-1])
    assert_close(loss, r64, r32, name=f"loss ({name})")
    assert_close(grad, g64, g32, name=f"grad ({name})")
    assert torch.count_nonzero(grad[1]) == 0
    assert metrics["distill/num_tokens"] == m64["num_tokens"] == float((mask & rows).sum())
    if name == "sdpo":
        w = torch.exp(cepo_ref.token_logprobs(x64, tg) - old)[mask & rows]
        assert 0.0 < float((w >= 2.0).double().mean()) < 1.0  # the clip is hit and missed
        assert metrics["distill/is_clip_frac"] == pytest.approx(m64["is_clip_frac"], abs=1e-6)


def test_sdpo_blend_and_verls_global_token_normalisation():
    """(1 - w) verl's PPO loss + w distillation, with verl's global batch info: the distillation term is the
    sum over the tokens with a teacher / batch_num_tokens x dp_size, as verl's agg_loss."""
    from verl.workers.config import ActorConfig

    case = inputs(2)
    x64, tg, mask, teacher, old, rows, adv = case
    n_global, dp = 40, 2
    config = ActorConfig(strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, rollout_n=1)
    config.global_batch_info.update(dp_size=dp, batch_num_tokens=n_global)
    loss, grad, _ = run_loss("sdpo", torch.float32, *case, weight=0.3, config=config)
    out = {}
    for dt in (torch.float64, torch.float32):
        x = x64.detach().to(dt).clone().requires_grad_()
        lp = cepo_ref.token_logprobs(x, tg)
        pg, _ = core_algos.compute_policy_loss_vanilla(old.to(dt), lp, adv.to(dt), mask, "token-mean", config)
        kl = cepo_ref.sampled_token_kl_loss(lp, teacher.to(dt), mask & rows, old_logp=old.to(dt), is_clip=2.0,
                                            reduction="sum").loss
        total = 0.7 * pg + 0.3 * kl / n_global * dp
        total.backward()
        out[dt] = (total, x.grad)
    assert_close(loss, out[torch.float64][0], out[torch.float32][0], name="blended loss")
    assert_close(grad, out[torch.float64][1], out[torch.float32][1], name="blended grad")


def test_policy_loss_outside_the_trainer_is_refused():
    case = inputs(3)
    x64, tg, mask, teacher, old, rows, adv = case
    with pytest.raises(ValueError, match="loss_mode=sdpo: needs the teacher log-probs"):
        core_algos.get_policy_loss_fn("sdpo")(old, cepo_ref.token_logprobs(x64, tg), adv, mask)
    with pytest.raises(ValueError, match="teacher signal: expected"), D.teacher_signal(
            D.TeacherSignal(teacher[:, :-1], rows[:, :-1])):
        core_algos.get_policy_loss_fn("opsd")(old, cepo_ref.token_logprobs(x64, tg), adv, mask)
    from tensordict import TensorDict

    with pytest.raises(KeyError, match="teacher fields"):
        D.distill_ppo_loss(None, {}, TensorDict({}, batch_size=[0]))


def test_settings_verl_cannot_run_are_refused():
    from omegaconf import OmegaConf

    for raw, match in (({"distill_teacher": "ema"}, "distill_teacher"),
                       ({"distill_beta": 0.3}, "distill_beta"), ({"sdpo_topk": 10}, "sdpo_topk")):
        algorithm = OmegaConf.create({"cepo": raw})
        with pytest.raises(ValueError, match=f"algorithm.cepo.{match}"):
            D.check_distill_settings(algorithm, cv.CEPOSettings.from_config(algorithm))
    cfg = OmegaConf.create({"algorithm": {"adv_estimator": "sdpo"},
                            "actor_rollout_ref": {"actor": {"policy_loss": {"loss_mode": "vanilla"}}}})
    D.use_distill_loss_mode(cfg)
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "sdpo"
    cfg.actor_rollout_ref.actor.policy_loss.loss_mode = "gspo"
    with pytest.raises(ValueError, match="policy_loss.loss_mode: expected 'sdpo'"):
        D.use_distill_loss_mode(cfg)


def test_teacher_worker_groups():
    """live: the actor; initial: verl's reference worker (`compute_ref_log_prob`), or the actor with its LoRA
    adapter off when verl keeps the reference in the actor; refused without a reference policy."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    class Group:
        world_size = 2

        def compute_log_prob(self, td):
            return ("actor", tu.get(td, "no_lora_adapter", default=False))

        def compute_ref_log_prob(self, td):
            return ("ref", False)

    g = Group()
    config = OmegaConf.create({"actor_rollout_ref": {"rollout": {"n": 1}, "ref": {}}})
    trainer = SimpleNamespace(config=config, actor_rollout_wg=g, ref_policy_wg=None,
                              use_reference_policy=False)
    initial = cv.CEPOSettings(distill_teacher="initial")
    assert D.teacher_worker_group(trainer, cv.CEPOSettings())[0] is g
    with pytest.raises(ValueError, match="distill_teacher=initial: needs verl's reference policy"):
        D.teacher_worker_group(trainer, initial)
    trainer.ref_policy_wg, trainer.use_reference_policy = g, True
    for in_actor, expected in ((False, ("ref", False)), (True, ("actor", True))):
        trainer.ref_in_actor = in_actor
        group, _ = D.teacher_worker_group(trainer, initial)
        assert group.world_size == 2 and group.compute_log_prob(TensorDict({}, batch_size=[0])) == expected


@pytest.mark.parametrize("algo", ["opsd", "sdpo"])
def test_teacher_contexts_and_signal(algo):
    """SDPO: a row's teacher reads a successful peer of its group, never the row itself; a row without one
    gets no teacher (mask and log-probs 0). OPSD: every row reads the reference answer. The teacher's
    log-probs are those of a plain float64 forward of the same model on the context + the row's response
    (house rule)."""
    tok = tiny_tokenizer(chat=True)
    model = tiny_model(0)
    data = driver_batch(tok)
    wg = TinyWorkerGroup(model, world_size=2)
    calls = []

    def scorer(batch):
        calls.append(batch)
        return cv.worker_group_scorer(wg, T)(batch)

    # templates in the tiny tokenizer's words, so that a context decodes back to its text
    settings = cv.CEPOSettings(opsd_template="{question} plus {answer} ?",
                               sdpo_template="{question} is {answer} ?")
    sig = D.distill_signal(data, tok, scorer, settings, algo)
    rewards = data.batch["token_level_rewards"].sum(-1).tolist()
    uids = list(data.non_tensor_batch["uid"])
    texts = [tok.decode(r[m.bool()], skip_special_tokens=True)
             for r, m in zip(data.batch["responses"], data.batch["response_mask"], strict=True)]
    groups = [[j for j in range(len(uids)) if uids[j] == u] for u in uids]
    expected = [i for i in range(len(uids))
                if algo == "opsd" or successful_peer(rewards, groups[i], i) is not None]
    assert sig.rows == expected and len(calls) == 1
    if algo == "sdpo":
        # group 0 has one success: its row has no teacher
        assert 0 not in sig.rows and sig.metrics["distill/rows_without_teacher"] == 1.0
    assert not sig.mask[[i for i in range(len(uids)) if i not in sig.rows]].any()
    ids, attn, rmask = (calls[0].batch[k] for k in ("input_ids", "attention_mask", "response_mask"))
    model64 = tiny_model(0).double().eval()
    ref64, ref32 = torch.zeros_like(sig.teacher_logp, dtype=torch.float64), torch.zeros_like(sig.teacher_logp)
    for k, i in enumerate(sig.rows):
        seq = ids[k][attn[k].bool()]
        n = int(rmask[k].sum())
        context = tok.decode(seq[: len(seq) - n])
        question, answer = GROUPS[int(uids[i])][0], GROUPS[int(uids[i])][1]
        if algo == "opsd":
            assert context == f"{question} plus {answer} ?"
        else:
            peer = successful_peer(rewards, groups[i], i)
            assert peer != i and rewards[peer] >= 0.5 and context == f"{question} is {texts[peer]} ?"
        assert torch.equal(seq[len(seq) - n:], data.batch["responses"][i, :n])
        for m, out in ((model64, ref64), (model.float(), ref32)):
            with torch.no_grad():
                logits = m(input_ids=seq[None].to(torch.long)).logits[0, len(seq) - n - 1: len(seq) - 1]
            out[i, :n] = cepo_ref.token_logprobs(logits, seq[len(seq) - n:], temperature=T)
    assert_close(sig.teacher_logp, ref64, ref32, name=f"teacher log-probs ({algo})")
    assert torch.equal(sig.mask, data.batch["response_mask"].bool() & sig.mask.any(1, keepdim=True))


def test_raw_prompt_is_needed_for_a_question_template():
    tok = tiny_tokenizer(chat=True)
    data = driver_batch(tok)
    del data.non_tensor_batch["raw_prompt"]
    with pytest.raises(KeyError, match="raw_prompt"):
        D.distill_signal(data, tok, lambda b: None, cv.CEPOSettings(), "opsd")
    with pytest.raises(ValueError, match="algo: expected one of"):
        D.distill_signal(data, tok, lambda b: None, cv.CEPOSettings(), "cepo")


# ---- verl's own trainer on a CPU (tests/verl_real_harness.py): opsd (live teacher), sdpo (initial teacher,
# verl's reference worker; half PPO, half distillation), two steps each on two data-parallel ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import verl_real_harness as H

    tmp = tmp_path_factory.mktemp("verl_distill")
    with H.ray_session(tmp, WATCHDOG_S):
        out = {}
        with H.transfer_queue(tmp):
            # templates in the tiny tokenizer's words (a context decodes back to its text)
            for algo, options in (("opsd", {"opsd_template": "'{question} plus {answer} ?'"}),
                                  ("sdpo", {"sdpo_template": "'{question} is {answer} ?'",
                                            "distill_teacher": "initial", "distillation_weight": 0.5})):
                with pytest.MonkeyPatch.context() as mp:
                    stages: list = []
                    record_distill_stage(mp, stages)
                    out[algo] = H.run(mp, tmp, algo, 2, 2, **options)
                    out[algo]["distill"] = stages
        yield out


@pytest.mark.parametrize("algo", ["opsd", "sdpo"])
def test_real_verl_run(runs, algo):
    """verl's trainer ran the registered loss on the teacher signal: the loss mode, the teacher rows (OPSD:
    all 11 real rows; SDPO: those with a successful peer, never the row itself), the actor's distillation
    metrics, KL 0 at step 1 and > 0 at step 2 (the weights moved)."""
    from cepo_kernels.integrations.verl.trainer import CEPOPPOTrainer

    run = runs[algo]
    assert type(run["trainer"]) is CEPOPPOTrainer
    assert run["trainer"].config.actor_rollout_ref.actor.policy_loss.loss_mode == algo
    assert [u["step"] for u in run["updates"]] == [1, 2] and len(run["distill"]) == 2
    for stage, update in zip(run["distill"], run["updates"], strict=True):
        sig, uids, rewards = stage["signal"], stage["uids"], stage["rewards"]
        assert len(uids) == 11  # verl's padding row stays out
        groups = [[j for j in range(11) if uids[j] == u] for u in uids]
        expected = [i for i in range(11)
                    if algo == "opsd" or successful_peer(rewards, groups[i], i) is not None]
        assert sig.rows == expected and 0 < len(expected)
        if algo == "sdpo":
            assert len(expected) < 11  # some group has a single success: that row has no teacher
        assert not sig.mask[[i for i in range(11) if i not in sig.rows]].any()
        ids, attn, rmask, _ = stage["calls"][0]
        tok = run["trainer"].tokenizer
        texts = [tok.decode(r, skip_special_tokens=True) for r in stage["responses"]]
        for k, i in enumerate(sig.rows):  # the context the teacher read, and the row's own response after it
            seq = ids[k][attn[k].bool()].tolist()
            n = int(rmask[k].sum())
            assert seq[len(seq) - n:] == stage["responses"][i]
            question = stage["raw_prompt"][i][-1]["content"]
            if algo == "opsd":
                message = f"{question} plus {stage['references'][i]} ?"
            else:
                peer = successful_peer(rewards, groups[i], i)
                assert peer != i
                message = f"{question} is {texts[peer]} ?"
            # through the chat template as verl's agent loop renders a prompt (verl loads this tokenizer as a
            # Qwen2Tokenizer, which drops some of the tiny words: compare ids, not text)
            expected = tok.apply_chat_template([{"role": "user", "content": message}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
            assert seq[: len(seq) - n] == list(expected)
        m = update["metrics"]
        for key in ("actor/pg_loss", "actor/distill/divergence_mean", "actor/distill/is_weight_mean"):
            assert key in m and torch.isfinite(torch.tensor(float(m[key]))), key
        assert float(m["actor/distill/num_tokens"]) > 0
        # one mini-batch per step: the update's forward is on-policy, so SDPO's weight (against verl's old
        # log-probs) never reaches its cap 2; OPSD's weight is 1 in every micro-batch (all have teacher rows)
        assert float(m["actor/distill/is_clip_frac"]) == 0.0
        if algo == "opsd":
            assert float(m["actor/distill/is_weight_mean"]) == 1.0
    kl = [u["metrics"]["actor/kl_loss"] for u in run["updates"]]
    assert kl[0] == 0.0 and kl[1] > 0.0, kl


@pytest.mark.parametrize("algo", ["opsd", "sdpo"])
def test_real_teacher_log_probs_equal_a_float64_forward(runs, algo):
    """Step 1 (the initial weights, which both teachers have then): the teacher log-probs written for the
    actor equal plain float64 forwards of the initial model on the teacher rows (house rule); the scorer on
    the rollout rows gives verl's old log-probs. Step 2: the live teacher (opsd) scores step 1's rows
    differently (the parameters changed), the initial one (sdpo, verl's reference worker) the same."""
    from test_verl_real import padded, plain_logps

    run = runs[algo]
    model_dir = run["trainer"].config.actor_rollout_ref.model.path
    first, second = run["distill"]
    ids, attn, rmask, out = first["calls"][0]
    rows = []
    for j in range(ids.shape[0]):
        seq = ids[j][attn[j].bool()].tolist()
        n = int(rmask[j].sum())
        rows.append((seq[: len(seq) - n], seq[len(seq) - n:]))
    sig = first["signal"]
    ref64 = torch.zeros(sig.teacher_logp.shape, dtype=torch.float64)
    ref32 = torch.zeros(sig.teacher_logp.shape)
    for dt, ref in ((torch.float64, ref64), (torch.float32, ref32)):
        for k, lp in enumerate(plain_logps(model_dir, dt, rows)):
            ref[sig.rows[k], : len(lp)] = lp
    assert_close(sig.teacher_logp, ref64, ref32, name=f"teacher log-probs ({algo})")
    mask = first["mask"]
    own64 = padded(plain_logps(model_dir, torch.float64, list(zip(first["prompts"], first["responses"],
                                                                   strict=True))), mask)
    own32 = padded(plain_logps(model_dir, torch.float32, list(zip(first["prompts"], first["responses"],
                                                                   strict=True))), mask)
    err32 = (own32 - own64).abs().max().item()
    assert_close(first["own"].masked_fill(~mask, 0), own64, own32, name=f"scorer ({algo})")
    assert_close(first["old_log_probs"].float().masked_fill(~mask, 0), own64, own32, name="old log-probs")
    moved = (second["again"] - first["own"]).masked_fill(~mask, 0).abs().max().item()
    if algo == "opsd":
        assert moved > 100 * (err32 + 1e-6), moved
    else:
        assert moved <= 4 * err32 + 2e-6, moved
