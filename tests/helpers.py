"""Shared test utilities: the house tolerance rule and input makers."""

import torch


def err(x, ref):
    """Max abs error of x against a float64 reference, NaN-aware (NaN where ref is NaN is no error)."""
    x, ref = x.detach().double(), ref.detach().double()
    both_nan = torch.isnan(x) & torch.isnan(ref)
    diff = (x - ref).abs()
    diff = torch.where(both_nan, torch.zeros_like(diff), diff)
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return float(diff.max()) if diff.numel() else 0.0


def assert_close(actual, ref64, torch_same_dtype, atol=1e-6, name="value"):
    """err(kernel, fp64 ref) <= 2 * err(torch in the same dtype, fp64 ref) + atol (the house rule)."""
    e_kernel = err(actual, ref64)
    e_torch = err(torch_same_dtype, ref64)
    assert e_kernel <= 2 * e_torch + atol, (
        f"{name}: kernel error {e_kernel:.3e} > 2 x torch's own error {e_torch:.3e} + atol {atol:.1e}"
    )


def assert_within_order_noise(got, ref, variant, floor, factor=2.0, name="value"):
    """err(got, ref) <= factor * err(variant, ref) + floor, for a computation `got` that should equal `ref`
    up to the order of its fp32 reductions (another sharding, another batch split). `variant` is `ref`'s own
    computation with only its reduction order changed, so err(variant, ref) is the rounding that reordering
    this very arithmetic makes (on this CPU, with these shapes); factor 2 allows `got` twice that. `floor` is
    the resolution of the compared value itself (a few float32 ulps of its stored magnitude, which any two
    orderings may round to neighbouring floats; exact by construction, not measured)."""
    got, ref, variant = (torch.as_tensor(v, dtype=torch.float64) for v in (got, ref, variant))
    e_got, e_var = err(got, ref), err(variant, ref)
    assert e_got <= factor * e_var + floor, (
        f"{name}: error {e_got:.3e} > {factor} x the reordered run's own {e_var:.3e} + floor {floor:.1e}"
    )


def ulps32(x, n=1.0):
    """n float32 ulps at the largest magnitude of x (an upper bound: eps * max|x|)."""
    x = torch.as_tensor(x).detach().to(torch.float64)
    return n * torch.finfo(torch.float32).eps * (float(x.abs().max()) if x.numel() else 0.0)


def poison(shape, dtype=torch.float32, device="cpu"):
    """A NaN-filled buffer: an element a kernel forgets to write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
