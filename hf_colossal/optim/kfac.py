r"""K-FAC: Kronecker-factored natural-gradient steps for the layers of a model, in pure torch.

References (equation numbers cite the papers):

- Martens & Grosse 2015, "Optimizing Neural Networks with Kronecker-factored Approximate Curvature",
  arXiv:1503.05671 — the Fisher block of a layer :math:`F \approx A \otimes G` with
  :math:`A = E[\bar a \bar a^\top]` (inputs with a homogeneous coordinate for the bias, Sec. 3) and
  :math:`G = E[g g^\top]` (per-example gradients of the layer's outputs), eq. (1)-(3); its inverse applied as
  :math:`G^{-1} \nabla_W A^{-1}` (Sec. 4.2); factored Tikhonov damping with the :math:`\pi` correction
  (Sec. 6.3); exponential moving averages of the factors (Sec. 5); Levenberg-Marquardt adaptation of the
  damping from the reduction ratio of a quadratic model (Sec. 6.5).
- Grosse & Martens 2016, "A Kronecker-factored approximate Fisher matrix for convolution layers" (KFC),
  arXiv:1602.01407 — convolutions: patches as inputs, spatial locations as independent (Sec. 3.1, eq. 22-23).
- Eschenhagen, Immer, Turner, Schneider, Hennig 2023, "Kronecker-Factored Approximate Curvature for Modern Neural
  Network Architectures", arXiv:2311.00636 — layers with weight sharing over a dimension of size R (sequence,
  spatial): K-FAC-expand (every shared position an example, eq. 11) and K-FAC-reduce (positions summed first,
  eq. 13).
- Ba, Grosse, Martens 2017, "Distributed second-order optimization using Kronecker-factored approximations",
  ICLR — KL clipping of the preconditioned step (Sec. 5); Pauloski, Huang, Xu, Chard, Foster, Zhang 2021,
  "KAISA: An Adaptive Second-Order Optimizer Framework for Deep Neural Networks", SC'21 — data parallelism:
  factors all-reduced on update steps, the inverse work split across ranks (Sec. 3).

The module has two halves: functional math (factor statistics, damping, inverses and eigendecompositions,
preconditioning, KL clipping, the base rules) that operates on tensors, and the glue that attaches it to a
model (:class:`KfacLayer` and its kinds, hooks) and to ``torch.optim`` (:class:`Kfac`).

Scaling convention. For a layer with output :math:`s`, the per-example gradient of a loss that is the mean
over the :math:`N` examples of a batch is :math:`N \partial L / \partial s`. With shared positions
:math:`r = 1..R`:

- expand: :math:`A = \frac{1}{NR} \sum_{n,r} a_{nr} a_{nr}^\top`,
  :math:`G = \frac{1}{N} \sum_{n,r} g_{nr} g_{nr}^\top`;
- reduce: :math:`A = \frac{1}{N} \sum_n \tilde a_n \tilde a_n^\top` with :math:`\tilde a_n = \frac1R \sum_r a_{nr}`,
  :math:`G = \frac{1}{N} \sum_n \tilde g_n \tilde g_n^\top` with :math:`\tilde g_n = \sum_r g_{nr}`.

Gradient accumulation (micro-batch losses divided by their number, as Trainer does) gives the factors of the
whole batch, and under data parallelism the rank averages give those of the global batch.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from .._hooks import OptimizerHook
from ._precision import fp32_matmul_precision
from ._foreach import (
    NONFINITE_POLICIES,
    evaluate_closure,
    foreach_norms,
    group_by_device_and_dtype,
    is_int,
    is_real,
    math_dtype,
    nonfinite_policy_allows_step,
    params_with_grads_per_group,
    require,
    restore_state_precision,
    stack_on_one_device,
)
from .hessian_free import levenberg_marquardt, seeded_rng

__all__ = ["Kfac", "KfacLayer", "find_kfac_layers"]

logger = logging.getLogger(__name__)

BASE_RULES = ("adam_graft", "adam", "sgd")
METHODS = ("inverse", "eigen")
DAMPING_SCALES = ("absolute", "relative")
DAMPING_ADAPTATIONS = ("none", "levenberg_marquardt")
APPROXIMATIONS = ("expand", "reduce")
EMBEDDING_MODES = ("diagonal", "skip")
MATMUL_PRECISIONS = ("high", "highest")
#: Elements per collective when factors or inverses travel between ranks (256 MiB of fp32).
COMM_BUCKET_NUMEL = 64 * 2**20

# ---------------------------------------------------------------------------------------------------------------
# Functional math: factor statistics


def with_homogeneous_coordinate(rows: Tensor) -> Tensor:
    """Append a column of ones (the bias's input, Martens & Grosse 2015 Sec. 3: :math:`\\bar a = [a; 1]`)."""
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)


def expand_rows(x: Tensor) -> Tensor:
    """``(N, *shared, d)`` to ``(N * R, d)``: every shared position an example (K-FAC-expand)."""
    return x.reshape(-1, x.shape[-1])


def reduce_rows(x: Tensor, *, mean: bool) -> Tensor:
    """``(N, *shared, d)`` to ``(N, d)`` by the mean (inputs) or sum (output gradients) over the shared
    positions (K-FAC-reduce, Eschenhagen et al. 2023 eq. 13)."""
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    return x.mean(dim=1) if mean else x.sum(dim=1)


def conv2d_patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """The input patches of a 2-D convolution as ``(N, L, C_in * kh * kw)`` (Grosse & Martens 2016, Sec. 3.1:
    the expansion :math:`[[A]]` of the input)."""
    patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return patches.transpose(1, 2)


def gram(rows: Tensor) -> Tensor:
    """:math:`X^\\top X` in fp32 or wider (bf16/fp16 activations under autocast are widened first)."""
    rows = rows.to(math_dtype(rows.dtype))
    return rows.T @ rows


def input_factor(sum_of_outer_products: Tensor, rows: int) -> Tensor:
    """:math:`A` from the accumulated :math:`\\sum a a^\\top` over ``rows`` rows (expand: N*R, reduce: N)."""
    return sum_of_outer_products / rows


def output_grad_factor(sum_of_outer_products: Tensor, examples: int) -> Tensor:
    """:math:`G` from the accumulated :math:`\\sum \\delta \\delta^\\top` of the backpropagated output gradients
    :math:`\\delta = \\partial L / \\partial s` of a mean loss over ``examples`` examples.

    The per-example gradients are :math:`g = N \\delta`, so :math:`\\frac1N \\sum g g^\\top = N \\sum \\delta
    \\delta^\\top` (Martens & Grosse 2015 eq. (2), the expectation over the examples of the batch)."""
    return sum_of_outer_products * examples


def update_factor_(factor: Tensor, new: Tensor, decay: float, finite: Tensor) -> None:
    """``factor <- decay * factor + (1 - decay) * new`` (Martens & Grosse 2015 Sec. 5), in place, unless
    ``finite`` (a 0-d bool tensor) is False: then ``factor`` keeps its value. No host synchronisation."""
    factor.lerp_(torch.where(finite, new, factor), 1.0 - decay)


# ---------------------------------------------------------------------------------------------------------------
# Functional math: damping, inverses, preconditioning, KL clipping


def factored_damping(a_factor: Tensor, g_factor: Tensor, damping: float, pi_correction: bool,
                     relative: bool = False) -> tuple[Tensor, Tensor]:
    r"""The Tikhonov terms :math:`(\pi \sqrt\lambda, \sqrt\lambda / \pi)` added to :math:`A` and :math:`G`.

    Martens & Grosse 2015 Sec. 6.3: :math:`\pi = \sqrt{\bar a / \bar g}` with the mean eigenvalues
    :math:`\bar a = \mathrm{tr}(A)/d_A`, :math:`\bar g = \mathrm{tr}(G)/d_G` (1 without ``pi_correction``, or where a
    trace is not positive). With ``relative``, :math:`\lambda` is a fraction of the layer's curvature scale
    :math:`\bar a \bar g` (the mean eigenvalue of :math:`A \otimes G`): the terms become
    :math:`(\sqrt\lambda\, \bar a, \sqrt\lambda\, \bar g)` with ``pi_correction``, so every layer is damped alike
    whatever the scale of its activations and output gradients. That scale spans six orders of magnitude across
    the layers of MiniLM (1.5e-9 to 1.1e-3), where an absolute :math:`\lambda = 10^{-3}` leaves the inner layers'
    preconditioners nearly multiples of the identity; relative damping did worse than that there
    (``benchmarks/RESULTS.md``, K-FAC quality). Where a trace is not positive (a layer without statistics)
    the absolute :math:`\lambda` is used. A 1-D ``a_factor`` is a diagonal factor. Returns 0-d tensors; no host
    synchronisation.
    """
    a_mean = (a_factor.sum() if a_factor.dim() == 1 else a_factor.diagonal().sum()) / a_factor.shape[0]
    g_mean = g_factor.diagonal().sum() / g_factor.shape[0]
    usable = (a_mean > 0) & (g_mean > 0)
    root = torch.full((), math.sqrt(damping), dtype=g_factor.dtype, device=g_factor.device)
    if relative:
        root = torch.where(usable, root * (a_mean * g_mean).clamp_min(0).sqrt(), root)
    if not pi_correction:
        return root, root
    pi = torch.where(usable, (a_mean / g_mean.clamp_min(torch.finfo(g_mean.dtype).tiny)).sqrt(), 1.0)
    return pi * root, root / pi


