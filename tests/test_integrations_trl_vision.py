"""CEPOTrainer with a vision-language policy (tiny Qwen2.5-VL and Qwen3-VL checkpoints written by
save_tiny_vl, images drawn in code): TRL's own vision-language GRPO tests on GRPOTrainer and CEPOTrainer
alike, and the teachers' log-probs against plain forwards of the model.

Processor path: `load_processor(path)`, i.e. `VisionProcessor` (the checkpoint's tokenizer and PIL image
processor composed, a transformers ProcessorMixin) in the CI venv, where torchvision does not import; where it
does, `load_processor` returns transformers' `AutoProcessor` (Qwen2_5_VLProcessor / Qwen3VLProcessor) and
these tests run on it instead. Either way GRPOTrainer tokenises the prompts, generates and scores through it.
`test_processor_path_trains_and_teachers_equal_plain_forward` and `test_rows_with_and_without_an_image` name
the processor: `VisionProcessor` in every venv, `AutoProcessor` where torchvision imports (skipped elsewhere;
docs/vision.md says where it ran).

Tolerances (house rule, as tests/test_step_vision.py): the teacher's log-probs are compared with a float64 run
of the same model on one plain forward; the error may be at most twice the float32 plain forward's own error
plus 16 float32 eps of the log-probs' size.
"""

import copy

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed (pip install -e '.[trl]')")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

from trl_helpers import tiny_config  # noqa: E402

from cepo_kernels.integrations import trl as cepo_trl  # noqa: E402
from cepo_kernels.rl.vision_model import VL_KINDS, load_processor, load_vision_model, save_tiny_vl  # noqa: E402
from cepo_kernels.step.contexts import encode  # noqa: E402

