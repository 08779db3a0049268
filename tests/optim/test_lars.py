"""Tests for :class:`hf_colossal.optim.Lars`.

The reference below is written directly from You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional
Networks", eq. 6 and Algorithm 1 (plus LARC clipping and torch-SGD momentum), one tensor at a time in float64;
the optimizer runs in fp32 and must match it to rtol=1e-5, atol=1e-6.
"""

from __future__ import annotations

import re

import pytest
import torch

from hf_colossal.optim import Lars
from hf_colossal.optim.lars import lars

from .helpers import SHAPES, assert_state_equal, snapshot
from .helpers import groups_and_options as shared_groups_and_options
from .helpers import make_problem as shared_make_problem

# Two groups: weights (trust ratio on) and biases (adapt=False, own lr and weight decay).
GROUPS = [
    (["w1", "w2"], {"weight_decay": 0.1}),
    (["b1", "b2"], {"weight_decay": 0.02, "lr": 0.05, "adapt": False}),
]
BASE = {"lr": 0.2, "momentum": 0.9, "trust_coefficient": 0.02, "weight_decay": 0.0}


def make_problem(dtype=torch.float64):
    return shared_make_problem(seed=4321, w2_grad_scale=0.01, grad_scale=0.3, dtype=dtype)


def lr_factor(step: int) -> float:
    """A decaying schedule applied to every group's lr; it makes lr_in_momentum matter."""
    return 1.0 - 0.2 * step


def groups_and_options(options):
    return shared_groups_and_options(GROUPS, options)


def reference_lars(params, grads_per_step, options):
    """Plain float64 LARS, one tensor at a time, straight from the equations."""
    groups, options = groups_and_options(options)
    params = {name: value.clone() for name, value in params.items()}
    buffers = {}
    for step_index, grads in enumerate(grads_per_step):
        for names, overrides in groups:
            hp = {**BASE, "adapt": True, "dampening": 0.0, "eps": 1e-8, **options, **overrides}
            lr = hp["lr"] * lr_factor(step_index)
            wd, momentum = hp["weight_decay"], hp["momentum"]
            for name in names:
                g, x = grads[name], params[name]
                if g is None:
                    continue
                d = g + wd * x
                local = 1.0
                if hp["adapt"] or hp.get("always_adapt", False):
                    x_norm, g_norm = float(x.norm()), float(g.norm())
                    if x_norm > 0 and g_norm > 0:
                        local = hp["trust_coefficient"] * x_norm / (g_norm + wd * x_norm + hp["eps"])
                    if hp.get("trust_clip", False):
                        local = min(local / lr, 1.0)
                lr_in_momentum = hp.get("lr_in_momentum", False)
                d = (lr * local * d) if lr_in_momentum else (local * d)
                if momentum != 0:
                    buf = buffers[name] = (
                        d.clone() if name not in buffers else momentum * buffers[name] + (1 - hp["dampening"]) * d
                    )
                    step = d + momentum * buf if hp.get("nesterov", False) else buf
                else:
                    step = d
                params[name] = x - step if lr_in_momentum else x - lr * step
    return params, buffers


def build(params, options, dtype=torch.float32):
    """Leaf tensors of ``dtype`` for ``params`` and a Lars over them, grouped like :func:`groups_and_options`."""
    groups, options = groups_and_options(options)
    tensors = {name: value.to(dtype).requires_grad_() for name, value in params.items()}
    param_groups = [{"params": [tensors[n] for n in names], **overrides} for names, overrides in groups]
    return tensors, Lars(param_groups, **{**BASE, **options})


def run(tensors, optimizer, grads_per_step, dtype=torch.float32):
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    for step_index, grads in enumerate(grads_per_step):
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * lr_factor(step_index)
        for name, tensor in tensors.items():
            tensor.grad = None if grads[name] is None else grads[name].to(dtype)
        optimizer.step()


