"""The heterogeneous optimizer: fp32 master weights and optimizer state per unit, on the GPU or in pinned CPU
memory, stepped where they live; the CPU steps overlap with the GPU (ZeRO-Offload, Ren et al. 2021, Sec. 4;
Colossal-AI Gemini's heterogeneous placement).

What the training loop sees is an ordinary ``torch.optim.Optimizer`` over the model's bf16 FSDP2 parameters:
param groups, ``lr`` set by schedulers, ``step()``, ``state_dict()``. Inside, each unit (see
:mod:`.placement`) has a *base* optimizer (torch ``AdamW``, fused on both devices, or hf_colossal's ``Lamb``)
over the fp32 masters of its parameters. One ``step()``:

1. one check that every gradient is finite (one host sync; all ranks agree); a step with inf/NaN gradients is
   skipped and counted in ``skipped_steps``, no state touched;
2. offloaded units, in forward order: bf16 gradient -> fp32 on the GPU and an asynchronous copy into one of two
   pinned host slots (a device-to-host stream; the slots are reused, so the host keeps no gradient per parameter),
   then the CPU step in a background thread (torch's fused CPU AdamW releases the GIL; the thread uses all cores
   but one, which stays with the thread that launches GPU work) and an asynchronous copy of the updated master
   back to the GPU on a host-to-device stream (PCIe carries both directions at once), cast to bf16 there;
3. device units: fp32 gradient (one unit at a time), fused step, bf16 copy-back;
4. ``step()`` returns while the CPU works: just before an offloaded unit's next forward, a pre-hook waits on the
   host for its CPU step and makes the compute stream and FSDP2's all-gather streams wait for its copy back, so the
   result is the same as a synchronous step.

``placement="auto"``: a first plan keeps on the device the leading blocks that fit next to ``FIRST_PLAN_RESERVE`` of
the device (or ``auto_margin_gib``, if larger);
the first step measures the peak memory of forward + backward, re-plans (:func:`.placement.plan_auto`) and moves
blocks between device and CPU before stepping.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._hooks import OptimizerHook
from ..optim._foreach import evaluate_closure, foreach_norms, local_tensors, stack_on_one_device
from .placement import (
    GIB,
    Footprint,
    MemoryPlanError,
    Unit,
    available_host_bytes,
    check_fits,
    check_host_fits,
    plan_auto,
    plan_static,
)
from .plugin import BASE_OPTIMIZERS, HeterogeneousMemoryPlugin
from .sharding import ShardedModel

logger = logging.getLogger(__name__)

#: placement='auto': share of the device the first plan leaves free for the first forward + backward, whose
#: activation peak is not measured yet (at least auto_margin_gib); the re-plan after that step uses the measurement
FIRST_PLAN_RESERVE = 0.15

BaseFactory = Callable[[list[dict[str, Any]], torch.device], torch.optim.Optimizer]


def adamw_factory(groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    """torch AdamW, fused on CUDA and on CPU (torch >= 2.4 has a vectorised CPU kernel)."""
    return torch.optim.AdamW(groups, fused=True)


def lamb_factory(groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    """hf_colossal's LAMB: foreach on CPU, fused kernel on CUDA."""
    from ..optim.lamb import Lamb

    return Lamb(groups)


BASE_FACTORIES: dict[str, BaseFactory] = {"adamw": adamw_factory, "lamb": lamb_factory}


def hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's settings (everything but ``params``)."""
    return {k: v for k, v in group.items() if k != "params"}


@dataclasses.dataclass
class _UnitRuntime:
    """One unit's masters, its base optimizer and, when offloaded, its pending CPU work."""

    index: int
    names: list[str]
    params: list[Tensor]  # the model's (bf16, FSDP2) parameters
    masters: list[Tensor]  # fp32 local shards, same order
    group_of: list[int]  # outer param-group index of each parameter
    on_device: bool = True
    base: torch.optim.Optimizer | None = None
    inner_groups: list[tuple[dict[str, Any], int]] = dataclasses.field(default_factory=list)
    future: concurrent.futures.Future | None = None
    copied_back: Any = None  # CUDA event: updated bf16 weights are on the device


