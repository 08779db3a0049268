"""The fused (Triton) path of :class:`Lamb` and :class:`Lars` against the foreach path, and the fused moment pass of
:class:`Shampoo` / :class:`Soap` against theirs.

The fused tests need a CUDA device (run them on the device machine: `pytest tests/optim/test_fused.py`). They also
run on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, slow), a debugging aid only: Triton 3.6's
interpreter rounds fp32 -> bf16/fp16 stores by truncation and fails on scalar loop bounds with numpy >= 2.4, so it
needs local patches there. The last tests (the fallback to the foreach path, the error for `fused=True`, the
param-group counter) run everywhere.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from hf_colossal.optim import Lamb, Lars
from hf_colossal.optim import _triton

INTERPRETING = _triton.interpreting()
if torch.cuda.is_available():
    DEVICE = "cuda"
elif INTERPRETING and _triton.is_available():
    DEVICE = "cpu"
else:
    DEVICE = None

fused_device = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA device (or TRITON_INTERPRET=1 with triton)")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Odd sizes: single elements, a block tail, several chunks (a chunk is BLOCK * ITERS elements) with a tail.
CHUNK = _triton.BLOCK * _triton.ITERS
WEIGHT_SHAPES = [(64, 33), (1,), (7,), (4097,), (2 * CHUNK + 5,), (3, 5, 7), (1, 1), (CHUNK,)]
BIAS_SHAPES = [(33,), (1,), (7,), (4097,), (2,)]

LAMB_OPTIONS = {
    "default": {},
    "everything": dict(
        weight_decay=0.05, max_trust_ratio=1.2, grad_pre_normalization=True, pre_normalization_max_norm=0.3,
        betas=(0.8, 0.99), eps=1e-4, bias_correction=False, decoupled_weight_decay=False,
    ),
    "decoupled_pre_norm": dict(weight_decay=0.01, max_trust_ratio=10.0, grad_pre_normalization=True),
    "apply": dict(weight_decay=0.01, nonfinite="apply"),  # pass 1 writes the moments (no skip possible)
    "always_adapt_error": dict(weight_decay=0.01, always_adapt=True, nonfinite="error"),
}
LARS_OPTIONS = {
    "default": {},
    "nesterov_clip": dict(weight_decay=1e-4, nesterov=True, trust_clip=True),
    "dampening_lr_in_momentum": dict(weight_decay=1e-3, dampening=0.3, lr_in_momentum=True),
    "no_momentum_apply": dict(momentum=0.0, weight_decay=1e-4, nonfinite="apply"),
    "always_adapt_error": dict(weight_decay=1e-4, always_adapt=True, nonfinite="error"),
}
OPTIMIZERS = {"lamb": (Lamb, 1e-2, LAMB_OPTIONS), "lars": (Lars, 0.5, LARS_OPTIONS)}
CASES = [(name, option) for name, (_, _, options) in OPTIMIZERS.items() for option in options]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_problem(steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = WEIGHT_SHAPES + BIAS_SHAPES
    params = [torch.randn(s, generator=generator) * 0.5 for s in shapes]
    params[2] = torch.zeros_like(params[2])  # an all-zero weight: trust ratio 1
    grads = [[torch.randn(s, generator=generator) * 0.1 for s in shapes] for _ in range(steps)]
    if steps > 1:
        grads[1][3] = None  # a parameter without a gradient at step 1: not updated, its step count does not advance
    return params, grads


def build(name, option, params, device, dtype, fused, **extra):
    cls, lr, options = OPTIMIZERS[name]
    tensors = [p.to(device=device, dtype=dtype, copy=True).requires_grad_() for p in params]
    n = len(WEIGHT_SHAPES)
    groups = [
        {"params": tensors[:n]},
        {"params": tensors[n:], "weight_decay": 0.0, "adapt": False, "lr": lr / 2},
    ]
    return tensors, cls(groups, lr=lr, fused=fused, **{**options[option], **extra})


def run(tensors, optimizer, grads, dtype, first_step=0):
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    for step, step_grads in enumerate(grads, start=first_step):
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * (1.0 - 0.1 * step)
        for tensor, grad in zip(tensors, step_grads):
            tensor.grad = None if grad is None else grad.to(device=tensor.device, dtype=dtype, copy=True)
        optimizer.step()


def state_of(optimizer, tensors):
    return [{k: v.detach().float().cpu() for k, v in optimizer.state[t].items()} for t in tensors]


def assert_close_runs(expected, actual, dtype):
    tolerance = TOLERANCE[dtype]
    (expected_tensors, expected_opt), (actual_tensors, actual_opt) = expected, actual
    for a, b in zip(expected_tensors, actual_tensors):
        torch.testing.assert_close(b.detach().float().cpu(), a.detach().float().cpu(), rtol=tolerance, atol=tolerance)
    for a, b in zip(state_of(expected_opt, expected_tensors), state_of(actual_opt, actual_tensors)):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=tolerance, atol=tolerance * 1e-2, msg=key)


@fused_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("name", "option"), CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_fused_matches_foreach(name, option, dtype):
    if INTERPRETING and dtype != torch.float32 and option != "default":
        pytest.skip("interpreter: low-precision dtypes only with the default options (slow)")
    params, grads = make_problem(steps=4)
    runs = {}
    for label, device, fused in (("cpu", "cpu", False), ("foreach", DEVICE, False), ("fused", DEVICE, True)):
        tensors, optimizer = build(name, option, params, device, dtype, fused)
        run(tensors, optimizer, grads, dtype)
        runs[label] = (tensors, optimizer)
    fused_tensors, fused_opt = runs["fused"]
    for tensor in fused_tensors:
        assert tensor.dtype == dtype
        for key, value in fused_opt.state[tensor].items():
            assert value.dtype == torch.float32, key
            if key == "step":
                assert value.device == tensor.device and value.dim() == 0
    assert_close_runs(runs["foreach"], runs["fused"], dtype)
    assert_close_runs(runs["cpu"], runs["fused"], dtype)
    if name == "lamb":  # the parameter without a gradient at step 1 is one step behind
        assert fused_opt.state[fused_tensors[3]]["step"].item() == len(grads) - 1
        assert fused_opt.state[fused_tensors[0]]["step"].item() == len(grads)


@fused_device
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    ("name", "option"),
    [("lamb", "default"), ("lamb", "everything"), ("lars", "nesterov_clip"), ("lars", "no_momentum_apply")],
)
def test_fused_master_weights_match_foreach(name, option, dtype):
    """The kernels update the fp32 masters like the foreach path and store them rounded into the parameters."""
    params, grads = make_problem(steps=4)
    runs = {}
    for label, fused in (("foreach", False), ("fused", True)):
        tensors, optimizer = build(name, option, params, DEVICE, dtype, fused, master_weights=True)
        run(tensors, optimizer, grads, dtype)
        runs[label] = (tensors, optimizer)
    (foreach_tensors, foreach_opt), (fused_tensors, fused_opt) = runs["foreach"], runs["fused"]
    for expected, tensor in zip(foreach_tensors, fused_tensors):
        master = fused_opt.state[tensor]["master_param"]
        assert master.dtype == torch.float32 and tensor.dtype == dtype
        torch.testing.assert_close(master, foreach_opt.state[expected]["master_param"], rtol=2e-5, atol=2e-6)
        if INTERPRETING:  # the interpreter rounds by truncation: within one unit in the last place
            torch.testing.assert_close(tensor.float(), master.to(dtype).float(), rtol=2 ** -7, atol=1e-6)
        else:
            assert torch.equal(tensor, master.to(dtype))
    assert fused_opt.__dict__.get("_fused_plan") is not None  # later steps took the cached plan


@fused_device
@pytest.mark.parametrize(("name", "option"), CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_recorded_trust_ratios_match_foreach(name, option):
    params, grads = make_problem(steps=3)
    recorded = {}
    for label, fused in (("foreach", False), ("fused", True)):
        tensors, optimizer = build(name, option, params, DEVICE, torch.float32, fused)
        run(tensors, optimizer, grads[:2], torch.float32)
        optimizer.record_trust_ratios()
        run(tensors, optimizer, grads[2:], torch.float32, first_step=2)
        ratios = optimizer.take_trust_ratios()
        recorded[label] = [ratios[t].item() if t in ratios else None for t in tensors]
        assert optimizer.take_trust_ratios() == {}  # taking them ends the recording
    assert [r is None for r in recorded["fused"]] == [r is None for r in recorded["foreach"]]
    assert [r is None for r in recorded["fused"]].count(False) >= len(WEIGHT_SHAPES)
    numbers = [(a, b) for a, b in zip(recorded["foreach"], recorded["fused"]) if a is not None]
    assert [b for _, b in numbers] == pytest.approx([a for a, _ in numbers], rel=1e-4)  # norms summed in another order


def test_fused_path_is_chosen_and_deterministic():
    if DEVICE is None:
        pytest.skip("needs a CUDA device (or TRITON_INTERPRET=1 with triton)")
    params, grads = make_problem(steps=2)
    results = []
    for _ in range(2):
        fused = None if DEVICE == "cuda" else True  # the interpreter is never chosen by default
        tensors, optimizer = build("lamb", "decoupled_pre_norm", params, DEVICE, torch.float32, fused)
        run(tensors, optimizer, grads, torch.float32)
        assert optimizer.state[tensors[0]]["step"].device.type == DEVICE  # device step count: the fused path ran
        results.append([t.detach().clone() for t in tensors])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@cuda_only
@pytest.mark.parametrize("option", ["default", "pre_norm"])
@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_no_host_sync_in_a_step(name, option):
    extra = {"grad_pre_normalization": True} if (name, option) == ("lamb", "pre_norm") else {}
    if name == "lars" and option == "pre_norm":
        extra = {"nesterov": True, "trust_clip": True}
    params, grads = make_problem(steps=5)
    tensors, optimizer = build(name, "default", params, "cuda", torch.float32, None, **extra)
    assert optimizer.param_groups[0]["nonfinite"] == "skip"
    device_grads = [[None if g is None else g.cuda() for g in step] for step in grads]
    run(tensors, optimizer, grads[:1], torch.float32)  # the first step creates state (and reads the skip flag)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step_grads in device_grads[1:]:
            for tensor, grad in zip(tensors, step_grads):
                tensor.grad = None if grad is None else grad.clone()
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(group["nonfinite_skips"] == 0 for group in optimizer.param_groups)
    assert all(t.isfinite().all() for t in tensors)


def _snapshot(optimizer, tensors):
    return [t.detach().clone() for t in tensors], copy.deepcopy(optimizer.state_dict()["state"])


def _assert_state_equal(left, right):
    assert left.keys() == right.keys()
    for index in left:
        assert left[index].keys() == right[index].keys()
        for key in left[index]:
            assert torch.equal(left[index][key].cpu(), right[index][key].cpu()), (index, key)


@fused_device
@pytest.mark.parametrize("name", ["lamb", "lars"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_skip_on_device(name, bad_value):
    extra = {"grad_pre_normalization": True} if name == "lamb" else {"dampening": 0.2}
    params, grads = make_problem(steps=4)
    tensors, optimizer = build(name, "default", params, DEVICE, torch.float32, True, **extra)
    control_tensors, control = build(name, "default", params, DEVICE, torch.float32, True, **extra)
    run(tensors, optimizer, grads[:2], torch.float32)
    run(control_tensors, control, grads[:2], torch.float32)

    before_params, before_state = _snapshot(optimizer, tensors)
    for tensor, grad in zip(tensors, grads[2]):
        tensor.grad = grad.to(DEVICE, copy=True)
    tensors[-1].grad[0] = bad_value  # in the adapt=False group: the whole step is skipped anyway
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(tensors, before_params))
    _assert_state_equal(optimizer.state_dict()["state"], before_state)
    assert [group["nonfinite_skips"] for group in optimizer.param_groups] == [1, 1]
    assert [group["nonfinite_skips"] for group in optimizer.state_dict()["param_groups"]] == [1, 1]

    # The next finite step is exactly the step the control run takes (the fused path is deterministic).
    for tensor, control_tensor, grad in zip(tensors, control_tensors, grads[3]):
        tensor.grad, control_tensor.grad = grad.to(DEVICE, copy=True), grad.to(DEVICE, copy=True)
    optimizer.step()
    control.step()
    assert all(torch.equal(a, b) for a, b in zip(tensors, control_tensors))
    _assert_state_equal(optimizer.state_dict()["state"], control.state_dict()["state"])
    assert optimizer.param_groups[1]["nonfinite_skips"] == 1


@fused_device
@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_cached_step_plan_follows_replaced_tensors(name):
    """Steps reuse a cached plan (tables of addresses); replacing state, gradients or parameters must not be missed."""
    params, grads = make_problem(steps=6)
    grads[4][3] = None
    tensors, optimizer = build(name, "default", params, DEVICE, torch.float32, True)
    control_tensors, control = build(name, "default", params, DEVICE, torch.float32, False)
    run(tensors, optimizer, grads[:3], torch.float32)
    run(control_tensors, control, grads[:3], torch.float32)
    assert optimizer.__dict__.get("_fused_plan") is not None
    key = "exp_avg" if name == "lamb" else "momentum_buffer"
    for tensor in tensors:  # replaced by hand: new addresses
        optimizer.state[tensor][key] = optimizer.state[tensor][key].clone()
    with torch.no_grad():
        tensors[0].data = tensors[0].data.clone()
    run(tensors, optimizer, grads[3:], torch.float32, first_step=3)
    run(control_tensors, control, grads[3:], torch.float32, first_step=3)
    assert_close_runs((control_tensors, control), (tensors, optimizer), torch.float32)


@fused_device
@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_skipped_first_step_creates_no_state(name):
    weight = torch.ones(3, device=DEVICE, requires_grad=True)
    optimizer = OPTIMIZERS[name][0]([weight], fused=True)
    weight.grad = torch.tensor([1.0, float("nan"), 0.0], device=DEVICE)
    optimizer.step()
    assert len([s for s in optimizer.state.values() if s]) == 0
    assert torch.equal(weight, torch.ones(3, device=DEVICE))
    assert optimizer.param_groups[0]["nonfinite_skips"] == 1
    weight.grad = torch.tensor([1.0, -2.0, 0.5], device=DEVICE)
    optimizer.step()
    assert not torch.equal(weight, torch.ones(3, device=DEVICE))


@fused_device
@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_nonfinite_error_raises_and_leaves_no_state(name):
    params, grads = make_problem(steps=1)
    tensors, optimizer = build(name, "default", params, DEVICE, torch.float32, True, nonfinite="error")
    for tensor, grad in zip(tensors, grads[0]):
        tensor.grad = torch.full_like(tensor, float("inf"))
    tensors[0].grad = torch.zeros_like(tensors[0])
    expected = f"{name.capitalize()}: {len(tensors) - 1} parameter\\(s\\) have non-finite"
    with pytest.raises(FloatingPointError, match=expected):
        optimizer.step()
    assert len([s for s in optimizer.state.values() if s]) == 0


@fused_device
@pytest.mark.parametrize("name", ["lamb", "lars"])
@pytest.mark.parametrize("direction", ["fused_to_foreach", "foreach_to_fused"])
def test_state_dict_round_trip_across_paths(name, direction, tmp_path):
    params, grads = make_problem(steps=5)
    option = "decoupled_pre_norm" if name == "lamb" else "nesterov_clip"
    first_fused, second_fused = (True, False) if direction == "fused_to_foreach" else (False, True)

    reference_tensors, reference = build(name, option, params, DEVICE, torch.float32, first_fused)
    run(reference_tensors, reference, grads, torch.float32)

    tensors, optimizer = build(name, option, params, DEVICE, torch.float32, first_fused)
    run(tensors, optimizer, grads[:3], torch.float32)
    torch.save({"params": [t.detach() for t in tensors], "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")

    checkpoint = torch.load(tmp_path / "ckpt.pt")
    resumed_tensors, resumed = build(name, option, params, DEVICE, torch.float32, second_fused)
    with torch.no_grad():
        for tensor, saved in zip(resumed_tensors, checkpoint["params"]):
            tensor.copy_(saved)
    resumed.load_state_dict(checkpoint["optimizer"])
    for group in resumed.param_groups:  # the schedule's lr at step 3 is set by run() from the base lr
        group["lr"] = group["lr"] / (1.0 - 0.1 * 2)
    run(resumed_tensors, resumed, grads[3:], torch.float32, first_step=3)
    if name == "lamb":
        step = resumed.state[resumed_tensors[0]]["step"]
        assert step.device.type == (DEVICE if second_fused else "cpu") and step.item() == 5
    assert_close_runs((reference_tensors, reference), (resumed_tensors, resumed), torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Everywhere (CPU CI): the choice of path


@pytest.mark.skipif(INTERPRETING, reason="the interpreter runs the fused path on CPU tensors")
@pytest.mark.parametrize("cls", [Lamb, Lars])
def test_fused_true_on_cpu_raises_a_clear_error(cls):
    weight = torch.zeros(2, requires_grad=True)
    with pytest.raises(RuntimeError, match=rf"{cls.__name__}\(fused=True\) cannot run: .*(on cpu|triton)"):
        cls([weight], fused=True)


@pytest.mark.parametrize("cls", [Lamb, Lars])
def test_fused_none_on_cpu_falls_back_to_foreach(cls):
    params, grads = make_problem(steps=3)
    name = cls.__name__.lower()
    runs = []
    for fused in (None, False):
        tensors, optimizer = build(name, "default", params, "cpu", torch.float32, fused)
        run(tensors, optimizer, grads, torch.float32)
        runs.append((tensors, optimizer))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    if cls is Lamb:
        assert runs[0][1].state[runs[0][0][0]]["step"].device.type == "cpu"


@pytest.mark.parametrize("cls", [Lamb, Lars])
def test_invalid_fused_values_raise(cls):
    weight = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="invalid fused="):
        cls([weight], fused="yes")
    with pytest.raises(ValueError, match="invalid fused=True; fused=True and foreach=True exclude each other"):
        cls([weight], fused=True, foreach=True)


def test_module_imports_and_falls_back_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from hf_colossal.optim import Lamb, _triton\n"
        "assert not _triton.is_available()\n"
        "assert 'triton' in _triton.unsupported_reason([torch.zeros(2)])\n"
        "w = torch.ones(3, requires_grad=True); opt = Lamb([w], lr=0.1); w.grad = torch.ones(3); opt.step()\n"
        "assert opt.state[w]['step'].device.type == 'cpu' and not torch.equal(w, torch.ones(3))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_skip_counter_groups_behave_like_dicts():
    weight = torch.ones(2, requires_grad=True)
    optimizer = Lamb([weight])
    group = optimizer.param_groups[0]
    assert isinstance(group, dict) and group["nonfinite_skips"] == 0
    weight.grad = torch.tensor([float("nan"), 1.0])
    optimizer.step()
    assert group["nonfinite_skips"] == 1 and group.get("nonfinite_skips") == 1
    assert dict(optimizer.state_dict()["param_groups"][0])["nonfinite_skips"] == 1
    saved = optimizer.state_dict()
    saved["param_groups"][0]["fused"] = True  # as saved by a fused GPU run
    restored = Lamb([torch.ones(2, requires_grad=True)], fused=False)
    restored.load_state_dict(saved)
    assert restored.param_groups[0]["nonfinite_skips"] == 1 and restored.param_groups[0]["fused"] is False
    assert type(restored.param_groups[0]).__name__ == "ParamGroup"
    del saved["param_groups"][0]["fused"]  # a checkpoint from before the fused path existed
    restored = Lamb([torch.ones(2, requires_grad=True)])
    restored.load_state_dict(saved)
    assert restored.param_groups[0]["fused"] is None and restored.param_groups[0]["nonfinite_skips"] == 1


@fused_device
@pytest.mark.parametrize("grafting, beta1", [("adam", 0.9), ("rmsprop", 0.3), ("adagrad", 0.0)])
@pytest.mark.parametrize("direction, norms", [(True, True), (False, True), (True, False)])
def test_stacked_moments_match_the_foreach_path_on_the_cpu(grafting, beta1, direction, norms):
    """Shampoo's and SOAP's fused moment pass (``_triton.stacked_moments``) against the CPU foreach path of
    ``grafting_moments``, on stacks whose blocks end in a partial chunk."""
    from hf_colossal.optim.shampoo import grafting_moments

    generator = torch.Generator().manual_seed(0)
    shape = (3, 70, _triton.MOMENTS_BLOCK * _triton.MOMENTS_ITERS // 70 + 9)
    grads, exp_avgs = (torch.randn(shape, generator=generator) for _ in range(2))
    exp_avg_sqs = torch.rand(shape, generator=generator)
    settings = dict(grafting=grafting, beta1=beta1, beta2=0.99, bias_correction2=0.3, eps=1e-8,
                    direction=direction, norms=norms)
    on_device = [t.to(DEVICE, copy=True) for t in (grads, exp_avgs, exp_avg_sqs)]
    assert _triton.stacked_moments_supported(*on_device)
    fused = grafting_moments(*on_device, **settings)
    expected = grafting_moments(grads, exp_avgs, exp_avg_sqs, **settings)  # CPU: the foreach path
    for got, want in [*zip(on_device[1:], (exp_avgs, exp_avg_sqs)), *zip(fused, expected)]:
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
