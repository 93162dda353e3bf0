"""CEPO inside verl's own trainer on a vision-language policy, on a CPU (tests/verl_real_harness.py): a tiny
Qwen3-VL checkpoint saved locally (`rl/vision_model.save_tiny_vl`), a parquet in verl's format with an
`images` column (images drawn in code, PNG bytes), verl's RLHFDataset and dataloader, verl's FSDP2 actor
worker group on two data-parallel ranks, the trainer `get_trainer_cls("cepo")` returns (`CEPOPPOTrainer`),
two steps image-aware and one image-blind (`+algorithm.cepo.teacher_sees_image=false`).

What is not verl's own, and why:
- the processor: verl builds it with `AutoProcessor`, and transformers 5.10.4's Qwen-VL processor classes need
  torchvision, which does not import beside torch 2.13.0+cpu; verl's `hf_processor` then returns None. The
  test-only plugin (tests/verl_cpu_plugin.py) gives verl the package's `VisionProcessor` there instead (the
  checkpoint's tokenizer and PIL image processor, the model's `get_rope_index` bound as verl binds it);
- generation, as in tests/test_verl_real.py: fixed rollouts written to TransferQueue the way verl's agent
  loop writes them, with the images: the prompt through the processor, then verl's own
  `AgentLoopWorker._compute_multi_modal_inputs` and `_compute_position_ids` for each rollout's
  `multi_modal_inputs` and [4, L] position ids. The images are read from the prompt's messages as verl's
  dataset built them (verl's `process_vision_info` uses qwen_vl_utils, which needs torchvision; the images
  are drawn at multiples of 32 pixels, so its resize would leave them as they are).
"""

import io
import types

import pytest

for _module in ("verl", "ray", "transfer_queue", "pandas"):
    pytest.importorskip(_module, reason="needs verl 0.9.x, Ray and TransferQueue with a transformers verl "
                        "accepts: CI runs this in a second venv (.ci/run, .ci/constraints-verl.txt)")

from verl_helpers import transformers_verl_accepts  # noqa: E402

