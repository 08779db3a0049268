"""Multi-tensor (``torch._foreach_*``) building blocks shared by :class:`~hf_colossal.optim.Lamb` and
:class:`~hf_colossal.optim.Lars`.

Both optimizers follow the same outline per ``step()``: gather the parameters that have a gradient
(:func:`params_with_grads`), take every gradient's L2 norm at once (:func:`foreach_norms`), apply the
non-finite gradient policy to the whole optimizer (:func:`nonfinite_policy_allows_step`), then run their
functional core once per (device, dtype) bucket (:func:`group_by_device_and_dtype`) with the math in fp32
(:func:`math_precision`) and the layer-wise trust ratio of :func:`trust_ratios`.

The fused (Triton) path of :mod:`._triton` shares the hyperparameter checks, the path choice
(:func:`use_fused_path`), the step-count placement (:func:`place_step`), the skip counter that lives on the device
(:class:`ParamGroup`), the undoing of state that a skipped or failed first step created (:func:`drop_new_state`) and
the reuse of a step's host-side work (:func:`fused_fast_step`).

Pure torch: nothing here may import transformers or accelerate.
"""

from __future__ import annotations

import functools
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


def is_int(value: Any) -> bool:
    """True for a Python int (bool and tensors excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_common_hyperparameters(hyperparameters: dict[str, Any], where: str) -> None:
    """Validate the hyperparameters both optimizers share: lr, weight_decay, eps, nonfinite, foreach, fused, flags."""
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
        "expected None or True (fused=False selects the multi-tensor foreach implementation)",
    )
    fused = hyperparameters["fused"]
    require(fused is None or isinstance(fused, bool), where, "fused", fused, "expected None, True or False")
    require(
        not (fused is True and foreach is True),
        where,
        "fused",
        fused,
        "fused=True and foreach=True exclude each other",
    )
    for name in ("adapt", "always_adapt", "master_weights"):
        require(isinstance(hyperparameters[name], bool), where, name, hyperparameters[name], "expected a bool")
    skips = hyperparameters["nonfinite_skips"]
    require(
        is_int(skips) and skips >= 0,
        where,
        "nonfinite_skips",
        skips,
        "expected an int >= 0 (a counter the optimizer maintains)",
    )


# ---------------------------------------------------------------------------------------------------------------
# Param groups whose non-finite skip counter may live on the device


class ParamGroup(dict):
    """A param group (a ``dict``) whose ``nonfinite_skips`` may have increments pending in a device counter.

    The fused path decides on the device whether a step is skipped, so it cannot add 1 to a Python int without a
    host sync. Instead every group of an optimizer refers to one int64 device tensor that the fused kernels add
    the skipped steps to (all groups count every skip, so one counter serves them all). Reading
    ``group["nonfinite_skips"]`` (also through ``get``, ``items`` or ``values``, hence in ``state_dict()``)
    materialises the pending increments into the stored int, at the cost of one host sync; setting it discards
    the pending ones. On the foreach path no counter is attached and the group is a plain dict.
    """

    _skip_counter: Tensor | None = None
    _skip_base: Tensor | int = 0  # the counter's value already counted in the stored int

    def attach_skip_counter(self, counter: Tensor) -> None:
        """Count the skips that ``counter`` records from now on (no host sync unless another counter was attached)."""
        if self._skip_counter is counter:
            return
        self.settle_nonfinite_skips()
        self._skip_counter = counter
        self._skip_base = counter.clone()

    def settle_nonfinite_skips(self) -> None:
        """Add the pending device-side skips to the stored ``nonfinite_skips`` (one host sync when attached)."""
        counter = self._skip_counter
        if counter is None:
            return
        total = int(counter.item())
        base = self._skip_base if isinstance(self._skip_base, int) else int(self._skip_base.item())
        self._skip_base = total
        if total != base:
            dict.__setitem__(self, "nonfinite_skips", dict.__getitem__(self, "nonfinite_skips") + total - base)

    def __getitem__(self, key: Any) -> Any:
        if key == "nonfinite_skips":
            self.settle_nonfinite_skips()
        return super().__getitem__(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        if key == "nonfinite_skips" and self._skip_counter is not None:
            self._skip_base = self._skip_counter.clone()
        super().__setitem__(key, value)

    def get(self, key: Any, default: Any = None) -> Any:
        if key == "nonfinite_skips":
            self.settle_nonfinite_skips()
        return super().get(key, default)

    def items(self):  # type: ignore[override]
        self.settle_nonfinite_skips()
        return super().items()

    def values(self):  # type: ignore[override]
        self.settle_nonfinite_skips()
        return super().values()


def device_skip_counter(optimizer: Optimizer, device: torch.device) -> Tensor:
    """The optimizer's device-side skip counter (created on ``device``), attached to every param group."""
    counter = getattr(optimizer, "_nonfinite_skip_counter", None)
    if counter is None or counter.device != device:
        counter = torch.zeros((), dtype=torch.int64, device=device)
        optimizer._nonfinite_skip_counter = counter  # type: ignore[attr-defined]
    for group in optimizer.param_groups:
        group.attach_skip_counter(counter)
    return counter


