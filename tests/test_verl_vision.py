"""The verl adapter's teacher batches for a vision-language policy (integrations/verl/vision.py), on tiny
Qwen2.5-VL and Qwen3-VL models built from configs, images drawn in code.

The student's batch is laid out as verl 0.9.1's agent loop lays it out: left-padded prompts with the expanded
image-token run, right-padded responses, per row `multi_modal_inputs` (pixel_values, image_grid_thw,
images_seqlens) and position ids [B, 4, L] computed by verl's own `AgentLoopWorker._compute_position_ids`
with the model's `get_rope_index` bound to the processor (as verl's `hf_processor` binds it). The teacher
batches are scored through the package's scorer path (`worker_group_scorer`: verl's padding helpers, its
no-padding layout) by a stand-in for the actor worker group that does what verl's FSDP engine does with a
micro-batch (`extract_multi_modal_inputs`, then the padded input_ids / attention_mask / (4, B, L)
position_ids, or the packed layout of use_remove_padding; model forward); the oracle is one plain forward
of the model on the full teacher sequence with its image, the model computing its own M-RoPE positions.

Tolerances (house rule, tests/helpers.py): err(got, float64 plain forward) <= 2 x err(float32 plain forward)
+ 16 float32 ulps of the log-probs' magnitude (the batched forward pads and reorders the same arithmetic).
"""

import pytest

pytest.importorskip("verl", reason="needs verl 0.9.x with a transformers it accepts: CI runs these tests in "
                    "a second venv (.ci/run, .ci/constraints-verl.txt)")

import copy  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from helpers import assert_close, ulps32  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402

import cepo_ref  # noqa: E402
from cepo_kernels.integrations import verl as cv  # noqa: E402
from cepo_kernels.integrations.verl import vision as vv  # noqa: E402
from cepo_kernels.rl.vision_model import (  # noqa: E402
    VL_KINDS,
    VisionProcessor,
    build_image_processor,
    build_tiny_vl_model,
    build_vl_tokenizer,
    load_processor,
    load_vision_model,
    save_tiny_vl,
)
from cepo_kernels.step import teacher_contexts  # noqa: E402
from cepo_kernels.step.contexts import encode  # noqa: E402

T = 0.7
TEACHERS = ("pos", "neg")


def noise_image(seed, size):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


class VL(types.SimpleNamespace):
    """kind, model, proc (VisionProcessor), tok, rope (a processor with the model's get_rope_index bound)."""


@pytest.fixture(scope="module", params=VL_KINDS)
def vl(request):
    tok = build_vl_tokenizer()
    model = build_tiny_vl_model(tok, request.param, seed=0).eval()
    proc = VisionProcessor(tok, build_image_processor(request.param))
    rope = types.SimpleNamespace(image_token_id=proc.image_token_id, video_token_id=proc.video_token_id,
                                 config=model.config)
    cls = type(model.model)
    rope.get_rope_index = types.MethodType(cls.get_rope_index, rope)
    if hasattr(cls, "get_vision_position_ids"):
        rope.get_vision_position_ids = types.MethodType(cls.get_vision_position_ids, rope)
    return VL(kind=request.param, model=model, proc=proc, tok=tok, rope=rope)


def verl_positions(vl, ids, attn, mm):
    """verl 0.9.1's own position ids [1, 4, L] of one row (AgentLoopWorker._compute_position_ids)."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    inputs = {**(mm or {}), "mm_token_type_ids": torch.zeros_like(ids)}  # verl recomputes them from input_ids
    return AgentLoopWorker._compute_position_ids(types.SimpleNamespace(processor=vl.rope), ids, attn, inputs)


def render(vl, question, image):
    """A row's prompt ids (unpadded, the image-token run expanded) and its multi_modal_inputs as verl's agent
    loop keeps them (the processor's pixel_values, image_grid_thw, plus images_seqlens; {} without image)."""
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
    text = vl.proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                       tokenize=False)
    enc = vl.proc(text=[text], images=None if image is None else [image])
    mm = {}
    if image is not None:
        grid = enc["image_grid_thw"]
        mm = {"pixel_values": enc["pixel_values"], "image_grid_thw": grid,
              "images_seqlens": torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])}
    return enc["input_ids"][0].tolist(), mm


