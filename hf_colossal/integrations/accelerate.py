"""Installing the gradient-compression plugin into an ``Accelerator`` (and so into Trainer's).

accelerate looks ``kwargs_handlers`` up by exact class, so a new handler class cannot be passed in; what works
(``shared/notes/hf-integration.md``) is replacing ``accelerator.ddp_handler`` after the Accelerator is built and
before ``prepare``: accelerate calls ``ddp_handler.to_kwargs()`` to build DDP and ``ddp_handler.register_comm_hook``
right after wrapping (GPU and multi-CPU paths). :func:`enable` puts in a ``DistributedDataParallelKwargs``
subclass that keeps the user's DDP settings and registers our hook, wraps ``accelerator.prepare`` to follow the
prepared optimizers' steps, and registers save/load pre-hooks so ``accelerator.save_state`` / ``load_state``
carry the compression state (per-rank files; see :mod:`hf_colossal.comm.controller`).

The environment route: with ``HF_COLOSSAL_COMPRESSION`` set, :func:`register_accelerator_env_route` (run by the
start-up hook when ``accelerate.accelerator`` loads) wraps ``Accelerator.__init__`` so that every Accelerator —
a plain script's or Trainer's — is enabled as it is built.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

from ..comm.plugin import ENV_VAR, GradientCompressionPlugin

logger = logging.getLogger(__name__)

ATTRIBUTE = "_hf_colossal_compression"


class CompressionSetupError(ValueError):
    """The plugin cannot run with this accelerator set-up (FSDP, DeepSpeed, a torch comm hook, too late...)."""


def _handler_class():
    from accelerate.utils import DistributedDataParallelKwargs

    class CompressionDDPKwargs(DistributedDataParallelKwargs):
        """The user's DDP kwargs plus our communication hook (the controller is not a dataclass field)."""

        controller: Any = None  # class attribute only: not a field, never passed to DDP

        def to_dict(self) -> dict[str, Any]:
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

        def register_comm_hook(self, model) -> None:
            self.controller.attach_model(model)

    return CompressionDDPKwargs


def current_controller(accelerator) -> Any:
    return getattr(accelerator, ATTRIBUTE, None)