def load_state_dict_keeping_implementation(optimizer: Optimizer, state_dict: dict[str, Any], load: Any) -> None:
    """``load(state_dict)`` (``Optimizer.load_state_dict``), then fix up the param groups.

    torch replaces every group key with the checkpoint's; ``fused``, ``foreach`` and ``master_weights`` choose how
    this process computes and stores the step, not a hyperparameter, so they keep the loading optimizer's values
    (a checkpoint of a fused GPU run loads into a CPU optimizer; one saved before these keys existed loads too;
    master weights can be turned on or off at a resume). The groups become :class:`ParamGroup` again and any
    pending device-side skip counts are dropped (the checkpoint's counts hold).
    """
    implementation = [
        {key: group[key] for key in ("fused", "foreach", "master_weights")} for group in optimizer.param_groups
    ]
    load(state_dict)
    optimizer.param_groups = [
        ParamGroup({**group, **chosen}) for group, chosen in zip(optimizer.param_groups, implementation)
    ]
    optimizer._nonfinite_skip_counter = None  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------------------
# Choosing the path; state shared by both paths


def use_fused_path(
    optimizer_name: str, param_groups: list[dict[str, Any]], params_and_grads: list[tuple[list[Tensor], list[Tensor]]]
) -> bool:
    """Whether this step runs the fused (Triton) path.

    Groups with ``fused=False`` force the foreach path; ``fused=None`` (default) takes the fused path when every
    parameter with a gradient is a contiguous fp32/bf16/fp16 CUDA tensor and triton is importable; ``fused=True``
    requires it and raises ``RuntimeError`` naming why it cannot run.
    """
    requested = {group["fused"] for group, (params, _) in zip(param_groups, params_and_grads) if params}
    if False in requested:
        if True in requested:
            raise ValueError(f"{optimizer_name}: param groups ask for both fused=True and fused=False")
        return False
    from . import _triton

    params = [p for params, _ in params_and_grads for p in params]
    grads = [g for _, grads in params_and_grads for g in grads]
    if True not in requested and any(p.device.type != "cuda" for p in params):
        return False  # fused=None never picks the (slow) Triton interpreter on CPU tensors
    reason = _triton.unsupported_reason(params, grads)
    if reason is None:
        return True
    if True in requested:
        raise RuntimeError(f"{optimizer_name}(fused=True) cannot run: {reason}; use fused=None or fused=False")
    return False


def check_fused_request(optimizer_name: str, param_group: dict[str, Any]) -> None:
    """At construction: raise ``RuntimeError`` if a group asks for ``fused=True`` but the fused path cannot run."""
    if param_group.get("fused") is not True:
        return
    from . import _triton

    reason = _triton.unsupported_reason(list(param_group["params"]))
    if reason is not None:
        raise RuntimeError(f"{optimizer_name}(fused=True) cannot run: {reason}; use fused=None or fused=False")


def place_step(state: dict[str, Any], device: torch.device) -> Tensor:
    """Move ``state["step"]`` to ``device`` as a float32 scalar if it is elsewhere, and return it.

    The foreach path keeps step counts on the CPU (reading them is no GPU sync); the fused path keeps them on the
    parameter's device (the kernels read and advance them, like torch's fused/capturable Adam). Checkpoints of
    either path load into the other: the count moves on the first step after loading (a one-time copy).
    """
    step = state["step"]
    if step.device != device or step.dtype != torch.float32:
        step = step.to(device=device, dtype=torch.float32, non_blocking=device.type != "cpu")
        state["step"] = step
    return step