TRAINERS = ["grpo", "cepo"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl")
    return {kind: save_tiny_vl(root / kind, kind) for kind in VL_KINDS}


def draw(seed, size=(64, 64)):
    """An image drawn in code: a background and two filled shapes, colours and places from the seed."""
    from PIL import Image, ImageDraw

    g = torch.Generator().manual_seed(seed)
    colour = lambda: tuple(int(c) for c in torch.randint(0, 256, (3,), generator=g))  # noqa: E731
    im = Image.new("RGB", size, colour())
    pen = ImageDraw.Draw(im)
    for shape in (pen.rectangle, pen.ellipse):
        x, y = (int(v) for v in torch.randint(0, min(size) // 2, (2,), generator=g))
        shape([x, y, x + min(size) // 3, y + min(size) // 3], fill=colour())
    return im


def vl_dataset(n=4, multi=False, seed=0, mixed=False):
    """Conversational prompts with an `image` column (or `images`: two of different sizes per row; mixed: one
    image in the even rows, none in the odd ones), and the reference answers CEPO's positive teacher reads."""
    from datasets import Dataset

    rows = []
    for i in range(n):
        row = {"prompt": [{"role": "user", "content": "how many shapes?"}], "answer": str(i % 3 + 1)}
        if multi:
            row["images"] = [draw(seed + 2 * i), draw(seed + 2 * i + 1, (32, 64))]
        elif mixed:
            row["images"] = [] if i % 2 else [draw(seed + i)]
        else:
            row["image"] = draw(seed + i)
        rows.append(row)
    return Dataset.from_list(rows)


def digit_reward(completions, **kwargs):
    """The share of digits in the completion: mixed rewards in [0, 1], so groups hold rejected completions."""
    texts = [c[0]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def make(kind, model_kind, checkpoints, tmp_path, *, model=None, dataset=None, cls=None, peft_config=None,
         processor=None, **kw):
    path = checkpoints[model_kind]
    trainer_cls = cls or (cepo_trl.GRPOTrainer if kind == "grpo" else cepo_trl.CEPOTrainer)
    cfg = cepo_trl.GRPOConfig if kind == "grpo" else cepo_trl.CEPOConfig
    args = tiny_config(cfg, tmp_path / kind, **{"learning_rate": 0.1, "max_steps": 2, "num_generations": 2,
                                                "per_device_train_batch_size": 4, **kw})
    model = model if model is not None else load_vision_model(path)
    return trainer_cls(model=model, reward_funcs=digit_reward, args=args,
                       train_dataset=dataset if dataset is not None else vl_dataset(),
                       processing_class=processor or load_processor(path), peft_config=peft_config)


def train_and_check(trainer, frozen=lambda name: False):
    """Train; a loss was logged, every parameter moved except the `frozen` names, which did not."""
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    for n, p in before.items():
        same = torch.equal(p, trainer.model.get_parameter(n))
        assert same == frozen(n), f"{n}: {'unchanged' if same else 'changed'}"
    return trainer


def tower(name):
    return ".visual." in name or name.startswith("visual.")


# ---- TRL's vision-language GRPO tests (tests/test_grpo_trainer.py, TestGRPOTrainerVLM), rewritten on local
# ---- tiny checkpoints; the Liger and vLLM variants are not ported (neither is installed here)

@pytest.mark.parametrize("kind", TRAINERS)
@pytest.mark.parametrize("model_kind", VL_KINDS)
def test_train_vlm(checkpoints, tmp_path, kind, model_kind):
    """Full fine-tuning of the language model with the vision tower frozen (requires_grad off, as LoRA and
    cepo-train leave it): every language-model parameter moves, the tower's do not."""
    model = load_vision_model(checkpoints[model_kind])
    model.model.visual.requires_grad_(False)
    tr = make(kind, model_kind, checkpoints, tmp_path, model=model)
    train_and_check(tr, frozen=lambda n: tower(n))
    if kind == "cepo":
        assert tr.cepo_last["teacher_rows"] > 0


@pytest.mark.parametrize("kind", TRAINERS)
def test_train_vlm_beta_non_zero(checkpoints, tmp_path, kind):
    """beta > 0: the reference model TRL loads from the checkpoint's path; the whole model trains (TRL's test:
    every parameter moves, the vision tower's too)."""
    tr = make(kind, "qwen2_5_vl", checkpoints, tmp_path, model=str(checkpoints["qwen2_5_vl"]), beta=0.1)
    train_and_check(tr)


@pytest.mark.parametrize("kind", TRAINERS)
@pytest.mark.parametrize("model_kind", VL_KINDS)
def test_train_vlm_peft(checkpoints, tmp_path, kind, model_kind):
    """LoRA on the language model (the vision tower excluded by name, as cepo-train's apply_lora): the base
    weights do not move, the adapters do, and no adapter sits in the tower."""
    from peft import LoraConfig

    lora = LoraConfig(target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"],
                      exclude_modules=r".*visual.*")
    tr = make(kind, model_kind, checkpoints, tmp_path, peft_config=lora)
    names = [n for n, _ in tr.model.named_parameters()]
    assert not [n for n in names if "lora_" in n and tower(n)]
    assert [n for n in names if "lora_" in n]
    train_and_check(tr, frozen=lambda n: "lora_" not in n)


@pytest.mark.parametrize("kind", TRAINERS)
def test_train_vlm_and_importance_sampling(checkpoints, tmp_path, kind):
    """steps_per_generation = 2: one generation batch feeds two optimizer steps (old log-probs computed)."""
    model = load_vision_model(checkpoints["qwen2_5_vl"])
    model.model.visual.requires_grad_(False)
    tr = make(kind, "qwen2_5_vl", checkpoints, tmp_path, model=model, steps_per_generation=2,
              per_device_train_batch_size=2)
    train_and_check(tr, frozen=tower)


@pytest.mark.parametrize("kind", TRAINERS)
def test_train_vlm_multi_image(checkpoints, tmp_path, kind):
    """An `images` column: two images of different sizes per prompt."""
    model = load_vision_model(checkpoints["qwen3_vl"])
    model.model.visual.requires_grad_(False)
    tr = make(kind, "qwen3_vl", checkpoints, tmp_path, model=model, dataset=vl_dataset(multi=True))
    train_and_check(tr, frozen=tower)


@pytest.mark.parametrize("kind", TRAINERS)
def test_train_vlm_with_pad_to_multiple_of(checkpoints, tmp_path, kind):
    model = load_vision_model(checkpoints["qwen2_5_vl"])
    model.model.visual.requires_grad_(False)
    tr = make(kind, "qwen2_5_vl", checkpoints, tmp_path, model=model, pad_to_multiple_of=7)
    train_and_check(tr, frozen=tower)


@pytest.mark.parametrize("kind", TRAINERS)
def test_train_vlm_log_multimodal_false(checkpoints, tmp_path, kind):
    tr = make(kind, "qwen2_5_vl", checkpoints, tmp_path, log_completions=True, log_multimodal=False,
              max_steps=1)
    tr.train()
    assert len(tr._logs["images"]) == 0


# ---- the teachers' log-probs

COMPLETIONS = ["12ab3", "x7", "a4b", "99cd"]  # fixed, so two runs differing only in their images compare


class Captured(cepo_trl.CEPOTrainer):
    """CEPOTrainer whose completions are fixed strings (the same whatever the image), recording TRL's output
    and the teachers' log-probs (cepo_observer) of each generation."""

    def __init__(self, *args, **kwargs):
        kwargs["cepo_observer"] = lambda record, tensors: self.seen.append((record, tensors))
        super().__init__(*args, **kwargs)
        self.seen, self.outputs, self.answers = [], [], []

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *a, **k):
        fixed = [encode(self._tokenizer, COMPLETIONS[i % len(COMPLETIONS)]) for i in range(len(prompt_ids))]
        return fixed, None

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.outputs.append(output)
        self.answers.append([x["answer"] for x in inputs])  # r+ of each local row
        return output


def teacher_run(checkpoints, tmp_path, model_kind, seed=0, dataset=None, **kw):
    model = load_vision_model(checkpoints[model_kind])
    initial = copy.deepcopy(model).eval()
    tr = make("cepo", model_kind, checkpoints, tmp_path, model=model, cls=Captured, max_steps=1,
              dataset=dataset if dataset is not None else vl_dataset(seed=seed), **kw)
    tr.train()
    (record, tensors), output = tr.seen[0], tr.outputs[0]
    assert tensors["rows"], "no teacher rows"
    return initial, tr, record, tensors, output


def row_inputs(output, i, answer, tok, *, image=True, image_ids=()):
    """Row i's [prompt | " " + answer | completion] (answer None: the policy's) from TRL's output, built
    here: the prompt without padding, its images (pixel rows by image_grid_thw and num_images),
    mm_token_type_ids 1 on its image run only."""
    prompt = output["prompt_ids"][i][output["prompt_mask"][i].bool()].tolist()
    completion = output["completion_ids"][i][output["completion_mask"][i].bool()].tolist()
    ids = torch.tensor([prompt + ([] if answer is None else encode(tok, " " + answer)) + completion])
    if not image:  # the authors' image-blind teacher: placeholders -> pad, a plain count on the three axes
        for t in image_ids:
            ids[ids == t] = tok.pad_token_id
        pos = torch.arange(ids.shape[1])[None, None].expand(3, 1, -1)
        return dict(input_ids=ids, position_ids=pos), completion
    grid, num = output["image_grid_thw"], output["num_images"]
    if not num[i]:  # a row without an image: text only
        return dict(input_ids=ids), completion
    mm = torch.zeros_like(ids)
    mm[0, : len(prompt)] = (torch.tensor(prompt) == image_ids[0]).long()
    first = sum(num[:i])
    rows = grid.prod(-1).tolist()
    pv = output["pixel_values"][sum(rows[:first]) : sum(rows[: first + num[i]])]
    return dict(input_ids=ids, mm_token_type_ids=mm, pixel_values=pv,
                image_grid_thw=grid[first : first + num[i]]), completion


def plain(model, inputs, n, dtype):
    """Log-probs of the last n tokens from one plain forward (logits -> log_softmax in dtype)."""
    inputs = {k: v.to(dtype) if k == "pixel_values" else v for k, v in inputs.items()}
    with torch.no_grad():
        logits = model(**inputs, attention_mask=torch.ones_like(inputs["input_ids"])).logits[0]
    targets = inputs["input_ids"][0, -n:]
    lp = torch.log_softmax(logits[-n - 1 : -1].to(dtype), dim=-1)
    return lp.gather(1, targets[:, None])[:, 0]


def tolerance(p32, p64):
    err32 = (p32.double() - p64).abs().max()
    return 2 * err32 + 16 * torch.finfo(torch.float32).eps * (1 + p64.abs().max())


def check_teachers(initial, tr, record, tensors, output, *, image=True):
    tok, G = tr._tokenizer, tr.num_generations
    m64 = copy.deepcopy(initial).double()
    image_ids = (tr._image_pad_token_id, tr._video_pad_token_id)
    for i in tensors["rows"]:
        for side, answer in (("pos_logp", tr.answers[0][i]), ("neg_logp", record["neg_answers"][i // G])):
            inputs, completion = row_inputs(output, i, answer, tok, image=image, image_ids=image_ids)
            n = len(completion)
            p32, p64 = plain(initial, inputs, n, torch.float32), plain(m64, inputs, n, torch.float64)
            got = tensors[side][i, :n].double()
            assert (got - p64).abs().max() <= tolerance(p32, p64), (side, i)


@pytest.mark.parametrize("kernels", [False, True], ids=["trl-head", "kernel-head"])
@pytest.mark.parametrize("model_kind", VL_KINDS)
def test_teacher_equals_plain_forward_with_image(checkpoints, tmp_path, model_kind, kernels):
    """Both teachers of CEPOTrainer's pass equal one plain forward of the model on
    [prompt | " " + r | completion] with the row's image, through TRL's head and through the kernels on the
    language model's lm_head."""
    run = teacher_run(checkpoints, tmp_path, model_kind, cepo_kernel_logprobs=kernels)
    check_teachers(*run)


def test_kernel_head_policy_equals_plain_forward_with_image(checkpoints, tmp_path, monkeypatch):
    """cepo_kernel_logprobs=True: the policy's log-probs in the loss (the kernels on the language model's
    lm_head, TRL's multimodal fields sliced per micro-batch) equal one plain forward with the row's image."""
    from cepo_kernels.integrations.trl.head import KernelHead

    seen, real = [], KernelHead._cepo_policy_logprobs

    def spy(self, targets, *args):
        out = real(self, targets, *args)
        seen.append((targets.clone(), out[0].detach().clone()))
        return out

    monkeypatch.setattr(KernelHead, "_cepo_policy_logprobs", spy)
    initial, tr, _, _, output = teacher_run(checkpoints, tmp_path, "qwen3_vl", cepo_kernel_logprobs=True)
    assert len(seen) == 1  # one micro-batch: the loss's forward, before the update
    targets, logp = seen[0]
    # TRL shuffles the generation batch before the loss: find each row by its completion (all distinct)
    rows = range(len(targets))
    where = [next(i for i in rows if torch.equal(output["completion_ids"][i], t)) for t in targets]
    assert sorted(where) == list(rows)
    m64 = copy.deepcopy(initial).double()
    for j, i in enumerate(where):
        inputs, completion = row_inputs(output, i, None, tr._tokenizer, image_ids=(tr._image_pad_token_id,))
        n = len(completion)
        p32, p64 = plain(initial, inputs, n, torch.float32), plain(m64, inputs, n, torch.float64)
        assert (logp[j, :n].double() - p64).abs().max() <= tolerance(p32, p64), i


@pytest.mark.parametrize("model_kind", VL_KINDS)
def test_image_blind_option_equals_authors_construction(checkpoints, tmp_path, model_kind):
    """teacher_sees_image=False: placeholder ids -> pad id, no pixel_values, positions a plain count."""
    run = teacher_run(checkpoints, tmp_path, model_kind, teacher_sees_image=False)
    check_teachers(*run, image=False)


PROCESSOR_KINDS = ["VisionProcessor", "AutoProcessor"]
PROCESSOR_CLASS = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}


def named_processor(processor_kind, path):
    """`VisionProcessor` (the checkpoint's tokenizer and PIL image processor, whatever imports) or
    transformers' `AutoProcessor` (skipped where torchvision does not import)."""
    from transformers import AutoProcessor, AutoTokenizer, Qwen2VLImageProcessorPil
    from transformers.utils import is_torchvision_available

    from cepo_kernels.rl.vision_model import VisionProcessor

    if processor_kind == "VisionProcessor":
        return VisionProcessor(AutoTokenizer.from_pretrained(path, local_files_only=True),
                               Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True))
    if not is_torchvision_available():
        pytest.skip("torchvision does not import beside this torch (docs/vision.md)")
    return AutoProcessor.from_pretrained(path, local_files_only=True)


@pytest.mark.parametrize("processor_kind", PROCESSOR_KINDS)
def test_rows_with_and_without_an_image(checkpoints, tmp_path, processor_kind):
    """A batch mixing prompts with an image and prompts without one (an empty `images` list): with
    VisionProcessor each row's teachers get that row's image, or none, and equal its plain forward. With
    AutoProcessor TRL 1.16 itself stops at the batch (GRPOTrainer alike): it passes None for an image-less
    row, which transformers 5.25's Qwen-VL processor refuses (docs/trl.md)."""
    proc = named_processor(processor_kind, checkpoints["qwen3_vl"])
    kw = dict(dataset=vl_dataset(n=2, mixed=True), processor=proc)
    if processor_kind == "AutoProcessor":
        with pytest.raises(TypeError, match=r"entries is supported but got type=<class 'NoneType'>"):
            teacher_run(checkpoints, tmp_path, "qwen3_vl", **kw)
        return
    initial, tr, record, tensors, output = teacher_run(checkpoints, tmp_path, "qwen3_vl", **kw)
    assert sorted(output["num_images"]) == [0, 0, 1, 1]
    check_teachers(initial, tr, record, tensors, output)


@pytest.mark.parametrize("processor_kind", PROCESSOR_KINDS)
@pytest.mark.parametrize("model_kind", VL_KINDS)
def test_processor_path_trains_and_teachers_equal_plain_forward(checkpoints, tmp_path, model_kind,
                                                                processor_kind):
    """The named processor as `processing_class`: a two-step CEPOTrainer run trains (every language-model
    parameter moves, the frozen tower's do not), and both teachers equal one plain forward with the image."""
    proc = named_processor(processor_kind, checkpoints[model_kind])
    expected = PROCESSOR_CLASS[model_kind] if processor_kind == "AutoProcessor" else "VisionProcessor"
    assert type(proc).__name__ == expected
    model = load_vision_model(checkpoints[model_kind])
    model.model.visual.requires_grad_(False)
    tr = make("cepo", model_kind, checkpoints, tmp_path / "train", model=model, processor=proc)
    train_and_check(tr, frozen=tower)
    assert tr.cepo_last["teacher_rows"] > 0
    run = teacher_run(checkpoints, tmp_path / "teachers", model_kind,
                      processor=named_processor(processor_kind, checkpoints[model_kind]))
    assert type(run[1].processing_class).__name__ == expected
    check_teachers(*run)


def test_teacher_that_sees_another_image_differs(checkpoints, tmp_path):
    """Two runs whose datasets differ only in the images' pixels (same sizes, same completions): the
    image-aware teachers' log-probs differ by far more than their tolerance; the image-blind teachers' are
    equal."""
    a = teacher_run(checkpoints, tmp_path / "a", "qwen2_5_vl", seed=0)
    b = teacher_run(checkpoints, tmp_path / "b", "qwen2_5_vl", seed=100)
    assert torch.equal(a[4]["prompt_ids"], b[4]["prompt_ids"]) and a[3]["rows"] == b[3]["rows"]
    assert not torch.equal(a[4]["pixel_values"], b[4]["pixel_values"])
    i = a[3]["rows"][0]
    inputs, completion = row_inputs(a[4], i, a[1].answers[0][i], a[1]._tokenizer,
                                    image_ids=(a[1]._image_pad_token_id,))
    n = len(completion)
    tol = tolerance(plain(a[0], inputs, n, torch.float32), plain(copy.deepcopy(a[0]).double(), inputs, n,
                                                                   torch.float64))
    assert (a[3]["pos_logp"][i, :n] - b[3]["pos_logp"][i, :n]).abs().max() > 10 * tol
    blind = [teacher_run(checkpoints, tmp_path / f"blind{s}", "qwen2_5_vl", seed=s,
                         teacher_sees_image=False)[3] for s in (0, 100)]
    for side in ("pos_logp", "neg_logp"):
        assert torch.equal(blind[0][side], blind[1][side])


def test_two_processes_fsdp2_rank_without_teacher_rows(checkpoints, tmp_path):
    """2 processes (torchrun, gloo, CPU) under FSDP2 (each decoder layer and vision block sharded): rank 0's
    rows get teacher passes, rank 1's none (its group's completions are equal), so rank 1 runs the passes that
    keep it in step with rank 0's four teacher forwards (FSDP2 gathers collectively, TRL's fused head gathers
    the lm_head weight); the run ends, and rank 0's teachers equal the plain forward (house rule)."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(root / "tests" / "trl_vision_dist.py"), str(checkpoints["qwen3_vl"]), str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2 and r0["dtensors"] and r1["dtensors"]
    assert (r0["rows"], r1["rows"]) == ([0, 1], [])
    assert r0["teacher_rows"] == r1["teacher_rows"] == 2
    assert r0["teacher_forwards"] == r1["teacher_forwards"] == 4
    for got, p32, p64 in zip(r0["got"], r0["p32"], r0["p64"], strict=True):
        got, p32, p64 = (torch.tensor(v, dtype=torch.float64) for v in (got, p32, p64))
        assert (got - p64).abs().max() <= tolerance(p32, p64)


def test_teacher_sees_image_is_checked_by_the_one_validator(tmp_path):
    """CEPOConfig's teacher_sees_image is CEPOOptions' (the knob of cepo-train): a non-bool names it."""
    assert tiny_config(cepo_trl.CEPOConfig, tmp_path).options.teacher_sees_image is True
    with pytest.raises(TypeError, match="teacher_sees_image: expected a bool, got 'no'"):
        tiny_config(cepo_trl.CEPOConfig, tmp_path, teacher_sees_image="no")
