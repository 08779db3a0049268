"""Per-layer gradient norms, update norms and trust ratios in Trainer's normal logs.

Layer-wise adaptive optimizers (LARS: You, Gitman, Ginsburg 2017, eq. 6; LAMB: You et al. 2019, Algorithm 2)
scale each layer's step by a trust ratio; when a large-batch run diverges or stalls, the per-layer ratios and
the size of each layer's update relative to its weights are the first thing to look at (LARS paper, Table 1:
||w|| / ||grad|| across AlexNet layers). :class:`LayerStatsCallback` puts them next to ``loss`` and
``learning_rate`` in the log Trainer already writes, so TensorBoard, W&B and ``trainer_state.json`` see them.

Cost: nothing on steps that are not logged. On a logged step: ``torch._foreach_norm`` over the gradients, the
parameters and the applied updates, one copy of the parameters (to measure the update), and one host sync to
read all numbers at once. The trust ratios are the ones the optimizer computed in that step
(:meth:`~hf_colossal.optim._foreach.LayerwiseOptimizer.record_trust_ratios`), not a recomputation.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor
from transformers import TrainerCallback

from ..optim._foreach import foreach_norms

STATISTICS = ("grad_norm", "param_norm", "update_norm", "update_ratio", "trust_ratio")


class LayerStatsCallback(TrainerCallback):
    """Log per-parameter statistics on the steps Trainer logs (``--logging_steps``).

    For every trainable parameter whose name matches ``include`` (a regex, searched; default: all), at the logged
    optimizer step: ``grad_norm`` (after unscaling and clipping: what the optimizer received), ``param_norm``
    (before the step), ``update_norm`` (``||w_after - w_before||``, the step really applied), ``update_ratio``
    (update_norm / param_norm before the step) and, for hf_colossal's LAMB and LARS, ``trust_ratio``. Keys are
    ``layers/<name>/<statistic>``; ``layers/summary/<statistic>_{min,max}`` summarise them across parameters.
    ``per_layer=False`` logs only the summary.

    Requires ``--logging_strategy steps`` (the default). Parameters held as DTensor shards (FSDP2) are reported by
    their local shard. The parameter copy of a logged step costs one parameter-sized buffer for that step; set
    ``update_norms=False`` to skip it (no update_norm / update_ratio then).
    """

    def __init__(self, include: str | None = None, per_layer: bool = True, update_norms: bool = True) -> None:
        self.include = re.compile(include) if include is not None else None
        self.per_layer = per_layer
        self.update_norms = update_norms
        self._armed = False
        self._names: list[str] = []
        self._params: list[Tensor] = []
        self._before: dict[str, list[Tensor]] = {}
        self._pending: dict[str, float] = {}

    def _will_log(self, args: Any, state: Any) -> bool:
        step = state.global_step + 1  # the step about to run
        if args.logging_strategy != "steps":
            raise ValueError(
                f"LayerStatsCallback logs on the steps Trainer logs: it needs --logging_strategy steps "
                f"(got {args.logging_strategy!r})"
            )
        return step % state.logging_steps == 0 or (step == 1 and args.logging_first_step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        chosen = [(n, p) for n, p in named if self.include is None or self.include.search(n)]
        if not chosen:
            raise ValueError(f"LayerStatsCallback(include={self.include.pattern!r}) matches no trainable parameter")
        self._names = [n for n, _ in chosen]
        self._params = [p for _, p in chosen]

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self._armed = self._will_log(args, state)
        inner = getattr(optimizer, "optimizer", optimizer)
        if self._armed and hasattr(inner, "record_trust_ratios"):
            inner.record_trust_ratios()

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._armed:
            return
        with_grad = [(n, p) for n, p in zip(self._names, self._params) if p.grad is not None]
        params = [p for _, p in with_grad]
        self._before = {
            "names": [n for n, _ in with_grad],
            "params": params,
            "grad_norm": foreach_norms([p.grad for p in params]),
            "param_norm": foreach_norms(params),
            "copy": torch._foreach_mul(params, 1.0) if self.update_norms and params else [],
        }

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not self._armed or not self._before:
            return
        before, self._before, self._armed = self._before, {}, False
        params = before["params"]
        columns: dict[str, list[Tensor]] = {"grad_norm": before["grad_norm"], "param_norm": before["param_norm"]}
        if self.update_norms:
            columns["update_norm"] = foreach_norms(torch._foreach_sub(params, before["copy"]))
        inner = getattr(optimizer, "optimizer", optimizer)
        if hasattr(inner, "take_trust_ratios"):
            ratios = inner.take_trust_ratios()
            if ratios:
                columns["trust_ratio"] = [ratios.get(p, torch.full((), float("nan"))) for p in params]
        values = _to_host(columns)
        if self.update_norms:
            values["update_ratio"] = [
                u / w if w > 0 else float("nan") for u, w in zip(values["update_norm"], values["param_norm"])
            ]
        self._pending = _format(before["names"], values, self.per_layer)

    def contribute_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """The statistics of the logged step, for Trainer's training log (see ``integrations.transformers``)."""
        if "loss" not in logs:  # an evaluation or end-of-training log
            return {}
        pending, self._pending = self._pending, {}
        return pending


def _to_host(columns: dict[str, list[Tensor]]) -> dict[str, list[float]]:
    """All statistics as Python floats, with one device-to-host copy per device."""
    flat = [t.float().reshape(()) for column in columns.values() for t in column]
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(flat):
        by_device.setdefault(tensor.device, []).append(index)
    values = [0.0] * len(flat)
    for indices in by_device.values():
        for index, value in zip(indices, torch.stack([flat[i] for i in indices]).tolist()):
            values[index] = value
    out, start = {}, 0
    for key, column in columns.items():
        out[key], start = values[start : start + len(column)], start + len(column)
    return out


def _format(names: list[str], columns: dict[str, list[float]], per_layer: bool) -> dict[str, float]:
    logs: dict[str, float] = {}
    for statistic, values in columns.items():
        finite = [v for v in values if v == v]
        if finite:
            logs[f"layers/summary/{statistic}_min"] = min(finite)
            logs[f"layers/summary/{statistic}_max"] = max(finite)
        if per_layer:
            logs.update({f"layers/{name}/{statistic}": v for name, v in zip(names, values) if v == v})
    return logs
