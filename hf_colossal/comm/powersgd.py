"""PowerSGD: rank-r gradient compression by one warm-started power iteration, with error feedback.

Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed Optimization",
NeurIPS 2019 (arXiv:1905.13727), Algorithms 1 (compressor) and 2 (error feedback). Per worker w and per gradient
matrix (a tensor of shape ``(n, ...)`` viewed as ``n x m``)::

    M_w = G_w + e_w                          # error feedback (e in fp32, unscaled units)
    P_w = M_w Q                             # Q: previous step's Q (warm start), identical on all ranks
    P   = orthogonalize(mean_w P_w)         # all-reduce #1, then Gram-Schmidt on the columns
    Q_w = M_w^T P
    e_w = M_w - P Q_w^T                      # local decompression of the local compression (Alg. 2, line 6)
    Q   = mean_w Q_w                        # all-reduce #2
    out = P Q^T                              # = mean_w P Q_w^T, the average of the decompressed messages

Tensors with one dimension (biases, norms) and matrices too small to gain (``n*m <= (n+m)*r``) are all-reduced
uncompressed in the first all-reduce. Matrices of equal shape are stacked and processed with batched matmuls.
Bytes per step: ``sum (n+m)*r`` floats instead of ``sum n*m``.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ._common import (ByteCounter, ErrorFeedbackCompressor, Future, all_reduce_sum, completed_future,
                      used_on_current_stream)


def orthogonalize(P: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Gram-Schmidt on the columns of a batch of matrices ``(B, n, r)``, in place; returns ``P``."""
    r = P.shape[-1]
    for i in range(r):
        col = P[..., i : i + 1]
        col.div_(col.norm(dim=-2, keepdim=True).add_(eps))
        if i + 1 < r:
            rest = P[..., i + 1 :]
            rest.sub_(col * (col * rest).sum(dim=-2, keepdim=True))
    return P