def enable(accelerator, plugin: GradientCompressionPlugin | None = None, **options: Any):
    """Turn on gradient compression / infrequent sync for the model this accelerator will prepare.

    Call once, after building the Accelerator and before ``accelerator.prepare``. Returns the
    :class:`~hf_colossal.comm.controller.CompressionController` (bytes counted in ``.counter``), or None when the
    run is not distributed (one process: nothing to communicate) or ``method="none"``.
    """
    from accelerate.utils import DistributedType

    from ..comm.controller import CompressionController

    if plugin is None:
        plugin = GradientCompressionPlugin(**options)
    elif options:
        raise TypeError("pass either a GradientCompressionPlugin or keyword options, not both")
    if not isinstance(plugin, GradientCompressionPlugin):
        raise TypeError(f"expected a GradientCompressionPlugin, got {type(plugin).__name__}")
    existing = current_controller(accelerator)
    if existing is not None:
        if existing.plugin == plugin:
            return existing
        if existing.params:
            raise CompressionSetupError("gradient compression is already attached to a prepared model; enable() "
                                        "must be called before accelerator.prepare")
        logger.warning("replacing gradient compression %s by %s", existing.plugin.method, plugin.method)
    refused = {
        DistributedType.FSDP: "FSDP shards gradients with reduce-scatter, not DDP's all-reduce buckets; FSDP2's "
                              "reduce-scatter hook is not supported yet",
        DistributedType.DEEPSPEED: "DeepSpeed owns gradient communication (see its 1-bit Adam / ZeRO++ instead)",
        DistributedType.MEGATRON_LM: "Megatron-LM owns gradient communication",
    }
    if accelerator.distributed_type in refused:
        raise CompressionSetupError(
            f"GradientCompressionPlugin(method={plugin.method!r}) works with DDP only (accelerate launch / torchrun "
            f"without --use_fsdp / --use_deepspeed): {refused[accelerator.distributed_type]}.")
    if any(type(m).__name__ == "DistributedDataParallel" for m in getattr(accelerator, "_models", [])):
        raise CompressionSetupError("enable() must be called before accelerator.prepare(model): the model is "
                                    "already wrapped in DDP")
    handler = accelerator.ddp_handler
    if handler is not None and getattr(handler, "comm_hook", None) is not None and \
            str(getattr(handler.comm_hook, "value", handler.comm_hook)) not in ("no", "None") and \
            getattr(handler, "controller", None) is None:
        raise CompressionSetupError(
            f"DistributedDataParallelKwargs(comm_hook={handler.comm_hook}) already sets a torch comm hook; DDP takes "
            "one hook: drop it or the GradientCompressionPlugin")
    if plugin.method == "none" or accelerator.num_processes == 1 or not accelerator.use_distributed:
        if plugin.method != "none":
            logger.info("gradient compression %r: single process, nothing to communicate", plugin.method)
        return None
    import torch.distributed as dist

    controller = CompressionController(plugin)
    cls = _handler_class()
    fields = {f.name: getattr(handler, f.name) for f in dataclasses.fields(handler)} if handler is not None else {}
    fields = {k: v for k, v in fields.items() if k in {f.name for f in dataclasses.fields(cls)}}
    new_handler = cls(**fields)
    new_handler.controller = controller
    accelerator.ddp_handler = new_handler

    def scale():
        scaler = getattr(accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        return getattr(scaler, "_scale", None)

    controller.scale_fn = scale
    if existing is None:
        original_prepare = accelerator.prepare

        @functools.wraps(original_prepare)
        def prepare(*args, **kwargs):
            result = original_prepare(*args, **kwargs)
            current = current_controller(accelerator)
            if current is not None:
                for obj in (result if isinstance(result, tuple) else (result,)):
                    if hasattr(obj, "optimizer") and hasattr(obj, "step") and hasattr(obj, "param_groups"):
                        current.attach_optimizer(obj)
            return result

        accelerator.prepare = prepare
        accelerator.register_save_state_pre_hook(
            lambda _models, _weights, output_dir: current_controller(accelerator).save(output_dir))
        accelerator.register_load_state_pre_hook(
            lambda _models, input_dir: current_controller(accelerator).load(input_dir))
    setattr(accelerator, ATTRIBUTE, controller)
    del dist
    return controller


def register_accelerator_env_route(accelerator_module) -> None:
    """When ``HF_COLOSSAL_COMPRESSION`` is set, enable the plugin on every Accelerator as it is built (idempotent).

    The variable is parsed here, at import of accelerate, so a typo fails before any model loads."""
    plugin = GradientCompressionPlugin.from_env()
    if plugin is None:
        return
    cls = accelerator_module.Accelerator
    if getattr(cls.__init__, "_hf_colossal_compression", False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if current_controller(self) is None:
            enable(self, GradientCompressionPlugin.from_env())

    __init__._hf_colossal_compression = True  # type: ignore[attr-defined]
    cls.__init__ = __init__
    logger.info("%s=%s: gradient compression enabled for every Accelerator", ENV_VAR, plugin)


def _prepare_heterogeneous_memory_as_is(accelerator) -> None:
    """Make ``accelerator.prepare`` take heterogeneous-memory objects as they are:

    - an FSDP2-sharded model stays unwrapped (accelerate would refuse its DTensor parameters under DDP) and gets
      accelerate's mixed-precision forward only (``evaluation_mode``);
    - a :class:`~hf_colossal.memory.HeterogeneousOptimizer` gets no device placement: accelerate would round-trip
      its state dict through the device, copying every offloaded master and state tensor to the GPU (a peak of
      their size, the memory the plugin exists to save)."""
    from ..memory import HeterogeneousOptimizer
    from ..memory.sharding import sharded_model_of

    if getattr(accelerator.prepare_model, "_hf_colossal_memory", False):
        return
    prepare_model, prepare_optimizer = accelerator.prepare_model, accelerator.prepare_optimizer

    @functools.wraps(prepare_model)
    def prepare_sharded_model(model, device_placement=None, evaluation_mode=False):
        if sharded_model_of(model) is not None:
            return prepare_model(model, device_placement=False, evaluation_mode=True)
        return prepare_model(model, device_placement=device_placement, evaluation_mode=evaluation_mode)

    @functools.wraps(prepare_optimizer)
    def prepare_offloading_optimizer(optimizer, device_placement=None):
        if isinstance(optimizer, HeterogeneousOptimizer):
            device_placement = False
        return prepare_optimizer(optimizer, device_placement=device_placement)

    prepare_sharded_model._hf_colossal_memory = True  # type: ignore[attr-defined]
    accelerator.prepare_model, accelerator.prepare_optimizer = prepare_sharded_model, prepare_offloading_optimizer


def use_sharded_grad_scaler(accelerator) -> None:
    """Give ``accelerator`` torch's ``ShardedGradScaler`` in place of its fp16 ``GradScaler``, with the same settings.

    The plain scaler refuses fp16 gradients ("Attempting to unscale FP16 gradients") and checks only this rank's
    gradient shards; the sharded one unscales fp16 gradients in place and all-reduces the inf/NaN flag, so every
    rank skips the same steps and keeps the same scale (fp32 parameters under fp16 AMP need that too). Call
    before ``accelerator.prepare`` (the prepared optimizer holds the scaler). No scaler (no fp16 AMP, e.g. on the
    CPU): nothing to replace."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    scaler = accelerator.scaler
    if scaler is None or isinstance(scaler, ShardedGradScaler):
        return
    accelerator.scaler = ShardedGradScaler(
        device=accelerator.device.type, init_scale=scaler.get_scale(), growth_factor=scaler.get_growth_factor(),
        backoff_factor=scaler.get_backoff_factor(), growth_interval=scaler.get_growth_interval(),
        enabled=scaler.is_enabled())


def enable_heterogeneous_memory(accelerator, model, plugin=None, *, optimizer: str = "adamw",
                                param_groups: Any = None, **hyperparameters: Any):
    """Shard ``model`` with FSDP2 (``plugin.param_dtype`` shards) and build its
    :class:`~hf_colossal.memory.HeterogeneousOptimizer`. Under ``mixed_precision="fp16"`` the accelerator's scaler
    becomes a ``ShardedGradScaler`` (:func:`use_sharded_grad_scaler`): FSDP2 shards each gradient, so only an
    all-reduced overflow flag makes every rank skip the same steps.

    Call after building the Accelerator and before ``accelerator.prepare``; pass the returned model and optimizer
    to ``prepare`` (with the dataloaders and scheduler as usual)::

        model, optimizer = enable_heterogeneous_memory(accelerator, model, HeterogeneousMemoryPlugin(), lr=1e-4)
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    ``optimizer``: ``"adamw"`` or ``"lamb"``; ``param_groups``: groups over the *sharded* model's parameters given as
    a callable ``model -> groups`` (default: all parameters in one group)."""
    from accelerate.utils import DistributedType

    from ..memory import HeterogeneousMemoryPlugin, HeterogeneousOptimizer, shard_model

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED,
                                        DistributedType.MEGATRON_LM):
        raise ValueError(f"heterogeneous memory shards the model with FSDP2 itself; launch without "
                         f"--use_fsdp / --use_deepspeed (this accelerator uses {accelerator.distributed_type})")
    plugin = plugin or HeterogeneousMemoryPlugin()
    plugin.check_mixed_precision(accelerator.mixed_precision)
    use_sharded_grad_scaler(accelerator)
    plugin.check_loss_scaler(accelerator.scaler)
    sharded = shard_model(model, plugin, device=accelerator.device)
    params = param_groups(model) if callable(param_groups) else model.parameters()
    built = HeterogeneousOptimizer(params, sharded, plugin, base=optimizer, **hyperparameters)
    _prepare_heterogeneous_memory_as_is(accelerator)
    return model, built
