"""Where each unit's fp32 master weights and optimizer state live: the placement policy (pure Python).

A *unit* is one FSDP2 module (a transformer block, found through ``model._no_split_modules``) or the root (what
is left: embeddings, final norm, LM head). Every unit keeps its low-precision (bf16) parameters and gradients on
the compute device; what moves is the 12-16 bytes per parameter of fp32 master copy and optimizer state.

Which units go to the CPU: the **last** ones in forward order. Their gradients arrive first in backward and
their weights are needed last in the next forward, so their CPU optimizer step has the longest time to hide
behind GPU work (Gemini and ZeRO-Offload offload by fraction without regard to order; ordering is what makes the
overlap possible). The root stays on the compute device.

- ``static``: a fraction of the units' parameters (Gemini's ``offload_optim_frac``), rounded to whole units.
- ``auto``: as many leading units on the device as fit into its memory next to the measured peak of activations
  of a warm-up step (Gemini's auto policy uses the same warm-up measurement).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

GIB = 2**30


class MemoryPlanError(RuntimeError):
    """The model does not fit under any placement the settings allow; the message says what was placed where."""


@dataclasses.dataclass(frozen=True)
class Unit:
    """One placement unit: ``name`` (module path, ``""`` for the root), local count of trained parameters, forward
    index, and ``frozen_numel`` local parameters that are not trained (their low-precision weights only are on the
    device: no gradient, no optimizer state; their fp32 masters stay in host memory where sharding left them)."""

    name: str
    numel: int
    index: int
    frozen_numel: int = 0
    #: the trained parameters' local sizes, one per tensor (what a pinned host copy rounds); empty: one tensor
    tensor_numels: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return self.name or "<root>"


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Bytes per parameter on the compute device.

    ``low_precision``: the bf16 parameter and its gradient (always on the device); ``master_and_state``: fp32
    master copy plus optimizer state (``4 * (1 + states_per_param)``), on the device only for device units.
    """

    low_precision: int = 4
    master_and_state: int = 12
    #: host copies of masters and gradient slots are pinned: torch's pinned allocator rounds each up to a power of
    #: two (a 4096 x 11008 fp32 master, 172 MiB, takes 256 MiB)
    pinned: bool = False

    @classmethod
    def for_optimizer(cls, states_per_param: int, low_precision_bytes: int = 2, pinned: bool = False) -> Footprint:
        return cls(low_precision=2 * low_precision_bytes, master_and_state=4 * (1 + states_per_param), pinned=pinned)


