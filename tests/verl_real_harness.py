"""verl's own trainer on a CPU, for tests/test_verl_real.py: local Ray, a TransferQueue server, verl's FSDP2
actor worker group (tests/verl_cpu_plugin.py), the trainer verl's `get_trainer_cls` returns.

Stubbed, and only these: the rollout server (`LLMServerManager`: vLLM / SGLang need a GPU), the agent loop's
generation (`RolloutWriter` writes fixed rollouts to TransferQueue in the agent loop's own layout, through
verl's `AgentLoopOutput`), the reward loop (the rollouts carry their rewards, as verl's streaming reward path
does) and the checkpoint engine (weight sync to the absent rollout server).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os

import torch
from trl_helpers import tiny_model, tiny_tokenizer

from cepo_kernels.step.rewards import boxed_reward

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
T = 0.7
N = 4  # rollouts per prompt
# per prompt: N rollouts (session -> words, "{a}" = the answer, "{w}" a wrong one); rewards mix in each group.
# The first prompt of every batch (index % 3 == 0) gets N - 1 rollouts, so that verl pads the batch (11 rows;
# verl needs a multiple of 12 = mini-batch 3 prompts x 4 rollouts).
RESPONSES = ["\\boxed{{{a}}} <eos>", "\\boxed{{{w}}} 5 <eos>", "{a} plus 1 is \\boxed{{{w}}}", "is {a} <eos>"]
PROMPTS = [(a, b) for a in (1, 2, 3) for b in (1, 2, 3)]


def make_model_dir(path: str) -> str:
    """The tiny model and its chat tokenizer, saved where verl loads them from (built from a config)."""
    tiny_model(0).save_pretrained(path)
    tiny_tokenizer(chat=True).save_pretrained(path)
    return path


def make_data(path: str) -> str:
    import pandas as pd

    rows = [{"data_source": "arith", "prompt": [{"role": "user", "content": f"what is {a} plus {b} ?"}],
             "reward_model": {"ground_truth": str(a + b), "style": "rule"},
             "extra_info": {"index": i}} for i, (a, b) in enumerate(PROMPTS)]
    pd.DataFrame(rows).to_parquet(path)
    return path


def ray_env() -> dict:
    from verl_cpu_plugin import ENV

    modules = ENV["VERL_USE_EXTERNAL_MODULES"] + ",cepo_kernels.integrations.verl.trainer"
    return {**ENV, "VERL_USE_EXTERNAL_MODULES": modules, "PYTHONPATH": os.pathsep.join([ROOT, TESTS]),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "disabled", "RAY_DEDUP_LOGS": "0"}


def config(model_dir: str, data: str, algo: str, world_size: int, steps: int, overrides=(), **cepo):
    """verl's ppo_trainer.yaml (hydra-composed) for a CPU run of `algo` (cepo, rlsd, grpo); `overrides`
    (hydra) come after the harness's own."""
    from hydra import compose, initialize_config_module

    a = "actor_rollout_ref"
    overrides = [
        f"algorithm.adv_estimator={algo}", "algorithm.use_kl_in_reward=false",
        f"trainer.v1.trainer_mode={'sync' if algo == 'grpo' else 'cepo'}", "trainer.use_v1=true",
        "trainer.device=cpu", f"trainer.n_gpus_per_node={world_size}", "trainer.nnodes=1",
        f"trainer.total_training_steps={steps}", "trainer.val_before_train=false", "trainer.logger=[console]",
        "trainer.save_freq=-1", "trainer.test_freq=-1", "trainer.resume_mode=disable",
        f"data.train_files={data}", f"data.val_files={data}", "data.train_batch_size=3",
        "data.max_prompt_length=32", "data.max_response_length=16", "data.dataloader_num_workers=0",
        "data.shuffle=false", f"{a}.model.path={model_dir}",
        f"+{a}.model.override_config.attn_implementation=sdpa",
        f"{a}.model.use_remove_padding=true",
        f"{a}.actor.strategy=fsdp2", f"{a}.ref.strategy=fsdp2",
        f"{a}.actor.fsdp_config.dtype=float32", f"{a}.ref.fsdp_config.dtype=float32",
        f"++{a}.actor.fsdp_config.mixed_precision.param_dtype=fp32",
        f"++{a}.ref.fsdp_config.mixed_precision.param_dtype=fp32",
        f"{a}.actor.fsdp_config.use_torch_compile=false", f"{a}.ref.fsdp_config.use_torch_compile=false",
        f"{a}.actor.use_torch_compile=false", f"{a}.actor.optim.lr=1e-2",
        f"{a}.actor.ppo_mini_batch_size=3", f"{a}.actor.ppo_micro_batch_size_per_gpu=2",
        f"{a}.actor.use_kl_loss=true", f"{a}.actor.kl_loss_coef=0.1", f"{a}.actor.kl_loss_type=low_var_kl",
        f"{a}.rollout.name=cpu_stub", f"{a}.rollout.n={N}", f"{a}.rollout.temperature={T}",
        f"{a}.rollout.log_prob_micro_batch_size_per_gpu=2", f"{a}.ref.log_prob_micro_batch_size_per_gpu=2",
        f"{a}.rollout.tensor_model_parallel_size=1", f"{a}.rollout.calculate_log_probs=false",
        "reward.num_workers=1",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
    ] + list(overrides) + [f"+algorithm.cepo.{k}={v}" for k, v in cepo.items()]
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


