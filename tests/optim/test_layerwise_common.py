"""Behaviour Lamb and Lars share: a skipped first step, bit-exact resume, fp32 master weights, closures, peft's
LoRA+ factory."""

import copy

import pytest
import torch

from hf_colossal.optim import Lamb, Lars

from .helpers import assert_state_equal

# class, constructor options for a two-group model, a state key that must stay fp32, LoRA+ options and lrs
CASES = {
    "lamb": (Lamb, dict(lr=1e-2, weight_decay=0.01, max_trust_ratio=5.0, grad_pre_normalization=True), "exp_avg",
             dict(lr=1e-3, loraplus_lr_ratio=16.0, weight_decay=0.01, max_trust_ratio=10.0), [1e-3, 16e-3]),
    "lars": (Lars, dict(lr=0.5, weight_decay=1e-3, nesterov=True, trust_clip=True), "momentum_buffer",
             dict(lr=0.1, loraplus_lr_ratio=4.0, momentum=0.9, trust_clip=True), [0.1, 0.4]),
}


def _model(dtype):
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(dtype)


def _optimizer(name, model, **extra):
    cls, options = CASES[name][:2]
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return cls([{"params": weights}, {"params": biases, "adapt": False, "weight_decay": 0.0}], **options, **extra)


def _train(model, optimizer, inputs, targets, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


@pytest.mark.parametrize("name", sorted(CASES))
def test_nonfinite_skip_on_first_step_creates_no_state(name):
    weight = torch.ones(3, requires_grad=True)
    optimizer = CASES[name][0]([weight])
    weight.grad = torch.tensor([1.0, float("nan"), 0.0])
    optimizer.step()
    assert len(optimizer.state) == 0
    assert torch.equal(weight, torch.ones(3))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize(
    ("dtype", "master_weights"),
    [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
    ids=["fp32", "bf16", "bf16-master"],
)
def test_resume_from_state_dict_is_bit_exact(name, dtype, master_weights, tmp_path):
    inputs, targets = torch.randn(16, 4, dtype=dtype), torch.randn(16, 2, dtype=dtype)
    model = _model(dtype)
    initial = copy.deepcopy(model.state_dict())
    optimizer = _optimizer(name, model, master_weights=master_weights)
    _train(model, optimizer, inputs, targets, 10)

    first = _model(dtype)
    first.load_state_dict(initial)
    first_optimizer = _optimizer(name, first, master_weights=master_weights)
    _train(first, first_optimizer, inputs, targets, 5)
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict()}, tmp_path / "ckpt.pt")

    resumed = _model(dtype)  # fresh weights, replaced by the checkpoint
    checkpoint = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = _optimizer(name, resumed, master_weights=master_weights)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    assert resumed_optimizer.state[resumed[0].weight][CASES[name][2]].dtype == torch.float32
    if master_weights:
        assert resumed_optimizer.state[resumed[0].weight]["master_param"].dtype == torch.float32
    _train(resumed, resumed_optimizer, inputs, targets, 5)

    for original, restored in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(original, restored)
    assert_state_equal(resumed_optimizer.state_dict()["state"], optimizer.state_dict()["state"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_closure_is_evaluated_with_grad_enabled(name):
    model = _model(torch.float32)
    optimizer = _optimizer(name, model)
    inputs, targets = torch.randn(8, 4), torch.randn(8, 2)
    before = model[0].weight.detach().clone()

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert not torch.equal(model[0].weight, before)


@pytest.mark.parametrize("name", sorted(CASES))
def test_works_with_peft_loraplus(name):
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    cls, _, _, loraplus, lrs = CASES[name]
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "2"]))
    optimizer = create_loraplus_optimizer(model, cls, **loraplus)
    assert isinstance(optimizer, cls)
    assert sorted({group["lr"] for group in optimizer.param_groups if group["params"]}) == lrs
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    before = [p.detach().clone() for p in lora_b]
    model(torch.randn(4, 8)).pow(2).sum().backward()
    optimizer.step()
    assert any(not torch.equal(p, b) for p, b in zip(lora_b, before))



@pytest.mark.parametrize("name", sorted(CASES))
def test_recorded_trust_ratios_are_the_ones_applied(name):
    """First step from zero state: LAMB's update is g / (|g| + eps) (Alg. 2 with m_hat = g, v_hat = g^2), its ratio
    ||x|| / ||u||; LARS's local lr is eta ||x|| / (||g|| + wd ||x|| + eps) (eq. 6). Both move x by lr * ratio * u.
    The bias group does not adapt and is not recorded."""
    weight, bias = torch.randn(6, 5, requires_grad=True), torch.randn(6, requires_grad=True)
    weight.grad, bias.grad = torch.randn(6, 5), torch.randn(6)
    initial, grad = weight.detach().clone(), weight.grad.clone()
    if name == "lamb":
        optimizer = Lamb([{"params": [weight]}, {"params": [bias], "adapt": False}], lr=0.1, eps=1e-6)
        update = grad / (grad.abs() + 1e-6)
        expected = initial.norm() / update.norm()
    else:
        optimizer = Lars([{"params": [weight]}, {"params": [bias], "adapt": False}], lr=0.1, weight_decay=1e-3,
                         trust_coefficient=0.02, eps=1e-8)
        update = grad + 1e-3 * initial
        expected = 0.02 * initial.norm() / (grad.norm() + 1e-3 * initial.norm() + 1e-8)
    optimizer.record_trust_ratios()
    optimizer.step()
    ratios = optimizer.take_trust_ratios()
    assert list(ratios) == [weight]
    torch.testing.assert_close(ratios[weight], expected)
    torch.testing.assert_close(weight.detach(), initial - 0.1 * expected * update)