def pinned_bytes(nbytes: int) -> int:
    """Host bytes torch's pinned (page-locked) allocator takes for a request of ``nbytes``: the next power of two."""
    return 1 << max(nbytes - 1, 0).bit_length() if nbytes else 0


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """The placement of every unit: ``on_device[i]`` is True where unit i's master and state stay on the device."""

    units: tuple[Unit, ...]
    on_device: tuple[bool, ...]
    footprint: Footprint
    reason: str

    def __post_init__(self) -> None:
        if len(self.units) != len(self.on_device):
            raise ValueError("one placement per unit")

    @property
    def offloaded(self) -> tuple[Unit, ...]:
        return tuple(u for u, d in zip(self.units, self.on_device) if not d)

    @property
    def offloaded_numel(self) -> int:
        return sum(u.numel for u in self.offloaded)

    @property
    def total_numel(self) -> int:
        return sum(u.numel for u in self.units)

    def low_precision_bytes(self) -> int:
        """The low-precision weights of every parameter and the gradients of the trained ones (always on device)."""
        frozen_weights = sum(u.frozen_numel for u in self.units) * (self.footprint.low_precision // 2)
        return self.total_numel * self.footprint.low_precision + frozen_weights

    def device_bytes(self, activation_bytes: int = 0) -> int:
        """Persistent bytes this plan keeps on the compute device, plus ``activation_bytes``."""
        device_numel = self.total_numel - self.offloaded_numel
        return self.low_precision_bytes() + device_numel * self.footprint.master_and_state + activation_bytes

    def host_bytes(self) -> int:
        """Host bytes: fp32 master and optimizer state per offloaded parameter, plus two fp32 gradient slots the
        size of the largest offloaded unit (gradients pass through them one unit at a time). Where they are pinned,
        each master and slot counts as the pinned allocator rounds it (the optimizer state is not pinned)."""
        size = pinned_bytes if self.footprint.pinned else (lambda nbytes: nbytes)
        masters = sum(size(4 * n) for u in self.offloaded for n in (u.tensor_numels or (u.numel,)))
        state = self.offloaded_numel * (self.footprint.master_and_state - 4)
        largest = max((u.numel for u in self.offloaded), default=0)
        return masters + state + 2 * size(4 * largest)

    def describe(self) -> str:
        offloaded = self.offloaded
        share = self.offloaded_numel / max(self.total_numel, 1)
        lines = [f"placement ({self.reason}): {len(self.units) - len(offloaded)} of {len(self.units)} units keep "
                 f"master weights and optimizer state on the compute device, {len(offloaded)} on the CPU "
                 f"({share:.0%} of trained parameters, {self.host_bytes() / GIB:.1f} GiB host memory); "
                 f"persistent device memory {self.device_bytes() / GIB:.1f} GiB"]
        if offloaded:
            lines.append(f"  offloaded: {offloaded[0].label} .. {offloaded[-1].label}")
        return "\n".join(lines)


def _check_units(units: Sequence[Unit]) -> tuple[Unit, ...]:
    units = tuple(units)
    if [u.index for u in units] != list(range(len(units))):
        raise ValueError("units must be given in forward order with indices 0..n-1")
    return units


def plan_static(units: Sequence[Unit], offload_fraction: float, footprint: Footprint,
                offloadable: Sequence[bool] | None = None) -> MemoryPlan:
    """Offload the trailing units whose parameters make up closest to ``offload_fraction`` of the offloadable ones.

    ``offloadable[i]`` False pins unit i to the device (the root)."""
    units = _check_units(units)
    if not 0.0 <= offload_fraction <= 1.0:
        raise ValueError(f"offload fraction must be in [0, 1], got {offload_fraction}")
    offloadable = tuple(offloadable) if offloadable is not None else (True,) * len(units)
    candidates = [u for u, ok in zip(units, offloadable) if ok]
    target = offload_fraction * sum(u.numel for u in candidates)
    chosen: set[int] = set()
    offloaded = 0
    for unit in reversed(candidates):
        if abs(offloaded + unit.numel - target) > abs(offloaded - target):
            break
        chosen.add(unit.index)
        offloaded += unit.numel
    on_device = tuple(u.index not in chosen for u in units)
    return MemoryPlan(units, on_device, footprint, f"static, offload_optim_frac={offload_fraction:g}")


def plan_auto(units: Sequence[Unit], footprint: Footprint, capacity_bytes: int, activation_bytes: int,
              margin_bytes: int, offloadable: Sequence[bool] | None = None) -> MemoryPlan:
    """Keep the most leading offloadable units on the device that fit ``capacity - margin`` next to the activations.

    Raises :class:`MemoryPlanError` when even offloading every offloadable unit does not fit."""
    units = _check_units(units)
    offloadable = tuple(offloadable) if offloadable is not None else (True,) * len(units)
    budget = capacity_bytes - margin_bytes
    reason = (f"auto: {capacity_bytes / GIB:.1f} GiB device, {activation_bytes / GIB:.1f} GiB activation peak "
              f"measured, {margin_bytes / GIB:.1f} GiB margin")
    on_device = [not ok for ok in offloadable]
    plan = MemoryPlan(units, tuple(on_device), footprint, reason)
    if plan.device_bytes(activation_bytes) > budget:
        raise MemoryPlanError(
            f"the model does not fit on the compute device even with every block's master weights and optimizer "
            f"state on the CPU: needs {plan.device_bytes(activation_bytes) / GIB:.1f} GiB of {budget / GIB:.1f} "
            f"GiB (low-precision weights and gradients {plan.low_precision_bytes() / GIB:.1f} GiB, "
            f"activations {activation_bytes / GIB:.1f} GiB). Reduce the batch size or sequence length, enable "
            f"gradient checkpointing, shard over more GPUs, or lower auto_margin_gib.\n{plan.describe()}")
    for unit in units:
        if on_device[unit.index]:
            continue
        on_device[unit.index] = True
        if MemoryPlan(units, tuple(on_device), footprint, reason).device_bytes(activation_bytes) > budget:
            on_device[unit.index] = False
            break
    return MemoryPlan(units, tuple(on_device), footprint, reason)


def available_host_bytes() -> int:
    """Host memory the kernel reports as available now (Linux ``MemAvailable``; physical free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_host_fits(plan: MemoryPlan, already_held_bytes: int, available_bytes: int) -> None:
    """Raise :class:`MemoryPlanError` before pinning when the offloaded share needs more host memory than is free.

    ``already_held_bytes``: host bytes the offloaded masters occupy already (they are moved, not copied)."""
    need = plan.host_bytes() - already_held_bytes
    if need > available_bytes:
        raise MemoryPlanError(
            f"the offloaded master weights, optimizer state and gradient buffers need {need / GIB:.1f} GiB more "
            f"host memory, {available_bytes / GIB:.1f} GiB is available: keep more blocks on the device (lower "
            f"offload_optim_frac with placement='static', or a smaller auto_margin_gib), shard over more GPUs, or use "
            f"a machine with more RAM.\n"
            f"{plan.describe()}")


def check_fits(plan: MemoryPlan, capacity_bytes: int, activation_bytes: int = 0) -> None:
    """Raise :class:`MemoryPlanError` naming the placement and the setting to change if ``plan`` cannot fit."""
    need = plan.device_bytes(activation_bytes)
    if need > capacity_bytes:
        raise MemoryPlanError(
            f"this placement needs {need / GIB:.1f} GiB on a {capacity_bytes / GIB:.1f} GiB device before "
            f"activations: raise offload_optim_frac (now {plan.offloaded_numel / max(plan.total_numel, 1):.2f} "
            f"of trained parameters offloaded) or use placement='auto'.\n{plan.describe()}")
