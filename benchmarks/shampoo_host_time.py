"""Where Shampoo's step spends host time on a GPU, and what CUDA-graph recomputations (graph_recompute) change.

    python benchmarks/shampoo_host_time.py profile NAME          # cProfile of step() (device synced before each)
    python benchmarks/shampoo_host_time.py replay                # one recomputation batch: eager vs graph replay
    python benchmarks/shampoo_host_time.py ab NAME BLOCK ROUNDS  # whole steps, graph_recompute on/off, one process

NAME is an optimizer_step.py name (shampoo_f10, shampoo_f100, ...) on its 271M Llama. "ab" toggles
graph_recompute on one optimizer between blocks of BLOCK steps (alternating which goes first), after one warm
block of each, so both see the same state, process and host: the per-process spread of the forward and backward
(several ms on the H200 hosts) does not enter the difference.
"""

import cProfile
import io
import json
import pstats
import sys
import time

import torch

import optimizer_step as bench


def llama_and_optimizer(name):
    """The 271M Llama on CUDA, optimizer ``name``, and ``step(i)`` = (forward + backward, optimizer step)."""
    torch.manual_seed(0)
    model, vocab = bench.make_model("llama271m")
    model = model.cuda()
    optimizer = bench.build(name, model)
    batches = [torch.randint(0, vocab, (8, 512), device="cuda") for _ in range(4)]

    def forward_backward(i):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(input_ids=batches[i % 4], labels=batches[i % 4]).loss.backward()

    def optimizer_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return optimizer, lambda i: (forward_backward(i), optimizer_step()), forward_backward


def profile(name, warm=120, steps=20):
    optimizer, step, forward_backward = llama_and_optimizer(name)
    for i in range(warm):
        step(i)
    profiler, host = cProfile.Profile(), []
    for i in range(warm, warm + steps):
        forward_backward(i)
        torch.cuda.synchronize()
        profiler.enable()
        started = time.perf_counter()
        optimizer.step()
        host.append(time.perf_counter() - started)
        profiler.disable()
        optimizer.zero_grad(set_to_none=True)
    print(f"{name}: host step ms (synced before) mean {1e3 * sum(host) / steps:.2f}")
    for order in ("tottime", "cumtime"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(45)
        print(out.getvalue())


def replay():
    from hf_colossal.optim import Shampoo, Soap

    side = torch.cuda.Stream()
    kinds = (("shampoo qr", Shampoo._refresh, ("qr", 4, 1e-12)), ("soap qr", Soap._refresh, ("qr",)))
    for label, function, key in kinds:
        for rows in (3, 23, 50):
            grads = torch.randn(rows, 1024, 256, device="cuda")
            factors = grads @ grads.mT / 256
            bases = torch.linalg.qr(torch.linalg.eigh(factors.double())[1].float()
                                    + 1e-3 * torch.randn_like(factors))[0]
            inputs = (factors, bases)
            with torch.cuda.stream(side):
                for _ in range(2):
                    function(key, inputs)
            torch.cuda.synchronize()
            started = time.perf_counter()
            with torch.cuda.stream(side):
                eager = function(key, inputs)
            eager_host = time.perf_counter() - started
            torch.cuda.synchronize()
            eager_total = time.perf_counter() - started
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                graphed = function(key, inputs)
            torch.cuda.synchronize()
            started = time.perf_counter()
            with torch.cuda.stream(side):
                graph.replay()
            replay_host = time.perf_counter() - started
            torch.cuda.synchronize()
            replay_total = time.perf_counter() - started
            difference = max((a.double() - b.double()).abs().max().item() for a, b in zip(eager, graphed))
            print(json.dumps(dict(batch=label, factors=rows, eager_host_ms=round(eager_host * 1e3, 2),
                                  eager_total_ms=round(eager_total * 1e3, 2),
                                  replay_host_ms=round(replay_host * 1e3, 3),
                                  replay_total_ms=round(replay_total * 1e3, 2), max_difference=difference)))


def ab(name, block, rounds):
    optimizer, step, _ = llama_and_optimizer(name)
    done = 0

    def timed(graphs):
        nonlocal done
        for group in optimizer.param_groups:
            group["graph_recompute"] = graphs
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(done, done + block):
            step(i)
        end.record()
        torch.cuda.synchronize()
        done += block
        return round(start.elapsed_time(end) / block, 2)

    timed(True), timed(False)  # warm: the first preconditioned step and the captures
    ms = {True: [], False: []}
    for round_index in range(rounds):
        for graphs in ((True, False) if round_index % 2 == 0 else (False, True)):
            ms[graphs].append(timed(graphs))
    print(json.dumps(dict(name=name, graph_ms=ms[True], eager_ms=ms[False],
                          graph_mean=round(sum(ms[True]) / rounds, 2), eager_mean=round(sum(ms[False]) / rounds, 2),
                          captures=optimizer._recompute_graphs.captures,
                          peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2))))


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "profile":
        profile(arguments[0])
    elif command == "replay":
        replay()
    elif command == "ab":
        ab(arguments[0], int(arguments[1]), int(arguments[2]))
    else:
        raise SystemExit(__doc__)
