"""Gradient compression under ``transformers.Trainer``.

Trainer builds its own Accelerator and always replaces ``kwargs_handlers`` with its DDP kwargs, so the plugin is
installed right after: :class:`GradientCompressionTrainerMixin` overrides ``create_accelerator_and_postprocess``
(the place ``shared/notes/hf-integration.md`` points to) and calls :func:`hf_colossal.comm.enable`. Trainer
prepares model and optimizer through that accelerator, so the hook and the step-following come with it.

Checkpoints: Trainer does not call ``accelerator.save_state``; :func:`register_trainer_checkpointing` (run by the
start-up hook when ``transformers.trainer`` loads) wraps ``Trainer._save_optimizer_and_scheduler`` and
``_load_optimizer_and_scheduler`` — both run on every rank with the checkpoint folder — to save / load the
compression state beside the optimizer's whenever the Trainer's accelerator carries one (any route: mixin, recipe
or ``HF_COLOSSAL_COMPRESSION``).
"""

from __future__ import annotations

import functools
from typing import Any

from ..comm.plugin import GradientCompressionPlugin
from .accelerate import current_controller, enable


class GradientCompressionTrainerMixin:
    """``class MyTrainer(GradientCompressionTrainerMixin, Trainer)``; pass ``gradient_compression=`` a plugin,
    an options string (``"method=powersgd,rank=4"``) or a dict."""

    def __init__(self, *args: Any, gradient_compression: Any = None, **kwargs: Any) -> None:
        if isinstance(gradient_compression, str):
            gradient_compression = GradientCompressionPlugin.from_string(gradient_compression)
        elif isinstance(gradient_compression, dict):
            gradient_compression = GradientCompressionPlugin.from_mapping(gradient_compression)
        self.gradient_compression = gradient_compression
        super().__init__(*args, **kwargs)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()  # type: ignore[misc]
        if self.gradient_compression is not None:
            enable(self.accelerator, self.gradient_compression)

    @property
    def compression_controller(self):
        return current_controller(self.accelerator)


def compression_trainer_class(trainer_cls: type) -> type:
    """``trainer_cls`` with :class:`GradientCompressionTrainerMixin` in front (works for TRL's trainers too)."""
    if issubclass(trainer_cls, GradientCompressionTrainerMixin):
        return trainer_cls
    return type(f"Compression{trainer_cls.__name__}", (GradientCompressionTrainerMixin, trainer_cls), {})


def register_trainer_checkpointing(trainer_module) -> None:
    """Save / load the compression state with Trainer checkpoints (idempotent; a no-op without a plugin)."""
    cls = trainer_module.Trainer
    if getattr(cls._save_optimizer_and_scheduler, "_hf_colossal", False):
        return
    save_original = cls._save_optimizer_and_scheduler
    load_original = cls._load_optimizer_and_scheduler

    @functools.wraps(save_original)
    def _save_optimizer_and_scheduler(self, output_dir):
        save_original(self, output_dir)
        controller = current_controller(getattr(self, "accelerator", None))
        if controller is not None and controller.params:
            controller.save(output_dir)

    @functools.wraps(load_original)
    def _load_optimizer_and_scheduler(self, checkpoint):
        load_original(self, checkpoint)
        controller = current_controller(getattr(self, "accelerator", None))
        if controller is not None and checkpoint is not None:
            controller.load(checkpoint)

    _save_optimizer_and_scheduler._hf_colossal = True  # type: ignore[attr-defined]
    _load_optimizer_and_scheduler._hf_colossal = True  # type: ignore[attr-defined]
    cls._save_optimizer_and_scheduler = _save_optimizer_and_scheduler
    cls._load_optimizer_and_scheduler = _load_optimizer_and_scheduler
