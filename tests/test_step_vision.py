"""Teachers and policy of a vision-language policy (step/vision.py) on tiny Qwen2.5-VL and Qwen3-VL models.

Processor path: these tests build the processor as `VisionProcessor` (tokenizer + PIL image processor
composed), the path `load_processor` takes where torchvision does not import; tests/test_rl_vision_model.py
covers loading a saved checkpoint through both paths (`AutoProcessor` where torchvision imports).

Tolerances (house rule): each result is compared with a float64 run of the same model on the same plain
forward; the package's error may be at most twice the float32 plain forward's error plus a few ulps of the
log-probs' size.
"""

import copy

import numpy as np
import pytest
import torch

from cepo_kernels.rl.vision_model import (
    VL_KINDS,
    VisionProcessor,
    build_image_processor,
    build_tiny_vl_model,
    build_vl_tokenizer,
)
from cepo_kernels.step import lm_head, policy_logprobs, teacher_logprobs
from cepo_kernels.step.contexts import encode
from cepo_kernels.step.vision import (
    VisionContext,
    continue_positions,
    encode_images,
    split_prompts,
    vision_contexts,
    vision_forward,
    vision_pack,
)

QUESTION = "how many?"


def noise_image(seed, size):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module", params=VL_KINDS)
def vl(request):
    tok = build_vl_tokenizer()
    model = build_tiny_vl_model(tok, request.param, seed=0).eval()
    proc = VisionProcessor(tok, build_image_processor(request.param))
    return request.param, model, proc


def prompt_batch(proc, images, questions=None):
    questions = questions or [QUESTION] * len(images)
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
                for q in questions]
    texts = [proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    return proc(text=texts, images=images)


def rows_of(proc, images, questions=None):
    inp = prompt_batch(proc, images, questions)
    return split_prompts(inp["input_ids"], inp["attention_mask"], mm_token_type_ids=inp["mm_token_type_ids"],
                         pixel_values=inp["pixel_values"], image_grid_thw=inp["image_grid_thw"])


def plain_logprobs(model, prompt, answer, response, *, image=True, dtype=torch.float32):
    """One plain forward of the model on [prompt | answer | response], the image passed as the processor gives
    it, log-softmaxed at the positions that predict the response."""
    seq = torch.tensor([list(prompt.input_ids) + list(answer) + list(response)])
    mm = torch.zeros_like(seq)
    mm[0, : len(prompt.mm_token_type_ids)] = torch.tensor(prompt.mm_token_type_ids)
    kw = dict(pixel_values=prompt.pixel_values.to(dtype), image_grid_thw=prompt.image_grid_thw,
              mm_token_type_ids=mm) if image else {}
    logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), **kw).logits[0]
    start = len(prompt.input_ids) + len(answer)
    lp = torch.log_softmax(logits[start - 1 : start - 1 + len(response)].to(dtype), dim=-1)
    return lp.gather(1, torch.tensor(response)[:, None])[:, 0]


def tolerance(err32, ref):
    return 2 * err32 + 16 * torch.finfo(torch.float32).eps * (1 + ref.abs().max())


def check_close(got, plain32, plain64):
    err = (got.double() - plain64).abs().max()
    assert err <= tolerance((plain32.double() - plain64).abs().max(), plain64), err


def setup(vl, seed=0):
    kind, model, proc = vl
    tok = proc.tokenizer
    prompts = rows_of(proc, [noise_image(seed, (64, 64)), noise_image(seed + 1, (32, 64)),
                             noise_image(seed + 2, (64, 32))], [QUESTION, "count the dots?", "a"])
    g = torch.Generator().manual_seed(seed)
    chars = encode(tok, "0123456789abcdef")
    responses = [[chars[j] for j in torch.randint(len(chars), (n,), generator=g)] for n in (5, 3, 7)]
    return model, tok, prompts, responses


