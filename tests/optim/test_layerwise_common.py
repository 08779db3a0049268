"""Behaviour Lamb and Lars share: a skipped first step, bit-exact resume, closures, peft's LoRA+ factory."""

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


def _optimizer(name, model):
    cls, options = CASES[name][:2]
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return cls([{"params": weights}, {"params": biases, "adapt": False, "weight_decay": 0.0}], **options)


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_resume_from_state_dict_is_bit_exact(name, dtype, tmp_path):
    inputs, targets = torch.randn(16, 4, dtype=dtype), torch.randn(16, 2, dtype=dtype)
    model = _model(dtype)
    initial = copy.deepcopy(model.state_dict())
    optimizer = _optimizer(name, model)
    _train(model, optimizer, inputs, targets, 10)

    first = _model(dtype)
    first.load_state_dict(initial)
    first_optimizer = _optimizer(name, first)
    _train(first, first_optimizer, inputs, targets, 5)
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict()}, tmp_path / "ckpt.pt")

    resumed = _model(dtype)  # fresh weights, replaced by the checkpoint
    checkpoint = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = _optimizer(name, resumed)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    assert resumed_optimizer.state[resumed[0].weight][CASES[name][2]].dtype == torch.float32
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
