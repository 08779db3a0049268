"""Large-batch optimizers in pure torch: :class:`Lamb` (You et al. 2019) and :class:`Lars` (You et al. 2017).

Both are ``torch.optim.Optimizer`` subclasses with a multi-tensor (``torch._foreach_*``) implementation; their
functional cores are :func:`hf_colossal.optim.lamb.lamb` and :func:`hf_colossal.optim.lars.lars`.
"""

from .hessian_free import HessianFree, HessianFreeBatch
from .kfac import Kfac
from .lamb import Lamb
from .lars import Lars
from .shampoo import Shampoo, Soap

__all__ = ["HessianFree", "HessianFreeBatch", "Kfac", "Lamb", "Lars", "Shampoo", "Soap"]
