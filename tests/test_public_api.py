"""The public API: cepo_ref has every public function of cepo_kernels with the same signature (its
docstring's claim), and the one that was missing, linear_teacher_logprobs, agrees with the kernel."""

import inspect

import pytest
import torch
from helpers import assert_close

import cepo_kernels
import cepo_ref

FUNCTIONS = [n for n in cepo_kernels.__all__ if inspect.isfunction(getattr(cepo_kernels, n))]


def test_the_public_names_are_all_there():
    assert {"token_logprobs", "linear_logprobs", "linear_teacher_logprobs", "group_advantages",
            "cepo_advantages", "cepo_loss", "grpo_loss", "linear_cepo_loss",
            "linear_grpo_loss"} <= set(FUNCTIONS)
    for name in cepo_kernels.__all__:
        assert hasattr(cepo_ref, name), f"cepo_ref lacks {name}"


@pytest.mark.parametrize("name", FUNCTIONS)
def test_cepo_ref_has_the_same_signature(name):
    kernel, ref = inspect.signature(getattr(cepo_kernels, name)), inspect.signature(getattr(cepo_ref, name))
    params = lambda sig: [(p.name, p.kind, p.default) for p in sig.parameters.values()]  # noqa: E731
    assert params(ref) == params(kernel), f"{name}: cepo_ref{ref} != cepo_kernels{kernel}"
    assert name in cepo_ref.__all__


@pytest.mark.parametrize("rows", [None, "mask", "index"])
def test_linear_teacher_logprobs_equals_the_reference(rows):
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 4, 16, 50
    pos, neg = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g)
    weight, bias = torch.randn(V, H, generator=g) / 4, torch.randn(V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 0] = -100  # Hugging Face's ignore index: 0.0
    sel = {None: None, "mask": torch.rand(B, T, generator=g) > 0.5,
           "index": torch.tensor([1, 5, 6, 11])}[rows]
    got = cepo_kernels.linear_teacher_logprobs(pos, neg, weight, targets, bias=bias, temperature=0.7,
                                               rows=sel)
    ref64 = cepo_ref.linear_teacher_logprobs(pos.double(), neg.double(), weight.double(), targets,
                                             bias=bias.double(), temperature=0.7, rows=sel)
    ref32 = cepo_ref.linear_teacher_logprobs(pos, neg, weight, targets, bias=bias, temperature=0.7, rows=sel)
    for k, name in enumerate(("pos", "neg")):
        assert got[k].dtype == torch.float32 and got[k].shape == (B, T)
        assert_close(got[k], ref64[k].double(), ref32[k], name=name)
    assert got[0][0, 0] == 0.0 and ref32[0][0, 0] == 0.0
    if sel is not None:
        keep = sel if sel.dtype == torch.bool else torch.zeros(B * T, dtype=torch.bool).index_fill(0, sel, 1)
        assert (ref32[0][~keep.reshape(B, T)] == 0).all()
    only_pos = cepo_ref.linear_teacher_logprobs(pos, None, weight, targets, bias=bias, temperature=0.7)
    assert only_pos[1] is None
    with pytest.raises(ValueError, match="pos_hidden and neg_hidden"):
        cepo_ref.linear_teacher_logprobs(None, None, weight, targets)
