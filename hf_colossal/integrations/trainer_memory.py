"""Heterogeneous memory under ``transformers.Trainer``: :class:`HeterogeneousMemoryTrainerMixin`.

What Trainer would do and why each is replaced (``shared/notes/hf-integration.md``):

- ``__init__`` shards the model (FSDP2, bf16 / fp16 / fp32 shards, fp32 masters set aside) before Trainer moves it
  to the device; ``_move_model_to_device`` is skipped for it (``.to()`` on FSDP2 parameters raises); ``--fp16`` /
  ``--bf16`` must go with the plugin's ``param_dtype`` (``check_mixed_precision``);
- under ``--fp16``, accelerate's ``GradScaler`` becomes torch's ``ShardedGradScaler`` (it unscales fp16
  gradients, which the plain one refuses, and all-reduces the overflow flag across the ranks' shards);
- ``create_accelerator_and_postprocess``: accelerate would refuse DTensor parameters under DDP; the prepared model
  gets accelerate's mixed-precision forward only, and the optimizer no device placement (which would copy every
  offloaded master and state tensor to the GPU);
- ``create_optimizer`` builds :class:`~hf_colossal.memory.HeterogeneousOptimizer` with Trainer's decay / no-decay
  groups and ``--learning_rate``, ``--adam_beta1/2``, ``--adam_epsilon``; ``--optim`` picks the base rule
  (``adamw*`` -> AdamW, ``lamb`` -> LAMB);
- ``save_model`` writes the fp32 master weights as ``model.safetensors`` (``save_pretrained``; gathered from
  every rank's shards): loadable with ``from_pretrained`` and no hf_colossal;
- checkpoints: the optimizer goes into a DCP folder (``hf_colossal_memory/``: every rank writes its shards of
  masters and state, :mod:`hf_colossal.memory.checkpoint`) and the scheduler into Trainer's usual file; resume
  reads them back and sets the bf16 shards from the masters, so ``_load_from_checkpoint`` leaves the weights alone
  and the run continues exactly.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ..memory import (
    HeterogeneousMemoryPlugin,
    HeterogeneousOptimizer,
    load_checkpoint,
    save_checkpoint,
    shard_model,
    sharded_model_of,
)
from .accelerate import _prepare_heterogeneous_memory_as_is, use_sharded_grad_scaler

logger = logging.getLogger(__name__)

#: ``--optim`` values and the base rule they select
BASE_FOR_OPTIM = {"lamb": "lamb"}
#: the DCP folder inside a Trainer checkpoint
CHECKPOINT_FOLDER = "hf_colossal_memory"


def base_optimizer_for(optim: Any) -> str:
    name = str(getattr(optim, "value", optim))
    if name.startswith("adamw"):
        return "adamw"
    if name in BASE_FOR_OPTIM:
        return BASE_FOR_OPTIM[name]
    raise ValueError(f"heterogeneous memory: --optim {name} is not supported; valid choices: adamw_torch, "
                     f"adamw_torch_fused (any adamw_*: torch AdamW on both devices), {', '.join(BASE_FOR_OPTIM)}")


def _plugin(value: Any) -> HeterogeneousMemoryPlugin | None:
    if value is None or isinstance(value, HeterogeneousMemoryPlugin):
        return value
    if isinstance(value, str):
        return HeterogeneousMemoryPlugin.from_optim_args(value)
    if isinstance(value, dict):
        return HeterogeneousMemoryPlugin.from_mapping(value)
    raise TypeError(f"heterogeneous_memory must be a HeterogeneousMemoryPlugin, an options string or a dict, got "
                    f"{type(value).__name__}")


class HeterogeneousMemoryTrainerMixin:
    """``class MyTrainer(HeterogeneousMemoryTrainerMixin, Trainer)``; pass ``heterogeneous_memory=`` a plugin, an
    options string (``"placement=static,offload_optim_frac=0.8"``) or a dict."""

    def __init__(self, model: Any = None, args: Any = None, *rest: Any, heterogeneous_memory: Any = None,
                 **kwargs: Any) -> None:
        self.heterogeneous_memory = _plugin(heterogeneous_memory)
        if self.heterogeneous_memory is not None:
            if model is None or kwargs.get("model_init") is not None:
                raise ValueError("heterogeneous memory shards the model given to Trainer(model=...); model_init is "
                                 "not supported")
            if args is None:
                raise ValueError("heterogeneous memory needs TrainingArguments (args=...) to know the device")
            self.heterogeneous_memory.check_mixed_precision("fp16" if args.fp16 else "bf16" if args.bf16 else "no")
            base_optimizer_for(args.optim)  # fail before sharding
            if sharded_model_of(model) is None:
                shard_model(model, self.heterogeneous_memory, device=args.device)
        super().__init__(model, args, *rest, **kwargs)

    @property
    def _sharded(self):
        return sharded_model_of(self.model) if self.heterogeneous_memory is not None else None

    def _move_model_to_device(self, model: Any, device: Any) -> None:
        if self._sharded is None:
            super()._move_model_to_device(model, device)  # type: ignore[misc]

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()  # type: ignore[misc]
        if self.heterogeneous_memory is not None:
            _prepare_heterogeneous_memory_as_is(self.accelerator)
            use_sharded_grad_scaler(self.accelerator)
            self.heterogeneous_memory.check_loss_scaler(self.accelerator.scaler)

    def create_optimizer(self, model: Any = None):
        sharded = self._sharded
        if sharded is None:
            return super().create_optimizer(*([model] if model is not None else []))  # type: ignore[misc]
        if self.optimizer is None:
            args = self.args
            decay = set(self.get_decay_parameter_names(sharded.model))
            named = [(n, p) for n, p in sharded.model.named_parameters() if p.requires_grad]
            groups = [{"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
            self.optimizer = HeterogeneousOptimizer(
                [g for g in groups if g["params"]], sharded, self.heterogeneous_memory,
                base=base_optimizer_for(args.optim), lr=args.learning_rate,
                betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        return self.optimizer

    @property
    def _heterogeneous_optimizer(self) -> HeterogeneousOptimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        sharded = self._sharded
        if sharded is None:
            return super().save_model(output_dir, _internal_call)  # type: ignore[misc]
        output_dir = output_dir or self.args.output_dir
        if self.optimizer is not None:
            self._heterogeneous_optimizer.synchronize()
        state = full_master_weights(sharded)  # a collective: every rank takes part
        if self.args.should_save:
            from transformers.trainer import TRAINING_ARGS_NAME

            os.makedirs(output_dir, exist_ok=True)
            sharded.model.save_pretrained(output_dir, state_dict=state, safe_serialization=True)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self._sharded is None:
            return super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]
        from transformers.trainer import SCHEDULER_NAME

        save_checkpoint(self._heterogeneous_optimizer, os.path.join(output_dir, CHECKPOINT_FOLDER))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        return None

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if self._sharded is None or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        from transformers.trainer import SCHEDULER_NAME

        load_checkpoint(self._heterogeneous_optimizer, _memory_folder(checkpoint))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))
        return None

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's masters (with their optimizer state) from its DCP folder,
        and the low-precision shards set from them; Trainer's own load would put plain tensors into FSDP2's
        parameters and leave the masters, which ``save_model`` writes, at the last step."""
        if self._sharded is None:
            return super()._load_best_model()  # type: ignore[misc]
        best = self.state.best_model_checkpoint
        logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
        load_checkpoint(self._heterogeneous_optimizer, _memory_folder(best))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if self._sharded is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        # else: the fp32 masters come with the optimizer state (_load_optimizer_and_scheduler)