def student_batch(vl, groups):
    """verl's rollout DataProto of groups [(question, image or None, r+, [(response, reward)])]."""
    from verl import DataProto

    rows = []
    for g, (question, image, ref, rollouts) in enumerate(groups):
        prompt, mm = render(vl, question, image)
        rows += [(prompt, encode(vl.tok, words), reward, str(g), ref, mm) for words, reward in rollouts]
    P, R = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    B, pad = len(rows), vl.tok.pad_token_id
    ids, attn = torch.full((B, P + R), pad), torch.zeros(B, P + R, dtype=torch.long)
    scores, pos = torch.zeros(B, R), torch.zeros(B, 4, P + R, dtype=torch.long)
    for i, (p, r, reward, *_, mm) in enumerate(rows):
        ids[i, P - len(p) : P], attn[i, P - len(p) : P] = torch.tensor(p), 1
        ids[i, P : P + len(r)], attn[i, P : P + len(r)] = torch.tensor(r), 1
        scores[i, len(r) - 1] = reward
        pos[i] = verl_positions(vl, ids[i : i + 1], attn[i : i + 1], mm)[0]
    mm = np.empty(B, dtype=object)
    mm[:] = [r[5] for r in rows]
    data = DataProto.from_dict(
        tensors={"prompts": ids[:, :P], "responses": ids[:, P:], "input_ids": ids, "attention_mask": attn,
                 "position_ids": pos, "response_mask": attn[:, P:].clone(), "token_level_rewards": scores},
        non_tensors={"uid": np.array([r[3] for r in rows], dtype=object), "multi_modal_inputs": mm,
                     "reward_model": np.array([{"ground_truth": r[4]} for r in rows], dtype=object)})
    return data, rows


class VLWorkerGroup:
    """The actor worker group's `compute_log_prob` for a vision-language model, in process: each rank's
    contiguous shard as one micro-batch, laid out as verl's FSDP engine lays out a padded micro-batch."""

    def __init__(self, model, world_size=1, packed=False):
        self.model, self.world_size, self.packed, self.calls = model, world_size, packed, []

    @torch.no_grad()
    def _micro_batch(self, td, temperature):
        from verl.utils.model import extract_multi_modal_inputs

        ids, pos = td["input_ids"], td["position_ids"]
        n, lengths = ids.size(0), ids.offsets().diff()
        mm = extract_multi_modal_inputs(td.get("multi_modal_inputs", []))
        if self.packed:  # verl's default use_remove_padding: the rows as one sequence, no attention mask
            logits = self.model(input_ids=ids.values()[None], attention_mask=None, use_cache=False,
                                position_ids=pos.values().unsqueeze(1), **mm).logits[0]
            lp = torch.log_softmax(logits.float() / temperature, dim=-1)
            lp = lp[:-1].gather(1, ids.values()[1:, None]).squeeze(1)
            ends = lengths.cumsum(0).tolist()
            return [torch.cat([lp[e - k : e - 1], lp.new_zeros(1)]) for k, e in zip(lengths.tolist(), ends,
                                                                                   strict=True)]
        L = int(lengths.max())
        input_ids = torch.nested.to_padded_tensor(ids, padding=0, output_size=(n, L))
        position_ids = torch.nested.to_padded_tensor(pos, padding=0, output_size=(n, 4, L)).transpose(0, 1)
        attn = (torch.arange(L)[None] < lengths[:, None]).long()
        logits = self.model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids,
                            use_cache=False, **mm).logits
        lp = torch.log_softmax(logits.float() / temperature, dim=-1)[:, :-1]
        lp = lp.gather(2, input_ids[:, 1:, None]).squeeze(2)
        return [torch.cat([lp[i, : int(k) - 1], lp.new_zeros(1)]) for i, k in enumerate(lengths)]

    def compute_log_prob(self, td):
        from tensordict import TensorDict
        from verl.utils import tensordict_utils as tu

        n = td["input_ids"].size(0)
        self.calls.append(td)
        out = []
        for shard in tu.chunk_tensordict(td, self.world_size):  # verl's split over the ranks
            out += self._micro_batch(shard, tu.get(td, "temperature"))
        lengths = torch.tensor([len(o) for o in out])
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        nested = torch.nested.nested_tensor_from_jagged(torch.cat(out), offsets=offsets)
        return TensorDict({"log_probs": nested}, batch_size=[n])


