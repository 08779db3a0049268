r"""LARS: layer-wise adaptive rate scaling for large batches.

You, Gitman, Ginsburg (2017), "Large Batch Training of Convolutional Networks", https://arxiv.org/abs/1708.03888,
eq. 6 (local learning rate) and Algorithm 1 (momentum update); with the "clip" mode of NVIDIA apex's LARC
(``apex.parallel.LARC``) and the momentum placement of ``torch.optim.SGD`` that timm's ``Lars`` uses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from . import _triton
from ._foreach import (
    LayerwiseOptimizer,
    all_reduce_norms,
    check_common_hyperparameters,
    foreach_norms,
    group_by_device_and_dtype,
    is_real,
    local_tensors,
    math_dtype,
    math_precision,
    nonfinite_policy_allows_step,
    require,
    remember_fused_plan,
    run_fused,
    shaped_like,
    trust_ratios,
)

__all__ = ["Lars", "lars"]


class Lars(LayerwiseOptimizer):
    r"""LARS (You, Gitman, Ginsburg 2017) with optional LARC clipping; foreach and fused (Triton, CUDA) paths.

    For each parameter :math:`x` with gradient :math:`g` (math in fp32):

    .. math::
        \begin{aligned}
        & d = g + \lambda x \\
        & \ell = \eta \|x\| / (\|g\| + \lambda \|x\| + \epsilon)
            \text{ (1 where } \|x\| \text{ or } \|g\| \text{ is 0)}
            && \text{eq. 6, if adapt; else } \ell = 1 \\
        & \ell \leftarrow \min(\ell / \gamma, 1) && \text{if trust\_clip (LARC "clip")} \\
        & d \leftarrow \ell\, d \;\; (\gamma \ell\, d \text{ if lr\_in\_momentum}) \\
        & b \leftarrow \mu b + (1 - \tau) d \;\; (b \leftarrow d \text{ on the first step})
            && \text{Algorithm 1, momentum} \\
        & s = d + \mu b \text{ if nesterov else } b \\
        & x \leftarrow x - \gamma s \;\; (x - s \text{ if lr\_in\_momentum}) && \text{Algorithm 1, weights}
        \end{aligned}

    ``lr_in_momentum=False`` (default) puts the learning rate outside the momentum buffer like
    ``torch.optim.SGD`` and timm; ``True`` puts it inside as in the paper's Algorithm 1. They differ only when the
    learning rate changes between steps.

    Args:
        params: iterable of parameters or of param-group dicts. A group may carry any key below, plus
            ``adapt`` (bool, default True): ``False`` skips the trust ratio for that group (biases, norm weights),
            unless ``always_adapt``.
        lr: global learning rate :math:`\gamma` (>= 0).
        momentum: :math:`\mu` (>= 0); 0 keeps no momentum buffer.
        dampening: :math:`\tau` in [0, 1], as in ``torch.optim.SGD`` (applies with either ``lr_in_momentum``).
        weight_decay: :math:`\lambda` (>= 0).
        nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``.
        trust_coefficient: :math:`\eta` of eq. 6 (> 0).
        eps: :math:`\epsilon` in the denominator of eq. 6 (>= 0).
        trust_clip: LARC "clip" mode, :math:`\ell \leftarrow \min(\ell / \gamma, 1)`.
        always_adapt: apply the trust ratio in every group, ignoring their ``adapt`` key.
        lr_in_momentum: accumulate :math:`\gamma \ell d` in the buffer (Algorithm 1) instead of :math:`\ell d`.
        nonfinite: what a step does when any gradient is inf/NaN: ``"skip"`` it entirely (parameters and
            momentum untouched) and count it in every group's ``nonfinite_skips``; ``"error"``: raise
            ``FloatingPointError``; ``"apply"``: no check (under a ``GradScaler``, which checks itself).
        master_weights: keep an fp32 master copy of every fp16/bf16 parameter (``master_param``), as in
            :class:`~hf_colossal.optim.Lamb`: steps update the copy and round it into the parameter.
        foreach: ``None`` or ``True``; ``fused=False`` is what selects the foreach implementation.
        fused: ``None`` (default): the fused Triton path (:mod:`hf_colossal.optim._triton`) when every parameter
            with a gradient is a contiguous fp32/bf16/fp16 CUDA tensor and triton is installed, else the
            multi-tensor ``torch._foreach_*`` path; ``True``: require the fused path (``RuntimeError`` naming why
            it cannot run); ``False``: always the foreach path.

    State per parameter: ``momentum_buffer`` (fp32 for fp16/bf16 parameters, else the parameter dtype), only
    when ``momentum != 0``; ``master_param`` with ``master_weights``. fp16/bf16 parameters get the update computed
    in fp32 and rounded back.

    The fused path does no host sync in a step: it skips a step with a non-finite gradient on the device, and the
    skips it counts reach ``nonfinite_skips`` when that key is read (see :class:`~._foreach.ParamGroup`). A step
    that creates momentum buffers (the first) reads the skip flag once, so that a skipped first step leaves none.
    """

    name = "Lars"

    @staticmethod
    def check_hyperparameters(hyperparameters: dict[str, Any], where: str) -> None:
        _check_hyperparameters(hyperparameters, where)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        *,
        nesterov: bool = False,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        trust_clip: bool = False,
        always_adapt: bool = False,
        lr_in_momentum: bool = False,
        nonfinite: str = "skip",
        master_weights: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "trust_clip": trust_clip,
            "adapt": True,
            "always_adapt": always_adapt,
            "lr_in_momentum": lr_in_momentum,
            "nonfinite": nonfinite,
            "nonfinite_skips": 0,
            "master_weights": master_weights,
            "foreach": foreach,
            "fused": fused,
        }
        super().__init__(params, defaults)

    def _foreach_step(self, params_and_grads: list[tuple[list[Tensor], list[Tensor]]], sharding: Any) -> None:
        """One step of every group on the multi-tensor path (:func:`lars`); ``sharding``: the process group of
        FSDP2 parameters (norms are then all-reduced over it), else None."""
        grad_norms = [foreach_norms(local_tensors(grads)) for _, grads in params_and_grads]
        if not nonfinite_policy_allows_step("Lars", self.param_groups, grad_norms, sharding):
            return

        for group, (params, grads), group_grad_norms in zip(self.param_groups, params_and_grads, grad_norms):
            if not params:
                continue
            momentum_buffers = local_tensors([self.state[param].get("momentum_buffer") for param in params])
            lars(
                local_tensors(params),
                local_tensors(grads),
                momentum_buffers,
                master_params=local_tensors(self._master_params(params, group)),
                grad_norms=group_grad_norms,
                lr=group["lr"],
                momentum=group["momentum"],
                dampening=group["dampening"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
                trust_coefficient=group["trust_coefficient"],
                eps=group["eps"],
                trust_clip=group["trust_clip"],
                adapt=group["adapt"] or group["always_adapt"],
                lr_in_momentum=group["lr_in_momentum"],
                trust_ratio_record=self.__dict__.get("_trust_ratio_record"),
                shard_group=sharding,
            )
            if group["momentum"] != 0:
                for param, momentum_buffer in zip(params, momentum_buffers):
                    if "momentum_buffer" not in self.state[param]:
                        self.state[param]["momentum_buffer"] = shaped_like(momentum_buffer, param)

    @staticmethod
    def _state_keys(group: dict[str, Any]) -> tuple[str, ...]:
        keys = ("momentum_buffer",) if group["momentum"] != 0 else ()
        return (*keys, "master_param") if group["master_weights"] else keys

    @staticmethod
    def _fused_hyper(group: dict[str, Any]) -> dict[str, Any]:
        keys = (
            "lr", "momentum", "dampening", "weight_decay", "nesterov", "trust_coefficient", "eps", "trust_clip",
            "lr_in_momentum",
        )
        return {**{key: group[key] for key in keys}, "adapt": group["adapt"] or group["always_adapt"]}

    @staticmethod
    def _fused_launch(buckets: list[_triton.GroupBucket], skip_counter: Tensor | None) -> Any:
        return _triton.lars_step("Lars", buckets, skip_counter=skip_counter)

    def _fused_step(self, params_and_grads: list[tuple[list[Tensor], list[Tensor]]]) -> None:
        """One step of every group on the fused path (:func:`hf_colossal.optim._triton.lars_step`).

        Creates missing momentum buffers, buckets the tensors and builds their tables; the next steps reuse all of
        that through :func:`~._foreach.fused_fast_step` while the tensors stay the same.
        """
        buckets: list[_triton.GroupBucket] = []
        entries: list[_triton.PlanEntry] = []
        new_params: list[Tensor] = []
        for index, (group, (params, grads)) in enumerate(zip(self.param_groups, params_and_grads)):
            if not params:
                continue
            columns: list[list[Tensor]] = [params, grads]
            fresh = [0] * len(params)
            if group["momentum"] != 0:
                buffers = []
                for i, param in enumerate(params):
                    state = self.state[param]
                    buffer = state.get("momentum_buffer")
                    if buffer is None:
                        # Filled by the kernel with the first step's direction (torch.optim.SGD's clone).
                        buffer = torch.empty_like(
                            param, dtype=math_dtype(param.dtype), memory_format=torch.contiguous_format
                        )
                        state["momentum_buffer"] = buffer
                        new_params.append(param)
                        fresh[i] = 1
                    buffers.append(buffer)
                columns.append(buffers)
            columns.append(self._master_params(params, group))
            hyper = self._fused_hyper(group)
            for (*bucket_columns, bucket_masters), indices in group_by_device_and_dtype(columns):
                key = (index, bucket_columns[0][0].device, bucket_columns[0][0].dtype)
                flags = [fresh[i] for i in indices]
                bucket = _triton.table_cache(self).bucket(key, bucket_columns, flags, masters=bucket_masters)
                buckets.append(
                    _triton.GroupBucket(bucket, hyper, _triton.NONFINITE_CHECK[group["nonfinite"]], bucket_columns[0])
                )
                entries.append(_triton.PlanEntry(index, bucket_columns[0], bucket))
        run_fused(self, buckets, new_params, self._fused_launch)
        remember_fused_plan(self, entries, new_params, self._state_keys)


def _check_hyperparameters(hyperparameters: dict[str, Any], where: str) -> None:
    check_common_hyperparameters(hyperparameters, where)
    momentum = hyperparameters["momentum"]
    require(is_real(momentum) and momentum >= 0, where, "momentum", momentum, "expected a real number >= 0")
    dampening = hyperparameters["dampening"]
    require(is_real(dampening) and 0 <= dampening <= 1, where, "dampening", dampening, "expected 0 <= dampening <= 1")
    trust_coefficient = hyperparameters["trust_coefficient"]
    require(
        is_real(trust_coefficient) and trust_coefficient > 0,
        where,
        "trust_coefficient",
        trust_coefficient,
        "expected a real number > 0",
    )
    for name in ("nesterov", "trust_clip", "lr_in_momentum"):
        require(isinstance(hyperparameters[name], bool), where, name, hyperparameters[name], "expected a bool")
    nesterov = hyperparameters["nesterov"]
    require(
        not nesterov or (momentum > 0 and dampening == 0),
        where,
        "nesterov",
        nesterov,
        f"Nesterov momentum requires momentum > 0 and dampening == 0 (got momentum={momentum!r}, "
        f"dampening={dampening!r})",
    )


def lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    master_params: list[Tensor | None] | None = None,
    grad_norms: list[Tensor] | None = None,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    trust_coefficient: float,
    eps: float,
    trust_clip: bool,
    adapt: bool,
    lr_in_momentum: bool,
    trust_ratio_record: list[tuple[list[Tensor], Tensor]] | None = None,
    shard_group: Any = None,
) -> None:
    r"""Functional LARS step (You, Gitman, Ginsburg 2017, eq. 6 and Algorithm 1); see :class:`Lars` for the math.

    Updates ``params`` and the buffers of ``momentum_buffer_list`` in place; a ``None`` entry gets a new buffer
    (like ``torch.optim.SGD``: the first step's direction), stored back into the list. ``grads`` are only read.
    ``grad_norms`` are the gradients' L2 norms if already computed; they are taken here when ``None``.
    ``master_params`` (None entries allowed) are fp32 master copies of fp16/bf16 ``params``, updated in their place.
    With ``adapt``, each bucket's (parameters, local learning rates before any lr factor) is appended to
    ``trust_ratio_record`` when given. The tensors may be local shards of parameters sharded over ``shard_group``
    (FSDP2): the trust ratio then uses whole-parameter norms (one all-reduce of squared shard norms per bucket).
    """
    if grad_norms is None:
        grad_norms = foreach_norms(grads)
    if master_params is None:
        master_params = [None] * len(params)
    for (bucket_params, bucket_grads, bucket_buffers, bucket_grad_norms, bucket_masters), indices in (
        group_by_device_and_dtype([params, grads, momentum_buffer_list, grad_norms, master_params])
    ):
        with math_precision(bucket_params, bucket_grads, bucket_masters) as (math_params, math_grads):
            ratios = _lars_bucket(
                math_params,
                math_grads,
                bucket_buffers,
                bucket_grad_norms,
                lr=lr,
                momentum=momentum,
                dampening=dampening,
                weight_decay=weight_decay,
                nesterov=nesterov,
                trust_coefficient=trust_coefficient,
                eps=eps,
                trust_clip=trust_clip,
                adapt=adapt,
                lr_in_momentum=lr_in_momentum,
                shard_group=shard_group,
            )
        if trust_ratio_record is not None and ratios is not None:
            trust_ratio_record.append((bucket_params, ratios))
        if momentum != 0:
            for index, buffer in zip(indices, bucket_buffers):
                momentum_buffer_list[index] = buffer


def _lars_bucket(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    grad_norms: list[Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    trust_coefficient: float,
    eps: float,
    trust_clip: bool,
    adapt: bool,
    lr_in_momentum: bool,
    shard_group: Any,
) -> Tensor | None:
    """One (device, dtype) bucket of :func:`lars`, all tensors in the math dtype; ``grads`` may alias ``.grad``.

    ``None`` entries of ``momentum_buffers`` are replaced by new buffers. Returns the local learning rates (trust
    ratios, after the LARC clip) that were applied, None without ``adapt``.
    """
    # Eq. 6: local lr = eta ||x|| / (||g|| + wd ||x|| + eps), 1 where a norm is 0; LARC clip: min(local / lr, 1)
    local_lrs = None
    if adapt:
        weight_norms = torch._foreach_norm(params)
        if shard_group is not None:
            weight_norms, grad_norms = all_reduce_norms([weight_norms, grad_norms], shard_group)
        local_lrs = trust_ratios(
            weight_norms,
            grad_norms,
            coefficient=trust_coefficient,
            weight_decay=weight_decay,
            eps=eps,
        )
        if trust_clip:
            local_lrs = torch.clamp(local_lrs / lr, max=1.0)
    # the factor of each tensor's direction d = g + wd x before momentum; the lr, unless it is inside the buffer
    scales = local_lrs * lr if lr_in_momentum and adapt else local_lrs
    if scales is None and lr_in_momentum:
        scales = torch.full((len(params),), float(lr), device=params[0].device)
    step_lr = 1.0 if lr_in_momentum else lr
    if params[0].device.type == "cpu" and params[0].dtype == torch.float32:
        _cpu_update(params, grads, momentum_buffers, scales, step_lr=step_lr, momentum=momentum,
                    dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    else:
        _foreach_update(params, grads, momentum_buffers, scales, step_lr=step_lr, momentum=momentum,
                        dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    return local_lrs


def _foreach_update(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None],
                    scales: Tensor | None, *, step_lr: float, momentum: float, dampening: float,
                    weight_decay: float, nesterov: bool) -> None:
    """Algorithm 1 after the trust ratios: ``d = scale (g + wd x)``, momentum buffer, ``x -= step_lr * step``."""
    directions = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay != 0 else grads
    if scales is not None:
        directions = torch._foreach_mul(directions, scales.unbind())
    # Algorithm 1, momentum: b = mu b + (1 - dampening) d. A new buffer starts at d, as in torch.optim.SGD (without
    # dampening that equals the paper's zero-initialised buffer).
    if momentum != 0:
        new_indices = [i for i, buffer in enumerate(momentum_buffers) if buffer is None]
        existing_indices = [i for i, buffer in enumerate(momentum_buffers) if buffer is not None]
        for i in new_indices:
            momentum_buffers[i] = directions[i].clone()
        if existing_indices:
            existing_buffers = [momentum_buffers[i] for i in existing_indices]
            torch._foreach_mul_(existing_buffers, momentum)
            torch._foreach_add_(existing_buffers, [directions[i] for i in existing_indices], alpha=1 - dampening)
        steps = (
            torch._foreach_add(directions, momentum_buffers, alpha=momentum) if nesterov else momentum_buffers
        )
    else:
        steps = directions
    # Algorithm 1, weights: x = x - lr * step (lr 1 when it is already inside the buffer)
    torch._foreach_add_(params, steps, alpha=-step_lr)


def _cpu_update(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None],
                scales: Tensor | None, *, step_lr: float, momentum: float, dampening: float,
                weight_decay: float, nesterov: bool) -> None:
    """:func:`_foreach_update` for fp32 CPU tensors in one pass per tensor of torch's fused CPU SGD kernel.

    ``scale (g + wd x)`` is the kernel's ``g' + wd' x`` with ``g' = scale g`` (a scaled copy, in one scratch buffer
    reused across tensors; ``g`` itself is only read) and ``wd' = scale wd``; the kernel then does SGD's momentum
    and update. The per-tensor scales are read on the host (CPU tensors: no device synchronisation)."""
    factors = scales.tolist() if scales is not None else [1.0] * len(params)
    largest = max((g.numel() for g, f in zip(grads, factors) if f != 1.0), default=0)
    scratch = torch.empty(largest, dtype=torch.float32) if largest else None
    for i, (param, grad, factor) in enumerate(zip(params, grads, factors)):
        if factor != 1.0:
            grad = torch.mul(grad, factor, out=scratch[: grad.numel()].view_as(grad))
        first = momentum != 0 and momentum_buffers[i] is None
        if first:
            momentum_buffers[i] = torch.empty_like(param)
        torch._fused_sgd_(
            [param], [grad], [momentum_buffers[i]] if momentum != 0 else [],
            weight_decay=weight_decay * factor, momentum=momentum, lr=step_lr, dampening=dampening,
            nesterov=nesterov, maximize=False, is_first_step=first,
        )
