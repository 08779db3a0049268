"""Trainer callbacks: large-batch learning-rate scaling and warmup."""

from .large_batch import LRScalingCallback, WarmupCallback

__all__ = ["LRScalingCallback", "WarmupCallback"]
