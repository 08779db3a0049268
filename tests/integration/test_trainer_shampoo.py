"""optim="shampoo" and optim="soap" in the stock Trainer (MiniLM on BBC articles), and their optim_args errors."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, TrainingArguments

from hf_colossal import OptionsError
from hf_colossal.optim import Shampoo, Soap

from .trainers import make_trainer


@pytest.mark.parametrize(
    ("optim", "optim_args", "cls"),
    [
        ("shampoo", "max_preconditioner_dim=128,precondition_frequency=2,grafting=rmsprop", Shampoo),
        ("soap", "max_preconditioner_dim=128,precondition_frequency=2", Soap),
    ],
)
def test_trainer_trains_with_our_second_order_optimizers(tmp_path, tokenized, minilm_path, optim, optim_args, cls):
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=5)
    for name, param in model.named_parameters():  # the last layer and the head: a CPU-sized preconditioner load
        param.requires_grad = "layer.5." in name or "classifier" in name or "pooler" in name
    trainer = make_trainer(tmp_path, tokenized, minilm_path, model=model, optim=optim, optim_args=optim_args,
                           max_steps=3, learning_rate=1e-3, adam_beta2=0.95, adam_epsilon=1e-7)
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert type(optimizer) is cls
    for group in optimizer.param_groups:
        assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-7 and group["max_preconditioner_dim"] == 128
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.0, 0.01}
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in optimizer.state} == trainable


def test_bad_optim_args_list_the_valid_keys():
    with pytest.raises(OptionsError, match=r"unknown option 'graftng'(.|\n)*grafting \('adam' \| 'adagrad'"):
        TrainingArguments("out", optim="shampoo", optim_args="graftng=adam", report_to="none")
    with pytest.raises(OptionsError, match=r"'eps' is set by --adam_epsilon"):
        TrainingArguments("out", optim="soap", optim_args="eps=1e-6", report_to="none")
    with pytest.raises(OptionsError, match=r"eigenbasis_update' must be 'qr' \| 'eigh'"):
        TrainingArguments("out", optim="soap", optim_args="eigenbasis_update=svd", report_to="none")
