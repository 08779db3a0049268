"""Hessian-free vs AdamW on Martens' deep autoencoder, trained from scratch on the 1,437 sklearn training digits
(default, CPU) or on the 60,000 Fashion-MNIST training images (``--data fashion_mnist``, meant for a GPU).

Model: digits 64-256-128-32-128-256-64; Fashion-MNIST 784-1000-500-250-30-250-500-1000-784, Martens' MNIST
autoencoder (Hinton & Salakhutdinov 2006; Martens 2010 Sec. 5). Logistic hidden units, linear code, sigmoid-BCE
reconstruction loss, Martens' sparse initialisation (hf_colossal.nn.DeepAutoencoder). Reported error: Martens'
training reconstruction error, the squared error per image summed over the pixels, on the whole training set.

Each run gets the same wall-clock budget (training time only; the error evaluations are excluded from the clock).
AdamW is tuned over learning rates (mini-batches of 128, the usual setting); Hessian-free uses the full training
set as its gradient batch and a 10% curvature mini-batch (Martens 2010 Sec. 4.3). The cost of a Hessian-free step
is counted in backward-pass equivalents (forward 1/2, backward 1, jvp 1, per-example gradients 3/2; in units of
one pass over the gradient batch) and measured in seconds; the primitives are timed too.

    python benchmarks/hessian_free_autoencoder.py            # ~4-5 minutes on the 2-core CPU, 1 thread
    python benchmarks/hessian_free_autoencoder.py --budget 10 --lrs 3e-3   # quick look
    python benchmarks/hessian_free_autoencoder.py --data fashion_mnist --device cuda --budget 60 \
        --lrs 1e-4,3e-4,1e-3 --batch-size 256 --hf-options "damping=1,curvature_batch_fraction=0.1,cg_max_iters=250"
    # the same with TF32 matmuls for every run (not measured yet)
    ... --matmul-precision high

On CUDA the clock synchronises the device when it is read (AdamW's loop reads it every ``--check-every`` steps,
so the budget overshoots by at most that many steps). Fashion-MNIST comes from Debian's dataset-fashion-mnist
(``hf_colossal.recipes.data.fashion_mnist_arrays``; ``--data-dir`` for another folder).

Writes benchmarks/results/hessian_free_autoencoder[_fashion_mnist].{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from hf_colossal.nn.autoencoder import DeepAutoencoder
from hf_colossal.optim.configs import HessianFreeConfig
from hf_colossal.optim.hessian_free import GaussNewtonOperator, HessianFree, HessianFreeBatch
from hf_colossal.recipes.data import digits_arrays, fashion_mnist_arrays

SIZES = {"digits": (64, 256, 128, 32, 128, 256, 64),
         "fashion_mnist": (784, 1000, 500, 250, 30, 250, 500, 1000, 784)}
HF_OPTIONS = "damping=1e-3,curvature_batch_fraction=0.1,cg_max_iters=40,min_damping=1e-6"
RESULTS = Path(__file__).parent / "results"


def error(model, x):
    with torch.no_grad():
        return float(DeepAutoencoder.squared_error(model.reconstruct_logits(x), x))


class Clock:
    """Training seconds, paused while the error is evaluated; on CUDA, reading it waits for the queued work."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.spent, self.started = 0.0, time.perf_counter()

    def now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return self.spent + time.perf_counter() - self.started

    def pause(self):
        self.spent = self.now()

    def resume(self):
        self.started = time.perf_counter()


