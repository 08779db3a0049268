"""Scaled sign (1-bit) compression with error feedback, exchanged as packed sign bits plus per-tensor scales.

Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes",
ICML 2019 (arXiv:1901.09847), Algorithm 1 (EF-SignSGD): the compressor is ``C(p) = (||p||_1 / d) sign(p)``,
applied here per parameter tensor. Tang et al., "1-bit Adam", ICML 2021 (arXiv:2102.02888) use the same scaled
sign with error feedback for the communicated momentum; this hook is the gradient-side (EF-SignSGD) form — the
frozen-variance Adam of 1-bit Adam is not part of it. Per worker w::

    M_w = G_w + e_w
    C(M_w)_i = s_{w,t} * sign(M_w)_i,   s_{w,t} = ||M_{w,t}||_1 / numel_t for the tensor t holding i
    e_w = M_w - C(M_w)
    out = (1/W) sum_w C(M_w)

``sign(0)`` is +1 (one bit per entry). All-reduce-compatible encoding: every rank all-gathers the same-length
message — the sign bits packed 8 per byte followed by its fp32 scales — and decodes the W messages locally.
Bytes sent per rank: ``numel/8 + 4 * tensors``, 1/32 of fp32.
"""

from __future__ import annotations

import torch

from ._common import (ByteCounter, ErrorFeedbackCompressor, Future, all_gather_flat, finite_flag, poison_if,
                      used_on_current_stream)

_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def pack_bits(positive: torch.Tensor) -> torch.Tensor:
    """Bool ``(numel,)`` -> uint8 ``(ceil(numel/8),)``, bit j of byte b = entry 8b+j."""
    numel = positive.numel()
    padded = torch.zeros((numel + 7) // 8 * 8, dtype=torch.uint8, device=positive.device)
    padded[:numel] = positive.to(torch.uint8)
    return (padded.view(-1, 8) << _shifts(positive.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 ``(..., nbytes)`` -> bool ``(..., numel)``."""
    bits = (packed.unsqueeze(-1) >> _shifts(packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :numel].bool()


def scales_per_tensor(M: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``||M_t||_1 / numel_t`` for each consecutive segment t of the flat tensor."""
    segments = torch.split(M, sizes)
    return torch.stack(torch._foreach_norm(segments, 1)) / torch.tensor(sizes, dtype=M.dtype, device=M.device)


def expand(scales: torch.Tensor, sizes: list[int], numel: int) -> torch.Tensor:
    repeats = torch.tensor(sizes, device=scales.device)
    return torch.repeat_interleave(scales, repeats, dim=-1, output_size=numel)


def compress(M: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales per tensor, sign bits as bool)."""
    return scales_per_tensor(M, sizes), M >= 0


def decompress(scales: torch.Tensor, positive: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    signs = positive.to(scales.dtype) * 2 - 1
    return expand(scales, sizes, positive.shape[-1]) * signs


class ScaledSign(ErrorFeedbackCompressor):
    def run(self, buffer: torch.Tensor, keys: list[int], params: list[torch.Tensor], group, world_size: int,
            counter: ByteCounter, scale_fn=None) -> Future:
        scale, M = self.compensated(buffer, keys, params, scale_fn)
        sizes = [p.numel() for p in params]
        numel = M.numel()
        scales, positive = compress(M, sizes)
        scales = poison_if(finite_flag(M), scales)
        packed = pack_bits(positive)
        payload = torch.cat([packed, scales.view(torch.uint8)])

        def decode(fut: Future) -> torch.Tensor:
            used_on_current_stream(M, scales, positive, scale)  # made on the hook's stream (see _common)
            gathered = fut.value()  # (W, nbytes + 4 * tensors)
            nbytes = packed.numel()
            all_scales = gathered[:, nbytes:].contiguous().view(torch.float32)  # (W, tensors)
            out = torch.zeros_like(M)
            for w in range(world_size):
                out.add_(decompress(all_scales[w], unpack_bits(gathered[w, :nbytes], numel), sizes))
            out.div_(world_size)
            if self.error_feedback:
                error = M - decompress(scales, positive, sizes)
                self.store_error(keys, error, scale, torch.isfinite(out).all())
            buffer.copy_(out)
            return buffer

        return all_gather_flat(payload, group, world_size, counter).then(decode)
