"""Batch-size sweeps at a fixed number of epochs: the generalization gap, and the rules that close it.

Goyal et al. 2017 (arXiv:1706.02677) and Hoffer et al. 2017 (arXiv:1705.08741): with the learning rate tuned
for a reference batch, training k times larger batches for the same epochs takes k times fewer steps and loses
accuracy; scaling the rate with the batch (linear or square-root rule) after a gradual warmup, and layer-wise
trust ratios (LARS, You et al. 2017; LAMB, You et al. 2019), recover it. A :class:`Sweep` runs one recipe at the
reference batch and at multiples of it for several methods, first choosing each method's reference learning
rate from a small grid at the reference batch (so "tuned" means measured here), and reports held-out accuracy,
steps and training wall time per epoch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .runner import run_recipe
from .schema import load_recipe


@dataclasses.dataclass(frozen=True)
class SweepMethod:
    """An optimizer setting: recipe overrides, the learning rates tried at the reference batch, and the rule.

    ``rule`` None: the same learning rate and the recipe's own schedule at every batch (the gap baseline);
    otherwise :class:`~hf_colossal.callbacks.LRScalingCallback` with that rule and a gradual
    :class:`~hf_colossal.callbacks.WarmupCallback` over ``warmup_epochs``.
    """

    name: str
    overrides: tuple[str, ...]
    learning_rates: tuple[float, ...]
    rule: str | None = None
    warmup_epochs: float = 1.0


@dataclasses.dataclass(frozen=True)
class Sweep:
    recipe: str
    reference_batch: int
    train_size: int
    epochs: int
    methods: tuple[SweepMethod, ...]
    common: tuple[str, ...] = ()

    def steps_per_epoch(self, batch: int) -> int:
        return math.ceil(self.train_size / batch)

    def overrides(self, method: SweepMethod, batch: int, lr: float, seed: int, output_dir: Path) -> list[str]:
        steps = self.steps_per_epoch(batch)
        overrides = [
            *self.common, *method.overrides, f"training.learning_rate={lr!r}",
            f"training.per_device_train_batch_size={batch}", f"training.num_train_epochs={self.epochs}",
            f"training.output_dir={output_dir}", "training.disable_tqdm=true", f"training.seed={seed}",
            f"training.logging_steps={max(1, steps // 2)}",
        ]
        if method.rule is None:
            return [*overrides, "callbacks=[]"]
        warmup = max(1, round(steps * method.warmup_epochs))
        return [
            *overrides, "training.warmup_steps=0",
            f"callbacks=[{{name: lr_scaling, reference_batch_size: {self.reference_batch}, rule: {method.rule}}}, "
            f"{{name: warmup, warmup_steps: {warmup}, shape: gradual}}]",
        ]


#: The sweeps of benchmarks/RESULTS.md. Learning rates are the rates at the reference batch.
SWEEPS: dict[str, Sweep] = {
    "digits": Sweep(
        recipe="digits_cnn_large_batch", reference_batch=32, train_size=1437, epochs=20,
        methods=(
            SweepMethod("sgd_ref_lr", ("training.optim=sgd", "training.optim_args=momentum=0.9"), (0.05,)),
            SweepMethod("lars_linear", (), (0.5,), rule="linear"),
            SweepMethod("lars_sqrt", (), (0.5,), rule="sqrt"),
        ),
    ),
    "bbc": Sweep(
        recipe="minilm_bbc_lamb", reference_batch=16, train_size=1679, epochs=3,
        common=("data.max_length=128", "training.eval_strategy='no'", "training.per_device_eval_batch_size=128",
                "training.weight_decay=0.01"),
        methods=(
            SweepMethod("adamw_ref_lr", ("training.optim=adamw_torch", "training.optim_args=null",
                                         "training.warmup_steps=0.1"), (5e-5, 1e-4, 2e-4)),
            SweepMethod("adamw_sqrt", ("training.optim=adamw_torch", "training.optim_args=null"), (5e-5, 1e-4, 2e-4),
                        rule="sqrt"),
            SweepMethod("lamb_sqrt", (), (5e-4, 1e-3, 2e-3), rule="sqrt"),
        ),
    ),
}


def _run(sweep: Sweep, method: SweepMethod, batch: int, lr: float, seed: int, out_dir: Path,
         extra: list[str]) -> dict[str, Any]:
    folder = out_dir / f"{method.name}_b{batch}_lr{lr:g}"
    recipe = load_recipe(sweep.recipe, [*sweep.overrides(method, batch, lr, seed, folder), *extra])
    started = time.time()
    metrics = run_recipe(recipe)
    return {
        "method": method.name, "batch": batch, "lr": lr, "accuracy": metrics["eval_accuracy"],
        "steps": metrics["global_step"], "train_s_per_epoch": round(metrics["train_seconds"] / sweep.epochs, 2),
        "wall_s": round(time.time() - started, 1), "seed": seed,
    }


def run_sweep(sweep: Sweep, multipliers: list[int], *, seed: int = 0, out_dir: str | Path = "runs/sweep",
              extra_overrides: list[str] | None = None, methods: list[str] | None = None,
              progress: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Tune each method's learning rate at the reference batch, then run it at every multiple; one row per run.

    Rows of the learning-rate search that lost carry ``"search": True``; the winner's row is the method's
    reference-batch result. ``progress`` is called with each row as it completes.
    """
    out_dir, extra = Path(out_dir), list(extra_overrides or [])
    chosen = [m for m in sweep.methods if methods is None or m.name in methods]
    if methods is not None and len(chosen) != len(methods):
        raise ValueError(f"unknown method in {methods}; methods of this sweep: {[m.name for m in sweep.methods]}")
    rows: list[dict[str, Any]] = []
    for method in chosen:
        search = []
        for lr in method.learning_rates:
            search.append(_run(sweep, method, sweep.reference_batch, lr, seed, out_dir, extra))
            if progress:
                progress(search[-1])
        best = max(search, key=lambda row: row["accuracy"])
        rows += [{**row, "search": row is not best} for row in search]
        for k in multipliers:
            if k != 1:
                rows.append({**_run(sweep, method, sweep.reference_batch * k, best["lr"], seed, out_dir, extra),
                             "search": False})
                if progress:
                    progress(rows[-1])
    return rows


