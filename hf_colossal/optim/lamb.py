r"""LAMB: layer-wise adaptive moments for large batches.

You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer, Hsieh (2019), "Large Batch Optimization for
Deep Learning: Training BERT in 76 minutes", https://arxiv.org/abs/1904.00962, Algorithm 2; with the NVLAMB
gradient pre-normalisation of NVIDIA's apex ``FusedLAMB`` and the trust-ratio clipping of LAMBC (Fong, Chen,
Chen 2020, "Improving Layer-wise Adaptive Rate Methods using Trust Ratio Clipping", https://arxiv.org/abs/2011.13584).
"""

from __future__ import annotations

import math
from itertools import chain
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
    global_l2_norm,
    group_by_device_and_dtype,
    is_real,
    local_tensors,
    math_dtype,
    math_precision,
    nonfinite_policy_allows_step,
    place_step,
    require,
    remember_fused_plan,
    run_fused,
    trust_ratios,
)

__all__ = ["Lamb", "lamb"]


class Lamb(LayerwiseOptimizer):
    r"""LAMB (You et al. 2019, Algorithm 2), multi-tensor (foreach) and fused (Triton, CUDA) implementations.

    For each parameter :math:`x` with gradient :math:`g` at step :math:`t` (math in fp32):

    .. math::
        \begin{aligned}
        & g \leftarrow g / \max(1, \|G\|_2 / c)
            && \text{if grad\_pre\_normalization; } G \text{ = all gradients of the optimizer} \\
        & g \leftarrow g + \lambda x && \text{if not decoupled\_weight\_decay} \\
        & m \leftarrow \beta_1 m + (1-\beta_1) g, \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2
            && \text{Alg. 2: } m_t, v_t \\
        & \hat m = m / (1-\beta_1^t), \quad \hat v = v / (1-\beta_2^t)
            && \text{Alg. 2 bias correction, if bias\_correction} \\
        & u = \hat m / (\sqrt{\hat v} + \epsilon) \; (+\, \lambda x \text{ if decoupled\_weight\_decay})
            && \text{Alg. 2: } r_t + \lambda x_t \\
        & \phi = \min(\|x\| / \|u\|, \text{max\_trust\_ratio}) \text{ (1 if either norm is 0)}
            && \text{if adapt; else } \phi = 1 \\
        & x \leftarrow x - \gamma \, \phi \, u && \text{Alg. 2: } x_{t+1}
        \end{aligned}

    Args:
        params: iterable of parameters or of param-group dicts. A group may carry any key below, plus
            ``adapt`` (bool, default True): ``False`` skips the trust ratio for that group (biases, norm weights),
            unless ``always_adapt``.
        lr: learning rate :math:`\gamma` (>= 0).
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon` added to :math:`\sqrt{\hat v}` (>= 0).
        weight_decay: :math:`\lambda` (>= 0).
        bias_correction: divide the moments by :math:`1-\beta^t` (Algorithm 2 has it; some BERT code omits it).
        decoupled_weight_decay: add :math:`\lambda x` to the update, inside the trust ratio (the paper); if
            ``False``, add it to the gradient before the moments (L2 regularisation).
        max_trust_ratio: if set (> 0), clip the trust ratio from above (LAMBC).
        always_adapt: apply the trust ratio in every group, ignoring their ``adapt`` key.
        grad_pre_normalization: divide every gradient by :math:`\max(1, \|G\|_2 / c)`, :math:`\|G\|_2` the L2
            norm over all gradients of the optimizer (NVLAMB, as in apex ``FusedLAMB``).
        pre_normalization_max_norm: :math:`c` above (> 0).
        nonfinite: what a step does when any gradient is inf/NaN: ``"skip"`` it entirely (parameters, state and
            step counts untouched) and count it in every group's ``nonfinite_skips``; ``"error"``: raise
            ``FloatingPointError``; ``"apply"``: no check (under a ``GradScaler``, which checks itself).
        master_weights: keep an fp32 master copy of every fp16/bf16 parameter in the state (``master_param``):
            steps update the copy and round it into the parameter, so updates smaller than half a unit in the
            last place of bf16/fp16 accumulate instead of vanishing, and the trust ratio uses the fp32 norm.
            Costs 4 bytes per such parameter. The copy is the weight of record: a parameter changed outside the
            optimizer is overwritten at the next step (reload the optimizer state too).
        foreach: ``None`` or ``True``; ``fused=False`` is what selects the foreach implementation.
        fused: ``None`` (default): the fused Triton path (:mod:`hf_colossal.optim._triton`) when every parameter
            with a gradient is a contiguous fp32/bf16/fp16 CUDA tensor and triton is installed, else the
            multi-tensor ``torch._foreach_*`` path; ``True``: require the fused path (``RuntimeError`` naming why
            it cannot run); ``False``: always the foreach path.

    State per parameter: ``step`` (float32 scalar: on the CPU on the foreach path, on the parameter's device on the
    fused path; either checkpoint loads into either path), ``exp_avg`` and ``exp_avg_sq`` (fp32 for fp16/bf16
    parameters, else the parameter dtype), and ``master_param`` with ``master_weights``. fp16/bf16 parameters get
    the update computed in fp32 and rounded back.

    The fused path does no host sync in a step: it skips a step with a non-finite gradient on the device, and the
    skips it counts reach ``nonfinite_skips`` when that key is read (see :class:`~._foreach.ParamGroup`). A step
    that creates state (the first) reads the skip flag once, so that a skipped first step leaves no state.
    """

    name = "Lamb"

    @staticmethod
    def check_hyperparameters(hyperparameters: dict[str, Any], where: str) -> None:
        _check_hyperparameters(hyperparameters, where)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        bias_correction: bool = True,
        decoupled_weight_decay: bool = True,
        max_trust_ratio: float | None = None,
        always_adapt: bool = False,
        grad_pre_normalization: bool = False,
        pre_normalization_max_norm: float = 1.0,
        nonfinite: str = "skip",
        master_weights: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "bias_correction": bias_correction,
            "decoupled_weight_decay": decoupled_weight_decay,
            "max_trust_ratio": max_trust_ratio,
            "adapt": True,
            "always_adapt": always_adapt,
            "grad_pre_normalization": grad_pre_normalization,
            "pre_normalization_max_norm": pre_normalization_max_norm,
            "nonfinite": nonfinite,
            "nonfinite_skips": 0,
            "master_weights": master_weights,
            "foreach": foreach,
            "fused": fused,
        }
        super().__init__(params, defaults)

    def _init_group(
        self, params: list[Tensor], *, fused: bool = False, new_params: list[Tensor] | None = None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Create missing state; return the ``exp_avg``, ``exp_avg_sq`` and ``step`` tensors of ``params``.

        The step counts live on the CPU for the foreach path (like torch's non-capturable Adam: reading them is no
        GPU sync) and on the parameter's device for the fused path. Parameters that get new state are appended to
        ``new_params``.
        """
        exp_avgs, exp_avg_sqs, state_steps = [], [], []
        for param in params:
            state = self.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if fused else "cpu")
                state["exp_avg"] = torch.zeros_like(param, dtype=math_dtype(param.dtype))
                state["exp_avg_sq"] = torch.zeros_like(param, dtype=math_dtype(param.dtype))
                if new_params is not None:
                    new_params.append(param)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(place_step(state, param.device if fused else torch.device("cpu")))
        return exp_avgs, exp_avg_sqs, state_steps

    def _foreach_step(self, params_and_grads: list[tuple[list[Tensor], list[Tensor]]], sharding: Any) -> None:
        """One step of every group on the multi-tensor path (:func:`lamb`); ``sharding``: the process group of
        FSDP2 parameters (norms are then all-reduced over it), else None."""
        any_pre_normalization = any(group["grad_pre_normalization"] for group in self.param_groups)
        global_grad_norm = None
        if any_pre_normalization or any(group["nonfinite"] != "apply" for group in self.param_groups):
            grad_norms = [foreach_norms(local_tensors(grads)) for _, grads in params_and_grads]
            if not nonfinite_policy_allows_step("Lamb", self.param_groups, grad_norms, sharding):
                return
            if any_pre_normalization:
                global_grad_norm = global_l2_norm(list(chain.from_iterable(grad_norms)), sharding)

        for group, (params, grads) in zip(self.param_groups, params_and_grads):
            if not params:
                continue
            exp_avgs, exp_avg_sqs, state_steps = self._init_group(params)
            beta1, beta2 = group["betas"]
            lamb(
                local_tensors(params),
                local_tensors(grads),
                local_tensors(exp_avgs),
                local_tensors(exp_avg_sqs),
                state_steps,
                master_params=local_tensors(self._master_params(params, group)),
                global_grad_norm=global_grad_norm if group["grad_pre_normalization"] else None,
                pre_normalization_max_norm=group["pre_normalization_max_norm"],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                bias_correction=group["bias_correction"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                adapt=group["adapt"] or group["always_adapt"],
                max_trust_ratio=group["max_trust_ratio"],
                trust_ratio_record=self.__dict__.get("_trust_ratio_record"),
                shard_group=sharding,
            )

    @staticmethod
    def _state_keys(group: dict[str, Any]) -> tuple[str, ...]:
        keys = ("exp_avg", "exp_avg_sq", "step")
        return (*keys, "master_param") if group["master_weights"] else keys

    @staticmethod
    def _fused_hyper(group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return {
            "lr": group["lr"],
            "beta1": beta1,
            "beta2": beta2,
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "bias_correction": group["bias_correction"],
            "decoupled_weight_decay": group["decoupled_weight_decay"],
            "adapt": group["adapt"] or group["always_adapt"],
            "max_trust_ratio": group["max_trust_ratio"],
            "pre_normalization": group["grad_pre_normalization"],
            "pre_normalization_max_norm": group["pre_normalization_max_norm"],
        }

    def _fused_launch(self, buckets: list[_triton.GroupBucket], skip_counter: Tensor | None) -> Any:
        global_grad_norm = None
        if any(group["grad_pre_normalization"] for group in self.param_groups):
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            global_grad_norm = global_l2_norm(foreach_norms(grads))
        return _triton.lamb_step("Lamb", buckets, global_grad_norm=global_grad_norm, skip_counter=skip_counter)

    def _fused_step(self, params_and_grads: list[tuple[list[Tensor], list[Tensor]]]) -> None:
        """One step of every group on the fused path (:func:`hf_colossal.optim._triton.lamb_step`).

        Creates missing state, buckets the tensors and builds their tables; the next steps reuse all of that
        through :func:`~._foreach.fused_fast_step` while the tensors stay the same.
        """
        buckets: list[_triton.GroupBucket] = []
        entries: list[_triton.PlanEntry] = []
        new_params: list[Tensor] = []
        for index, (group, (params, grads)) in enumerate(zip(self.param_groups, params_and_grads)):
            if not params:
                continue
            exp_avgs, exp_avg_sqs, state_steps = self._init_group(params, fused=True, new_params=new_params)
            masters = self._master_params(params, group)
            hyper = self._fused_hyper(group)
            for (*columns, bucket_masters), _ in group_by_device_and_dtype(
                [params, grads, exp_avgs, exp_avg_sqs, state_steps, masters]
            ):
                key = (index, columns[0][0].device, columns[0][0].dtype)
                bucket = _triton.table_cache(self).bucket(key, columns, masters=bucket_masters)
                buckets.append(
                    _triton.GroupBucket(bucket, hyper, _triton.NONFINITE_CHECK[group["nonfinite"]], columns[0])
                )
                entries.append(_triton.PlanEntry(index, columns[0], bucket))
        run_fused(self, buckets, new_params, self._fused_launch)
        remember_fused_plan(self, entries, new_params, self._state_keys)


def _check_hyperparameters(hyperparameters: dict[str, Any], where: str) -> None:
    check_common_hyperparameters(hyperparameters, where)
    betas = hyperparameters["betas"]
    require(
        isinstance(betas, (tuple, list)) and len(betas) == 2,
        where,
        "betas",
        betas,
        "expected a pair (beta1, beta2)",
    )
    for index, beta in enumerate(betas):
        require(is_real(beta) and 0 <= beta < 1, where, f"betas[{index}]", beta, "expected 0 <= beta < 1")
    max_trust_ratio = hyperparameters["max_trust_ratio"]
    require(
        max_trust_ratio is None or (is_real(max_trust_ratio) and max_trust_ratio > 0),
        where,
        "max_trust_ratio",
        max_trust_ratio,
        "expected None or a real number > 0",
    )
    max_norm = hyperparameters["pre_normalization_max_norm"]
    require(
        is_real(max_norm) and max_norm > 0,
        where,
        "pre_normalization_max_norm",
        max_norm,
        "expected a real number > 0",
    )
    for name in ("bias_correction", "decoupled_weight_decay", "grad_pre_normalization"):
        require(isinstance(hyperparameters[name], bool), where, name, hyperparameters[name], "expected a bool")


def lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    master_params: list[Tensor | None] | None = None,
    global_grad_norm: Tensor | None = None,
    pre_normalization_max_norm: float = 1.0,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    decoupled_weight_decay: bool,
    adapt: bool,
    max_trust_ratio: float | None,
    trust_ratio_record: list[tuple[list[Tensor], Tensor]] | None = None,
    shard_group: Any = None,
) -> None:
    r"""Functional LAMB step (You et al. 2019, Algorithm 2) over lists of tensors; see :class:`Lamb` for the math.

    Updates ``params``, ``exp_avgs``, ``exp_avg_sqs`` and ``state_steps`` in place; the ``grads`` are only read.
    ``master_params`` (None entries allowed) are fp32 master copies of fp16/bf16 ``params``: the update is applied
    to them and rounded into the parameters (see :func:`~._foreach.math_precision`).
    ``global_grad_norm``, when given, is :math:`\|G\|_2` of the NVLAMB pre-normalisation
    :math:`g / \max(1, \|G\|_2 / \text{pre\_normalization\_max\_norm})`. ``adapt`` turns the trust ratio on.
    With ``adapt``, each bucket's (parameters, trust ratios) is appended to ``trust_ratio_record`` when given.
    The tensors may be local shards of parameters sharded over ``shard_group`` (FSDP2): the trust ratio then uses
    whole-parameter norms, the shards' squared norms summed in one all-reduce per bucket.
    """
    if master_params is None:
        master_params = [None] * len(params)
    for (bucket_params, bucket_grads, bucket_exp_avgs, bucket_exp_avg_sqs, bucket_steps, bucket_masters), _ in (
        group_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, state_steps, master_params])
    ):
        with math_precision(bucket_params, bucket_grads, bucket_masters) as (math_params, math_grads):
            ratios = _lamb_bucket(
                math_params,
                math_grads,
                bucket_exp_avgs,
                bucket_exp_avg_sqs,
                bucket_steps,
                global_grad_norm=global_grad_norm,
                pre_normalization_max_norm=pre_normalization_max_norm,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                weight_decay=weight_decay,
                bias_correction=bias_correction,
                decoupled_weight_decay=decoupled_weight_decay,
                adapt=adapt,
                max_trust_ratio=max_trust_ratio,
                shard_group=shard_group,
            )
        if trust_ratio_record is not None and ratios is not None:
            trust_ratio_record.append((bucket_params, ratios))


def _lamb_bucket(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    global_grad_norm: Tensor | None,
    pre_normalization_max_norm: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    decoupled_weight_decay: bool,
    adapt: bool,
    max_trust_ratio: float | None,
    shard_group: Any,
) -> Tensor | None:
    """One (device, dtype) bucket of :func:`lamb`, all tensors in the math dtype; ``grads`` may alias ``.grad``.

    Returns the trust ratios applied (None without ``adapt``)."""
    torch._foreach_add_(state_steps, 1.0)

    if global_grad_norm is not None:
        divisor = torch.clamp(global_grad_norm.to(params[0].device) / pre_normalization_max_norm, min=1.0)
        grads = torch._foreach_div(grads, divisor)
    if weight_decay != 0 and not decoupled_weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)

    if bias_correction and params[0].device.type == "cpu" and shard_group is None:
        return _cpu_tensor_by_tensor(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
                                     beta2=beta2, eps=eps, weight_decay=weight_decay if decoupled_weight_decay else 0.0,
                                     adapt=adapt, max_trust_ratio=max_trust_ratio)
    if bias_correction and params[0].device.type == "cpu":
        # Algorithm 2, moments and ratio in one vectorised pass: torch's fused CPU Adam kernel with lr 1 and no
        # decay, run on zeros instead of the parameters, leaves -r (same formula as below) in `updates`
        updates = [torch.zeros_like(p) for p in params]
        torch._fused_adamw_(updates, grads, exp_avgs, exp_avg_sqs, [], state_steps, lr=1.0, beta1=beta1,
                            beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
        sign = -1.0
    else:
        # Algorithm 2, moments: m = b1 m + (1 - b1) g ; v = b2 v + (1 - b2) g^2
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

        # Algorithm 2, ratio: r = m_hat / (sqrt(v_hat) + eps), with m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t).
        # The step counts are CPU tensors, so reading them is no device sync.
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        if bias_correction:
            torch._foreach_div_(denominators, [math.sqrt(1 - beta2 ** step.item()) for step in state_steps])
        torch._foreach_add_(denominators, eps)
        updates = torch._foreach_div(exp_avgs, denominators)
        if bias_correction:
            torch._foreach_div_(updates, [1 - beta1 ** step.item() for step in state_steps])
        sign = 1.0
    if weight_decay != 0 and decoupled_weight_decay:
        torch._foreach_add_(updates, params, alpha=sign * weight_decay)

    # Algorithm 2, update: x = x - lr * phi(||x||) / ||u|| * u with u = r + wd x, phi the identity;
    # the ratio is clipped from above for LAMBC
    ratios = None
    if adapt:
        weight_norms, update_norms = torch._foreach_norm(params), torch._foreach_norm(updates)
        if shard_group is not None:
            weight_norms, update_norms = all_reduce_norms([weight_norms, update_norms], shard_group)
        ratios = trust_ratios(weight_norms, update_norms)
        if max_trust_ratio is not None:
            ratios = ratios.clamp(max=max_trust_ratio)
        torch._foreach_mul_(updates, ratios.unbind())
    torch._foreach_add_(params, updates, alpha=-lr * sign)
    return ratios


def _l2_norm(tensor: Tensor) -> Tensor:
    """L2 norm of a CPU tensor as the root of a BLAS dot product (half the time of ``vector_norm`` there)."""
    flat = tensor.reshape(-1)
    return torch.dot(flat, flat).sqrt()


def _cpu_tensor_by_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adapt: bool,
    max_trust_ratio: float | None,
) -> Tensor | None:
    """The bucket's step on the CPU (unsharded, bias-corrected), one tensor at a time through one scratch buffer
    reused across tensors (no step-sized allocations), each stage a single vectorised pass:

    the scratch starts at ``-wd x``; torch's fused CPU Adam kernel (lr 1, no decay) subtracts ``r`` from it, leaving
    ``-u = -wd x - r``, and updates the moments; the two norms; ``x += lr * ratio * (-u)``. The ratio is read on the host
    (CPU tensors: no device synchronisation). ``weight_decay`` is the decoupled one (0 when it was added to the
    gradients). Same formulas as :func:`_lamb_bucket`; returns the trust ratios (None without ``adapt``)."""
    scratch = torch.empty(max(p.numel() for p in params), dtype=params[0].dtype)
    ratios = []
    for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        update = scratch[: param.numel()].view_as(param)
        torch.mul(param, -weight_decay, out=update)  # the kernel subtracts r from it: -u = -wd x - r
        torch._fused_adamw_([update], [grad], [exp_avg], [exp_avg_sq], [], [step], lr=1.0, beta1=beta1,
                            beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
        ratio = 1.0
        if adapt:
            ratio_tensor = trust_ratios([_l2_norm(param)], [_l2_norm(update)])
            if max_trust_ratio is not None:
                ratio_tensor = ratio_tensor.clamp(max=max_trust_ratio)
            ratios.append(ratio_tensor)
            ratio = ratio_tensor.item()
        param.add_(update, alpha=lr * ratio)
    return torch.cat(ratios) if adapt else None