def damped_inverses(factors: Tensor, damping: Tensor) -> Tensor:
    """:math:`(F_i + \\gamma_i I)^{-1}` for a stack ``(B, n, n)`` of factors and ``(B,)`` damping terms.

    The damped factors are symmetric positive definite, :math:`F + \\gamma I = L L^\\top`: one batched Cholesky
    (``cholesky_ex``: no host synchronisation for the error check), :math:`L^{-1}` by a batched triangular solve,
    and :math:`L^{-\\top} L^{-1}` by one batched product, all in true fp32 (never TF32). On an H200 this took
    27-48 ms for 176 factors of 1024 and 112 ms for 48 of 2816, against 56 and 184 ms for ``cholesky_inverse``,
    which also blocks the host until the device is done. (Batched LU, ``inv_ex``, fails on the CPU with MKL and more
    than one thread in torch 2.13.)"""
    eye = torch.eye(factors.shape[-1], dtype=factors.dtype, device=factors.device)
    with fp32_matmul_precision("ieee"):
        cholesky, _ = torch.linalg.cholesky_ex(factors + damping[:, None, None] * eye)
        inverse_cholesky = torch.linalg.solve_triangular(cholesky, eye.expand_as(cholesky), upper=False)
        return inverse_cholesky.transpose(-2, -1) @ inverse_cholesky