class RolloutWriter:
    """verl's agent loop manager with the generation stubbed: `generate_sequences(batch)` writes N fixed
    rollouts per prompt to TransferQueue exactly as `AgentLoopWorkerTQ` does (keys `{uid}_{session}_0`,
    `AgentLoopOutput.as_dict()` fields plus the prompt's own, the same tags), then marks the prompt finished.
    The reward is the boxed-answer reward at the last response token (`rm_scores`)."""

    responses = RESPONSES

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.uid_index: dict = {}  # uid -> dataset index

    def prompt_ids(self, prompt) -> tuple[list, dict]:
        """The prompt's token ids and its multi_modal_data (none for a text model)."""
        return self.tokenizer.apply_chat_template(prompt["raw_prompt"], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False), {}

    def vision_fields(self, output, input_ids) -> tuple:
        """(position_ids, multi_modal_inputs) of a rollout [prompt | response] without padding."""
        return torch.arange(input_ids.numel()), {}

    def generate_sequences(self, batch) -> None:
        import transfer_queue as tq
        from tensordict import NonTensorData, NonTensorStack
        from verl.experimental.agent_loop import AgentLoopOutput
        from verl.utils.tensordict_utils import list_of_dict_to_tensordict

        for i in range(len(batch)):
            prompt = {}
            for k, v in batch.items():
                if isinstance(v, torch.Tensor):
                    prompt[k] = v[i]
                elif isinstance(v, NonTensorStack):
                    prompt[k] = v[i].data
                elif isinstance(v, NonTensorData):
                    prompt[k] = v.data
            uid, index = prompt["uid"], int(prompt["extra_info"]["index"])
            self.uid_index[uid] = index
            answer, step = prompt["reward_model"]["ground_truth"], int(prompt["global_steps"])
            prompt_ids, mm_data = self.prompt_ids(prompt)
            keys, fields, tags = [], [], []
            wrong = "2" if answer != "2" else "3"
            sessions = self.responses[:-1] if index % 3 == 0 else self.responses
            for session, words in enumerate(sessions):
                text = words.format(a=answer, w=wrong)
                response_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                out = AgentLoopOutput(prompt_ids=list(prompt_ids), response_ids=response_ids,
                                      response_mask=[1] * len(response_ids), num_turns=2,
                                      multi_modal_data=mm_data or None,
                                      reward_score=boxed_reward(text, answer), metrics={},
                                      extra_fields={"reward_extra_info": {}, "min_global_steps": step,
                                                    "max_global_steps": step})
                field = out.as_dict()
                field.pop("multi_modal_data", None)  # the agent loop does not store raw images
                field.update(prompt, session_id=session)
                field["loss_mask"] = field["response_mask"]
                field["input_ids"] = torch.cat([field["prompts"], field["responses"]])
                ids = field["input_ids"]
                field["position_ids"], field["multi_modal_inputs"] = self.vision_fields(out, ids)
                keys.append(f"{uid}_{session}_0")
                fields.append(field)
                p, r = field["prompts"].numel(), field["responses"].numel()
                tags.append({"status": "success", "prompt_len": p, "response_len": r, "seq_len": p + r,
                             "global_steps": step, "min_global_steps": step, "max_global_steps": step})
            tq.kv_batch_put(keys=keys, fields=list_of_dict_to_tensordict(fields), tags=tags,
                            partition_id="train")
            tq.kv_put(key=uid, partition_id="train", tag={"status": "finished"})


