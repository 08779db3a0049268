"""optim="kfac" in the stock Trainer: built with the model through Trainer's factory route, trains MiniLM on BBC
articles, takes no statistics in evaluation, resumes from a checkpoint exactly (hooks on the new model)."""

import math

import pytest
import torch
from transformers import TrainingArguments

from hf_colossal.config import OptionsError
from hf_colossal.integrations.transformers import optimizer_cls_and_kwargs
from hf_colossal.optim import Kfac
from hf_colossal.registry import get_optimizer_spec

from .trainers import make_trainer


def test_bad_kfac_optim_args_name_the_valid_keys():
    with pytest.raises(OptionsError, match=r"(?s)unknown option 'dampng'.*damping \(float.*factor_interval \(int"):
        TrainingArguments("out", optim="kfac", optim_args="dampng=0.01", report_to="none")
    with pytest.raises(OptionsError, match="'weight_decay' is set by --weight_decay"):
        TrainingArguments("out", optim="kfac", optim_args="weight_decay=0.1", report_to="none")
    args = TrainingArguments("out", optim="kfac", report_to="none")
    with pytest.raises(ValueError, match="needs the model"):
        optimizer_cls_and_kwargs(get_optimizer_spec("kfac"), args, None)


def test_trainer_trains_with_kfac_resumes_exactly_and_evaluation_takes_no_statistics(tmp_path, tokenized,
                                                                                     minilm_path, one_thread):
    common = dict(optim="kfac", optim_args="factor_interval=2,inverse_interval=2", learning_rate=1e-4, max_steps=4,
                  save_strategy="steps", save_steps=2, lr_scheduler_type="linear")
    straight = make_trainer(tmp_path / "a", tokenized, minilm_path, **common)
    straight.train()
    opt = straight.optimizer.optimizer
    assert type(opt) is Kfac
    names = {layer.name for layer in opt.layers}
    assert {"bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.5.output.dense", "classifier",
            "bert.embeddings.word_embeddings"} <= names
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(straight.model.classifier.bias)] == 0.0 and decay[id(straight.model.classifier.weight)] == 0.01
    losses = [e["loss"] for e in straight.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))

    resumed = make_trainer(tmp_path / "b", tokenized, minilm_path, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name

    # (Trainer's evaluation draws from the global RNG, which changes later dropout masks for any optimizer, so
    # evaluating mid-run is checked here at the hooks, and end to end in tests/optim/test_kfac.py.)
    opt = resumed.optimizer.optimizer
    assert opt.collecting
    resumed.evaluate()
    assert all(layer.input_sum is None and layer.output_grad_sum is None for layer in opt.layers)


def test_trainer_adapts_the_damping_from_replayed_batches(tmp_path, tokenized, minilm_path, one_thread):
    """Trainer gives no closure: the optimizer replays the last training batch (its loss is the model's output)."""
    trainer = make_trainer(tmp_path, tokenized, minilm_path, optim="kfac", learning_rate=1e-4, max_steps=2,
                           gradient_accumulation_steps=2, optim_args="damping_adaptation=levenberg_marquardt,"
                           "adaptation_interval=1,factor_interval=1,inverse_interval=1")
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert opt.reduction_ratio is not None and math.isfinite(opt.reduction_ratio)
    assert opt.damping != 1e-3
    assert trainer.optimizer.state_dict()["kfac"]["damping"] == opt.damping
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[-1]["kfac_damping"] == opt.damping and logged[-1]["kfac_rho"] == opt.reduction_ratio
