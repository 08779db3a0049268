r"""Hessian-free optimization (truncated Newton with Gauss-Newton curvature), in pure torch.

Reference: J. Martens, "Deep learning via Hessian-free optimization", ICML 2010 (section numbers below cite it),
with the line search of Martens & Sutskever 2012, "Training Deep and Recurrent Networks with Hessian-Free
Optimization" (Sec. 8.8), and Schraudolph 2002 for the Gauss-Newton matrix of a matching loss.

One step from parameters :math:`\theta` with gradient :math:`g` of the mini-batch objective :math:`f`:

1. Curvature: the Gauss-Newton matrix :math:`G = J^\top H_L J` (Sec. 4.2; Schraudolph 2002), :math:`J` the
   Jacobian of the model's outputs (logits / pre-activations) w.r.t. :math:`\theta`, :math:`H_L` the Hessian of
   the loss w.r.t. those outputs — diagonal-plus-rank-one for softmax cross-entropy, a multiple of the identity
   for squared error, diagonal for sigmoid binary cross-entropy. :math:`Gv` is :math:`Jv` (Pearlmutter's
   R-operator), :math:`H_L` applied to it in closed form, and one backward (:math:`J^\top u`) through a graph whose
   forward is taken once per step. :math:`Jv` is by default the backward of the linear map
   :math:`u \mapsto J^\top u` (reverse-over-reverse, Townsend 2017), which reuses the stored activations and is
   40% cheaper than forward mode on the digits autoencoder; where the model's backward is not differentiable it is
   a forward pass with tangents (forward-mode AD). Neither differentiates the loss twice (no Hessian terms of the
   model). It is computed on a curvature mini-batch, a prefix of the gradient batch (Sec. 4.3).
2. Solve :math:`(G + \lambda I)\,p = -g` approximately by preconditioned conjugate gradient (Sec. 4.4, 4.7)
   started from :math:`\zeta\,p_{n-1}` (Sec. 4.5, :math:`\zeta = 0.95`), with the preconditioner
   :math:`M = \bigl[\mathrm{diag}\bigl(\tfrac1N\sum_i \nabla f_i \odot \nabla f_i\bigr) + \lambda I\bigr]^{\xi}`,
   :math:`\xi = 0.75` (Sec. 4.7), and Martens' relative-progress stopping rule (Sec. 4.4): stop at iteration
   :math:`i` when :math:`i > k`, :math:`\phi(x_i) < 0` and
   :math:`(\phi(x_i) - \phi(x_{i-k})) / \phi(x_i) < k\epsilon` with :math:`k = \max(10, 0.1 i)`,
   :math:`\epsilon = 5\cdot 10^{-4}`, :math:`\phi(x) = \tfrac12 x^\top (G+\lambda I) x + g^\top x`.
3. CG-iterate backtracking (Sec. 4.6): keep the iterates at indices :math:`\lceil \gamma^j \rceil`
   (:math:`\gamma = 1.3`) and the last; going back from the last, take the one with the lowest objective.
4. Levenberg-Marquardt damping (Sec. 4.1): :math:`\rho = (f(\theta + p) - f(\theta)) / \phi(p)`;
   :math:`\lambda \leftarrow \tfrac32\lambda` if :math:`\rho < \tfrac14`, :math:`\lambda \leftarrow \tfrac23\lambda`
   if :math:`\rho > \tfrac34`.
5. Armijo backtracking line search on :math:`\theta + \alpha p` (Martens & Sutskever 2012 Sec. 8.8: start at
   :math:`\alpha = 1`, shrink by 0.8, accept when :math:`f(\theta + \alpha p) \le f(\theta) + c\,\alpha\, g^\top p`,
   :math:`c = 10^{-2}`); no acceptable :math:`\alpha` rejects the step (parameters unchanged).

There is no learning rate: the step length comes from the damping and the line search. Weight decay is an L2
term :math:`\tfrac{w}{2}\lVert\theta\rVert^2` of the objective (its gradient :math:`w\theta` and curvature
:math:`wI` enter the quadratic model exactly), per param group.

The module has two halves: functional math on tensors and flat vectors (losses and their output Hessians, the
Gauss-Newton operator, the preconditioner, PCG with its stopping rule, backtracking, damping, the line search),
and the glue to ``torch.optim`` (:class:`HessianFree`), which runs a model's forward as a function of its
parameters with ``torch.func.functional_call``. A step needs the batch (several evaluations per step), given as a
:class:`HessianFreeBatch` to ``step(batch)`` or to :meth:`HessianFree.prepare` before a plain ``step()``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn import functional as F
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from ._foreach import is_int, is_real, math_dtype, require

__all__ = [
    "LOSSES",
    "CgResult",
    "GaussNewtonOperator",
    "HessianFree",
    "HessianFreeBatch",
    "armijo_backtracking",
    "backtrack_iterates",
    "batch_loss_normalizer",
    "gauss_newton_vector_product",
    "levenberg_marquardt",
    "martens_preconditioner",
    "output_hessian_vector",
    "per_example_losses",
    "preconditioned_cg",
]

logger = logging.getLogger(__name__)

#: Losses with a Gauss-Newton form: each is convex in the model's outputs, the matching loss of its output
#: non-linearity (softmax, identity, logistic), so :math:`H_L` is positive semi-definite (Schraudolph 2002).
LOSSES = ("cross_entropy", "mse", "sigmoid_bce")
PRECONDITIONERS = ("martens", "none")

NEEDS_BATCH_MESSAGE = (
    "HessianFree.step() needs the batch: Hessian-free evaluates the loss and Gauss-Newton products several times "
    "per step. Call step(HessianFreeBatch(...)), or optimizer.prepare(batch) then step(). Under the transformers "
    "Trainer (which calls step() without one), use hf_colossal.integrations.transformers.HessianFreeTrainer, or "
    "mix HessianFreeTrainerMixin into your Trainer subclass: class MyTrainer(HessianFreeTrainerMixin, Trainer)."
)


# ---------------------------------------------------------------------------------------------------------------
# Functional math: losses of the model's outputs and their Hessians


def batch_loss_normalizer(kind: str, outputs: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """What the batch loss is a mean over: the labels that are not ``ignore_index`` (cross-entropy), or the
    output elements (squared error and binary cross-entropy, as ``F.mse_loss`` / ``F.binary_cross_entropy_with_
    logits`` with ``reduction="mean"``). A 0-d tensor, at least 1."""
    if kind == "cross_entropy":
        return (targets != ignore_index).sum().clamp_min(1).to(math_dtype(outputs.dtype))
    return torch.tensor(float(outputs.numel()), dtype=math_dtype(outputs.dtype), device=outputs.device)


def per_example_losses(kind: str, outputs: Tensor, targets: Tensor, normalizer: Tensor,
                       ignore_index: int = -100) -> Tensor:
    """The contributions :math:`c_n` of the examples (leading dimension) to the batch loss
    :math:`L = \\sum_n c_n`, a mean over ``normalizer`` units.

    ``cross_entropy``: ``outputs`` ``(N, ..., C)`` logits, ``targets`` ``(N, ...)`` class ids (``ignore_index``
    ignored); ``mse``: ``outputs`` and ``targets`` of one shape; ``sigmoid_bce``: logits and targets in [0, 1].
    """
    n = outputs.shape[0]
    outputs = outputs.to(math_dtype(outputs.dtype))
    if kind == "cross_entropy":
        logits = outputs.reshape(-1, outputs.shape[-1])
        labels = targets.reshape(-1)
        valid = labels != ignore_index
        losses = F.cross_entropy(logits, labels.masked_fill(~valid, 0), reduction="none") * valid
    elif kind == "mse":
        losses = (outputs - targets.to(outputs.dtype)).square()
    elif kind == "sigmoid_bce":
        losses = F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype), reduction="none")
    else:
        raise ValueError(f"HessianFree: unknown loss {kind!r}; expected one of {LOSSES}")
    return losses.reshape(n, -1).sum(dim=1) / normalizer


def output_hessian_vector(kind: str, outputs: Tensor, targets: Tensor, vector: Tensor, normalizer: Tensor,
                          ignore_index: int = -100) -> Tensor:
    """:math:`H_L u`: the Hessian of the batch loss w.r.t. the outputs applied to ``vector`` (outputs' shape).

    Cross-entropy: per valid row :math:`(\\mathrm{diag}(s) - s s^\\top) u / n` with :math:`s` the softmax;
    squared error: :math:`2u/n`; sigmoid BCE: :math:`\\sigma(z)(1-\\sigma(z)) \\odot u / n` (Schraudolph 2002,
    matching losses; Martens 2010 Sec. 4.2)."""
    dtype = math_dtype(outputs.dtype)
    u = vector.to(dtype)
    z = outputs.to(dtype)
    if kind == "cross_entropy":
        probs = torch.softmax(z, dim=-1)
        valid = (targets != ignore_index).unsqueeze(-1).to(dtype)
        hu = (probs * u - probs * (probs * u).sum(dim=-1, keepdim=True)) * valid
    elif kind == "mse":
        hu = 2.0 * u
    elif kind == "sigmoid_bce":
        s = torch.sigmoid(z)
        hu = s * (1.0 - s) * u
    else:
        raise ValueError(f"HessianFree: unknown loss {kind!r}; expected one of {LOSSES}")
    return hu / normalizer


def model_jvp(forward: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor],
              tangent: dict[str, Tensor]) -> Tensor:
    """:math:`Jv`: ``forward`` (parameters -> outputs) run once on dual tensors (``torch.autograd.forward_ad``,
    the forward-mode rules ``torch.func.jvp`` uses too, without its functorch wrappers: 35% less time per product
    on the digits autoencoder's curvature batch, on the CPU)."""
    with forward_ad.dual_level():
        outputs = forward({name: forward_ad.make_dual(value, tangent[name]) for name, value in params.items()})
        jv = forward_ad.unpack_dual(outputs).tangent
    return torch.zeros_like(outputs) if jv is None else jv


JVP_MODES = ("auto", "reverse_over_reverse", "forward")


def flatten(tensors: Iterable[Tensor], dtype: torch.dtype) -> Tensor:
    """The tensors, in order, as one flat vector in ``dtype`` (detached)."""
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def unflatten(vector: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """The flat ``vector`` cut into the shapes of ``like``'s tensors, in order, each cast to that tensor's dtype
    (views where the dtype matches; differentiable)."""
    pieces = vector.split([t.numel() for t in like.values()])
    return {name: piece.view(t.shape).to(t.dtype) for (name, t), piece in zip(like.items(), pieces)}


class Linearization:
    """A model's outputs at fixed parameters and products with their Jacobian :math:`J` (w.r.t. the parameters),
    by autograd on one forward graph that is kept for repeated products. Vectors in parameter space are flat, in
    ``params``' order and the math dtype of its first tensor: the forward runs on views of one flat leaf, so
    :meth:`vjp` returns the flat :math:`J^\\top u` and :meth:`jvp` takes a flat :math:`v` with no per-parameter
    work.

    :meth:`vjp`: :math:`J^\\top u`, a backward through the kept graph. :meth:`jvp`: :math:`J v`, either
    reverse-over-reverse (Townsend 2017, "A new trick for calculating Jacobian vector products"): the backward
    :math:`u \\mapsto J^\\top u` is linear in :math:`u`, so the backward of that backward with cotangent :math:`v`
    is :math:`J v`; or forward mode (:func:`model_jvp`). Reverse-over-reverse records its graph once (a backward
    with ``create_graph``, at the first product) and each product is then a pass of the C++ autograd engine over
    the stored activations: on the digits autoencoder's curvature batch (CPU) 0.88 ms against 1.48 ms for forward
    mode, which runs the model's Python forward again on dual tensors.

    It needs every op's backward to be differentiable. Where one is not, autograd either raises at the second
    backward or silently drops that path (a custom ``Function`` marked ``once_differentiable``), so ``"auto"``
    (the default) checks reverse-over-reverse once, at the first product, with the adjoint identity
    :math:`\\langle u, Jv\\rangle = \\langle J^\\top u, v\\rangle` on random :math:`u, v`, and uses forward mode if it
    raises or fails the identity; :attr:`jvp_mode` then holds the mode chosen. A parameter the outputs do not
    depend on gets zeros."""

    def __init__(self, forward: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor], *,
                 jvp_mode: str = "auto") -> None:
        if jvp_mode not in JVP_MODES:
            raise ValueError(f"HessianFree: jvp_mode {jvp_mode!r}; expected one of {JVP_MODES}")
        self.forward, self.params = forward, params
        self.dtype = math_dtype(next(iter(params.values())).dtype)
        self._leaf = flatten(params.values(), self.dtype).requires_grad_()
        with torch.enable_grad():
            self.outputs = forward(unflatten(self._leaf, params))
        self.jvp_mode = jvp_mode
        self._transpose: tuple[Tensor, Tensor | None] | None = None  # (u, J^T u as a function of u)
        self._unchecked = ""  # why reverse-over-reverse failed the check, when it did

    def vjp(self, cotangent: Tensor) -> Tensor:
        grad = None
        if self.outputs.requires_grad:
            (grad,) = torch.autograd.grad(self.outputs, self._leaf, cotangent, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self._leaf) if grad is None else grad

    def jvp(self, tangent: Tensor) -> Tensor:
        if self.jvp_mode == "auto":
            self.jvp_mode = self._checked_mode()
        if self.jvp_mode == "reverse_over_reverse":
            return self._reverse_over_reverse_jvp(tangent)
        try:
            return model_jvp(self.forward, self.params, unflatten(tangent, self.params))
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError) as err:
            tried = f"; reverse-over-reverse failed its check ({self._unchecked})" if self._unchecked else ""
            raise RuntimeError(
                f"HessianFree: no Jacobian-vector product works for this model: forward mode failed "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}){tried}. Fused attention "
                "kernels (SDPA's flash and memory-efficient paths) have neither a forward-mode derivative nor a "
                "differentiable backward: load a transformers model with attn_implementation='eager'."
            ) from err

    def _checked_mode(self) -> str:
        """``"reverse_over_reverse"`` if it runs and passes the adjoint identity on random vectors (relative
        tolerance 1e-3, 5e-2 for 16-bit outputs), else ``"forward"``."""
        if not self.outputs.requires_grad:
            return "reverse_over_reverse"  # every product is zero
        generator = torch.Generator(self.outputs.device).manual_seed(0)

        def probe(like: Tensor) -> Tensor:
            return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)

        u, v = probe(self.outputs), probe(self._leaf)
        try:
            jv = self._reverse_over_reverse_jvp(v)
        except (RuntimeError, NotImplementedError) as err:  # a backward without a derivative
            reason = str(err).splitlines()[0]
        else:
            dtype = math_dtype(self.outputs.dtype)
            lhs = float(torch.dot(u.reshape(-1).to(dtype), jv.reshape(-1).to(dtype)))
            rhs = float(torch.dot(v, self.vjp(u)))
            tolerance = 5e-2 if self.outputs.element_size() < 4 else 1e-3
            if abs(lhs - rhs) <= tolerance * (abs(lhs) + abs(rhs)):
                return "reverse_over_reverse"
            reason = f"<u, Jv> = {lhs:.6g} against <J^T u, v> = {rhs:.6g}"
        logger.info("HessianFree: Jacobian-vector products by forward mode; the model's backward is not "
                    "differentiable throughout (%s)", reason)
        self._transpose, self._unchecked = None, reason
        return "forward"

    def _reverse_over_reverse_jvp(self, tangent: Tensor) -> Tensor:
        if self._transpose is None:
            u = torch.zeros_like(self.outputs, requires_grad=True)
            transposed = None
            if self.outputs.requires_grad:
                with torch.enable_grad():
                    (transposed,) = torch.autograd.grad(self.outputs, self._leaf, u, retain_graph=True,
                                                        create_graph=True, allow_unused=True)
            self._transpose = (u, transposed if transposed is not None and transposed.requires_grad else None)
        u, transposed = self._transpose
        jv = None
        if transposed is not None:
            (jv,) = torch.autograd.grad(transposed, u, tangent, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.outputs) if jv is None else jv


