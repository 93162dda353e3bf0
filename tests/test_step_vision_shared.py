"""The shared prompt cache of a vision-language policy (step/vision.py `vision_shared_hidden`,
`vision_forward(share=True)`) against the plain path, on the tiny Qwen2.5-VL and Qwen3-VL models of
tests/test_step_vision.py (its prompts and tolerance rule: within twice the float32 plain path's error
against a float64 run, plus a few ulps)."""

import copy

import pytest
import torch
from test_step_vision import check_close, setup

from cepo_kernels.rl.vision_model import (
    VL_KINDS,
    VisionProcessor,
    build_image_processor,
    build_tiny_vl_model,
    build_vl_tokenizer,
)
from cepo_kernels.step.contexts import encode
from cepo_kernels.step.vision import VisionContext, vision_forward


@pytest.fixture(scope="module", params=VL_KINDS)
def vl(request):
    tok = build_vl_tokenizer()
    model = build_tiny_vl_model(tok, request.param, seed=0).eval()
    return request.param, model, VisionProcessor(tok, build_image_processor(request.param))



@pytest.mark.parametrize("sees_image", [True, False])
def test_shared_prompt_cache_equals_plain_path(vl, sees_image):
    """vision_forward(share=True): each group's [prompt | answer] runs once with its image and its key/value
    cache serves the group's responses; the hidden states equal the plain path's (every row in full) within
    the house rule, the tokens run count each shared context once, and the gradient (lm_head, the language
    model's first layer, the vision tower) equals the plain path's too."""
    model, tok, prompts, responses = setup(vl, seed=5)
    g = torch.Generator().manual_seed(5)
    chars = encode(tok, "0123456789abcdef")
    lens = [[5, 1, 3], [2, 6], [4, 4]]  # group sizes 3, 2, 2: one length-1 response
    rows, resp = [], []
    for p, group in zip(prompts, lens, strict=True):
        for n in group:
            rows.append(p)
            resp.append([chars[j] for j in torch.randint(len(chars), (n,), generator=g)])
    image_ids = (tok.convert_tokens_to_ids("<|image_pad|>"), tok.convert_tokens_to_ids("<|video_pad|>"))
    kw = dict(pad_id=tok.pad_token_id, image_token_ids=image_ids, device="cpu", sees_image=sees_image)
    answers = [encode(tok, " 12"), ()]  # a teacher's context, then the policy's (no answer)
    m64 = copy.deepcopy(model).double()
    mask = torch.zeros(len(resp), max(map(len, resp)), dtype=torch.bool)
    for i, r in enumerate(resp):
        mask[i, : len(r)] = True
    for answer in answers:
        ctx = [VisionContext(p, tuple(answer)) for p in rows]
        with torch.no_grad():
            h, tokens, naive = vision_forward(model, share=True, **kw)(ctx, resp)
            h32, tokens32, _ = vision_forward(model, **kw)(ctx, resp)
            h64 = vision_forward(m64, **kw)(ctx, resp)[0]
        assert h.shape == h32.shape
        check_close(h[mask], h32[mask], h64[mask])
        assert naive == tokens32 == sum(len(p.input_ids) + len(answer) + len(r) for p, r in zip(rows, resp,
                                                                                                 strict=True))
        assert tokens == sum(len(p.input_ids) + len(answer) for p in prompts) + sum(map(len, resp))

    def grads(m, share):
        params = {"head": m.lm_head.weight, "layer": next(m.model.language_model.layers[0].parameters()),
                  "tower": next(m.model.visual.parameters())}
        m.zero_grad()
        ctx = [VisionContext(p) for p in rows]
        h = vision_forward(m, share=share, **kw)(ctx, resp)[0]
        logits = torch.nn.functional.linear(h, m.lm_head.weight)
        targets = torch.tensor([r + [0] * (mask.shape[1] - len(r)) for r in resp])
        (logits.log_softmax(-1).gather(2, targets[..., None])[..., 0] * mask).sum().backward()
        return {k: v.grad.detach().clone() if v.grad is not None else torch.zeros_like(v)
                for k, v in params.items()}

    got, p32, p64 = grads(model, True), grads(model, False), grads(m64, False)
    for k in got:
        check_close(got[k], p32[k], p64[k])
    assert p64["layer"].abs().max() > 0
    assert (p64["tower"].abs().max() > 0) == sees_image  # the image-blind pass never runs the tower
