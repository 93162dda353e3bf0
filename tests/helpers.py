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


def poison(shape, dtype=torch.float32, device="cpu"):
    """A NaN-filled buffer: an element a kernel forgets to write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