def _memory_folder(checkpoint: str) -> str:
    """The DCP folder of a Trainer checkpoint written by a heterogeneous-memory run (or a clear error)."""
    folder = os.path.join(checkpoint, CHECKPOINT_FOLDER)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{checkpoint} has no {CHECKPOINT_FOLDER}/ folder: it was not saved by a "
                                "heterogeneous-memory run, so its optimizer state (and fp32 masters) cannot be "
                                "restored; start from its weights with from_pretrained instead")
    return folder


def full_master_weights(sharded) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 master on the CPU, gathered from the ranks' shards (call on every rank)."""
    from torch.distributed.tensor import DTensor, Shard

    state = {}
    for name, param in sharded.model.named_parameters():
        master = sharded.masters[name]
        if isinstance(param, DTensor) and sharded.world_size > 1:
            master = DTensor.from_local(master.to(sharded.device), sharded.mesh, [Shard(0)], run_check=False,
                                        shape=param.shape, stride=param.stride()).full_tensor()
        state[name] = master.detach().cpu()
    return state


def heterogeneous_memory_trainer_class(trainer_cls: type) -> type:
    """``trainer_cls`` with :class:`HeterogeneousMemoryTrainerMixin` in front."""
    if issubclass(trainer_cls, HeterogeneousMemoryTrainerMixin):
        return trainer_cls
    return type(f"HeterogeneousMemory{trainer_cls.__name__}", (HeterogeneousMemoryTrainerMixin, trainer_cls), {})