def damped_eigens(factors: Tensor, damping: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvectors :math:`Q_i` and :math:`1 / (d_i + \\gamma_i)` of a stack of symmetric factors: then
    :math:`(F_i + \\gamma_i I)^{-1} = Q_i \\,\\mathrm{diag}(1/(d_i+\\gamma_i))\\, Q_i^\\top`. One batched ``eigh``."""
    eigenvalues, eigenvectors = torch.linalg.eigh(factors)
    return eigenvectors, 1.0 / (eigenvalues.clamp_min(0.0) + damping[:, None])


def precondition(grad: Tensor, g_inverse: Any, a_inverse: Any) -> Tensor:
    r""":math:`(G+\gamma_G I)^{-1} \, \nabla_W \, (A+\gamma_A I)^{-1}` (Martens & Grosse 2015 Sec. 4.2).

    ``grad`` is ``(d_G, d_A)``. Each inverse is a matrix, a 1-D diagonal (an embedding's :math:`A`), or a pair
    ``(Q, s)`` of eigenvectors and inverted damped eigenvalues (the eigen method).
    """

    def left(x: Tensor, inverse: Any) -> Tensor:
        if isinstance(inverse, tuple):
            q, s = inverse
            return q @ (s[:, None] * (q.T @ x))
        return inverse @ x

    def right(x: Tensor, inverse: Any) -> Tensor:
        if isinstance(inverse, tuple):
            q, s = inverse
            return ((x @ q) * s[None, :]) @ q.T
        if inverse.dim() == 1:
            return x * inverse[None, :]
        return x @ inverse

    return right(left(grad, g_inverse), a_inverse)


def damped_kronecker_quadratic(delta: Tensor, a_factor: Tensor, g_factor: Tensor, gamma_a: Tensor,
                               gamma_g: Tensor) -> Tensor:
    r""":math:`\mathrm{vec}(\Delta)^\top [(A + \gamma_A I) \otimes (G + \gamma_G I)]\, \mathrm{vec}(\Delta)
    = \langle (G + \gamma_G I)\, \Delta\, (A + \gamma_A I), \Delta \rangle` for a ``(d_G, d_A)`` step
    :math:`\Delta`: the curvature term of the quadratic model under the damped K-FAC curvature that the step
    inverts (Martens & Grosse 2015 Sec. 6.5, with :math:`F` replaced by its damped Kronecker approximation). A 1-D
    ``a_factor`` is a diagonal factor."""
    left = g_factor @ delta + gamma_g * delta
    right = left * (a_factor + gamma_a) if a_factor.dim() == 1 else left @ a_factor + gamma_a * left
    return (right * delta).sum()


def reduction_ratio(loss_before: Tensor, loss_after: Tensor, model_change: Tensor) -> float | None:
    r""":math:`\rho = (h(\theta + \delta) - h(\theta)) / M(\delta)` (Martens & Grosse 2015 Sec. 6.5), read on
    the host (one synchronisation).

    The learning rate, not the model, sets the step's length here, so the model may predict no decrease
    (:math:`M(\delta) \ge 0`: the step overshoots the model's minimum). Then a loss that rose counts as a bad
    step (``-inf``), and otherwise there is nothing to learn (None; also for a skipped step, :math:`\delta = 0`).
    A loss that is not finite after the step is a bad step."""
    before, after, change = torch.stack([loss_before, loss_after, model_change]).double().tolist()
    if not math.isfinite(after):
        return -math.inf
    if not change < 0:
        return -math.inf if after > before else None
    return (after - before) / change


def kl_clip_scale(step_inner_products: list[Tensor], kl_clip: float) -> Tensor:
    r""":math:`\nu = \min(1, \sqrt{\kappa / |\sum_l \eta_l^2 \langle \tilde g_l, g_l \rangle|})` (Ba et al. 2017
    Sec. 5, KAISA): the scale that bounds the step's predicted change of the model's output distribution.

    ``step_inner_products`` are the terms :math:`\eta_l^2 \langle \tilde g_l, g_l\rangle` per layer (0-d tensors).
    1 when the sum is 0. No host synchronisation."""
    total = stack_on_one_device(step_inner_products).sum().abs()
    return torch.where(total > 0, (kl_clip / total.clamp_min(torch.finfo(total.dtype).tiny)).sqrt(), 1.0).clamp(
        max=1.0
    )


# ---------------------------------------------------------------------------------------------------------------
# Functional math: the base rules


def sgd_momentum(
    params: list[Tensor], directions: list[Tensor], buffers: list[Tensor], *, lr: float, momentum: float,
    weight_decay: float,
) -> None:
    """Heavy-ball SGD on the (preconditioned) directions, L2 weight decay added after preconditioning (as KAISA
    with torch SGD): ``d += wd * p; b = momentum * b + d; p -= lr * b``."""
    updates = torch._foreach_add(directions, params, alpha=weight_decay)
    torch._foreach_mul_(buffers, momentum)
    torch._foreach_add_(buffers, updates)
    torch._foreach_add_(params, buffers, alpha=-lr)


def adam_direction(
    grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], steps: list[Tensor], *, beta1: float,
    beta2: float, eps: float,
) -> list[Tensor]:
    """Advance Adam's moments and steps by ``grads`` and return the bias-corrected direction
    :math:`\\hat m / (\\sqrt{\\hat v} + \\epsilon)` (Kingma & Ba 2015, Algorithm 1).

    Per (device, dtype) bucket, one pass of torch's fused AdamW kernel (``torch._fused_adamw_``, no decay) run on a
    zeroed buffer instead of the parameters, with lr -1 so that its ``p -= lr * direction`` leaves the direction
    there, and updates the moments: each tensor's own step count is read on the device inside the kernel. (Written with ``torch._foreach_*`` ops, the
    bias corrections are per-tensor 0-d operands, which torch applies one kernel launch per tensor.)"""
    torch._foreach_add_(steps, 1.0)
    directions: list[Tensor] = [None] * len(grads)  # type: ignore[list-item]
    for (bucket_grads, bucket_exp_avgs, bucket_exp_avg_sqs, bucket_steps), indices in group_by_device_and_dtype(
            [grads, exp_avgs, exp_avg_sqs, steps]):
        flat = bucket_grads[0].new_zeros(sum(g.numel() for g in bucket_grads))
        views = [view.view_as(g) for view, g in zip(flat.split([g.numel() for g in bucket_grads]), bucket_grads)]
        torch._fused_adamw_(views, bucket_grads, bucket_exp_avgs, bucket_exp_avg_sqs, [], bucket_steps, lr=-1.0,
                            beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
        for index, view in zip(indices, views):
            directions[index] = view
    return directions


def graft_norms(directions: list[Tensor], magnitudes: list[Tensor]) -> list[Tensor]:
    """Each direction rescaled to the L2 norm of the matching magnitude tensor (layer-wise grafting, Agarwal et al.
    2020, "Disentangling Adaptive Gradient Methods from Learning Rates"); a zero direction stays zero."""
    direction_norms = stack_on_one_device(foreach_norms(directions))
    target_norms = stack_on_one_device(foreach_norms(magnitudes))
    tiny = torch.finfo(direction_norms.dtype).tiny
    scales = torch.where(direction_norms > 0, target_norms / direction_norms.clamp_min(tiny), 0.0)
    return list(torch._foreach_mul(directions, list(scales.unbind(0))))


def decoupled_update(params: list[Tensor], updates: list[Tensor], *, lr: float, weight_decay: float) -> None:
    """``p -= lr * (u + wd * p)`` (decoupled weight decay, Loshchilov & Hutter 2019)."""
    if weight_decay:
        torch._foreach_add_(updates, params, alpha=weight_decay)
    torch._foreach_add_(params, updates, alpha=-lr)


# ---------------------------------------------------------------------------------------------------------------
# Layers: how each module kind gives its rows and its gradient matrix


class KfacLayer:
    """A module preconditioned by K-FAC: its weight (and bias) as a ``(d_G, d_A)`` matrix, and the statistics of
    its inputs and output gradients accumulated between factor updates.

    Subclasses give ``activation_rows`` (rows of :math:`\\bar a`, or token counts for a diagonal :math:`A`),
    ``output_grad_rows`` and the gradient matrix's layout.
    """

    kind = ""
    diagonal_input_factor = False

    def __init__(self, name: str, module: nn.Module, approximation: str) -> None:
        self.name = name
        self.module = module
        self.approximation = approximation
        self.weight: nn.Parameter = module.weight
        self.bias: nn.Parameter | None = getattr(module, "bias", None)
        self.reset_statistics()

    # statistics accumulated by the hooks
    def reset_statistics(self) -> None:
        self.input_sum: Tensor | None = None
        self.input_rows = 0
        self.output_grad_sum: Tensor | None = None
        self.output_grad_examples = 0
        #: the backward pass whose examples were counted last and how many (see :meth:`accumulate_output_grad`)
        self.counted_backward: int | None = None
        self.counted_examples = 0

    def accumulate_input(self, x: Tensor) -> None:
        rows, count = self.activation_rows(x)
        contribution = rows if self.diagonal_input_factor else gram(rows)
        self.input_sum = contribution if self.input_sum is None else self.input_sum + contribution
        self.input_rows += count

    def accumulate_output_grad(self, grad_output: Tensor, backward: int | None = None) -> None:
        """Add one call's output gradients. The examples are counted once per backward pass (``backward``
        identifies it; None counts every call), as the largest call's batch: a module called several times in
        one forward (weights reused across depth) sums its positions over the calls, as weight sharing over a
        sequence does (K-FAC-expand), for the same examples. Under reentrant activation checkpointing each
        checkpointed segment is a backward pass of its own, so a module reused across segments counts per
        segment (transformers' default checkpointing is not reentrant)."""
        contribution = gram(self.output_grad_rows(grad_output))
        self.output_grad_sum = contribution if self.output_grad_sum is None else self.output_grad_sum + contribution
        examples = grad_output.shape[0]
        if backward is None or backward != self.counted_backward:
            self.output_grad_examples += examples
            self.counted_backward, self.counted_examples = backward, examples
        elif examples > self.counted_examples:
            self.output_grad_examples += examples - self.counted_examples
            self.counted_examples = examples

    def shared_rows(self, x: Tensor, *, mean: bool) -> Tensor:
        return expand_rows(x) if self.approximation == "expand" else reduce_rows(x, mean=mean)

    # layout
    @property
    def params(self) -> list[Tensor]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    @property
    def factor_dims(self) -> tuple[int, int]:
        """``(d_A, d_G)``."""
        raise NotImplementedError

    def activation_rows(self, x: Tensor) -> tuple[Tensor, int]:
        raise NotImplementedError

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        raise NotImplementedError

    def weight_matrix(self, weight_like: Tensor) -> Tensor:
        """A weight-shaped tensor as ``(d_G, d_A without bias)``."""
        raise NotImplementedError

    def weight_from_matrix(self, matrix: Tensor) -> Tensor:
        raise NotImplementedError

    def matrix_of(self, weight_like: Tensor, bias_like: Tensor | None) -> Tensor:
        """Tensors shaped like the weight and bias as one ``(d_G, d_A)`` matrix in the math dtype, the bias's as
        the last column."""
        weight = self.weight_matrix(weight_like).to(math_dtype(self.weight.dtype))
        if bias_like is None:
            return weight
        return torch.cat([weight, bias_like.to(weight.dtype)[:, None]], dim=1)

    def grad_matrix(self) -> Tensor:
        """The gradient as one ``(d_G, d_A)`` matrix (fp32 for fp16/bf16 weights), the bias's as the last column."""
        return self.matrix_of(self.weight.grad, None if self.bias is None else self.bias.grad)

    def split(self, matrix: Tensor) -> list[Tensor]:
        """A ``(d_G, d_A)`` matrix back into tensors shaped like :attr:`params`."""
        if self.bias is None:
            return [self.weight_from_matrix(matrix)]
        return [self.weight_from_matrix(matrix[:, :-1]), matrix[:, -1].contiguous()]


class LinearLayer(KfacLayer):
    """``nn.Linear`` (weight ``(out, in)``) or GPT-2's ``Conv1D`` (weight ``(in, out)``, ``transposed``)."""

    kind = "linear"

    def __init__(self, name: str, module: nn.Module, approximation: str, *, transposed: bool) -> None:
        self.transposed = transposed
        super().__init__(name, module, approximation)

    @property
    def factor_dims(self) -> tuple[int, int]:
        fan_in, fan_out = self.weight.shape if self.transposed else self.weight.shape[::-1]
        return fan_in + (self.bias is not None), fan_out

    def activation_rows(self, x: Tensor) -> tuple[Tensor, int]:
        rows = self.shared_rows(x, mean=True)
        if self.bias is not None:
            rows = with_homogeneous_coordinate(rows)
        return rows, rows.shape[0]

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        return self.shared_rows(grad_output, mean=False)

    def weight_matrix(self, weight_like: Tensor) -> Tensor:
        return weight_like.T if self.transposed else weight_like

    def weight_from_matrix(self, matrix: Tensor) -> Tensor:
        return (matrix.T if self.transposed else matrix).contiguous()


class Conv2dLayer(KfacLayer):
    """``nn.Conv2d`` (groups 1, zero padding): KFC (Grosse & Martens 2016) — patches are the inputs, spatial
    locations the shared positions (expand: KFC's independence assumption; reduce: Eschenhagen et al. 2023)."""

    kind = "conv2d"

    @property
    def factor_dims(self) -> tuple[int, int]:
        out_channels = self.weight.shape[0]
        return self.weight[0].numel() + (self.bias is not None), out_channels

    def activation_rows(self, x: Tensor) -> tuple[Tensor, int]:
        rows = self.shared_rows(conv2d_patches(x, self.module), mean=True)
        if self.bias is not None:
            rows = with_homogeneous_coordinate(rows)
        return rows, rows.shape[0]

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        return self.shared_rows(grad_output.flatten(2).transpose(1, 2), mean=False)

    def weight_matrix(self, weight_like: Tensor) -> Tensor:
        return weight_like.reshape(weight_like.shape[0], -1)

    def weight_from_matrix(self, matrix: Tensor) -> Tensor:
        return matrix.reshape(self.weight.shape).contiguous()


class EmbeddingLayer(KfacLayer):
    """``nn.Embedding`` (weight ``(V, d)``): one-hot inputs make :math:`A` diagonal, the token frequencies per
    position (expand). A full :math:`V \\times V` factor is never formed."""

    kind = "embedding"
    diagonal_input_factor = True

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__(name, module, "expand")

    @property
    def factor_dims(self) -> tuple[int, int]:
        return self.weight.shape[0], self.weight.shape[1]

    def activation_rows(self, ids: Tensor) -> tuple[Tensor, int]:
        counts = torch.bincount(ids.reshape(-1), minlength=self.weight.shape[0]).to(math_dtype(self.weight.dtype))
        return counts, ids.numel()

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        return expand_rows(grad_output)

    def weight_matrix(self, weight_like: Tensor) -> Tensor:
        return weight_like.T

    def weight_from_matrix(self, matrix: Tensor) -> Tensor:
        return matrix.T.contiguous()


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2) by duck type: ``nf`` output features and a weight ``(in, nf)``."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[1] == module.nf)


def make_layer(name: str, module: nn.Module, *, linear_approximation: str, conv2d_approximation: str,
               embedding: str) -> KfacLayer | str:
    """The :class:`KfacLayer` for ``module``, or the reason it is left to the base rule."""
    if isinstance(module, nn.Linear):
        return LinearLayer(name, module, linear_approximation, transposed=False)
    if is_gpt2_conv1d(module):
        return LinearLayer(name, module, linear_approximation, transposed=True)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return "Conv2d with groups > 1, non-zero padding mode or string padding"
        return Conv2dLayer(name, module, conv2d_approximation)
    if isinstance(module, nn.Embedding):
        if embedding == "skip":
            return "embedding=skip"
        if module.sparse or module.scale_grad_by_freq:
            return "sparse or scale_grad_by_freq embedding"
        return EmbeddingLayer(name, module)
    return f"no K-FAC rule for {type(module).__name__}"


def find_kfac_layers(
    model: nn.Module, optimized: set[int], *, skip_layers: tuple[str, ...] = (), max_factor_dim: int = 8192,
    linear_approximation: str = "expand", conv2d_approximation: str = "expand", embedding: str = "diagonal",
) -> tuple[list[KfacLayer], dict[str, str]]:
    """The layers of ``model`` K-FAC preconditions, and ``{module name: reason}`` for those with parameters it
    leaves to the base rule. ``optimized`` holds the ``id`` of every parameter the optimizer updates."""
    layers: list[KfacLayer] = []
    fallback: dict[str, str] = {}
    users: dict[int, int] = {}  # parameter id -> number of modules that hold it (tied weights: > 1)
    for module in model.modules():
        for param in module.parameters(recurse=False):
            users[id(param)] = users.get(id(param), 0) + 1
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) in optimized]
        if not own:
            continue
        label = name or type(module).__name__
        if any(re.search(pattern, name) for pattern in skip_layers):
            fallback[label] = "matches skip_layers"
            continue
        layer = make_layer(name, module, linear_approximation=linear_approximation,
                           conv2d_approximation=conv2d_approximation, embedding=embedding)
        if isinstance(layer, str):
            fallback[label] = layer
        elif any(id(p) not in optimized for p in layer.params):
            fallback[label] = "weight or bias frozen"
        elif any(users[id(p)] > 1 for p in layer.params):
            fallback[label] = "parameter shared with another module (tied weights)"
        elif max(layer.factor_dims[int(layer.diagonal_input_factor):]) > max_factor_dim:
            largest = max(layer.factor_dims[int(layer.diagonal_input_factor):])
            fallback[label] = f"factor of dimension {largest} > max_factor_dim={max_factor_dim}"
        else:
            layers.append(layer)
    return layers, fallback