def plain_logprobs(model, prompt, mm, answer, response, dtype=torch.float32, blind_ids=None):
    """One plain forward of [prompt | answer | response] (the model's own positions), with the image where
    mm has one; blind_ids: the image-blind teacher instead (those ids -> pad, no image, the plain count)."""
    seq = torch.tensor([list(prompt) + list(answer) + list(response)])
    kw = {}
    if blind_ids is not None:
        for t in blind_ids:
            seq[seq == t] = model.config.text_config.pad_token_id
        kw["position_ids"] = torch.arange(seq.shape[1])[None, None].expand(3, 1, -1)
    elif mm:
        kw = {"pixel_values": mm["pixel_values"].to(dtype), "image_grid_thw": mm["image_grid_thw"],
              "mm_token_type_ids": (seq == model.config.image_token_id).long()}
    logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), **kw).logits[0]
    start = len(prompt) + len(answer)
    return cepo_ref.token_logprobs(logits[start - 1 : start - 1 + len(response)].to(dtype),
                                   torch.tensor(response), temperature=T)


def check_row(model, got, prompt, mm, answer, response, blind_ids=None, name="teacher"):
    with torch.no_grad():
        p32 = plain_logprobs(model, prompt, mm, answer, response, blind_ids=blind_ids)
        p64 = plain_logprobs(copy.deepcopy(model).double(), prompt, mm, answer, response, torch.float64,
                             blind_ids)
    assert_close(got[: len(response)], p64, p32, atol=ulps32(p64, 16), name=name)


GROUPS = [  # (question, image seed and size or None, r+, rollouts): three prompt lengths, one without image
    ("how many?", (0, (64, 64)), "2", [("\\boxed{2}", 1.0), ("\\boxed{3} a", 0.0), ("1", 0.0)]),
    ("count", (1, (32, 64)), "1", [("\\boxed{4}", 0.0), ("\\boxed{1}", 1.0)]),
    ("no image here?", None, "3", [("\\boxed{3}", 1.0), ("\\boxed{5}", 0.0)]),
]
R_MINUS = {"0": "3", "1": "4", "2": "5"}  # per group: the lowest-reward rollout with a \boxed{}


def groups(seed_shift=0, with_text=True):
    out = [(q, None if im is None else noise_image(im[0] + seed_shift, im[1]), ref, ro)
           for q, im, ref, ro in GROUPS]
    return out if with_text else out[:2]


def estimated(data):
    """The batch after verl's advantage stage with adv_estimator=cepo (inside the CEPO trainer's stage)."""
    b = data.batch
    with cv.cepo_active():
        b["advantages"], b["returns"] = core_algos.get_adv_estimator_fn("cepo")(
            token_level_rewards=b["token_level_rewards"], response_mask=b["response_mask"],
            index=data.non_tensor_batch["uid"], config={"norm_adv_by_std_in_grpo": True})
    return data


def score_teachers(vl, data, sees_image=True, world_size=1, packed=False):
    """Both teachers' log-probs of every row through the package's scorer path."""
    batch = cv.advantages.rollout_batch(estimated(data), vl.tok, cv.CEPOSettings(), "cepo")
    rows = list(range(len(data)))
    refs = [data.non_tensor_batch["reward_model"][i]["ground_truth"] for i in rows]
    negs = [R_MINUS[u] for u in data.non_tensor_batch["uid"]]
    ctx = teacher_contexts(vl.tok, rows, prompt_ids=batch.prompt_ids, pos_answers=refs, neg_answers=negs)
    wg = VLWorkerGroup(vl.model, world_size, packed)
    R = batch.mask.shape[1]
    score = vv.vision_dataproto_scorer(cv.worker_group_scorer(wg, T), vl.tok.pad_token_id, batch.responses,
                                       vv.row_images(data), R, "cpu", sees_image=sees_image,
                                       image_token_ids=vv.placeholder_ids(vl.tok))
    return score(ctx, TEACHERS), wg, refs, negs


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_image_aware_teachers_equal_a_plain_forward_with_the_image(vl, packed):
    """Rows with and without images mixed in one batch, three prompt lengths (left padding), two ranks; the
    engine's padded micro-batch, or its packed one (use_remove_padding: the text row of the position ids
    tells the model where each sequence starts)."""
    data, rows = student_batch(vl, groups())
    logp, wg, refs, negs = score_teachers(vl, data, world_size=2, packed=packed)
    td = wg.calls[0]
    assert td["position_ids"].dim() == 3 and "multi_modal_inputs" in td.keys()
    for i, (prompt, resp, *_, mm) in enumerate(rows):
        for name, answers in zip(TEACHERS, (refs, negs), strict=True):
            check_row(vl.model, logp[name][i], prompt, mm, encode(vl.tok, " " + answers[i]), resp,
                      name=f"{name} row {i}")


