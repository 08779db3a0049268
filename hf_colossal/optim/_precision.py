"""The internal precision of fp32 matrix products inside an optimizer step, set for a ``with`` block only.

On Ampere and later GPUs cuBLAS can run fp32 matmuls on TF32 tensor cores (10-bit mantissa inputs, fp32
accumulation), several times faster than true fp32. torch's global default is true fp32
(``torch.get_float32_matmul_precision() == "highest"``). The second-order optimizers choose per product: TF32 where
a rounding of about 5e-4 relative is harmless (factor statistics, applying a preconditioner), true fp32 where it
is not (iterations for inverse roots, SOAP's rotations). :func:`fp32_matmul_precision` sets the choice around
the optimizer's own products and puts the caller's setting back exactly, whatever API the caller used.

torch >= 2.9 keeps the setting in ``torch.backends.cuda.matmul.fp32_precision`` (``"ieee"``, ``"tf32"`` or
``"none"``: inherit ``torch.backends.fp32_precision``), and raises if the legacy getters
(``torch.get_float32_matmul_precision``, ``allow_tf32``) are read while it disagrees with the legacy setting. Only
the new attribute is read, set and restored here (cuBLAS reads it), never the legacy one, so the caller's state is
left bit for bit as it was. Older torch: ``allow_tf32``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["FP32_MATMUL_PRECISIONS", "current_fp32_matmul_precision", "fp32_matmul_precision"]

#: ``"ieee"``: true fp32 products; ``"tf32"``: TF32 tensor cores where the device has them (CUDA only).
FP32_MATMUL_PRECISIONS = ("ieee", "tf32")

_NEW_API = hasattr(torch.backends, "fp32_precision")


def current_fp32_matmul_precision() -> str:
    """The CUDA fp32 matmul setting as the new API spells it (``"ieee"``, ``"tf32"`` or ``"none"``)."""
    if _NEW_API:
        return torch.backends.cuda.matmul.fp32_precision
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"  # pragma: no cover - torch < 2.9


def _set(value: str) -> None:
    if _NEW_API:
        torch.backends.cuda.matmul.fp32_precision = value
    else:  # pragma: no cover - torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = value == "tf32"


@contextmanager
def fp32_matmul_precision(precision: str) -> Iterator[None]:
    """CUDA fp32 matmuls in ``precision`` (``"ieee"`` or ``"tf32"``) inside the block; the caller's setting after
    it, also when the block raises. No effect on CPU products or on bf16/fp16/fp64 ones."""
    if precision not in FP32_MATMUL_PRECISIONS:
        raise ValueError(f"fp32_matmul_precision: expected one of {FP32_MATMUL_PRECISIONS}, got {precision!r}")
    previous = current_fp32_matmul_precision()
    if previous == precision:
        yield
        return
    _set(precision)
    try:
        yield
    finally:
        _set(previous)
