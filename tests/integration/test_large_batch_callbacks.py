"""LR scaling and warmup callbacks inside the real Trainer: logged lr == applied lr, resume continues exactly."""

import json

import pytest
import torch
from transformers import TrainerCallback

from hf_colossal.callbacks import LRScalingCallback, WarmupCallback
from hf_colossal.callbacks.large_batch import lr_scale_factor, warmup_multiplier

from .trainers import make_trainer


def logged_lrs(trainer):
    """(step, lr) as Trainer logs them: the lr the optimizer used for that step (scheduler index step - 1)."""
    return [(e["step"], e["learning_rate"]) for e in trainer.state.log_history if "learning_rate" in e]


def test_pure_rules():
    assert lr_scale_factor(64, 16, "linear") == 4 and lr_scale_factor(64, 16, "sqrt") == 2
    assert lr_scale_factor(64, 16, "none") == 1
    assert [warmup_multiplier(s, 4, "linear") for s in range(6)] == [0, 0.25, 0.5, 0.75, 1, 1]
    assert warmup_multiplier(0, 4, "gradual", start_factor=0.25) == 0.25
    assert warmup_multiplier(2, 4, "polynomial", power=2) == 0.25
    with pytest.raises(ValueError, match="valid rules: linear, sqrt, none"):
        lr_scale_factor(2, 1, "cubic")
    with pytest.raises(ValueError, match="valid shapes: linear, gradual, polynomial"):
        WarmupCallback(4, shape="cosine")


@pytest.mark.parametrize("rule, factor", [("linear", 4.0), ("sqrt", 2.0)])
def test_scaling_applies_once_and_logs_what_it_applies(tmp_path, tokenized, minilm_path, rule, factor):
    trainer = make_trainer(tmp_path, tokenized, minilm_path, optim="lamb", lr_scheduler_type="constant",
                           gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-3,
                           save_strategy="steps", save_steps=2, save_only_model=True)
    callback = LRScalingCallback(reference_batch_size=4, rule=rule)  # effective batch 8 x 2 x 1 = 16
    trainer.add_callback(callback)
    trainer.train()
    assert callback.effective_batch_size == 16 and callback.factor == factor
    assert all(lr == pytest.approx(1e-3 * factor) for _, lr in logged_lrs(trainer))
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([1e-3 * factor] * 2)
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["LRScalingCallback"]
    assert saved["attributes"]["factor"] == factor and saved["args"]["reference_batch_size"] == 4


@pytest.mark.parametrize("shape", ["linear", "polynomial"])
def test_warmup_shape_then_the_hf_schedule(tmp_path, tokenized, minilm_path, shape):
    trainer = make_trainer(tmp_path, tokenized, minilm_path, optim="lamb", lr_scheduler_type="linear",
                           max_steps=8, learning_rate=1e-3)
    trainer.add_callback(WarmupCallback(4, shape=shape))
    trainer.train()
    expected = [(k, 1e-3 * warmup_multiplier(k - 1, 4, shape) * (1 - (k - 1) / 8)) for k in range(1, 9)]
    assert logged_lrs(trainer) == [(k, pytest.approx(lr, abs=1e-12)) for k, lr in expected]
    assert trainer.lr_scheduler.get_last_lr() == [g["lr"] for g in trainer.optimizer.param_groups]


def test_gradual_warmup_starts_from_the_reference_rate(tmp_path, tokenized, minilm_path):
    trainer = make_trainer(tmp_path, tokenized, minilm_path, optim="lars", lr_scheduler_type="constant",
                           max_steps=4, learning_rate=0.1)
    trainer.add_callback(LRScalingCallback(reference_batch_size=2))  # x4
    trainer.add_callback(WarmupCallback(4, shape="gradual"))
    trainer.train()
    assert [lr for _, lr in logged_lrs(trainer)] == pytest.approx([0.4 * (0.25 + 0.75 * k / 4) for k in range(4)])


def test_clear_errors(tmp_path, tokenized, minilm_path):
    trainer = make_trainer(tmp_path, tokenized, minilm_path, optim="lamb", warmup_steps=2)
    trainer.add_callback(WarmupCallback(4))
    with pytest.raises(ValueError, match="set --warmup_steps 0"):
        trainer.train()
    trainer = make_trainer(tmp_path, tokenized, minilm_path, optim="lamb")
    trainer.add_callback(WarmupCallback(4, shape="gradual"))
    with pytest.raises(ValueError, match="pass start_factor, or put LRScalingCallback before it"):
        trainer.train()
    trainer = make_trainer(tmp_path, tokenized, minilm_path, optim="lamb", lr_scheduler_type="reduce_lr_on_plateau",
                           eval_strategy="steps", eval_steps=2)
    trainer.add_callback(LRScalingCallback(4))
    with pytest.raises(ValueError, match="needs a LambdaLR-based scheduler"):
        trainer.train()


def test_bad_sizes_fail_before_the_first_step(tmp_path, tokenized, minilm_path):
    trainer = make_trainer(tmp_path, tokenized, minilm_path, optim="lamb", max_steps=4)
    trainer.add_callback(WarmupCallback(5))
    with pytest.raises(ValueError, match=r"warmup_steps=5\) is longer than the whole run \(4 optimizer steps\)"):
        trainer.train()
    trainer = make_trainer(tmp_path, tokenized, minilm_path, optim="lamb")  # effective batch 8
    trainer.add_callback(LRScalingCallback(reference_batch_size=3))
    with pytest.raises(ValueError, match="effective batch 8 .* reference_batch_size 3: neither is a whole multiple"):
        trainer.train()
    assert trainer.state.global_step == 0


class ChangesAccumulation(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            args.gradient_accumulation_steps = 2


def test_a_batch_changed_mid_run_stops_training_loudly(tmp_path, tokenized, minilm_path):
    trainer = make_trainer(tmp_path, tokenized, minilm_path, optim="lamb")
    trainer.add_callback(LRScalingCallback(reference_batch_size=4))
    trainer.add_callback(ChangesAccumulation())
    with pytest.raises(RuntimeError, match=r"effective batch changed mid-run \(8 -> 16"):
        trainer.train()
    assert trainer.state.global_step == 2


def test_resume_continues_the_same_schedule_exactly(tmp_path, tokenized, minilm_path):
    def run(folder, **kw):
        trainer = make_trainer(folder, tokenized, minilm_path, optim="lamb", lr_scheduler_type="cosine",
                               max_steps=6, save_strategy="steps", save_steps=3, learning_rate=1e-3)
        trainer.add_callback(LRScalingCallback(reference_batch_size=2))
        trainer.add_callback(WarmupCallback(4, shape="gradual"))
        trainer.train(**kw)
        return trainer

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert logged_lrs(resumed) == logged_lrs(straight)  # steps 1-3 come from the checkpoint's trainer_state
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