def scorers(model, tok, sees_image, features=None):
    common = dict(pad_id=tok.pad_token_id, device="cpu", features=features,
                  image_token_ids=(tok.convert_tokens_to_ids("<|image_pad|>"),
                                   tok.convert_tokens_to_ids("<|video_pad|>")))
    return vision_forward(model, **common), vision_forward(model, sees_image=sees_image, **common)


def run_teachers(model, tok, prompts, responses, sees_image=True, pos=None, neg=None, features=None):
    rows = list(range(len(prompts)))
    ctx = vision_contexts(tok, rows, prompts=prompts, pos_answers=pos or ["12"] * len(rows),
                          neg_answers=neg or ["7"] * len(rows))
    _, teacher = scorers(model, tok, sees_image, features)
    w, b = lm_head(model)
    R = max(map(len, responses))
    out = teacher_logprobs(teacher, w, b, ctx, responses, lambda r: [r], default=torch.zeros(len(rows), R),
                           lam=0.5, pad_id=tok.pad_token_id)
    return ctx, out


def check_teachers(model, ctx, out, responses):
    m64 = copy.deepcopy(model).double()
    for side, got in (("pos", out.pos), ("neg", out.neg)):
        prefixes = ctx.pos_prefixes if side == "pos" else ctx.neg_prefixes
        for i, (c, r) in enumerate(zip(prefixes, responses, strict=True)):
            with torch.no_grad():
                p32 = plain_logprobs(model, c.prompt, c.answer, r)
                p64 = plain_logprobs(m64, c.prompt, c.answer, r, dtype=torch.float64)
            check_close(got[i, : len(r)], p32, p64)


def test_teachers_equal_plain_forward_with_image(vl):
    model, tok, prompts, responses = setup(vl)
    ctx, out = run_teachers(model, tok, prompts, responses)
    check_teachers(model, ctx, out, responses)