class _NoServers:
    """verl's LLMServerManager with no rollout server (vLLM / SGLang cannot run here)."""

    def get_replicas(self):
        return []

    def get_client(self):
        return None


class _NoWeightSync:
    """verl's CheckpointEngineManager with nothing to sync to (no rollout server)."""

    def __init__(self, *args, **kwargs):
        self.updates = []

    def update_weights(self, global_steps=None):
        self.updates.append(global_steps)

    def sleep_replicas(self):
        return None


class _NoRewardLoop:
    """verl's RewardLoopManager when the rollouts carry their rewards (the streaming reward path)."""

    def __init__(self, *args, **kwargs):
        self.reward_loop_worker_handles = []


def stub_servers(monkeypatch) -> None:
    """The three stubs, in verl's v1 trainer module (the driver's view; the workers are untouched)."""
    from verl.trainer.ppo.v1 import trainer_base

    monkeypatch.setattr(trainer_base.LLMServerManager, "create", classmethod(lambda cls, **kw: _NoServers()))
    monkeypatch.setattr(trainer_base, "CheckpointEngineManager", _NoWeightSync)
    monkeypatch.setattr(trainer_base, "RewardLoopManager", _NoRewardLoop)


def record_updates(monkeypatch, log: list) -> None:
    """Records, per actor update, what verl's update trains on (read back from TransferQueue): per key, the
    advantages, the old log-probs and whether the row is verl's padding."""
    import transfer_queue as tq
    from verl.trainer.ppo.v1 import trainer_base

    original = trainer_base.PPOTrainer._update_actor

    def update(self, batch, metrics):
        td = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                             select_fields=["advantages", "old_log_probs", "ref_log_prob", "response_mask"])
        rows = {}
        for i, key in enumerate(batch.keys):
            n = int(td["response_mask"][i].sum())
            rows[key] = {f: td[f][i][:n].clone() for f in ("advantages", "old_log_probs", "ref_log_prob")}
            rows[key]["is_padding"] = bool(batch.tags[i].get("is_padding", False))
        log.append({"step": self.global_steps, "rows": rows})
        out = original(self, batch, metrics)
        log[-1]["metrics"] = {k: v for k, v in metrics.items() if k.startswith(("actor/", "cepo/"))}
        return out

    monkeypatch.setattr(trainer_base.PPOTrainer, "_update_actor", update)


def record_cepo_stage(monkeypatch, log: list) -> None:
    """Records, per CEPO stage, the batch it reweighted (verl's A and old log-probs, the rollout rows), what
    its scorer returned for each teacher batch (and their position ids and multi_modal_inputs), the A_hat it
    wrote, and the scorer run on the rollout rows themselves, with their images for a vision-language policy
    (which must give verl's old log-probs)."""
    from cepo_kernels.integrations.verl import advantages as cva
    from cepo_kernels.integrations.verl import trainer as cvt
    from cepo_kernels.integrations.verl import vision as cvv

    original = cvt.cepo_reweight

    def reweight(data, tokenizer, scorer, settings, step, algo="cepo", **kwargs):
        b = data.batch
        P = b["prompts"].shape[1]
        mask = b["response_mask"].bool()
        prompts = [b["prompts"][i][b["attention_mask"][i, :P].bool()].tolist() for i in range(len(data))]
        responses = [b["responses"][i][mask[i]].tolist() for i in range(len(data))]
        pad = cva._pad_id(tokenizer)
        if cvv.is_multimodal(data):  # the rollout rows with their images and positions (no answer)
            rows = cvv.row_images(data)
            own = scorer(cvv.vision_teacher_batch(prompts, responses, rows, pad, mask.shape[1], "cpu"))
        else:
            own = scorer(cva.teacher_batch(prompts, responses, pad, mask.shape[1], "cpu"))
        calls, vision = [], []

        def recording(batch):
            out = scorer(batch)
            calls.append((batch.batch["input_ids"].clone(), batch.batch["attention_mask"].clone(),
                          batch.batch["response_mask"].clone(), out.clone()))
            mm = batch.non_tensor_batch.get("multi_modal_inputs")
            vision.append((batch.batch["position_ids"].clone(), mm))
            return out

        record = {"step": step, "algo": algo, "A": b["advantages"].clone(), "mask": mask.clone(),
                  "old_log_probs": b["old_log_probs"].clone(), "own": own, "prompts": prompts,
                  "responses": responses, "calls": calls, "vision": vision, "settings": settings}
        metrics = original(data, tokenizer, recording, settings, step, algo, **kwargs)
        record.update(a_hat=b["advantages"].clone(), metrics=dict(metrics))
        log.append(record)
        return metrics

    monkeypatch.setattr(cvt, "cepo_reweight", reweight)