def test_teacher_positions_are_verls_own_construction(vl):
    """Each teacher row's position ids are what verl's agent loop computes for [prompt | answer | response]
    (text count, then the model's get_rope_index), its multi_modal_inputs the student's row unchanged."""
    data, rows = student_batch(vl, groups())
    images = vv.row_images(data)
    answer = encode(vl.tok, " 12")
    prefixes = [p + answer for p, *_ in rows]
    batch = vv.vision_teacher_batch(prefixes, [r[1] for r in rows], images, vl.tok.pad_token_id, 6, "cpu")
    b = batch.batch
    assert b["position_ids"].shape == (len(rows), 4, b["input_ids"].shape[1])
    student_mm = data.non_tensor_batch["multi_modal_inputs"]
    for i, (prompt, resp, *_, mm) in enumerate(rows):
        assert batch.non_tensor_batch["multi_modal_inputs"][i] is student_mm[i]
        keep = b["attention_mask"][i].bool()
        seq = b["input_ids"][i][keep]
        assert seq.tolist() == prompt + answer + resp
        want = verl_positions(vl, seq[None], torch.ones_like(seq)[None], mm)[0]
        assert torch.equal(b["position_ids"][i][:, keep], want)
        assert torch.equal(want[0], torch.arange(len(seq)))
        if mm:  # the image's run is on its grid: the M-RoPE rows are not the count
            assert not all(torch.equal(want[k], want[0]) for k in (1, 2, 3))


def test_image_blind_teachers_equal_the_authors_construction(vl):
    data, rows = student_batch(vl, groups())
    logp, wg, refs, negs = score_teachers(vl, data, sees_image=False)
    td = wg.calls[0]
    blind = vv.placeholder_ids(vl.tok)
    assert len(blind) == 2 and "multi_modal_inputs" not in td.keys()
    values = td["input_ids"].values()
    assert not any((values == t).any() for t in blind)
    for row in td["position_ids"].unbind():  # all four rows the plain count over the attended tokens
        assert torch.equal(row, torch.arange(row.shape[1])[None].expand(4, -1))
    for i, (prompt, resp, *_) in enumerate(rows):
        for name, answers in zip(TEACHERS, (refs, negs), strict=True):
            check_row(vl.model, logp[name][i], prompt, None, encode(vl.tok, " " + answers[i]), resp,
                      blind_ids=blind, name=f"blind {name} row {i}")


def test_a_different_image_changes_only_the_image_aware_teacher(vl):
    (a, rows), (b, rows_b) = student_batch(vl, groups(with_text=False)), student_batch(vl, groups(7, False))
    assert [r[0] for r in rows] == [r[0] for r in rows_b]  # same tokens, other pixels
    seen_a, seen_b = score_teachers(vl, a)[0], score_teachers(vl, b)[0]
    with torch.no_grad():
        p32 = plain_logprobs(vl.model, rows[0][0], rows[0][5], encode(vl.tok, " 2"), rows[0][1])
        p64 = plain_logprobs(copy.deepcopy(vl.model).double(), rows[0][0], rows[0][5], encode(vl.tok, " 2"),
                             rows[0][1], torch.float64)
    tol = 2 * float((p32.double() - p64).abs().max()) + ulps32(p64, 16)
    for i, (_, resp, *_) in enumerate(rows):
        assert (seen_a["pos"][i, : len(resp)] - seen_b["pos"][i, : len(resp)]).abs().max() > 10 * tol
    blind_a, blind_b = score_teachers(vl, a, False)[0], score_teachers(vl, b, False)[0]
    assert all(torch.equal(blind_a[k], blind_b[k]) for k in TEACHERS)


