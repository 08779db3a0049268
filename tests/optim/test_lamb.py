"""Tests for :class:`hf_colossal.optim.Lamb`.

The reference below is written directly from You et al. 2019, "Large Batch Optimization for Deep Learning",
Algorithm 2 (plus NVLAMB pre-normalisation and LAMBC clipping), one tensor at a time in float64; the optimizer
runs in fp32 and must match it to rtol=1e-5, atol=1e-6.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from hf_colossal.optim import Lamb

from .helpers import SHAPES, STEPS, assert_state_equal, snapshot
from .helpers import groups_and_options as shared_groups_and_options
from .helpers import make_problem as shared_make_problem

# Two groups: weights (trust ratio on) and biases (adapt=False, own lr and weight decay).
GROUPS = [
    (["w1", "w2"], {"weight_decay": 0.1}),
    (["b1", "b2"], {"weight_decay": 0.02, "lr": 3e-3, "adapt": False}),
]
BASE = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0}


def make_problem(dtype=torch.float64):
    return shared_make_problem(seed=1234, w2_grad_scale=0.3, grad_scale=0.05, dtype=dtype)


def lr_factor(step: int) -> float:
    """A decaying schedule applied to every group's lr, so per-step lr changes are exercised."""
    return 1.0 - 0.15 * step


def groups_and_options(options):
    return shared_groups_and_options(GROUPS, options)


def reference_lamb(params, grads_per_step, options):
    """Plain float64 LAMB, one tensor at a time, straight from the equations."""
    groups, options = groups_and_options(options)
    params = {name: value.clone() for name, value in params.items()}
    exp_avg, exp_avg_sq, steps = {}, {}, {}
    for step_index, grads in enumerate(grads_per_step):
        present = [g for g in grads.values() if g is not None]
        global_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in present))
        for names, overrides in groups:
            hp = {**BASE, "adapt": True, **options, **overrides}
            lr = hp["lr"] * lr_factor(step_index)
            beta1, beta2 = hp["betas"]
            wd = hp["weight_decay"]
            for name in names:
                g, x = grads[name], params[name]
                if g is None:
                    continue
                if hp.get("grad_pre_normalization", False):
                    g = g / max(1.0, global_norm / hp.get("pre_normalization_max_norm", 1.0))
                decoupled = hp.get("decoupled_weight_decay", True)
                if not decoupled:
                    g = g + wd * x
                t = steps[name] = steps.get(name, 0) + 1
                m = exp_avg[name] = beta1 * exp_avg.get(name, torch.zeros_like(x)) + (1 - beta1) * g
                v = exp_avg_sq[name] = beta2 * exp_avg_sq.get(name, torch.zeros_like(x)) + (1 - beta2) * g * g
                if hp.get("bias_correction", True):
                    m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
                else:
                    m_hat, v_hat = m, v
                r = m_hat / (v_hat.sqrt() + hp["eps"])
                u = r + wd * x if decoupled else r
                ratio = 1.0
                if hp["adapt"] or hp.get("always_adapt", False):
                    x_norm, u_norm = float(x.norm()), float(u.norm())
                    if x_norm > 0 and u_norm > 0:
                        ratio = x_norm / u_norm
                    if hp.get("max_trust_ratio") is not None:
                        ratio = min(ratio, hp["max_trust_ratio"])
                params[name] = x - lr * ratio * u
    return params, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "step": steps}


