"""The only module that touches transformers internals.

What it changes, and why each change is safe (see ``shared/notes/hf-integration.md``):

* ``OptimizerNames`` (``transformers.training_args``) gains one member per registered optimizer, so
  ``TrainingArguments(optim="lamb")`` passes ``OptimizerNames(self.optim)`` and ``HfArgumentParser`` lists
  ``lamb`` among ``--optim`` choices. Our members pickle as plain strings, so a ``training_args.bin`` saved with
  ``optim="lamb"`` loads where hf_colossal is not installed, and ``to_json_string()`` records ``"optim": "lamb"``.
* ``TrainingArguments.__post_init__`` is wrapped to validate ``optim_args`` and the parallelism setting as soon
  as the arguments are built — before a model is loaded or a dataset tokenized.
* ``Trainer.log`` is wrapped so that callbacks with a ``contribute_logs(logs)`` method (ours, such as
  :class:`~hf_colossal.callbacks.LayerStatsCallback`) add their metrics to a log before it is recorded and handed
  to the reporting callbacks (TensorBoard, W&B), which come before user callbacks in Trainer's list.
* ``_OPTIMIZER_HANDLERS`` (``transformers.trainer_optimizer``) gains a handler per optimizer. It receives the
  model, so it builds our parameter groups (weight decay and trust-ratio exclusions) and passes them as
  ``params``, which Trainer uses in place of its own two groups.

Importing this module does not import transformers; :func:`register_optimizer_names`,
:func:`register_optimizer_handlers` and :func:`register_log_contributions` are called by the import hook in
:mod:`._autoload` once transformers' modules load.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from types import ModuleType
from typing import Any

from ..config import OptionsError
from ..registry import _REGISTRY, OptimizerSpec, find_optimizer_spec

logger = logging.getLogger(__name__)

_ENV_TRUE = ("1", "true", "yes")


def _enum_member_name(name: str) -> str:
    return "HF_COLOSSAL_" + name.upper()


def _add_enum_member(enum_cls: type, name: str, value: str) -> None:
    """Add ``value`` to a ``str``-mixin Enum created elsewhere (Python's Enum has no public API for this)."""
    if value in enum_cls._value2member_map_:
        return
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member._sort_order_ = len(enum_cls._member_names_)
    # Pickle (training_args.bin) as the plain string, loadable without hf_colossal.
    member.__reduce_ex__ = lambda protocol: (str, (value,))
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member


def _parallelism(args: Any) -> str | None:
    """'deepspeed', 'fsdp1' or 'fsdp2' when the run uses one (from the arguments or accelerate's launcher)."""
    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _ENV_TRUE:
        return "deepspeed"
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in _ENV_TRUE:
        config = getattr(args, "fsdp_config", None) or {}
        version = config.get("version") or config.get("fsdp_version") or os.environ.get("FSDP_VERSION") or 1
        return "fsdp2" if str(version) == "2" else "fsdp1"
    return None


_MODE_NAMES = {"deepspeed": "DeepSpeed", "fsdp1": "FSDP1 (fsdp_version 1, flat parameters)", "fsdp2": "FSDP2"}


def check_parallelism(spec: OptimizerSpec, args: Any) -> None:
    mode = _parallelism(args)
    supported = {"deepspeed": spec.capabilities.deepspeed, "fsdp1": False, "fsdp2": spec.capabilities.fsdp2}
    if mode is None or supported[mode]:
        return
    alternatives = {
        "deepspeed": [s.name for s in _REGISTRY.values() if s.capabilities.deepspeed],
        "fsdp1": [],
        "fsdp2": [s.name for s in _REGISTRY.values() if s.capabilities.fsdp2],
    }[mode]
    fsdp2_hint = " or under FSDP2 (fsdp_config version 2)" if spec.capabilities.fsdp2 else ""
    raise OptionsError(
        f"optim={spec.name!r} does not work under {_MODE_NAMES[mode]}: {spec.capabilities.limits} It works on a "
        f"single device and under DDP (torchrun / accelerate launch without --deepspeed/--fsdp){fsdp2_hint}. "
        f"hf_colossal optimizers that support {_MODE_NAMES[mode]}: {', '.join(alternatives) or 'none'}."
    )


def hyperparameters_from_args(spec: OptimizerSpec, args: Any) -> dict[str, Any]:
    """The TrainingArguments values that mean the same thing as the optimizer's arguments."""
    available = {
        "lr": args.learning_rate,
        "weight_decay": args.weight_decay,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
    }
    return {k: available[k] for k in spec.hyperparameters}


def validate_training_arguments(args: Any) -> None:
    """Fail fast on bad ``optim_args`` or an unsupported parallelism for one of our optimizers."""
    spec = find_optimizer_spec(args.optim)
    if spec is None:
        return
    config = spec.parse_options(args.optim_args)
    check_parallelism(spec, args)
    spec.validate(config, **hyperparameters_from_args(spec, args))


class OptimizerWithModel:
    """Trainer's factory protocol (``factory()(model, **kwargs)``) for optimizers built with the model (K-FAC).

    Returned by the handler in place of the class: Trainer pops a ``model`` kwarg given with a class and passes
    it *instead of* the param groups (the LOMO convention), so the groups and the model can only both reach the
    optimizer through a factory. The kwargs already hold ``params`` and ``model``.
    """

    def __init__(self, optimizer_cls: type) -> None:
        self.optimizer_cls = optimizer_cls

    def __call__(self, trainer_model: Any, **kwargs: Any) -> Any:
        return self.optimizer_cls(**kwargs)


def optimizer_cls_and_kwargs(spec: OptimizerSpec, args: Any, model: Any) -> tuple[Any, dict[str, Any]]:
    """What a transformers optimizer handler returns: the class and its kwargs, with our ``params`` groups.

    For an optimizer that needs the model, the kwargs also hold ``model`` and the first element is a factory
    (:class:`OptimizerWithModel`) that Trainer calls with them."""
    config = spec.parse_options(args.optim_args)
    check_parallelism(spec, args)
    kwargs = hyperparameters_from_args(spec, args)
    kwargs.pop("weight_decay", None)  # carried per group
    kwargs.update(config.optimizer_kwargs())
    if model is None:
        if spec.capabilities.needs_model:
            raise ValueError(f"optim={spec.name!r} needs the model; call Trainer.get_optimizer_cls_and_kwargs(args, model)")
        logger.warning("optim=%r built without the model: Trainer's decay groups are used, every group adapts", spec.name)
        kwargs["weight_decay"] = args.weight_decay
    else:
        kwargs["params"] = config.policy().groups(model, args.weight_decay)
    if spec.capabilities.needs_model:
        kwargs["model"] = model
        return partial(OptimizerWithModel, spec.optimizer_cls), kwargs
    return spec.optimizer_cls, kwargs


def register_optimizer_names(training_args: ModuleType) -> None:
    """Extend ``OptimizerNames`` and wrap ``TrainingArguments.__post_init__`` (idempotent)."""
    for name in _REGISTRY:
        _add_enum_member(training_args.OptimizerNames, _enum_member_name(name), name)
    cls = training_args.TrainingArguments
    if getattr(cls.__post_init__, "_hf_colossal", False):
        return
    original = cls.__post_init__

    def __post_init__(self: Any) -> None:
        original(self)
        validate_training_arguments(self)

    __post_init__._hf_colossal = True  # type: ignore[attr-defined]
    __post_init__.__wrapped__ = original  # type: ignore[attr-defined]
    cls.__post_init__ = __post_init__


def register_optimizer_handlers(trainer_optimizer: ModuleType) -> None:
    """Add a handler per registered optimizer to ``_OPTIMIZER_HANDLERS`` (idempotent)."""
    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if handlers is None:
        raise ImportError(
            "hf_colossal needs transformers>=5.17 (transformers.trainer_optimizer._OPTIMIZER_HANDLERS not found)"
        )
    names_enum = trainer_optimizer.OptimizerNames
    for name, spec in _REGISTRY.items():

        def handler(ctx: Any, spec: OptimizerSpec = spec) -> tuple[type, dict[str, Any]]:
            return optimizer_cls_and_kwargs(spec, ctx.args, ctx.model)

        # Keyed by the plain string too: args unpickled from training_args.bin hold "lamb", not the member.
        handlers[name] = handler
        handlers[names_enum(name)] = handler


def register_log_contributions(trainer_module: ModuleType) -> None:
    """Wrap ``Trainer.log`` to merge what callbacks offer through ``contribute_logs(logs)`` (idempotent)."""
    cls = trainer_module.Trainer
    if getattr(cls.log, "_hf_colossal", False):
        return
    original = cls.log

    def log(self: Any, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        for callback in self.callback_handler.callbacks:
            contribute = getattr(callback, "contribute_logs", None)
            if contribute is not None:
                logs.update(contribute(logs))
        original(self, logs, *args, **kwargs)

    log._hf_colossal = True  # type: ignore[attr-defined]
    log.__wrapped__ = original  # type: ignore[attr-defined]
    cls.log = log
