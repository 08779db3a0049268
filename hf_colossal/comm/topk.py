"""Top-k sparsification with error feedback, exchanged by an all-gather of (value, index) pairs.

Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018 (arXiv:1809.07599); Lin et al., "Deep
Gradient Compression", ICLR 2018 (arXiv:1712.01887). Per worker w, on the flat bucket::

    M_w = G_w + e_w
    C(M_w) = M_w restricted to its k = ceil(density * numel) largest magnitudes
    e_w = M_w - C(M_w)
    out = (1/W) sum_w C(M_w)

Why an all-gather and not a shared index set: each rank's own top-k is what the error-feedback analysis (Stich
2018) covers — a contractive operator applied locally — and it keeps every large coordinate of every rank. The sum
of sparse vectors with different supports is not an all-reduce of equal-shape tensors, so each rank sends its k
values and k int32 indices (one all-gather: the indices travel bit-cast as float32 beside the values) and adds the
W messages locally. Bytes sent per rank: ``8k``; received ``8k(W-1)``, so this suits the few-GPU, slow-link case
(W up to a few tens at density 1%); for large W a shared (hashed) index set with an all-reduce would scale better.
"""

from __future__ import annotations

import math

import torch

from ._common import (ByteCounter, ErrorFeedbackCompressor, Future, all_gather_flat, finite_flag, poison_if,
                      used_on_current_stream)


def num_kept(numel: int, density: float) -> int:
    return max(1, min(numel, math.ceil(density * numel)))


def compress(M: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest-magnitude entries of a flat tensor: (values, int32 indices)."""
    _, idx = torch.topk(M.abs(), k, sorted=False)
    return M[idx], idx.to(torch.int32)


def decompress_sum(values: torch.Tensor, indices: torch.Tensor, numel: int) -> torch.Tensor:
    """Sum of sparse messages ``(W, k)`` into a dense flat tensor."""
    out = torch.zeros(numel, dtype=values.dtype, device=values.device)
    out.index_add_(0, indices.reshape(-1).long(), values.reshape(-1))
    return out


class TopK(ErrorFeedbackCompressor):
    def __init__(self, density: float, error_feedback: bool = True) -> None:
        super().__init__(error_feedback)
        self.density = density

    def run(self, buffer: torch.Tensor, keys: list[int], params: list[torch.Tensor], group, world_size: int,
            counter: ByteCounter, scale_fn=None) -> Future:
        scale, M = self.compensated(buffer, keys, params, scale_fn)
        k = num_kept(M.numel(), self.density)
        values, idx = compress(M, k)
        values = poison_if(finite_flag(M), values)
        payload = torch.cat([values, idx.view(torch.float32)])

        def decode(fut: Future) -> torch.Tensor:
            used_on_current_stream(M, idx, scale)  # made on the hook's stream (see _common)
            gathered = fut.value()  # (W, 2k)
            out = decompress_sum(gathered[:, :k], gathered[:, k:].contiguous().view(torch.int32), M.numel())
            out.div_(world_size)
            if self.error_feedback:
                error = M.clone()
                error[idx.long()] = 0
                self.store_error(keys, error, scale, torch.isfinite(out).all())
            buffer.copy_(out)
            return buffer

        return all_gather_flat(payload, group, world_size, counter).then(decode)