def matrix_shape(shape: torch.Size) -> tuple[int, int]:
    n = shape[0] if len(shape) else 1
    return n, (int(torch.Size(shape).numel()) // n if n else 0)


def compressible(shape: torch.Size, rank: int) -> bool:
    if len(shape) < 2:
        return False
    n, m = matrix_shape(shape)
    return n * m > (n + m) * rank


def initial_q(m: int, rank: int, seed: int, key: int, device: torch.device) -> torch.Tensor:
    """The same random start on every rank (seeded CPU generator), then moved to the device."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + key)
    return torch.randn(m, rank, generator=generator).to(device)


class PowerSGD(ErrorFeedbackCompressor):
    """State (warm-start Q per parameter: shared; error feedback per parameter: per rank) and the bucket step."""

    def __init__(self, rank: int, seed: int, error_feedback: bool = True) -> None:
        super().__init__(error_feedback)
        self.rank = rank
        self.seed = seed
        self.q: dict[int, torch.Tensor] = {}

    def _q(self, key: int, m: int, device: torch.device) -> torch.Tensor:
        q = self.q.get(key)
        if q is None or q.shape != (m, self.rank):
            q = self.q[key] = initial_q(m, self.rank, self.seed, key, device)
        return q

    def run(self, buffer: torch.Tensor, keys: list[int], params: list[torch.Tensor], group, world_size: int,
            counter: ByteCounter, scale_fn=None) -> Future:
        device = buffer.device
        scale, M = self.compensated(buffer, keys, params, scale_fn)
        # partition the bucket: compressed matrices grouped by shape, the rest flat
        groups: dict[tuple[int, int], list[tuple[int, int, int]]] = defaultdict(list)  # shape -> (key, offset, n)
        plain: list[tuple[int, int]] = []  # (offset, numel)
        offset = 0
        for key, param in zip(keys, params):
            numel = param.numel()
            if compressible(param.shape, self.rank):
                groups[matrix_shape(param.shape)].append((key, offset, numel))
            else:
                plain.append((offset, numel))
            offset += numel
        stacks = {}
        for shape, members in groups.items():
            mats = torch.stack([M[o : o + n].view(shape) for _, o, n in members])  # (B, n, m)
            qs = torch.stack([self._q(k, shape[1], device) for k, _, _ in members])  # (B, m, r)
            stacks[shape] = (mats, qs, torch.bmm(mats, qs))
        plain_flat = torch.cat([M[o : o + n] for o, n in plain]) if plain else M.new_zeros(0)
        payload1 = torch.cat([plain_flat] + [s[2].reshape(-1) for s in stacks.values()])

        def after_p(fut: Future) -> Future:
            # the stacked matrices were made on the hook's stream and are read here and in finish (on CUDA: on the
            # callback's stream, while the hook's stream goes on): keep their memory until these reads are done
            used_on_current_stream(scale, *(s[0] for s in stacks.values()))
            summed = fut.value().div_(world_size)
            plain_mean = summed[: plain_flat.numel()]
            pos = plain_flat.numel()
            q_parts, local = [], {}
            for shape, (mats, _qs, p) in stacks.items():
                p_mean = summed[pos : pos + p.numel()].view_as(p)
                pos += p.numel()
                p_hat = orthogonalize(p_mean.clone())
                q_local = torch.bmm(mats.transpose(1, 2), p_hat)  # (B, m, r)
                local[shape] = (p_hat, q_local)
                q_parts.append(q_local.reshape(-1))
            payload2 = torch.cat(q_parts) if q_parts else M.new_zeros(0)
            return plain_mean, local, payload2

        def finish(plain_mean, local, q_sum):
            q_mean = q_sum.div_(world_size)
            out = torch.empty_like(M)
            for (o, n), start in zip(plain, _running(plain)):
                out[o : o + n] = plain_mean[start : start + n]
            finite = torch.isfinite(plain_mean).all() & torch.isfinite(q_mean).all()
            error = torch.zeros_like(M) if self.error_feedback else None
            pos = 0
            for shape, members in groups.items():
                p_hat, q_local = local[shape]
                qm = q_mean[pos : pos + q_local.numel()].view_as(q_local)
                pos += q_local.numel()
                approx = torch.bmm(p_hat, qm.transpose(1, 2))  # (B, n, m)
                mats = stacks[shape][0]
                if error is not None:
                    local_err = mats - torch.bmm(p_hat, q_local.transpose(1, 2))
                for i, (key, o, n) in enumerate(members):
                    out[o : o + n] = approx[i].reshape(-1)
                    if error is not None:
                        error[o : o + n] = local_err[i].reshape(-1)
                    old = self.q[key]
                    old.copy_(torch.where(finite, qm[i], old))  # a NaN never becomes the next warm start
            if error is not None:
                self.store_error(keys, error, scale, finite)
            buffer.copy_(out)
            return buffer

        fut1 = all_reduce_sum(payload1, group, counter)
        if buffer.device.type == "cpu":
            # gloo runs future callbacks on its worker threads: a collective issued there can interleave with one
            # the main thread issues meanwhile (Trainer gathers between steps) and mismatch across ranks. On CPU
            # both all-reduces are issued from the hook's own thread; on CUDA/NCCL the chain stays asynchronous,
            # which keeps the overlap with backward: its callbacks run on a pool stream (see after_p; torch's
            # powerSGD_hook instead ends each bucket with torch.cuda.synchronize()).
            plain_mean, local, payload2 = (fut1.wait(), after_p(fut1))[1]
            q_sum = all_reduce_sum(payload2, group, counter).wait() if payload2.numel() else payload2
            return completed_future(finish(plain_mean, local, q_sum))

        def stage2(fut: Future) -> torch.Tensor:
            plain_mean, local, payload2 = after_p(fut)
            if payload2.numel():
                q_sum = all_reduce_sum(payload2, group, counter).wait()
            else:
                q_sum = payload2
            return finish(plain_mean, local, q_sum)

        return fut1.then(stage2)

    def state_dict(self) -> dict:
        return {"q": {k: v.detach().cpu().clone() for k, v in self.q.items()}}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.q = {int(k): v.to(device).clone() for k, v in state.get("q", {}).items()}


def _running(spans: list[tuple[int, int]]) -> list[int]:
    starts, total = [], 0
    for _, n in spans:
        starts.append(total)
        total += n
    return starts
