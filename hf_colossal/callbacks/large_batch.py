"""Large-batch learning-rate rules as Trainer callbacks: scaling from a reference batch size, and warmup shapes.

* Goyal et al. 2017, "Accurate, Large Minibatch SGD" (arXiv:1706.02677): linear scaling rule (Sec. 2.1,
  lr = k * lr_ref for a k-times larger batch) and gradual warmup from lr_ref to k * lr_ref (Sec. 2.2).
* Krizhevsky 2014 / Hoffer et al. 2017 (arXiv:1705.08741, Sec. 4.1): square-root scaling.
* You et al. 2019, LAMB (arXiv:1904.00962): polynomial warmup ("warmup with polynomial decay" schedules).

Both callbacks change the learning rate through the scheduler Trainer already built (its ``base_lrs`` and
``lr_lambdas``), never behind its back: the learning rate Trainer logs (``get_last_lr()``) is the one applied.
Resuming from a checkpoint continues the same schedule: the scaling is recorded in the optimizer's param groups
(``lr_scale``), which the checkpoint restores, so it is never applied twice; warmup depends on the step alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

logger = logging.getLogger(__name__)

SCALING_RULES = ("linear", "sqrt", "none")
WARMUP_SHAPES = ("linear", "gradual", "polynomial")


def lr_scale_factor(effective_batch_size: int, reference_batch_size: int, rule: str) -> float:
    """The multiplier of the reference learning rate for ``effective_batch_size`` (Goyal Sec. 2.1; sqrt rule)."""
    if rule not in SCALING_RULES:
        raise ValueError(f"rule={rule!r}; valid rules: {', '.join(SCALING_RULES)}")
    ratio = effective_batch_size / reference_batch_size
    return {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]


def warmup_multiplier(step: int, warmup_steps: int, shape: str, *, start_factor: float = 0.0,
                      power: float = 2.0) -> float:
    """Multiplier of the target learning rate at optimizer step ``step`` (0-based); 1 from ``warmup_steps`` on.

    linear: step / W.  gradual (Goyal Sec. 2.2): start_factor + (1 - start_factor) * step / W, i.e. from the
    reference rate to the scaled one.  polynomial (LAMB): (step / W) ** power.
    """
    if step >= warmup_steps:
        return 1.0
    progress = step / warmup_steps
    if shape == "linear":
        return progress
    if shape == "gradual":
        return start_factor + (1.0 - start_factor) * progress
    if shape == "polynomial":
        return progress**power
    raise ValueError(f"shape={shape!r}; valid shapes: {', '.join(WARMUP_SHAPES)}")


def effective_batch_size(args: Any) -> int:
    """Samples per optimizer step: per-device batch x gradient accumulation x data-parallel world size."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)


