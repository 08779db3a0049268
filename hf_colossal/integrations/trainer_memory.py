"""Heterogeneous memory under ``transformers.Trainer``: :class:`HeterogeneousMemoryTrainerMixin`.

What Trainer would do and why each is replaced (``shared/notes/hf-integration.md``):

- ``__init__`` shards the model (FSDP2, bf16 shards, fp32 masters set aside) before Trainer moves it to the
  device; ``_move_model_to_device`` is skipped for it (``.to()`` on FSDP2 parameters raises);
- ``create_accelerator_and_postprocess``: accelerate would refuse DTensor parameters under DDP; the prepared model
  gets accelerate's mixed-precision forward only;
- ``create_optimizer`` builds :class:`~hf_colossal.memory.HeterogeneousOptimizer` with Trainer's decay / no-decay
  groups and ``--learning_rate``, ``--adam_beta1/2``, ``--adam_epsilon``; ``--optim`` picks the base rule
  (``adamw*`` -> AdamW, ``lamb`` -> LAMB);
- ``save_model`` writes the fp32 master weights as ``model.safetensors`` (``save_pretrained``): loadable with
  ``from_pretrained`` and no hf_colossal;
- resume: the optimizer checkpoint holds the fp32 masters, so ``_load_from_checkpoint`` leaves the weights to
  ``_load_optimizer_and_scheduler`` (the bf16 shards are set from the masters there) and the run continues exactly.

One process only for now: the optimizer's masters are per-rank shards and Trainer saves the optimizer from rank 0.
Multi-GPU runs use the accelerate route (:func:`hf_colossal.integrations.accelerate.enable_heterogeneous_memory`).
"""

from __future__ import annotations

import os
from typing import Any

from ..memory import HeterogeneousMemoryPlugin, HeterogeneousOptimizer, shard_model, sharded_model_of
from .accelerate import _keep_sharded_models_out_of_ddp

#: ``--optim`` values and the base rule they select
BASE_FOR_OPTIM = {"lamb": "lamb"}


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
            if args.fp16:
                raise ValueError("heterogeneous memory trains bf16 weights with fp32 masters; --fp16 loss scaling "
                                 "is not supported: use --bf16 (or neither)")
            if args.world_size > 1:
                raise ValueError("heterogeneous memory under Trainer runs in one process for now (Trainer saves the "
                                 "optimizer from rank 0, the masters are per-rank shards); for several GPUs use "
                                 "hf_colossal.integrations.accelerate.enable_heterogeneous_memory in an accelerate "
                                 "script")
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
            _keep_sharded_models_out_of_ddp(self.accelerator)

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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        sharded = self._sharded
        if sharded is None:
            return super().save_model(output_dir, _internal_call)  # type: ignore[misc]
        output_dir = output_dir or self.args.output_dir
        if self.optimizer is not None:
            getattr(self.optimizer, "optimizer", self.optimizer).synchronize()  # accelerate wraps it
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            state = {name: master.detach().cpu() for name, master in sharded.masters.items()}
            sharded.model.save_pretrained(output_dir, state_dict=state, safe_serialization=True)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            import torch

            from transformers.trainer import TRAINING_ARGS_NAME

            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if self._sharded is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        # else: the fp32 masters come with the optimizer state (_load_optimizer_and_scheduler)


def heterogeneous_memory_trainer_class(trainer_cls: type) -> type:
    """``trainer_cls`` with :class:`HeterogeneousMemoryTrainerMixin` in front."""
    if issubclass(trainer_cls, HeterogeneousMemoryTrainerMixin):
        return trainer_cls
    return type(f"HeterogeneousMemory{trainer_cls.__name__}", (HeterogeneousMemoryTrainerMixin, trainer_cls), {})