OPTION_SETS = {
    "default": {},
    "nesterov": {"nesterov": True},
    "dampening": {"dampening": 0.3},
    "no_momentum": {"momentum": 0.0},
    "trust_clip": {"trust_clip": True},
    "lr_in_momentum": {"lr_in_momentum": True},
    "always_adapt": {"always_adapt": True},
    "no_eps": {"eps": 0.0},
    "large_eps": {"eps": 0.5},
    "everything": {
        "nesterov": True,
        "trust_clip": True,
        "lr_in_momentum": True,
        "always_adapt": True,
        "momentum": 0.8,
        "weight_decay": 0.05,
        "trust_coefficient": 0.1,
    },
    "dampened_lr_in_momentum": {"dampening": 0.5, "lr_in_momentum": True, "trust_clip": True},
    "per_group_options": {
        "nesterov": True,
        "bias_group": {
            "nesterov": False,
            "momentum": 0.5,
            "dampening": 0.2,
            "lr_in_momentum": True,
            "always_adapt": True,
        },
    },
}


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_matches_float64_reference(options):
    params, grads = make_problem()
    expected_params, expected_buffers = reference_lars(params, grads, options)
    tensors, optimizer = build(params, options)
    run(tensors, optimizer, grads)

    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor.detach().double(), expected_params[name], rtol=1e-5, atol=1e-6)
        if options.get("momentum", BASE["momentum"]) == 0:
            assert "momentum_buffer" not in optimizer.state[tensor]
        else:
            buffer = optimizer.state[tensor]["momentum_buffer"]
            torch.testing.assert_close(buffer.double(), expected_buffers[name], rtol=1e-5, atol=1e-7)


def test_lr_in_momentum_differs_only_when_lr_changes():
    params, grads = make_problem()
    results = {}
    for lr_in_momentum in (False, True):
        tensors, optimizer = build(params, {"lr_in_momentum": lr_in_momentum})
        for grad_set in grads[:3]:  # constant lr
            for name, tensor in tensors.items():
                tensor.grad = None if grad_set[name] is None else grad_set[name].float()
            optimizer.step()
        results[lr_in_momentum] = tensors
    for name in SHAPES:
        torch.testing.assert_close(results[False][name], results[True][name], rtol=1e-5, atol=1e-6)


def test_functional_form_computes_grad_norms_itself():
    params, grads = make_problem()
    tensors, optimizer = build(params, {"nesterov": True})
    run(tensors, optimizer, grads[:1])

    functional_params = [value.float() for value in params.values()]
    hyperparameters = {
        "lr": 0.2, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.1, "nesterov": True,
        "trust_coefficient": 0.02, "eps": 1e-8, "trust_clip": False, "adapt": True, "lr_in_momentum": False,
    }  # fmt: skip
    buffers = [None, None]
    lars(functional_params[0::2], [grads[0]["w1"].float(), grads[0]["w2"].float()], buffers, **hyperparameters)
    assert torch.equal(functional_params[0], tensors["w1"]) and torch.equal(functional_params[2], tensors["w2"])
    assert torch.equal(buffers[0], optimizer.state[tensors["w1"]]["momentum_buffer"])


def test_per_group_lr_zero_leaves_group_untouched():
    params, grads = make_problem()
    tensors = {name: value.float().requires_grad_() for name, value in params.items()}
    optimizer = Lars(
        [{"params": [tensors["w1"], tensors["b1"]]}, {"params": [tensors["w2"], tensors["b2"]], "lr": 0.0}], lr=0.5
    )
    before = {name: tensor.detach().clone() for name, tensor in tensors.items()}
    for name, tensor in tensors.items():
        tensor.grad = grads[0][name].float()
    optimizer.step()
    assert torch.equal(tensors["w2"], before["w2"]) and torch.equal(tensors["b2"], before["b2"])
    assert not torch.equal(tensors["w1"], before["w1"]) and not torch.equal(tensors["b1"], before["b1"])


