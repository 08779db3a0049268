"""Model transforms."""

from .ghost_batch_norm import GhostBatchNorm, apply_ghost_batch_norm

__all__ = ["GhostBatchNorm", "apply_ghost_batch_norm"]
