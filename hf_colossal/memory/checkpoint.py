"""Distributed checkpoints of a heterogeneous-memory run (``torch.distributed.checkpoint``, DCP).

Every rank writes its own shards, wherever they live (GPU or pinned CPU), as DTensors with the parameter's global
shape; DCP reshards on load, so a run saved on N processes resumes on M. Layout of the saved state:

- ``model.<param>``: the fp32 master weights of every parameter, frozen ones included (the model's true weights;
  the bf16 parameters are rounded copies);
- ``optimizer.<param>.<key>``: the base optimizer's state (``exp_avg``, ``exp_avg_sq``, ``step`` for AdamW);
- ``param_groups``, ``skipped_steps``.

Without hf_colossal, ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save(folder, "full.pt")`` turns
the folder into one ``torch.save`` file whose ``"model"`` entry is an ordinary full fp32 state dict for
``model.load_state_dict`` / ``save_pretrained``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor

from .optimizer import HeterogeneousOptimizer, hyperparameters


def _as_global(local: Tensor, param: Tensor, optimizer: HeterogeneousOptimizer) -> Tensor:
    """``local`` (a shard shaped like the parameter's local shard) as a DTensor with the parameter's global shape."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(local, optimizer.sharded.mesh, [Shard(0)], run_check=False, shape=param.shape,
                              stride=param.stride())


def _state(optimizer: HeterogeneousOptimizer) -> dict[str, Any]:
    model: dict[str, Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for name, param, master, base_state in optimizer.named_entries():
        model[name] = _as_global(master, param, optimizer)
        state[name] = {key: _as_global(value, param, optimizer) if torch.is_tensor(value) and
                       value.shape == master.shape and value.dim() > 0 else value
                       for key, value in base_state.items()}
    for name, param in optimizer.sharded.model.named_parameters():  # frozen: saved, so the folder is the whole model
        if name not in model:
            model[name] = _as_global(optimizer.sharded.masters[name], param, optimizer)
    groups = [hyperparameters(group) for group in optimizer.param_groups]
    return {"model": model, "optimizer": state, "param_groups": groups, "skipped_steps": optimizer.skipped_steps}


def save_checkpoint(optimizer: HeterogeneousOptimizer, folder: str) -> None:
    """Write the masters and optimizer state of every rank into ``folder`` (call on all ranks)."""
    optimizer.synchronize()
    dcp.save(_state(optimizer), checkpoint_id=folder)


def load_checkpoint(optimizer: HeterogeneousOptimizer, folder: str) -> None:
    """Load ``folder`` (saved at any world size) into this run's masters, optimizer state and bf16 parameters."""
    optimizer.synchronize()
    saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    for name, param, master, base_state in optimizer.named_entries():
        prefix = f"optimizer.{name}."
        for key, meta in saved.items():
            suffix = key[len(prefix):]
            if not key.startswith(prefix) or "." in suffix or suffix in base_state:
                continue
            size = getattr(meta, "size", None)
            if size is None:  # a non-tensor entry: DCP fills it in place of the placeholder
                base_state[suffix] = None
            elif len(size) == 0:
                base_state[suffix] = torch.zeros((), dtype=meta.properties.dtype, device=master.device)
            else:
                base_state[suffix] = torch.zeros_like(master, dtype=meta.properties.dtype)
    state = _state(optimizer)
    # folders from before frozen parameters were saved lack them; a missing trained parameter still fails
    trained = {name for name, *_ in optimizer.named_entries()}
    state["model"] = {name: value for name, value in state["model"].items()
                      if name in trained or f"model.{name}" in saved}
    dcp.load(state, checkpoint_id=folder)
    for name, param, master, base_state in optimizer.named_entries():
        loaded = state["optimizer"][name]
        for key, value in loaded.items():  # non-tensor entries come back in the dict, not in place
            if not torch.is_tensor(value):
                base_state[key] = value
    for group, saved_group in zip(optimizer.param_groups, state["param_groups"]):
        group.update(saved_group)
    optimizer.skipped_steps = int(state["skipped_steps"])
    optimizer.refresh_parameters()
