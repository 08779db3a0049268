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
from contextvars import ContextVar
from functools import partial
from types import ModuleType
from typing import Any

from ..config import OptionsError
from ..registry import _REGISTRY, OptimizerSpec, find_optimizer_spec

logger = logging.getLogger(__name__)

_ENV_TRUE = ("1", "true", "yes")

#: Optimizers that need the batch at each step (the stock Trainer calls ``step()`` without one), with the error
#: that building them through the stock Trainer raises. Their Trainer sets ``_BATCH_TRAINER`` while it builds.
BATCH_OPTIMIZERS = {
    "hessian_free": (
        "optim='hessian_free' needs the batch at every step (Hessian-free evaluates the loss and Gauss-Newton "
        "products several times per step), which the stock transformers Trainer never passes to the optimizer. Use "
        "hf_colossal.integrations.transformers.HessianFreeTrainer in place of Trainer, or, for your own Trainer "
        "subclass (e.g. TRL's), mix HessianFreeTrainerMixin in first: "
        "class MyTrainer(HessianFreeTrainerMixin, MyBaseTrainer). The arguments stay the same."
    ),
}
_BATCH_TRAINER: ContextVar[bool] = ContextVar("hf_colossal_batch_trainer", default=False)


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


def check_loss_scaling(spec: OptimizerSpec, args: Any) -> None:
    """Refuse ``--fp16`` (a GradScaler multiplies the backward pass by the loss scale) for an optimizer that reads
    that pass itself (K-FAC's output-gradient statistics would carry the scale squared)."""
    # what Trainer builds its Accelerator from: --fp16 / --bf16 override the launcher's ACCELERATE_MIXED_PRECISION
    mixed_precision = getattr(args, "mixed_precision", None) or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    fp16 = getattr(args, "fp16", False) or (mixed_precision == "fp16" and not getattr(args, "bf16", False))
    if not fp16 or spec.capabilities.fp16_loss_scaling:
        return
    raise OptionsError(
        f"optim={spec.name!r} does not work under --fp16 (mixed precision with a GradScaler): "
        f"{spec.capabilities.limits} Optimizers that do: "
        f"{', '.join(s.name for s in _REGISTRY.values() if s.capabilities.fp16_loss_scaling)}."
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
    check_loss_scaling(spec, args)
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
    check_loss_scaling(spec, args)
    if spec.name in BATCH_OPTIMIZERS and not _BATCH_TRAINER.get():
        raise ValueError(BATCH_OPTIMIZERS[spec.name])
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
    """Wrap ``Trainer.log`` to merge what callbacks and the optimizer (inside accelerate's wrapper) offer through
    ``contribute_logs(logs)`` (idempotent). Our optimizers report their adaptive state this way, e.g. K-FAC's and
    Hessian-free's damping."""
    cls = trainer_module.Trainer
    if getattr(cls.log, "_hf_colossal", False):
        return
    original = cls.log

    def log(self: Any, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        contributors = [*self.callback_handler.callbacks, innermost_optimizer(getattr(self, "optimizer", None))]
        for contributor in contributors:
            contribute = getattr(contributor, "contribute_logs", None)
            if contribute is not None:
                logs.update(contribute(logs))
        original(self, logs, *args, **kwargs)

    log._hf_colossal = True  # type: ignore[attr-defined]
    log.__wrapped__ = original  # type: ignore[attr-defined]
    cls.log = log


# ---------------------------------------------------------------------------------------------------------------
# optim="hessian_free": a Trainer whose training step hands the optimizer the batch


def innermost_optimizer(optimizer: Any) -> Any:
    """The optimizer inside Trainer's (accelerate wraps it, other wrappers may too; at most 4 levels), or None."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            return optimizer
        optimizer = inner
    return optimizer


def hessian_free_optimizer(optimizer: Any) -> Any:
    """The :class:`~hf_colossal.optim.HessianFree` inside Trainer's optimizer (accelerate wraps it), or None."""
    from ..optim.hessian_free import HessianFree

    inner = innermost_optimizer(optimizer)
    return inner if isinstance(inner, HessianFree) else None


_PROBLEM_TYPES = {"single_label_classification": "cross_entropy", "regression": "mse",
                  "multi_label_classification": "sigmoid_bce"}
_GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForSeq2SeqLM")
_CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForImageClassification",
                        "ForAudioClassification", "ForMultipleChoice")


def hessian_free_loss_kind(model: Any, labels: Any, option: str) -> str:
    """The loss of the model's outputs that ``optim="hessian_free"`` minimises: ``optim_args loss=...``, else the
    model's ``hessian_free_loss`` attribute, else what transformers' classification heads compute (from
    ``config.problem_type``, or ``num_labels`` and the label dtype as they decide)."""
    if option != "auto":
        return option
    declared = getattr(model, "hessian_free_loss", None)
    if declared:
        return str(declared)
    name = type(model).__name__
    if name.endswith(_GENERATIVE_SUFFIXES):
        raise ValueError(
            f"optim='hessian_free' does not support {name}: generative models compute their loss on shifted or "
            "sampled tokens inside forward, which the Gauss-Newton products here do not model. Supported: outputs "
            "(logits) with cross_entropy, mse or sigmoid_bce against the labels (classification, regression, "
            "reconstruction); set optim_args loss=... or a `hessian_free_loss` attribute for a custom model."
        )
    config = getattr(model, "config", None)
    problem_type = getattr(config, "problem_type", None)
    if problem_type in _PROBLEM_TYPES:
        return _PROBLEM_TYPES[problem_type]
    if name.endswith(_CLASSIFIER_SUFFIXES):
        import torch

        if getattr(config, "num_labels", None) == 1:
            return "mse"
        if labels is not None and labels.dtype in (torch.long, torch.int, torch.int16, torch.uint8):
            return "cross_entropy"
        return "sigmoid_bce"
    raise ValueError(
        f"optim='hessian_free' cannot tell the loss of {name}'s outputs: set optim_args loss=cross_entropy|mse|"
        "sigmoid_bce (the loss of the model's `logits` against the labels), or give the model a "
        "`hessian_free_loss` attribute. Losses without a Gauss-Newton form (sampled, contrastive, generative) are "
        "not supported."
    )


def hessian_free_batch(model: Any, inputs: dict[str, Any], option: str, label_names: list[str] | None = None) -> Any:
    """A :class:`~hf_colossal.optim.HessianFreeBatch` from a Trainer batch: the model called on the inputs without
    the labels, its ``logits`` as the outputs, the labels as the targets."""
    from ..optim.hessian_free import HessianFreeBatch

    names = list(label_names or ["labels"])
    if len(names) != 1:
        raise ValueError(f"optim='hessian_free' needs exactly one label column, got label_names={names}")
    if names[0] not in inputs:
        raise ValueError(f"optim='hessian_free' needs the targets in the batch under {names[0]!r} (keys: "
                         f"{sorted(inputs)})")
    labels = inputs[names[0]]
    kwargs = {k: v for k, v in inputs.items() if k != names[0]}
    return HessianFreeBatch(targets=labels, loss=hessian_free_loss_kind(model, labels, option), kwargs=kwargs)


class HessianFreeTrainerMixin:
    """Mix into a transformers ``Trainer`` (first in the bases) to train with ``optim="hessian_free"``.

    Its ``training_step`` gives the optimizer the batch (the model's forward as a function of the parameters via
    ``torch.func.functional_call``, the labels and the loss's form) through ``HessianFree.prepare``, which
    evaluates the loss and the gradient (also written to ``.grad``, so Trainer's grad-norm log works); Trainer's
    own ``optimizer.step()`` then runs the Hessian-free step. With any other ``optim`` it changes nothing.

    Refused with a clear error: gradient accumulation > 1 (a step needs the whole batch at once), more than one
    process (DDP: the CG products would need an all-reduce per iteration; not implemented), label smoothing,
    ``compute_loss_func``; and, checked on the first step, a model whose own loss differs from the declared loss of
    its ``logits`` (a custom loss). ``max_grad_norm`` clips only the logged ``.grad``; mixed-precision autocast is
    not applied to the optimizer's evaluations (they run in the parameters' dtype). The logs get ``hf_damping``,
    ``hf_cg_iters``, ``hf_rho`` and ``hf_alpha`` with the loss (:meth:`HessianFree.contribute_logs`).
    """

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        token = _BATCH_TRAINER.set(True)
        try:
            return super().create_optimizer(*args, **kwargs)  # type: ignore[misc]
        finally:
            _BATCH_TRAINER.reset(token)

    def _check_hessian_free_setup(self) -> None:
        args = self.args  # type: ignore[attr-defined]
        problems = []
        if args.gradient_accumulation_steps != 1:
            problems.append(f"gradient_accumulation_steps={args.gradient_accumulation_steps} (a Hessian-free step "
                            "needs the whole batch at once: raise per_device_train_batch_size instead)")
        if args.world_size > 1:
            problems.append(f"{args.world_size} processes (DDP is not supported: train on one device)")
        if getattr(args, "label_smoothing_factor", 0.0):
            problems.append("label_smoothing_factor > 0 (the smoothed loss is not the declared loss)")
        if getattr(self, "compute_loss_func", None) is not None:
            problems.append("compute_loss_func (a custom loss has no known Gauss-Newton form; declare one of "
                            "cross_entropy|mse|sigmoid_bce through optim_args loss=... and drop compute_loss_func)")
        if problems:
            raise ValueError("optim='hessian_free' does not support " + "; ".join(problems))

    def _check_hessian_free_loss(self, model: Any, inputs: dict[str, Any], batch: Any) -> None:
        """Once: the model's own loss (Trainer's compute_loss, eval mode) equals the declared loss of its logits."""
        import torch

        from ..optim.hessian_free import batch_loss_normalizer, per_example_losses

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                reference = self.compute_loss(model, inputs)  # type: ignore[attr-defined]
                outputs = batch.select(model(*batch.args, **batch.kwargs))
                normalizer = batch_loss_normalizer(batch.loss, outputs, batch.targets, batch.ignore_index)
                ours = per_example_losses(batch.loss, outputs, batch.targets, normalizer, batch.ignore_index).sum()
        finally:
            model.train(was_training)
        if not torch.allclose(reference.detach().float(), ours.float(), rtol=1e-3, atol=1e-5):
            raise ValueError(
                f"optim='hessian_free': the model's loss ({float(reference):.6g}) is not the {batch.loss} of its "
                f"logits against the labels ({float(ours):.6g}); Hessian-free needs the loss's Gauss-Newton form. "
                "Set optim_args loss=cross_entropy|mse|sigmoid_bce to the loss the model computes, or use another "
                "optimizer for a loss without that form."
            )

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None, *args: Any,
                      **kwargs: Any) -> Any:
        optimizer = hessian_free_optimizer(getattr(self, "optimizer", None))
        if optimizer is None:
            return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)  # type: ignore[misc]
        self._check_hessian_free_setup()
        model.train()
        inputs = self._prepare_inputs(inputs)  # type: ignore[attr-defined]
        batch = hessian_free_batch(optimizer.model, inputs, optimizer.settings["loss"],
                                   getattr(self, "label_names", None))
        if not getattr(self, "_hessian_free_loss_checked", False):
            self._check_hessian_free_loss(model, inputs, batch)
            self._hessian_free_loss_checked = True
        return optimizer.prepare(batch).detach()


def __getattr__(name: str) -> Any:
    """``HessianFreeTrainer`` (``HessianFreeTrainerMixin`` + ``transformers.Trainer``), built on first access so
    importing this module does not import transformers."""
    if name == "HessianFreeTrainer":
        from transformers import Trainer

        cls = type("HessianFreeTrainer", (HessianFreeTrainerMixin, Trainer), {
            "__module__": __name__,
            "__doc__": "transformers.Trainer with HessianFreeTrainerMixin: use with optim='hessian_free'.",
        })
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
