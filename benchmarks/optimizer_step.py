"""Optimizer-step cost of LAMB / LARS against torch's AdamW(fused) / SGD(foreach) and pytorch-optimizer.

Same model, data and loop for every optimizer, each in a fresh process (as ../shared/bench/anchor_steps.py
measured the peers). Whole step = forward + backward (bf16 autocast, fp32 params) + optimizer.step +
zero_grad; "opt ms" is the part from the end of backward to the end of zero_grad, "fwd bwd ms" the part before it
(longer where a side stream competes with the forward and backward), timed with CUDA events. The
timed steps run back to back without a device sync (as a training loop does), so work an optimizer puts on a side
stream overlaps the next step as it would in training; "step ms mean" is the first timed step's start to the last
one's end, over the number of steps.

    python benchmarks/optimizer_step.py [--model llama271m|bert_base] [--repeat N] [name ...]

On the H200 hosts one process's whole step can differ from the next process's by 10-15% for the same code (AdamW
39 to 74 ms within one session), so effects of a few percent need ``--repeat``: the list runs N times, each round
starting one name later, and a last table gives each round's ratio to that round's AdamW and their median. Or
``--paired ROUNDS``: each name runs in one process beside its baseline (two models), the two timed in alternating
blocks of whole recompute periods, so the ratio never spans two processes.

    python benchmarks/optimizer_step.py --paired 4 kfac_f10 shampoo_f10 lamb

Prints one JSON line per optimizer, then a table with ratios to AdamW(fused) (LAMB) and SGD(foreach) (LARS)
and the achieved bandwidth as a fraction of the measured copy bandwidth (28 bytes per fp32 parameter for an
Adam-like step: read p, g, m, v; write p, m, v — 16 bytes for SGD momentum: read p, g, b; write p, b). These are
the minimal bytes of each update, not what an implementation moves (the fused LAMB moves 44 B/param, 40 with
nonfinite=apply; the fused LARS 28 B/param), so the fraction compares implementations on the same yardstick.

"lamb" and "lars" take the fused Triton path on CUDA (fused=None); "lamb_foreach" and "lars_foreach" are the same
optimizers forced onto the torch._foreach_* path (fused=False); "lamb_master" / "lars_master" keep fp32 master
weights (master_weights=True; a copy only for bf16/fp16 parameters). The suffix "_bf16params" holds the model's
parameters in bf16 (e.g. "adamw_fused_bf16params", "lamb_master_bf16params"); such a row's ratios are to the
baseline with the same suffix, and it gets no bandwidth fraction (the 28/16-byte yardstick is for fp32 parameters).

Shampoo / SOAP (names ending in _f10 / _f100: preconditioners recomputed every 10 / 100 steps, blocks of 1024):
ours ("shampoo_*", "soap_*"; suffixes "_bf16" / "_fp32" = matmul_dtype=bfloat16 / float32 instead of the default
tfloat32, "_eigh" / "_newton" = root_inverse=eigh / newton instead of the default qr, "_rtf32" = SOAP's
rotation_dtype=tfloat32, "_apply" = nonfinite=apply (no non-finite check), "_inline" = overlap_recompute=False,
"_together" = stagger_recompute=False (all blocks on one step of each period), "_graph" =
graph_recompute=True (recomputation batches replayed as CUDA graphs), e.g. "shampoo_f10_eigh_fp32"), pytorch-optimizer's SOAP ("po_soap") and Meta's
distributed_shampoo ("meta_*", imported from the folder in $HF_COLOSSAL_PEERS, e.g. a checkout's root, with the
settings of ../shared/bench/anchor_steps.py). Their timing starts after the first preconditioned step (warm-up
f + 5 steps) and runs over a whole number of recompute periods (60 steps for f10, 200 for f100), so the reported
means are amortized steady-state steps; compare "step ms mean" (and its ratio to AdamW's) for them.

"opt host ms" is the host's wall time of ``step()`` + ``zero_grad()``. It includes any wait for the GPU inside the
step: ``nonfinite="skip"`` reads a flag, so the host waits there for the backward to finish. ``--profile DIR`` runs one more recompute
period (at most 20 steps; 10 for the others) under ``torch.profiler`` and writes ``DIR/<name>_profile.txt``: the ops by
total GPU time and by host time.

K-FAC ("kfac_f10": ours, factors and inverses every 10 steps, lm_head left to the base rule; "kfac_f10_apply": the
same with ``nonfinite="apply"``, no flag read per step; "kfac_pytorch_f10":
kfac-pytorch's KAISA preconditioner before torch SGD, the anchors' settings) takes its statistics in forward and
backward hooks, so only "step ms mean" compares it. $HF_COLOSSAL_PEERS may list several folders (os.pathsep).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SECOND_ORDER = ["shampoo_f10", "shampoo_f100", "soap_f10", "shampoo_f10_bf16", "soap_f10_bf16", "po_soap",
                "meta_shampoo_f10", "meta_shampoo_f100", "meta_soap_f10"]
SECOND_ORDER += ["kfac_f10", "kfac_f10_apply", "kfac_pytorch_f10"]
NAMES = ["adamw_fused", "sgd_foreach", "lamb", "lamb_apply", "lamb_foreach", "lars", "lars_foreach", "po_lamb",
         "po_lars", *SECOND_ORDER]
BYTES_PER_PARAM = {"adamw_fused": 28, "lamb": 28, "lamb_apply": 28, "lamb_foreach": 28, "po_lamb": 28,
                   "sgd_foreach": 16, "lars": 16, "lars_foreach": 16, "po_lars": 16,
                   **{name: 28 for name in SECOND_ORDER}}


SUFFIX_OPTIONS = {"bf16": "matmul_dtype=bfloat16", "fp32": "matmul_dtype=float32", "eigh": "root_inverse=eigh",
                  "newton": "root_inverse=newton", "rtf32": "rotation_dtype=tfloat32", "apply": "nonfinite=apply",
                  "inline": "overlap_recompute=False", "together": "stagger_recompute=False",
                  "graph": "graph_recompute=True"}


BF16_PARAMS = "_bf16params"


def split_param_dtype(name):
    """(the optimizer's name, whether the model's parameters are bf16) for a name with or without "_bf16params"."""
    if name.endswith(BF16_PARAMS):
        return name[:-len(BF16_PARAMS)], True
    return name, False


def is_second_order(name):
    return name in SECOND_ORDER or name.startswith(("shampoo_f", "soap_f"))


def recompute_frequency(name):
    """10 or 100 for the Shampoo/SOAP names (po_soap: 10), None for the others."""
    if name == "po_soap":
        return 10
    if is_second_order(name):
        return int(name.split("_f")[1].split("_")[0])
    return None


def build(name, model):
    import torch

    import hf_colossal

    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw_fused":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    if name == "sgd_foreach":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4, foreach=True)
    if name == "lamb":
        return hf_colossal.build_optimizer("lamb", model, lr=1e-4, weight_decay=0.01)
    if name == "lamb_apply":  # no non-finite check: the step a GradScaler run takes
        return hf_colossal.build_optimizer("lamb", model, lr=1e-4, weight_decay=0.01, options="nonfinite=apply")
    if name == "lars":
        return hf_colossal.build_optimizer("lars", model, lr=1e-3, weight_decay=1e-4)
    if name == "lamb_master":
        return hf_colossal.build_optimizer("lamb", model, lr=1e-4, weight_decay=0.01, options="master_weights=true")
    if name == "lars_master":
        return hf_colossal.build_optimizer("lars", model, lr=1e-3, weight_decay=1e-4, options="master_weights=true")
    if name.startswith(("shampoo_", "soap_")):
        options = f"precondition_frequency={recompute_frequency(name)}"
        for suffix in name.split("_")[2:]:
            options += "," + SUFFIX_OPTIONS[suffix]
        return hf_colossal.build_optimizer(name.split("_")[0], model, lr=1e-4, weight_decay=0.01, options=options)
    if name.startswith("meta_"):
        return build_meta(name, params)
    if name in ("kfac_f10", "kfac_f10_apply"):  # default nonfinite="skip" (one flag read per step), or "apply"
        return hf_colossal.build_optimizer("kfac", model, lr=1e-4, weight_decay=0.01,
                                           options="factor_interval=10,inverse_interval=10"
                                           + (",nonfinite=apply" if name.endswith("_apply") else ""))
    if name == "kfac_pytorch_f10":
        return build_kfac_pytorch(model, params)
    if name in ("lamb_foreach", "lars_foreach"):
        optimizer = build(name.split("_")[0], model)
        for group in optimizer.param_groups:
            group["fused"] = False
        return optimizer
    import pytorch_optimizer as po

    if name == "po_lamb":
        return po.Lamb(params, lr=1e-4, weight_decay=0.01)
    if name == "po_lars":
        return po.LARS(params, lr=1e-3, weight_decay=1e-4)
    if name == "po_soap":
        return po.SOAP(params, lr=1e-4, precondition_frequency=10, max_precondition_dim=1024)
    raise SystemExit(f"unknown optimizer {name}")


def add_peers_to_path(name, package):
    """Put the folders of $HF_COLOSSAL_PEERS (os.pathsep-separated) first on sys.path, or exit naming ``package``."""
    folders = [f for f in os.environ.get("HF_COLOSSAL_PEERS", "").split(os.pathsep) if f]
    if not folders:
        raise SystemExit(f"{name}: set HF_COLOSSAL_PEERS to the folder holding {package}/")
    sys.path[:0] = folders


def build_kfac_pytorch(model, params):
    """kfac-pytorch's KFACPreconditioner (anchors' settings) run before each step of torch SGD momentum."""
    import torch

    add_peers_to_path("kfac_pytorch_f10", "kfac")
    from kfac.preconditioner import KFACPreconditioner

    preconditioner = KFACPreconditioner(model, factor_update_steps=10, inv_update_steps=10, skip_layers=["lm_head"],
                                        lr=1e-4)
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    optimizer.register_step_pre_hook(lambda *_: preconditioner.step())
    return optimizer


def build_meta(name, params):
    """Meta's distributed_shampoo with the anchors' settings (../shared/bench/anchor_steps.py)."""
    add_peers_to_path(name, "distributed_shampoo")
    from distributed_shampoo import AdamPreconditionerConfig, DistributedShampoo, WeightDecayType

    frequency = recompute_frequency(name)
    kwargs = dict(lr=1e-4, betas=(0.9, 0.999), epsilon=1e-12, weight_decay=0.01, max_preconditioner_dim=1024,
                  precondition_frequency=frequency, start_preconditioning_step=frequency,
                  weight_decay_type=WeightDecayType.DECOUPLED)
    if "soap" in name:
        from distributed_shampoo import EigenvalueCorrectedShampooPreconditionerConfig

        kwargs.update(preconditioner_config=EigenvalueCorrectedShampooPreconditionerConfig(), grafting_config=None)
    else:
        kwargs["grafting_config"] = AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8)
    return DistributedShampoo(params, **kwargs)


def make_model(kind):
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    if kind == "llama271m":
        config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                             num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024,
                             use_cache=False)
        return LlamaForCausalLM(config), 32000
    config = BertConfig()  # bert-base-uncased shape: 12 x 768, 110M parameters
    return BertForMaskedLM(config), config.vocab_size


def profile_steps(run_step, steps, path):
    """Run ``steps`` more steps under ``torch.profiler`` and write the ops by total GPU time and by host time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(steps):
            run_step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    with open(path, "w") as out:
        out.write(f"{steps} steps\n\nby total GPU time\n")
        out.write(averages.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))
        out.write("\n\nby self host time\n")
        out.write(averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
        out.write("\n\nby total GPU time and input shapes\n")
        out.write(prof.key_averages(group_by_input_shape=True).table(
            sort_by="cuda_time_total", row_limit=40, max_name_column_width=40, max_shapes_column_width=90))


def baseline_name(name):
    """The torch optimizer ``name`` is compared with: SGD(foreach) for SGD-like steps (16 B/param), else
    AdamW(fused); with the same "_bf16params" suffix."""
    base, bf16_params = split_param_dtype(name)
    bytes_per_param = BYTES_PER_PARAM.get(base.replace("_master", ""), 28)
    return ("sgd_foreach" if bytes_per_param == 16 else "adamw_fused") + (BF16_PARAMS if bf16_params else "")


def warm_steps(name):
    """Steps before timing: 5, or for a recomputing optimizer past its first preconditioned step (frequency + 5)."""
    return (recompute_frequency(name) or 0) + 5


def prepare(name, kind):
    """The ``kind`` model on CUDA (bf16 parameters for a "_bf16params" name), optimizer ``name``, 4 token batches,
    and ``run_step(i)``: one whole step on batch ``i % 4``, returning the loss, CUDA events at its start, at the end of
    the backward and at its end, and the host ms of ``step()`` + ``zero_grad()``. Also returns the parameter count."""
    import torch

    torch.manual_seed(0)
    optimizer_name, bf16_params = split_param_dtype(name)
    model, vocab = make_model(kind)
    model = model.cuda().to(torch.bfloat16 if bf16_params else torch.float32)
    data = [torch.randint(0, vocab, (8, 512), device="cuda") for _ in range(4)]
    opt = build(optimizer_name, model)

    def run_step(i):
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=data[i % 4], labels=data[i % 4]).loss
        loss.backward()
        mid.record()
        host_start = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        host_ms = (time.perf_counter() - host_start) * 1e3
        end.record()
        return loss, start, mid, end, host_ms

    return run_step, sum(p.numel() for p in model.parameters())