def gauss_newton_vector_product(forward: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor],
                                tangent: dict[str, Tensor], kind: str, targets: Tensor,
                                ignore_index: int = -100) -> dict[str, Tensor]:
    """:math:`G v = J^\\top H_L J v` once (Martens 2010 Sec. 4.2), through ``forward`` (parameters -> outputs), with
    ``tangent`` and the result as dicts shaped like ``params``. :class:`GaussNewtonOperator` reuses the
    linearisation across products, on flat vectors."""
    operator = GaussNewtonOperator(forward, params, kind, targets, ignore_index)
    return unflatten(operator(flatten(tangent.values(), operator.linearization.dtype)), params)


class GaussNewtonOperator:
    """:math:`v \\mapsto J^\\top H_L J v` at fixed parameters and batch (Martens 2010 Sec. 4.2), on flat vectors
    (:class:`Linearization`'s layout).

    The forward (and the outputs :math:`z` that :math:`H_L` depends on) is taken once, in a
    :class:`Linearization`; every product is then its :meth:`~Linearization.jvp` (Pearlmutter's R-operator),
    :math:`H_L` in closed form, and its :meth:`~Linearization.vjp`. ``forward`` maps a dict of parameters to the
    output tensor; ``linearization`` reuses one already taken (the gradient's, when the curvature batch is the
    whole batch); ``products`` counts the products."""

    def __init__(self, forward: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor], kind: str,
                 targets: Tensor, ignore_index: int = -100, *, linearization: Linearization | None = None,
                 jvp_mode: str = "auto") -> None:
        self.kind, self.targets, self.ignore_index = kind, targets, ignore_index
        self.linearization = linearization or Linearization(forward, params, jvp_mode=jvp_mode)
        self.outputs = self.linearization.outputs.detach()
        self.normalizer = batch_loss_normalizer(kind, self.outputs, targets, ignore_index)
        self.products = 0

    def __call__(self, tangent: Tensor) -> Tensor:
        jv = self.linearization.jvp(tangent)
        hjv = output_hessian_vector(self.kind, self.outputs, self.targets, jv.detach(), self.normalizer,
                                    self.ignore_index)
        self.products += 1
        return self.linearization.vjp(hjv.to(self.outputs.dtype))


