"""Sharding a model with FSDP2 for heterogeneous memory: bf16 shards on the device, fp32 masters set aside.

:func:`shard_model` takes an fp32 (or bf16) model anywhere (CPU, meta-initialised then materialised, or a
device), keeps an fp32 copy of each parameter's local shard as the master weight, casts the parameters to bf16
and applies ``torch.distributed.fsdp.fully_shard`` to every unit module (the classes in
``model._no_split_modules``, the ones transformers' own FSDP wrapping uses) and then to the root. FSDP2 moves
the bf16 shards to the compute device; the masters stay on the CPU until the optimizer places them.

FSDP2 shards every parameter on dim 0 in ``torch.chunk`` pieces, one per rank (ZeRO-3); world size 1 is the
unsharded case and still gets FSDP2's per-unit gather / free and gradient handling. A one-process group is
created when none exists (single-GPU scripts and Trainer runs do not start one).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..optim._foreach import local_tensors
from .placement import Unit
from .plugin import HeterogeneousMemoryPlugin

logger = logging.getLogger(__name__)

#: attribute set on a sharded model: its :class:`ShardedModel`
ATTRIBUTE = "_hf_colossal_sharded"


class ShardingError(ValueError):
    """The model cannot be sharded as asked (no unit modules found, already sharded, ...)."""


@dataclasses.dataclass
class ShardedModel:
    """A model after :func:`shard_model`: its units (root first, then blocks in forward order), the modules and
    parameter names of each unit, and the fp32 master of each parameter's local shard (by parameter name)."""

    model: nn.Module
    units: tuple[Unit, ...]
    modules: tuple[nn.Module, ...]
    param_names: tuple[tuple[str, ...], ...]
    masters: dict[str, torch.Tensor]
    device: torch.device
    world_size: int
    rank: int
    mesh: object  # the DeviceMesh FSDP2 shards over (1-D, all ranks)

    @property
    def offloadable(self) -> tuple[bool, ...]:
        """The root (unit 0) stays on the device; blocks may move."""
        return tuple(i > 0 for i in range(len(self.units)))


def compute_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _ensure_process_group(device: torch.device) -> None:
    """Join the launcher's group (torchrun / accelerate set ``WORLD_SIZE``), or start a one-process group."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    logger.info("heterogeneous memory: started a %d-process %s group for FSDP2", dist.get_world_size(), backend)


def find_unit_modules(model: nn.Module, class_names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """Modules whose class name is in ``class_names`` (outermost only), in registration (= forward) order."""
    names = set(class_names or getattr(model, "_no_split_modules", None) or ())
    if not names:
        raise ShardingError(
            f"{type(model).__name__} names no unit modules (transformers models list them in _no_split_modules); "
            "pass unit_classes, e.g. unit_classes=('LlamaDecoderLayer',)")
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if type(module).__name__ in names and not any(name.startswith(f"{outer}.") for outer, _ in found):
            found.append((name, module))
    if not found:
        present = sorted({type(m).__name__ for m in model.modules()})
        raise ShardingError(f"no module of class {sorted(names)} in {type(model).__name__}; classes present: "
                            f"{present}")
    return found


def _local_shard(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """The dim-0 piece FSDP2 gives ``rank`` (``torch.chunk``; ranks past the last chunk get an empty piece)."""
    if world_size == 1:
        return tensor
    chunks = torch.chunk(tensor, world_size, dim=0)
    if rank < len(chunks):
        return chunks[rank].clone()
    return tensor.new_empty((0, *tensor.shape[1:]))


def shard_model(model: nn.Module, plugin: HeterogeneousMemoryPlugin | None = None,
                device: torch.device | None = None) -> ShardedModel:
    """Shard ``model`` in place with FSDP2 (parameters in ``plugin.param_dtype``) and return it with its fp32
    masters.

    Call before building the optimizer (and before ``accelerator.prepare``). Parameters must be real tensors
    (not meta). Buffers keep their dtype (rotary frequencies stay fp32)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = plugin or HeterogeneousMemoryPlugin()
    if getattr(model, ATTRIBUTE, None) is not None:
        raise ShardingError("the model is already sharded for heterogeneous memory")
    if any(p.is_meta for p in model.parameters()):
        raise ShardingError("parameters are on the meta device: materialise them (to_empty + init) first")
    device = device or compute_device()
    _ensure_process_group(device)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh(device.type, (world_size,))
    blocks = find_unit_modules(model, plugin.unit_classes)
    param_dtype = getattr(torch, plugin.param_dtype)

    masters: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            raise ShardingError(f"parameter {name} is {param.dtype}; only floating-point parameters can be trained")
        full = param.detach().to("cpu", torch.float32)
        masters[name] = _local_shard(full, rank, world_size)
        param.data = full.to(param_dtype) if param.device.type == "cpu" else param.detach().to(param_dtype)
        del full

    reduce_dtype = torch.float32 if world_size > 1 else None
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=reduce_dtype)
    for _, module in blocks:
        fully_shard(module, mesh=mesh, reshard_after_forward=plugin.reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=plugin.reshard_after_forward, mp_policy=policy)

    owner = {}
    for index, (prefix, module) in enumerate(blocks, start=1):
        for name, _ in module.named_parameters():
            owner[f"{prefix}.{name}"] = index
    names_per_unit: list[list[str]] = [[] for _ in range(len(blocks) + 1)]
    for name, param in model.named_parameters():
        names_per_unit[owner.get(name, 0)].append(name)
        (local,) = local_tensors([param])
        if local.shape != masters[name].shape:
            raise ShardingError(f"FSDP2 gave {name} a local shard of shape {tuple(local.shape)}, expected "
                                f"{tuple(masters[name].shape)} (torch.chunk on dim 0)")
    units = tuple(Unit(prefix, sum(masters[n].numel() for n in names), index)
                  for index, (prefix, names) in enumerate(zip([""] + [p for p, _ in blocks], names_per_unit)))
    sharded = ShardedModel(model=model, units=units, modules=(model, *(m for _, m in blocks)),
                           param_names=tuple(tuple(n) for n in names_per_unit), masters=masters, device=device,
                           world_size=world_size, rank=rank, mesh=mesh)
    setattr(model, ATTRIBUTE, sharded)
    return sharded


def sharded_model_of(model: nn.Module) -> ShardedModel | None:
    """The :class:`ShardedModel` of a model prepared by :func:`shard_model` (through wrappers), else None."""
    while model is not None:
        found = getattr(model, ATTRIBUTE, None)
        if found is not None:
            return found
        model = getattr(model, "module", None)
    return None
