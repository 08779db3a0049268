"""Auto mode: measure the link and the compute at start, then choose no compression or a method.

The rule (``choose_method``), with ``t_ar`` the time of an fp32 all-reduce of the whole gradient and ``t_c`` the
compute time of a step without communication (forward + backward + optimizer):

* ``t_ar <= hidden_ratio * t_c`` (default 0.5) -> ``none``: DDP overlaps the all-reduce with backward (about 2/3
  of the compute), so at most a small part is exposed and any compression kernel would cost more than it saves.
  This is the NVLink case (anchors: 271M Llama, 59 ms step, fp32 all-reduce ~10 ms) and keeps auto within the
  1.02x target of plain DDP there: it *is* plain DDP (the controller registers its DDP communication hook only
  when it chooses a compressing method, so DDP keeps its own C++ all-reduce).
* ``t_ar <= bf16_ratio * t_c`` (default 1.5) -> ``bf16``: halving the bytes hides most of the rest, still
  overlapped, with no effect on convergence worth measuring.
* otherwise -> ``auto_slow_link``: communication dominates (the socket-transport case: 348 ms step for ~50 ms of
  compute). Default ``local_sgd``: from the decision on, parameters are averaged every ``auto_sync_every`` (4)
  steps, the change since the last sync sent in bf16 — on two H100s over NCCL's socket transport (271M Llama,
  300 steps of Adam) 0.32x plain DDP's step time at +0.5% eval loss, where PowerSGD rank 4 (``powersgd``, which
  changes gradients, not the averaging schedule) took 0.41x at +4.4%.

``t_ar`` is measured when DDP wraps the model (a timed all-reduce of a gradient-sized fp32 buffer, median of a
few, max over ranks). ``t_c`` is given (``auto_compute_ms``) or measured over the first ``auto_probe_steps``
optimizer steps, run by plain DDP (no hook yet): ``t_c ~= step - t_ar`` (exact when nothing overlaps, an under-estimate of
compute otherwise, which errs toward compressing only when communication is clearly exposed).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


def choose_method(allreduce_ms: float, compute_ms: float, *, hidden_ratio: float = 0.5, bf16_ratio: float = 1.5,
                  compressed: str = "powersgd") -> tuple[str, str]:
    """(method, reason) from the measured times; pure, for testing with injected timings."""
    compute_ms = max(compute_ms, 1e-6)
    ratio = allreduce_ms / compute_ms
    if ratio <= hidden_ratio:
        return "none", f"all-reduce {allreduce_ms:.2f} ms <= {hidden_ratio} x compute {compute_ms:.2f} ms: hidden"
    if ratio <= bf16_ratio:
        return "bf16", f"all-reduce {allreduce_ms:.2f} ms <= {bf16_ratio} x compute {compute_ms:.2f} ms: halve bytes"
    return compressed, f"all-reduce {allreduce_ms:.2f} ms > {bf16_ratio} x compute {compute_ms:.2f} ms: compress"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_allreduce_ms(numel: int, device: torch.device, group=None, repeats: int = 3) -> float:
    """Median time of an fp32 all-reduce of ``numel`` elements, max over ranks (all ranks get the same value)."""
    buffer = torch.ones(numel, dtype=torch.float32, device=device)
    dist.all_reduce(buffer, group=group)  # warm-up (connection set-up)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        dist.all_reduce(buffer, group=group)
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return max_over_ranks(sorted(times)[len(times) // 2], device, group)


def max_over_ranks(value: float, device: torch.device, group=None) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())
