"""Register hf_colossal with transformers the moment transformers loads — in scripts that never import us.

The wheel installs ``hf_colossal_autoload.pth`` into site-packages; Python runs it at start-up (in every worker
that ``torchrun`` / ``accelerate launch`` starts) and it imports :mod:`hf_colossal`, which calls
:func:`install`. Set ``HF_COLOSSAL_AUTOLOAD=0`` to turn that off; ``import hf_colossal`` then does it.

:func:`install` imports nothing heavy (no torch, no transformers): it puts a finder on ``sys.meta_path`` that
waits for ``transformers.training_args``, ``transformers.trainer_optimizer`` and ``transformers.trainer`` and runs
the registration right after each has executed, before anything (such as ``HfArgumentParser``) can read them.
"""

from __future__ import annotations

import sys

#: module -> name of the function in hf_colossal.integrations.transformers that registers into it
_HOOKS = {
    "transformers.training_args": "register_optimizer_names",
    "transformers.trainer_optimizer": "register_optimizer_handlers",
    "transformers.trainer": "register_log_contributions",
    "accelerate.accelerator": None,
}

#: module -> ("submodule of hf_colossal.integrations:function", ...) run after the entry of _HOOKS (if any)
_EXTRA_HOOKS = {
    "transformers.trainer": ("trainer_compression:register_trainer_checkpointing",),
    "accelerate.accelerator": ("accelerate:register_accelerator_env_route",),  # HF_COLOSSAL_COMPRESSION
}


def _register(module_name: str) -> None:
    from importlib import import_module

    from . import transformers as integration

    if _HOOKS[module_name] is not None:
        getattr(integration, _HOOKS[module_name])(sys.modules[module_name])
    for target in _EXTRA_HOOKS.get(module_name, ()):
        submodule, function = target.split(":")
        getattr(import_module(f"{__package__}.{submodule}"), function)(sys.modules[module_name])


class _RegisterAfterImport:
    """A meta-path finder that wraps the real loader of the hooked modules (PEP 451)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _register(fullname)

        spec.loader.exec_module = exec_module
        return spec


_FINDER = _RegisterAfterImport()


def install() -> None:
    """Register now with whatever transformers modules are loaded, and hook the ones still to come."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    for module_name in _HOOKS:
        if module_name in sys.modules:
            _register(module_name)
