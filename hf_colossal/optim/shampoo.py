r"""Shampoo and SOAP: Kronecker-factored preconditioners, batched over blocks of equal shape.

Shampoo: Gupta, Koren, Singer (2018), "Shampoo: Preconditioned Stochastic Tensor Optimization",
arXiv:1802.09568, Algorithm 1 (factors :math:`L \mathrel{+}= GG^\top`, :math:`R \mathrel{+}= G^\top G`, update
:math:`L^{-1/4} G R^{-1/4}`); Anil, Gupta, Koren, Regan, Singer (2020), "Scalable Second Order Optimization for
Deep Learning", arXiv:2002.09018 (blocking Sec. 3.3, grafting Sec. 3.4, preconditioners recomputed every few
steps Sec. 3.1, root exponent override); Shi et al. (2023), "A Distributed Data-Parallel PyTorch Implementation of
the Distributed Shampoo Optimizer for Training Neural Networks At-Scale", arXiv:2309.06497 (Algorithm 1:
exponential moving averages of the factors, bias-corrected filtered gradient, per-block grafting, merged small
dimensions, data-parallel split of the root computations, Sec. 4).

SOAP: Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson, Kakade (2024), "SOAP: Improving and
Stabilizing Shampoo using Adam", arXiv:2409.11321, Algorithm 3: Adam run in the eigenbasis of Shampoo's factors,
the eigenbasis refreshed every ``precondition_frequency`` steps by one step of power iteration with a QR
decomposition (Algorithm 4), the second moment permuted to the new eigenvalue order.

The math is in the plain functions of this module, each over stacked blocks ``(n, rows, cols)`` (or lists of
tensors for the elementwise parts, with ``torch._foreach_*``); :class:`Shampoo` and :class:`Soap` are the
``torch.optim.Optimizer`` glue around them. Blocks come from :mod:`._blocks`: every block shape of a param group is
one bucket, so a step costs a handful of batched kernels per shape and no Python loop per block. Steps that do
not recompute preconditioners need no host synchronisation (with ``nonfinite="apply"``; the default ``"skip"``
reads one flag per step) and no collective under DDP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from . import _triton
from ._blocks import BlockBucket, block_shape, block_slices, matrix_shape
from ._graphs import RecomputeGraphs, stacked
from ._precision import fp32_matmul_precision
from ._foreach import (
    evaluate_closure,
    foreach_norms,
    is_int,
    is_real,
    math_dtype,
    nonfinite_policy_allows_step,
    params_with_grads_per_group,
    require,
)

__all__ = [
    "GRAFTING_TYPES",
    "Shampoo",
    "Soap",
    "eigenbasis",
    "elementwise_directions",
    "cholesky_qr",
    "graft",
    "inverse_root",
    "qr_inverse_root",
    "refresh_eigenbasis",
    "root_from_eigenpairs",
    "shampoo_direction",
    "update_factors",
    "update_moments",
]

GRAFTING_TYPES = ("adam", "adagrad", "rmsprop", "sgd", "none")
PRECONDITIONER_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Precision of the per-step matrix products (factor updates, applying the roots): true fp32, TF32 tensor cores
#: on CUDA (fp32 elsewhere), or bf16 inputs; products accumulate in fp32 in all three.
MATMUL_DTYPES = ("float32", "tfloat32", "bfloat16")
ROOT_INVERSES = ("qr", "newton", "eigh")
#: The ridge of the Newton and QR root paths is at least this fraction of the factor's Frobenius norm (see
#: newton_inverse_root); the power step of an eigenbasis refresh shifts by it too (see refresh_eigenbasis).
RELATIVE_RIDGE = 1e-6
EIGENBASIS_UPDATES = ("qr", "eigh")
#: A recomputation batch is computed in chunks of at most this many bytes of one float64 factor stack (64 factors
#: of 1024 x 1024): the batch's copies and float64 temporaries stay bounded however many factors fall due at once
#: (every factor of the model at the first recomputation).
RECOMPUTE_CHUNK_BYTES = 2**29
_NONFINITE_POLICIES = ("skip", "error", "apply")


# ---------------------------------------------------------------------------------------------------------------
# Functional math


def second_moment_rule(grafting: str) -> str | None:
    """How the elementwise second moment :math:`v` of ``grafting`` accumulates: ``"ema"`` (Adam, RMSprop),
    ``"sum"`` (AdaGrad) or None (SGD, none: no second moment)."""
    return {"adam": "ema", "rmsprop": "ema", "adagrad": "sum"}.get(grafting)


def update_moments(
    grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor] | None, *, beta1: float, beta2: float,
    rule: str | None,
) -> None:
    r"""First moment :math:`m \leftarrow \beta_1 m + (1-\beta_1) g` (Shi et al. 2023, Alg. 1, the filtered
    gradient) and second moment :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2` (``rule="ema"``) or
    :math:`v \leftarrow v + g^2` (``"sum"``), in place, one ``torch._foreach_*`` call per term."""
    if beta1 == 0:
        torch._foreach_copy_(exp_avgs, grads)
    else:
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    if rule == "ema":
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    elif rule == "sum":
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads)


def elementwise_directions(
    exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor] | None, *, grafting: str, bias_corrections2: list[float],
    eps: float,
) -> list[Tensor]:
    r"""The diagonal (grafting) direction of each tensor, before the first-moment bias correction.

    ``adam``: :math:`m / (\sqrt{v / (1-\beta_2^t)} + \epsilon)`; ``rmsprop`` and ``adagrad``:
    :math:`m / (\sqrt{v} + \epsilon)`; ``sgd`` and ``none``: :math:`m` itself (returned, not copied). Anil et al.
    2020, Sec. 3.4; Shi et al. 2023, Sec. 3.2 (Adam, AdaGrad, RMSprop, SGD grafting).
    """
    if grafting in ("sgd", "none"):
        return list(exp_avgs)
    if grafting == "adam":
        denominators = torch._foreach_div(exp_avg_sqs, bias_corrections2)
        torch._foreach_sqrt_(denominators)
    else:
        denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denominators, eps)
    return torch._foreach_div(exp_avgs, denominators)


def grafting_moments(
    grads: Tensor, exp_avgs: Tensor, exp_avg_sqs: Tensor | None, *, grafting: str, beta1: float, beta2: float,
    bias_correction2: float, eps: float, direction: bool, norms: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`update_moments` then :func:`elementwise_directions` for ``(n, rows, cols)`` stacks: returns the
    direction (where ``direction``) and its Frobenius norm per block (where ``norms``). On CUDA, for the
    groupings with a second moment, one fused Triton pass (:func:`._triton.stacked_moments`) that writes the
    direction only when asked: the grafting of Shampoo needs only its norms."""
    rule = second_moment_rule(grafting)
    if rule is not None and _triton.stacked_moments_supported(grads, exp_avgs, exp_avg_sqs):
        return _triton.stacked_moments(
            grads, exp_avgs, exp_avg_sqs, beta1=beta1, beta2=beta2, rule=rule, eps=eps, direction=direction,
            norms=norms, bias_correction2=bias_correction2 if grafting == "adam" else 1.0)
    update_moments([grads], [exp_avgs], [exp_avg_sqs] if rule else None, beta1=beta1, beta2=beta2, rule=rule)
    (grafted,) = elementwise_directions([exp_avgs], [exp_avg_sqs] if rule else None, grafting=grafting,
                                        bias_corrections2=[bias_correction2], eps=eps)
    return (grafted if direction else None), (torch.linalg.vector_norm(grafted, dim=(-2, -1)) if norms else None)


def _matmul_dtype_name(matmul_dtype: str | torch.dtype) -> str:
    """``matmul_dtype`` as its option name; torch dtypes are accepted too (``torch.float32`` is ``"float32"``)."""
    if isinstance(matmul_dtype, torch.dtype):
        return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float64: "float32"}[matmul_dtype]
    return matmul_dtype


def _bmm(left: Tensor, right: Tensor, matmul_dtype: str | torch.dtype) -> Tensor:
    """``left @ right`` in the precision ``matmul_dtype`` names (see :data:`MATMUL_DTYPES`): ``"bfloat16"`` rounds
    the inputs to bf16 (result in fp32); ``"tfloat32"`` lets CUDA use TF32 tensor cores for fp32 inputs;
    ``"float32"`` is true fp32 whatever the global setting. Inputs go to the wider of the two dtypes (fp64 factors
    stay fp64, where TF32 does not apply)."""
    name = _matmul_dtype_name(matmul_dtype)
    if name == "bfloat16":
        return torch.matmul(left.bfloat16(), right.bfloat16()).float()
    dtype = torch.promote_types(left.dtype, right.dtype)
    with fp32_matmul_precision("tf32" if name == "tfloat32" else "ieee"):
        return torch.matmul(left.to(dtype), right.to(dtype))


def update_factors(
    grads: Tensor, lefts: Tensor, rights: Tensor, *, beta: float, matmul_dtype: str | torch.dtype = "float32"
) -> None:
    r"""Kronecker factors of stacked blocks, in place: :math:`L \leftarrow \beta L + (1-\beta) GG^\top`,
    :math:`R \leftarrow \beta R + (1-\beta) G^\top G`; ``beta=1`` sums (:math:`L \mathrel{+}= GG^\top`, Gupta et al.
    2018, Alg. 1). Shi et al. 2023, Alg. 1, lines 5-6. The factors keep their dtype (the preconditioner dtype).
    Where the factors and gradients share a dtype and the products are not bf16, each update is one in-place
    ``baddbmm_`` (the product is accumulated into the factor by the matmul itself, no temporary)."""
    name = _matmul_dtype_name(matmul_dtype)
    if name != "bfloat16" and grads.dtype == lefts.dtype == rights.dtype:
        weight = 1.0 if beta == 1 else 1 - beta  # beta = 1 sums
        with fp32_matmul_precision("tf32" if name == "tfloat32" else "ieee"):
            lefts.baddbmm_(grads, grads.mT, beta=beta, alpha=weight)
            rights.baddbmm_(grads.mT, grads, beta=beta, alpha=weight)
        return
    for factor, product in ((lefts, _bmm(grads, grads.mT, matmul_dtype)), (rights, _bmm(grads.mT, grads, matmul_dtype))):
        if beta == 1:
            factor.add_(product.to(factor.dtype))
        else:
            factor.lerp_(product.to(factor.dtype), 1 - beta)


def symmetric_eigh(matrices: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of a stack of symmetric matrices, never raising.

    The batched call runs first; if it raises (no convergence, which LAPACK's divide and conquer can do on large
    clusters of equal eigenvalues, e.g. the factor of an embedding block after one step), each matrix is retried
    alone, then in float64; the matrices that still fail get NaN eigenvalues and eigenvectors, which the callers'
    finiteness checks reject.
    """
    try:
        return torch.linalg.eigh(matrices)
    except RuntimeError:  # torch.linalg.LinAlgError derives from RuntimeError
        pass
    values = torch.full(matrices.shape[:-1], float("nan"), dtype=matrices.dtype, device=matrices.device)
    vectors = torch.full_like(matrices, float("nan"))
    for index in range(matrices.shape[0]):
        for dtype in (matrices.dtype, torch.float64):
            try:
                value, vector = torch.linalg.eigh(matrices[index].to(dtype))
            except RuntimeError:
                continue
            values[index], vectors[index] = value, vector
            break
    return values, vectors


def _finite_blocks(*stacks: Tensor) -> Tensor:
    """A bool per block: every entry of every stack is finite."""
    ok = torch.ones(stacks[0].shape[0], dtype=torch.bool, device=stacks[0].device)
    for stack in stacks:
        ok &= stack.isfinite().flatten(1).all(dim=1)
    return ok


def inverse_root(factors: Tensor, *, root: int, eps: float) -> tuple[Tensor, Tensor]:
    r"""The inverse roots :math:`(A + \epsilon I)^{-1/p}` of stacked symmetric PSD factors, by one batched
    symmetric eigendecomposition: :math:`A = Q \Lambda Q^\top`, result
    :math:`Q\,(\max(\Lambda, 0) + \epsilon)^{-1/p} Q^\top` (eigenvalues clamped at 0 against round-off).
    Anil et al. 2020, Sec. 3.1 / Shi et al. 2023, Sec. 3.2.1 (root inverse by eigendecomposition, epsilon).

    Returns the roots and a bool per block: whether that block's result is finite. The caller keeps its previous
    root where it is not.
    """
    values, vectors = symmetric_eigh(factors)
    scales = (values.clamp_min(0) + eps).pow(-1.0 / root)
    roots = (vectors * scales.unsqueeze(-2)) @ vectors.mT
    return roots, _finite_blocks(roots)


def newton_inverse_root(
    factors: Tensor, *, root: int, eps: float, iterations: int = 20, relative_floor: float = RELATIVE_RIDGE
) -> tuple[Tensor, Tensor]:
    r"""The inverse roots :math:`(A + \epsilon_A I)^{-1/p}` of stacked symmetric PSD factors by the coupled Newton
    iteration (Guo & Higham 2006, "A Schur-Newton method for the matrix p-th root and its inverse", SIAM J. Matrix
    Anal. Appl. 28(3), Sec. 3; Anil et al. 2020, Sec. 3; distributed_shampoo's ``_matrix_inverse_root_newton``):
    matrix products only, one batched product per term for the whole stack, no host synchronisation.

    The ridge is :math:`\epsilon_A = \max(\epsilon, \text{relative\_floor} \cdot \|A\|_F)`: a factor summed in
    fp32 has round-off eigenvalues of about :math:`\pm 10^{-7} \|A\|_F` in its null space (embedding blocks, early
    steps), and a negative one makes the iteration diverge (the eigendecomposition path clamps it to 0 instead,
    then amplifies that noise direction by :math:`\epsilon^{-1/p}`). With :math:`A_\epsilon = A + \epsilon_A I`,
    :math:`z = (p+1) / (2\|A_\epsilon\|_F)`, :math:`X_0 = z^{1/p} I`, :math:`M_0 = z A_\epsilon` and, for a fixed
    number of ``iterations``,

    .. math:: T_k = \tfrac{(p+1) I - M_k}{p},\quad X_{k+1} = X_k T_k,\quad M_{k+1} = T_k^p M_k .

    Every iterate is a polynomial in :math:`A`: along an eigenvector with eigenvalue :math:`\lambda`,
    :math:`m_k = x_k^p \lambda`, :math:`m_0 \in (0, (p+1)/2]`, and :math:`m_{k+1} = m_k ((p+1-m_k)/p)^p \in (0, 1]`
    rises to 1 (by :math:`((p+1)/p)^p \approx 2.44` per iteration for :math:`p = 4` while small, then
    quadratically). So :math:`X_k = (A_\epsilon / M_k)^{-1/p}`: a direction that has not converged is damped as if
    its eigenvalue were :math:`\lambda / m_k > \lambda`, never amplified past the exact root. 20 iterations
    converge every eigenvalue above the floor (:math:`m_0 \ge 2.5 \cdot 10^{-6}`) to fp32 accuracy.

    Run it in fp32 or fp64, not TF32 (its 5e-4 rounding of :math:`M` would make small eigenvalues negative, and
    those diverge). Returns the roots (symmetrised) and a bool per block: finite, and
    :math:`\|M - I\|_F / \sqrt{n} \le 1` (at most 1 in exact arithmetic; more means the iteration diverged, e.g.
    on a factor that is not PSD). The caller keeps its previous root where it is False.
    """
    n = factors.shape[-1]
    identity = torch.eye(n, dtype=factors.dtype, device=factors.device)
    ridges = (relative_floor * torch.linalg.matrix_norm(factors)).clamp_min(eps)
    ridged = factors + ridges[:, None, None] * identity
    norms = torch.linalg.matrix_norm(ridged).clamp_min(torch.finfo(factors.dtype).tiny)
    z = ((root + 1) / (2 * norms))[:, None, None]
    x = identity * z.pow(1.0 / root)
    m = ridged * z
    for _ in range(iterations):
        t = m.mul(-1.0 / root).add_(identity, alpha=(root + 1) / root)
        x = x @ t
        m = torch.linalg.matrix_power(t, root) @ m
    x = (x + x.mT) / 2
    residual = torch.linalg.matrix_norm(m - identity) / math.sqrt(n)
    return x, _finite_blocks(x) & (residual <= 1.0)


def shampoo_direction(
    exp_avgs: Tensor, left_roots: Tensor, right_roots: Tensor, *, matmul_dtype: str | torch.dtype = "float32"
) -> Tensor:
    r""":math:`L^{-1/p}\, m\, R^{-1/p}` for stacked blocks (Gupta et al. 2018, Alg. 1; Shi et al. 2023, Alg. 1
    line 12 with the filtered gradient :math:`m`), in the dtype of ``exp_avgs``."""
    out = _bmm(_bmm(left_roots, exp_avgs, matmul_dtype), right_roots, matmul_dtype)
    return out.to(exp_avgs.dtype)


def graft(direction: Tensor, grafted_norms: Tensor) -> Tensor:
    r"""Per block, ``direction`` rescaled to the grafting direction's norm ``grafted_norms`` (one per block):
    :math:`d\, \|d_{graft}\|_F / \|d\|_F` (0 where :math:`\|d\|_F = 0`). Anil et al. 2020, Sec. 3.4 (layer-wise
    grafting, here per block as in Shi et al. 2023, Sec. 3.2)."""
    norms = torch.linalg.vector_norm(direction, dim=(-2, -1), keepdim=True)
    grafted_norms = grafted_norms.view(-1, 1, 1)
    scale = torch.where(norms > 0, grafted_norms / norms, torch.zeros_like(norms))
    return direction.mul_(scale)


def eigenbasis(factors: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvectors of stacked symmetric factors, by decreasing eigenvalue, and a bool per block (finite).
    SOAP (Vyas et al. 2024), Algorithm 3: the first eigenbasis, by eigendecomposition."""
    _, vectors = symmetric_eigh(factors)
    vectors = vectors.flip(-1)
    return vectors, _finite_blocks(vectors)


def cholesky_qr(matrices: Tensor) -> tuple[Tensor, Tensor]:
    r"""The orthonormal factor :math:`Q` of the QR factorisation of each matrix of a stack, by CholeskyQR in
    float64 (Fukaya, Nakatsukasa, Yanagisawa, Yamamoto 2014, "CholeskyQR2: A Simple and Communication-Avoiding
    Algorithm for Computing a Tall-Skinny QR Factorization", Algorithm 1): :math:`R = \operatorname{chol}(Y^\top
    Y)^\top`, :math:`Q = Y R^{-1}`.

    One batched product, Cholesky factorisation and triangular solve instead of Householder reflections. Columns
    are scaled to unit norm first (this leaves :math:`Q` unchanged and is the best diagonal scaling of the Gram
    matrix). CholeskyQR loses orthogonality as :math:`\kappa(Y)^2 u`; in float64 that stays below :math:`10^{-4}`
    up to :math:`\kappa(Y) = 10^6`, so the second pass of CholeskyQR2 is left out (on an H100 it would add 60% to
    a Shampoo refresh for no measurable change: :math:`\|Q^\top Q - I\|_F \approx 10^{-6}` either way on
    drifting 1024 x 1024 factors). Float64 products run at the float32 rate on H100-class tensor cores.
    :math:`R` has a positive diagonal, so a column may have the opposite sign of Householder QR's.

    Returns :math:`Q` in the input dtype and a bool per matrix: the factorisation succeeded and :math:`Q` is
    finite (a matrix of dependent columns fails here rather than giving a wrong basis).
    """
    columns = matrices.double()
    columns = columns / torch.linalg.vector_norm(columns, dim=-2, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    lower, info = torch.linalg.cholesky_ex(columns.mT @ columns)
    columns = torch.linalg.solve_triangular(lower.mT, columns, upper=True, left=False)
    return columns.to(matrices.dtype), (info == 0) & _finite_blocks(columns)


def refresh_eigenbasis(factors: Tensor, bases: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""One step of power iteration with QR for stacked factors :math:`P` and their current bases :math:`Q`
    (SOAP, Vyas et al. 2024, Algorithm 4; the warm-started QR iteration of Shi et al. 2023's implementation).

    Estimated eigenvalues :math:`\operatorname{diag}(Q^\top P Q)` order the columns decreasingly (``order``);
    the new basis is :math:`\operatorname{QR}((P + sI)\,Q_{:,\text{order}})` by :func:`cholesky_qr`. The shift
    :math:`s = 10^{-6}\|P\|_F` (:data:`RELATIVE_RIDGE`) leaves the eigenvectors as they are and keeps the
    columns of a null space (embedding rows no batch has touched) independent. Returns the new bases, ``order``
    (int64, per block: the old column index of each new column, also the permutation of SOAP's second moment) and
    a bool per block (the QR succeeded and is finite).
    """
    products = factors @ bases
    estimates = (bases * products).sum(dim=-2)
    order = estimates.argsort(dim=-1, descending=True)
    shifts = (RELATIVE_RIDGE * torch.linalg.matrix_norm(factors)).clamp_min(torch.finfo(factors.dtype).tiny)
    products = products + shifts[:, None, None] * bases
    products = products.gather(-1, order.unsqueeze(-2).expand_as(products))
    new_bases, ok = cholesky_qr(products)
    return new_bases, order, ok


def root_from_eigenpairs(factors: Tensor, values: Tensor, vectors: Tensor, *, root: int, eps: float) -> Tensor:
    r""":math:`Q\,(\max(\Lambda, 0) + \epsilon_A)^{-1/p} Q^\top` for stacked eigenpairs (estimates) of the factors,
    with the ridge :math:`\epsilon_A = \max(\epsilon, 10^{-6} \|A\|_F)` of :func:`newton_inverse_root`.
    Whatever the accuracy of :math:`Q`, the result is symmetric positive semi-definite."""
    ridges = (RELATIVE_RIDGE * torch.linalg.matrix_norm(factors)).clamp_min(eps)
    scales = (values.clamp_min(0) + ridges[:, None]).pow(-1.0 / root)
    return (vectors * scales.unsqueeze(-2)) @ vectors.mT


def qr_inverse_root(factors: Tensor, bases: Tensor, *, root: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""Inverse roots from a warm-started eigenbasis: one :func:`refresh_eigenbasis` step from the block's
    previous basis, eigenvalues estimated by the Rayleigh quotients :math:`\operatorname{diag}(Q^\top A Q)` of the
    new basis, then :func:`root_from_eigenpairs` (distributed_shampoo's ``QREigendecompositionConfig``, one
    iteration by default; Eschenhagen et al. 2025, "Purifying Shampoo", arXiv:2506.03595: a warm-started QR
    iteration per recomputation stays close to the exact eigenbasis because the factors change slowly).

    Cost per factor: three fp32 matrix products and one float64 product, Cholesky factorisation and triangular
    solve: on an H100, 27 factors of 1024 x 1024 take 11.8 ms, where 20 Newton iterations (80 products) take
    about 100 ms. The roots are approximate where the factor moved fast since the last refresh; each later
    refresh moves the basis closer. Returns the roots, the new bases and a bool per block (finite, QR succeeded).
    """
    vectors, _, ok = refresh_eigenbasis(factors, bases)
    values = (vectors * (factors @ vectors)).sum(dim=-2)
    roots = root_from_eigenpairs(factors, values, vectors, root=root, eps=eps)
    return roots, vectors, ok & _finite_blocks(roots)


def rotate(x: Tensor, left: Tensor, right: Tensor, matmul_dtype: str | torch.dtype) -> Tensor:
    r""":math:`Q_L^\top x\, Q_R` (into the eigenbasis; SOAP Algorithm 3, line 5), in the dtype of ``x``."""
    return _bmm(_bmm(left.mT, x, matmul_dtype), right, matmul_dtype).to(x.dtype)


def rotate_back(x: Tensor, left: Tensor, right: Tensor, matmul_dtype: str | torch.dtype) -> Tensor:
    r""":math:`Q_L\, x\, Q_R^\top` (back from the eigenbasis; SOAP Algorithm 3, line 10), in the dtype of ``x``."""
    return _bmm(_bmm(left, x, matmul_dtype), right.mT, matmul_dtype).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer glue shared by Shampoo and SOAP


@dataclasses.dataclass
class DiagonalParams:
    """The parameters of a param group without a matrix view (order 1 after merging) at one step count."""

    group_index: int
    step: int
    params: list[Tensor]


def _as_slice(indices: range) -> slice:
    return slice(indices.start, indices.stop, indices.step) if len(indices) else slice(0, 0)


def _rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def recompute_selection(step: int, n_blocks: int, *, frequency: int, start: int, stagger: bool) -> range | None:
    """Which blocks of a bucket recompute their preconditioner at ``step`` (1-based), or None.

    All blocks at ``step == start`` (the first preconditioned step); after it, every ``frequency`` steps. With
    ``stagger``, block ``i`` recomputes when ``(step - start) % frequency == i % frequency``: each step does about
    ``1/frequency`` of the work instead of all of it on one step in ``frequency``.
    """
    if step < start:
        return None
    if step == start:
        return range(n_blocks)
    phase = (step - start) % frequency
    if stagger:
        selection = range(n_blocks)[phase::frequency]
        return selection if len(selection) else None
    return range(n_blocks) if phase == 0 else None


def _check_no_dtensor(name: str, params: list[Tensor]) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return
    for param in params:
        if isinstance(param, DTensor):
            raise ValueError(
                f"{name} does not support sharded (DTensor) parameters, as FSDP2 and tensor parallelism create: its "
                f"preconditioners need whole matrices. Use a single device or DDP (torchrun / accelerate launch "
                f"without --fsdp); under DDP the preconditioner computations are split across ranks."
            )


class _KroneckerOptimizer(Optimizer):
    """Step structure, state layout, DDP work split and state loading that :class:`Shampoo` and :class:`Soap`
    share. A step: (1) per bucket, ``_update_moments`` and the factor update (on the side stream of overlapped
    recomputations, see :meth:`_update_factors`), (2) take in the recomputation launched at the last step
    (``overlap_recompute``), then recompute the due preconditioners, batched across buckets, split over the
    data-parallel ranks and shared by one ``all_reduce`` per dtype (in line, or launched for the next step),
    (3) ``_direction`` per bucket, written into the parameters. Parameters without a matrix view (order 1 after
    merging) take ``_diagonal_grafting``."""

    name: str
    #: Per-block state keys (lists with one tensor per block in each parameter's state).
    block_keys: tuple[str, ...]
    #: Keys held in the preconditioner dtype.
    preconditioner_keys = ("factor_left", "factor_right", "root_left", "root_right", "basis_left", "basis_right")

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        self._check_hyperparameters(defaults, self.name)
        super().__init__(params, defaults)
        self._plan: tuple[Any, list[BlockBucket], list[DiagonalParams], Tensor] | None = None
        #: A recomputation launched at the last step and not yet taken into the state (see :meth:`_recompute`).
        self._pending: tuple[list[tuple[BlockBucket, range]], list[tuple[Tensor, ...]], list[Any]] | None = None
        self._side_streams: dict[torch.device, Any] = {}
        self._recompute_graphs = RecomputeGraphs()

    def __getstate__(self) -> dict[str, Any]:
        self._settle()  # a pickled or deep-copied optimizer carries the pending results in its state
        return super().__getstate__()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._plan, self._pending, self._side_streams = None, None, {}
        self._recompute_graphs = RecomputeGraphs()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group after validating its hyperparameters; sharded (DTensor) parameters are refused."""
        where = f"{self.name} param group {len(self.param_groups)}"
        self._check_hyperparameters({**self.defaults, **param_group}, where)
        params = param_group["params"]
        _check_no_dtensor(self.name, [params] if isinstance(params, Tensor) else list(params))
        super().add_param_group(param_group)
        self._plan = None

    @staticmethod
    def _check_hyperparameters(hyperparameters: dict[str, Any], where: str) -> None:
        for key in ("lr", "weight_decay", "eps"):
            value = hyperparameters[key]
            require(is_real(value) and value >= 0, where, key, value, f"expected a real number with {key} >= 0")
        betas = hyperparameters["betas"]
        require(isinstance(betas, (tuple, list)) and len(betas) == 2, where, "betas", betas, "expected a pair")
        for index, beta in enumerate(betas):
            require(is_real(beta) and 0 <= beta < 1, where, f"betas[{index}]", beta, "expected 0 <= beta < 1")
        beta = hyperparameters["shampoo_beta"]
        require(is_real(beta) and 0 < beta <= 1, where, "shampoo_beta", beta, "expected 0 < shampoo_beta <= 1")
        for key in ("max_preconditioner_dim", "precondition_frequency"):
            value = hyperparameters[key]
            require(is_int(value) and value >= 1, where, key, value, "expected an int >= 1")
        for key, choices in (("preconditioner_dtype", PRECONDITIONER_DTYPES), ("matmul_dtype", MATMUL_DTYPES),
                             ("nonfinite", _NONFINITE_POLICIES)):
            value = hyperparameters[key]
            require(value in choices, where, key, value, f"expected one of {tuple(choices)}")
        for key in ("stagger_recompute", "overlap_recompute", "graph_recompute"):
            require(isinstance(hyperparameters[key], bool), where, key, hyperparameters[key], "expected a bool")

    # -- subclass interface -------------------------------------------------------------------------------------

    def _init_block_state(self, rows: int, cols: int, device: torch.device, dtype: torch.dtype,
                          group: dict[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def _diagonal_grafting(self, group: dict[str, Any]) -> str:
        raise NotImplementedError

    def _complete_state(self, param: Tensor, group: dict[str, Any]) -> None:
        """Add state a group's settings need but an existing state lacks (settings changed after state was made)."""

    def _update_moments(self, bucket: BlockBucket, grads: Tensor, group: dict[str, Any]) -> Any:
        """Update the moments that take the gradient before the step's recomputation (none by default); what
        this returns goes to :meth:`_direction`."""

    def _refresh_job(self, bucket: BlockBucket, group: dict[str, Any], side: str,
                     blocks: slice) -> tuple[tuple, tuple[Tensor, ...]]:
        """What recomputing one side's preconditioners of ``blocks`` takes: a key naming the computation and its
        settings, and the stacked inputs. Jobs with equal keys and input shapes run as one batch (:meth:`_recompute`)."""
        raise NotImplementedError

    @staticmethod
    def _refresh(key: tuple, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Run the computation ``key`` names on stacked inputs; every result has the blocks along dim 0."""
        raise NotImplementedError

    #: The ``_refresh`` keys (their first entry) that never synchronise the host, so a CUDA graph can replay them.
    graphable_refreshes: tuple[str, ...] = ()

    def _accept(self, bucket: BlockBucket, group: dict[str, Any], blocks: slice, results: tuple[Tensor, ...]) -> None:
        """Take the recomputed ``blocks``: ``results`` is the left side's ``_refresh`` results, then the right's."""
        raise NotImplementedError

    def _recompute_selection(self, bucket: BlockBucket, group: dict[str, Any]) -> range | None:
        raise NotImplementedError

    def _is_first_recompute(self, bucket: BlockBucket, group: dict[str, Any]) -> bool:
        """Whether this step's recomputation of ``bucket`` is its first (by eigendecomposition, used at once)."""
        raise NotImplementedError

    def _recomputes_overlap(self, group: dict[str, Any]) -> bool:
        """Whether ``group``'s recomputations after the first are launched for the next step
        (``overlap_recompute``). Subclasses keep their ``torch.linalg.eigh`` recomputations in line: ``eigh``
        synchronises the host with a CUDA device, so it could not overlap anything."""
        return group.get("overlap_recompute", False)

    def _overlaps(self, bucket: BlockBucket, group: dict[str, Any]) -> bool:
        """Whether this step's recomputation of ``bucket`` is launched for the next step: not the first one."""
        return self._recomputes_overlap(group) and not self._is_first_recompute(bucket, group)

    def _direction(self, bucket: BlockBucket, grads: Tensor, group: dict[str, Any], moments: Any) -> Tensor:
        raise NotImplementedError

    # -- state ------------------------------------------------------------------------------------------------

    def _init_state(self, param: Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        state["step"] = torch.zeros((), dtype=torch.float32)
        matrix = matrix_shape(tuple(param.shape), group["max_preconditioner_dim"])
        dtype = math_dtype(param.dtype)
        if matrix is None:
            state["exp_avg"] = torch.zeros_like(param, dtype=dtype)
            if second_moment_rule(self._diagonal_grafting(group)) is not None:
                state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype)
            return
        blocks = [
            self._init_block_state(*block_shape(slices), param.device, dtype, group)
            for slices in block_slices(*matrix, group["max_preconditioner_dim"])
        ]
        for key in blocks[0]:
            state[key] = [block[key] for block in blocks]

    def _expected_dtype(self, key: str, param: Tensor, group: dict[str, Any]) -> torch.dtype:
        if key == "preconditioner_failures":
            return torch.int64
        if key in self.preconditioner_keys:
            return PRECONDITIONER_DTYPES[group["preconditioner_dtype"]]
        return math_dtype(param.dtype)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like ``torch.optim.Optimizer``, then put every state tensor back in its own dtype on its
        parameter's device (torch casts floating state to the parameter dtype, and the failure counters too).
        The stacked buckets are rebuilt from this per-parameter state on the next step."""
        self._join_side_streams()  # no side-stream work may still write the state this replaces
        self._pending = None
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        params = ((p, group) for group in self.param_groups for p in group["params"])
        for saved_id, (param, group) in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            for key, value in saved.items():
                if key == "step":
                    self.state[param][key] = value.to(device="cpu", dtype=torch.float32)
                    continue
                dtype = self._expected_dtype(key, param, group)
                if isinstance(value, Tensor):
                    self.state[param][key] = value.to(device=param.device, dtype=dtype)
                else:
                    self.state[param][key] = [block.to(device=param.device, dtype=dtype) for block in value]
        self._plan = None

    def state_dict(self) -> dict[str, Any]:
        """The standard optimizer state dict, after taking in a pending recomputation (so a run resumed from it
        continues exactly)."""
        self._settle()
        return super().state_dict()

    def preconditioner_failures(self) -> int:
        """How many block preconditioner computations failed (eigendecomposition raised or gave non-finite
        values) and kept the previous preconditioner. One host sync."""
        self._finish_recompute()
        counts = [
            count for state in self.state.values() for count in state.get("preconditioner_failures", [])
        ]
        return int(torch.stack(counts).sum()) if counts else 0

    # -- the step ---------------------------------------------------------------------------------------------

    def _build_plan(self, params_and_grads: list[tuple[list[Tensor], list[Tensor]]]) -> None:
        """Create missing state and stack the blocks of equal (group, shape, step) into buckets."""
        self._settle()  # into the old buckets, whose stacks the state lists still view
        buckets: list[BlockBucket] = []
        diagonals: list[DiagonalParams] = []
        for group_index, (group, (params, _)) in enumerate(zip(self.param_groups, params_and_grads)):
            max_dim = group["max_preconditioner_dim"]
            by_shape: dict[tuple[int, tuple[int, int]], list] = {}
            by_step: dict[int, list[Tensor]] = {}
            for param in params:
                if not self.state[param]:
                    self._init_state(param, group)
                else:
                    self._complete_state(param, group)
                step = int(self.state[param]["step"])
                matrix = matrix_shape(tuple(param.shape), max_dim)
                if matrix is None:
                    by_step.setdefault(step, []).append(param)
                    continue
                for index, slices in enumerate(block_slices(*matrix, max_dim)):
                    by_shape.setdefault((step, block_shape(slices)), []).append((param, matrix, index, slices))
            for (step, shape), entries in by_shape.items():
                keys = tuple(self.state[entries[0][0]].keys() - {"step"})
                buckets.append(BlockBucket(group_index, step, shape, entries, self.state, tuple(sorted(keys)),
                                           max_dim))
            diagonals += [DiagonalParams(group_index, step, params) for step, params in by_step.items()]
        # Every step count of the parameters with gradients becomes a view of one CPU tensor: one add per step.
        params = [p for params, _ in params_and_grads for p in params]
        steps = torch.stack([self.state[p]["step"] for p in params])
        for param, step in zip(params, steps):
            self.state[param]["step"] = step
        self._plan = (self._plan_key(params_and_grads), buckets, diagonals, steps)

    def _plan_key(self, params_and_grads: list[tuple[list[Tensor], list[Tensor]]]) -> tuple:
        """What the buckets depend on: the parameters with gradients, per group, and each group's state layout."""
        return (tuple(tuple(id(p) for p in params) for params, _ in params_and_grads),
                tuple(self._state_layout(group) for group in self.param_groups))

    def _state_layout(self, group: dict[str, Any]) -> Any:
        """The group settings that decide which per-block state keys exist (None: no such setting)."""
        return None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = evaluate_closure(closure)
        params_and_grads = params_with_grads_per_group(self.name, self.param_groups)
        if not any(params for params, _ in params_and_grads):
            return loss
        if any(group["nonfinite"] != "apply" for group in self.param_groups):
            grad_norms = [foreach_norms(grads) for _, grads in params_and_grads]
            if not nonfinite_policy_allows_step(self.name, self.param_groups, grad_norms):
                return loss
        if self._plan is None or self._plan[0] != self._plan_key(params_and_grads):
            self._build_plan(params_and_grads)
        _, buckets, diagonals, steps = self._plan
        steps.add_(1.0)

        for group, (params, _) in zip(self.param_groups, params_and_grads):
            if params and self._decoupled(group) and group["weight_decay"] != 0 and group["lr"] != 0:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])

        gathered, grad_blocks = [], {}
        for bucket in buckets:
            group = self.param_groups[bucket.group_index]
            bucket.step += 1
            grads = bucket.gather_grads(grad_blocks)
            if not self._decoupled(group) and group["weight_decay"] != 0:
                grads.add_(torch.stack(bucket.param_blocks).to(grads.dtype), alpha=group["weight_decay"])
            moments = self._update_moments(bucket, grads, group)
            self._update_factors(bucket, grads, group)
            gathered.append((grads, moments))

        # The roots recomputed at the last step take effect now, before this step's recomputations read them.
        self._finish_recompute()
        due, overlapped = [], []
        for bucket in buckets:
            group = self.param_groups[bucket.group_index]
            selection = self._recompute_selection(bucket, group)
            if selection is not None:
                (overlapped if self._overlaps(bucket, group) else due).append((bucket, selection))
        if due:
            self._join_side_streams()  # factors updated on a side stream (a first recomputation) are read here
            self._accept_recomputed(due, *self._recompute(due, overlap=False))
        if overlapped:
            self._pending = (overlapped, *self._recompute(overlapped, overlap=True))

        for bucket, (grads, moments) in zip(buckets, gathered):
            group = self.param_groups[bucket.group_index]
            direction = self._direction(bucket, grads, group, moments)
            step_size = group["lr"] / self._bias_correction1(group, bucket.step)
            bucket.add_to_params(direction, alpha=-step_size)

        for diagonal in diagonals:
            diagonal.step += 1
            self._diagonal_step(self.param_groups[diagonal.group_index], diagonal.params, diagonal.step)
        return loss

    def _decoupled(self, group: dict[str, Any]) -> bool:
        return group.get("decoupled_weight_decay", True)

    @staticmethod
    def _bias_correction1(group: dict[str, Any], step: int) -> float:
        return 1 - group["betas"][0] ** step

    def _diagonal_step(self, group: dict[str, Any], params: list[Tensor], step: int) -> None:
        """Parameters without a matrix view: the elementwise update of ``_diagonal_grafting(group)``."""
        grafting = self._diagonal_grafting(group)
        rule = second_moment_rule(grafting)
        dtype = math_dtype(params[0].dtype)
        grads = [p.grad.to(dtype) for p in params]
        if not self._decoupled(group) and group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, [p.to(dtype) for p in params], alpha=group["weight_decay"])
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params] if rule else None
        beta1, beta2 = group["betas"]
        update_moments(grads, exp_avgs, exp_avg_sqs, beta1=beta1, beta2=beta2, rule=rule)
        directions = elementwise_directions(exp_avgs, exp_avg_sqs, grafting=grafting,
                                            bias_corrections2=[1 - beta2**step] * len(params), eps=group["eps"])
        torch._foreach_add_(params, directions, alpha=-group["lr"] / self._bias_correction1(group, step))

    def _update_factors(self, bucket: BlockBucket, grads: Tensor, group: dict[str, Any]) -> None:
        """Add the gradients to the factors (:func:`update_factors`). Where the group's recomputations overlap
        (``overlap_recompute``, on CUDA) this runs on their side stream, after the gradients are gathered: the
        factors are then read and written by that stream alone (its recomputations need no copy of them), and
        their products leave the main stream, which only applies the roots."""
        stream = self._side_stream(grads.device) if self._recomputes_overlap(group) else None
        factors = bucket.stacks["factor_left"], bucket.stacks["factor_right"]
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(grads.device))
            for tensor in (grads, *factors):
                tensor.record_stream(stream)
        with _on_stream(stream):
            update_factors(grads, *factors, beta=group["shampoo_beta"], matmul_dtype=group["matmul_dtype"])
        if stream is not None:  # the next step's gather overwrites these gradients only after this update read them
            bucket.gathered_read = stream.record_event()

    def _join_side_streams(self) -> None:
        """Make each device's current stream wait for all work queued on its side stream."""
        for device, stream in self._side_streams.items():
            torch.cuda.current_stream(device).wait_stream(stream)

    def _settle(self) -> None:
        """Take a pending recomputation into the state and wait for all side-stream work: the state is whole."""
        self._finish_recompute()
        self._join_side_streams()

    def _side_stream(self, device: torch.device) -> Any:
        """The CUDA stream the overlapped recomputations of ``device`` run on (None off CUDA)."""
        if device.type != "cuda":
            return None
        if device not in self._side_streams:
            self._side_streams[device] = torch.cuda.Stream(device)
        return self._side_streams[device]

    def _recompute(self, due: list[tuple[BlockBucket, range]], *,
                   overlap: bool) -> tuple[list[tuple[Tensor, ...]], list[Any]]:
        """Recompute the due blocks' preconditioners; returns each job's results and the CUDA events that mark
        them ready, for :meth:`_accept_recomputed`.

        Every side of every due block becomes a job (:meth:`_refresh_job`); jobs of equal key, input shapes and
        device, across buckets and sides, are concatenated and computed in one batch (a batched factorisation
        costs nearly the same for 5 matrices as for 50). Under ``torch.distributed`` each rank computes an equal
        share of every batch (Shi et al. 2023, Sec. 4) and one ``all_reduce`` (per dtype) of the zero-padded
        results gives every rank all of them.

        With ``overlap`` the results are taken in at the next step; on CUDA the computation runs on a side stream
        (the stream that updates these factors), overlapping the next step's forward and backward. Memory: a batch
        runs in chunks of at most :data:`RECOMPUTE_CHUNK_BYTES` per float64 factor stack; a chunk's inputs are
        copied where it has several jobs; overlapped results (Shampoo ``qr``: roots and bases, twice the due
        factors) are held until the next step. With ``graph_recompute`` a CUDA batch of a kind in
        :attr:`graphable_refreshes` is replayed as a CUDA graph (:class:`~._graphs.RecomputeGraphs`): same
        kernels, a sixth of the host time, the batch's intermediates kept reserved for the next replay.
        """
        rank, world_size = _rank_and_world_size()
        jobs: list[tuple[Tensor, ...]] = []  # the inputs of each job: 2 per due (bucket, selection), left then right
        batches: dict[tuple, list[int]] = {}
        for bucket, selection in due:
            group = self.param_groups[bucket.group_index]
            for side in ("left", "right"):
                key, inputs = self._refresh_job(bucket, group, side, _as_slice(selection))
                layout = tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in inputs)
                graphed = (group.get("graph_recompute", False) and inputs[0].device.type == "cuda"
                           and key[0] in self.graphable_refreshes)
                batches.setdefault((key, layout, graphed), []).append(len(jobs))
                jobs.append(inputs)
        computed = []
        streams: dict[torch.device, Any] = {}
        for (key, _, graphed), members in batches.items():
            sizes = [jobs[j][0].shape[0] for j in members]
            rows = sum(sizes)
            share = -(-rows // world_size)
            owned = slice(min(rank * share, rows), min((rank + 1) * share, rows))
            device = jobs[members[0]][0].device
            stream = self._side_stream(device) if overlap else None
            if stream is not None:
                streams[device] = stream
            side = jobs[members[0]][0].shape[-1]
            chunk = max(1, RECOMPUTE_CHUNK_BYTES // (8 * side * side))
            windows = [slice(start, min(start + chunk, owned.stop)) for start in range(owned.start, owned.stop, chunk)]
            # Results land in one tensor per output: this rank's rows, or all rows zero-padded for the all_reduce.
            offset = 0 if world_size > 1 else owned.start
            results = None
            for window in windows or [owned]:
                parts = _rows_of_members([jobs[j] for j in members], sizes, window)
                # A side stream reads the state in place: its factors are written by that stream alone (see
                # _update_factors), and the bases it reads change only when the next step takes in its results.
                if stream is not None:
                    stream.wait_stream(torch.cuda.current_stream(device))
                    for tensor in chain.from_iterable(parts):
                        tensor.record_stream(stream)
                # Roots, eigenbases and their products in true fp32 (or fp64), whatever the global TF32 setting.
                with _on_stream(stream), fp32_matmul_precision("ieee"):
                    pieces = [list(input_pieces) for input_pieces in zip(*parts)]
                    if graphed:
                        window_results = self._recompute_graphs(self._refresh, key, pieces)
                    else:
                        window_results = self._refresh(key, tuple(stacked(input_pieces) for input_pieces in pieces))
                    if world_size == 1 and len(windows) <= 1:
                        results = window_results
                        continue
                    if results is None:
                        length = rows if world_size > 1 else owned.stop - owned.start
                        results = tuple(torch.zeros((length, *t.shape[1:]), dtype=t.dtype, device=t.device)
                                        for t in window_results)
                    for out, tensor in zip(results, window_results):
                        out[window.start - offset:window.stop - offset] = tensor
            computed.append((members, sizes, results))
        if world_size > 1:
            tensors = [tensor for _, _, results in computed for tensor in results]
            with _on_stream(next(iter(streams.values()), None)):
                for dtype in dict.fromkeys(tensor.dtype for tensor in tensors):  # the same order on every rank
                    same = [tensor for tensor in tensors if tensor.dtype == dtype]
                    flat = torch.cat([tensor.reshape(-1) for tensor in same])
                    dist.all_reduce(flat)
                    torch._foreach_copy_(same, [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in same]), same)])
        per_job: list[tuple[Tensor, ...]] = [()] * len(jobs)
        for members, sizes, results in computed:
            for j, parts in zip(members, zip(*(tensor.split(sizes) for tensor in results))):
                per_job[j] = parts
        return per_job, [(device, stream.record_event()) for device, stream in streams.items()]

    def _accept_recomputed(self, due: list[tuple[BlockBucket, range]], per_job: list[tuple[Tensor, ...]],
                           events: list[Any]) -> None:
        """Take :meth:`_recompute`'s results into the state (after the side stream's work, where it had any)."""
        for device, event in events:
            current = torch.cuda.current_stream(device)
            current.wait_event(event)
            for parts in per_job:
                for tensor in parts:
                    if tensor.device == device:
                        tensor.record_stream(current)
        with fp32_matmul_precision("ieee"):
            for index, (bucket, selection) in enumerate(due):
                self._accept(bucket, self.param_groups[bucket.group_index], _as_slice(selection),
                             per_job[2 * index] + per_job[2 * index + 1])

    def _finish_recompute(self) -> None:
        """Take a pending (overlapped) recomputation into the state."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._accept_recomputed(*pending)


def _rows_of_members(members: list[tuple[Tensor, ...]], sizes: list[int], rows: slice) -> list[tuple[Tensor, ...]]:
    """The parts of the members' stacked inputs that fall in ``rows`` of their concatenation (a rank's share),
    without concatenating the rest."""
    parts, offset = [], 0
    for inputs, size in zip(members, sizes):
        start, stop = max(rows.start, offset), min(rows.stop, offset + size)
        if start < stop:
            parts.append(tuple(tensor[start - offset:stop - offset] for tensor in inputs))
        offset += size
    return parts or [tuple(tensor[:0] for tensor in members[0])]


def _on_stream(stream: Any) -> Any:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _keep_previous(current: Tensor, candidate: Tensor, ok: Tensor) -> None:
    """``current[i] = candidate[i]`` for the blocks where ``ok`` (a 0/1 float per block) is 1, in place."""
    mask = (ok > 0.5).view(-1, *([1] * (current.dim() - 1)))
    current.copy_(torch.where(mask, candidate.to(current.dtype), current))


class Shampoo(_KroneckerOptimizer):
    r"""Shampoo with grafting (Gupta et al. 2018; Anil et al. 2020; Shi et al. 2023, Algorithm 1).

    Each parameter is viewed as a matrix and cut into blocks (see :mod:`._blocks`). For a block with gradient
    :math:`G` at step :math:`t` (math in fp32, factors and roots in ``preconditioner_dtype``):

    .. math::
        \begin{aligned}
        & G \leftarrow G + \lambda X && \text{if not decoupled\_weight\_decay (L2)} \\
        & L \leftarrow \beta_s L + (1-\beta_s) GG^\top,\; R \leftarrow \beta_s R + (1-\beta_s) G^\top G
            && \text{Alg. 1 l. 5-6; } \beta_s = 1 \text{ sums} \\
        & m \leftarrow \beta_1 m + (1-\beta_1) G && \text{filtered gradient} \\
        & v \leftarrow \text{grafting second moment (Adam / RMSprop EMA with } \beta_2 \text{, AdaGrad sum)} \\
        & \bar L, \bar R \leftarrow (L + \epsilon_s I)^{-1/p}, (R + \epsilon_s I)^{-1/p}
            && \text{every precondition\_frequency steps from start\_preconditioning\_step} \\
        & d_g = m / (\sqrt{v \text{ (bias-corrected for Adam)}} + \epsilon) && \text{grafting direction} \\
        & d = \bar L\, m\, \bar R \cdot \|d_g\|_F / \|\bar L m \bar R\|_F && \text{(} d = d_g \text{ before the
            start step; no rescaling with grafting="none")} \\
        & X \leftarrow X (1 - \gamma\lambda) \text{ (decoupled)};\; X \leftarrow X - \gamma\, d / (1-\beta_1^t)
        \end{aligned}

    The default exponent is :math:`p = 4` (:math:`2\times` the order of a matrix block, Gupta et al. 2018);
    ``exponent_override`` sets another (2 gives the :math:`-1/2` roots Shi et al. recommend with grafting).
    Parameters of order 1 after merging (biases, norm weights) take the grafting update alone (SGD with momentum
    for ``grafting="none"``).

    Args:
        params: parameters or param groups (any key below may be set per group).
        lr: :math:`\gamma`.
        betas: :math:`(\beta_1, \beta_2)`: first moment (0 disables it) and the grafting second moment's EMA.
        eps: :math:`\epsilon` of the grafting denominator.
        weight_decay: :math:`\lambda`.
        shampoo_beta: :math:`\beta_s`, the factors' EMA coefficient; 1.0 sums them (AdaGrad-style, the paper).
        preconditioner_eps: :math:`\epsilon_s` added to the factors' eigenvalues before the root.
        max_preconditioner_dim: the largest block side (and the merge threshold of small dimensions).
        precondition_frequency: steps between recomputations of a block's roots.
        start_preconditioning_step: the first step that uses the roots (grafting alone before); None: equal to
            ``precondition_frequency`` (as distributed_shampoo).
        grafting: ``"adam" | "adagrad" | "rmsprop" | "sgd" | "none"``.
        decoupled_weight_decay: AdamW-style decay (True) or L2 added to the gradient (False).
        exponent_override: the root :math:`p` (None: 4).
        preconditioner_dtype: ``"float32"`` or ``"float64"`` for the factors, the root computations and roots.
        matmul_dtype: precision of the per-step matrix products (factor updates, applying the roots):
            ``"tfloat32"`` (default: TF32 tensor cores on CUDA, true fp32 elsewhere), ``"float32"`` (true fp32 even
            where the global setting allows TF32) or ``"bfloat16"`` (bf16 inputs); all accumulate in fp32. Only
            inside the step: the caller's ``torch.backends.cuda.matmul.fp32_precision`` is restored after each
            product. The root computations always run in true fp32 (or fp64).
        root_inverse: ``"qr"`` (default: an eigendecomposition at the first recomputation, then one warm-started
            power-iteration + QR step from the block's previous eigenbasis per recomputation,
            :func:`qr_inverse_root`; ridge at least ``1e-6 * ||A||_F``; a block whose first eigendecomposition
            fails is counted and starts its refreshes from the identity), ``"newton"`` (the coupled Newton
            iteration of :func:`newton_inverse_root`, exact to fp32 at any recomputation, about 7x the GPU time of
            ``"qr"``) or ``"eigh"`` (a full eigendecomposition each time, :func:`inverse_root`, slower still).
        newton_iterations: the Newton path's fixed iteration count (20 converges to fp32 accuracy).
        stagger_recompute: spread the recomputations over the ``precondition_frequency`` steps (block ``i`` at
            steps where ``(t - start) % frequency == i % frequency``) instead of all blocks on one step.
        overlap_recompute: roots recomputed at step :math:`t` (from the factors including :math:`G_t`) are used
            from step :math:`t+1`; on CUDA their computation runs on a side stream, overlapping the next forward
            and backward, and so do the factor updates (on the CPU both run in line, with the same one-step delay,
            so both compute the same). The first recomputation (at the start step) and ``root_inverse="eigh"``
            (``eigh`` synchronises the host with the GPU) are used at once either way. False: used at step
            :math:`t`, computed in line. ``state_dict()`` (and pickling) take a pending result in first, so a
            resumed run continues exactly.
            Under DDP with NCCL the results' ``all_reduce`` is issued from the side stream; the gradient
            all-reduces of the next backward queue behind it on NCCL's stream (not measured on GPUs yet).
        graph_recompute: on CUDA, replay each batch of ``"qr"`` / ``"newton"`` recomputations as a CUDA graph
            (:mod:`hf_colossal.optim._graphs`): the same kernels at about a sixth of the host time (2.5 -> 0.4 ms
            per batch of 1024 x 1024 factors on an H200). A kind of batch is captured at its second occurrence (and
            again when a larger batch comes, after one device synchronisation), smaller batches are padded to the
            largest one, and its intermediates stay reserved. Off by default: on the 271M benchmark it took 3.5-8
            ms of host time off the step, but the whole step's change stayed within the hosts' run-to-run noise
            (``benchmarks/RESULTS.md``).
        nonfinite: a step with an inf/NaN gradient: ``"skip"`` (counted in ``nonfinite_skips``, one host sync per
            step), ``"error"`` or ``"apply"`` (no check).

    State per matrix parameter (lists with one tensor per block): ``exp_avg``, ``exp_avg_sq`` (not for sgd/none
    grafting), ``factor_left``, ``factor_right``, ``root_left``, ``root_right`` (identity until computed),
    ``basis_left``, ``basis_right`` (``root_inverse="qr"``: the eigenbases the next refresh starts from) and
    ``preconditioner_failures`` (int64: recomputations whose eigendecomposition raised, whose Newton iteration
    diverged, whose QR refresh's Cholesky factorisation failed, or that gave non-finite values; each kept the
    previous root); ``step`` (float32 CPU scalar). Parameters on the diagonal path hold ``exp_avg`` (and
    ``exp_avg_sq``) shaped like the parameter.
    """

    name = "Shampoo"
    graphable_refreshes = ("qr", "newton")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        shampoo_beta: float = 1.0,
        preconditioner_eps: float = 1e-12,
        max_preconditioner_dim: int = 1024,
        precondition_frequency: int = 10,
        start_preconditioning_step: int | None = None,
        grafting: str = "adam",
        decoupled_weight_decay: bool = True,
        exponent_override: int | None = None,
        preconditioner_dtype: str = "float32",
        matmul_dtype: str = "tfloat32",
        root_inverse: str = "qr",
        newton_iterations: int = 20,
        stagger_recompute: bool = True,
        overlap_recompute: bool = True,
        graph_recompute: bool = False,
        nonfinite: str = "skip",
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, shampoo_beta=shampoo_beta,
            root_inverse=root_inverse, newton_iterations=newton_iterations, preconditioner_eps=preconditioner_eps,
            max_preconditioner_dim=max_preconditioner_dim,
            precondition_frequency=precondition_frequency, start_preconditioning_step=start_preconditioning_step,
            grafting=grafting, decoupled_weight_decay=decoupled_weight_decay, exponent_override=exponent_override,
            preconditioner_dtype=preconditioner_dtype, matmul_dtype=matmul_dtype,
            stagger_recompute=stagger_recompute, overlap_recompute=overlap_recompute,
            graph_recompute=graph_recompute, nonfinite=nonfinite, nonfinite_skips=0,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _check_hyperparameters(hyperparameters: dict[str, Any], where: str) -> None:
        _KroneckerOptimizer._check_hyperparameters(hyperparameters, where)
        grafting = hyperparameters["grafting"]
        require(grafting in GRAFTING_TYPES, where, "grafting", grafting, f"expected one of {GRAFTING_TYPES}")
        eps = hyperparameters["preconditioner_eps"]
        require(is_real(eps) and eps > 0, where, "preconditioner_eps", eps, "expected a real number > 0")
        start = hyperparameters["start_preconditioning_step"]
        require(start is None or (is_int(start) and start >= 1), where, "start_preconditioning_step", start,
                "expected None or an int >= 1")
        root = hyperparameters["exponent_override"]
        require(root is None or (is_int(root) and root >= 1), where, "exponent_override", root,
                "expected None or an int >= 1 (the root p of X^(-1/p))")
        require(isinstance(hyperparameters["decoupled_weight_decay"], bool), where, "decoupled_weight_decay",
                hyperparameters["decoupled_weight_decay"], "expected a bool")
        method = hyperparameters["root_inverse"]
        require(method in ROOT_INVERSES, where, "root_inverse", method, f"expected one of {ROOT_INVERSES}")
        iterations = hyperparameters["newton_iterations"]
        require(is_int(iterations) and iterations >= 1, where, "newton_iterations", iterations,
                "expected an int >= 1")

    def _init_block_state(self, rows, cols, device, dtype, group):
        precond = PRECONDITIONER_DTYPES[group["preconditioner_dtype"]]
        state = {"exp_avg": torch.zeros(rows, cols, dtype=dtype, device=device)}
        if second_moment_rule(group["grafting"]) is not None:
            state["exp_avg_sq"] = torch.zeros(rows, cols, dtype=dtype, device=device)
        state.update(
            factor_left=torch.zeros(rows, rows, dtype=precond, device=device),
            factor_right=torch.zeros(cols, cols, dtype=precond, device=device),
            root_left=torch.eye(rows, dtype=precond, device=device),
            root_right=torch.eye(cols, dtype=precond, device=device),
            preconditioner_failures=torch.zeros((), dtype=torch.int64, device=device),
        )
        if group.get("root_inverse", "eigh") == "qr":
            state.update(basis_left=torch.eye(rows, dtype=precond, device=device),
                         basis_right=torch.eye(cols, dtype=precond, device=device))
        return state

    def _diagonal_grafting(self, group):
        return "sgd" if group["grafting"] == "none" else group["grafting"]

    def _state_layout(self, group):
        return group.get("root_inverse", "eigh") == "qr"

    def _complete_state(self, param, group):
        """A group switched to ``root_inverse="qr"`` after its state was made (by editing the param group: a loaded
        checkpoint brings its own setting back): start each block's eigenbasis from an eigendecomposition of its
        current factors (the identity where that fails)."""
        state = self.state[param]
        if group.get("root_inverse", "eigh") != "qr" or "factor_left" not in state or "basis_left" in state:
            return
        for side in ("left", "right"):
            bases = []
            for factor in state[f"factor_{side}"]:
                basis = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
                _keep_previous(basis[None], *eigenbasis(factor[None]))
                bases.append(basis)
            state[f"basis_{side}"] = bases

    @staticmethod
    def _start(group: dict[str, Any]) -> int:
        return group["start_preconditioning_step"] or group["precondition_frequency"]

    def _update_moments(self, bucket, grads, group):
        """The moments, and the grafting direction (before the start step) or its norm per block (after it)."""
        stacks, grafting = bucket.stacks, group["grafting"]
        beta1, beta2 = group["betas"]
        preconditioned = bucket.step >= self._start(group)
        return grafting_moments(grads, stacks["exp_avg"], stacks.get("exp_avg_sq"), grafting=grafting,
                                beta1=beta1, beta2=beta2, bias_correction2=1 - beta2**bucket.step, eps=group["eps"],
                                direction=not preconditioned, norms=preconditioned and grafting != "none")

    def _recompute_selection(self, bucket, group):
        return recompute_selection(bucket.step, len(bucket), frequency=group["precondition_frequency"],
                                   start=self._start(group), stagger=group["stagger_recompute"])

    def _is_first_recompute(self, bucket, group):
        return bucket.step == self._start(group)

    def _recomputes_overlap(self, group):
        return super()._recomputes_overlap(group) and group.get("root_inverse", "eigh") != "eigh"

    def _refresh_job(self, bucket, group, side, blocks):
        root, eps = group["exponent_override"] or 4, group["preconditioner_eps"]
        # Groups saved before root_inverse existed used eigendecompositions.
        method = group.get("root_inverse", "eigh")
        factors = bucket.stacks[f"factor_{side}"][blocks]
        if method == "newton":
            return ("newton", root, eps, group.get("newton_iterations", 20)), (factors,)
        if method == "qr" and self._is_first_recompute(bucket, group):  # the first basis: an eigendecomposition
            return ("qr_first", root, eps), (factors,)
        if method == "qr":
            return ("qr", root, eps), (factors, bucket.stacks[f"basis_{side}"][blocks])
        return ("eigh", root, eps), (factors,)

    @staticmethod
    def _refresh(key, inputs):
        method, root, eps, *settings = key
        factors = inputs[0]
        if method == "newton":
            roots, ok = newton_inverse_root(factors, root=root, eps=eps, iterations=settings[0])
            return roots, ok.to(roots.dtype)
        if method == "eigh":
            roots, ok = inverse_root(factors, root=root, eps=eps)
            return roots, ok.to(roots.dtype)
        if method == "qr_first":
            values, vectors = symmetric_eigh(factors)
            roots = root_from_eigenpairs(factors, values, vectors, root=root, eps=eps)
            return roots, _finite_blocks(roots).to(roots.dtype), vectors
        roots, vectors, ok = qr_inverse_root(factors, inputs[1], root=root, eps=eps)
        return roots, ok.to(roots.dtype), vectors

    def _accept(self, bucket, group, blocks, results):
        stacks = bucket.stacks
        per_side = len(results) // 2  # (roots, ok) or, for "qr", (roots, ok, eigenbases)
        failed = []
        for side, result in zip(("left", "right"), (results[:per_side], results[per_side:])):
            _keep_previous(stacks[f"root_{side}"][blocks], result[0], result[1])
            if per_side == 3:
                _keep_previous(stacks[f"basis_{side}"][blocks], result[2], result[1])
            failed.append(result[1] < 0.5)
        stacks["preconditioner_failures"][blocks] += (failed[0] | failed[1]).to(torch.int64)

    def _direction(self, bucket, grads, group, moments):
        stacks = bucket.stacks
        grafted, grafted_norms = moments
        if bucket.step < self._start(group):
            return grafted
        direction = shampoo_direction(stacks["exp_avg"], stacks["root_left"], stacks["root_right"],
                                      matmul_dtype=group["matmul_dtype"])
        return direction if group["grafting"] == "none" else graft(direction, grafted_norms)


class Soap(_KroneckerOptimizer):
    r"""SOAP: Adam in the eigenbasis of Shampoo's factors (Vyas et al. 2024, Algorithm 3).

    For a block with gradient :math:`G` at step :math:`t` (math in fp32, factors and bases in
    ``preconditioner_dtype``):

    .. math::
        \begin{aligned}
        & L \leftarrow \beta_s L + (1-\beta_s) GG^\top,\; R \leftarrow \beta_s R + (1-\beta_s) G^\top G
            && \text{Alg. 3, l. 11-12} \\
        & Q_L, Q_R \leftarrow \operatorname{eigh}(L), \operatorname{eigh}(R) \text{ at } t = 1; \text{ every
            precondition\_frequency steps: one power-iteration + QR step (Alg. 4), } v \text{ permuted} \\
        & G' = Q_L^\top G Q_R; \; m' \leftarrow \beta_1 m' + (1-\beta_1) G';\; v \leftarrow \beta_2 v + (1-\beta_2) G'^2
            && \text{Alg. 3, l. 5-7} \\
        & X \leftarrow X(1-\gamma\lambda);\; X \leftarrow X - \gamma\, Q_L \frac{m'/(1-\beta_1^t)}
            {\sqrt{v/(1-\beta_2^t)} + \epsilon} Q_R^\top && \text{l. 8-10}
        \end{aligned}

    The first moment is kept in the rotated basis and re-projected exactly when the basis changes
    (:math:`m' \leftarrow Q_L'^\top Q_L m' Q_R^\top Q_R'`), which equals the paper's rotation of a first moment
    kept in the original basis. Differences from the reference code, each by one step: the factors take the
    current gradient before a refresh (with ``overlap_recompute=False`` the refreshed basis is used at once; by
    default from the next step, as the reference code's), and step 1 updates the parameters (the reference only
    initialises). Parameters of order 1 after merging take Adam.

    Args:
        params, lr, betas (:math:`\beta_1, \beta_2` of Adam), eps, weight_decay (decoupled): as AdamW.
        shampoo_beta: :math:`\beta_s` of the factors' EMA (the paper: 0.95).
        max_preconditioner_dim, precondition_frequency, preconditioner_dtype, stagger_recompute, graph_recompute,
            nonfinite: as :class:`Shampoo` (``graph_recompute``: the ``"qr"`` refreshes).
        overlap_recompute: as :class:`Shampoo`: an eigenbasis refreshed at step :math:`t` is used (and the second
            moment permuted to its order) from step :math:`t+1`; the first eigenbasis (step 1) and
            ``eigenbasis_update="eigh"`` refreshes at once.
        matmul_dtype: ``"tfloat32"`` (default), ``"float32"`` or ``"bfloat16"`` (see :class:`Shampoo`) for the
            factor products :math:`GG^\top, G^\top G`; the refreshes stay true fp32.
        rotation_dtype: the same choices for the four rotations into and out of the eigenbasis per block and step,
            ``"float32"`` by default: Adam divides each rotated coordinate by its own scale, so rounding noise on
            the near-zero coordinates (TF32: about 5e-4 of a row's norm, bf16: 4e-3) turns into updates of about
            0.2 of a full-size one. ``"tfloat32"`` makes the rotations about 5x faster on tensor-core GPUs.
        eigenbasis_update: ``"qr"`` (Alg. 4, one power-iteration step, the default) or ``"eigh"`` (a full
            eigendecomposition at each refresh).

    State per matrix parameter (lists with one tensor per block): ``exp_avg`` (rotated), ``exp_avg_sq``
    (rotated), ``factor_left``, ``factor_right``, ``basis_left``, ``basis_right`` and ``preconditioner_failures``.
    """

    name = "Soap"
    graphable_refreshes = ("qr",)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        shampoo_beta: float = 0.95,
        max_preconditioner_dim: int = 1024,
        precondition_frequency: int = 10,
        eigenbasis_update: str = "qr",
        preconditioner_dtype: str = "float32",
        matmul_dtype: str = "tfloat32",
        rotation_dtype: str = "float32",
        stagger_recompute: bool = True,
        overlap_recompute: bool = True,
        graph_recompute: bool = False,
        nonfinite: str = "skip",
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, shampoo_beta=shampoo_beta,
            max_preconditioner_dim=max_preconditioner_dim, precondition_frequency=precondition_frequency,
            eigenbasis_update=eigenbasis_update, preconditioner_dtype=preconditioner_dtype,
            matmul_dtype=matmul_dtype, rotation_dtype=rotation_dtype, stagger_recompute=stagger_recompute,
            overlap_recompute=overlap_recompute, graph_recompute=graph_recompute, nonfinite=nonfinite,
            nonfinite_skips=0,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _check_hyperparameters(hyperparameters: dict[str, Any], where: str) -> None:
        _KroneckerOptimizer._check_hyperparameters(hyperparameters, where)
        update = hyperparameters["eigenbasis_update"]
        require(update in EIGENBASIS_UPDATES, where, "eigenbasis_update", update,
                f"expected one of {EIGENBASIS_UPDATES}")
        rotation = hyperparameters["rotation_dtype"]
        require(rotation in MATMUL_DTYPES, where, "rotation_dtype", rotation, f"expected one of {MATMUL_DTYPES}")

    def _init_block_state(self, rows, cols, device, dtype, group):
        precond = PRECONDITIONER_DTYPES[group["preconditioner_dtype"]]
        return dict(
            exp_avg=torch.zeros(rows, cols, dtype=dtype, device=device),
            exp_avg_sq=torch.zeros(rows, cols, dtype=dtype, device=device),
            factor_left=torch.zeros(rows, rows, dtype=precond, device=device),
            factor_right=torch.zeros(cols, cols, dtype=precond, device=device),
            basis_left=torch.eye(rows, dtype=precond, device=device),
            basis_right=torch.eye(cols, dtype=precond, device=device),
            preconditioner_failures=torch.zeros((), dtype=torch.int64, device=device),
        )

    def _diagonal_grafting(self, group):
        return "adam"

    def _recompute_selection(self, bucket, group):
        return recompute_selection(bucket.step, len(bucket), frequency=group["precondition_frequency"], start=1,
                                   stagger=group["stagger_recompute"])

    def _is_first_recompute(self, bucket, group):
        return bucket.step == 1

    def _recomputes_overlap(self, group):
        return super()._recomputes_overlap(group) and group["eigenbasis_update"] != "eigh"

    def _refresh_job(self, bucket, group, side, blocks):
        factors = bucket.stacks[f"factor_{side}"][blocks]
        if self._is_first_recompute(bucket, group) or group["eigenbasis_update"] == "eigh":
            return ("eigh",), (factors,)
        return ("qr",), (factors, bucket.stacks[f"basis_{side}"][blocks])

    @staticmethod
    def _refresh(key, inputs):
        factors = inputs[0]
        if key == ("eigh",):
            bases, ok = eigenbasis(factors)
            order = torch.arange(factors.shape[-1], device=factors.device).expand(factors.shape[:-1])
        else:
            bases, order, ok = refresh_eigenbasis(factors, inputs[1])
        return bases, order.to(bases.dtype), ok.to(bases.dtype)

    def _accept(self, bucket, group, blocks, results):
        stacks = bucket.stacks
        exp_avg_sq = stacks["exp_avg_sq"][blocks]
        old_bases = {side: stacks[f"basis_{side}"][blocks].clone() for side in ("left", "right")}
        oks = []
        # The left basis orders the rows of v, the right one its columns.
        for (side, dim, spread), (bases, order, ok) in zip((("left", -2, -1), ("right", -1, -2)),
                                                           (results[:3], results[3:])):
            _keep_previous(stacks[f"basis_{side}"][blocks], bases, ok)
            identity = torch.arange(order.shape[-1], device=order.device).expand(order.shape)
            order = torch.where((ok > 0.5).unsqueeze(-1), order.round().long(), identity)
            index = order.unsqueeze(spread).expand_as(exp_avg_sq)
            exp_avg_sq.copy_(exp_avg_sq.gather(dim, index))
            oks.append(ok > 0.5)
        # m' <- (Q_L'^T Q_L) m' (Q_R^T Q_R'): the rotated first moment in the new bases.
        left_change = old_bases["left"].mT.matmul(stacks["basis_left"][blocks]).mT
        right_change = old_bases["right"].mT.matmul(stacks["basis_right"][blocks])
        exp_avg = stacks["exp_avg"][blocks]
        exp_avg.copy_((left_change @ exp_avg.to(left_change.dtype) @ right_change).to(exp_avg.dtype))
        stacks["preconditioner_failures"][blocks] += (~(oks[0] & oks[1])).to(torch.int64)

    def _direction(self, bucket, grads, group, moments):
        stacks = bucket.stacks
        beta1, beta2 = group["betas"]
        # Groups saved before rotation_dtype existed rotated in true fp32.
        matmul = group.get("rotation_dtype", "float32")
        rotated = rotate(grads, stacks["basis_left"], stacks["basis_right"], matmul)
        adam, _ = grafting_moments(rotated, stacks["exp_avg"], stacks["exp_avg_sq"], grafting="adam", beta1=beta1,
                                   beta2=beta2, bias_correction2=1 - beta2**bucket.step, eps=group["eps"],
                                   direction=True, norms=False)
        return rotate_back(adam, stacks["basis_left"], stacks["basis_right"], matmul)
