"""Module hooks that reach an optimizer without keeping it alive, and that copies of the model do not carry over."""

from __future__ import annotations

import weakref
from typing import Any


class OptimizerHook:
    """A module hook that calls ``getattr(optimizer, method)(*bound, *hook_args)`` while the optimizer lives.

    It holds the optimizer weakly, and a deep copy or an unpickled copy of the model gets an inert hook: a copy
    (an EMA or best-model copy, ``torch.save(model)``) runs its forward without feeding the optimizer of the
    original, and without keeping that optimizer alive."""

    def __init__(self, optimizer: Any, method: str, *bound: Any) -> None:
        self._optimizer = None if optimizer is None else weakref.ref(optimizer)
        self._method = method
        self._bound = bound

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        optimizer = None if self._optimizer is None else self._optimizer()
        if optimizer is None:
            return None
        return getattr(optimizer, self._method)(*self._bound, *args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> OptimizerHook:
        return OptimizerHook(None, self._method)

    def __reduce__(self) -> tuple[Any, ...]:
        return OptimizerHook, (None, self._method)
