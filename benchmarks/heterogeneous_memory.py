"""Heterogeneous memory on one GPU: plain training vs FSDP2 + CPUOffloadPolicy vs hf_colossal's plugin.

Same set-up as the anchor in ``shared/notes/anchors.md``: Llama-style model from ``LlamaConfig`` (vocab 32000,
intermediate = 8/3 hidden rounded down to 256, 128-wide heads), full AdamW, bf16, activation checkpointing,
batch 4 x 1024 tokens, one fixed batch (so the loss must fall: the run learns), median step over steps 3-10.
Prints one ``RESULT {json}`` line; a run that does not fit prints ``RESULT {"oom": ...}``.

    torchrun --nproc_per_node 1 benchmarks/heterogeneous_memory.py plain --hidden 3072 --layers 26
    torchrun --nproc_per_node 1 benchmarks/heterogeneous_memory.py fsdp2_offload --hidden 3072 --layers 26
    torchrun --nproc_per_node 1 benchmarks/heterogeneous_memory.py ours --hidden 3072 --layers 26 \\
        --options placement=auto,device_memory_gib=23.6
    torchrun --nproc_per_node 1 benchmarks/heterogeneous_memory.py ours --hidden 3072 --layers 26 \\
        --options placement=static,offload_optim_frac=0.75
    torchrun --nproc_per_node 2 benchmarks/heterogeneous_memory.py ours --hidden 3072 --layers 26 \\
        --options placement=auto,device_memory_gib=12     # sharded over 2 GPUs and offloaded

With several processes ``ours`` and ``fsdp2_offload`` shard over all of them (each rank its own batch of the same
size); tokens/s counts every rank's tokens, peak memory is rank 0's; rank 0 prints the result.

Sizes used: 1.33B = hidden 2048 x 24 layers, 3.14B = 3072 x 26, 4.25B = 3072 x 36, 5.44B = 4096 x 26,
6.64B = 4096 x 32. ``--tiny`` runs a 2-layer model on CPU (gloo) to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def build(hidden: int, layers: int, tiny: bool, on_meta: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000 if not tiny else 512, hidden_size=hidden,
                         intermediate_size=int(hidden * 8 / 3 // 256 * 256) if not tiny else 2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(hidden // 128, 1),
                         num_key_value_heads=max(hidden // 128, 1), max_position_embeddings=2048,
                         use_cache=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if not on_meta:
        model.to_empty(device="cpu")
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0, 0.02)
        model.model.rotary_emb = type(model.model.rotary_emb)(config)  # inv_freq buffers computed on the CPU
    model.gradient_checkpointing_enable()
    return model, config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("plain", "fsdp2_offload", "ours"))
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--options", default="placement=auto", help="HeterogeneousMemoryPlugin options")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--grad-slots", type=int, default=None, help="ours: host gradient slots (default: its own)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    if args.tiny:
        args.hidden, args.layers, args.batch, args.seq, args.steps = 64, 2, 2, 32, 4
    if args.mode == "plain" and dist.get_world_size() > 1:
        parser.error("plain runs one process (no data parallel wrapper)")
    result = dict(mode=args.mode, hidden=args.hidden, layers=args.layers, options=args.options,
                  world_size=dist.get_world_size(),
                  device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__)
    from hf_colossal.memory import MemoryPlanError

    try:
        result.update(run(args, device, cuda))
    except torch.OutOfMemoryError as error:
        result["oom"] = str(error).splitlines()[0][:200]
    except MemoryPlanError as error:  # ours, refused before anything was pinned
        result["refused"] = str(error)[:600]
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()


def run(args, device: torch.device, cuda: bool) -> dict:
    started = time.perf_counter()
    optimizer_extra = {}
    if args.mode == "plain":
        model, config = build(args.hidden, args.layers, args.tiny, on_meta=False)
        model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    elif args.mode == "fsdp2_offload":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        model, config = build(args.hidden, args.layers, args.tiny, on_meta=False)
        kw = dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
                  offload_policy=CPUOffloadPolicy(pin_memory=cuda))
        for layer in model.model.layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    else:
        from hf_colossal.memory import HeterogeneousMemoryPlugin, HeterogeneousOptimizer, shard_model

        plugin = HeterogeneousMemoryPlugin.from_optim_args(args.options)
        model, config = build(args.hidden, args.layers, args.tiny, on_meta=False)
        sharded = shard_model(model, plugin, device=device)
        optimizer = HeterogeneousOptimizer(model.parameters(), sharded, plugin, lr=1e-4)
        if args.grad_slots is not None:
            optimizer.grad_slots = args.grad_slots
    params = sum(p.numel() for p in model.parameters())
    setup_s = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator).to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mode == "plain"):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if args.mode == "ours":
        optimizer.synchronize()
        optimizer_extra = dict(plan=optimizer.plan.describe(), skipped_steps=optimizer.skipped_steps,
                               offloaded_fraction=round(optimizer.plan.offloaded_numel / optimizer.plan.total_numel, 3))
    steady = sorted(times[2:])
    step_s = steady[len(steady) // 2]
    return dict(params_B=round(params / 1e9, 2), step_s=round(step_s, 3),
                tokens_per_s=round(dist.get_world_size() * args.batch * args.seq / step_s),
                peak_gpu_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
                first_loss=round(losses[0], 3), last_loss=round(losses[-1], 3), setup_s=round(setup_s, 1),
                step_times=[round(t, 3) for t in times], **optimizer_extra)


if __name__ == "__main__":
    main()