def run(monkeypatch, tmp, algo: str, world_size: int = 2, steps: int = 2, model=make_model_dir,
        dataset=make_data, writer=None, overrides=(), **cepo) -> dict:
    """One training run of `algo` through verl's trainer; returns the records, the rollout writer and the
    trainer. `model(dir)` and `dataset(file)` write the checkpoint and the parquet (once per tmp);
    `writer(trainer)` makes the rollout writer (default: `RolloutWriter` on the trainer's tokenizer). The
    worker group's processes are ended before returning."""
    import ray
    from verl.trainer.ppo.v1 import get_trainer_cls

    model_dir = str(tmp / "model")
    if not os.path.isdir(model_dir):
        model(model_dir)
    data = str(tmp / "train.parquet")
    if not os.path.exists(data):
        dataset(data)
    cfg = config(model_dir, data, algo, world_size, steps, overrides, **cepo)
    stub_servers(monkeypatch)
    updates: list = []
    stages: list = []
    record_updates(monkeypatch, updates)
    record_cepo_stage(monkeypatch, stages)
    trainer = get_trainer_cls(cfg.trainer.v1.trainer_mode)(config=cfg)
    trainer.init()
    writer = writer(trainer) if writer is not None else RolloutWriter(trainer.tokenizer)
    try:
        trainer.fit(writer)
    finally:  # this run's worker processes and its placement groups (the logical GPU slots) go
        for handle in getattr(trainer.actor_rollout_wg, "_workers", []):
            ray.kill(handle)
        for pool in trainer.resource_pool_manager.resource_pool_dict.values():
            for pg in pool.pgs or []:
                ray.util.remove_placement_group(pg)
    return {"updates": updates, "stages": stages, "writer": writer, "trainer": trainer}


def key_of(writer: RolloutWriter, key: str) -> tuple[int, int]:
    """(dataset index, session) of a TransferQueue key `{uid}_{session}_0`."""
    uid, session, _ = key.rsplit("_", 2)
    return writer.uid_index[uid], int(session)


__all__ = ["N", "PROMPTS", "RESPONSES", "T", "RolloutWriter", "config", "key_of", "ray_env", "run"]


@contextlib.contextmanager
def ray_session(tmp, watchdog_s: int):
    """Ray on this CPU as the real-verl tests run it: verl's CPU platform plugin, the adapter's trainer
    registered, a watchdog (past watchdog_s, stacks are dumped and the process exits); everything is put back
    on exit. Inside, `transfer_queue(tmp)` starts verl's TransferQueue."""
    import ray

    env = ray_env()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if k != "PYTHONPATH"})
    import verl_cpu_plugin
    from verl.plugin.platform import platform_manager

    import cepo_kernels.integrations.verl.trainer  # noqa: F401  (registers trainer_mode=cepo in the driver)

    previous = platform_manager._current_platform
    platform_manager.set_platform(verl_cpu_plugin.PlatformCPU())
    faulthandler.dump_traceback_later(watchdog_s, exit=True)
    ray.init(num_cpus=10, num_gpus=2, include_dashboard=False, runtime_env={"env_vars": env},
             log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        faulthandler.cancel_dump_traceback_later()
        platform_manager._current_platform = previous
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def transfer_queue(tmp):
    """verl's TransferQueue, configured as `config` does, closed on exit."""
    import transfer_queue as tq

    tq.init(config(str(tmp / "model"), str(tmp / "train.parquet"), "grpo", 2, 1).transfer_queue)
    try:
        yield
    finally:
        tq.close()