if not transformers_verl_accepts():
    pytest.skip("verl's trainer needs a transformers verl accepts (verl 0.9.1: >=5.5.3,!=5.6.0,<5.11); CI "
                "runs this in .venv-verl (.ci/run)", allow_module_level=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cepo_kernels.rl.vision_model import (  # noqa: E402
    VisionProcessor,
    load_processor,
    load_vision_model,
    save_tiny_vl,
)

pytestmark = pytest.mark.filterwarnings("ignore")
WATCHDOG_S = 600  # the whole module (Ray, two runs, shutdown): past this, stacks are dumped and it exits
SIZES = [(64, 64), (64, 32), (32, 64)]  # (width, height): 4, 2 and 2 language-model tokens (Qwen3-VL)


def image(index: int):
    """The image of dataset row `index`: seeded noise, one of SIZES."""
    from PIL import Image

    w, h = SIZES[index % len(SIZES)]
    pixels = np.random.default_rng(index).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def make_vl_data(path: str) -> str:
    """verl's RL parquet with an `images` column: one image per prompt, `<image>` where it goes."""
    import pandas as pd
    import verl_real_harness as H

    rows = []
    for i, (a, b) in enumerate(H.PROMPTS):
        png = io.BytesIO()
        image(i).save(png, format="PNG")
        rows.append({"data_source": "arith_image",
                     "prompt": [{"role": "user", "content": f"<image>what is {a} plus {b} ?"}],
                     "images": [{"bytes": png.getvalue()}],
                     "reward_model": {"ground_truth": str(a + b), "style": "rule"},
                     "extra_info": {"index": i}})
    pd.DataFrame(rows).to_parquet(path)
    return path


def vision_writer(trainer):
    """The harness's rollout writer with images, on the processor verl's trainer built."""
    import verl_real_harness as H
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    class VisionRolloutWriter(H.RolloutWriter):
        responses = [r.replace(" <eos>", "<|im_end|>") for r in H.RESPONSES]

        def __init__(self, processor):
            super().__init__(processor.tokenizer)
            self.processor, self.images = processor, {}  # dataset index -> the image its rollouts carry
            # verl's agent-loop worker as far as its two multimodal methods read it
            self.loop = types.SimpleNamespace(processor=processor, tokenizer=processor.tokenizer,
                                              mm_processor_kwargs={})
            self.loop._get_mm_processor_kwargs = types.MethodType(AgentLoopWorker._get_mm_processor_kwargs,
                                                                  self.loop)

        def prompt_ids(self, prompt):
            messages = prompt["raw_prompt"]
            images = [c["image"].convert("RGB") for m in messages if isinstance(m["content"], list)
                      for c in m["content"] if c.get("type") == "image"]
            self.images[int(prompt["extra_info"]["index"])] = images
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.processor(text=[text], images=images)["input_ids"][0].tolist()
            return ids, {"images": images}

        def vision_fields(self, output, input_ids):
            mm = AgentLoopWorker._compute_multi_modal_inputs(self.loop, output, input_ids)
            ones = torch.ones_like(input_ids)[None]
            return AgentLoopWorker._compute_position_ids(self.loop, input_ids[None], ones, mm)[0], mm

    return VisionRolloutWriter(trainer.processor)


OVERRIDES = ["data.max_prompt_length=64", "data.max_response_length=24"]
SAVE = ["trainer.save_freq=2", "actor_rollout_ref.actor.checkpoint.save_contents=[hf_model]"]  # after step 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import verl_real_harness as H

    tmp = tmp_path_factory.mktemp("verl_real_vision")
    model = lambda path: save_tiny_vl(path, "qwen3_vl", seed=0)  # noqa: E731
    with H.ray_session(tmp, WATCHDOG_S):
        out = {}
        with H.transfer_queue(tmp):
            for name, steps, sees, save in (("aware", 2, "true", SAVE), ("blind", 1, "false", [])):
                ckpt = [f"trainer.default_local_dir={tmp / name}"] + save
                with pytest.MonkeyPatch.context() as mp:
                    out[name] = H.run(mp, tmp, "cepo", 2, steps, model=model, dataset=make_vl_data,
                                      writer=vision_writer, overrides=OVERRIDES + ckpt, lam0=0.5, t_warm=4,
                                      teacher_sees_image=sees)
                out[name]["dir"] = tmp / name
        yield out


def test_verls_trainer_ran_with_a_vision_processor(runs):
    from transformers.utils import is_torchvision_available

    from cepo_kernels.integrations.verl.trainer import CEPOPPOTrainer

    for name, steps in (("aware", 2), ("blind", 1)):
        trainer = runs[name]["trainer"]
        assert type(trainer) is CEPOPPOTrainer
        # verl's own Qwen3VLProcessor where torchvision imports; the plugin's VisionProcessor where not
        want = "Qwen3VLProcessor" if is_torchvision_available() else VisionProcessor.__name__
        assert type(trainer.processor).__name__ == want and callable(trainer.processor.get_rope_index)
        assert [u["step"] for u in runs[name]["updates"]] == list(range(1, steps + 1))
        assert [s["step"] for s in runs[name]["stages"]] == list(range(steps))
        for u in runs[name]["updates"]:
            assert sum(r["is_padding"] for r in u["rows"].values()) == 1  # 11 rollouts, padded to 12
            assert "actor/pg_loss" in u["metrics"] and np.isfinite(u["metrics"]["actor/pg_loss"])
        for s in runs[name]["stages"]:
            assert s["metrics"]["cepo/lambda"] > 0 and s["metrics"]["cepo/teacher_rows"] > 0


def dataset_index(tokenizer, context) -> int:
    """The dataset row a prompt (or teacher context) was rendered from, read off its text."""
    import re

    import verl_real_harness as H

    text = tokenizer.decode(context, skip_special_tokens=True)
    a, b = re.search(r"what is (\d) plus (\d) \?", text).groups()
    return H.PROMPTS.index((int(a), int(b)))


class Oracle:
    """Plain forwards of the initial checkpoint (float32 and float64) on one row, with the image of its
    dataset row (the model computing its own M-RoPE positions), or image-blind (`test_verl_vision`'s
    `plain_logprobs`)."""

    def __init__(self, run):
        trainer = run["trainer"]
        path = trainer.config.actor_rollout_ref.model.path
        self.models = {dt: load_vision_model(path, dtype=dt).eval() for dt in (torch.float32, torch.float64)}
        self.processor, self.tokenizer = trainer.processor, trainer.tokenizer

    def image_inputs(self, index):
        return dict(self.processor.image_processor(images=[image(index)], return_tensors="pt"))

    def check(self, got, context, response, blind=False, name="row"):
        from helpers import assert_close, ulps32
        from test_verl_vision import plain_logprobs

        from cepo_kernels.integrations.verl.vision import placeholder_ids

        mm = None if blind else self.image_inputs(dataset_index(self.tokenizer, context))
        blind_ids = placeholder_ids(self.tokenizer) if blind else None
        with torch.no_grad():
            ref = {dt: plain_logprobs(m, context, mm, [], response, dt, blind_ids)
                   for dt, m in self.models.items()}
        ref64 = ref[torch.float64]
        assert_close(got[: len(response)], ref64, ref[torch.float32], atol=ulps32(ref64, 16), name=name)


def teacher_rows(stage, k):
    """Per row of the stage's k-th teacher batch: (context, response, the engine's log-probs, the row's
    multi_modal_inputs or None, its position ids, its attention mask)."""
    ids, attn, rmask, out = stage["calls"][k]
    pos, mm = stage["vision"][k]
    rows = []
    for j in range(ids.shape[0]):
        seq, n = ids[j][attn[j].bool()].tolist(), int(rmask[j].sum())
        rows.append((seq[: len(seq) - n], seq[len(seq) - n:], out[j], None if mm is None else mm[j], pos[j],
                     attn[j].bool()))
    return rows


@pytest.fixture(scope="module")
def oracle(runs):
    return Oracle(runs["aware"])


def test_verls_own_log_probs_saw_the_images(runs, oracle):
    """Step 1 (the initial weights): verl's old log-probs of every rollout row (its actor worker on the rows
    the agent loop layout wrote, multi_modal_inputs included) and the adapter's scorer on the same rows with
    their images each equal a plain forward of the checkpoint with the row's image, within the house bound."""
    stage = runs["aware"]["stages"][0]
    for i, (context, response) in enumerate(zip(stage["prompts"], stage["responses"], strict=True)):
        assert context.count(oracle.processor.image_token_id) >= 2  # the expanded image-token run
        old = stage["old_log_probs"][i].float()
        oracle.check(old, context, response, name=f"verl's old log-probs, row {i}")
        oracle.check(stage["own"][i], context, response, name=f"scorer, row {i}")


def test_image_aware_teachers_carried_the_images(runs, oracle):
    """The image-aware stage's teachers (r+ and r- rows): each row's multi_modal_inputs are its prompt's
    image as the processor gives it, its image-token run is one token per merged patch, its position ids are
    [4, L] with M-RoPE rows unlike the text count, and the engine's log-probs equal a plain forward with the
    image."""
    stage = runs["aware"]["stages"][0]
    # one teacher batch: the r+ rows, then the r- rows
    assert len(stage["calls"]) == 1 and len(stage["calls"][0][0]) == 2 * stage["metrics"]["cepo/teacher_rows"]
    merge = oracle.processor.image_processor.merge_size ** 2
    for k in range(len(stage["calls"])):
        for j, (context, response, got, mm, pos, attn) in enumerate(teacher_rows(stage, k)):
            want = oracle.image_inputs(dataset_index(oracle.tokenizer, context))
            assert torch.equal(mm["pixel_values"], want["pixel_values"])
            assert torch.equal(mm["image_grid_thw"], want["image_grid_thw"])
            tokens = int(want["image_grid_thw"].prod()) // merge
            assert context.count(oracle.processor.image_token_id) == tokens
            assert pos.shape[0] == 4 and not torch.equal(pos[1][attn], pos[0][attn])
            oracle.check(got, context, response, name=f"image-aware teacher {k}, row {j}")


def test_image_blind_teachers_saw_no_image(runs, oracle):
    """The image-blind stage: no multi_modal_inputs and no placeholder id reach the worker, the four position
    rows are the plain count, and the engine's log-probs equal the blind plain forward."""
    from cepo_kernels.integrations.verl.vision import placeholder_ids

    stage = runs["blind"]["stages"][0]
    assert len(stage["calls"]) == 1 and len(stage["calls"][0][0]) == 2 * stage["metrics"]["cepo/teacher_rows"]
    for k in range(len(stage["calls"])):
        assert stage["vision"][k][1] is None
        for j, (context, response, got, _, pos, attn) in enumerate(teacher_rows(stage, k)):
            assert not set(placeholder_ids(oracle.tokenizer)) & set(context + response)
            count = torch.arange(int(attn.sum()))
            assert all(torch.equal(pos[c][attn], count) for c in range(4))
            oracle.check(got, context, response, blind=True, name=f"image-blind teacher {k}, row {j}")


def test_the_language_model_was_trained(runs):
    """verl's checkpoint after step 2 (hf_model): a Qwen3-VL with every tensor finite and every language-model
    tensor moved from the initial weights, its processor saved beside it (the same inputs as verl's); KL in
    the loss 0 at step 1 and > 0 at step 2."""
    saved = runs["aware"]["dir"] / "global_step_2" / "actor" / "huggingface"
    assert (saved / "config.json").is_file(), "no hf_model checkpoint at step 2"
    model = load_vision_model(saved)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    trained = dict(model.named_parameters())
    path = runs["aware"]["trainer"].config.actor_rollout_ref.model.path
    initial = dict(load_vision_model(path).named_parameters())
    assert trained.keys() == initial.keys()
    lm = [n for n in initial if ".language_model." in n]
    assert lm and all(torch.isfinite(trained[n]).all() for n in trained)
    moved = [n for n in lm if not torch.equal(trained[n], initial[n])]
    assert len(moved) == len(lm), sorted(set(lm) - set(moved))
    proc, back = runs["aware"]["trainer"].processor, load_processor(saved)
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is 1 plus 2 ?<|im_end|>\n"
    a, b = proc(text=[text], images=[image(0)]), back(text=[text], images=[image(0)])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kl = [u["metrics"]["actor/kl_loss"] for u in runs["aware"]["updates"]]
    assert kl[0] == 0.0 and kl[1] > 0.0, kl