def build(params, options, dtype=torch.float32):
    """Leaf tensors of ``dtype`` for ``params`` and a Lamb over them, grouped like :func:`groups_and_options`."""
    groups, options = groups_and_options(options)
    tensors = {name: value.to(dtype).requires_grad_() for name, value in params.items()}
    param_groups = [{"params": [tensors[n] for n in names], **overrides} for names, overrides in groups]
    return tensors, Lamb(param_groups, **{**BASE, **options})


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
    "no_bias_correction": {"bias_correction": False},
    "l2_weight_decay": {"decoupled_weight_decay": False},
    "max_trust_ratio": {"max_trust_ratio": 0.8},
    "always_adapt": {"always_adapt": True},
    "pre_normalization": {"grad_pre_normalization": True, "pre_normalization_max_norm": 0.5},
    "pre_normalization_inactive": {"grad_pre_normalization": True, "pre_normalization_max_norm": 100.0},
    "per_group_options": {
        "grad_pre_normalization": True,
        "pre_normalization_max_norm": 0.5,
        "bias_group": {"grad_pre_normalization": False, "betas": (0.5, 0.9), "eps": 1e-3},
    },
    "everything": {
        "bias_correction": False,
        "decoupled_weight_decay": False,
        "max_trust_ratio": 1.2,
        "always_adapt": True,
        "grad_pre_normalization": True,
        "pre_normalization_max_norm": 0.3,
        "betas": (0.8, 0.99),
        "eps": 1e-4,
        "weight_decay": 0.05,
    },
}


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_matches_float64_reference(options):
    params, grads = make_problem()
    expected_params, expected_state = reference_lamb(params, grads, options)
    tensors, optimizer = build(params, options)
    run(tensors, optimizer, grads)

    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor.detach().double(), expected_params[name], rtol=1e-5, atol=1e-6)
        state = optimizer.state[tensor]
        assert state["step"].item() == expected_state["step"][name]
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key].double(), expected_state[key][name], rtol=1e-5, atol=1e-7)
    # The missing gradient kept b2 one step behind the others.
    assert optimizer.state[tensors["b2"]]["step"].item() == STEPS - 1


def test_state_layout_and_param_group_keys():
    params, grads = make_problem()
    tensors, optimizer = build(params, {})
    run(tensors, optimizer, grads[:1])
    state = optimizer.state[tensors["w1"]]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["step"].device.type == "cpu" and state["step"].dtype == torch.float32 and state["step"].dim() == 0
    saved_groups = optimizer.state_dict()["param_groups"]
    assert [group["adapt"] for group in saved_groups] == [True, False]
    assert all(group["nonfinite_skips"] == 0 and group["nonfinite"] == "skip" for group in saved_groups)


def test_per_group_lr_zero_leaves_group_untouched():
    params, grads = make_problem()
    tensors = {name: value.float().requires_grad_() for name, value in params.items()}
    optimizer = Lamb(
        [{"params": [tensors["w1"], tensors["b1"]]}, {"params": [tensors["w2"], tensors["b2"]], "lr": 0.0}], lr=1e-2
    )
    before = {name: tensor.detach().clone() for name, tensor in tensors.items()}
    for name, tensor in tensors.items():
        tensor.grad = grads[0][name].float()
    optimizer.step()
    assert torch.equal(tensors["w2"], before["w2"]) and torch.equal(tensors["b2"], before["b2"])
    assert not torch.equal(tensors["w1"], before["w1"]) and not torch.equal(tensors["b1"], before["b1"])