def local_processes() -> int:
    """Training processes on this host (torchrun's / accelerate's ``LOCAL_WORLD_SIZE``; 1 without it): they share
    its cores and its RAM."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def cpu_step_threads() -> int:
    """Default threads of one process's CPU optimizer step: its share of the host's cores less one, which stays
    with the thread that launches GPU work."""
    return max(1, (os.cpu_count() or 2) // local_processes() - 1)


def _views_into(flat: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """Consecutive views of the 1-D ``flat``, shaped like ``tensors`` (a gradient slot laid out for one unit)."""
    views, offset = [], 0
    for tensor in tensors:
        views.append(flat[offset:offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()
    return views


def _fsdp_all_gather_streams(module: torch.nn.Module) -> list[Any]:
    """The streams FSDP2 gathers ``module``'s parameter shards on in forward (copy-in and collective). They wait on
    the compute stream only once per forward, at the root, so a unit's copy back must be waited for on them too.
    Reads FSDP2's internal state (torch 2.6 - 2.13); where it is not found the caller falls back to a host wait."""
    get_state = getattr(module, "_get_fsdp_state", None)
    comm = getattr(get_state(), "_comm_ctx", None) if get_state is not None else None
    streams = [getattr(comm, name, None) for name in ("all_gather_copy_in_stream", "all_gather_stream")]
    return streams if all(s is not None for s in streams) else []