def run_adamw(x, sizes, lr, budget, batch_size, every, seed, check_every):
    torch.manual_seed(seed)
    model = DeepAutoencoder(sizes, seed=seed).to(x.device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    curve = [{"seconds": 0.0, "error": error(model, x), "steps": 0}]
    clock, steps, next_eval, now = Clock(x.device), 0, every, 0.0
    while now < budget:
        perm = torch.randperm(len(x), device=x.device)
        for start in range(0, len(x), batch_size):
            xb = x[perm[start:start + batch_size]]
            loss = F.binary_cross_entropy_with_logits(model.reconstruct_logits(xb), xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if steps % check_every:
                continue
            now = clock.now()
            if now >= next_eval or now >= budget:
                clock.pause()
                curve.append({"seconds": clock.spent, "error": error(model, x), "steps": steps})
                next_eval += every
                clock.resume()
            if now >= budget:
                break
    return {"optimizer": "adamw", "lr": lr, "batch_size": batch_size, "curve": curve, "steps": steps,
            "seconds_per_step": clock.now() / max(steps, 1), "bpe_per_step": 1.5 * batch_size / len(x)}


def run_hessian_free(x, sizes, budget, options, every, seed):
    torch.manual_seed(seed)
    model = DeepAutoencoder(sizes, seed=seed).to(x.device)
    opt = HessianFree(model.parameters(), model, **options)
    batch = HessianFreeBatch(targets=x, loss="sigmoid_bce", args=(x,))
    curve = [{"seconds": 0.0, "error": error(model, x), "steps": 0}]
    clock, next_eval, cg_iters = Clock(x.device), every, []
    while clock.now() < budget:
        opt.step(batch)
        cg_iters.append(opt.last_step.get("cg_iters", 0))
        if clock.now() >= next_eval or clock.now() >= budget:
            clock.pause()
            curve.append({"seconds": clock.spent, "error": error(model, x), "steps": opt.step_calls,
                          "damping": opt.damping})
            next_eval += every
            clock.resume()
    seconds = clock.now()
    return {"optimizer": "hessian_free", "lr": None, "options": options, "curve": curve, "steps": opt.step_calls,
            "accepted_steps": opt.accepted_steps, "seconds_per_step": seconds / opt.step_calls,
            "bpe_per_step": opt.backward_equivalents() / opt.step_calls, "passes": opt.passes,
            "mean_cg_iters": sum(cg_iters) / len(cg_iters), "final_damping": opt.damping}


def time_primitives(x, sizes, fraction, repeats=20):
    """Seconds of a forward, a forward+backward (full batch) and a Gauss-Newton product (curvature batch)."""
    model = DeepAutoencoder(sizes).to(x.device)
    params = {n: p.detach() for n, p in model.named_parameters()}
    rows = max(1, round(fraction * len(x)))
    clock = Clock(x.device)

    def timed(fn):
        fn()
        start = clock.now()
        for _ in range(repeats):
            fn()
        return (clock.now() - start) / repeats

    def forward_backward():
        F.binary_cross_entropy_with_logits(model.reconstruct_logits(x), x).backward()

    xc = x[:rows]
    op = GaussNewtonOperator(lambda p: torch.func.functional_call(model, p, (xc,))["logits"], params, "sigmoid_bce",
                             xc)
    tangent = torch.randn(sum(p.numel() for p in params.values()), device=x.device)
    with torch.no_grad():
        forward = timed(lambda: model.reconstruct_logits(x))
    return {"forward_full_batch": forward, "forward_backward_full_batch": timed(forward_backward),
            "gn_product_curvature_batch": timed(lambda: op(tangent)), "curvature_rows": rows}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=45.0, help="training seconds per run")
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="AdamW learning rates")
    parser.add_argument("--batch-size", type=int, default=128, help="AdamW mini-batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=sorted(SIZES), default="digits")
    parser.add_argument("--data-dir", help="Fashion-MNIST folder (default: $HF_COLOSSAL_FASHION_MNIST or Debian's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--matmul-precision", choices=("highest", "high"), default="highest",
                        help="torch.set_float32_matmul_precision for every run: 'high' lets CUDA use TF32 (about "
                             "1.6x per early Hessian-free step on an H200, benchmarks/RESULTS.md)")
    parser.add_argument("--train-rows", type=int, help="use only the first N training images (smoke runs)")
    parser.add_argument("--hf-options", default=HF_OPTIONS, help="optim_args of the Hessian-free run")
    parser.add_argument("--check-every", type=int, default=None,
                        help="AdamW steps between clock reads (default: 1 on the CPU, 25 on CUDA)")
    parser.add_argument("--out", help="output path without suffix (default: results/hessian_free_autoencoder"
                                      "[_fashion_mnist])")
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    torch.set_float32_matmul_precision(cli.matmul_precision)
    device = torch.device(cli.device)
    arrays = digits_arrays() if cli.data == "digits" else fashion_mnist_arrays(cli.data_dir)
    x = torch.from_numpy(arrays["train"][0][:cli.train_rows]).to(device)
    sizes = SIZES[cli.data]
    check_every = cli.check_every or (25 if device.type == "cuda" else 1)
    every = cli.budget / 15
    hf_options = HessianFreeConfig.from_optim_args(cli.hf_options).optimizer_kwargs()
    runs = [run_hessian_free(x, sizes, cli.budget, hf_options, every, cli.seed)]
    print(f"hessian_free: final error {runs[0]['curve'][-1]['error']:.4f} after {runs[0]['steps']} steps", flush=True)
    for lr in (float(v) for v in cli.lrs.split(",")):
        runs.append(run_adamw(x, sizes, lr, cli.budget, cli.batch_size, every, cli.seed, check_every))
        print(f"adamw lr={lr:g}: final error {runs[-1]['curve'][-1]['error']:.4f} after {runs[-1]['steps']} steps",
              flush=True)
    primitives = time_primitives(x, sizes, hf_options["curvature_batch_fraction"])
    hf, adams = runs[0], runs[1:]
    best_adam = min(adams, key=lambda r: r["curve"][-1]["error"])
    verdict = hf["curve"][-1]["error"] < best_adam["curve"][-1]["error"]

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cli.threads} thread(s) on the CPU"
    lines = [
        f"Deep autoencoder {'-'.join(map(str, sizes))} on the {len(x)} {cli.data} training images, from scratch, "
        f"{cli.budget:g} s of training per run, torch {torch.__version__}, {where}, fp32 matmul precision "
        f"{cli.matmul_precision!r}. Command: python "
        f"{' '.join(sys.argv)}",
        "",
        "| optimizer | lr | steps | final train error | error at 1/3 budget | s / step | BPE / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        third = min(r["curve"], key=lambda p: abs(p["seconds"] - cli.budget / 3))
        lines.append(
            f"| {r['optimizer']} | {'-' if r['lr'] is None else format(r['lr'], 'g')} | {r['steps']} | "
            f"{r['curve'][-1]['error']:.4f} | {third['error']:.4f} | {r['seconds_per_step']:.4f} | "
            f"{r['bpe_per_step']:.2f} |"
        )
    lines += [
        "",
        f"Hessian-free {'beats' if verdict else 'does NOT beat'} the best AdamW (lr={best_adam['lr']:g}) at equal "
        f"wall clock: {hf['curve'][-1]['error']:.4f} vs {best_adam['curve'][-1]['error']:.4f}.",
        f"Hessian-free step: {hf['mean_cg_iters']:.1f} CG iterations on average, {hf['bpe_per_step']:.1f} "
        f"backward-pass equivalents of the full batch ({hf['seconds_per_step']:.3f} s); passes so far "
        f"{ {k: round(v, 1) for k, v in hf['passes'].items()} }.",
        f"Primitives: forward {primitives['forward_full_batch'] * 1e3:.2f} ms, forward+backward "
        f"{primitives['forward_backward_full_batch'] * 1e3:.2f} ms (full batch); one Gauss-Newton product "
        f"{primitives['gn_product_curvature_batch'] * 1e3:.2f} ms on the {primitives['curvature_rows']}-row "
        "curvature batch.",
    ]
    table = "\n".join(lines)
    print(table)
    out = Path(cli.out or RESULTS / ("hessian_free_autoencoder" + ("" if cli.data == "digits" else "_" + cli.data)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"runs": runs, "primitives": primitives, "budget": cli.budget,
                                                    "hf_beats_best_adamw": verdict}, indent=1, default=str))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for r in runs:
        label = "Hessian-free" if r["lr"] is None else f"AdamW lr={r['lr']:g}"
        axis.plot([p["seconds"] for p in r["curve"]], [p["error"] for p in r["curve"]], "-" if r["lr"] is None
                  else "--", label=label)
    axis.set_yscale("log")
    axis.set_xlabel(f"training seconds ({where})")
    axis.set_ylabel("train reconstruction error (squared, per image)")
    axis.set_title(f"Deep autoencoder on {cli.data}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