def _bf16_gradients(shapes, steps, seed=0):
    """Gradients drawn in bf16: fp32, bf16 and fp16 (|g| < 8) hold them exactly, so runs in any of them see the same."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator).bfloat16() for shape in shapes] for _ in range(steps)]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_master_weights_follow_the_fp32_run(name, dtype):
    """With master weights, low-precision parameters take the fp32 trajectory (their masters equal the fp32 run's
    parameters bit for bit) and hold it rounded; without them the run drifts from it."""
    cls, options = CASES[name][:2]
    shapes = [(8, 4), (8,)]
    start = [torch.randn(shape).to(dtype).float() for shape in shapes]  # representable in dtype
    runs = {}
    for label, run_dtype, master_weights in (("fp32", torch.float32, False), ("master", dtype, True),
                                             ("plain", dtype, False)):
        params = [torch.nn.Parameter(p.to(run_dtype, copy=True)) for p in start]
        optimizer = cls([{"params": params[:1]}, {"params": params[1:], "adapt": False}], **options,
                        master_weights=master_weights)
        for grads in _bf16_gradients(shapes, steps=6):
            for param, grad in zip(params, grads):
                param.grad = grad.to(run_dtype)
            optimizer.step()
        runs[label] = (params, optimizer)
    fp32_params, _ = runs["fp32"]
    master_params, master_optimizer = runs["master"]
    for reference, param in zip(fp32_params, master_params):
        master = master_optimizer.state[param]["master_param"]
        assert master.dtype == torch.float32 and param.dtype == dtype
        assert torch.equal(master, reference)
        assert torch.equal(param, master.to(dtype))
    assert not torch.equal(runs["plain"][0][0].float(), fp32_params[0])
    assert "master_param" not in runs["fp32"][1].state[fp32_params[0]]  # fp32 parameters need no copy


@pytest.mark.parametrize("name", sorted(CASES))
def test_master_weights_keep_updates_smaller_than_the_rounding(name):
    """Updates below half a bf16 ulp vanish in a bf16 parameter but add up in its master copy."""
    cls = CASES[name][0]
    moved = {}
    for master_weights in (False, True):
        weight = torch.nn.Parameter(torch.full((16,), 1.0, dtype=torch.bfloat16))
        # LAMB's update is lr * ratio * u with ratio ||x|| / ||u||: 1e-4 relative per step (bf16 ulp at 1: 2^-7)
        optimizer = cls([weight], lr=1e-4 if name == "lamb" else 1e-2, master_weights=master_weights,
                        **({"momentum": 0.0, "trust_coefficient": 0.01} if name == "lars" else {}))
        for _ in range(200):
            weight.grad = torch.ones_like(weight)
            optimizer.step()
        moved[master_weights] = (1.0 - weight.float()).abs().max().item()
    assert moved[False] == 0.0
    assert moved[True] >= 2**-8


@pytest.mark.parametrize("name", sorted(CASES))
def test_master_weights_start_from_a_checkpoint_without_them_and_leave_with_the_option(name):
    model = _model(torch.bfloat16)
    inputs, targets = torch.randn(16, 4, dtype=torch.bfloat16), torch.randn(16, 2, dtype=torch.bfloat16)
    plain = _optimizer(name, model)
    _train(model, plain, inputs, targets, 2)
    with_masters = _optimizer(name, model, master_weights=True)
    checkpoint = plain.state_dict()
    for group in checkpoint["param_groups"]:
        del group["master_weights"]  # as saved before the option existed
    with_masters.load_state_dict(checkpoint)
    weight = model[0].weight
    before = weight.detach().float().clone()
    _train(model, with_masters, inputs, targets, 1)
    master = with_masters.state[weight]["master_param"]
    assert torch.equal(weight, master.bfloat16()) and not torch.equal(master, before)

    without = _optimizer(name, model)
    without.load_state_dict(with_masters.state_dict())
    _train(model, without, inputs, targets, 1)
    assert "master_param" not in without.state[weight]


@pytest.mark.parametrize("name", sorted(CASES))
def test_master_weights_must_be_a_bool(name):
    with pytest.raises(ValueError, match="master_weights"):
        CASES[name][0]([torch.nn.Parameter(torch.ones(2))], master_weights="yes")