def test_rows_with_two_images_and_none(vl):
    """Images go to their rows in order: a prompt with two images, one with none, one with one."""
    kind, model, proc = vl
    tok = proc.tokenizer
    two = [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]
    msgs = [[{"role": "user", "content": two}],
            [{"role": "user", "content": "no image?"}],
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "one"}]}]]
    texts = [proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    inp = proc(text=texts, images=[[noise_image(20, (64, 64)), noise_image(21, (32, 64))], [],
                                   [noise_image(22, (64, 32))]])
    prompts = split_prompts(inp["input_ids"], inp["attention_mask"],
                            mm_token_type_ids=inp["mm_token_type_ids"], pixel_values=inp["pixel_values"],
                            image_grid_thw=inp["image_grid_thw"])
    assert [None if p.image_grid_thw is None else p.image_grid_thw.shape[0] for p in prompts] == [2, None, 1]
    responses = [encode(tok, "12"), encode(tok, "345"), encode(tok, "6")]
    ctx, out = run_teachers(model, tok, [prompts[0], prompts[2]], [responses[0], responses[2]])
    check_teachers(model, ctx, out, [responses[0], responses[2]])
    _, text_only = run_teachers(model, tok, [prompts[1]], [responses[1]])  # no image in the batch
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        p32 = plain_logprobs(model, prompts[1], encode(tok, " 12"), responses[1], image=False)
        p64 = plain_logprobs(m64, prompts[1], encode(tok, " 12"), responses[1], image=False,
                             dtype=torch.float64)
    check_close(text_only.pos[0], p32, p64)


def test_vision_tower_runs_once_for_every_pass(vl):
    """encode_images runs the tower once over the distinct prompts; both teachers and the policy reuse its
    features (mm_encoder_outputs) and still equal the plain forward with pixel_values."""
    model, tok, prompts, responses = setup(vl, seed=9)
    calls = []
    hook = model.model.visual.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            features, n = encode_images(model, prompts + prompts)  # the same objects twice: encoded once
        assert (n, len(calls)) == (3, 1)
        ctx, out = run_teachers(model, tok, prompts, responses, features=features)
        policy, _ = scorers(model, tok, True, features)
        w, b = lm_head(model)
        old = policy_logprobs(policy, w, b, [VisionContext(p) for p in prompts], responses, lambda r: [r],
                              pad_id=tok.pad_token_id, device="cpu")
        assert len(calls) == 1
    finally:
        hook.remove()
    check_teachers(model, ctx, out, responses)
    m64 = copy.deepcopy(model).double()
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        with torch.no_grad():
            check_close(old.logp[i, : len(r)], plain_logprobs(model, p, (), r),
                        plain_logprobs(m64, p, (), r, dtype=torch.float64))
    with pytest.raises(ValueError, match="features: a row's prompt was not among"):
        run_teachers(model, tok, rows_of(vl[2], [noise_image(0, (64, 64))]), responses[:1], features=features)


def test_policy_equals_plain_forward_with_image(vl):
    model, tok, prompts, responses = setup(vl, seed=3)
    policy, _ = scorers(model, tok, True)
    w, b = lm_head(model)
    out = policy_logprobs(policy, w, b, [VisionContext(p) for p in prompts], responses, lambda r: [r],
                          pad_id=tok.pad_token_id, device="cpu")
    m64 = copy.deepcopy(model).double()
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        with torch.no_grad():
            check_close(out.logp[i, : len(r)], plain_logprobs(model, p, (), r),
                        plain_logprobs(m64, p, (), r, dtype=torch.float64))
    assert out.tokens == sum(len(p.input_ids) + len(r) for p, r in zip(prompts, responses, strict=True))


def authors_blind_logprobs(model, tok, prompts, answers, responses, dtype):
    """The authors' image-blind CEPO teacher, built here independently: [prompt | answer | response] per row,
    left-padded; <|image_pad|> and <|video_pad|> ids overwritten by the pad id; no pixel values; positions
    0, 1, ... over the attended tokens, the same on the three M-RoPE axes."""
    pad = tok.pad_token_id
    seqs = [list(p.input_ids) + encode(tok, " " + a) + r for p, a, r in zip(prompts, answers, responses,
                                                                           strict=True)]
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), pad)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    pos = torch.zeros(3, len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = torch.tensor(s)
        mask[i, n - len(s):] = 1
        pos[:, i, n - len(s):] = torch.arange(len(s))
    for special in ("<|image_pad|>", "<|video_pad|>"):
        ids[ids == tok.convert_tokens_to_ids(special)] = pad
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    out = []
    for i, r in enumerate(responses):
        lp = torch.log_softmax(logits[i, n - len(r) - 1 : n - 1].to(dtype), dim=-1)
        out.append(lp.gather(1, torch.tensor(r)[:, None])[:, 0])
    return out


def test_image_blind_option_equals_authors_construction(vl):
    model, tok, prompts, responses = setup(vl, seed=5)
    _, out = run_teachers(model, tok, prompts, responses, sees_image=False, pos=["12", "3", "45"])
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        ref32 = authors_blind_logprobs(model, tok, prompts, ["12", "3", "45"], responses, torch.float32)
        ref64 = authors_blind_logprobs(m64, tok, prompts, ["12", "3", "45"], responses, torch.float64)
    for i, r in enumerate(responses):
        check_close(out.pos[i, : len(r)], ref32[i], ref64[i])


def test_image_reaches_the_teacher_only_when_it_sees_it(vl):
    kind, model, proc = vl
    tok = proc.tokenizer
    a = rows_of(proc, [noise_image(10, (64, 64))])
    b = rows_of(proc, [noise_image(11, (64, 64))])
    assert a[0].input_ids == b[0].input_ids and not torch.equal(a[0].pixel_values, b[0].pixel_values)
    resp = [encode(tok, "1234")]
    _, seen_a = run_teachers(model, tok, a, resp)
    _, seen_b = run_teachers(model, tok, b, resp)
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        p32 = plain_logprobs(model, a[0], encode(tok, " 12"), resp[0])
        p64 = plain_logprobs(m64, a[0], encode(tok, " 12"), resp[0], dtype=torch.float64)
    # the two images' log-probs differ by more than the tolerance of either
    assert (seen_a.pos - seen_b.pos).abs().max() > 10 * tolerance((p32.double() - p64).abs().max(), p64)
    _, blind_a = run_teachers(model, tok, a, resp, sees_image=False)
    _, blind_b = run_teachers(model, tok, b, resp, sees_image=False)
    assert torch.equal(blind_a.pos, blind_b.pos) and torch.equal(blind_a.neg, blind_b.neg)


def test_left_padded_batch_equals_single_rows(vl):
    model, tok, prompts, responses = setup(vl, seed=7)
    assert len({len(p.input_ids) for p in prompts}) == 3  # three prompt lengths: the batch is left-padded
    _, batched = run_teachers(model, tok, prompts, responses)
    m64 = copy.deepcopy(model).double()
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        _, alone = run_teachers(model, tok, [p], [r])
        with torch.no_grad():
            p32 = plain_logprobs(model, p, encode(tok, " 12"), r)
            p64 = plain_logprobs(m64, p, encode(tok, " 12"), r, dtype=torch.float64)
        tol = tolerance((p32.double() - p64).abs().max(), p64)
        assert (batched.pos[i, : len(r)].double() - alone.pos[0, : len(r)].double()).abs().max() <= 2 * tol


def test_model_positions_follow_the_continuation_rule(vl):
    """The 3-D positions the model computes for [prompt | answer | response] are the prompt's own positions
    followed by last + 1, last + 2, ... on every axis (the authors' RLSD teacher's rule, which the verl
    adapter can use without the model)."""
    kind, model, proc = vl
    tok = proc.tokenizer
    prompts = rows_of(proc, [noise_image(0, (64, 64)), noise_image(1, (32, 64))], [QUESTION, "count?"])
    ctx = [VisionContext(p, tuple(encode(tok, " 12"))) for p in prompts]
    resp = [encode(tok, "345"), encode(tok, "6")]
    batch = vision_pack(ctx, resp, pad_id=tok.pad_token_id, image_token_ids=(), device="cpu")
    inner = model.model
    pos, _ = inner.get_rope_index(batch.inputs["input_ids"], batch.inputs["mm_token_type_ids"],
                                  image_grid_thw=batch.inputs["image_grid_thw"],
                                  attention_mask=batch.inputs["attention_mask"])
    L = batch.start
    for i, (c, r) in enumerate(zip(ctx, resp, strict=True)):
        n = len(c.prompt.input_ids)
        alone, _ = inner.get_rope_index(torch.tensor([c.prompt.input_ids]),
                                        torch.tensor([c.prompt.mm_token_type_ids]),
                                        image_grid_thw=c.prompt.image_grid_thw)
        first = L - n - len(c.answer)
        rule = continue_positions(alone[:, 0], len(c.answer) + len(r))
        assert torch.equal(pos[:, i, first : L + len(r)], rule)
        assert (pos[:, i, :first] == 0).all()
        assert not torch.equal(alone[0, 0], alone[1, 0])  # the image's run is on a 2-D grid, not a count
    with pytest.raises(ValueError, match=r"prompt_positions: expected \[axes, n >= 1\]"):
        continue_positions(torch.zeros(3, 0, dtype=torch.long), 2)


def test_vision_contexts_share_per_group_and_take_token_answers(vl):
    kind, model, proc = vl
    tok = proc.tokenizer
    prompts = rows_of(proc, [noise_image(0, (64, 64)), noise_image(1, (64, 64))])
    rows = [prompts[0]] * 2 + [prompts[1]] * 2  # two groups of two rollouts
    cot = [5, 6, 7]
    ctx = vision_contexts(tok, [0, 1, 3], prompts=rows, pos_answers=["12"] * 4, neg_answers=[cot] * 4)
    assert ctx.rows == [0, 1, 3]
    assert ctx.pos_prefixes[0] is ctx.pos_prefixes[1] and ctx.pos_prefixes[1] is not ctx.pos_prefixes[2]
    assert ctx.pos_prefixes[2] == VisionContext(prompts[1], tuple(encode(tok, " 12")))
    assert ctx.neg_prefixes[2].answer == tuple(cot)  # token ids follow the prompt as they are


def test_split_prompts_rejects_bad_input(vl):
    kind, model, proc = vl
    inp = prompt_batch(proc, [noise_image(0, (64, 64)), noise_image(1, (32, 64))])
    args = dict(mm_token_type_ids=inp["mm_token_type_ids"], pixel_values=inp["pixel_values"],
                image_grid_thw=inp["image_grid_thw"])
    bad = inp["attention_mask"].clone()
    bad[0, -1] = 0
    with pytest.raises(ValueError, match="attention_mask: row 0: expected a left-padded prompt"):
        split_prompts(inp["input_ids"], bad, **args)
    with pytest.raises(ValueError, match="image_grid_thw: 2 images for 1 image-token runs"):
        split_prompts(inp["input_ids"][:1], inp["attention_mask"][:1], **{
            **args, "mm_token_type_ids": inp["mm_token_type_ids"][:1]})
    with pytest.raises(ValueError, match="pixel_values: expected"):
        split_prompts(inp["input_ids"], inp["attention_mask"],
                      **{**args, "pixel_values": inp["pixel_values"][1:]})
    with pytest.raises(ValueError, match="teacher_template: {question} is not supported"):
        vision_contexts(proc.tokenizer, [0], prompts=[None], pos_answers=["1"], neg_answers=["2"],
                        template="{question} {answer}")
    with pytest.raises(ValueError, match="teacher_template: expected a string containing '{answer}'"):
        vision_contexts(proc.tokenizer, [0], prompts=[None], pos_answers=["1"], neg_answers=["2"],
                        template=" the answer")


def test_policy_update_gradient_equals_plain_forward(vl):
    """The update's path (vision_hidden with gradients, the fused kernel on the lm_head) gives the gradient of
    the plain forward's summed response log-probs, for the lm_head and the vision tower alike."""
    from cepo_kernels import linear_logprobs
    from cepo_kernels.step.vision import vision_hidden

    model, tok, prompts, responses = setup(vl, seed=11)
    ctx = [VisionContext(p) for p in prompts]
    image_ids = (tok.convert_tokens_to_ids("<|image_pad|>"),)

    def grads(m, package, dtype):
        p = {"head": m.lm_head.weight, "tower": next(m.model.visual.parameters())}
        m.zero_grad()
        if package:
            batch = vision_pack(ctx, responses, pad_id=tok.pad_token_id, image_token_ids=image_ids)
            h = vision_hidden(m, batch)
            lp = linear_logprobs(h, m.lm_head.weight, batch.targets)
            (lp * batch.mask).sum().backward()
        else:
            sum(plain_logprobs(m, c.prompt, (), r, dtype=dtype).sum() for c, r in zip(ctx, responses,
                                                                                    strict=True)).backward()
        return {k: v.grad.detach().clone() for k, v in p.items()}

    got, p32 = grads(model, True, torch.float32), grads(model, False, torch.float32)
    p64 = grads(copy.deepcopy(model).double(), False, torch.float64)
    for k in ("head", "tower"):
        err, err32 = (got[k].double() - p64[k]).abs().max(), (p32[k].double() - p64[k]).abs().max()
        assert err <= 2 * err32 + 16 * torch.finfo(torch.float32).eps * (1 + p64[k].abs().max()), k
        assert p64[k].abs().max() > 0, k  # the gradient reaches the vision tower
