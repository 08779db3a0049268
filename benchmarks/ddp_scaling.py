"""Shampoo / SOAP / K-FAC under DDP at 1, 2, 4 ranks: optimizer time per rank and whole step time.

One process per GPU (torchrun), the 271M Llama of ``optimizer_step.py`` (hidden 1024, intermediate 2816, 16 layers,
16 heads, vocab 32000; built by its ``make_model``), DDP with its default fp32 all-reduce, bf16 autocast, random
tokens, a fixed batch per rank (``--batch`` x ``--seq``, default 4 x 512, so the global batch grows with the ranks).
The optimizers are ``optimizer_step.py``'s names and settings (its ``build``): adamw_fused, shampoo_f10, soap_f10,
kfac_f10 (and any other of its names), built on the unwrapped model (K-FAC hooks its layers). Under DDP our Shampoo
and SOAP split each recompute's due blocks across the ranks and K-FAC splits its inverses (each shared by one
all_reduce), so optimizer time per rank should fall with the ranks while AdamW's stays put.

Per optimizer (fresh model and optimizer, same seed): warm-up steps (at least the recompute interval + 5, so the
timing starts after the first preconditioned step), then ``--steps`` timed steps rounded up to a whole number of
recompute intervals, so the means are amortized steady-state steps (compare "mean" for the second-order ones; the
medians are the steps without a recompute). Timing is host-side around ``torch.cuda.synchronize()`` calls: whole
step = forward + backward + optimizer.step + zero_grad; "opt" = optimizer.step alone (between a synchronize after
backward, which also waits for DDP's all-reduce, and one after the step). Peak GiB = ``max_memory_allocated``
during the timed run. Per rank values are gathered; bytes per step handed to the optimizer's own collectives are
counted by ``ddp_compression.py``'s wrappers (DDP's gradient all-reduce is 4 bytes/parameter on top).

    # 1, 2 and 4 GPUs (NVLink), one JSON file each
    torchrun --standalone --nproc_per_node 1 benchmarks/ddp_scaling.py --out benchmarks/results/ddp_scaling_w1.json
    torchrun --standalone --nproc_per_node 2 benchmarks/ddp_scaling.py --out benchmarks/results/ddp_scaling_w2.json
    torchrun --standalone --nproc_per_node 4 benchmarks/ddp_scaling.py --out benchmarks/results/ddp_scaling_w4.json
    # a subset, fewer steps
    torchrun --standalone --nproc_per_node 4 benchmarks/ddp_scaling.py --optimizers adamw_fused,shampoo_f10 --steps 30
    # CPU check of the script itself (gloo, tiny model, a few steps)
    torchrun --nproc_per_node 2 benchmarks/ddp_scaling.py --tiny

Rank 0 prints one ``RESULT {json}`` line per optimizer and rewrites ``--out`` (a JSON list) after each one.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_compression  # also wraps torch.distributed's Python collectives to count their bytes (BYTES)
from optimizer_step import build, make_model, recompute_frequency

DEFAULT = "adamw_fused,shampoo_f10,soap_f10,kfac_f10"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_model(tiny: bool, device: torch.device):
    """(model, vocab): optimizer_step's 271M Llama built on ``device``, or ddp_compression's tiny one."""
    if tiny:
        model = ddp_compression.build_model(True, device)
        return model, model.config.vocab_size
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs (a CPU init of 271M parameters takes seconds)
        return make_model("llama271m")


def run(name: str, args, device: torch.device, rank: int, world: int) -> dict:
    interval = recompute_frequency(name)
    steps = -(-args.steps // interval) * interval if interval else args.steps
    warm = max(args.warm, interval + 5) if interval else args.warm
    model, vocab = new_model(args.tiny, device)
    n_params = sum(p.numel() for p in model.parameters())
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build(name, model)  # the unwrapped model: K-FAC hooks its layers, DDP calls them
    generator = torch.Generator().manual_seed(1000 + rank)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device) for _ in range(4)]
    amp = device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_ms, opt_ms, sent = [], [], []
    for i in range(warm + steps):
        x = batches[i % len(batches)]
        synchronize(device)
        ddp_compression.BYTES.clear()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = ddp(input_ids=x, labels=x).loss
        loss.backward()
        synchronize(device)
        mid = time.perf_counter()
        optimizer.step()
        synchronize(device)
        end = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if i >= warm:
            step_ms.append((time.perf_counter() - start) * 1e3)
            opt_ms.append((end - mid) * 1e3)
            sent.append(dict(ddp_compression.BYTES))
        if i == warm - 1 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    mine = dict(rank=rank, step_ms_median=round(statistics.median(step_ms), 2),
                step_ms_mean=round(statistics.fmean(step_ms), 2), opt_ms_median=round(statistics.median(opt_ms), 2),
                opt_ms_mean=round(statistics.fmean(opt_ms), 2),
                peak_GiB=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None)
    per_rank: list = [None] * world
    dist.all_gather_object(per_rank, mine)
    kinds = sorted({k for s in sent for k in s})
    final_loss = float(loss.detach())
    result = dict(
        name=name, world=world, backend=dist.get_backend(),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        params_M=round(n_params / 1e6, 1), batch_per_rank=[args.batch, args.seq], interval=interval, warm=warm,
        steps=steps,
        # rank 0's step / optimizer times; the slowest rank's means next to them
        step_ms_median=mine["step_ms_median"], step_ms_mean=mine["step_ms_mean"],
        opt_ms_median=mine["opt_ms_median"], opt_ms_mean=mine["opt_ms_mean"],
        step_ms_mean_max_rank=max(r["step_ms_mean"] for r in per_rank),
        opt_ms_mean_max_rank=max(r["opt_ms_mean"] for r in per_rank),
        peak_GiB=max(r["peak_GiB"] for r in per_rank) if device.type == "cuda" else None,
        tokens_per_s=round(world * args.batch * args.seq / (statistics.fmean(step_ms) / 1e3)),
        optimizer_bytes_per_step={k: round(statistics.fmean(s.get(k, 0) for s in sent)) for k in kinds},
        ddp_allreduce_bytes_per_step=4 * n_params if world > 1 else 0,
        final_loss=round(final_loss, 4), finite=math.isfinite(final_loss), per_rank=per_rank,
    )
    del ddp, model, optimizer, batches, loss
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", default=DEFAULT, help="optimizer_step.py names, comma-separated")
    parser.add_argument("--steps", type=int, default=40, help="timed steps (rounded up to whole recompute intervals)")
    parser.add_argument("--warm", type=int, default=5, help="warm-up steps (at least interval + 5 for 2nd order)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--tiny", action="store_true", help="CPU/gloo check: tiny model, short sequences, few steps")
    parser.add_argument("--out", default=None, help="write the results (a JSON list) here (rank 0)")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.warm, args.seq = 10, 2, 64
    device, rank, world = ddp_compression.start_process_group(args.tiny)
    if rank == 0:
        import transformers

        print(f"world {world} backend {dist.get_backend()} device "
              f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} torch {torch.__version__} "
              f"transformers {transformers.__version__}", flush=True)
    def timed(name):
        started = time.time()
        result = run(name, args, device, rank, world)
        result["wall_s"] = round(time.time() - started, 1)
        return result

    ddp_compression.run_and_record(args.optimizers.split(","), timed, rank, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