def current_backward() -> int | None:
    """An id of the backward pass running now (autograd's graph task), None where torch does not say."""
    task = getattr(torch._C, "_current_graph_task_id", lambda: -1)()
    return task if task >= 0 else None


# ---------------------------------------------------------------------------------------------------------------
# Distributed helpers


def data_parallel_world() -> int:
    """The world size when a process group with more than one rank is running, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_in_buckets(tensors: list[Tensor], *, average: bool) -> list[Tensor]:
    """Sum (or average) ``tensors`` over the ranks with one collective per :data:`COMM_BUCKET_NUMEL` elements
    (KAISA Sec. 3: factors communicated flattened, only on factor-update steps). Returns new tensors."""
    world = dist.get_world_size()
    results: list[Tensor] = []
    start = 0
    while start < len(tensors):
        end, numel = start, 0
        while end < len(tensors) and (end == start or numel + tensors[end].numel() <= COMM_BUCKET_NUMEL):
            numel += tensors[end].numel()
            end += 1
        flat = torch.cat([t.reshape(-1) for t in tensors[start:end]])
        dist.all_reduce(flat)
        if average:
            flat /= world
        results += [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors[start:end]]),
                                                          tensors[start:end])]
        start = end
    return results


@contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """``"high"``: TF32 for K-FAC's own fp32 matmuls on CUDA (statistics, preconditioning); ``"highest"``: fp32.
    The caller's setting is restored exactly after the block (:func:`._precision.fp32_matmul_precision`)."""
    with fp32_matmul_precision("tf32" if precision == "high" else "ieee"):
        yield


