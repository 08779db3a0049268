"""Infrequent synchronisation: (post-)local SGD model averaging and DiLoCo outer steps.

* Local SGD / post-local SGD — Lin, Stich, Patel, Jaggi, "Don't Use Large Mini-Batches, Use Local SGD", ICLR 2020
  (arXiv:1808.07217): after ``warmup_steps`` ordinary (all-reduced) steps, each rank steps on its own gradient and
  the parameters are averaged every H optimizer steps: ``x <- mean_w x_w``.
* DiLoCo — Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models", 2023
  (arXiv:2311.08105), Algorithm 1: H inner steps of the (inner) optimizer on each rank, then an outer step on the
  averaged pseudo-gradient with Nesterov momentum (paper: outer lr 0.7, momentum 0.9)::

      delta = mean_w (theta_anchor - theta_w)
      buf   = mu * buf + delta
      theta_anchor -= lr_outer * (delta + mu * buf)        # torch SGD's Nesterov form
      theta_w = theta_anchor                               # every rank restarts from the same point

  With ``lr_outer = 1`` and ``mu = 0`` the outer step is exactly local SGD's averaging.

``sync_dtype=bfloat16`` all-reduces ``delta`` in bf16 (DiLoCo's pseudo-gradients tolerate low precision: Douillard
et al. 2025, "Streaming DiLoCo", Sec. 3.3); local SGD then runs as the outer step above with ``lr_outer = 1, mu = 0``
so that only the change since the last sync is rounded, never the weights themselves.

The gradient hook sends nothing during local phases; the optimizer's inner state (Adam moments) stays local, as in
both papers. The anchor and momentum are identical on all ranks (fp32 copies of the parameters).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._common import ByteCounter


def _by_dtype(tensors: list[torch.Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return groups


def all_reduce_mean_(tensors: list[torch.Tensor], group, world_size: int, counter: ByteCounter) -> None:
    """Average a list of tensors across ranks in place, one flat all-reduce per dtype/device."""
    for indices in _by_dtype(tensors).values():
        members = [tensors[i] for i in indices]
        flat = torch.cat([t.detach().reshape(-1) for t in members])
        counter.add("all_reduce", flat)
        dist.all_reduce(flat, group=group)
        flat.div_(world_size)
        for t, piece in zip(members, torch.split(flat, [t.numel() for t in members])):
            t.detach().copy_(piece.view_as(t))


@torch.no_grad()
def average_parameters(params: list[torch.Tensor], group, world_size: int, counter: ByteCounter) -> None:
    all_reduce_mean_(list(params), group, world_size, counter)


class DiLoCoState:
    """Anchor (the last global parameters) and outer Nesterov momentum, fp32, identical on every rank."""

    def __init__(self, lr: float, momentum: float, nesterov: bool = True,
                 sync_dtype: torch.dtype = torch.float32) -> None:
        self.lr, self.momentum, self.nesterov, self.sync_dtype = lr, momentum, nesterov, sync_dtype
        self.anchor: list[torch.Tensor] | None = None
        self.buf: list[torch.Tensor] | None = None

    @torch.no_grad()
    def start(self, params: list[torch.Tensor]) -> None:
        """Anchor at ``params`` (identical on every rank: right after DDP's broadcast, a sync or a warm-up)."""
        self.anchor = [p.detach().float().clone() for p in params]
        self.buf = [torch.zeros_like(a) for a in self.anchor] if self.momentum else []

    def forget(self) -> None:
        """Drop the anchor (taken from weights that were since replaced); the next sync re-anchors."""
        self.anchor, self.buf = None, None

    @torch.no_grad()
    def outer_step(self, params: list[torch.Tensor], group, world_size: int, counter: ByteCounter) -> None:
        if self.anchor is None:  # no valid anchor: the ranks may differ, so average in fp32 and anchor there
            all_reduce_mean_([p.detach() for p in params], group, world_size, counter)
            self.start(params)
            return
        delta = [(a - p.detach().float()).to(self.sync_dtype) for a, p in zip(self.anchor, params)]
        all_reduce_mean_(delta, group, world_size, counter)
        delta = [d.float() for d in delta]
        outer_update_(self.anchor, self.buf, delta, self.lr, self.momentum, self.nesterov)
        for p, a in zip(params, self.anchor):
            p.detach().copy_(a)

    def state_dict(self) -> dict:
        if self.anchor is None:
            return {}
        return {"anchor": [a.cpu().clone() for a in self.anchor], "buf": [b.cpu().clone() for b in self.buf]}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        if state.get("anchor") is not None:
            self.anchor = [a.to(device) for a in state["anchor"]]
            self.buf = [b.to(device) for b in state["buf"]]
        else:
            self.forget()


def outer_update_(anchor, buf, delta, lr: float, momentum: float, nesterov: bool) -> None:
    """In place: ``buf = mu buf + delta; anchor -= lr (delta + mu buf)`` (or ``lr buf`` without Nesterov)."""
    if momentum:
        torch._foreach_mul_(buf, momentum)
        torch._foreach_add_(buf, delta)
        step = torch._foreach_add(delta, buf, alpha=momentum) if nesterov else buf
    else:
        step = delta
    torch._foreach_add_(anchor, step, alpha=-lr)