# ---------------------------------------------------------------------------------------------------------------
# Functional math: preconditioner, conjugate gradient, backtracking, damping, line search


def martens_preconditioner(squared_gradient_mean: Tensor, damping: float, exponent: float = 0.75) -> Tensor:
    """The inverse of the diagonal preconditioner :math:`M = [\\mathrm{diag}(\\frac1N\\sum_i \\nabla f_i^2) +
    \\lambda I]^{\\xi}` (Martens 2010 Sec. 4.7, :math:`\\xi = 0.75`), as a vector :math:`M^{-1}`."""
    return (squared_gradient_mean + damping).pow(-exponent)


@dataclasses.dataclass
class CgResult:
    """What :func:`preconditioned_cg` returns. ``iterates``: ``(index, x, phi(x))`` kept at indices
    :math:`\\lceil\\gamma^j\\rceil` and the last (Martens 2010 Sec. 4.6); ``x`` the last iterate; ``stop`` why it
    ended: ``"relative_progress"`` (Sec. 4.4), ``"max_iters"``, ``"converged"`` (zero residual),
    ``"nonpositive_curvature"`` or ``"nonfinite"``."""

    x: Tensor
    phi: float
    iterations: int
    stop: str
    iterates: list[tuple[int, Tensor, float]]
    phis: list[float]


def _save_indices(max_iters: int, gamma: float) -> set[int]:
    indices, j = set(), 0
    while True:
        index = math.ceil(gamma ** j)
        if index > max_iters:
            return indices
        indices.add(index)
        j += 1


