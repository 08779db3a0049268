"""Gradient communication for DDP: compression (volume) and infrequent synchronisation (frequency).

One module per technique, each with its paper: :mod:`.lowp` (bf16/fp16), :mod:`.powersgd` (Vogels et al. 2019),
:mod:`.topk` (Stich et al. 2018; Lin et al. 2018), :mod:`.sign` (Karimireddy et al. 2019; Tang et al. 2021),
:mod:`.local_sgd` (Lin et al. 2020; Douillard et al. 2023), :mod:`.auto` (the decision rule).
:mod:`.controller` is the glue (DDP hook, optimizer-step hook, checkpoint). Collectives: ``torch.distributed``
only (gloo on CPU, NCCL on GPU).

Enable it with one call before ``accelerator.prepare``::

    from hf_colossal.comm import GradientCompressionPlugin, enable
    enable(accelerator, GradientCompressionPlugin(method="powersgd", rank=4))

or for Trainer with a recipe ``plugins: [{name: gradient_compression, method: powersgd}]``, the
:class:`~hf_colossal.integrations.trainer_compression.GradientCompressionTrainerMixin`, or in any unmodified
script with ``HF_COLOSSAL_COMPRESSION="method=powersgd,rank=4"``.
"""

from __future__ import annotations

from importlib import import_module

_PUBLIC = {
    "GradientCompressionPlugin": "hf_colossal.comm.plugin",
    "ENV_VAR": "hf_colossal.comm.plugin",
    "METHODS": "hf_colossal.comm.plugin",
    "CompressionController": "hf_colossal.comm.controller",
    "choose_method": "hf_colossal.comm.auto",
    "enable": "hf_colossal.integrations.accelerate",
    "CompressionSetupError": "hf_colossal.integrations.accelerate",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> object:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'hf_colossal.comm' has no attribute {name!r}")
