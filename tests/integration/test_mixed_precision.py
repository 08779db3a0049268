"""LAMB and LARS under mixed precision: Trainer with --bf16 (and --fp16 on CUDA, where accelerate adds a
GradScaler; on the CPU accelerate has no fp16), and a plain fp16-autocast loop with torch's GradScaler on the CPU.

* The optimizer sees unscaled gradients: the per-layer gradient norms it received add up to Trainer's (unscaled)
  ``grad_norm``, and LARS's recorded trust ratio equals eta ||w|| / (||g|| + wd ||w|| + eps) from those norms — a
  ratio computed on fp16 loss-scaled gradients would be 2**16 times smaller.
* A step whose gradients hold a NaN is skipped: parameters and optimizer state are bit-identical afterwards, and
  the skip is counted (by our optimizer, or by the GradScaler, which then never calls it).
"""

import copy
import math

import pytest
import torch
from transformers import TrainerCallback

from hf_colossal.callbacks import LayerStatsCallback
from hf_colossal.registry import build_optimizer

from .trainers import make_trainer

PRECISIONS = {
    "bf16": dict(bf16=True),
    "fp16": pytest.param(dict(fp16=True), marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")),
}
OPTIMIZERS = {"lamb": dict(optim="lamb", learning_rate=2e-3),
              "lars": dict(optim="lars", learning_rate=0.1, optim_args="trust_coefficient=0.02,eps=1e-8")}
WEIGHT = "bert.encoder.layer.1.output.dense.weight"


class PoisonOneStep(TrainerCallback):
    """At the second optimizer step, put a NaN into one gradient and check the step changed nothing."""

    def __init__(self):
        self.checked = False

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step != 1:
            return
        inner = optimizer.optimizer
        self.before = ({n: p.detach().clone() for n, p in model.named_parameters()},
                       copy.deepcopy(inner.state_dict()["state"]))
        model.get_parameter(WEIGHT).grad[0, 0] = float("nan")

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step != 1:
            return
        params, opt_state = self.before
        for name, param in model.named_parameters():
            assert torch.equal(param.detach(), params[name]), name
        assert_same_state(optimizer.optimizer.state_dict()["state"], opt_state)
        self.checked = True


def assert_same_state(after, before):
    assert after.keys() == before.keys()
    for index in after:
        assert after[index].keys() == before[index].keys()
        for key, value in after[index].items():
            assert torch.equal(value, before[index][key]), (index, key)


@pytest.mark.parametrize("precision", list(PRECISIONS.values()), ids=list(PRECISIONS))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_trainer_unscaled_gradients_and_skipped_nonfinite_step(tmp_path, tokenized, minilm_path, name, precision):
    poison = PoisonOneStep()
    trainer = make_trainer(tmp_path, tokenized, minilm_path, max_steps=4, logging_steps=1, max_grad_norm=1e9,
                           weight_decay=0.01, use_cpu=not torch.cuda.is_available(), **OPTIMIZERS[name], **precision)
    trainer.add_callback(LayerStatsCallback())
    trainer.add_callback(poison)
    trainer.train()
    assert (trainer.accelerator.scaler is not None) == bool(precision.get("fp16"))  # fp16 runs under a GradScaler
    assert poison.checked
    assert trainer.optimizer.optimizer.param_groups[0]["nonfinite_skips"] == 1

    logs = [h for h in trainer.state.log_history if "loss" in h and h["step"] != 2]  # step 2 had the NaN
    assert len(logs) == 3
    for entry in logs:
        grad_norms = [v for k, v in entry.items() if k.endswith("/grad_norm") and "summary" not in k]
        assert math.sqrt(sum(g * g for g in grad_norms)) == pytest.approx(entry["grad_norm"], rel=1e-3)
        if name == "lars":
            weight, grad = entry[f"layers/{WEIGHT}/param_norm"], entry[f"layers/{WEIGHT}/grad_norm"]
            expected = 0.02 * weight / (grad + 0.01 * weight + 1e-8)
            assert entry[f"layers/{WEIGHT}/trust_ratio"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_grad_scaler_fp16_on_cpu(name):
    """torch.amp.GradScaler("cpu") with fp16 autocast: scaler.step unscales before our step (LARS's ratio is the
    one of the unscaled gradient), and an overflowing step is skipped by the scaler without touching our state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    options = {"lamb": "", "lars": "trust_coefficient=0.02,eps=1e-8"}[name]
    optimizer = build_optimizer(name, model, lr=0.1, weight_decay=0.01, options=options)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    inputs, targets = torch.randn(32, 16), torch.randint(0, 4, (32,))
    weight = model[0].weight
    for step in range(4):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(inputs).float(), targets)
        scaler.scale(loss).backward()
        before = ({n: p.detach().clone() for n, p in model.named_parameters()},
                  copy.deepcopy(optimizer.state_dict()["state"]))
        if step == 2:
            weight.grad[0, 0] = float("inf")
        optimizer.record_trust_ratios()
        scaler.step(optimizer)  # unscales in place, then steps unless a gradient is inf/NaN
        scaler.update()
        ratios = optimizer.take_trust_ratios()
        if step == 2:
            assert ratios == {} and scaler.get_scale() == 2.0**15  # skipped by the scaler, scale halved
            assert all(torch.equal(p.detach(), before[0][n]) for n, p in model.named_parameters())
            assert_same_state(optimizer.state_dict()["state"], before[1])
            continue
        if name == "lars":
            w0, g = before[0]["0.weight"].norm(), weight.grad.norm()  # weight.grad: unscaled by the scaler
            torch.testing.assert_close(ratios[weight], 0.02 * w0 / (g + 0.01 * w0 + 1e-8))
        assert weight.grad.norm() < 100  # unscaled (the scaled gradient is ~2**16 larger)
    assert optimizer.param_groups[0]["nonfinite_skips"] == 0