@pytest.mark.parametrize("sees_image", [True, False])
def test_cepo_advantages_of_a_vision_batch_equal_the_reference(vl, sees_image):
    """cepo_reweight on the vision-language batch (r- chosen by verl's uid groups, the teacher_sees_image
    knob from algorithm.cepo) against cepo_ref on float64 plain forwards of the teachers."""
    data, rows = student_batch(vl, groups())
    settings = cv.CEPOSettings.from_config({"cepo": {"lam0": 0.5, "t_warm": 10,
                                                     "teacher_sees_image": sees_image}})
    wg = VLWorkerGroup(vl.model)
    metrics = cv.cepo_reweight(estimated(data), vl.tok, cv.worker_group_scorer(wg, T), settings, 0)
    assert metrics["cepo/r_minus_fallbacks"] == 0.0 and metrics["cepo/teacher_rows"] == len(rows)
    blind = None if sees_image else vv.placeholder_ids(vl.tok)
    R = data.batch["responses"].shape[1]
    logp = {dt: (torch.zeros(len(rows), R, dtype=dt), torch.zeros(len(rows), R, dtype=dt))
            for dt in (torch.float32, torch.float64)}
    m64 = copy.deepcopy(vl.model).double()
    with torch.no_grad():
        for i, (prompt, resp, _, uid, ref, mm) in enumerate(rows):
            for dt, model in ((torch.float32, vl.model), (torch.float64, m64)):
                for k, answer in enumerate((ref, R_MINUS[uid])):
                    ids = encode(vl.tok, " " + answer)
                    logp[dt][k][i, : len(resp)] = plain_logprobs(model, prompt, mm, ids, resp, dt, blind)
    rewards = data.batch["token_level_rewards"].sum(-1).double()
    adv = torch.zeros(len(rows), dtype=torch.float64)
    uids = [r[3] for r in rows]
    for u in set(uids):
        idx = [i for i, v in enumerate(uids) if v == u]
        adv[idx] = cepo_ref.group_advantages(rewards[idx], len(idx)).double()
    mask = data.batch["response_mask"].bool()
    ref64 = cepo_ref.cepo_advantages(adv, *logp[torch.float64], mask, lam=0.5, eps_w=0.2)
    ref32 = cepo_ref.cepo_advantages(adv.float(), *logp[torch.float32], mask, lam=0.5, eps_w=0.2)
    assert_close(data.batch["advantages"], ref64, ref32, name="A_hat")


def test_settings_and_bad_input(vl):
    assert cv.CEPOSettings().teacher_sees_image is True
    with pytest.raises(TypeError, match="algorithm.cepo.teacher_sees_image: expected a bool"):
        cv.CEPOSettings.from_config({"cepo": {"teacher_sees_image": "no"}})
    data, rows = student_batch(vl, groups(with_text=False))
    images = vv.row_images(data)
    with pytest.raises(ValueError, match=r"images\[0\].positions: expected \[4, n\] with n <= the prefix"):
        vv.vision_teacher_batch([rows[0][0][:3]], [rows[0][1]], images[:1], vl.tok.pad_token_id, 4, "cpu")
    with pytest.raises(ValueError, match="prefixes, responses and images: expected one per row"):
        vv.vision_teacher_batch([rows[0][0]], [rows[0][1]], images, vl.tok.pad_token_id, 4, "cpu")
    attn = data.batch["attention_mask"]
    data.batch["position_ids"] = (attn.cumsum(-1) - 1).clamp_min(0)  # a multimodal model without M-RoPE
    batch = vv.vision_teacher_batch([rows[0][0]], [rows[0][1]], vv.row_images(data)[:1], 0, 4, "cpu")
    keep = batch.batch["attention_mask"][0].bool()
    assert torch.equal(batch.batch["position_ids"][0][keep], torch.arange(int(keep.sum())))
    data.batch["position_ids"] = data.batch["position_ids"][:, :-1]
    with pytest.raises(ValueError, match=r"data: position_ids: expected \[B, C, L\] or \[B, L\]"):
        vv.row_images(data)