def preconditioned_cg(matvec: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None = None,
                      inverse_preconditioner: Tensor | None = None, *, max_iters: int = 250,
                      tolerance: float = 5e-4, backtrack_gamma: float = 1.3,
                      lookahead: bool | None = None) -> CgResult:
    """Minimise :math:`\\phi(x) = \\tfrac12 x^\\top A x - b^\\top x` (``matvec`` gives :math:`Ax`, :math:`A`
    symmetric positive definite) by preconditioned conjugate gradient (Martens 2010 Algorithm 2).

    :math:`\\phi` is tracked for free from the residual :math:`r = b - Ax`:
    :math:`\\phi(x) = -\\tfrac12 x^\\top (b + r)`. Martens' relative-progress rule (Sec. 4.4, eq. after (4)):
    stop at iteration :math:`i` when :math:`i > k`, :math:`\\phi(x_i) < 0` and
    :math:`(\\phi(x_i) - \\phi(x_{i-k}))/\\phi(x_i) < k\\,\\epsilon`, :math:`k = \\max(10, \\lceil 0.1 i\\rceil)`.
    A zero residual ends the run, and a non-positive or non-finite curvature :math:`p^\\top A p` ends it at the
    previous iterate.

    The host reads the scalars these decisions need once per iteration, as one small tensor. With ``lookahead``
    (default: on CUDA) it reads iteration :math:`i`'s only after it has queued iteration :math:`i+1`, so the
    device computes while the host launches the next product; an iteration queued past the stop is discarded
    (one product more than without it, the same result). A zero residual found during the run costs the product
    of the iteration that reads it."""
    lookahead = b.is_cuda if lookahead is None else lookahead
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b.clone() if x0 is None or not bool(x0.any()) else b - matvec(x)
    y = r if inverse_preconditioner is None else inverse_preconditioner * r
    p = y.clone()
    ry = torch.dot(r, y)
    phi, ry_start = torch.stack([-0.5 * torch.dot(x, b + r), ry]).tolist()
    phis = [phi]
    saved = _save_indices(max_iters, backtrack_gamma)
    iterates: list[tuple[int, Tensor, float]] = []
    accepted = (0, x)  # the last iterate that passed its checks
    queued: list[tuple[int, Tensor, Tensor]] = []  # (i, x_i, [ry_(i-1), p^T A p, finite, phi(x_i)]) not yet read

    def launch(i: int) -> None:
        """Queue iteration ``i`` from the current direction, without reading anything back."""
        nonlocal x, r, y, p, ry
        ap = matvec(p)
        curvature = torch.dot(p, ap)  # non-finite wherever Ap is (0 * inf is NaN too)
        alpha = ry / curvature
        x = torch.addcmul(x, alpha, p)
        r = torch.addcmul(r, alpha, ap, value=-1.0)
        y = r if inverse_preconditioner is None else inverse_preconditioner * r
        ry_new = torch.dot(r, y)
        phi = -0.5 * (torch.dot(x, b) + torch.dot(x, r))
        queued.append((i, x, torch.stack([ry, curvature, torch.isfinite(curvature).to(curvature.dtype), phi])))
        p = torch.addcmul(y, ry_new / ry, p)
        ry = ry_new

    def read() -> str | None:
        """Check the oldest queued iteration: accept it, or return why the run stops."""
        nonlocal accepted
        i, x_i, scalars = queued.pop(0)
        ry_before, curvature, finite, phi = scalars.tolist()
        if ry_before == 0.0:
            return "converged"
        if not finite:
            return "nonfinite"
        if curvature <= 0.0:
            return "nonpositive_curvature"
        phis.append(phi)
        accepted = (i, x_i)
        if i in saved:
            iterates.append((i, x_i, phi))
        k = max(10, math.ceil(0.1 * i))
        if i > k and phi < 0 and (phi - phis[i - k]) / phi < k * tolerance:
            return "relative_progress"
        return None

    stop = "converged" if ry_start == 0.0 else None
    for i in range(1, max_iters + 1 if stop is None else 1):
        launch(i)
        if len(queued) > int(lookahead):
            stop = read()
            if stop is not None:
                break
    while stop is None and queued:
        stop = read()
    last, x = accepted
    if not iterates or iterates[-1][0] != last:
        iterates.append((last, x, phis[last]))
    return CgResult(x=x, phi=phis[last], iterations=last, stop=stop or "max_iters", iterates=iterates, phis=phis)


def backtrack_iterates(iterates: list[tuple[int, Tensor, float]],
                       objective: Callable[[Tensor], float]) -> tuple[int, float]:
    """Martens 2010 Sec. 4.6: from the last kept CG iterate backwards, move to the previous one while it has a
    lower ``objective`` (a non-finite value counts as :math:`+\\infty`). Returns (position in ``iterates``, its
    objective). Evaluates the objective at most ``len(iterates)`` times."""

    def value(x: Tensor) -> float:
        v = objective(x)
        return v if math.isfinite(v) else math.inf

    best = len(iterates) - 1
    best_value = value(iterates[best][1])
    while best > 0:
        previous = value(iterates[best - 1][1])
        if previous >= best_value and math.isfinite(best_value):
            break
        best, best_value = best - 1, previous
    return best, best_value


def levenberg_marquardt(damping: float, rho: float, *, increase: float = 1.5, decrease: float = 2.0 / 3.0,
                        min_damping: float = 0.0, max_damping: float = math.inf) -> float:
    """Martens 2010 Sec. 4.1: :math:`\\lambda \\cdot \\frac32` if :math:`\\rho < \\frac14` (a non-finite
    :math:`\\rho` counts as bad), :math:`\\lambda \\cdot \\frac23` if :math:`\\rho > \\frac34`, clamped."""
    if not math.isfinite(rho) or rho < 0.25:
        damping *= increase
    elif rho > 0.75:
        damping *= decrease
    return min(max(damping, min_damping), max_damping)


