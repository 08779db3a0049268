"""optim="hessian_free" through TrainingArguments: the stock Trainer refuses it with what to use instead; the
HessianFreeTrainer trains Martens' autoencoder on real digits, logs its statistics and resumes exactly, and steps
MiniLM on BBC articles, whose Gauss-Newton products equal forward mode's; unsupported settings and losses fail with
the reason."""

import datasets
import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_colossal.config import OptionsError
from hf_colossal.integrations.transformers import HessianFreeTrainer, HessianFreeTrainerMixin, hessian_free_loss_kind
from hf_colossal.nn.autoencoder import DeepAutoencoder
from hf_colossal.optim import HessianFree
from hf_colossal.optim.hessian_free import GaussNewtonOperator, flatten
from hf_colossal.recipes.data import digits_arrays

from .trainers import make_trainer

OPTIONS = "damping=0.01,curvature_batch_fraction=0.5,cg_max_iters=10"


@pytest.fixture(scope="module")
def digits_dataset():
    pixels = digits_arrays()["train"][0][:128]
    return datasets.Dataset.from_dict({"pixel_values": pixels, "labels": pixels}).with_format("torch")


def _args(tmp_path, **kw):
    settings = dict(output_dir=str(tmp_path), optim="hessian_free", optim_args=OPTIONS, per_device_train_batch_size=64,
                    max_steps=4, report_to="none", save_strategy="no", logging_steps=1, seed=0, use_cpu=True,
                    disable_tqdm=True, dataloader_num_workers=0)
    settings.update(kw)
    return TrainingArguments(**settings)


def test_plain_trainer_refuses_with_what_to_use(tmp_path, digits_dataset):
    trainer = Trainer(model=DeepAutoencoder((64, 16, 64)), args=_args(tmp_path), train_dataset=digits_dataset)
    with pytest.raises(ValueError, match=r"stock transformers Trainer never passes.*HessianFreeTrainer.*"
                                         r"HessianFreeTrainerMixin"):
        trainer.train()


def test_bad_optim_args_name_the_valid_keys():
    with pytest.raises(OptionsError, match=r"(?s)unknown option 'cg_iters'.*cg_max_iters \(int"):
        TrainingArguments("out", optim="hessian_free", optim_args="cg_iters=3", report_to="none")
    with pytest.raises(OptionsError, match=r"(?s)option 'loss' must be"):
        TrainingArguments("out", optim="hessian_free", optim_args="loss=hinge", report_to="none")


def test_hessian_free_trainer_trains_logs_and_resumes_exactly(tmp_path, digits_dataset):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2)
    straight = HessianFreeTrainer(model=DeepAutoencoder((64, 16, 4, 16, 64)), args=_args(tmp_path / "a", **common),
                                  train_dataset=digits_dataset)
    straight.train()
    opt = straight.optimizer.optimizer
    assert type(opt) is HessianFree and opt.step_calls == 4
    logs = [e for e in straight.state.log_history if "loss" in e]
    assert len(logs) == 4 and logs[-1]["loss"] < logs[0]["loss"]
    assert {"hf_damping", "hf_cg_iters", "grad_norm"} <= set(logs[0])

    resumed = HessianFreeTrainer(model=DeepAutoencoder((64, 16, 4, 16, 64)), args=_args(tmp_path / "b", **common),
                                 train_dataset=digits_dataset)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    assert resumed.optimizer.optimizer.damping == opt.damping


def test_minilm_steps_and_its_gauss_newton_products_equal_forward_modes(tmp_path, tokenized, minilm_path):
    """MiniLM on BBC articles through HessianFreeTrainer (vmap cannot batch BERT's mask checks: the preconditioner
    loops over examples). Without dropout the CPU runs SDPA's fused kernel, which has neither a forward-mode
    derivative nor a differentiable backward: a clear error names eager attention, whose reverse-over-reverse
    products equal forward mode's."""
    trainer = make_trainer(tmp_path, tokenized, minilm_path, trainer_cls=HessianFreeTrainer, optim="hessian_free",
                           optim_args="damping=0.1,curvature_batch_fraction=0.5,cg_max_iters=5", max_steps=2)
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert opt.step_calls == 2 and opt.accepted_steps >= 1 and not opt._vmap_per_example

    model = trainer.model.eval()  # no dropout: forward mode's second forward sees the same function
    batch = trainer.data_collator([tokenized[1][i] for i in range(4)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangent = flatten((torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in
                       enumerate(params.values())), torch.float32)

    def operator(mode):
        return GaussNewtonOperator(lambda p: torch.func.functional_call(model, p, (), inputs)["logits"], params,
                                   "cross_entropy", batch["labels"], jvp_mode=mode)

    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match=r"no Jacobian-vector product works.*attn_implementation='eager'"):
        operator("auto")(tangent)
    model.set_attn_implementation("eager")
    auto = operator("auto")
    torch.testing.assert_close(auto(tangent), operator("forward")(tangent), rtol=1e-4, atol=1e-6)
    assert auto.linearization.jvp_mode == "reverse_over_reverse"


def test_unsupported_settings_and_losses_fail_with_the_reason(tmp_path, digits_dataset):
    trainer = HessianFreeTrainer(model=DeepAutoencoder((64, 16, 64)),
                                 args=_args(tmp_path, gradient_accumulation_steps=2), train_dataset=digits_dataset)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        trainer.train()

    class MeanAbsolute(nn.Module):  # declares mse but computes an L1 loss: caught on the first step
        hessian_free_loss = "mse"

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, 64)

        def forward(self, pixel_values, labels=None):
            logits = self.linear(pixel_values)
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = (logits - labels).abs().mean()
            return out

    trainer = HessianFreeTrainer(model=MeanAbsolute(), args=_args(tmp_path), train_dataset=digits_dataset)
    with pytest.raises(ValueError, match="is not the mse of its logits"):
        trainer.train()

    class Unknown(nn.Linear):
        pass

    with pytest.raises(ValueError, match="cannot tell the loss.*optim_args loss="):
        hessian_free_loss_kind(Unknown(2, 2), torch.zeros(2), "auto")

    class GPTLikeForCausalLM(nn.Linear):
        pass

    with pytest.raises(ValueError, match="does not support GPTLikeForCausalLM: generative"):
        hessian_free_loss_kind(GPTLikeForCausalLM(2, 2), torch.zeros(2, dtype=torch.long), "auto")


def test_mixin_composes_with_a_trainer_subclass_and_leaves_other_optimizers_alone(tmp_path, digits_dataset):
    class Custom(HessianFreeTrainerMixin, Trainer):
        pass

    trainer = Custom(model=DeepAutoencoder((64, 16, 64)), args=_args(tmp_path, optim="adamw_torch", optim_args=None,
                                                                     learning_rate=1e-3, max_steps=2),
                     train_dataset=digits_dataset)
    trainer.train()
    assert type(trainer.optimizer.optimizer).__name__ == "AdamW"
