"""CUDA graphs for the batched preconditioner recomputations of Shampoo-type optimizers.

A recomputation batch (:meth:`~hf_colossal.optim.shampoo._KroneckerOptimizer._recompute`) launches a few hundred
small kernels: a batched Cholesky factorisation and triangular solve loop over the matrices inside cuSOLVER and
cuBLAS. On one H200 the host spends about 2.5 ms launching a batch of 1024 x 1024 factors, eager, and 0.4 ms
replaying the same work as one CUDA graph (measured for 3 to 50 factors, results bitwise equal): in a training
step that the host paces (a model whose forward and backward leave the GPU idle part of the time) that is time
off every step.

A batch is a pure function of stacked inputs, so one graph per kind of batch serves every step: the inputs are
copied into the graph's static input stacks and the graph replayed. Batches of one kind differ in their number of
rows (staggered recomputations take different blocks at each step), so the static stacks hold the largest batch
seen. Rows past a smaller batch keep what they held: identity matrices (a valid input of every recomputation
here: a positive-definite factor, an orthonormal basis) or an earlier batch's inputs. Each matrix's result depends
on its own inputs only, and those rows' results are left unread. The graph of a kind is captured at its second
batch (the first runs eagerly: it initialises the libraries the capture calls into) and captured again when a
larger batch comes.
"""

from __future__ import annotations

import gc
import warnings
from typing import Callable

import torch
from torch import Tensor

#: ``function(key, stacked inputs) -> stacked results``: one recomputation kind, pure (no host synchronisation).
BatchFunction = Callable[[tuple, tuple[Tensor, ...]], tuple[Tensor, ...]]


def stacked(pieces: list[Tensor]) -> Tensor:
    """The pieces of one input, concatenated along the batch dimension (no copy for a single piece)."""
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


class BatchGraph:
    """``function(key, ·)`` captured for stacked inputs of at most ``capacity`` rows, each input of the shapes
    and dtypes of ``layout``'s ``(shape of one row, dtype)``."""

    def __init__(self, function: BatchFunction, key: tuple, layout: tuple, capacity: int,
                 capture_stream: torch.cuda.Stream) -> None:
        device = capture_stream.device
        self.capacity = capacity
        self.inputs = tuple(_identities(capacity, shape, dtype, device) for shape, dtype in layout)
        self.graph = torch.cuda.CUDAGraph()
        # Python's garbage collector stays off during the capture: a collection there could destroy another CUDA
        # graph (of an optimizer left in a reference cycle), which invalidates the capture. torch.cuda.graph runs
        # a full collection before it begins. thread_local: a CUDA call from another thread (a data loader
        # pinning memory) does not break the capture either. A failed capture raises from torch.cuda.graph's exit
        # before it switches back from the capture stream, so the caller's stream is restored here.
        collecting, previous = gc.isenabled(), torch.cuda.current_stream(device)
        gc.disable()
        try:
            with torch.cuda.device(device), torch.cuda.graph(self.graph, stream=capture_stream,
                                                             capture_error_mode="thread_local"):
                self.outputs = function(key, self.inputs)
        finally:
            torch.cuda.set_stream(previous)
            if collecting:
                gc.enable()

    def __call__(self, pieces: list[list[Tensor]], rows: int) -> tuple[Tensor, ...]:
        """Copy each input's pieces into the static inputs (one multi-tensor copy), replay on the current stream,
        and return views of the first ``rows`` rows of the results (valid until the next replay)."""
        targets, sources = [], []
        for static, input_pieces in zip(self.inputs, pieces):
            offset = 0
            for piece in input_pieces:
                targets.append(static[offset:offset + piece.shape[0]])
                sources.append(piece)
                offset += piece.shape[0]
        torch._foreach_copy_(targets, sources)
        self.graph.replay()
        return tuple(output[:rows] for output in self.outputs)


def _identities(rows: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``rows`` identity matrices of ``shape`` (square): a static input before its first replay."""
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"a graphed recomputation takes stacks of square matrices, got rows of shape {shape}")
    return torch.eye(shape[0], dtype=dtype, device=device).expand(rows, *shape).contiguous()


class RecomputeGraphs:
    """The CUDA graphs of one optimizer's recomputation batches, one per kind: ``(key, each input's row shape,
    dtype, device)``. ``captures`` and ``replays`` count what it did. A kind whose capture fails (CUDA refuses an
    operation of it during capture) runs eagerly from then on, with a warning: the run goes on unchanged."""

    def __init__(self) -> None:
        self._graphs: dict[tuple, BatchGraph] = {}
        self._seen: set[tuple] = set()
        self._eager: set[tuple] = set()
        self._capture_streams: dict[torch.device, torch.cuda.Stream] = {}  # one per device
        self.captures = 0
        self.replays = 0

    def __call__(self, function: BatchFunction, key: tuple, pieces: list[list[Tensor]]) -> tuple[Tensor, ...]:
        """``function(key, inputs)`` for the inputs whose pieces (per input, along the batch dimension) are given,
        by graph replay where this kind ran before. Every input is a CUDA stack of square matrices."""
        first = [input_pieces[0] for input_pieces in pieces]
        layout = tuple((tuple(t.shape[1:]), t.dtype) for t in first)
        device = first[0].device
        kind = (key, layout, device)
        rows = sum(piece.shape[0] for piece in pieces[0])
        graph = self._graphs.get(kind)
        if graph is None or rows > graph.capacity:
            graph = self._capture(function, kind, rows)
        if graph is None:
            return function(key, tuple(stacked(input_pieces) for input_pieces in pieces))
        self.replays += 1
        return graph(pieces, rows)

    def _capture(self, function: BatchFunction, kind: tuple, rows: int) -> BatchGraph | None:
        """A graph of ``kind`` for ``rows`` rows, replacing a smaller one; None where the batch runs eagerly (the
        kind's first batch, an empty batch (a data-parallel rank's empty share), or a kind whose capture
        failed)."""
        if rows == 0:
            return None
        if kind not in self._seen or kind in self._eager:
            self._seen.add(kind)
            return None
        key, layout, device = kind
        if kind in self._graphs:
            # The old graph's results may still be read by queued work; its memory is released below.
            torch.cuda.synchronize(device)
            del self._graphs[kind]
        if device not in self._capture_streams:
            self._capture_streams[device] = torch.cuda.Stream(device)
        try:
            graph = self._graphs[kind] = BatchGraph(function, key, layout, rows, self._capture_streams[device])
        except RuntimeError as error:  # torch.AcceleratorError is one
            self._eager.add(kind)
            warnings.warn(f"CUDA graph capture of the {key[0]!r} recomputations failed ({error}); they run "
                          "eagerly from now on (same results, more host time)", RuntimeWarning, stacklevel=4)
            return None
        self.captures += 1
        return graph