def refuse_sharded_parameters(params: list[Tensor]) -> None:
    """K-FAC needs whole weight matrices: FSDP2's DTensors and FSDP1's flat parameters are refused."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        DTensor = ()  # type: ignore[assignment]
    for param in params:
        if isinstance(param, DTensor) or type(param).__name__ == "FlatParameter":
            raise ValueError(
                "Kfac: parameters are sharded (FSDP DTensor or FlatParameter); K-FAC needs each layer's whole "
                "weight matrix and works on a single device or under DDP, not under FSDP or DeepSpeed"
            )


# ---------------------------------------------------------------------------------------------------------------
# The optimizer


class Kfac(Optimizer):
    r"""K-FAC preconditioning of a model's Linear, GPT-2 Conv1D, Conv2d and Embedding layers, then a base rule.

    Per preconditioned layer, with :math:`\nabla_W` its gradient as a ``(d_G, d_A)`` matrix (bias as the last
    column), at step :math:`k`:

    .. math::
        \begin{aligned}
        & A \leftarrow \epsilon A + (1-\epsilon) A_{\text{batch}},\;
          G \leftarrow \epsilon G + (1-\epsilon) G_{\text{batch}}
            && \text{every factor\_interval steps; } \epsilon = \min(\text{factor\_decay}, 1 - 1/u) \\
        & (\gamma_A, \gamma_G) = (\pi\sqrt\lambda, \sqrt\lambda/\pi)
          && \text{M\&G 2015 Sec. 6.3; every inverse\_interval steps with the inverses} \\
        & \tilde g = (G + \gamma_G I)^{-1} \nabla_W (A + \gamma_A I)^{-1}
          && \text{M\&G 2015 Sec. 4.2 (inverse or eigen method)} \\
        & \tilde g \leftarrow \nu \tilde g, \;
          \nu = \min\bigl(1, \sqrt{\kappa / |\textstyle\sum_l \eta^2 \langle \tilde g_l, \nabla_{W_l}\rangle|}\bigr)
          && \text{KL clipping (Ba et al. 2017), if kl\_clip}
        \end{aligned}

    (:math:`u`: the layer's own count of factor updates, this one included), then ``base_rule`` over every
    parameter (the preconditioned direction for those of K-FAC layers, the gradient for the rest):
    ``"adam_graft"`` — momentum :math:`m \leftarrow \beta_1 m + (1-\beta_1)\tilde g` rescaled per tensor to the
    norm of Adam's step on the raw gradient (AdamW on the rest); ``"adam"`` — AdamW on :math:`\tilde g`;
    ``"sgd"`` — heavy-ball momentum with L2 weight decay (KAISA's SGD). KL clipping bounds the step itself only
    with ``"sgd"``: with ``"adam_graft"`` each tensor's step takes Adam's norm, so :math:`\nu` only weights the
    new direction against the momentum's history, and Adam's moments (``"adam"``) are nearly invariant to it.

    Args:
        params: parameters or param groups (``lr``, ``betas``, ``eps``, ``weight_decay``, ``momentum`` per group).
        model: the module whose layers are hooked; every parameter of a preconditioned layer must be in ``params``.
        base_rule, momentum, method (``"inverse"`` | ``"eigen"``), damping :math:`\lambda`, pi_damping,
        factor_decay, factor_interval, inverse_interval, kl_clip (``None`` = off): see above.
        damping_scale: ``"absolute"`` (:math:`\lambda` as given) or ``"relative"`` (:math:`\lambda` times each
            layer's mean eigenvalue of :math:`A \otimes G`; see :func:`factored_damping`).
        damping_adaptation: ``"none"`` (:math:`\lambda` fixed) or ``"levenberg_marquardt"`` (Martens & Grosse
            2015 Sec. 6.5): every ``adaptation_interval`` (:math:`T_1`) steps the optimizer evaluates the loss of
            the step's last training batch before and after its update and compares the change with the quadratic
            model :math:`M(\delta) = \nabla h^\top \delta + \frac12 \sum_l \delta_l^\top [(A_l + \gamma_A I)
            \otimes (G_l + \gamma_G I)] \delta_l` (:func:`damped_kronecker_quadratic`; layers without factors
            contribute their linear term only): with :math:`\rho = (h(\theta+\delta) - h(\theta)) / M(\delta)`,
            :math:`\lambda \leftarrow \omega\lambda` if :math:`\rho > 3/4`, :math:`\lambda / \omega` if
            :math:`\rho < 1/4`, :math:`\omega = (19/20)^{T_1}`, never below ``min_damping``. The new
            :math:`\lambda` enters at the next inverse update. The batch is replayed by calling the model on the
            inputs of its last training forward before the step (a forward pre-hook keeps them), in training
            mode with the same dropout masks before and after the update, batch-norm statistics restored,
            without gradients, under the autocast state of that forward, and without Trainer's
            ``num_items_in_batch`` (so the loss is the batch mean). The model's
            forward must return its loss: a scalar tensor, or an output with a ``loss`` (HF models given
            labels). Cost: two forward passes every :math:`T_1` steps, one host sync, and for the step a temporary
            fp32 copy of the parameters (to measure :math:`\delta`); under DDP the two losses are averaged over the
            ranks (one all-reduce).
        adaptation_interval: :math:`T_1` above (>= 1).
        min_damping: the floor of the adapted :math:`\lambda` (> 0).
        linear_approximation, conv2d_approximation: ``"expand"`` or ``"reduce"`` for inputs with shared
            dimensions (Eschenhagen et al. 2023).
        embedding: ``"diagonal"`` (diagonal :math:`A`) or ``"skip"`` (base rule).
        skip_layers: regexes on module names left to the base rule (default ``lm_head``).
        max_factor_dim: layers with a full factor larger than this are left to the base rule: a
            vocabulary x vocabulary :math:`G` (an LM head: 32000^2 fp32 = 4 GB, and its inverse) is infeasible.
        matmul_precision: ``"high"`` lets K-FAC's own fp32 matmuls use TF32 on CUDA; ``"highest"`` does not.
        nonfinite: on an inf/NaN gradient: ``"skip"`` the step with no change to parameters or state (counted in
            ``nonfinite_skips``; the statistics taken for it are dropped), ``"error"``, or ``"apply"``. The check
            reads one flag on the host per step (as Shampoo's): where the forward and backward leave the host
            behind the GPU, as with HF models, that wait is short, and it spares the per-tensor masking that a
            device-side decision needs.

    Statistics are taken in the forward/backward passes before a factor-update step, only while
    ``module.training`` and gradients are enabled (evaluation never touches them), summed over
    gradient-accumulation micro-batches and normalised at the step; they are fp32 under autocast, and a
    non-finite statistic never enters a factor. The output-gradient statistics are taken in the backward pass, so
    under fp16 with a ``GradScaler`` they would carry the loss scale squared: use bf16 or fp32 (Trainer's
    ``--fp16`` is refused with ``optim="kfac"``). Under ``torch.distributed`` (DDP) factors are averaged over the
    ranks that had statistics for them, in bucketed collectives on factor-update steps, and each rank inverts a
    share of the factors, shared by one collective (KAISA).

    State: per parameter the base rule's tensors (``step``, ``exp_avg``, ``exp_avg_sq``, ``kfac_exp_avg``,
    ``momentum_buffer``); on each layer's weight ``kfac_a``, ``kfac_g`` and their inverses (``kfac_a_inv``,
    ``kfac_g_inv``) or eigenvectors and scales (``kfac_*_eigenvectors``, ``kfac_*_scales``); in
    ``state_dict()["kfac"]`` the step and factor-update counts, the current damping :math:`\lambda` (attribute
    ``damping``) and the last reduction ratio (``reduction_ratio``, None before the first adaptation). Schedules
    count ``step()`` calls.
    """

    def __init__(
        self,
        params: ParamsT,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        momentum: float = 0.9,
        base_rule: str = "adam_graft",
        method: str = "inverse",
        damping: float = 1e-3,
        damping_scale: str = "absolute",
        damping_adaptation: str = "none",
        adaptation_interval: int = 5,
        min_damping: float = 1e-8,
        pi_damping: bool = True,
        factor_decay: float = 0.95,
        factor_interval: int = 10,
        inverse_interval: int = 10,
        kl_clip: float | None = 1e-3,
        linear_approximation: str = "expand",
        conv2d_approximation: str = "expand",
        embedding: str = "diagonal",
        skip_layers: tuple[str, ...] = ("lm_head",),
        max_factor_dim: int = 8192,
        matmul_precision: str = "high",
        nonfinite: str = "skip",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Kfac: model must be the nn.Module whose layers it preconditions, got {type(model)}")
        if isinstance(skip_layers, str):  # one pattern, not its characters
            skip_layers = (skip_layers,)
        if not isinstance(skip_layers, (tuple, list)) or not all(isinstance(p, str) for p in skip_layers):
            raise ValueError(f"Kfac: skip_layers must be a tuple of module-name regexes (str), got {skip_layers!r}")
        self.settings = {
            "base_rule": base_rule, "method": method, "damping": damping, "damping_scale": damping_scale,
            "damping_adaptation": damping_adaptation, "adaptation_interval": adaptation_interval,
            "min_damping": min_damping, "pi_damping": pi_damping,
            "factor_decay": factor_decay, "factor_interval": factor_interval, "inverse_interval": inverse_interval,
            "kl_clip": kl_clip, "linear_approximation": linear_approximation,
            "conv2d_approximation": conv2d_approximation, "embedding": embedding, "skip_layers": tuple(skip_layers),
            "max_factor_dim": max_factor_dim, "matmul_precision": matmul_precision,
        }
        _check_settings(self.settings)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "momentum": momentum,
                    "nonfinite": nonfinite, "nonfinite_skips": 0}
        super().__init__(params, defaults)
        all_params = [p for group in self.param_groups for p in group["params"]]
        refuse_sharded_parameters(all_params)
        self.layers, fallback = find_kfac_layers(
            model, {id(p) for p in all_params}, skip_layers=self.settings["skip_layers"],
            max_factor_dim=max_factor_dim, linear_approximation=linear_approximation,
            conv2d_approximation=conv2d_approximation, embedding=embedding,
        )
        self.step_calls = 0
        #: Layers preconditioned together (same gradient shape, matrix inverses): ``(version, batches)``, rebuilt
        #: when the inverses change (``self._inverse_version``).
        self._inverse_version = 0
        self._batches: tuple[int, list[tuple[list[KfacLayer], Tensor, Tensor]]] | None = None
        self.factor_updates = 0
        #: Set when a load left inverses that do not fit this run (the other method's, another fixed damping): the
        #: next step computes them from the loaded factors.
        self._inverses_missing = False
        #: The damping :math:`\lambda` the next inverse update uses (adapted with ``damping_adaptation``).
        self.damping = float(damping)
        #: :math:`\rho` of the last damping adaptation (None before the first one).
        self.reduction_ratio: float | None = None
        self._model = model
        #: The inputs of the last training forward before an adapting step: (args, kwargs, (device, autocast
        #: enabled, autocast dtype)).
        self._probe_inputs: tuple[tuple[Any, ...], dict[str, Any], tuple[Any, ...]] | None = None
        self._hooks = [layer.module.register_forward_hook(OptimizerHook(self, "_forward_hook", layer))
                       for layer in self.layers]
        if damping_adaptation != "none":
            self._hooks.append(model.register_forward_pre_hook(OptimizerHook(self, "_keep_probe_inputs"),
                                                               with_kwargs=True))
        logger.info(
            "Kfac preconditions %d layers; the base rule (%s) updates the parameters of: %s", len(self.layers),
            base_rule, "; ".join(f"{name} ({reason})" for name, reason in fallback.items()) or "none",
        )

    # -- configuration --------------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group after validating its hyperparameters (the group's own keys over the defaults)."""
        _check_group({**self.defaults, **param_group}, f"Kfac param group {len(self.param_groups)}")
        super().add_param_group(param_group)

    def remove_hooks(self) -> None:
        """Detach the statistics hooks from the model (the optimizer then only applies its current inverses)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @property
    def collecting(self) -> bool:
        """Whether the coming forward/backward passes feed the next step's factor update."""
        return self.step_calls % self.settings["factor_interval"] == 0

    @property
    def adapting(self) -> bool:
        """Whether the coming step adapts the damping (its training forwards are kept to replay the loss)."""
        return (self.settings["damping_adaptation"] != "none"
                and self.step_calls % self.settings["adaptation_interval"] == 0)

    # -- hooks ----------------------------------------------------------------------------------------------------

    def _forward_hook(self, layer: KfacLayer, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if not (module.training and torch.is_grad_enabled() and self.collecting):
            return
        with torch.no_grad(), torch.autocast(output.device.type, enabled=False), self._math_context(output.device):
            layer.accumulate_input(args[0].detach())
        if output.requires_grad:
            output.register_hook(partial(self._output_grad_hook, layer))

    def _keep_probe_inputs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not (module.training and torch.is_grad_enabled() and self.adapting):
            return
        device = next(module.parameters()).device
        autocast = (device, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        self._probe_inputs = (args, {k: v for k, v in kwargs.items() if k != "num_items_in_batch"}, autocast)

    def _output_grad_hook(self, layer: KfacLayer, grad_output: Tensor) -> None:
        with torch.no_grad(), torch.autocast(grad_output.device.type, enabled=False), \
                self._math_context(grad_output.device):
            layer.accumulate_output_grad(grad_output, current_backward())

    def _math_context(self, device: torch.device) -> Any:
        """K-FAC's matmul precision on CUDA; nothing to set elsewhere."""
        stack = ExitStack()
        if device.type == "cuda":
            stack.enter_context(matmul_precision(self.settings["matmul_precision"]))
        return stack

    # -- the step -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One K-FAC step: factor update and inverses when due, preconditioning, KL clip, the base rule."""
        loss = evaluate_closure(closure)
        params_and_grads = params_with_grads_per_group("Kfac", self.param_groups)
        grads = [g for _, group_grads in params_and_grads for g in group_grads]
        checked = any(group["nonfinite"] != "apply" for group in self.param_groups)
        if not grads or (checked and not nonfinite_policy_allows_step(
                "Kfac", self.param_groups, [foreach_norms(group_grads) for _, group_grads in params_and_grads])):
            self._finish_step()
            return loss
        with self._math_context(grads[0].device):
            if self.step_calls % self.settings["factor_interval"] == 0:
                self._update_factors()
            if self.step_calls % self.settings["inverse_interval"] == 0 or self._inverses_missing:
                self._update_inverses()
                self._inverses_missing = False
            directions = self._preconditioned_directions()
        probe = self._probe_before_update(params_and_grads) if self.adapting and self._probe_inputs else None
        for group, (params, group_grads) in zip(self.param_groups, params_and_grads):
            if params:
                self._base_rule(group, params, group_grads, directions)
        if probe is not None:
            self._adapt_damping(*probe)
        self._finish_step()
        return loss

    def _finish_step(self) -> None:
        self.step_calls += 1
        self._probe_inputs = None
        for layer in self.layers:
            layer.reset_statistics()

    # -- damping adaptation ---------------------------------------------------------------------------------------

    def _probe_loss(self) -> Tensor:
        """The loss of the kept training batch at the current parameters, as training computed it (modules keep
        their modes), without gradients, under the batch's autocast state. Dropout draws the same masks in every
        replay of a step (a seed of its own; the global RNG streams are restored afterwards) and the model's
        buffers (batch-norm running statistics) are put back, so a replay leaves no trace."""
        args, kwargs, (device, autocast_enabled, autocast_dtype) = self._probe_inputs
        buffers = [(buffer, buffer.clone()) for buffer in self._model.buffers()]
        try:
            with seeded_rng(self.step_calls, [device]), torch.no_grad(), \
                    torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_enabled):
                output = self._model(*args, **kwargs)
        finally:
            for buffer, saved in buffers:
                buffer.copy_(saved)
        if isinstance(output, Tensor):
            loss = output
        elif isinstance(output, Mapping):
            loss = output.get("loss")
        else:
            loss = getattr(output, "loss", None)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                "Kfac(damping_adaptation='levenberg_marquardt') replays the last training batch and needs the "
                "model's forward to return its loss (a scalar tensor, or an output with a 'loss', as HF models do "
                f"when given labels); got {type(output).__name__}. Use damping_adaptation='none' otherwise"
            )
        return loss.detach().float().reshape(())

    def _probe_before_update(self, params_and_grads: list[tuple[list[Tensor], list[Tensor]]]) -> tuple[Any, ...]:
        r"""What the damping adaptation needs from before the update: the loss, the parameters and gradients, and
        each factored layer's damping terms at the current :math:`\lambda`."""
        params = [p for group_params, _ in params_and_grads for p in group_params]
        grads = [g for _, group_grads in params_and_grads for g in group_grads]
        before = [p.detach().to(math_dtype(p.dtype), copy=True) for p in params]
        gammas = {}
        for layer in self.layers:
            state = self.state[layer.weight]
            if "kfac_a" in state and all(p.grad is not None for p in layer.params):
                gammas[id(layer)] = self._damping_terms(state)
        return self._probe_loss(), params, grads, before, gammas

    def _adapt_damping(self, loss_before: Tensor, params: list[Tensor], grads: list[Tensor], before: list[Tensor],
                       gammas: dict[int, tuple[Tensor, Tensor]]) -> None:
        """Levenberg-Marquardt (Martens & Grosse 2015 Sec. 6.5) from the update just applied to ``params``."""
        deltas = {id(p): p.detach().to(b.dtype) - b for p, b in zip(params, before)}
        change = stack_on_one_device([(g.to(deltas[id(p)].dtype) * deltas[id(p)]).sum()
                                      for p, g in zip(params, grads)]).sum()
        for layer in self.layers:
            if id(layer) not in gammas:
                continue
            state = self.state[layer.weight]
            delta = layer.matrix_of(deltas[id(layer.weight)], None if layer.bias is None else deltas[id(layer.bias)])
            change = change + 0.5 * damped_kronecker_quadratic(delta, state["kfac_a"], state["kfac_g"],
                                                               *gammas[id(layer)]).to(change.device)
        losses = torch.stack([loss_before, self._probe_loss()])
        if data_parallel_world() > 1:
            dist.all_reduce(losses)
            losses /= data_parallel_world()
        rho = reduction_ratio(losses[0], losses[1], change.to(losses.device))
        if rho is None:
            return
        omega = (19.0 / 20.0) ** self.settings["adaptation_interval"]
        self.reduction_ratio = rho
        self.damping = levenberg_marquardt(self.damping, rho, increase=1.0 / omega, decrease=omega,
                                           min_damping=self.settings["min_damping"])

    def contribute_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """With ``damping_adaptation`` and a training loss in ``logs``: the damping (``kfac_damping``) and the last
        reduction ratio (``kfac_rho``, when finite). Trainer's ``log`` merges them."""
        if self.settings["damping_adaptation"] == "none" or "loss" not in logs:
            return {}
        extra = {"kfac_damping": self.damping}
        if self.reduction_ratio is not None and math.isfinite(self.reduction_ratio):
            extra["kfac_rho"] = self.reduction_ratio
        return extra

    def _damping_terms(self, state: dict[str, Any]) -> tuple[Tensor, Tensor]:
        r""":math:`(\gamma_A, \gamma_G)` of a layer at the current damping (:func:`factored_damping`)."""
        return factored_damping(state["kfac_a"], state["kfac_g"], self.damping, self.settings["pi_damping"],
                                relative=self.settings["damping_scale"] == "relative")

    def _update_factors(self) -> None:
        r"""Fold the accumulated statistics into the factors' moving averages.

        Each layer ramps its own decay, :math:`\min(\epsilon, 1 - 1/u)` with :math:`u` its own update count
        (``kfac_factor_updates`` in its state), so a layer first used late (a conditional branch, an MoE expert)
        starts from its own statistics, not from the identity. Under DDP every rank sends every layer (zeros where
        it has no statistics this time) and the factors are averaged over the ranks that had some: the collectives
        match whatever each rank's inputs reached."""
        if not self.layers:
            return
        world = data_parallel_world()
        has = [layer.input_sum is not None and layer.output_grad_sum is not None for layer in self.layers]
        if world == 1 and not any(has):
            return
        layers = self.layers if world > 1 else [layer for layer, had in zip(self.layers, has) if had]
        new = []
        for layer, had in zip(layers, has if world > 1 else [True] * len(layers)):
            if had:
                new.append(input_factor(layer.input_sum, layer.input_rows))
                new.append(output_grad_factor(layer.output_grad_sum, layer.output_grad_examples))
            else:  # DDP: this rank's inputs did not reach the layer
                d_a, d_g = layer.factor_dims
                like = dict(device=layer.weight.device, dtype=math_dtype(layer.weight.dtype))  # as the statistics
                new.append(torch.zeros(d_a if layer.diagonal_input_factor else (d_a, d_a), **like))
                new.append(torch.zeros(d_g, d_g, **like))
        if world > 1:
            ranks_with = torch.tensor(has, dtype=torch.float32, device=layers[0].weight.device)
            *new, ranks_with = all_reduce_in_buckets([*new, ranks_with], average=False)
            counts = ranks_with.tolist()  # a host read on factor-update steps under DDP only
            new = [factor / max(count, 1.0) for factor, count in zip(new, (c for c in counts for _ in range(2)))]
        else:
            counts = [1.0] * len(layers)
        for index, layer in enumerate(layers):
            if counts[index] == 0:
                continue
            a_new, g_new = new[2 * index], new[2 * index + 1]
            ok = a_new.isfinite().all() & g_new.isfinite().all()
            state = self.state[layer.weight]
            first = "kfac_a" not in state
            if first:  # the identity, kept if the first statistics are not finite
                state["kfac_a"] = torch.ones_like(a_new) if a_new.dim() == 1 else torch.eye(
                    a_new.shape[0], dtype=a_new.dtype, device=a_new.device)
                state["kfac_g"] = torch.eye(g_new.shape[0], dtype=g_new.dtype, device=g_new.device)
            # checkpoints from before the per-layer count: the global count
            updates = 0 if first else state.get("kfac_factor_updates", self.factor_updates)
            decay = min(self.settings["factor_decay"], 1.0 - 1.0 / (updates + 1))
            update_factor_(state["kfac_a"], a_new, decay, ok)
            update_factor_(state["kfac_g"], g_new, decay, ok)
            state["kfac_factor_updates"] = updates + 1
        self.factor_updates += 1

    def _update_inverses(self) -> None:
        """Damped inverses (or eigendecompositions) of every factor: one batched call per matrix size; under DDP
        each rank computes a contiguous share of every size's stack and one collective shares the results. They are
        written into the tensors they replace, so the stacks of :meth:`_batched_layers` stay valid."""
        jobs: dict[int, list[tuple[KfacLayer, str, Tensor, Tensor]]] = {}
        for layer in self.layers:
            state = self.state[layer.weight]
            if "kfac_a" not in state:
                continue
            gamma_a, gamma_g = self._damping_terms(state)
            if layer.diagonal_input_factor:
                self._store_inverse(state, "kfac_a_inv", 1.0 / (state["kfac_a"] + gamma_a))
            else:
                jobs.setdefault(state["kfac_a"].shape[0], []).append((layer, "a", state["kfac_a"], gamma_a))
            jobs.setdefault(state["kfac_g"].shape[0], []).append((layer, "g", state["kfac_g"], gamma_g))
        world = data_parallel_world()
        rank = dist.get_rank() if world > 1 else 0
        eigen = self.settings["method"] == "eigen"
        outputs: list[tuple[list, list[Tensor]]] = []
        for size in sorted(jobs):
            bucket = jobs[size]
            factors = torch.stack([factor for *_, factor, _ in bucket])
            damping = torch.stack([gamma for *_, gamma in bucket])
            share = torch.arange(len(bucket)).tensor_split(world)[rank]
            start, stop = (int(share[0]), int(share[-1]) + 1) if len(share) else (0, 0)
            if eigen:
                results = [factors.new_zeros(factors.shape), factors.new_zeros(factors.shape[:2])]
                if stop > start:
                    results[0][start:stop], results[1][start:stop] = damped_eigens(factors[start:stop],
                                                                                   damping[start:stop])
            else:
                results = [factors.new_zeros(factors.shape)]
                if stop > start:
                    results[0][start:stop] = damped_inverses(factors[start:stop], damping[start:stop])
            outputs.append((bucket, results))
        if world > 1 and outputs:
            shared = all_reduce_in_buckets([r for _, results in outputs for r in results], average=False)
            per_bucket = len(outputs[0][1])
            outputs = [(bucket, shared[i * per_bucket:(i + 1) * per_bucket]) for i, (bucket, _) in
                       enumerate(outputs)]
        for bucket, results in outputs:
            for index, (layer, which, _, _) in enumerate(bucket):
                state = self.state[layer.weight]
                if eigen:
                    self._store_inverse(state, f"kfac_{which}_eigenvectors", results[0][index])
                    self._store_inverse(state, f"kfac_{which}_scales", results[1][index])
                else:
                    self._store_inverse(state, f"kfac_{which}_inv", results[0][index])

    def _store_inverse(self, state: dict[str, Any], key: str, value: Tensor) -> None:
        """``state[key] = value``, in place where a tensor of that shape is there (it may be a view into a stack of
        :meth:`_batched_layers`); a new tensor invalidates the stacks."""
        current = state.get(key)
        if current is not None and current.shape == value.shape and current.dtype == value.dtype:
            current.copy_(value)
        else:
            state[key] = value
            self._inverse_version += 1

    def _inverse(self, state: dict[str, Any], which: str) -> Any:
        if f"kfac_{which}_inv" in state:
            return state[f"kfac_{which}_inv"]
        return state[f"kfac_{which}_eigenvectors"], state[f"kfac_{which}_scales"]

    def _batched_layers(self) -> list[tuple[list[KfacLayer], Tensor, Tensor]]:
        """Layers with matrix inverses of both factors grouped by gradient shape, each group with its inverses
        stacked (``(B, d_G, d_G)``, ``(B, d_A, d_A)``). Built when a layer gets its first inverses (or after a
        load): the layers' state then holds views of the stacks (no second copy), which the inverse updates
        write into, so a step preconditions a group with two batched products."""
        if self._batches is not None and self._batches[0] == self._inverse_version:
            return self._batches[1]
        by_shape: dict[tuple[int, int, torch.device, torch.dtype], list[KfacLayer]] = {}
        for layer in self.layers:
            state = self.state[layer.weight]
            g_inv, a_inv = state.get("kfac_g_inv"), state.get("kfac_a_inv")
            if g_inv is None or a_inv is None or a_inv.dim() != 2:
                continue
            key = (g_inv.shape[0], a_inv.shape[0], g_inv.device, g_inv.dtype)
            by_shape.setdefault(key, []).append(layer)
        batches = []
        for layers in by_shape.values():
            if len(layers) < 2:
                continue
            stacks = []
            for which in ("g", "a"):
                stack = torch.stack([self.state[layer.weight][f"kfac_{which}_inv"] for layer in layers])
                for layer, view in zip(layers, stack.unbind(0)):
                    self.state[layer.weight][f"kfac_{which}_inv"] = view
                stacks.append(stack)
            batches.append((layers, stacks[0], stacks[1]))
        self._batches = (self._inverse_version, batches)
        return batches

    def _preconditioned_directions(self) -> dict[int, Tensor]:
        """``{id(param): preconditioned direction}`` for the parameters of layers with inverses and gradients,
        KL-clipped together. Layers of equal shape with matrix inverses take one batched product per side."""
        directions: dict[int, Tensor] = {}
        inner_products: list[Tensor] = []
        lr_of = {id(p): group["lr"] for group in self.param_groups for p in group["params"]}
        kl_clip = self.settings["kl_clip"] is not None
        batched: set[int] = set()
        for layers, g_inverses, a_inverses in self._batched_layers():
            if any(p.grad is None for layer in layers for p in layer.params):
                continue  # rare (a layer without a gradient this step): the per-layer path below
            grads = torch.stack([layer.grad_matrix() for layer in layers])
            preconditioned = torch.bmm(torch.bmm(g_inverses, grads), a_inverses)
            if kl_clip:  # lr^2 as Python scalars: a tensor built from them would be a synchronising copy
                inner_products += torch._foreach_mul(list((preconditioned * grads).sum(dim=(1, 2)).unbind(0)),
                                                     [lr_of[id(layer.weight)] ** 2 for layer in layers])
            for layer, matrix in zip(layers, preconditioned.unbind(0)):
                for param, direction in zip(layer.params, layer.split(matrix)):
                    directions[id(param)] = direction
                batched.add(id(layer))
        for layer in self.layers:
            state = self.state[layer.weight]
            if id(layer) in batched or any(p.grad is None for p in layer.params) or (
                    "kfac_g_inv" not in state and "kfac_g_eigenvectors" not in state):
                continue
            grad = layer.grad_matrix()
            preconditioned = precondition(grad, self._inverse(state, "g"), self._inverse(state, "a"))
            if kl_clip:
                inner_products.append((preconditioned * grad).sum() * lr_of[id(layer.weight)] ** 2)
            for param, direction in zip(layer.params, layer.split(preconditioned)):
                directions[id(param)] = direction
        if inner_products:
            torch._foreach_mul_(list(directions.values()), kl_clip_scale(inner_products, self.settings["kl_clip"]))
        return directions

    def _base_rule(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                   directions: dict[int, Tensor]) -> None:
        """Apply the base rule to one group: preconditioned directions where there are, gradients elsewhere."""
        if all(p.dtype == math_dtype(p.dtype) for p in params):  # fp32 parameters: no conversions to dispatch
            math_params, math_grads = params, grads
        else:
            math_params = [p.to(math_dtype(p.dtype)) for p in params]
            math_grads = [g.to(math_dtype(p.dtype)) for p, g in zip(params, grads)]
        steered = [directions.get(id(p), g) for p, g in zip(params, math_grads)]
        rule = self.settings["base_rule"]
        if rule == "sgd":
            buffers = [self._state_tensor(p, "momentum_buffer") for p in params]
            sgd_momentum(math_params, steered, buffers, lr=group["lr"], momentum=group["momentum"],
                         weight_decay=group["weight_decay"])
        else:
            beta1, beta2 = group["betas"]
            moments_of = math_grads if rule == "adam_graft" else steered
            steps = [self._state_tensor(p, "step", scalar=True) for p in params]
            update = adam_direction(moments_of, [self._state_tensor(p, "exp_avg") for p in params],
                                    [self._state_tensor(p, "exp_avg_sq") for p in params], steps, beta1=beta1,
                                    beta2=beta2, eps=group["eps"])
            if rule == "adam_graft":
                grafted = [i for i, p in enumerate(params) if id(p) in directions]
                if grafted:
                    momenta = [self._state_tensor(params[i], "kfac_exp_avg") for i in grafted]
                    torch._foreach_lerp_(momenta, [steered[i] for i in grafted], 1.0 - beta1)
                    for i, direction in zip(grafted, graft_norms(momenta, [update[i] for i in grafted])):
                        update[i] = direction
            decoupled_update(math_params, update, lr=group["lr"], weight_decay=group["weight_decay"])
        for param, math_param in zip(params, math_params):
            if math_param is not param:
                param.copy_(math_param)

    def _state_tensor(self, param: Tensor, key: str, *, scalar: bool = False) -> Tensor:
        state = self.state[param]
        if key not in state:
            state[key] = (torch.zeros((), dtype=torch.float32, device=param.device) if scalar
                          else torch.zeros_like(param, dtype=math_dtype(param.dtype)))
        return state[key]

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``"kfac"``: the step and factor-update counts the schedules run on, the damping
        and the last reduction ratio."""
        state_dict = super().state_dict()
        state_dict["kfac"] = {"step_calls": self.step_calls, "factor_updates": self.factor_updates,
                              "damping": self.damping, "reduction_ratio": self.reduction_ratio}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like ``torch.optim.Optimizer`` (state of fp16/bf16 parameters kept fp32, step counts on the
        parameters' devices) and the K-FAC counts. With ``damping_adaptation`` the checkpoint's adapted damping
        is taken (without it, or with fixed damping, the configured one). Inverses of the other ``method`` (a
        run resumed with the method changed) are dropped; then, or when the configured fixed damping differs from
        the checkpoint's, the next step computes the inverses from the loaded factors."""
        counts = state_dict.get("kfac", {"step_calls": 0, "factor_updates": 0})
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "kfac"})
        restore_state_precision(self, state_dict)
        for param, state in self.state.items():  # the fused Adam pass reads the step counts on the device
            if "step" in state:
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)
        eigen = self.settings["method"] == "eigen"
        for layer in self.layers:
            state = self.state[layer.weight]
            stale = [f"kfac_{w}_inv" for w in ("a", "g") if not (w == "a" and layer.diagonal_input_factor)] \
                if eigen else [f"kfac_{w}_{k}" for w in ("a", "g") for k in ("eigenvectors", "scales")]
            for key in stale:
                if state.pop(key, None) is not None:
                    self._inverses_missing = True
        self._inverse_version += 1
        self.step_calls, self.factor_updates = int(counts["step_calls"]), int(counts["factor_updates"])
        if self.settings["damping_adaptation"] != "none":
            self.damping = float(counts.get("damping", self.settings["damping"]))
        elif counts.get("damping", self.damping) != self.damping:  # the loaded inverses hold the old damping
            self._inverses_missing = True
        self.reduction_ratio = counts.get("reduction_ratio")
        for layer in self.layers:
            layer.reset_statistics()


