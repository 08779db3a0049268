"""Trainer callbacks: large-batch learning-rate scaling and warmup, per-layer statistics in the logs."""

from .large_batch import LRScalingCallback, WarmupCallback
from .layer_stats import LayerStatsCallback

__all__ = ["LayerStatsCallback", "LRScalingCallback", "WarmupCallback"]
