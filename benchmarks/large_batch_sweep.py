"""Batch-size sweep at a fixed number of epochs: the generalization gap, and LARS + scaling + warmup closing it.

Runs the recipe `digits_cnn_large_batch` (small BatchNorm CNN on scikit-learn digits) at batch 32 (the
reference) and 2x .. 16x, for three methods:
  sgd_ref_lr   plain SGD momentum 0.9 at the reference learning rate, HF cosine schedule, no callbacks;
  lars_linear  LARS, linear LR scaling rule (Goyal), gradual warmup over the first epoch;
  lars_sqrt    LARS, square-root scaling rule (the recipe's default), gradual warmup over the first epoch.
Prints a markdown table of held-out accuracy, optimizer steps and wall time.

    python benchmarks/large_batch_sweep.py [--epochs 20] [--multipliers 1 2 4 8 16] [--out sweep.json]
"""

import argparse
import json
import math
import time

from hf_colossal.recipes.runner import run_recipe
from hf_colossal.recipes.schema import load_recipe

REFERENCE_BATCH = 32
TRAIN_SIZE = 1437  # digits: 1,797 images, 360 held out


def run(method, batch, epochs, seed, out_dir):
    steps_per_epoch = math.ceil(TRAIN_SIZE / batch)
    common = [f"training.per_device_train_batch_size={batch}", f"training.num_train_epochs={epochs}",
              f"training.output_dir={out_dir}/{method}_{batch}", "training.disable_tqdm=true",
              f"training.seed={seed}", f"training.logging_steps={max(1, steps_per_epoch // 2)}"]
    if method == "sgd_ref_lr":
        overrides = [*common, "training.optim=sgd", "training.optim_args=momentum=0.9", "training.learning_rate=0.05",
                     "callbacks=[]"]
    else:
        rule = method.split("_")[1]
        overrides = [*common, f"callbacks=[{{name: lr_scaling, reference_batch_size: {REFERENCE_BATCH}, rule: {rule}}},"
                              f" {{name: warmup, warmup_steps: {steps_per_epoch}, shape: gradual}}]"]
    started = time.time()
    metrics = run_recipe(load_recipe("digits_cnn_large_batch", overrides))
    return {"method": method, "batch": batch, "accuracy": metrics["eval_accuracy"], "steps": metrics["global_step"],
            "wall_s": round(time.time() - started, 1), "seed": seed}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--multipliers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/large_batch_sweep.json")
    ns = parser.parse_args()
    rows = [run(method, REFERENCE_BATCH * k, ns.epochs, ns.seed, "runs/sweep")
            for method in ("sgd_ref_lr", "lars_linear", "lars_sqrt") for k in ns.multipliers]
    with open(ns.out, "w") as f:
        json.dump(rows, f, indent=1)
    reference = {r["method"]: r["accuracy"] for r in rows if r["batch"] == REFERENCE_BATCH}
    print("\n| method | batch | held-out accuracy | vs its batch-32 result (points) | steps | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        delta = 100 * (r["accuracy"] - reference.get(r["method"], float("nan")))
        print(f"| {r['method']} | {r['batch']} | {r['accuracy']:.4f} | {delta:+.2f} | {r['steps']} | {r['wall_s']} |")


if __name__ == "__main__":
    main()
