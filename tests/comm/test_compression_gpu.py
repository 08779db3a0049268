"""The CUDA code path of the error-feedback compressors (skipped without CUDA; run on the device machine).

On CUDA a NCCL future's callbacks run on a stream from torch's pool while the hook's stream goes on with backward
and the next buckets. Here one rank's collectives are stood in for by a future completed on a side stream behind a
GPU sleep (a slow link), and right after the hook returns its stream allocates tensors of the sizes of the hook's
temporaries and fills them with NaN (the next bucket's work). A temporary read by a callback without
``record_stream`` is then overwritten before the callback reads it: the output or the error feedback differs from
the same compressor on the CPU (where there are no streams).
"""

import pytest
import torch
import torch.distributed as dist

from hf_colossal.comm._common import ByteCounter
from hf_colossal.comm.powersgd import PowerSGD
from hf_colossal.comm.sign import ScaledSign
from hf_colossal.comm.topk import TopK

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(384, 256), (384, 256), (256,), (512, 128)]
SLEEP_CYCLES = 200_000_000  # ~0.1 s: the callbacks' stream waits this long for each collective


class _Work:
    def __init__(self, fut):
        self._fut = fut

    def get_future(self):
        return self._fut


def _single_rank_collectives(monkeypatch, cycles: int) -> None:
    """``dist.all_reduce`` / ``all_gather_into_tensor`` of a world of one rank, completing late on CUDA."""
    side = torch.cuda.Stream() if torch.cuda.is_available() else None

    def finished(value: torch.Tensor, fill=None) -> _Work:
        if not value.is_cuda:
            if fill is not None:
                fill()
            fut = torch.futures.Future()
            fut.set_result(value)
            return _Work(fut)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(cycles)
            if fill is not None:
                fill()
            fut = torch.futures.Future(devices=[value.device])
            fut.set_result(value)  # as NCCL: complete at once, its events recorded on the (slow) side stream
        return _Work(fut)

    def all_reduce(tensor, group=None, async_op=False):
        return finished(tensor)

    def all_gather_into_tensor(out, tensor, group=None, async_op=False):
        return finished(out, lambda: out.copy_(tensor))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "all_gather_into_tensor", all_gather_into_tensor)


def _run(make, device: torch.device, steps: int = 2, clobber: bool = False):
    """Outputs and residuals of ``steps`` hook calls on known gradients (one bucket, one rank)."""
    params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in SHAPES]
    keys = list(range(len(params)))
    comp = make()
    outs, efs = [], []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        buffer = torch.cat([torch.randn(s, generator=g).reshape(-1) for s in SHAPES]).to(device)
        fut = comp.run(buffer, keys, params, None, 1, ByteCounter())
        if clobber:  # the next bucket's work on the hook's stream, sized like the hook's temporaries
            sizes = [buffer.numel(), 2 * 384 * 256, 512 * 128] + [p.numel() for p in params]
            junk = [torch.full((n,), float("nan"), device=device) for n in sizes for _ in range(2)]
            del junk
        out = fut.wait().clone()
        if device.type == "cuda":
            torch.cuda.synchronize()
        outs.append(out.cpu())
        efs.append(torch.cat([comp.ef.residuals[k] for k in keys]).cpu())
    return outs, efs


@pytest.mark.parametrize("name,make", [
    ("powersgd", lambda: PowerSGD(rank=4, seed=0)),
    ("topk", lambda: TopK(density=0.05)),
    ("sign", lambda: ScaledSign()),
])
def test_callbacks_read_the_hooks_temporaries_before_they_are_reused(monkeypatch, name, make):
    _single_rank_collectives(monkeypatch, SLEEP_CYCLES)
    ref_outs, ref_efs = _run(make, torch.device("cpu"))
    outs, efs = _run(make, torch.device("cuda", torch.cuda.current_device()), clobber=True)
    for step in range(len(ref_outs)):
        assert torch.isfinite(outs[step]).all() and torch.isfinite(efs[step]).all(), (name, step)
        torch.testing.assert_close(outs[step], ref_outs[step], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(efs[step], ref_efs[step], rtol=1e-3, atol=1e-4)
