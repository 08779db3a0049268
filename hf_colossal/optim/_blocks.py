"""Blocking for Shampoo-type optimizers: merge small dimensions, cut matrices into blocks, stack equal blocks.

A parameter is preconditioned as a matrix: its dimensions of size 1 are dropped and neighbouring dimensions are
merged while their product stays within ``max_preconditioner_dim`` (Shi et al. 2023, "A Distributed Data-Parallel
PyTorch Implementation of the Distributed Shampoo Optimizer", arXiv:2309.06497, Sec. 3.1, ``merge_small_dims``).
What remains of order >= 3 is viewed as the matrix (first merged dimension, product of the others). The matrix is
cut into blocks of at most ``max_preconditioner_dim`` rows and columns (Sec. 3.1, blocking; Anil et al. 2020,
"Scalable Second Order Optimization for Deep Learning", arXiv:2002.09018, Sec. 3.3). A parameter of order 1 after
merging has no matrix view: it takes the elementwise (diagonal) path.

Blocks of equal shape from every parameter of a param group are stacked into one ``(n, rows, cols)`` tensor per
shape (a :class:`BlockBucket`), so one batched ``bmm`` / ``eigh`` serves them all. The per-parameter optimizer
state holds, for each block key, a list with one tensor per block of the parameter; while a bucket is in use
those tensors are views of its stacked tensors, and a bucket is rebuilt from them (one copy) when it is created.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

BlockSlices = tuple[slice, slice]


def merge_small_dims(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """Drop size-1 dimensions, then merge neighbours from the left while their product is ``<= max_dim``.

    ``(64, 3, 3, 3)`` with 1024 gives ``(576, 3)``; ``(1, 1)`` gives ``(1,)``. A tensor of order >= 2 (after
    dropping size-1 dimensions) stays of order >= 2: ``(16, 32)`` stays ``(16, 32)``, since a vector would lose
    its Kronecker-factored preconditioner to the diagonal path.
    """
    squeezed = [size for size in shape if size != 1] or [1]
    merged = [squeezed[0]]
    for size in squeezed[1:]:
        if merged[-1] * size <= max_dim:
            merged[-1] *= size
        else:
            merged.append(size)
    if len(merged) == 1 and len(squeezed) > 1:
        return math.prod(squeezed[:-1]), squeezed[-1]
    return tuple(merged)


def matrix_shape(shape: tuple[int, ...], max_dim: int) -> tuple[int, int] | None:
    """The ``(rows, cols)`` matrix a parameter of ``shape`` is preconditioned as, or None for the diagonal path."""
    merged = merge_small_dims(tuple(shape), max_dim)
    if len(merged) == 1:
        return None
    return merged[0], math.prod(merged[1:])


def block_slices(rows: int, cols: int, max_dim: int) -> list[BlockSlices]:
    """Row-major ``(row slice, column slice)`` of the blocks of a ``rows x cols`` matrix, each at most
    ``max_dim x max_dim`` (the last block of a dimension holds the remainder)."""
    return [
        (slice(r, min(r + max_dim, rows)), slice(c, min(c + max_dim, cols)))
        for r in range(0, rows, max_dim)
        for c in range(0, cols, max_dim)
    ]


def block_views(matrix: Tensor, max_dim: int) -> list[Tensor]:
    """The blocks of ``matrix`` (2-D) in :func:`block_slices`' order, as views: one ``split`` per dimension that
    is cut (a step takes the blocks of every gradient, and each view operation costs host time)."""
    rows, cols = matrix.shape
    row_blocks = matrix.split(max_dim, 0) if rows > max_dim else (matrix,)
    if cols <= max_dim:
        return list(row_blocks)
    return [block for row_block in row_blocks for block in row_block.split(max_dim, 1)]


def block_shape(slices: BlockSlices) -> tuple[int, int]:
    rows, cols = slices
    return rows.stop - rows.start, cols.stop - cols.start


class BlockBucket:
    """Every block of one shape (and one step count) of a param group, stacked along a leading dimension.

    ``entries`` lists ``(param, its matrix shape, block index within the param, block slices)``; ``stacks[key]``
    is the ``(n, ...)`` tensor whose ``i``-th entry is the state ``key`` of block ``entries[i]``. Building a bucket
    copies the per-parameter block tensors into the stacks once and makes the per-parameter lists views of them,
    so the state dict always shows the live values and a bucket can be rebuilt from it (after loading, or when
    the set of parameters with gradients changes).
    """

    def __init__(
        self,
        group_index: int,
        step: int,
        shape: tuple[int, int],
        entries: list[tuple[Tensor, tuple[int, int], int, BlockSlices]],
        state: dict[Tensor, dict],
        keys: tuple[str, ...],
        max_dim: int,
    ) -> None:
        self.group_index = group_index
        self.step = step
        self.shape = shape
        self.entries = entries
        self.max_dim = max_dim
        self.stacks: dict[str, Tensor] = {}
        for key in keys:
            stack = torch.stack([state[param][key][index] for param, _, index, _ in entries])
            for i, (param, _, index, _) in enumerate(entries):
                state[param][key][index] = stack[i]
            self.stacks[key] = stack
        #: Views of the parameters' blocks, through which the update is written (the parameters' storage is fixed).
        blocks: dict[Tensor, list[Tensor]] = {}
        for param, matrix, _, _ in entries:
            if param not in blocks:
                blocks[param] = block_views(param.view(matrix), max_dim)
        self.param_blocks = [blocks[param][index] for param, _, index, _ in entries]
        #: Which blocks are contiguous views (whole rows of their parameter): a multi-tensor kernel writes them all
        #: at once; the others (column blocks) take a kernel each.
        self._dense, self._strided = _split_by_contiguity(self.param_blocks)
        first = entries[0][0]
        self.math_dtype = torch.float32 if first.dtype in (torch.float16, torch.bfloat16) else first.dtype
        self._gathered = torch.empty((len(entries), *shape), dtype=self.math_dtype, device=first.device)
        self._gathered_blocks = self._gathered.unbind(0)
        #: A CUDA event recorded on another stream after its last read of the gathered gradients (see
        #: :meth:`gather_grads`), or None.
        self.gathered_read: Any = None

    def __len__(self) -> int:
        return len(self.entries)

    def gather_grads(self, grad_blocks: dict[Tensor, list[Tensor]]) -> Tensor:
        """The gradient of every block, copied into the persistent ``(n, rows, cols)`` buffer in the math dtype:
        one multi-tensor copy for the blocks whose gradient views are contiguous, one for the others (gradients
        may be laid out unlike their parameters, so this split is taken per call). ``grad_blocks`` caches each
        parameter's gradient blocks across the buckets of a step. Where another stream still reads the last
        gradients (``gathered_read``), the current stream waits for it first."""
        if self.gathered_read is not None:
            torch.cuda.current_stream(self._gathered.device).wait_event(self.gathered_read)
            self.gathered_read = None
        views = []
        for param, matrix, index, _ in self.entries:
            blocks = grad_blocks.get(param)
            if blocks is None:
                grad = param.grad
                blocks = grad_blocks[param] = block_views(grad if grad.shape == matrix else grad.reshape(matrix),
                                                          self.max_dim)
            views.append(blocks[index])
        for indices in _split_by_contiguity(views):
            if indices:
                torch._foreach_copy_([self._gathered_blocks[i] for i in indices], [views[i] for i in indices])
        return self._gathered

    def add_to_params(self, updates: Tensor, alpha: float) -> None:
        """``block_i += alpha * updates[i]`` for every parameter block: one multi-tensor call for the contiguous
        blocks, one for the others (torch runs a list of strided tensors, or of parameters of another dtype than
        the updates, one kernel per tensor)."""
        rows = updates.unbind(0)
        for indices in (self._dense, self._strided):
            if indices:
                torch._foreach_add_([self.param_blocks[i] for i in indices], [rows[i] for i in indices], alpha=alpha)


def _split_by_contiguity(tensors: list[Tensor]) -> tuple[list[int], list[int]]:
    """The indices of the contiguous tensors (a multi-tensor kernel takes them all) and of the others."""
    dense: list[int] = []
    strided: list[int] = []
    for i, tensor in enumerate(tensors):
        (dense if tensor.is_contiguous() else strided).append(i)
    return dense, strided