def check_batch_ratio(effective: int, reference: int) -> None:
    """Raise ``ValueError`` unless one batch size is a whole multiple of the other (the scaling rules compare
    a k-times larger or smaller batch; Goyal et al. Sec. 2.1)."""
    larger, smaller = max(effective, reference), min(effective, reference)
    if larger % smaller:
        below, above = reference * (effective // reference), reference * (effective // reference + 1)
        raise ValueError(
            f"effective batch {effective} (per device x accumulation x processes) and reference_batch_size "
            f"{reference}: neither is a whole multiple of the other, so the scaling rule has no clear meaning; "
            f"use an effective batch of {below or reference // max(1, reference // effective)} or {above}, or a "
            f"reference batch that divides {effective}"
        )


def _optimizer_of(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one


def _sync_current_lr(scheduler: Any, optimizer: Any) -> None:
    """Recompute every group's lr from the scheduler's base_lrs and lambdas at its current step."""
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _lambda_scheduler(lr_scheduler: Any, who: str) -> Any:
    from torch.optim.lr_scheduler import LambdaLR

    if not isinstance(lr_scheduler, LambdaLR):
        raise ValueError(
            f"{who} needs a LambdaLR-based scheduler (lr_scheduler_type linear, cosine, cosine_with_restarts, "
            f"polynomial, constant, constant_with_warmup, inverse_sqrt, warmup_stable_decay); got "
            f"{type(lr_scheduler).__name__}"
        )
    return lr_scheduler


class LRScalingCallback(TrainerCallback, ExportableState):
    """Scale the learning rate from ``reference_batch_size`` to the run's effective batch size, once.

    ``--learning_rate`` is read as the rate tuned for ``reference_batch_size``. At the start of training the
    effective batch (per-device x accumulation x world size) is computed and logged, and every param group's
    rate — the scheduler's ``base_lrs`` with it — is multiplied by the rule's factor. Resuming restores the
    scaled rates from the checkpoint; if the effective batch changed (another world size), the rates are
    rescaled by new_factor / old_factor and a warning says so.
    """

    def __init__(self, reference_batch_size: int, rule: str = "linear") -> None:
        if not isinstance(reference_batch_size, int) or reference_batch_size < 1:
            raise ValueError(f"reference_batch_size must be a positive int, got {reference_batch_size!r}")
        lr_scale_factor(1, 1, rule)  # validates the rule
        self.reference_batch_size = reference_batch_size
        self.rule = rule
        self.effective_batch_size: int | None = None
        self.factor: float | None = None

    def state(self) -> dict:
        return {
            "args": {"reference_batch_size": self.reference_batch_size, "rule": self.rule},
            "attributes": {"effective_batch_size": self.effective_batch_size, "factor": self.factor},
        }

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        scheduler = _lambda_scheduler(lr_scheduler, "LRScalingCallback")
        inner = _optimizer_of(optimizer)
        self.effective_batch_size = effective_batch_size(args)
        check_batch_ratio(self.effective_batch_size, self.reference_batch_size)
        self.factor = lr_scale_factor(self.effective_batch_size, self.reference_batch_size, self.rule)
        previous = {group.get("lr_scale") for group in inner.param_groups}
        applied = previous.pop() if len(previous) == 1 else None  # set when resuming from our checkpoint
        change = self.factor / (applied or 1.0)
        if applied and not math.isclose(change, 1.0):
            logger.warning("effective batch changed since the checkpoint: rescaling the learning rate by %.4g", change)
        for i, group in enumerate(inner.param_groups):
            scheduler.base_lrs[i] *= change
            group["initial_lr"] = scheduler.base_lrs[i]
            group["lr_scale"] = self.factor
        _sync_current_lr(scheduler, inner)
        if state.is_world_process_zero:
            logger.warning(
                "LR scaling (%s): effective batch %d = %d per device x %d accumulation x %d processes; reference "
                "batch %d -> learning rate x %.4g", self.rule, self.effective_batch_size,
                args.per_device_train_batch_size, args.gradient_accumulation_steps, max(1, args.world_size),
                self.reference_batch_size, self.factor,
            )


    def on_step_begin(self, args, state, control, **kwargs):
        if effective_batch_size(args) != self.effective_batch_size:
            raise RuntimeError(
                f"the effective batch changed mid-run ({self.effective_batch_size} -> {effective_batch_size(args)}: "
                "per_device_train_batch_size, gradient_accumulation_steps or the world size was modified). Trainer "
                "fixed the steps per epoch and max_steps at the start, so training would silently end early or "
                "late. Change the batch between runs: save a checkpoint and resume with new arguments"
            )


class WarmupCallback(TrainerCallback, ExportableState):
    """Warm the learning rate up over ``warmup_steps`` optimizer steps, then follow ``--lr_scheduler_type``.

    The scheduler's per-group ``lr_lambdas`` are wrapped: lr(step) = base_lr * w(step) * schedule(step), so
    the logged rate is the applied one. Use it with ``--warmup_steps 0`` (the callback owns warmup).
    ``shape="gradual"`` starts from ``start_factor`` of the target; left unset, it starts from the reference
    rate of :class:`LRScalingCallback` (1 / its factor), as Goyal et al. do.
    """

    def __init__(self, warmup_steps: int, shape: str = "linear", start_factor: float | None = None,
                 power: float = 2.0) -> None:
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be a positive int, got {warmup_steps!r}")
        if shape not in WARMUP_SHAPES:
            raise ValueError(f"shape={shape!r}; valid shapes: {', '.join(WARMUP_SHAPES)}")
        if start_factor is not None and not 0.0 <= start_factor <= 1.0:
            raise ValueError(f"start_factor must be in [0, 1], got {start_factor!r}")
        if power <= 0:
            raise ValueError(f"power must be > 0, got {power!r}")
        self.warmup_steps = warmup_steps
        self.shape = shape
        self.start_factor = start_factor
        self.power = power

    def state(self) -> dict:
        return {"args": {"warmup_steps": self.warmup_steps, "shape": self.shape, "start_factor": self.start_factor,
                         "power": self.power}, "attributes": {}}

    def _start_factor(self, optimizer: Any) -> float:
        if self.shape != "gradual" or self.start_factor is not None:
            return self.start_factor or 0.0
        scales = {group.get("lr_scale") for group in optimizer.param_groups}
        if None in scales or len(scales) != 1:
            raise ValueError(
                "WarmupCallback(shape='gradual') starts from the reference learning rate: pass start_factor, or "
                "put LRScalingCallback before it in the callbacks list"
            )
        return 1.0 / scales.pop()

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if args.get_warmup_steps(state.max_steps) > 0:
            raise ValueError(
                f"WarmupCallback owns warmup: set --warmup_steps 0 (got {args.warmup_steps}); the callback's "
                f"{self.warmup_steps} steps are followed by --lr_scheduler_type {args.lr_scheduler_type}"
            )
        if self.warmup_steps > state.max_steps:
            raise ValueError(
                f"WarmupCallback(warmup_steps={self.warmup_steps}) is longer than the whole run "
                f"({state.max_steps} optimizer steps): the learning rate would never reach its target; use fewer "
                "warmup steps or train longer"
            )
        scheduler = _lambda_scheduler(lr_scheduler, "WarmupCallback")
        inner = _optimizer_of(optimizer)
        start = self._start_factor(inner)

        def wrap(schedule: Callable[[int], float]) -> Callable[[int], float]:
            def lr_lambda(step: int) -> float:
                return warmup_multiplier(step, self.warmup_steps, self.shape, start_factor=start,
                                         power=self.power) * schedule(step)

            lr_lambda.hf_colossal_warmup = True  # type: ignore[attr-defined]
            return lr_lambda

        if not any(getattr(fn, "hf_colossal_warmup", False) for fn in scheduler.lr_lambdas):
            scheduler.lr_lambdas = [wrap(fn) for fn in scheduler.lr_lambdas]
        _sync_current_lr(scheduler, inner)
