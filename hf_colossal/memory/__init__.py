"""Heterogeneous memory: FSDP2 sharding with master weights and optimizer state placed between GPU and CPU."""

from .checkpoint import load_checkpoint, save_checkpoint
from .optimizer import HeterogeneousOptimizer
from .placement import MemoryPlan, MemoryPlanError, Unit, plan_auto, plan_static
from .plugin import HeterogeneousMemoryPlugin
from .sharding import ShardedModel, ShardingError, shard_model, sharded_model_of

__all__ = ["HeterogeneousMemoryPlugin", "HeterogeneousOptimizer", "MemoryPlan", "MemoryPlanError", "ShardedModel",
           "ShardingError", "Unit", "load_checkpoint", "plan_auto", "plan_static", "save_checkpoint", "shard_model",
           "sharded_model_of"]