@contextmanager
def seeded_rng(seed: int, devices: Sequence[torch.device]) -> Iterator[None]:
    """Inside the block the CPU's random generator and those of ``devices`` start from ``seed``; after it they
    continue as if the block had not run (``torch.random.fork_rng``), so repeated evaluations draw the same dropout
    masks without disturbing the training run's random stream.

    On the CPU and CUDA the generators are seeded directly: ``torch.manual_seed`` also queues the seeding of every
    other accelerator backend, which records a stack trace per call (1.6 ms on the CPU). Other backends (MPS, XPU,
    ...) keep ``torch.manual_seed``."""
    cuda = sorted({d.index if d.index is not None else torch.cuda.current_device() for d in devices
                   if d.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        if all(d.type in ("cpu", "cuda") for d in devices):
            torch.default_generator.manual_seed(seed)
            for index in cuda:
                torch.cuda.default_generators[index].manual_seed(seed)
        else:
            torch.manual_seed(seed)
        yield


def armijo_backtracking(objective: Callable[[float], float], f0: float, slope: float, *, f_at_one: float | None = None,
                        c: float = 1e-2, shrink: float = 0.8, max_trials: int = 20) -> tuple[float, float, int]:
    """Backtracking line search (Martens & Sutskever 2012 Sec. 8.8; Nocedal & Wright Alg. 3.1): the first
    :math:`\\alpha \\in \\{1, 0.8, 0.8^2, \\ldots\\}` with :math:`f(\\alpha) \\le f_0 + c\\,\\alpha\\,\\mathrm{slope}`
    (``slope`` = :math:`g^\\top p < 0`). Returns ``(alpha, f(alpha), evaluations)``; ``alpha = 0`` (and ``f0``)
    when none of ``max_trials`` is acceptable or the direction does not descend. ``f_at_one`` reuses a known
    :math:`f(1)`."""
    if not (math.isfinite(slope) and slope < 0):
        return 0.0, f0, 0
    alpha, evaluations = 1.0, 0
    for trial in range(max_trials):
        if trial == 0 and f_at_one is not None:
            value = f_at_one
        else:
            value = objective(alpha)
            evaluations += 1
        if math.isfinite(value) and value <= f0 + c * alpha * slope:
            return alpha, value, evaluations
        alpha *= shrink
    return 0.0, f0, evaluations


# ---------------------------------------------------------------------------------------------------------------
# The batch a step works on


@dataclasses.dataclass
class HessianFreeBatch:
    """One batch for :class:`HessianFree`: the model is called as ``model(*args, **kwargs)`` (tensors whose first
    dimension is the batch size are sliced for the curvature mini-batch), ``output`` picks the output tensor from
    what it returns (default: the value itself, ``["logits"]`` of a mapping / ``ModelOutput``, or ``[0]`` of a
    tuple), and ``loss`` (one of :data:`LOSSES`) of those outputs and ``targets`` is the objective."""

    targets: Tensor
    loss: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    output: Callable[[Any], Tensor] | None = None
    ignore_index: int = -100

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(
                f"HessianFree: loss {self.loss!r} has no Gauss-Newton form here; supported: {', '.join(LOSSES)} "
                "(softmax cross-entropy, squared error, sigmoid binary cross-entropy of the model's outputs). "
                "Sampled or generative losses (sampled softmax, contrastive, RL, shifted causal-LM tokens) are not "
                "supported."
            )
        if self.targets.dim() == 0:
            raise ValueError("HessianFree: targets need a leading batch dimension")

    @property
    def size(self) -> int:
        return int(self.targets.shape[0])

    def head(self, rows: int) -> HessianFreeBatch:
        """The first ``rows`` examples (the curvature mini-batch, Martens 2010 Sec. 4.3)."""
        return self if rows >= self.size else self.rows(slice(0, rows))

    def rows(self, index: slice) -> HessianFreeBatch:
        """The examples ``index`` selects: every tensor whose first dimension is the batch size is sliced."""
        n = self.size

        def cut(value: Any) -> Any:
            return value[index] if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n else value

        return dataclasses.replace(self, targets=self.targets[index], args=tuple(cut(a) for a in self.args),
                                   kwargs={k: cut(v) for k, v in self.kwargs.items()})

    def select(self, raw: Any) -> Tensor:
        if self.output is not None:
            return self.output(raw)
        if isinstance(raw, Tensor):
            return raw
        if isinstance(raw, dict) or hasattr(raw, "keys"):
            return raw["logits"]
        if isinstance(raw, (tuple, list)):
            return raw[0]
        raise TypeError(f"HessianFree: cannot find the output tensor in a {type(raw).__name__}; pass output=...")


# ---------------------------------------------------------------------------------------------------------------
# The optimizer


def refuse_unsupported_modules(model: nn.Module) -> None:
    """Batch normalisation couples the examples of a batch (per-example gradients and the curvature mini-batch are
    then different functions) and updates buffers at every forward: refused."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"HessianFree: module {name or type(module).__name__!r} is {type(module).__name__}; batch "
                "normalisation couples the examples and updates running statistics at each of the many forwards of "
                "a step. Use LayerNorm/GroupNorm, or another optimizer."
            )


class HessianFree(Optimizer):
    r"""Hessian-free optimization (Martens 2010): Gauss-Newton truncated Newton steps, see the module docstring.

    Args:
        params: the parameters (or param groups with ``weight_decay``) to optimize; all on one device.
        model: the module whose forward is evaluated as a function of these parameters
            (``torch.func.functional_call``); every optimized parameter must be one of its parameters.
        lr: accepted for the Trainer's scheduler and **unused** (the step length comes from damping and line search).
        weight_decay: L2 coefficient :math:`w` of :math:`\frac w2 \lVert\theta\rVert^2` in the objective.
        damping: initial Levenberg-Marquardt :math:`\lambda` (Sec. 4.1); ``damping_increase`` /
            ``damping_decrease`` its factors (3/2, 2/3), ``min_damping`` / ``max_damping`` its bounds.
        cg_max_iters, cg_tolerance (:math:`\epsilon` of Sec. 4.4), cg_decay (:math:`\zeta` of the warm start,
            Sec. 4.5; 0 = start from zero), backtrack_gamma (:math:`\gamma` of Sec. 4.6).
        curvature_batch_fraction: the curvature mini-batch as a fraction of the gradient batch (its first rows).
        preconditioner: ``"martens"`` (Sec. 4.7, per-example squared gradients by ``torch.func.vmap``, in chunks
            of ``per_example_chunk``; one example at a time where vmap cannot batch the model) or ``"none"``;
            preconditioner_exponent :math:`\xi`.
        jvp_mode: how the Gauss-Newton products take :math:`Jv` (:class:`Linearization`): ``"auto"`` (reverse-over-
            reverse, checked once and replaced by forward mode where the model's backward is not differentiable),
            ``"reverse_over_reverse"`` or ``"forward"``.
        line_search: Armijo backtracking (``armijo_c``, ``line_search_shrink``, ``line_search_max_trials``).
        nonfinite_damping_factor: a non-finite loss, gradient or direction rejects the step and multiplies
            :math:`\lambda` by this.
        loss: ``"auto"`` or one of :data:`LOSSES`; read by the Trainer integration to build the batch.

    A step needs the batch: ``step(HessianFreeBatch(...))``, or :meth:`prepare` then ``step()``. Statistics of
    the last step are in :attr:`last_step`; cumulative pass counts (in gradient-batch-sized passes) in
    :attr:`passes`. State: per parameter ``hf_warm_start`` (the last CG solution); in ``state_dict()
    ["hessian_free"]`` the damping and counters. While the model is in training mode, every forward of a step
    uses the same random state (one seed drawn from the global generator per step), so dropout masks are the same
    across the step's evaluations.
    """

    def __init__(
        self,
        params: ParamsT,
        model: nn.Module,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        *,
        damping: float = 1.0,
        damping_increase: float = 1.5,
        damping_decrease: float = 2.0 / 3.0,
        min_damping: float = 1e-6,
        max_damping: float = 1e6,
        cg_max_iters: int = 250,
        cg_tolerance: float = 5e-4,
        cg_decay: float = 0.95,
        backtrack_gamma: float = 1.3,
        curvature_batch_fraction: float = 1.0,
        preconditioner: str = "martens",
        preconditioner_exponent: float = 0.75,
        per_example_chunk: int = 256,
        jvp_mode: str = "auto",
        line_search: bool = True,
        armijo_c: float = 1e-2,
        line_search_shrink: float = 0.8,
        line_search_max_trials: int = 20,
        nonfinite_damping_factor: float = 10.0,
        loss: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"HessianFree: model must be the nn.Module whose forward it evaluates, got {type(model)}")
        self.settings = {
            "damping_increase": damping_increase, "damping_decrease": damping_decrease, "min_damping": min_damping,
            "max_damping": max_damping, "cg_max_iters": cg_max_iters, "cg_tolerance": cg_tolerance,
            "cg_decay": cg_decay, "backtrack_gamma": backtrack_gamma,
            "curvature_batch_fraction": curvature_batch_fraction, "preconditioner": preconditioner,
            "preconditioner_exponent": preconditioner_exponent, "per_example_chunk": per_example_chunk,
            "jvp_mode": jvp_mode,
            "line_search": line_search, "armijo_c": armijo_c, "line_search_shrink": line_search_shrink,
            "line_search_max_trials": line_search_max_trials, "nonfinite_damping_factor": nonfinite_damping_factor,
            "loss": loss,
        }
        _check_settings(self.settings, damping)
        require(is_real(lr) and lr >= 0, "HessianFree", "lr", lr, "expected a real number >= 0 (it is unused)")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        refuse_unsupported_modules(model)
        self.model = model
        names = {id(p): n for n, p in model.named_parameters()}
        self._params = [p for group in self.param_groups for p in group["params"]]
        missing = [i for i, p in enumerate(self._params) if id(p) not in names]
        if missing:
            raise ValueError(f"HessianFree: {len(missing)} optimized parameter(s) are not parameters of the model")
        if len({p.device for p in self._params}) > 1:
            raise ValueError("HessianFree: all optimized parameters must be on one device")
        self._names = [names[id(p)] for p in self._params]
        self.damping = float(damping)
        self.step_calls = 0
        self.accepted_steps = 0
        self.rejected_steps = 0
        self.passes = {"forward": 0.0, "backward": 0.0, "jvp": 0.0, "per_example": 0.0}
        self.last_step: dict[str, Any] = {}
        self._pending: dict[str, Any] | None = None
        self._jvp_mode = jvp_mode  # "auto" is decided at the first step's first product, then kept
        self._vmap_per_example = True  # until vmap fails on this model

    # -- configuration -----------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (``weight_decay`` checked; ``lr`` kept for schedulers, unused)."""
        merged = {**self.defaults, **param_group}
        wd = merged["weight_decay"]
        require(is_real(wd) and wd >= 0, f"HessianFree param group {len(self.param_groups)}", "weight_decay", wd,
                "expected a real number >= 0")
        super().add_param_group(param_group)

    # -- flat vectors ------------------------------------------------------------------------------------------

    @property
    def _dtype(self) -> torch.dtype:
        return math_dtype(self._params[0].dtype)

    def _flat(self, tensors: Iterable[Tensor]) -> Tensor:
        return flatten(tensors, self._dtype)

    def _unflat(self, vector: Tensor) -> dict[str, Tensor]:
        """``vector`` (flat, math dtype) as a dict of parameter-shaped tensors in the parameters' dtypes."""
        return unflatten(vector, dict(zip(self._names, self._params)))

    def _weight_decay_vector(self) -> Tensor | None:
        if not any(group["weight_decay"] for group in self.param_groups):
            return None
        return torch.cat([torch.full((p.numel(),), float(group["weight_decay"]), dtype=self._dtype, device=p.device)
                          for group in self.param_groups for p in group["params"]])

    # -- the model as a function of the parameters -------------------------------------------------------------

    def _forward_fn(self, batch: HessianFreeBatch, seed: int | None) -> Callable[[dict[str, Tensor]], Tensor]:
        model = self.model
        devices = list({p.device for p in self._params})

        def forward(params: dict[str, Tensor]) -> Tensor:
            if seed is None:
                return batch.select(torch.func.functional_call(model, params, batch.args, batch.kwargs))
            with seeded_rng(seed, devices):
                return batch.select(torch.func.functional_call(model, params, batch.args, batch.kwargs))

        return forward

    def _objective(self, batch: HessianFreeBatch, seed: int | None, wd: Tensor | None, theta: Tensor,
                   normalizer: Tensor) -> Callable[[Tensor], float]:
        """``x -> f(theta + x)`` on the gradient batch (data loss + L2 term), one forward each."""
        forward = self._forward_fn(batch, seed)

        def objective(x: Tensor) -> float:
            with torch.no_grad():
                outputs = forward(self._unflat(theta + x))
                value = per_example_losses(batch.loss, outputs, batch.targets, normalizer, batch.ignore_index).sum()
                if wd is not None:
                    value = value + 0.5 * torch.dot(wd * (theta + x), theta + x)
            self.passes["forward"] += 1.0
            return float(value)

        return objective

    # -- preparing a step: loss, gradient, preconditioner statistics --------------------------------------------

    def prepare(self, batch: HessianFreeBatch) -> Tensor:
        """Evaluate the loss and its gradient on ``batch`` (written to each parameter's ``.grad``, as a backward
        would) and remember the batch for the next ``step()``. Returns the data loss (without the L2 term)."""
        seed = int(torch.randint(0, 2**62, (1,)).item()) if self.model.training else None
        params = {n: p.detach() for n, p in zip(self._names, self._params)}
        forward = self._forward_fn(batch, seed)
        self._gradient_rows = batch.size
        with torch.enable_grad():
            linearization = Linearization(forward, params, jvp_mode=self._jvp_mode)
            outputs = linearization.outputs
            normalizer = batch_loss_normalizer(batch.loss, outputs, batch.targets, batch.ignore_index)
            outputs_d = outputs.detach().requires_grad_(True)
            loss = per_example_losses(batch.loss, outputs_d, batch.targets, normalizer, batch.ignore_index).sum()
            (d_outputs,) = torch.autograd.grad(loss, outputs_d)
        grad = linearization.vjp(d_outputs.to(outputs.dtype))
        self.passes["forward"] += 1.0
        self.passes["backward"] += 1.0
        for p, piece in zip(self._params, self._unflat(grad).values()):
            p.grad = piece.detach().clone()
        squares = None
        if self.settings["preconditioner"] == "martens":  # on the curvature mini-batch: its cost scales with it
            head = batch.head(self._curvature_rows(batch))
            head_normalizer = batch_loss_normalizer(batch.loss, outputs[:head.size], head.targets, batch.ignore_index)
            squares = self._per_example_squared_gradients(head, seed, params, head_normalizer)
        self._pending = {
            "batch": batch, "seed": seed, "loss": loss.detach(), "grad": grad.detach(),
            "squares": squares, "linearization": linearization, "normalizer": normalizer,
            "versions": [p._version for p in self._params],
        }
        return loss.detach()

    def _per_example_squared_gradients(self, batch: HessianFreeBatch, seed: int | None, params: dict[str, Tensor],
                                       normalizer: Tensor) -> Tensor:
        """:math:`\\frac1N\\sum_i \\nabla f_i \\odot \\nabla f_i` with :math:`f_i = N c_i` the per-example loss
        (Martens 2010 Sec. 4.7): by :meth:`_linear_per_example_squares` where every parameter is a linear layer's,
        otherwise by :meth:`_vmap_per_example_squares` (either about a forward and a backward of the batch), and
        where vmap cannot batch the model, by :meth:`_looped_per_example_squares` (one per example) from then on."""
        squares = self._linear_per_example_squares(batch, seed, params, normalizer)
        if squares is None and self._vmap_per_example:
            try:
                squares = self._vmap_per_example_squares(batch, params, normalizer)
            except Exception as err:  # noqa: BLE001 - any failure inside vmap: the loop below computes the same sum
                logger.info("HessianFree: torch.func.vmap cannot batch this model's per-example gradients (%s: %s); "
                            "the preconditioner takes one forward and backward per example instead",
                            type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                self._vmap_per_example = False
        if squares is None:
            squares = self._looped_per_example_squares(batch, seed, params, normalizer)
        self.passes["per_example"] += batch.size / self._gradient_rows
        return squares

    def _vmap_per_example_squares(self, batch: HessianFreeBatch, params: dict[str, Tensor],
                                  normalizer: Tensor) -> Tensor:
        """The same sum by ``torch.func.vmap`` of per-example gradients over chunks of examples (any model vmap
        can batch)."""
        n = batch.size
        model = self.model
        batched_kwargs = {k: v for k, v in batch.kwargs.items() if isinstance(v, Tensor) and v.dim() > 0
                          and v.shape[0] == n}
        static_kwargs = {k: v for k, v in batch.kwargs.items() if k not in batched_kwargs}
        batched_args = [isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n for a in batch.args]

        def one(params: dict[str, Tensor], args: tuple, kwargs: dict, target: Tensor) -> Tensor:
            full_args = tuple(a.unsqueeze(0) if batched else a for a, batched in zip(args, batched_args))
            full_kwargs = {**static_kwargs, **{k: v.unsqueeze(0) for k, v in kwargs.items()}}
            out = batch.select(torch.func.functional_call(model, params, full_args, full_kwargs))
            return per_example_losses(batch.loss, out, target.unsqueeze(0), normalizer, batch.ignore_index).sum() * n

        grad_one = torch.func.grad(one)
        arg_dims = tuple(0 if batched else None for batched in batched_args)
        total = None
        chunk = self.settings["per_example_chunk"]
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            args = tuple(a[start:stop] if batched else a for a, batched in zip(batch.args, batched_args))
            kwargs = {k: v[start:stop] for k, v in batched_kwargs.items()}
            per_example = torch.func.vmap(grad_one, in_dims=(None, arg_dims, 0, 0), randomness="different")(
                params, args, kwargs, batch.targets[start:stop])
            squares = self._flat([per_example[name].square().sum(0) for name in self._names])
            total = squares if total is None else total + squares
        return total / n

    def _looped_per_example_squares(self, batch: HessianFreeBatch, seed: int | None, params: dict[str, Tensor],
                                    normalizer: Tensor) -> Tensor:
        """The same sum by one forward and backward per example: any model that runs on one example, including
        those with data-dependent control flow that vmap refuses (transformers' attention-mask checks)."""
        n = batch.size
        leaves = {name: value.detach().requires_grad_() for name, value in params.items()}
        total = None
        for i in range(n):
            example = batch.rows(slice(i, i + 1))
            with torch.enable_grad():
                outputs = self._forward_fn(example, seed)(leaves)
                loss = per_example_losses(batch.loss, outputs, example.targets, normalizer, batch.ignore_index).sum()
                grads = torch.autograd.grad(loss * n, list(leaves.values()), allow_unused=True)
            squares = self._flat([torch.zeros_like(leaf) if grad is None else grad.square()
                                  for leaf, grad in zip(leaves.values(), grads)])
            total = squares if total is None else total + squares
        return total / n

    def _linear_per_example_squares(self, batch: HessianFreeBatch, seed: int | None, params: dict[str, Tensor],
                                    normalizer: Tensor) -> Tensor | None:
        """The same sum by one forward and backward, where every optimized parameter is the weight or bias of an
        ``nn.Linear`` applied once per forward to ``(examples, features)`` rows (an MLP): example :math:`i`'s
        weight gradient is then :math:`g_i a_i^\\top` (output gradient, input), so
        :math:`\\sum_i (g_i a_i^\\top)^{\\odot 2} = (g^{\\odot 2})^\\top a^{\\odot 2}` and the bias's is
        :math:`\\sum_i g_i^{\\odot 2}` (Goodfellow 2015, "Efficient Per-Example Gradient Computations",
        arXiv:1510.01799). None where that does not hold (sequences, other layers, a layer used twice)."""
        n = batch.size
        modules = dict(self.model.named_modules())
        owners: dict[str, tuple[str, str]] = {}
        for name in params:
            module_name, _, kind = name.rpartition(".")
            if not isinstance(modules.get(module_name), nn.Linear) or kind not in ("weight", "bias"):
                return None
            owners[name] = (module_name, kind)
        records: dict[str, list[Tensor | None] | None] = {}

        def hook(module_name: str) -> Callable[..., None]:
            def record(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
                rows = args[0] if args else None
                if module_name in records or not isinstance(rows, Tensor) or rows.dim() != 2 or rows.shape[0] != n:
                    records[module_name] = None  # a second call, or not one row per example
                    return
                entry: list[Tensor | None] = [rows.detach(), None]
                records[module_name] = entry
                output.register_hook(lambda grad: entry.__setitem__(1, grad.detach()))

            return record

        handles = [modules[name].register_forward_hook(hook(name)) for name in {m for m, _ in owners.values()}]
        try:
            leaves = {name: value.detach().requires_grad_() for name, value in params.items()}
            with torch.enable_grad():
                outputs = self._forward_fn(batch, seed)(leaves)
                total = per_example_losses(batch.loss, outputs, batch.targets, normalizer, batch.ignore_index).sum()
                torch.autograd.grad(total * n, list(leaves.values()), allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        squares = []
        for name in self._names:
            entry = records.get(owners[name][0])
            if entry is None or entry[1] is None:
                return None
            rows, grad_rows = entry
            squared_grads = grad_rows.square()
            squares.append(squared_grads.T @ rows.square() if owners[name][1] == "weight" else squared_grads.sum(0))
        return self._flat(squares) / n

    def _curvature_rows(self, batch: HessianFreeBatch) -> int:
        return max(1, math.ceil(self.settings["curvature_batch_fraction"] * batch.size))

    # -- the step ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:  # type: ignore[override]
        """One Hessian-free step on ``closure`` (a :class:`HessianFreeBatch`) or the batch given to
        :meth:`prepare`. Returns the loss before the step."""
        if isinstance(closure, HessianFreeBatch):
            self.prepare(closure)
        elif closure is not None:
            raise TypeError("HessianFree.step takes a HessianFreeBatch, not a loss closure: Gauss-Newton products "
                            "need the model's outputs and the loss's form. " + NEEDS_BATCH_MESSAGE)
        pending = self._pending
        if pending is None:
            raise RuntimeError(NEEDS_BATCH_MESSAGE)
        self._pending = None
        if pending["versions"] != [p._version for p in self._params]:  # parameters changed since prepare()
            self.prepare(pending["batch"])
            pending, self._pending = self._pending, None
        self.step_calls += 1
        stats = self._step(pending)
        self.last_step = stats
        return pending["loss"]

    def _reject(self, stats: dict[str, Any], reason: str) -> dict[str, Any]:
        self.rejected_steps += 1
        self.damping = min(self.damping * self.settings["nonfinite_damping_factor"], self.settings["max_damping"])
        stats.update(accepted=False, rejected=reason, damping=self.damping, alpha=0.0)
        logger.warning("HessianFree: step %d rejected (%s); damping raised to %g", self.step_calls, reason,
                       self.damping)
        return stats

    def _step(self, pending: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        batch, seed = pending["batch"], pending["seed"]
        theta = self._flat(self._params)
        wd = self._weight_decay_vector()
        data_loss = float(pending["loss"])
        grad = pending["grad"] if wd is None else pending["grad"] + wd * theta
        f0 = data_loss + (0.0 if wd is None else float(0.5 * torch.dot(wd * theta, theta)))
        stats: dict[str, Any] = {"loss": data_loss, "damping_used": self.damping}
        if not (math.isfinite(f0) and bool(torch.isfinite(grad).all())):
            return self._reject(stats, "non-finite loss or gradient")
        damping = self.damping

        # curvature on a prefix of the batch (Sec. 4.3); the gradient's linearisation is reused when it is the whole
        # batch
        curvature_batch = batch.head(self._curvature_rows(batch))
        fraction = curvature_batch.size / batch.size
        params = {n: p.detach() for n, p in zip(self._names, self._params)}
        with torch.enable_grad():
            operator = GaussNewtonOperator(self._forward_fn(curvature_batch, seed), params, batch.loss,
                                           curvature_batch.targets, batch.ignore_index,
                                           linearization=pending["linearization"] if curvature_batch is batch
                                           else None, jvp_mode=self._jvp_mode)
        if curvature_batch is not batch:
            self.passes["forward"] += fraction

        def matvec(v: Tensor) -> Tensor:
            with torch.enable_grad():
                gv = operator(v)
            self.passes["jvp"] += fraction
            self.passes["backward"] += fraction
            out = torch.add(gv, v, alpha=damping)
            return out if wd is None else out.addcmul_(wd, v)

        inverse_preconditioner = None
        if pending["squares"] is not None:
            inverse_preconditioner = martens_preconditioner(pending["squares"], damping, s["preconditioner_exponent"])
        x0 = None
        if s["cg_decay"] > 0 and all("hf_warm_start" in self.state[p] for p in self._params):
            x0 = s["cg_decay"] * self._flat([self.state[p]["hf_warm_start"] for p in self._params])
        cg = preconditioned_cg(matvec, -grad, x0, inverse_preconditioner, max_iters=s["cg_max_iters"],
                               tolerance=s["cg_tolerance"], backtrack_gamma=s["backtrack_gamma"])
        self._jvp_mode = operator.linearization.jvp_mode
        stats.update(cg_iters=cg.iterations, cg_stop=cg.stop, gn_products=operator.products, jvp=self._jvp_mode)
        if not bool(torch.isfinite(cg.x).all()) or not math.isfinite(cg.phi):
            return self._reject(stats, "non-finite CG direction")

        # CG-iterate backtracking (Sec. 4.6), reduction ratio and damping (Sec. 4.1)
        objective = self._objective(batch, seed, wd, theta, pending["normalizer"])
        index, f_p = backtrack_iterates(cg.iterates, objective)
        chosen, phi = cg.iterates[index][1], cg.iterates[index][2]
        rho = (f_p - f0) / phi if phi < 0 else -math.inf
        self.damping = levenberg_marquardt(damping, rho, increase=s["damping_increase"],
                                           decrease=s["damping_decrease"], min_damping=s["min_damping"],
                                           max_damping=s["max_damping"])
        # the next CG run starts from the last iterate, not the backtracked one (Sec. 4.6)
        for p, piece in zip(self._params, self._unflat(cg.x).values()):
            self.state[p]["hf_warm_start"] = piece.to(self._dtype).clone()
        stats.update(rho=rho, damping=self.damping, cg_backtracked_to=cg.iterates[index][0])

        # line search (Martens & Sutskever 2012 Sec. 8.8)
        slope = float(torch.dot(grad, chosen))
        if s["line_search"]:
            alpha, f_new, _ = armijo_backtracking(lambda a: objective(a * chosen), f0, slope,
                                                  f_at_one=f_p, c=s["armijo_c"], shrink=s["line_search_shrink"],
                                                  max_trials=s["line_search_max_trials"])
        else:
            alpha, f_new = (1.0, f_p) if math.isfinite(f_p) else (0.0, f0)
        stats.update(alpha=alpha, objective_before=f0, objective_after=f_new)
        if alpha == 0.0:
            self.rejected_steps += 1
            stats["accepted"] = False
            return stats
        offset = 0
        for p in self._params:
            piece = chosen[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
            p.add_(piece.to(p.dtype), alpha=alpha)
        self.accepted_steps += 1
        stats["accepted"] = True
        return stats

    def contribute_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """With a training loss in ``logs``: the damping and the last step's CG iterations, reduction ratio and
        line-search step (``hf_*``; infinite or missing values left out). Trainer's ``log`` merges them."""
        if "loss" not in logs or not self.last_step:
            return {}
        last = self.last_step
        extra = {"hf_damping": self.damping, "hf_cg_iters": last.get("cg_iters", 0), "hf_rho": last.get("rho"),
                 "hf_alpha": last.get("alpha")}
        return {k: float(v) for k, v in extra.items() if isinstance(v, (int, float)) and math.isfinite(v)}

    # -- costs -------------------------------------------------------------------------------------------------

    def backward_equivalents(self) -> float:
        """The work so far in backward-pass equivalents of the gradient batch: a forward counts 1/2, a backward 1,
        a jvp (forward with tangents) 1, a per-example-gradient pass 3/2 (a forward and a backward); curvature
        passes scaled by the curvature fraction. (A plain gradient step costs 3/2.)"""
        p = self.passes
        return 0.5 * p["forward"] + p["backward"] + p["jvp"] + 1.5 * p["per_example"]

    # -- checkpoints -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict (``hf_warm_start`` per parameter) plus ``"hessian_free"``: damping and counters."""
        state_dict = super().state_dict()
        state_dict["hessian_free"] = {"damping": self.damping, "step_calls": self.step_calls,
                                      "accepted_steps": self.accepted_steps, "rejected_steps": self.rejected_steps,
                                      "passes": dict(self.passes)}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("hessian_free")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "hessian_free"})
        if extra is not None:
            self.damping = float(extra["damping"])
            self.step_calls = int(extra["step_calls"])
            self.accepted_steps = int(extra["accepted_steps"])
            self.rejected_steps = int(extra["rejected_steps"])
            self.passes = {k: float(v) for k, v in extra["passes"].items()}
        self._pending = None


def _check_settings(settings: dict[str, Any], damping: float) -> None:
    where = "HessianFree"
    require(is_real(damping) and damping > 0, where, "damping", damping, "expected a real number > 0")
    for name in ("damping_increase", "nonfinite_damping_factor"):
        require(is_real(settings[name]) and settings[name] > 1, where, name, settings[name], "expected a number > 1")
    require(is_real(settings["damping_decrease"]) and 0 < settings["damping_decrease"] < 1, where,
            "damping_decrease", settings["damping_decrease"], "expected 0 < damping_decrease < 1")
    require(is_real(settings["min_damping"]) and settings["min_damping"] >= 0, where, "min_damping",
            settings["min_damping"], "expected a real number >= 0")
    require(is_real(settings["max_damping"]) and settings["max_damping"] > settings["min_damping"], where,
            "max_damping", settings["max_damping"], "expected a number > min_damping")
    for name in ("cg_max_iters", "per_example_chunk", "line_search_max_trials"):
        value = settings[name]
        require(is_int(value) and value >= 1, where, name, value, "expected an int >= 1")
    require(is_real(settings["cg_tolerance"]) and settings["cg_tolerance"] > 0, where, "cg_tolerance",
            settings["cg_tolerance"], "expected a real number > 0")
    require(is_real(settings["cg_decay"]) and 0 <= settings["cg_decay"] <= 1, where, "cg_decay",
            settings["cg_decay"], "expected 0 <= cg_decay <= 1")
    require(is_real(settings["backtrack_gamma"]) and settings["backtrack_gamma"] > 1, where, "backtrack_gamma",
            settings["backtrack_gamma"], "expected a number > 1")
    fraction = settings["curvature_batch_fraction"]
    require(is_real(fraction) and 0 < fraction <= 1, where, "curvature_batch_fraction", fraction,
            "expected 0 < fraction <= 1")
    require(settings["preconditioner"] in PRECONDITIONERS, where, "preconditioner", settings["preconditioner"],
            f"expected one of {PRECONDITIONERS}")
    require(is_real(settings["preconditioner_exponent"]) and 0 <= settings["preconditioner_exponent"] <= 1, where,
            "preconditioner_exponent", settings["preconditioner_exponent"], "expected 0 <= exponent <= 1")
    require(settings["jvp_mode"] in JVP_MODES, where, "jvp_mode", settings["jvp_mode"], f"expected one of {JVP_MODES}")
    require(isinstance(settings["line_search"], bool), where, "line_search", settings["line_search"], "expected a bool")
    require(is_real(settings["armijo_c"]) and 0 < settings["armijo_c"] < 1, where, "armijo_c", settings["armijo_c"],
            "expected 0 < c < 1")
    require(is_real(settings["line_search_shrink"]) and 0 < settings["line_search_shrink"] < 1, where,
            "line_search_shrink", settings["line_search_shrink"], "expected 0 < shrink < 1")
    require(settings["loss"] in ("auto",) + LOSSES, where, "loss", settings["loss"],
            f"expected 'auto' or one of {LOSSES} (losses with a Gauss-Newton form)")