def _check_group(hyperparameters: dict[str, Any], where: str) -> None:
    for name in ("lr", "weight_decay", "eps"):
        value = hyperparameters[name]
        require(is_real(value) and value >= 0, where, name, value, f"expected a real number with {name} >= 0")
    betas = hyperparameters["betas"]
    require(isinstance(betas, (tuple, list)) and len(betas) == 2, where, "betas", betas,
            "expected a pair (beta1, beta2)")
    for index, beta in enumerate(betas):
        require(is_real(beta) and 0 <= beta < 1, where, f"betas[{index}]", beta, "expected 0 <= beta < 1")
    momentum = hyperparameters["momentum"]
    require(is_real(momentum) and 0 <= momentum < 1, where, "momentum", momentum, "expected 0 <= momentum < 1")
    nonfinite = hyperparameters["nonfinite"]
    require(nonfinite in NONFINITE_POLICIES, where, "nonfinite", nonfinite, f"expected one of {NONFINITE_POLICIES}")


def _check_settings(settings: dict[str, Any]) -> None:
    where = "Kfac"
    for name, choices in (("base_rule", BASE_RULES), ("method", METHODS), ("linear_approximation", APPROXIMATIONS),
                          ("conv2d_approximation", APPROXIMATIONS), ("embedding", EMBEDDING_MODES),
                          ("damping_scale", DAMPING_SCALES), ("damping_adaptation", DAMPING_ADAPTATIONS),
                          ("matmul_precision", MATMUL_PRECISIONS)):
        require(settings[name] in choices, where, name, settings[name], f"expected one of {choices}")
    for name in ("damping", "min_damping"):
        require(is_real(settings[name]) and settings[name] > 0, where, name, settings[name],
                "expected a real number > 0")
    require(is_real(settings["factor_decay"]) and 0 <= settings["factor_decay"] < 1, where, "factor_decay",
            settings["factor_decay"], "expected 0 <= factor_decay < 1")
    for name in ("factor_interval", "inverse_interval", "adaptation_interval", "max_factor_dim"):
        value = settings[name]
        require(is_int(value) and value >= 1, where, name, value, "expected an int >= 1")
    kl_clip = settings["kl_clip"]
    require(kl_clip is None or (is_real(kl_clip) and kl_clip > 0), where, "kl_clip", kl_clip,
            "expected None or a real number > 0")
    require(isinstance(settings["pi_damping"], bool), where, "pi_damping", settings["pi_damping"], "expected a bool")
    for pattern in settings["skip_layers"]:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{where}: invalid skip_layers entry {pattern!r}: {err}") from None
