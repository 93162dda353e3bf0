"""The CEPO trainer's stage against verl's own config conversion and verl's own batch padding
(`upsample_batch_to_divisible_size`), on an in-memory TransferQueue (the Ray / TransferQueue server run is
tests/test_verl_real.py)."""

import pytest

pytest.importorskip("verl", reason="needs verl 0.9.x with a transformers it accepts: CI runs these tests in "
                    "a second venv (.ci/run, .ci/constraints-verl.txt)")
pytest.importorskip("transfer_queue", reason="needs TransferQueue (verl's v1 trainer): see .ci/run")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl_helpers import FakeTransferQueue, TinyWorkerGroup, make_batch, tiny_model, tiny_tokenizer  # noqa: E402

from cepo_kernels.integrations import verl as cv  # noqa: E402
from cepo_kernels.integrations.verl.config import (  # noqa: E402
    CEPO_ALGO_TARGET,
    CEPOAlgoConfig,
    canonical_order,
    real_rows,
    use_cepo_algo_config,
)

T = 0.7


def verl_config(**cepo):
    """verl's own ppo_trainer.yaml (as hydra composes it) with `+algorithm.cepo...` overrides."""
    from hydra import compose, initialize_config_module

    overrides = ["algorithm.adv_estimator=cepo"] + [f"+algorithm.cepo.{k}={v}" for k, v in cepo.items()]
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def test_algorithm_cepo_survives_verls_config_conversion():
    from hydra.errors import InstantiationException
    from verl.utils.config import omega_conf_to_dataclass

    config = verl_config(lam0=0.3, t_warm=5)
    with pytest.raises(InstantiationException, match="unexpected keyword argument 'cepo'"):  # verl's own
        omega_conf_to_dataclass(config.algorithm)
    use_cepo_algo_config(config)
    algo = omega_conf_to_dataclass(config.algorithm)
    assert type(algo) is CEPOAlgoConfig and algo.adv_estimator == "cepo" and algo.gamma == 1.0
    assert cv.CEPOSettings.from_config(algo) == cv.CEPOSettings(lam0=0.3, t_warm=5)
    assert cv.CEPOSettings.from_config(config.algorithm) == cv.CEPOSettings(lam0=0.3, t_warm=5)
    use_cepo_algo_config(config)  # idempotent
    assert config.algorithm._target_ == CEPO_ALGO_TARGET
    mine = OmegaConf.create({"algorithm": {"_target_": "my.Algo", "cepo": {}}})
    use_cepo_algo_config(mine)  # a user's own target is theirs
    assert mine.algorithm._target_ == "my.Algo"


def test_cepo_trainer_points_the_algorithm_target_at_its_dataclass(monkeypatch):
    from verl.trainer.ppo.v1 import PPOTrainerSync

    from cepo_kernels.integrations.verl.trainer import CEPOPPOTrainer

    seen = {}
    monkeypatch.setattr(PPOTrainerSync, "__init__", lambda self, config: seen.setdefault("config", config))
    CEPOPPOTrainer(verl_config(lam0=0.3))
    assert seen["config"].algorithm._target_ == CEPO_ALGO_TARGET


class PaddingTransferQueue(FakeTransferQueue):
    """The in-memory TransferQueue plus what verl's padding helper uses: a get of every field, a put of new
    rows with tags."""

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        if select_fields is None:
            select_fields = list(self.rows[(partition_id, keys[0])])
        return super().kv_batch_get(keys, partition_id, select_fields)

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        for i, k in enumerate(keys):
            row = self.rows.setdefault((partition_id, k), {})
            for f in (fields.keys() if fields is not None else ()):
                v = fields[f]
                row[f] = v.unbind()[i] if isinstance(v, torch.Tensor) else list(v)[i]
        from transfer_queue import KVBatchMeta

        return KVBatchMeta(keys=list(keys), tags=tags or [{} for _ in keys], partition_id=partition_id)


def stage(monkeypatch, multiple):
    """The CEPO trainer's advantage stage on make_batch's 12 rows, padded by verl to `multiple` rows:
    (advantages per key, metrics, teacher rows scored, the batch meta)."""
    import transfer_queue
    from verl.trainer.ppo import padding_utils

    from cepo_kernels.integrations.verl.trainer import CEPOPPOTrainer

    tok = tiny_tokenizer()
    data = make_batch(tok)
    fake = PaddingTransferQueue()
    data.batch["old_log_probs"] = torch.zeros(data.batch["responses"].shape)
    meta = fake.put_batch(data)
    meta = transfer_queue.KVBatchMeta(keys=meta.keys, tags=meta.tags, partition_id=meta.partition_id)
    for module in (transfer_queue, padding_utils.tq):
        monkeypatch.setattr(module, "kv_batch_get", fake.kv_batch_get)
        monkeypatch.setattr(module, "kv_batch_put", fake.kv_batch_put)
    meta = padding_utils.upsample_batch_to_divisible_size(meta, multiple, tok.eos_token_id)
    for k in meta.keys:  # old log-probs of the padding rows, as verl's old-log-prob stage would write
        row = fake.rows[("train", k)]
        row["old_log_probs"] = torch.zeros(row["responses"].shape)
    trainer = CEPOPPOTrainer.__new__(CEPOPPOTrainer)
    trainer.config = OmegaConf.create({
        "algorithm": {"adv_estimator": "cepo", "use_kl_in_reward": False, "gamma": 1.0, "lam": 1.0,
                      "norm_adv_by_std_in_grpo": True, "cepo": {"lam0": 0.5, "t_warm": 10}},
        "actor_rollout_ref": {"rollout": {"n": 4, "temperature": T}}})
    trainer.tokenizer, trainer.global_steps = tok, 1
    trainer.actor_rollout_wg = TinyWorkerGroup(tiny_model(0))
    metrics = {}
    out = trainer._compute_advantage(meta, metrics)
    adv = {k: fake.rows[("train", k)]["advantages"] for k in meta.keys}
    return adv, metrics, trainer.actor_rollout_wg.calls, out, meta


def test_padding_rows_never_reach_the_cepo_stage(monkeypatch):
    plain, m_plain, calls_plain, _, meta_plain = stage(monkeypatch, 1)
    padded, m_pad, calls_pad, out, meta = stage(monkeypatch, 16)
    pads = [k for k, t in zip(meta.keys, meta.tags, strict=True) if t.get("is_padding")]
    assert len(meta) == 16 and len(pads) == 4 and real_rows(meta.tags) == list(range(12))
    assert out.keys == meta.keys  # the stage hands verl the whole batch, padding included
    for k in meta_plain.keys:
        assert torch.equal(padded[k], plain[k])  # A_hat of the real rows: bit for bit
    for k in pads:  # verl's own advantage of a padding row (its one token is masked out)
        assert torch.equal(padded[k], torch.zeros(1))
    assert m_pad == m_plain and m_pad["cepo/r_minus_fallbacks"] == 0.0 and m_pad["cepo/teacher_rows"] == 8
    assert calls_pad == calls_plain == [(16, T, False)]  # no teacher pass for a padding row


def test_rows_reach_the_r_minus_choice_in_an_order_verls_balancing_cannot_change():
    keys = ["u2_10_0", "u1_1_0", "u2_2_0", "u1_0_1", "u1_0_0"]
    want = ["u1_0_0", "u1_0_1", "u1_1_0", "u2_2_0", "u2_10_0"]  # sessions numerically, within each uid
    assert canonical_order(keys) == canonical_order(list(reversed(keys))) == want
