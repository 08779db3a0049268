"""Ghost batch normalization (Hoffer, Hubara, Soudry 2017, "Train longer, generalize better", arXiv:1705.08741,
Sec. 4.1 and Algorithm 1).

With a large batch, BatchNorm's statistics over the whole batch lose the regularising noise of small-batch
statistics. Ghost BN splits each training batch into "ghost" batches of ``ghost_batch_size`` samples, normalises
each with its own mean and variance, and updates the running statistics once per ghost batch in order
(Algorithm 1's running-average update). Evaluation is unchanged: the running statistics are used as before.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class GhostBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm that normalises training batches in ghost batches of ``ghost_batch_size`` samples.

    Same parameters, buffers and state_dict keys as the BatchNorm it replaces; identical in evaluation and for
    training batches no larger than ``ghost_batch_size``. A batch that does not divide evenly ends with a
    smaller ghost batch.
    """

    def __init__(self, num_features: int, ghost_batch_size: int, **batch_norm_kwargs) -> None:
        super().__init__(num_features, **batch_norm_kwargs)
        if not isinstance(ghost_batch_size, int) or ghost_batch_size < 2:
            raise ValueError(f"ghost_batch_size must be an int >= 2, got {ghost_batch_size!r}")
        if self.momentum is None:
            raise ValueError("momentum=None (cumulative average) is not supported: ghost batches need an exponential"
                             " running average; set a momentum")
        self.ghost_batch_size = ghost_batch_size

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (batch, channels, ...), got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or input.shape[0] <= self.ghost_batch_size:
            return super().forward(input)
        self._check_input_dim(input)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        mean = self.running_mean if self.track_running_stats else None
        var = self.running_var if self.track_running_stats else None
        return torch.cat(
            [
                F.batch_norm(ghost, mean, var, self.weight, self.bias, True, self.momentum, self.eps)
                for ghost in input.split(self.ghost_batch_size)
            ]
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"


def apply_ghost_batch_norm(model: nn.Module, ghost_batch_size: int) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` of ``model`` (in place) by :class:`GhostBatchNorm`.

    Parameters and running statistics are carried over, so a checkpoint of the original model loads into the
    transformed one and evaluation gives the same outputs. ``SyncBatchNorm`` is refused, and so (by
    :class:`GhostBatchNorm`) is ``momentum=None``: ghost batches need an exponential running average.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.SyncBatchNorm):
            raise ValueError(f"{name}: SyncBatchNorm is not supported by ghost batch norm (it syncs across ranks)")
        if type(module) not in _BATCH_NORMS:
            continue
        ghost = GhostBatchNorm(
            module.num_features, ghost_batch_size, eps=module.eps, momentum=module.momentum, affine=module.affine,
            track_running_stats=module.track_running_stats,
            device=module.weight.device if module.affine else None,
            dtype=module.weight.dtype if module.affine else None,
        )
        ghost.load_state_dict(module.state_dict())
        ghost.train(module.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, ghost)
    return model