@pytest.mark.parametrize("zero_grad", [False, True], ids=["random_grad", "zero_grad"])
def test_zero_weights_get_ratio_one_and_stay_finite(zero_grad):
    weight = torch.zeros(4, 3, requires_grad=True)
    grad = torch.zeros(4, 3) if zero_grad else torch.randn(4, 3)
    optimizer = Lamb([weight], lr=0.1, weight_decay=0.1, always_adapt=True)
    weight.grad = grad.clone()
    optimizer.step()
    assert weight.isfinite().all()
    # Step 1 with bias correction: m_hat = g, v_hat = g^2, so u = g / (|g| + eps) and the ratio is 1.
    torch.testing.assert_close(weight.detach(), -0.1 * grad / (grad.abs() + 1e-6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params_follow_fp32_math(dtype):
    options = {"max_trust_ratio": 2.0, "grad_pre_normalization": True}
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
        for key in ("exp_avg", "exp_avg_sq"):
            assert low_optimizer.state[low][key].dtype == torch.float32
            torch.testing.assert_close(low_optimizer.state[low][key], fp32_optimizer.state[fp32][key])

    run(fp32_tensors, fp32_optimizer, grads[1:])
    run(low_tensors, low_optimizer, grads[1:], dtype=dtype)
    for name in SHAPES:
        torch.testing.assert_close(
            low_tensors[name].detach().float(), fp32_tensors[name].detach(), rtol=4 * ulp, atol=4 * ulp * 1e-2
        )


def test_sparse_gradient_raises():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = Lamb(embedding.named_parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    expected = "Lamb does not support sparse gradients (parameter 'weight' shape (10, 3)); use torch.optim.SparseAdam"
    with pytest.raises(ValueError, match=re.escape(expected)):
        optimizer.step()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"betas": (1.0, 0.999)}, "betas[0]"),
        ({"betas": (0.9, -0.1)}, "betas[1]"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": -1.0}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"max_trust_ratio": 0.0}, "max_trust_ratio"),
        ({"pre_normalization_max_norm": 0.0}, "pre_normalization_max_norm"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"foreach": False}, "foreach"),
        ({"bias_correction": "yes"}, "bias_correction"),
        ({"always_adapt": 1}, "always_adapt"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, name):
    with pytest.raises(ValueError, match="invalid " + re.escape(name) + "="):
        Lamb([torch.zeros(2, requires_grad=True)], **kwargs)


def test_invalid_param_group_value_raises():
    weight = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"param group 0: invalid lr=-1"):
        Lamb([{"params": [weight], "lr": -1}])
    optimizer = Lamb([weight])
    with pytest.raises(ValueError, match=r"param group 1: invalid adapt="):
        optimizer.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "adapt": "no"})


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_skip_leaves_everything_untouched_then_continues(bad_value):
    options = {"grad_pre_normalization": True}
    params, grads = make_problem()
    tensors, optimizer = build(params, options)
    control_tensors, control = build(params, options)
    run(tensors, optimizer, grads[:2])
    run(control_tensors, control, grads[:2])

    before_params, before_state = snapshot(optimizer, tensors)
    for name, tensor in tensors.items():
        tensor.grad = grads[2][name].float() if grads[2][name] is not None else None
    tensors["b1"].grad[0] = bad_value
    optimizer.step()

    for name, tensor in tensors.items():
        assert torch.equal(tensor, before_params[name])
    assert_state_equal(optimizer.state_dict()["state"], before_state)
    assert [group["nonfinite_skips"] for group in optimizer.param_groups] == [1, 1]

    # The next finite step is exactly the step the control run takes.
    for name in SHAPES:
        grad = grads[3][name].float()
        tensors[name].grad, control_tensors[name].grad = grad.clone(), grad.clone()
    optimizer.step()
    control.step()
    for name in SHAPES:
        assert torch.equal(tensors[name], control_tensors[name])
    assert_state_equal(optimizer.state_dict()["state"], control.state_dict()["state"])


def test_nonfinite_error_raises_and_counts():
    params, grads = make_problem()
    tensors, optimizer = build(params, {"nonfinite": "error"})
    for name, tensor in tensors.items():
        tensor.grad = torch.full(SHAPES[name], float("inf"))
    tensors["w1"].grad = torch.zeros(SHAPES["w1"])
    with pytest.raises(FloatingPointError, match=r"Lamb: 3 parameter\(s\) have non-finite"):
        optimizer.step()
    assert len(optimizer.state) == 0


def test_nonfinite_apply_propagates_nan():
    params, grads = make_problem()
    tensors, optimizer = build(params, {"nonfinite": "apply"})
    for name, tensor in tensors.items():
        tensor.grad = grads[0][name].float()
    tensors["w1"].grad[0, 0] = float("nan")
    optimizer.step()
    assert tensors["w1"].isnan().any()
    assert tensors["w2"].isfinite().all()
    assert optimizer.param_groups[0]["nonfinite_skips"] == 0