class HeterogeneousOptimizer(torch.optim.Optimizer):
    """Master weights and optimizer state split between GPU and CPU by unit (see module docstring).

    ``params``: the sharded model's parameters or param groups (Trainer's decay / no-decay groups work);
    ``sharded``: what :func:`~hf_colossal.memory.sharding.shard_model` returned; ``base``: ``"adamw"`` or
    ``"lamb"``; remaining keywords are the base optimizer's hyperparameters (``lr``, ``betas``, ``eps``,
    ``weight_decay``, ...)."""

    def __init__(self, params: Any, sharded: ShardedModel, plugin: HeterogeneousMemoryPlugin | None = None,
                 base: str = "adamw", **defaults: Any) -> None:
        if base not in BASE_FACTORIES:
            raise ValueError(f"HeterogeneousOptimizer: base optimizer {base!r} is not supported; valid choices: "
                             f"{sorted(BASE_FACTORIES)}")
        if base == "lamb" and sharded.world_size > 1:
            raise ValueError("HeterogeneousOptimizer(base='lamb') needs whole-parameter norms, which sharded "
                             "masters do not have at world size > 1; use base='adamw' or one process")
        defaults.setdefault("lr", 1e-3)
        super().__init__(params, defaults)
        self.plugin = plugin or HeterogeneousMemoryPlugin()
        self.sharded = sharded
        self.device = sharded.device
        self.base_name = base
        self._factory = BASE_FACTORIES[base]
        low_precision_bytes = next(iter(sharded.model.parameters())).element_size()
        self.skipped_steps = 0
        self._pin = self.plugin.pin_memory and torch.cuda.is_available()
        self.footprint = Footprint.for_optimizer(BASE_OPTIMIZERS[base], low_precision_bytes, pinned=self._pin)
        self._cuda = self.device.type == "cuda"
        # gradients down and updated masters up on separate streams: PCIe copies both ways at once
        self._d2h_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._h2d_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._staging: list[Tensor] | None = None
        # pinned fp32 host slots the offloaded units' gradients pass through (each the size of the largest unit;
        # the host-memory plan counts two). On an H100 host 2, 3 or one per unit stepped equally fast.
        self.grad_slots = 2
        self._executor = (concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="hf_colossal_cpu_step", initializer=torch.set_num_threads,
            initargs=(self.plugin.cpu_threads or cpu_step_threads(),))
            if self.plugin.overlap else None)
        self._units = self._build_units()
        self._planned = self.plugin.placement == "static"
        self._agreed(self._first_plan)
        for unit, on_device in zip(self._units, self.plan.on_device):
            self._place(unit, on_device)
        if not self._planned and self._cuda:  # what the first forward + backward adds on top is the activation peak
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline_bytes = torch.cuda.memory_allocated(self.device)
        # the hooks hold this optimizer weakly: dropping it (without close()) frees its state and stops its thread
        self._gather_streams: dict[int, list[Any]] = {}  # per unit, FSDP2's all-gather streams (found at 1st use)
        self._hooks = [module.register_forward_pre_hook(OptimizerHook(self, "_before_unit_forward", unit),
                                                        prepend=True)
                       for unit, module in zip(self._units, sharded.modules) if unit.index > 0]
        self._hooks.append(sharded.model.register_state_dict_pre_hook(OptimizerHook(self, "_before_state_dict")))
        logger.info("heterogeneous memory: %s", self.plan.describe())

    # ----------------------------------------------------------------------------------------------------------
    # set-up

    def _build_units(self) -> list[_UnitRuntime]:
        group_of = {id(p): gi for gi, group in enumerate(self.param_groups) for p in group["params"]}
        named = dict(self.sharded.model.named_parameters())
        known = {id(p) for p in named.values()}
        stray = [p for p in group_of if p not in known]
        if stray:
            raise ValueError(f"HeterogeneousOptimizer: {len(stray)} parameter(s) are not parameters of the sharded "
                             "model; build the optimizer after shard_model(), from the sharded model's parameters")
        units, plan_units = [], []
        for unit, names in zip(self.sharded.units, self.sharded.param_names):
            trained = [n for n in names if id(named[n]) in group_of]
            units.append(_UnitRuntime(index=unit.index, names=trained, params=[named[n] for n in trained],
                                      masters=[self.sharded.masters[n] for n in trained],
                                      group_of=[group_of[id(named[n])] for n in trained]))
            numels = tuple(self.sharded.masters[n].numel() for n in trained)
            plan_units.append(Unit(unit.name, sum(numels), unit.index, frozen_numel=unit.numel - sum(numels),
                                   tensor_numels=numels))
        #: the units as the placement sees them: parameters this optimizer trains, and frozen ones (weights only)
        self._plan_units = tuple(plan_units)
        return units

    def _first_plan(self) -> None:
        capacity = self._capacity_bytes()
        if self.plugin.placement == "static":
            self.plan = plan_static(self._plan_units, self.plugin.offload_optim_frac, self.footprint,
                                    self.sharded.offloadable)
            if capacity is not None:
                check_fits(self.plan, capacity)
        else:  # auto: a first plan that leaves room for the unmeasured activations, re-planned after the first step
            if capacity is None:
                raise MemoryPlanError("placement='auto' on a device without memory statistics needs "
                                      "device_memory_gib")
            margin = int(self.plugin.auto_margin_gib * GIB)
            try:
                self.plan = plan_auto(self._plan_units, self.footprint, capacity, 0,
                                      max(margin, int(FIRST_PLAN_RESERVE * capacity)), self.sharded.offloadable)
            except MemoryPlanError:  # the reserve is a guess: let the measured first step decide
                self.plan = plan_auto(self._plan_units, self.footprint, capacity, 0, margin,
                                      self.sharded.offloadable)
        self._check_host_fits()

    def _check_host_fits(self) -> None:
        """Before moving anything: the plan's host share against this process's share of what the host has free
        (the masters already in host memory count as held; the first step's optimizer state does not exist yet)."""
        held = sum(m.numel() * 4 for u in self._units for m in u.masters if m.device.type == "cpu")
        check_host_fits(self.plan, held, available_host_bytes() // local_processes())

    def _agreed(self, plan: Callable[[], None]) -> None:
        """Run ``plan``; if it raises :class:`MemoryPlanError` on any rank, raise on every rank (a refusal on one
        rank alone would leave the others waiting in FSDP2's collectives)."""
        error = None
        try:
            plan()
        except MemoryPlanError as raised:
            error = raised
        if self.sharded.world_size > 1:
            failed = torch.tensor([error is not None], dtype=torch.int32, device=self.device)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
            if failed.item() and error is None:
                error = MemoryPlanError("heterogeneous memory: another rank's placement does not fit (its error "
                                        "says where and which setting to change); every rank stops")
        if error is not None:
            raise error

    def _capacity_bytes(self) -> int | None:
        if self.plugin.device_memory_gib is not None:
            return int(self.plugin.device_memory_gib * GIB)
        if self._cuda:
            return torch.cuda.get_device_properties(self.device).total_memory
        return None

    def _place(self, unit: _UnitRuntime, on_device: bool) -> None:
        """Put ``unit``'s masters (and base-optimizer state, if any) on the device or in (pinned) host memory."""
        target = self.device if on_device else torch.device("cpu")
        old_state = unit.base.state if unit.base is not None else {}

        def move(tensor: Tensor) -> Tensor:
            moved = tensor.to(target)
            return moved.pin_memory() if target.type == "cpu" and self._pin and not moved.is_pinned() else moved

        new_masters = [move(m) for m in unit.masters]
        groups: dict[int, dict[str, Any]] = {}
        for master, gi in zip(new_masters, unit.group_of):
            if gi not in groups:
                groups[gi] = {**hyperparameters(self.param_groups[gi]), "params": []}
            groups[gi]["params"].append(master)
        unit.base = self._factory(list(groups.values()), target) if groups else None
        unit.inner_groups = list(zip(unit.base.param_groups, groups)) if unit.base is not None else []
        for old, new in zip(unit.masters, new_masters):
            if old in old_state:
                unit.base.state[new] = {k: move(v) if torch.is_tensor(v) else v for k, v in old_state[old].items()}
        unit.masters = new_masters
        unit.on_device = on_device
        self.sharded.masters.update(zip(unit.names, new_masters))  # one reference: the old copy is freed

    # ----------------------------------------------------------------------------------------------------------
    # overlap: waiting for a unit's CPU step

    def _before_unit_forward(self, unit: _UnitRuntime, module: torch.nn.Module, args: Any) -> None:
        gather = self._gather_streams.setdefault(unit.index, [])  # after FSDP2's lazy init, at the first forward
        if self._cuda and not gather:
            gather.extend(_fsdp_all_gather_streams(module))
        # no streams (CPU, or FSDP2's not found): a host wait
        self._wait(unit, gather + [torch.cuda.current_stream(self.device)] if gather else None)

    def _before_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.synchronize()  # the model's state dict reads the parameters the CPU steps write back

    def _wait(self, unit: _UnitRuntime, streams: list[Any] | None = None) -> None:
        """Wait for ``unit``'s CPU step (on the host: its copy back is queued only when it ends), then for the copy
        back: ``streams`` wait for it on the device, or, without streams, the host waits."""
        if unit.future is not None:
            future, unit.future = unit.future, None
            future.result()
        if unit.copied_back is not None:
            if streams:
                for stream in streams:
                    stream.wait_event(unit.copied_back)
            else:
                unit.copied_back.synchronize()
            unit.copied_back = None

    def synchronize(self) -> None:
        """Wait for every pending CPU step and its copy back (done before state_dict and model saving)."""
        for unit in self._units:
            self._wait(unit)
        if self._cuda:  # copies back whose events a forward already made its streams wait for
            self._h2d_stream.synchronize()

    # ----------------------------------------------------------------------------------------------------------
    # the step

    def _grads_finite(self) -> bool:
        grads = [p.grad for unit in self._units for p in unit.params if p.grad is not None]
        if not grads:
            return True
        norms = foreach_norms(local_tensors(grads))  # fp32: an fp16 norm overflows above 65504 on finite values
        finite = stack_on_one_device(norms).isfinite().all().to(torch.int32)
        if self.sharded.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _replan(self) -> None:
        """placement='auto', first step: plan from the measured activation peak and move blocks to the device."""
        capacity = self._capacity_bytes()
        grads = sum(g.numel() * g.element_size()  # this rank's shards: what its memory holds
                    for g in local_tensors([p.grad for u in self._units for p in u.params if p.grad is not None]))
        activation = 0
        if self._cuda:
            activation = max(0, torch.cuda.max_memory_allocated(self.device) - self._baseline_bytes - grads)

        def replan() -> None:
            self.plan = plan_auto(self._plan_units, self.footprint, capacity, activation,
                                  int(self.plugin.auto_margin_gib * GIB), self.sharded.offloadable)
            self._check_host_fits()  # a larger measured activation peak offloads more than the first plan

        self._agreed(replan)
        for unit, on_device in zip(self._units, self.plan.on_device):
            if unit.on_device != on_device:
                self._place(unit, on_device)
        self._planned = True
        logger.info("heterogeneous memory: %s", self.plan.describe())

    def _sync_hyperparameters(self, unit: _UnitRuntime) -> None:
        for inner, gi in unit.inner_groups:
            inner.update(hyperparameters(self.param_groups[gi]))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate_closure(closure)
        self.synchronize()
        if not self._planned:
            self._replan()
        if not self._grads_finite():
            self.skipped_steps += 1
            logger.warning("heterogeneous memory: non-finite gradients, step skipped (%d so far); master weights "
                           "and optimizer state unchanged", self.skipped_steps)
            return loss
        work = [(unit, [(p, m) for p, m in zip(unit.params, unit.masters) if p.grad is not None])
                for unit in self._units]
        work = [(unit, pairs) for unit, pairs in work if pairs and unit.base is not None]
        offloaded = [(unit, pairs) for unit, pairs in work if not unit.on_device]
        for unit, _ in offloaded:
            self._sync_hyperparameters(unit)
        if offloaded:  # first, in forward order: the next forward starts on the first offloaded block while the
            self._host_steps(offloaded)  # CPU steps the later ones
        for unit, pairs in work:
            if unit.on_device:
                self._sync_hyperparameters(unit)
                self._device_step(unit, pairs)
        return loss

    def _device_step(self, unit: _UnitRuntime, pairs: list[tuple[Tensor, Tensor]]) -> None:
        params = [p for p, _ in pairs]
        masters = [m for _, m in pairs]
        for master, grad in zip(masters, local_tensors([p.grad for p in params])):
            master.grad = grad.to(torch.float32)
        unit.base.step()
        for master in masters:
            master.grad = None
        torch._foreach_copy_(local_tensors(params), masters)

    def _host_steps(self, work: list[tuple[_UnitRuntime, list[tuple[Tensor, Tensor]]]]) -> None:
        """Step the offloaded units, in forward order, through ``n = self.grad_slots`` pinned gradient slots.

        The gradients of the first n units are copied at once; unit k's lands in slot k % n, and the worker that
        finishes unit k starts the copy of unit k + n's gradient into the slot it just freed. The device gradients
        of units not yet copied are held (and record the copy's stream) until then."""
        n = max(1, min(self.grad_slots, len(work)))
        slots = self._staging_slots(n, max(sum(m.numel() for _, m in pairs) for _, pairs in work))
        if self._cuda:
            for stream in (self._d2h_stream, self._h2d_stream):  # after backward's last use of grads / weights
                stream.wait_stream(torch.cuda.current_stream(self.device))
        pending = [local_tensors([p.grad for p, _ in pairs]) for _, pairs in work]
        ready: list[Any] = [None] * len(work)
        for k in range(n):
            ready[k] = self._stage_gradients(pending, k, slots[k])

        failed: list[BaseException] = []

        def cpu_step(k: int, unit: _UnitRuntime, masters: list[Tensor], targets: list[Tensor]) -> None:
            if failed:  # this unit's gradient copy was to be started by the unit that failed
                raise RuntimeError("heterogeneous memory: an earlier offloaded unit's CPU step failed in this "
                                   "step; this unit was not stepped") from failed[0]
            try:
                stepped(k, unit, masters, targets)
            except BaseException as error:
                failed.append(error)
                raise

        def stepped(k: int, unit: _UnitRuntime, masters: list[Tensor], targets: list[Tensor]) -> None:
            if ready[k] is not None:
                ready[k].synchronize()
            for master, view in zip(masters, _views_into(slots[k % n], masters)):
                master.grad = view
            unit.base.step()
            for master in masters:
                master.grad = None
            if k + n < len(work):
                ready[k + n] = self._stage_gradients(pending, k + n, slots[k % n])
            if not self._cuda:
                torch._foreach_copy_(targets, masters)
                return
            with torch.cuda.device(self.device), torch.cuda.stream(self._h2d_stream):
                for target, master in zip(targets, masters):
                    target.copy_(master.to(self.device, non_blocking=True))
                done = torch.cuda.Event()
                done.record(self._h2d_stream)
            unit.copied_back = done

        for k, (unit, pairs) in enumerate(work):
            args = (k, unit, [m for _, m in pairs], local_tensors([p for p, _ in pairs]))
            if self._executor is None:
                cpu_step(*args)
            else:
                unit.future = self._executor.submit(cpu_step, *args)

    def _staging_slots(self, count: int, numel: int) -> list[Tensor]:
        """``count`` fp32 host gradient slots of at least ``numel`` elements (re-made when too few or too small)."""
        if self._staging is None or len(self._staging) < count or self._staging[0].numel() < numel:
            self._staging = None  # free the old ones before pinning new ones
            self._staging = [torch.empty(numel, dtype=torch.float32, pin_memory=self._pin) for _ in range(count)]
        return self._staging

    def _stage_gradients(self, pending: list[list[Tensor] | None], k: int, slot: Tensor) -> Any:
        """Copy the device gradients ``pending[k]`` into ``slot`` (fp32) and release them; on CUDA the copy runs
        on the device-to-host stream and the returned event marks its end."""
        grads, pending[k] = pending[k], None
        views = _views_into(slot, grads)
        if not self._cuda:
            for view, grad in zip(views, grads):
                view.copy_(grad)
            return None
        with torch.cuda.device(self.device), torch.cuda.stream(self._d2h_stream):
            for view, grad in zip(views, grads):
                grad.record_stream(self._d2h_stream)
                view.copy_(grad.to(torch.float32), non_blocking=True)
            staged = torch.cuda.Event()
            staged.record(self._d2h_stream)
        return staged

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; zeroing in place first waits for the offloaded units' pending gradient copies.
        (The model's own ``zero_grad(set_to_none=False)`` cannot wait: right after ``step()`` use this one, or
        the default ``set_to_none=True`` that Trainer and accelerate use.)"""
        if not set_to_none:  # zeroing in place would race the pending copies of offloaded units' gradients
            self.synchronize()
        super().zero_grad(set_to_none)

    # ----------------------------------------------------------------------------------------------------------
    # state

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """torch's layout (``state`` by parameter index, ``param_groups``); each entry also holds ``master``, the
        fp32 local shard, so a resumed run continues from full-precision weights. ``shard`` says whose shards
        these are (rank, world size): loading them into another rank is refused (accelerate's ``save_state``
        keeps the main process's optimizer state only; :func:`~hf_colossal.memory.save_checkpoint` writes all)."""
        self.synchronize()
        index = {id(p): i for i, p in enumerate(self._all_params())}
        state: dict[int, dict[str, Any]] = {}
        for unit in self._units:
            for param, master in zip(unit.params, unit.masters):
                entry = dict(unit.base.state.get(master, {})) if unit.base is not None else {}
                entry["master"] = master
                state[index[id(param)]] = entry
        groups = []
        for group in self.param_groups:
            packed = hyperparameters(group)
            packed["params"] = [index[id(p)] for p in group["params"]]
            groups.append(packed)
        return {"state": state, "param_groups": groups, "skipped_steps": self.skipped_steps,
                "shard": {"rank": self.sharded.rank, "world_size": self.sharded.world_size}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.synchronize()
        saved = state_dict.get("shard", {"rank": self.sharded.rank, "world_size": self.sharded.world_size})
        if (saved["rank"], saved["world_size"]) != (self.sharded.rank, self.sharded.world_size):
            raise ValueError(
                f"HeterogeneousOptimizer.load_state_dict: this state holds the shards of rank {saved['rank']} of "
                f"{saved['world_size']}, and this is rank {self.sharded.rank} of {self.sharded.world_size}. A "
                "single state dict holds one rank's shards (accelerate's save_state keeps the main process's "
                "only): save with hf_colossal.memory.save_checkpoint(optimizer, folder) on every rank and load "
                "with load_checkpoint, at any world size (Trainer's checkpoints do this)")
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("HeterogeneousOptimizer.load_state_dict: the saved param groups do not match this "
                             "optimizer's (different model or parameter grouping)")
        for group, saved in zip(self.param_groups, groups):
            group.update(hyperparameters(saved))
        params = self._all_params()
        by_id = {id(p): i for i, p in enumerate(params)}
        saved_state = {int(k): v for k, v in state_dict["state"].items()}
        for unit in self._units:
            if unit.base is None:
                continue
            for param, master in zip(unit.params, unit.masters):
                entry = dict(saved_state.get(by_id[id(param)], {}))
                saved_master = entry.pop("master", None)
                if saved_master is not None:
                    if saved_master.shape != master.shape:
                        raise ValueError(f"HeterogeneousOptimizer.load_state_dict: saved master of shape "
                                         f"{tuple(saved_master.shape)} for a local shard of shape "
                                         f"{tuple(master.shape)}: saved at another world size? hf_colossal.memory.save_checkpoint / "
                                         f"load_checkpoint (DCP) reshard")
                    master.copy_(saved_master)
                if entry:
                    unit.base.state[master] = {k: v.to(master.device, copy=True) if torch.is_tensor(v) else v
                                               for k, v in entry.items()}
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.refresh_parameters()

    def named_entries(self) -> list[tuple[str, Tensor, Tensor, dict[str, Any]]]:
        """(parameter name, model parameter, fp32 master, base-optimizer state of the master) for every trained
        parameter; the state dict is the live one (created empty where the base optimizer has not stepped yet)."""
        entries = []
        for unit in self._units:
            if unit.base is None:
                continue
            for name, param, master in zip(unit.names, unit.params, unit.masters):
                entries.append((name, param, master, unit.base.state[master]))
        return entries

    @torch.no_grad()
    def refresh_parameters(self) -> None:
        """Copy the masters into the model's (low-precision) parameters and the group settings into the base
        optimizers: after the masters or settings were changed from outside (checkpoint loading)."""
        for unit in self._units:
            if unit.params:
                torch._foreach_copy_(local_tensors(unit.params), unit.masters)
            self._sync_hyperparameters(unit)

    def close(self) -> None:
        """Finish pending work, remove the hooks and stop the worker thread."""
        self.synchronize()
        for handle in self._hooks:
            handle.remove()
        if self._executor is not None:
            self._executor.shutdown()