def run_fused(optimizer: Optimizer, buckets: list[Any], new_params: list[Tensor], launch: Any) -> None:
    """Run ``launch(buckets, skip_counter)`` (a fused step) and undo the state it created if it wrote nothing."""
    any_check = any(bucket.check for bucket in buckets)
    counter = device_skip_counter(optimizer, buckets[0].bucket.device) if any_check else None
    try:
        flags = launch(buckets, counter)
    except FloatingPointError:
        drop_new_state(optimizer, new_params, None)
        raise
    if any_check:
        drop_new_state(optimizer, new_params, flags)
    record = optimizer.__dict__.get("_trust_ratio_record")
    if record is not None:
        from . import _triton

        record.extend((gb.params, _triton.trust_ratios_of(gb)) for gb in buckets if gb.hyper["adapt"])


def remember_fused_plan(optimizer: Optimizer, entries: list[Any], new_params: list[Tensor], state_keys: Any) -> None:
    """Cache the buckets of a fused step for the next steps (not after a step that created state)."""
    from . import _triton

    plan = None if new_params else _triton.make_plan(optimizer.param_groups, optimizer.state, state_keys, entries)
    optimizer.__dict__["_fused_plan"] = plan


def fused_fast_step(optimizer: Optimizer, state_keys: Any, hyper: Any, launch: Any) -> bool:
    """Run a fused step from the cached plan if nothing it depends on changed; return whether it ran.

    This skips the per-parameter checks and bucketing of the full path: a step then costs the host one pass
    over the parameters (:func:`~._triton.plan_signature`) and the launches, which is what keeps the GPU from
    idling between the backward pass and the update.
    """
    plan = optimizer.__dict__.get("_fused_plan")
    if plan is None or any(group["fused"] is False for group in optimizer.param_groups):
        return False
    from . import _triton

    signature = _triton.plan_signature(optimizer.param_groups, optimizer.state, state_keys)
    if signature is None or signature[0] != plan.static:
        optimizer.__dict__["_fused_plan"] = None
        return False
    run_fused(optimizer, _triton.plan_buckets(optimizer, plan, signature[1], hyper), [], launch)
    return True


def drop_new_state(optimizer: Optimizer, new_params: list[Tensor], flags: dict[torch.device, Tensor] | None) -> None:
    """Forget the state that a fused step created for ``new_params`` if that step wrote nothing.

    ``flags`` None means the step raised; otherwise its skip flags are read (one host sync, only on steps that
    created state, e.g. the first one). Like the foreach path, a skipped first step then leaves no state behind.
    """
    if not new_params:
        return
    if flags is not None:
        from . import _triton

        if not _triton.was_skipped(flags):
            return
    for param in new_params:
        optimizer.state.pop(param, None)


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
        grad = param.grad
        if grad is None:
            continue
        if grad.is_sparse or param.is_complex():
            label = repr(names[index]) if names else f"#{index} of param group {group_index}"
            problem = "sparse gradients" if grad.is_sparse else "complex parameters"
            remedy = (
                "use torch.optim.SparseAdam or a dense embedding"
                if grad.is_sparse
                else "optimize torch.view_as_real(param) instead"
            )
            raise ValueError(
                f"{optimizer_name} does not support {problem} (parameter {label} shape {tuple(param.shape)}); {remedy}"
            )
        params.append(param)
        grads.append(grad)
    return params, grads


def params_with_grads_per_group(
    optimizer_name: str, param_groups: Sequence[dict[str, Any]]
) -> list[tuple[list[Tensor], list[Tensor]]]:
    """:func:`params_with_grads` for each param group, in order."""
    return [params_with_grads(optimizer_name, group, index) for index, group in enumerate(param_groups)]


