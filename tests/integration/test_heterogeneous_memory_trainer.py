"""Heterogeneous memory under Trainer (MiniLM on BBC articles): training, saving loadable fp32 weights, exact
resume from a checkpoint, and the errors for settings it does not support."""

import functools
import gc

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForSequenceClassification, Trainer

from hf_colossal.integrations.trainer_memory import full_master_weights, heterogeneous_memory_trainer_class
from hf_colossal.memory import HeterogeneousOptimizer, sharded_model_of

from tests.comm._workers import init

from .subprocesses import run_python
from .trainers import make_trainer

OPTIONS = "param_dtype=float32,placement=static,offload_optim_frac=0.5"  # fp32: the CPU has no fast bf16 matmul


def _trainer(tmp_path, tokenized, minilm_path, options=OPTIONS, **kw):
    cls = functools.partial(heterogeneous_memory_trainer_class(Trainer), heterogeneous_memory=options)
    settings = dict(max_steps=4, learning_rate=1e-3, save_strategy="steps", save_steps=2)
    settings.update(kw)
    torch.manual_seed(0)  # the same randomly initialised classification head in every run
    return make_trainer(tmp_path, tokenized, minilm_path, trainer_cls=cls, **settings)


def _masters(trainer):
    trainer.optimizer.optimizer.synchronize()
    return {name: m.detach().cpu().clone() for name, m in sharded_model_of(trainer.model).masters.items()}


def test_trainer_trains_saves_loadable_weights_and_resumes_exactly(tmp_path, tokenized, minilm_path):
    straight = _trainer(tmp_path / "straight", tokenized, minilm_path)
    straight.train()
    optimizer = straight.optimizer.optimizer
    assert isinstance(optimizer, HeterogeneousOptimizer) and optimizer.base_name == "adamw"
    assert straight.optimizer.device_placement is False  # no round trip of the offloaded state through the device
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.01}
    assert len(optimizer.plan.offloaded) == 6  # the layers; the embeddings are the other half
    final = _masters(straight)
    # the same run in the stock Trainer (fp32 weights, torch's fused AdamW, the same clipping and schedule)
    torch.manual_seed(0)
    stock = make_trainer(tmp_path / "stock", tokenized, minilm_path, max_steps=4, learning_rate=1e-3,
                         optim="adamw_torch_fused")
    stock.train()
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (straight, stock)]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    for name, param in stock.model.named_parameters():
        assert torch.allclose(param.detach(), final[name], atol=1e-5), name

    straight.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "saved"))  # no hf_colossal needed
    for name, param in reloaded.named_parameters():
        assert torch.equal(param.detach(), final[name]), name

    resumed = _trainer(tmp_path / "straight", tokenized, minilm_path)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    again = _masters(resumed)
    assert max((again[k] - final[k]).abs().max().item() for k in final) == 0.0


def test_load_best_model_at_end_restores_the_best_checkpoints_masters(tmp_path, tokenized, minilm_path):
    """Trainer's own best-model load would put plain tensors into FSDP2's parameters (it raised) and leave the
    masters at the last step; the mixin loads the best checkpoint's DCP folder. "Best" is the higher eval loss
    here, so that it is the first checkpoint, not the last step."""
    trainer = _trainer(tmp_path, tokenized, minilm_path, eval_strategy="steps", eval_steps=2,
                       load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = AutoModelForSequenceClassification.from_pretrained(trainer.state.best_model_checkpoint)
    last = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "checkpoint-4"))
    masters = _masters(trainer)
    for name, param in best.named_parameters():
        assert torch.equal(masters[name], param.detach()), name
    assert any(not torch.equal(masters[n], p.detach()) for n, p in last.named_parameters())
    for name, param in sharded_model_of(trainer.model).model.named_parameters():  # the shards follow the masters
        assert torch.equal(param.to_local().detach().float().cpu(), masters[name]), name


def test_unsupported_settings_fail_before_training(tmp_path, tokenized, minilm_path):
    with pytest.raises(ValueError, match="use param_dtype='float16'"):
        _trainer(tmp_path, tokenized, minilm_path, options="param_dtype=bfloat16", fp16=True)
    with pytest.raises(ValueError, match="needs fp16 mixed precision for its loss scaling"):
        _trainer(tmp_path, tokenized, minilm_path, options="param_dtype=float16")
    with pytest.raises(ValueError, match="--optim sgd is not supported; valid choices: adamw_torch"):
        _trainer(tmp_path, tokenized, minilm_path, optim="sgd")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 AMP (autocast + GradScaler) needs a GPU")
def test_trainer_fp16_trains_fp16_weights_under_a_sharded_grad_scaler(tmp_path, tokenized, minilm_path):
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    trainer = _trainer(tmp_path, tokenized, minilm_path, fp16=True, use_cpu=False, save_strategy="no",
                       options="param_dtype=float16,placement=static,offload_optim_frac=0.5")
    trainer.train()
    assert isinstance(trainer.accelerator.scaler, ShardedGradScaler)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    masters = _masters(trainer)
    for name, param in trainer.model.named_parameters():
        assert param.to_local().dtype == torch.float16
        assert torch.equal(param.to_local().cpu(), masters[name].to(torch.float16)), name


def test_accelerate_script_shards_and_offloads_over_two_processes():
    result = run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
                         "examples/accelerate_heterogeneous_memory.py", "--steps", "8",
                         "--options", "param_dtype=float32,placement=static,offload_optim_frac=0.5"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP2 over 2 process(es)" in result.stdout and "offloaded: model.layers.2 .. model.layers.3" in result.stdout
    losses = {int(line.split()[1]): float(line.split()[-1]) for line in result.stdout.splitlines()
              if line.startswith("step ")}
    assert losses[8] < losses[1] - 0.2


def _two_process_worker(rank, world_size, port, tmp, tokenized, minilm_path):
    init(rank, world_size, port, accelerate_env=True)
    straight = _trainer(tmp / "run", tokenized, minilm_path, per_device_train_batch_size=4)
    straight.train()
    final = _masters(straight)
    straight.save_model(str(tmp / "saved"))  # every rank: the full weights are gathered from the shards
    resumed = _trainer(tmp / "run", tokenized, minilm_path, per_device_train_batch_size=4)
    resumed.train(resume_from_checkpoint=str(tmp / "run" / "checkpoint-2"))
    again = _masters(resumed)
    result = dict(world=sharded_model_of(straight.model).world_size, full=full_master_weights(
        sharded_model_of(straight.model)), exact=all(torch.equal(final[k], again[k]) for k in final))
    torch.save(result, tmp / f"result.{rank}")
    del straight, resumed  # free the Trainers while the group lives (see tests/comm/_workers.trainer_worker)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def test_two_process_trainer_shards_saves_full_weights_and_resumes_exactly(tmp_path, tokenized, minilm_path):
    mp.spawn(_two_process_worker, args=(2, 29749, tmp_path, tokenized, minilm_path), nprocs=2)
    results = [torch.load(tmp_path / f"result.{rank}", weights_only=False) for rank in range(2)]
    assert [r["world"] for r in results] == [2, 2] and all(r["exact"] for r in results)
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "saved"))
    for name, param in reloaded.named_parameters():
        assert torch.equal(param.detach(), results[0]["full"][name]), name
