"""hf_colossal optimizers inside the stock Trainer, in-process: arguments, groups, resume, PEFT, subclasses."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, HfArgumentParser, Trainer, TrainingArguments

from hf_colossal import Lamb, Lars
from hf_colossal.config import OptionsError
from hf_colossal.integrations.transformers import validate_training_arguments

from .trainers import make_trainer


def test_arguments_accept_our_names_and_record_plain_strings():
    args = TrainingArguments("out", optim="lamb", optim_args="max_trust_ratio=10", report_to="none")
    assert args.optim == "lamb"
    assert json.loads(args.to_json_string())["optim"] == "lamb"
    parser = HfArgumentParser(TrainingArguments)
    (parsed,) = parser.parse_args_into_dataclasses(["--output_dir", "o", "--optim", "lars", "--report_to", "none"])
    assert parsed.optim == "lars"
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", "o", "--optim", "lamb_typo"])
    with pytest.raises(ValueError, match="lamb"):  # transformers' own error lists our names too
        TrainingArguments("out", optim="lamb_typo")


def test_bad_optim_args_fail_when_the_arguments_are_built():
    with pytest.raises(OptionsError, match=r"unknown option 'trust_clipp'(.|\n)*trust_clip \(bool"):
        TrainingArguments("out", optim="lars", optim_args="trust_clipp=true", report_to="none")
    with pytest.raises(OptionsError, match="'lr' is set by --learning_rate"):
        TrainingArguments("out", optim="lamb", optim_args="lr=1", report_to="none")
    with pytest.raises(OptionsError, match="lr"):
        TrainingArguments("out", optim="lamb", learning_rate=-1.0, report_to="none")


def test_deepspeed_and_fsdp_are_refused_with_the_reason(monkeypatch):
    args = TrainingArguments("out", optim="lamb", report_to="none")
    args.deepspeed = "ds_config.json"
    with pytest.raises(OptionsError, match="does not work under DeepSpeed: DeepSpeed ZeRO and FSDP1 hand the optimizer flat"):
        validate_training_arguments(args)
    args.deepspeed = None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(OptionsError, match=r"does not work under FSDP1 .* or under FSDP2 \(fsdp_config version 2\)"):
        validate_training_arguments(args)
    monkeypatch.setenv("FSDP_VERSION", "2")
    validate_training_arguments(args)  # FSDP2: whole-parameter norms across shards
    args.optim = "kfac"
    with pytest.raises(OptionsError, match="optim='kfac' does not work under FSDP2: K-FAC hooks each layer"):
        validate_training_arguments(args)


def test_fp16_loss_scaling_is_refused_for_kfac_with_the_alternatives(monkeypatch):
    """K-FAC's statistics come from the scaled backward pass: --fp16 (a GradScaler) is refused, naming bf16 and the
    optimizers that work under it. (fp16=True itself needs a GPU to build the arguments, so the launcher's
    setting stands in for it.)"""
    TrainingArguments("out", optim="kfac", report_to="none")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # as `accelerate launch --mixed_precision fp16` sets
    with pytest.raises(OptionsError, match=r"optim='kfac' does not work under --fp16(.|\n)*use --bf16 or fp32"
                                           r"(.|\n)*Optimizers that do: .*lamb"):
        TrainingArguments("out", optim="kfac", report_to="none")
    TrainingArguments("out", optim="lamb", report_to="none")
    # --bf16 overrides the launcher's fp16 (Trainer builds its Accelerator from args.mixed_precision): no refusal
    assert TrainingArguments("out", optim="kfac", bf16=True, use_cpu=True, report_to="none").mixed_precision == "bf16"


def test_trainer_builds_lamb_with_policy_groups_and_hf_hyperparameters(tmp_path, tokenized, minilm_path):
    trainer = make_trainer(tmp_path, tokenized, minilm_path, optim="lamb", optim_args="max_trust_ratio=10",
                           adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-6)
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert type(opt) is Lamb
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for group in opt.param_groups:
        assert group["betas"] == (0.8, 0.99) and group["eps"] == 1e-6 and group["max_trust_ratio"] == 10
        for p in group["params"]:
            excluded = names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)]
            assert group["adapt"] is (not excluded)
            assert group["weight_decay"] == (0.0 if excluded else 0.01)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


RESUME_CASES = {
    "lars": (Lars, dict(optim="lars", optim_args="momentum=0.9,trust_clip=true", learning_rate=0.5), torch.float32),
    # a model held in bf16, its fp32 master weights in the optimizer state
    "lamb-bf16-master": (Lamb, dict(optim="lamb", optim_args="master_weights=true", learning_rate=2e-3),
                         torch.bfloat16),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_from_checkpoint_continues_the_run_exactly(tmp_path, tokenized, minilm_path, case):
    cls, options, dtype = RESUME_CASES[case]
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, lr_scheduler_type="linear", **options)
    trainers = []
    for run in ("a", "b"):
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=5).to(dtype)
        trainers.append(make_trainer(tmp_path / run, tokenized, minilm_path, model=model, **common))
    straight, resumed = trainers
    straight.train()
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert a.dtype == dtype and torch.equal(a, b), name
    assert type(resumed.optimizer.optimizer) is cls
    straight_state = straight.optimizer.optimizer.state_dict()["state"]
    resumed_state = resumed.optimizer.optimizer.state_dict()["state"]
    assert straight_state.keys() == resumed_state.keys()
    for index, entries in straight_state.items():
        assert entries.keys() == resumed_state[index].keys()
        assert ("master_param" in entries) == (dtype != torch.float32)
        for key, value in entries.items():
            assert torch.equal(value, resumed_state[index][key]), (index, key)


def test_peft_lora_optimizes_only_adapters(tmp_path, tokenized, minilm_path):
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=5)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    trainer = make_trainer(tmp_path, tokenized, minilm_path, model=model, optim="lamb")
    trainer.train()
    optimized = {id(p) for g in trainer.optimizer.optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert optimized == trainable and len(trainable) < len(list(model.parameters())) / 4
    plus = create_loraplus_optimizer(model=model, optimizer_cls=Lamb, lr=1e-3, loraplus_lr_ratio=16)
    assert type(plus) is Lamb and 1e-3 * 16 in {g["lr"] for g in plus.param_groups}  # LoRA B at lr * ratio


@dataclasses.dataclass
class _TrlStyleConfig(TrainingArguments):
    """Like TRL's configs: a TrainingArguments subclass with its own fields and __post_init__."""

    completion_only: bool = False

    def __post_init__(self):
        self.completion_only = bool(self.completion_only)
        super().__post_init__()


class _TrlStyleTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)


def test_trainer_and_argument_subclasses(tmp_path, tokenized, minilm_path):
    with pytest.raises(OptionsError, match="unknown option"):
        _TrlStyleConfig("out", optim="lamb", optim_args="nope=1", report_to="none")
    trainer = make_trainer(tmp_path, tokenized, minilm_path, trainer_cls=_TrlStyleTrainer,
                           args_cls=_TrlStyleConfig, optim="lars", max_steps=2, learning_rate=0.1)
    trainer.train()
    assert type(trainer.optimizer.optimizer) is Lars
