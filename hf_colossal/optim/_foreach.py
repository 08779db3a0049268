"""Multi-tensor (``torch._foreach_*``) building blocks shared by :class:`~hf_colossal.optim.Lamb` and
:class:`~hf_colossal.optim.Lars`.

Both optimizers follow the same outline per ``step()``: gather the parameters that have a gradient
(:func:`params_with_grads`), take every gradient's L2 norm at once (:func:`foreach_norms`), apply the
non-finite gradient policy to the whole optimizer (:func:`nonfinite_policy_allows_step`), then run their
functional core once per (device, dtype) bucket (:func:`group_by_device_and_dtype`) with the math in fp32
(:func:`math_precision`) and the layer-wise trust ratio of :func:`trust_ratios`.

Pure torch: nothing here may import transformers or accelerate.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from numbers import Real
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

NONFINITE_POLICIES = ("skip", "error", "apply")

_LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Hyperparameter validation


def require(condition: bool, where: str, name: str, value: Any, allowed: str) -> None:
    """Raise ``ValueError`` naming the argument, its bad value and what is allowed, unless ``condition``."""
    if not condition:
        raise ValueError(f"{where}: invalid {name}={value!r}; {allowed}")


def is_real(value: Any) -> bool:
    """True for a Python real number (int or float, NaN included; bool and tensors excluded)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def check_common_hyperparameters(hyperparameters: dict[str, Any], where: str) -> None:
    """Validate the hyperparameters both optimizers share: lr, weight_decay, eps, nonfinite, foreach, the flags."""
    for name in ("lr", "weight_decay", "eps"):
        value = hyperparameters[name]
        require(is_real(value) and value >= 0, where, name, value, f"expected a real number with {name} >= 0")
    nonfinite = hyperparameters["nonfinite"]
    require(nonfinite in NONFINITE_POLICIES, where, "nonfinite", nonfinite, f"expected one of {NONFINITE_POLICIES}")
    foreach = hyperparameters["foreach"]
    require(
        foreach is None or foreach is True,
        where,
        "foreach",
        foreach,
        "expected None or True (only the multi-tensor foreach implementation exists)",
    )
    for name in ("adapt", "always_adapt"):
        require(isinstance(hyperparameters[name], bool), where, name, hyperparameters[name], "expected a bool")
    skips = hyperparameters["nonfinite_skips"]
    require(
        isinstance(skips, int) and not isinstance(skips, bool) and skips >= 0,
        where,
        "nonfinite_skips",
        skips,
        "expected an int >= 0 (a counter the optimizer maintains)",
    )


# ---------------------------------------------------------------------------------------------------------------
# Gathering gradients


def params_with_grads(
    optimizer_name: str, group: dict[str, Any], group_index: int
) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters of ``group`` that have a gradient, and those gradients.

    Raises ``ValueError`` naming the parameter (by its ``param_names`` entry when the group has one) for a sparse
    gradient or a complex parameter.
    """
    params: list[Tensor] = []
    grads: list[Tensor] = []
    names = group.get("param_names")
    for index, param in enumerate(group["params"]):
        if param.grad is None:
            continue
        if param.grad.is_sparse or torch.is_complex(param):
            label = repr(names[index]) if names else f"#{index} of param group {group_index}"
            problem = "sparse gradients" if param.grad.is_sparse else "complex parameters"
            remedy = (
                "use torch.optim.SparseAdam or a dense embedding"
                if param.grad.is_sparse
                else "optimize torch.view_as_real(param) instead"
            )
            raise ValueError(
                f"{optimizer_name} does not support {problem} (parameter {label} shape {tuple(param.shape)}); {remedy}"
            )
        params.append(param)
        grads.append(param.grad)
    return params, grads


# ---------------------------------------------------------------------------------------------------------------
# Precision and bucketing


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update math and the optimizer state use for parameters of ``dtype``: fp32 for fp16/bf16."""
    return torch.float32 if dtype in _LOW_PRECISION_DTYPES else dtype


def group_by_device_and_dtype(
    tensorlists: list[list[Tensor | None]],
) -> Iterator[tuple[list[list[Tensor | None]], list[int]]]:
    """Split parallel tensor lists into (device, dtype-of-the-first-list) buckets for the ``torch._foreach_*`` ops.

    Yields each bucket's lists and the indices its entries had in the input lists. Optimizer state may be fp32 next
    to fp16/bf16 parameters and ``step`` counters may live on the CPU (torch allows both).
    """
    for bucket_lists, indices in Optimizer._group_tensors_by_device_and_dtype(tensorlists, with_indices=True).values():
        yield bucket_lists, indices


@contextmanager
def math_precision(params: list[Tensor], grads: list[Tensor]) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """Give the parameters and gradients of one (device, dtype) bucket in :func:`math_dtype`.

    fp16/bf16 parameters are copied to fp32 for the update and the result is rounded back into them on exit;
    fp32/fp64 parameters are updated in place. The yielded gradients may be the ``.grad`` tensors themselves:
    treat them as read-only.
    """
    dtype = math_dtype(params[0].dtype)
    math_params = [param.to(dtype) for param in params]
    math_grads = [grad.to(dtype) for grad in grads]
    yield math_params, math_grads
    if dtype != params[0].dtype:
        torch._foreach_copy_(params, math_params)


