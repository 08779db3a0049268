"""Parameter grouping shared by every optimizer: which parameters skip weight decay and trust-ratio adaptation.

A rule is either a *category* — ``bias`` (any parameter named ``bias``), ``norm`` (every parameter of a
normalisation module: LayerNorm, RMSNorm and HF's many ``*RMSNorm`` classes, BatchNorm, GroupNorm), ``embedding``
(weights of ``nn.Embedding``) — or a regular expression searched in the parameter's qualified name
(``lm_head``, ``^encoder\\.layer\\.0\\.``).

LAMB and LARS leave biases and normalisation weights out of both weight decay and the layer-wise trust ratio
(You et al. 2019, Sec. 3; the NVIDIA BERT recipe); that is the default here. Only trainable parameters
(``requires_grad``) are grouped, so a PEFT model hands the optimizer its adapters alone.
"""

from __future__ import annotations

import dataclasses
import re
import torch
from torch import nn

CATEGORIES = ("bias", "norm", "embedding")


def _is_norm_module(module: nn.Module) -> bool:
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
        return True
    rms_norm = getattr(nn, "RMSNorm", None)
    return (rms_norm is not None and isinstance(module, rms_norm)) or "norm" in type(module).__name__.lower()


def parameter_categories(model: nn.Module) -> dict[str, set[str]]:
    """Map each parameter name (as ``named_parameters`` gives it) to the categories it belongs to."""
    categories: dict[str, set[str]] = {}
    for module_name, module in model.named_modules():
        for leaf, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{leaf}" if module_name else leaf
            tags = categories.setdefault(name, set())
            if leaf == "bias":
                tags.add("bias")
            if _is_norm_module(module):
                tags.add("norm")
            if isinstance(module, nn.Embedding):
                tags.add("embedding")
    return categories


@dataclasses.dataclass(frozen=True)
class ParamGroupPolicy:
    """Which parameters are excluded from weight decay and from trust-ratio adaptation."""

    no_decay: tuple[str, ...] = ("bias", "norm")
    no_adapt: tuple[str, ...] = ("bias", "norm")

    def __post_init__(self) -> None:
        for field_name in ("no_decay", "no_adapt"):
            for rule in getattr(self, field_name):
                if rule in CATEGORIES:
                    continue
                try:
                    re.compile(rule)
                except re.error as err:
                    raise ValueError(
                        f"{field_name}: {rule!r} is neither a category {CATEGORIES} nor a valid regular expression "
                        f"({err})"
                    ) from None

    @staticmethod
    def _matches(rules: tuple[str, ...], name: str, tags: set[str]) -> bool:
        return any(rule in tags if rule in CATEGORIES else re.search(rule, name) is not None for rule in rules)

    def groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """Trainable parameters of ``model`` split into up to four groups by (decay, adapt).

        Each group has ``params``, ``weight_decay`` (``weight_decay`` or 0.0) and ``adapt`` (bool). Empty groups
        are dropped; group order is stable so optimizer state dicts line up across runs.
        """
        categories = parameter_categories(model)
        buckets: dict[tuple[bool, bool], list[torch.Tensor]] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            tags = categories.get(name, set())
            decay = not self._matches(self.no_decay, name, tags)
            adapt = not self._matches(self.no_adapt, name, tags)
            buckets.setdefault((decay, adapt), []).append(param)
        return [
            {"params": buckets[key], "weight_decay": weight_decay if key[0] else 0.0, "adapt": key[1]}
            for key in sorted(buckets, reverse=True)
        ]

