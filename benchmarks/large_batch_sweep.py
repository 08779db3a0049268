"""Batch-size sweep at a fixed number of epochs: the generalization gap, and scaling + warmup + LARS/LAMB closing it.

Sweeps (``hf_colossal.recipes.sweep.SWEEPS``; each method's reference learning rate is chosen from a small grid at
the reference batch first):
  digits  recipe digits_cnn_large_batch (BatchNorm CNN, scikit-learn digits), batch 32 -> 16x, 20 epochs:
          sgd_ref_lr (SGD momentum, no scaling), lars_linear, lars_sqrt (LARS + rule + gradual warmup, 1 epoch)
  bbc     recipe minilm_bbc_lamb (all-MiniLM-L6-v2, BBC topics, 128 tokens), batch 16 -> 16x, 3 epochs:
          adamw_ref_lr (AdamW, HF linear schedule, 10% warmup), adamw_sqrt and lamb_sqrt (rule + gradual warmup)
Writes the rows (JSON), a markdown table (stdout) and accuracy-vs-batch PNG.

    python benchmarks/large_batch_sweep.py --sweep digits
    python benchmarks/large_batch_sweep.py --sweep bbc --gpu [--model-path DIR]   # on a GPU
"""

import argparse
import json
from pathlib import Path

from hf_colossal.recipes.sweep import SWEEPS, format_table, plot, run_sweep


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", choices=sorted(SWEEPS), default="digits")
    parser.add_argument("--multipliers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu", action="store_true", help="train on the GPU (the digits recipe pins use_cpu)")
    parser.add_argument("--model-path", default=None, help="a local copy of the model instead of the embedded one")
    parser.add_argument("--out", default="runs/large_batch_sweep")
    ns = parser.parse_args()
    sweep = SWEEPS[ns.sweep]
    extra = ["training.use_cpu=false"] if ns.gpu else []
    if ns.model_path:
        extra += ["model.embedded=null", f"model.name_or_path={ns.model_path}"]
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = run_sweep(sweep, ns.multipliers, seed=ns.seed, out_dir=out / "runs", extra_overrides=extra,
                     methods=ns.methods, progress=lambda row: print("ROW", json.dumps(row), flush=True))
    (out / f"{ns.sweep}.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / f"{ns.sweep}.png", f"{sweep.recipe}, {sweep.epochs} epochs per batch size")
    print(format_table(rows, sweep.reference_batch))


if __name__ == "__main__":
    main()