def one(name, kind, steps=60, profile_dir=None):
    import torch

    frequency = recompute_frequency(name)
    warm = warm_steps(name)
    if frequency:  # amortized steady state: past the first preconditioned step, whole recompute periods
        steps = max(steps, 2 * frequency)
    run_step, n_params = prepare(name, kind)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    opt_host_ms = []
    for i in range(warm):
        run_step(i)
    torch.cuda.synchronize()
    timed = []
    for i in range(warm, warm + steps):  # no device sync between steps, as in training: overlapped work overlaps
        loss, start, mid, end, host_ms = run_step(i)
        timed.append((start, mid, end))
        opt_host_ms.append(host_ms)
    torch.cuda.synchronize()
    step_ms = [start.elapsed_time(end) for start, _, end in timed]
    opt_ms = [mid.elapsed_time(end) for _, mid, end in timed]
    forward_backward_ms = [start.elapsed_time(mid) for start, mid, _ in timed]
    total_ms = timed[0][0].elapsed_time(timed[-1][2])
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    if profile_dir:
        batches = iter(range(warm + steps, 10**9))
        profile_steps(lambda: run_step(next(batches)), min(frequency or 10, 20),
                      os.path.join(profile_dir, f"{name}_profile.txt"))
    median = sorted(step_ms)[len(step_ms) // 2]
    return dict(name=name, model=kind, params_M=round(n_params / 1e6, 1), step_ms_median=round(median, 2),
                step_ms_mean=round(total_ms / steps, 2),
                opt_ms_mean=round(sum(opt_ms) / len(opt_ms), 3),
                opt_ms_median=round(sorted(opt_ms)[len(opt_ms) // 2], 3),
                opt_host_ms_mean=round(sum(opt_host_ms) / len(opt_host_ms), 3),
                fwd_bwd_ms_mean=round(sum(forward_backward_ms) / len(forward_backward_ms), 2),
                peak_GiB=round(peak_gib, 2), final_loss=round(loss.item(), 3))


def paired(name, kind, rounds):
    """``name`` and its baseline (:func:`baseline_name`) in one process on one host, timed in alternating blocks of
    whole recompute periods (10 steps for the others), after the warm-up steps of each: the spread between
    processes (AdamW's whole step moved between 39 and 74 ms from one process to the next on the H200 hosts) then
    does not enter the ratio. Returns each block's mean step ms and each round's ratio."""
    import torch

    baseline = baseline_name(name)
    block = recompute_frequency(name) or 10
    runners = {label: prepare(label, kind)[0] for label in (baseline, name)}
    done = dict.fromkeys(runners, 0)
    for label, run_step in runners.items():
        for _ in range(warm_steps(name)):
            run_step(done[label])
            done[label] += 1

    def timed_block(label):
        torch.cuda.synchronize()
        events = []
        for _ in range(block):  # back to back, as in training
            _, start, _, end, _ = runners[label](done[label])
            done[label] += 1
            events.append((start, end))
        torch.cuda.synchronize()
        return events[0][0].elapsed_time(events[-1][1]) / block

    step_ms = {label: [] for label in runners}
    for round_index in range(rounds):
        for label in (baseline, name) if round_index % 2 == 0 else (name, baseline):
            step_ms[label].append(round(timed_block(label), 2))
    ratios = [round(a / b, 3) for a, b in zip(step_ms[name], step_ms[baseline])]
    return dict(name=name, baseline=baseline, model=kind, block_steps=block, step_ms=step_ms[name],
                baseline_step_ms=step_ms[baseline], ratios=ratios, median_ratio=statistics.median(ratios),
                peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2))


def copy_bandwidth_tb_s():
    import torch

    x = torch.empty(2**30, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 4 * 10 / (start.elapsed_time(end) / 1e3) / 1e12


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama271m", choices=["llama271m", "bert_base"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--fused-config", help="BLOCK,ITERS,NUM_WARPS of the fused Triton kernels (tuning)")
    parser.add_argument("--profile", metavar="DIR", help="write DIR/<name>_profile.txt (torch.profiler tables)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the whole list this many times, each round starting one name later, and add a "
                             "table of each round's ratio to the same round's AdamW (paired, against host drift)")
    parser.add_argument("--paired", type=int, metavar="ROUNDS",
                        help="each name with its baseline in one process, alternating blocks ROUNDS times each "
                             "(see paired()); prints each round's ratio and their median")
    parser.add_argument("names", nargs="*", default=NAMES)
    ns = parser.parse_args()
    if ns.one:
        if ns.fused_config:
            from hf_colossal.optim import _triton

            _triton.BLOCK, _triton.ITERS, _triton.NUM_WARPS = (int(v) for v in ns.fused_config.split(","))
        result = paired(ns.one, ns.model, ns.paired) if ns.paired else one(ns.one, ns.model, profile_dir=ns.profile)
        print("RESULT " + json.dumps(result), flush=True)
        return
    import torch
    import transformers

    bandwidth = copy_bandwidth_tb_s()
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} transformers {transformers.__version__}"
          f" copy bandwidth {bandwidth:.2f} TB/s model {ns.model}", flush=True)
    if ns.paired:
        print_paired(ns)
        return
    rows, rounds = {}, []
    for round_index in range(ns.repeat):
        shift = round_index % len(ns.names)
        rounds.append({})
        for name in ns.names[shift:] + ns.names[:shift]:
            started = time.time()
            result = run_one(name, ns, ["--profile", ns.profile] if ns.profile else [])
            if result is None:
                continue
            rows[name] = rounds[-1][name] = result
            rows[name].update(wall_s=round(time.time() - started, 1), round=round_index)
            print(json.dumps(rows[name]), flush=True)
    print("\n| optimizer | step ms median | step ms mean | step mean / AdamW's | opt ms mean | opt host ms mean |"
          " opt / baseline | achieved / copy bandwidth | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        base, bf16_params = split_param_dtype(name)
        bytes_per_param = BYTES_PER_PARAM.get(base.replace("_master", ""), 28)
        adamw = rows.get("adamw_fused" + (BF16_PARAMS if bf16_params else ""))
        baseline = rows.get(baseline_name(name))
        ratio = r["opt_ms_mean"] / baseline["opt_ms_mean"] if baseline else float("nan")
        step_ratio = r["step_ms_mean"] / adamw["step_ms_mean"] if adamw else float("nan")
        achieved = bytes_per_param * r["params_M"] * 1e6 / (r["opt_ms_mean"] / 1e3) / 1e12
        fraction = "-" if bf16_params else f"{achieved / bandwidth:.2f}"
        print(f"| {name} | {r['step_ms_median']} | {r['step_ms_mean']} | {step_ratio:.2f} | {r['opt_ms_mean']} |"
              f" {r['opt_host_ms_mean']} | {ratio:.2f} | {fraction} | {r['peak_GiB']} |")
    if ns.repeat > 1:
        print_paired_ratios(rounds)


def run_one(name, ns, extra=()):
    """Run ``--one name`` in a fresh process; its RESULT dict, or None after printing why it failed."""
    config = ["--fused-config", ns.fused_config] if ns.fused_config else []
    out = subprocess.run([sys.executable, __file__, "--model", ns.model, "--one", name, *config, *extra],
                         capture_output=True, text=True, timeout=600)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if not line:
        print(f"FAIL {name}: {out.stderr[-1500:]}", flush=True)
        return None
    return json.loads(line[0][7:])


def print_paired(ns):
    """``--paired``: one process per name (its baseline beside it), then a table of the per-round ratios."""
    results = []
    for name in ns.names:
        if name != baseline_name(name):
            result = run_one(name, ns, ["--paired", str(ns.paired)])
            if result:
                print(json.dumps(result), flush=True)
                results.append(result)
    print("\n| optimizer | baseline | block steps | step ms per block | baseline step ms per block | ratio per round |"
          " median ratio |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['baseline']} | {r['block_steps']} | {', '.join(map(str, r['step_ms']))} |"
              f" {', '.join(map(str, r['baseline_step_ms']))} | {', '.join(map(str, r['ratios']))} |"
              f" {r['median_ratio']:.3f} |")


def print_paired_ratios(rounds):
    """Per name: each round's step mean over the same round's AdamW, and their median (the last table's
    ratios come from one round and so carry the process-to-process spread of one pair)."""
    print("\n| optimizer | step ms mean per round | / AdamW per round | median / AdamW |")
    print("|---|---|---|---|")
    for name in dict.fromkeys(name for round_rows in rounds for name in round_rows):
        steps = [r[name]["step_ms_mean"] for r in rounds if name in r]
        adamw = "adamw_fused" + (BF16_PARAMS if split_param_dtype(name)[1] else "")
        ratios = [r[name]["step_ms_mean"] / r[adamw]["step_ms_mean"] for r in rounds if name in r and adamw in r]
        median = statistics.median(ratios) if ratios else float("nan")
        print(f"| {name} | {', '.join(f'{v:.1f}' for v in steps)} | {', '.join(f'{v:.3f}' for v in ratios)} |"
              f" {median:.3f} |")


if __name__ == "__main__":
    main()