def format_table(rows: list[dict[str, Any]], reference_batch: int) -> str:
    """Markdown: accuracy per method and batch, its change from the method's reference-batch result, time."""
    kept = [r for r in rows if not r.get("search")]
    reference = {r["method"]: r["accuracy"] for r in kept if r["batch"] == reference_batch}
    lines = ["| method | batch | lr at ref. batch | held-out accuracy | vs its ref.-batch result (points) | steps |"
             " train s / epoch |", "|---|---|---|---|---|---|---|"]
    for r in kept:
        delta = 100 * (r["accuracy"] - reference[r["method"]])
        lines.append(f"| {r['method']} | {r['batch']} | {r['lr']:g} | {r['accuracy']:.4f} | {delta:+.2f} | "
                     f"{r['steps']} | {r['train_s_per_epoch']} |")
    searched = [r for r in rows if r["batch"] == reference_batch]
    lines += ["", "Learning-rate search at the reference batch: " + "; ".join(
        f"{r['method']} lr {r['lr']:g}: {r['accuracy']:.4f}" for r in searched)]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str | Path, title: str) -> None:
    """Held-out accuracy against batch size (log scale), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    kept = [r for r in rows if not r.get("search")]
    for method in dict.fromkeys(r["method"] for r in kept):
        points = sorted((r["batch"], r["accuracy"]) for r in kept if r["method"] == method)
        ax.plot([b for b, _ in points], [a for _, a in points], "o-", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (same number of epochs)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
