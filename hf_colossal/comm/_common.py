"""Shared pieces of the communication hooks: collectives through ``torch.distributed`` only, byte counting,
non-finite handling and the per-parameter error-feedback store.

Error feedback (EF) is kept per parameter in fp32 and in *unscaled* units (divided by the GradScaler's current
scale), so a change of loss scale or of DDP's bucket layout (DDP rebuilds its buckets after the first iteration;
a resumed run builds them afresh) never misaligns it. A bucket whose local gradient holds an inf/NaN leaves its EF
untouched (sync-free: ``torch.where`` on a device flag) and makes the decoded result non-finite on every rank, so
GradScaler skips the step everywhere, exactly as with plain DDP.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
import torch.distributed as dist

Future = torch.futures.Future


class ByteCounter:
    """Bytes this rank hands to each kind of collective (its payload, not the wire protocol's traffic)."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def add(self, kind: str, *tensors: torch.Tensor) -> None:
        self.totals[kind] += sum(t.numel() * t.element_size() for t in tensors)
        self.calls[kind] += 1

    def snapshot(self) -> dict[str, int]:
        return dict(self.totals)

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()


def completed_future(value: torch.Tensor) -> Future:
    fut: Future = torch.futures.Future()
    fut.set_result(value)
    return fut


def all_reduce_sum(tensor: torch.Tensor, group, counter: ByteCounter) -> Future:
    """Asynchronous in-place sum; the future's value is ``tensor``."""
    counter.add("all_reduce", tensor)
    work = dist.all_reduce(tensor, group=group, async_op=True)
    return work.get_future().then(lambda _fut: tensor)


def all_gather_flat(tensor: torch.Tensor, group, world_size: int, counter: ByteCounter) -> Future:
    """Asynchronous all-gather of a 1-D tensor; the future's value is a ``(world_size, numel)`` tensor."""
    counter.add("all_gather", tensor)
    out = torch.empty((world_size, tensor.numel()), dtype=tensor.dtype, device=tensor.device)
    gather = getattr(dist, "all_gather_into_tensor")
    work = gather(out.view(-1), tensor.contiguous(), group=group, async_op=True)
    return work.get_future().then(lambda _fut: out)


def used_on_current_stream(*tensors: torch.Tensor | None) -> None:
    """Call inside a future callback on each tensor the callback reads that was made before it, on the hook's
    stream. On CUDA a callback of a NCCL future runs on a stream from torch's pool (``ivalue::Future`` waits for
    the collective there), while the hook's own stream goes on with backward and the next buckets. The hook's
    temporaries are freed when it returns, and the caching allocator gives their memory back to the hook's stream at
    once, so the next bucket could overwrite them before the callback's kernels have read them. ``record_stream``
    holds the memory until the work now queued on this stream is done. (The future's own value needs nothing: the
    future records it on the callback's stream.) Nothing to do on CPU."""
    for t in tensors:
        if t is not None and t.is_cuda:
            t.record_stream(torch.cuda.current_stream(t.device))


def finite_flag(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on the tensor's device (no host synchronisation)."""
    return torch.isfinite(tensor).all()


def poison_if(flag_finite: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` unchanged where ``flag_finite``, all-NaN otherwise (no host synchronisation)."""
    nan = torch.full((), float("nan"), dtype=tensor.dtype, device=tensor.device)
    return torch.where(flag_finite, tensor, nan)


class ErrorFeedback:
    """Per-parameter fp32 residuals, in unscaled units (``scale`` is the GradScaler's scale or None)."""

    def __init__(self) -> None:
        self.residuals: dict[int, torch.Tensor] = {}

    def gather(self, keys: list[int], params: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The residuals of a bucket's parameters, flattened in bucket order (zeros where none yet), fp32."""
        pieces = []
        for key, param in zip(keys, params):
            residual = self.residuals.get(key)
            if residual is None or residual.numel() != param.numel():
                residual = torch.zeros(param.numel(), dtype=torch.float32, device=like.device)
                self.residuals[key] = residual
            pieces.append(residual)
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()

    def store(self, keys: list[int], flat: torch.Tensor, finite: torch.Tensor) -> None:
        """Replace the residuals by ``flat`` (fp32, unscaled) where the bucket was finite, keep them otherwise."""
        offset = 0
        for key in keys:
            residual = self.residuals[key]
            n = residual.numel()
            residual.copy_(torch.where(finite, flat[offset:offset + n], residual))
            offset += n

    def state_dict(self) -> dict[int, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.residuals.items()}

    def load_state_dict(self, state: dict[int, torch.Tensor], device: torch.device) -> None:
        self.residuals = {int(k): v.to(device=device, dtype=torch.float32).clone() for k, v in state.items()}


ScaleFn = Callable[[], "torch.Tensor | float | None"]


def current_scale(scale_fn: ScaleFn | None, device: torch.device) -> torch.Tensor | None:
    if scale_fn is None:
        return None
    scale = scale_fn()
    if scale is None:
        return None
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale))
    return scale.to(device=device, dtype=torch.float32).reshape(())


class ErrorFeedbackCompressor:
    """Base of the compressors with error feedback (PowerSGD, top-k, sign): the per-rank residuals ``ef`` and the
    steps around each one's own exchange, with the residuals kept in unscaled units under a loss scale."""

    def __init__(self, error_feedback: bool = True) -> None:
        self.error_feedback = error_feedback
        self.ef = ErrorFeedback()

    def compensated(self, buffer: torch.Tensor, keys: list[int], params: list[torch.Tensor],
                    scale_fn: ScaleFn | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the loss scale or None, ``M = G + e`` in fp32: the bucket plus its residuals, brought to its units)."""
        scale = current_scale(scale_fn, buffer.device)
        M = buffer.float()
        if self.error_feedback:
            residual = self.ef.gather(keys, params, buffer)
            M = M + (residual * scale if scale is not None else residual)
        return scale, M

    def store_error(self, keys: list[int], error: torch.Tensor, scale: torch.Tensor | None,
                    finite: torch.Tensor) -> None:
        """The new residuals: ``error`` (bucket units) divided by the loss scale, kept only where ``finite``."""
        self.ef.store(keys, error / scale if scale is not None else error, finite)
