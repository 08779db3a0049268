"""Helpers shared by the optimizer-quality benchmarks (kfac_quality.py, second_order_quality.py).

A run is a dict with ``optimizer``, ``lr`` and ``curve``: a list of ``{"step", "seconds", "eval_loss"}`` points
(``seconds``: training wall clock up to that step, evaluation excluded). The target of a comparison is the lowest
final eval loss of the baseline runs; :func:`reach` records for each run the first evaluated step at or below it.
"""

import math

import torch


def autocast(device):
    """bf16 autocast on CUDA, nothing on the CPU (fp32 there)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_line(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"device {name} torch {torch.__version__}"


def best_final(rows):
    """The run with the lowest final eval loss (a non-finite one counts as infinite)."""
    def final(r):
        loss = r["curve"][-1]["eval_loss"]
        return loss if math.isfinite(loss) else math.inf

    return min(rows, key=final)


def first_hit(curve, target):
    """The first point of ``curve`` at or below ``target``, or None."""
    return next((p for p in curve if p["eval_loss"] <= target), None)


def reach(rows, target, steps):
    """Record on each run its final eval loss and when it first reached ``target`` (step, ratio to ``steps``,
    seconds); None where it never did."""
    for r in rows:
        hit = first_hit(r["curve"], target)
        r.update(target=target, final_eval_loss=r["curve"][-1]["eval_loss"],
                 steps_to_target=hit and hit["step"], seconds_to_target=hit and hit["seconds"],
                 step_ratio=hit and round(hit["step"] / steps, 3), total_seconds=r["curve"][-1]["seconds"])


def plot_curves(rows, target, path, title, *, solid, log_y=True, ylim=None):
    """Eval loss against step and against training seconds, one line per run (solid where ``solid(row)``, dashed
    otherwise), the target as a grey line; saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        style = "-" if solid(r) else "--"
        label = r.get("label") or f"{r['optimizer']} lr={r['lr']:g}"
        for axis, x in zip(axes, ("step", "seconds")):
            axis.plot([p[x] for p in r["curve"]], [p["eval_loss"] for p in r["curve"]], style, label=label)
    for axis, x in zip(axes, ("step", "train seconds")):
        axis.axhline(target, color="grey", linewidth=0.8)
        axis.set_xlabel(x)
        axis.set_ylabel("eval loss")
        if log_y:
            axis.set_yscale("log")
        if ylim is not None:
            axis.set_ylim(*ylim)
    axes[0].legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