def restore_state_precision(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    """Undo the downcast ``Optimizer.load_state_dict`` applies to the state of fp16/bf16 parameters.

    torch casts every floating-point state tensor (except ``step``) to its parameter's dtype on load, which would
    round our fp32 moments/momentum to bf16. Reload those entries from ``state_dict`` in :func:`math_dtype`.
    """
    saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
    params = chain.from_iterable(group["params"] for group in optimizer.param_groups)
    for saved_id, param in zip(saved_ids, params):
        dtype = math_dtype(param.dtype)
        if saved_id not in state_dict["state"] or dtype == param.dtype:
            continue
        for key, value in state_dict["state"][saved_id].items():
            if key != "step" and isinstance(value, Tensor) and value.is_floating_point():
                optimizer.state[param][key] = value.to(device=param.device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Norms, the non-finite policy and the trust ratio


def foreach_norms(tensors: list[Tensor]) -> list[Tensor]:
    """The L2 norm of each tensor as a 0-d tensor on its device, in :func:`math_dtype` (fp32 for fp16/bf16).

    One ``torch._foreach_norm`` call per (device, dtype) bucket; no host synchronisation.
    """
    if not tensors:
        return []
    norms: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for (bucket,), indices in group_by_device_and_dtype([tensors]):
        bucket_norms = torch._foreach_norm(bucket, 2, dtype=math_dtype(bucket[0].dtype))
        for index, norm in zip(indices, bucket_norms):
            norms[index] = norm
    return norms


def stack_on_one_device(scalars: Sequence[Tensor]) -> Tensor:
    """Stack 0-d tensors (possibly on several devices) into a 1-D tensor on the device of the first."""
    device = scalars[0].device
    return torch.stack([scalar.to(device) for scalar in scalars])


def global_l2_norm(norms: Sequence[Tensor]) -> Tensor:
    """The L2 norm of the concatenation of tensors, from their per-tensor L2 ``norms`` (no host sync)."""
    return torch.linalg.vector_norm(stack_on_one_device(norms))


def nonfinite_policy_allows_step(
    optimizer_name: str, param_groups: list[dict[str, Any]], grad_norms: list[list[Tensor]]
) -> bool:
    """Apply each group's ``nonfinite`` policy; return whether the step may go ahead.

    ``grad_norms[i]`` holds the per-tensor gradient norms of ``param_groups[i]``; a gradient is non-finite when its
    norm is inf/NaN (an fp32 norm that overflows counts too). Groups with ``nonfinite="apply"`` are not checked.
    Costs one host synchronisation when any group is checked.

    - ``"error"``: raise ``FloatingPointError`` naming how many parameters of such groups had non-finite gradients.
    - ``"skip"``: if a checked group has one, the whole step is skipped (no parameter or state of any group
      changes) and every group's ``nonfinite_skips`` counter goes up by one.
    """
    checked = [
        (group, norms) for group, norms in zip(param_groups, grad_norms) if group["nonfinite"] != "apply" and norms
    ]
    if not checked:
        return True
    nonfinite_counts = stack_on_one_device(
        [(~stack_on_one_device(norms).isfinite()).sum() for _, norms in checked]
    ).tolist()
    errors = sum(count for (group, _), count in zip(checked, nonfinite_counts) if group["nonfinite"] == "error")
    if errors:
        raise FloatingPointError(
            f"{optimizer_name}: {errors} parameter(s) have non-finite (inf/NaN) gradients and nonfinite='error'; "
            "use nonfinite='skip' to skip such steps, or 'apply' under a GradScaler"
        )
    if any(nonfinite_counts):
        for group in param_groups:
            group["nonfinite_skips"] += 1
        return False
    return True


def trust_ratios(
    weight_norms: list[Tensor],
    update_norms: list[Tensor],
    *,
    coefficient: float = 1.0,
    weight_decay: float = 0.0,
    eps: float = 0.0,
) -> Tensor:
    r"""Layer-wise trust ratios :math:`\eta \|w\| / (\|u\| + \lambda \|w\| + \epsilon)` as one 1-D tensor.

    This is the local learning rate of LARS (You, Gitman, Ginsburg 2017, eq. 6) and, with the defaults
    (:math:`\eta=1, \lambda=0, \epsilon=0`), the LAMB ratio :math:`\|x\| / \|r + \lambda x\|` (You et al. 2019,
    Algorithm 2). Where :math:`\|w\|` or :math:`\|u\|` is zero or non-finite, or the ratio itself is not finite,
    the ratio is 1 (an all-zero weight at step 1 gets a plain update, never NaN). Computed with ``torch.where``
    on the stacked norms: no host synchronisation. The norms must share one device.
    """
    weight_norm = torch.stack(weight_norms)
    update_norm = torch.stack(update_norms)
    ratio = coefficient * weight_norm / (update_norm + weight_decay * weight_norm + eps)
    usable = (
        (weight_norm > 0)
        & (update_norm > 0)
        & weight_norm.isfinite()
        & update_norm.isfinite()
        & ratio.isfinite()
    )
    return torch.where(usable, ratio, torch.ones_like(ratio))