def evaluate_closure(closure: Any) -> Any:
    """The loss from an optimizer's ``closure`` run with gradients enabled (``step`` runs under no_grad); None
    without a closure."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


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
def math_precision(
    params: list[Tensor], grads: list[Tensor], master_params: list[Tensor | None] | None = None
) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """Give the parameters and gradients of one (device, dtype) bucket in :func:`math_dtype`.

    fp16/bf16 parameters are copied to fp32 for the update and the result is rounded back into them on exit;
    with ``master_params`` (their fp32 master copies, see :meth:`LayerwiseOptimizer._master_params`) the copies
    are updated in place instead, so no update is lost to the rounding. fp32/fp64 parameters are updated in
    place. The yielded gradients may be the ``.grad`` tensors themselves: treat them as read-only.
    """
    dtype = math_dtype(params[0].dtype)
    if master_params is not None and all(master is not None for master in master_params):
        math_params = master_params
    else:
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
# Sharded parameters (FSDP2 DTensors)


@functools.cache
def _dtensor_class() -> type | None:
    """torch's DTensor class (imported once; None without torch.distributed): checked on every foreach step."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def shard_group(params: Sequence[Tensor]) -> Any:
    """The process group over which ``params`` are sharded (FSDP2 / HSDP DTensors), or None for plain tensors.

    A norm over a whole parameter is then the all-reduced sum of its shards' squared norms over this group;
    replicated mesh dimensions (HSDP's outer one) hold identical shards and need no reduction. Raises
    ``ValueError`` when parameters mix plain tensors and DTensors, are sharded over several mesh dimensions, or
    over different groups.
    """
    dtensor = _dtensor_class()
    if dtensor is None or not params or not any(isinstance(p, dtensor) for p in params):
        return None
    from torch.distributed.tensor import Shard

    groups = set()
    for param in params:
        if not isinstance(param, dtensor):
            raise ValueError("some parameters are DTensors (FSDP2) and some are not; shard all of them or none")
        dims = [dim for dim, placement in enumerate(param.placements) if isinstance(placement, Shard)]
        if len(dims) > 1:
            raise ValueError(f"a parameter is sharded over mesh dimensions {dims}; one sharded dimension is supported")
        if dims:
            groups.add(param.device_mesh.get_group(dims[0]))
    if len(groups) > 1:
        raise ValueError("parameters are sharded over different process groups; use one FSDP2 mesh per optimizer")
    return groups.pop() if groups else None