@pytest.mark.parametrize("kind", VL_KINDS)
def test_tiny_checkpoint_saves_and_loads_with_verls_transformers(tmp_path, kind):
    """save_tiny_vl / load_vision_model / load_processor under verl's transformers (5.10: no torchvision, its
    AutoImageProcessor needs it, so the PIL image processor is loaded directly)."""
    import transformers

    path = save_tiny_vl(tmp_path / kind, kind)
    model, proc = load_vision_model(path).eval(), load_processor(path)
    tok = build_vl_tokenizer()
    want = VisionProcessor(tok, build_image_processor(kind))
    image = noise_image(3, (64, 32))
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>a<|im_end|>\n"
    got, ref = proc(text=[text], images=[image]), want(text=[text], images=[image])
    assert torch.equal(got["input_ids"], ref["input_ids"])
    assert torch.equal(got["pixel_values"], ref["pixel_values"])
    built = build_tiny_vl_model(tok, kind, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), built.state_dict().values(),
                                                  strict=True))
    assert transformers.__version__.startswith("5.")


def test_cepo_trainer_stage_takes_the_images_from_the_transfer_queue(vl, monkeypatch):
    """The v1 trainer's advantage stage with a processor (a vision-language policy) reads each row's position
    ids and multi_modal_inputs from the TransferQueue, as verl's agent loop writes them (no padding), and
    gives the A_hat of cepo_reweight on the padded batch, bit for bit."""
    pytest.importorskip("transfer_queue", reason="needs TransferQueue (verl's v1 trainer): see .ci/run")
    import transfer_queue
    from omegaconf import OmegaConf
    from test_verl_real_stage import PaddingTransferQueue

    from cepo_kernels.integrations.verl.trainer import CEPOPPOTrainer

    data, rows = student_batch(vl, groups())
    data.batch["old_log_probs"] = torch.zeros(data.batch["responses"].shape)
    fake = PaddingTransferQueue()
    meta = fake.put_batch(data)
    attn = data.batch["attention_mask"].bool()
    for i, k in enumerate(meta.keys):  # what the agent loop adds for a vision-language policy
        fake.rows[("train", k)].update(position_ids=data.batch["position_ids"][i][:, attn[i]],
                                       multi_modal_inputs=data.non_tensor_batch["multi_modal_inputs"][i])
    meta = transfer_queue.KVBatchMeta(keys=meta.keys, tags=meta.tags, partition_id=meta.partition_id)
    monkeypatch.setattr(transfer_queue, "kv_batch_get", fake.kv_batch_get)
    monkeypatch.setattr(transfer_queue, "kv_batch_put", fake.kv_batch_put)
    trainer = CEPOPPOTrainer.__new__(CEPOPPOTrainer)
    trainer.config = OmegaConf.create({
        "algorithm": {"adv_estimator": "cepo", "use_kl_in_reward": False, "gamma": 1.0, "lam": 1.0,
                      "norm_adv_by_std_in_grpo": True, "cepo": {"lam0": 0.5, "t_warm": 10}},
        "actor_rollout_ref": {"rollout": {"n": 3, "temperature": T}}})
    trainer.tokenizer, trainer.processor, trainer.global_steps = vl.tok, vl.proc, 1
    trainer.actor_rollout_wg = VLWorkerGroup(vl.model)
    metrics = {}
    trainer._compute_advantage(meta, metrics)
    (td,) = trainer.actor_rollout_wg.calls
    assert "multi_modal_inputs" in td.keys() and td["position_ids"].dim() == 3
    scorer = cv.worker_group_scorer(VLWorkerGroup(vl.model), T)
    m = cv.cepo_reweight(estimated(data), vl.tok, scorer, cv.CEPOSettings(lam0=0.5, t_warm=10), 0)
    assert m == metrics and m["cepo/teacher_rows"] == len(rows)
    for i, k in enumerate(meta.keys):
        got = fake.rows[("train", k)]["advantages"]
        assert torch.equal(got, data.batch["advantages"][i, : len(got)])
