"""Hessian-free vs AdamW on Martens' deep autoencoder, trained from scratch on the 1,437 sklearn training digits.

Model: 64-256-128-32-128-256-64, logistic hidden units, linear 32-unit code, sigmoid-BCE reconstruction loss,
Martens' sparse initialisation (hf_colossal.nn.DeepAutoencoder). Reported error: Martens' training reconstruction
error, the squared error per image summed over the 64 pixels, on the whole training set.

Each run gets the same wall-clock budget (training time only; the error evaluations are excluded from the clock).
AdamW is tuned over learning rates (mini-batches of 128, the usual setting); Hessian-free uses the full training
set as its gradient batch and a 10% curvature mini-batch (Martens 2010 Sec. 4.3). The cost of a Hessian-free step
is counted in backward-pass equivalents (forward 1/2, backward 1, jvp 1, per-example gradients 3/2; in units of
one pass over the gradient batch) and measured in seconds; the primitives are timed too.

    python benchmarks/hessian_free_autoencoder.py            # ~4-5 minutes on the 2-core CPU, 1 thread
    python benchmarks/hessian_free_autoencoder.py --budget 10 --lrs 3e-3   # quick look

Writes benchmarks/results/hessian_free_autoencoder.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from hf_colossal.nn.autoencoder import DeepAutoencoder
from hf_colossal.optim.hessian_free import GaussNewtonOperator, HessianFree, HessianFreeBatch
from hf_colossal.recipes.data import digits_arrays

SIZES = (64, 256, 128, 32, 128, 256, 64)
RESULTS = Path(__file__).parent / "results"


def error(model, x):
    with torch.no_grad():
        return float(DeepAutoencoder.squared_error(model.reconstruct_logits(x), x))


class Clock:
    """Training seconds, paused while the error is evaluated."""

    def __init__(self):
        self.spent, self.started = 0.0, time.perf_counter()

    def now(self):
        return self.spent + time.perf_counter() - self.started

    def pause(self):
        self.spent = self.now()

    def resume(self):
        self.started = time.perf_counter()


def run_adamw(x, lr, budget, batch_size, every, seed):
    torch.manual_seed(seed)
    model = DeepAutoencoder(SIZES, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    curve = [{"seconds": 0.0, "error": error(model, x), "steps": 0}]
    clock, steps, next_eval = Clock(), 0, every
    while clock.now() < budget:
        perm = torch.randperm(len(x))
        for start in range(0, len(x), batch_size):
            xb = x[perm[start:start + batch_size]]
            loss = F.binary_cross_entropy_with_logits(model.reconstruct_logits(xb), xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if clock.now() >= next_eval or clock.now() >= budget:
                clock.pause()
                curve.append({"seconds": clock.spent, "error": error(model, x), "steps": steps})
                next_eval += every
                clock.resume()
            if clock.now() >= budget:
                break
    return {"optimizer": "adamw", "lr": lr, "batch_size": batch_size, "curve": curve, "steps": steps,
            "seconds_per_step": clock.now() / max(steps, 1), "bpe_per_step": 1.5 * batch_size / len(x)}


def run_hessian_free(x, budget, options, every, seed):
    torch.manual_seed(seed)
    model = DeepAutoencoder(SIZES, seed=seed)
    opt = HessianFree(model.parameters(), model, **options)
    batch = HessianFreeBatch(targets=x, loss="sigmoid_bce", args=(x,))
    curve = [{"seconds": 0.0, "error": error(model, x), "steps": 0}]
    clock, next_eval, cg_iters = Clock(), every, []
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


def time_primitives(x, fraction, repeats=20):
    """Seconds of a forward, a forward+backward, a jvp and a Gauss-Newton product (curvature batch), 1 thread."""
    model = DeepAutoencoder(SIZES)
    params = {n: p.detach() for n, p in model.named_parameters()}
    rows = max(1, round(fraction * len(x)))

    def timed(fn):
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats

    def forward_backward():
        F.binary_cross_entropy_with_logits(model.reconstruct_logits(x), x).backward()

    xc = x[:rows]
    op = GaussNewtonOperator(lambda p: torch.func.functional_call(model, p, (xc,))["logits"], params, "sigmoid_bce",
                             xc)
    tangent = {n: torch.randn_like(p) for n, p in params.items()}
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
    parser.add_argument("--out", default=str(RESULTS / "hessian_free_autoencoder"))
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    x = torch.from_numpy(digits_arrays()["train"][0])
    every = cli.budget / 15
    hf_options = dict(damping=1e-3, curvature_batch_fraction=0.1, cg_max_iters=40, min_damping=1e-6)
    runs = [run_hessian_free(x, cli.budget, hf_options, every, cli.seed)]
    print(f"hessian_free: final error {runs[0]['curve'][-1]['error']:.4f} after {runs[0]['steps']} steps", flush=True)
    for lr in (float(v) for v in cli.lrs.split(",")):
        runs.append(run_adamw(x, lr, cli.budget, cli.batch_size, every, cli.seed))
        print(f"adamw lr={lr:g}: final error {runs[-1]['curve'][-1]['error']:.4f} after {runs[-1]['steps']} steps",
              flush=True)
    primitives = time_primitives(x, hf_options["curvature_batch_fraction"])
    hf, adams = runs[0], runs[1:]
    best_adam = min(adams, key=lambda r: r["curve"][-1]["error"])
    verdict = hf["curve"][-1]["error"] < best_adam["curve"][-1]["error"]

    lines = [
        f"Deep autoencoder {'-'.join(map(str, SIZES))} on the {len(x)} sklearn training digits, from scratch, "
        f"{cli.budget:g} s of training per run, torch {torch.__version__}, {cli.threads} thread(s) on the CPU.",
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
    out = Path(cli.out)
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
    axis.set_xlabel("training seconds (1 CPU thread)")
    axis.set_ylabel("train reconstruction error (squared, per image)")
    axis.set_title("Deep autoencoder on digits")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