def local_tensors(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The local shards of DTensors (views: updating them updates the DTensor), plain tensors as they are."""
    dtensor = _dtensor_class()
    return [t.to_local() if dtensor is not None and isinstance(t, dtensor) else t for t in tensors]


def shaped_like(local: Tensor, param: Tensor) -> Tensor:
    """``local`` (a tensor shaped like ``param``'s local shard) as a DTensor laid out like ``param`` if ``param``
    is one (optimizer state of FSDP2 parameters stays DTensors, as distributed checkpoints expect)."""
    dtensor = _dtensor_class()
    if dtensor is None or not isinstance(param, dtensor):
        return local
    return dtensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


def all_reduce_norms(norm_lists: Sequence[Sequence[Tensor]], group: Any) -> list[list[Tensor]]:
    """Whole-parameter L2 norms from the per-shard norms of every list: ONE all-reduce of the stacked squares."""
    sizes = [len(norms) for norms in norm_lists]
    squares = torch.stack([norm for norms in norm_lists for norm in norms]).square()
    torch.distributed.all_reduce(squares, group=group)
    norms = squares.sqrt().unbind()
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [list(norms[start : start + size]) for start, size in zip(starts, sizes)]


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
    if all(scalar.device == device for scalar in scalars):
        return torch.stack(list(scalars))
    return torch.stack([scalar.to(device) for scalar in scalars])


def global_l2_norm(norms: Sequence[Tensor], group: Any = None) -> Tensor:
    """The L2 norm of the concatenation of tensors, from their per-tensor L2 ``norms`` (no host sync); of the
    shards' concatenation over ``group`` when given (one all-reduce)."""
    square = torch.linalg.vector_norm(stack_on_one_device(norms)).square()
    if group is not None:
        torch.distributed.all_reduce(square, group=group)
    return square.sqrt()


def nonfinite_policy_allows_step(
    optimizer_name: str, param_groups: list[dict[str, Any]], grad_norms: list[list[Tensor]], group: Any = None
) -> bool:
    """Apply each group's ``nonfinite`` policy; return whether the step may go ahead.

    ``grad_norms[i]`` holds the per-tensor gradient norms of ``param_groups[i]``; a gradient is non-finite when its
    norm is inf/NaN (an fp32 norm that overflows counts too). Groups with ``nonfinite="apply"`` are not checked.
    Costs one host synchronisation when any group is checked. With sharded parameters (``group``, see
    :func:`shard_group`) the counts are all-reduced first, so every rank takes the same decision.

    - ``"error"``: raise ``FloatingPointError`` naming how many parameters of such groups had non-finite gradients.
    - ``"skip"``: if a checked group has one, the whole step is skipped (no parameter or state of any group
      changes) and every group's ``nonfinite_skips`` counter goes up by one.
    """
    checked = [
        (group, norms) for group, norms in zip(param_groups, grad_norms) if group["nonfinite"] != "apply" and norms
    ]
    if not checked:
        return True
    nonfinite_counts = stack_on_one_device([(~stack_on_one_device(norms).isfinite()).sum() for _, norms in checked])
    if group is not None:
        torch.distributed.all_reduce(nonfinite_counts, group=group)
    nonfinite_counts = nonfinite_counts.tolist()
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


class LayerwiseOptimizer(Optimizer):
    """Glue that :class:`~hf_colossal.optim.Lamb` and :class:`~hf_colossal.optim.Lars` share.

    Subclasses set ``name`` and ``check_hyperparameters`` (a function of ``(hyperparameters, where)`` that raises
    ``ValueError``), and implement ``_foreach_step`` (given the gathered tensors and the :func:`shard_group` of
    FSDP2 parameters, None otherwise), ``_fused_step``, ``_fused_hyper``, ``_fused_launch`` and
    ``_state_keys`` (the state a group's fused plan depends on). Every param group, later ones included, is validated and stored as a :class:`ParamGroup`;
    loading a state dict keeps fp32 state for fp16/bf16 parameters and this optimizer's ``fused``/``foreach``
    choice.
    """

    name: str
    check_hyperparameters: Any

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        type(self).check_hyperparameters(defaults, self.name)
        super().__init__(params, defaults)

    def _master_params(self, params: list[Tensor], group: dict[str, Any]) -> list[Tensor | None]:
        """The fp32 master copy (``state["master_param"]``) of each of ``params``, or None where it has none.

        fp16/bf16 parameters of a group with ``master_weights`` have one: created from the parameter when missing
        (first step, or a checkpoint saved without master weights), then updated by every step, which rounds it
        into the parameter. (Copies a checkpoint brings to a group without ``master_weights`` are dropped by
        :meth:`load_state_dict`.) Call after the other state of ``params`` exists.
        """
        if not group["master_weights"]:
            return [None] * len(params)
        masters: list[Tensor | None] = []
        for param in params:
            state = self.state[param]
            if param.dtype in _LOW_PRECISION_DTYPES and "master_param" not in state:
                state["master_param"] = param.detach().to(
                    dtype=torch.float32, memory_format=torch.contiguous_format, copy=True
                )
            masters.append(state.get("master_param"))
        return masters

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        A cached fused plan runs when nothing it depends on changed; otherwise the gradients are gathered and
        the step goes to the fused path (``_fused_step``) or the foreach path (``_foreach_step``) of the subclass.
        """
        loss = evaluate_closure(closure)
        if fused_fast_step(self, self._state_keys, self._fused_hyper, self._fused_launch):
            return loss
        params_and_grads = params_with_grads_per_group(self.name, self.param_groups)
        if not any(params for params, _ in params_and_grads):
            return loss
        if use_fused_path(self.name, self.param_groups, params_and_grads):
            self._fused_step(params_and_grads)
        else:
            self._foreach_step(params_and_grads, shard_group([p for params, _ in params_and_grads for p in params]))
        return loss

    def record_trust_ratios(self) -> None:
        """Keep the trust ratios of the following steps until :meth:`take_trust_ratios` (for logging them).

        Recording costs no extra pass and no host sync: the ratios are the device tensors the step computed
        anyway. Only parameters whose group adapts are recorded; a step skipped for non-finite gradients
        records none on the foreach path (the fused path decides on the device and records the ratios it had).
        """
        self.__dict__["_trust_ratio_record"] = []

    def take_trust_ratios(self) -> dict[Tensor, Tensor]:
        """The trust ratios recorded since :meth:`record_trust_ratios` (parameter -> 0-d fp32 device tensor of the
        latest step that recorded it); recording stops."""
        record = self.__dict__.pop("_trust_ratio_record", None) or []
        return {param: ratio for params, ratios in record for param, ratio in zip(params, ratios.unbind())}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group after validating its hyperparameters (the group's own keys over the defaults)."""
        where = f"{self.name} param group {len(self.param_groups)}"
        type(self).check_hyperparameters({**self.defaults, **param_group}, where)
        param_group = ParamGroup(param_group)
        super().add_param_group(param_group)
        check_fused_request(self.name, param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like ``torch.optim.Optimizer``, keeping the state of fp16/bf16 parameters in fp32 and this
        optimizer's ``fused``/``foreach``/``master_weights`` choice (master copies are dropped where it is off)."""
        load_state_dict_keeping_implementation(self, state_dict, super().load_state_dict)
        restore_state_precision(self, state_dict)
        for group in self.param_groups:
            if not group["master_weights"]:
                for param in group["params"]:
                    self.state.get(param, {}).pop("master_param", None)

