"""hf_colossal: large-scale training techniques for Hugging Face Trainer and accelerate, through their arguments.

Importing the package is cheap (it runs at interpreter start through a .pth hook): it only arranges for
transformers to learn our optimizer names when it loads. Public names below load on first use.
"""

from __future__ import annotations

from importlib import import_module

from .integrations._autoload import install as _install

__version__ = "0.1.0"

_PUBLIC = {
    "list_optimizers": "hf_colossal.registry",
    "build_optimizer": "hf_colossal.registry",
    "get_optimizer_spec": "hf_colossal.registry",
    "OptimizerSpec": "hf_colossal.registry",
    "ParamGroupPolicy": "hf_colossal.params",
    "OptionsError": "hf_colossal.config",
    "Lamb": "hf_colossal.optim",
    "Lars": "hf_colossal.optim",
    "LambConfig": "hf_colossal.optim.configs",
    "LarsConfig": "hf_colossal.optim.configs",
    "LRScalingCallback": "hf_colossal.callbacks",
    "WarmupCallback": "hf_colossal.callbacks",
    "LayerStatsCallback": "hf_colossal.callbacks",
    "GradientCompressionPlugin": "hf_colossal.comm.plugin",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> object:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'hf_colossal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


_install()
