"""Helpers shared by the kernel tests: seeded inputs and the bitwise prefix check."""

import torch


def dtype_id(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")


def randn(*shape: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype, device=device)


def prefixes_that_change(fn, x: torch.Tensor, ms) -> list[int]:
    """The m in ms for which fn(x[:m]) is not bitwise fn(x)[:m]."""
    full = fn(x)
    return [m for m in ms if not torch.equal(fn(x[:m]), full[:m])]