@pytest.mark.parametrize("trust_clip", [False, True], ids=["plain", "trust_clip"])
@pytest.mark.parametrize("zero_grad", [False, True], ids=["random_grad", "zero_grad"])
def test_zero_weights_get_ratio_one_and_stay_finite(zero_grad, trust_clip):
    weight = torch.zeros(4, 3, requires_grad=True)
    grad = torch.zeros(4, 3) if zero_grad else torch.randn(4, 3)
    optimizer = Lars([weight], lr=0.1, weight_decay=0.1, eps=0.0, trust_clip=trust_clip)
    weight.grad = grad.clone()
    optimizer.step()
    assert weight.isfinite().all()
    # ||x|| = 0: local lr 1 (LARC: min(1 / lr, 1) = 1), so the first step is plain SGD.
    torch.testing.assert_close(weight.detach(), -0.1 * grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params_follow_fp32_math(dtype):
    options = {"nesterov": True, "trust_clip": True}
    params, grads = make_problem()
    # Start both runs from values representable in ``dtype`` so they see identical inputs.
    params = {name: value.to(dtype).double() for name, value in params.items()}
    grads = [{n: None if g is None else g.to(dtype).double() for n, g in step.items()} for step in grads]

    fp32_tensors, fp32_optimizer = build(params, options)
    low_tensors, low_optimizer = build(params, options, dtype=dtype)
    run(fp32_tensors, fp32_optimizer, grads[:1])
    run(low_tensors, low_optimizer, grads[:1], dtype=dtype)
    ulp = torch.finfo(dtype).eps
    for name in SHAPES:
        low, fp32 = low_tensors[name], fp32_tensors[name]
        assert low.dtype == dtype
        # One step: the fp32 result rounded to ``dtype`` (at most one rounding step apart).
        torch.testing.assert_close(low.detach().float(), fp32.detach().to(dtype).float(), rtol=ulp, atol=0)
        buffer = low_optimizer.state[low]["momentum_buffer"]
        assert buffer.dtype == torch.float32
        torch.testing.assert_close(buffer, fp32_optimizer.state[fp32]["momentum_buffer"])

    run(fp32_tensors, fp32_optimizer, grads[1:])
    run(low_tensors, low_optimizer, grads[1:], dtype=dtype)
    for name in SHAPES:
        torch.testing.assert_close(
            low_tensors[name].detach().float(), fp32_tensors[name].detach(), rtol=4 * ulp, atol=4 * ulp * 1e-2
        )


def test_sparse_gradient_raises():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = Lars(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"Lars does not support sparse gradients \(parameter #0 of param group 0"):
        optimizer.step()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": -0.1}, "lr"),
        ({"momentum": -0.9}, "momentum"),
        ({"dampening": 1.5}, "dampening"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"trust_coefficient": 0.0}, "trust_coefficient"),
        ({"eps": -1e-8}, "eps"),
        ({"nesterov": True, "momentum": 0.0}, "nesterov"),
        ({"nesterov": True, "dampening": 0.1}, "nesterov"),
        ({"trust_clip": None}, "trust_clip"),
        ({"lr_in_momentum": "no"}, "lr_in_momentum"),
        ({"nonfinite": "raise"}, "nonfinite"),
        ({"foreach": False}, "foreach"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, name):
    with pytest.raises(ValueError, match="invalid " + re.escape(name) + "="):
        Lars([torch.zeros(2, requires_grad=True)], **kwargs)


def test_invalid_param_group_value_raises():
    with pytest.raises(ValueError, match=r"Lars param group 0: invalid momentum=-1"):
        Lars([{"params": [torch.zeros(2, requires_grad=True)], "momentum": -1}])


@pytest.mark.parametrize("bad_value", [float("nan"), float("-inf")], ids=["nan", "-inf"])
def test_nonfinite_skip_leaves_everything_untouched_then_continues(bad_value):
    params, grads = make_problem()
    tensors, optimizer = build(params, {})
    control_tensors, control = build(params, {})
    run(tensors, optimizer, grads[:2])
    run(control_tensors, control, grads[:2])

    before_params, before_state = snapshot(optimizer, tensors)
    for name, tensor in tensors.items():
        tensor.grad = grads[2][name].float() if grads[2][name] is not None else None
    tensors["w2"].grad[1, 1] = bad_value
    optimizer.step()

    for name, tensor in tensors.items():
        assert torch.equal(tensor, before_params[name])
    assert_state_equal(optimizer.state_dict()["state"], before_state)
    assert [group["nonfinite_skips"] for group in optimizer.param_groups] == [1, 1]

    for name in SHAPES:
        grad = grads[3][name].float()
        tensors[name].grad, control_tensors[name].grad = grad.clone(), grad.clone()
    optimizer.step()
    control.step()
    for name in SHAPES:
        assert torch.equal(tensors[name], control_tensors[name])
    assert_state_equal(optimizer.state_dict()["state"], control.state_dict()["state"])


def test_nonfinite_error_raises_and_counts():
    weights = [torch.ones(3, requires_grad=True) for _ in range(3)]
    optimizer = Lars([{"params": weights[:2]}, {"params": weights[2:]}], nonfinite="error")
    for weight in weights:
        weight.grad = torch.ones(3)
    weights[0].grad[0] = float("nan")
    weights[2].grad[2] = float("inf")
    with pytest.raises(FloatingPointError, match=r"Lars: 2 parameter\(s\) have non-finite"):
        optimizer.step()
    assert all(torch.equal(weight, torch.ones(3)) for weight in weights)


def test_nonfinite_apply_propagates_nan():
    params, grads = make_problem()
    tensors, optimizer = build(params, {"nonfinite": "apply"})
    for name, tensor in tensors.items():
        tensor.grad = grads[0][name].float()
    tensors["b1"].grad[0] = float("nan")
    optimizer.step()
    assert tensors["b1"].isnan().any()
    assert tensors["w1"].isfinite().all()
    assert optimizer.param_groups[0]["nonfinite_skips"] == 0
