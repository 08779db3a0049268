"""GPU time and accuracy of the preconditioner kernels of Shampoo / SOAP / K-FAC on stacks of 1024 x 1024 factors.

    python benchmarks/root_inverse_speed.py [--batch 27] [--dim 1024] [--periods 6]
    python benchmarks/root_inverse_speed.py --device cpu --batch 2 --dim 64    # CPU smoke run

27 factors is what the 97.5M Llama of second_order_quality.py has due at every step of Shampoo with
precondition_frequency=10 (staggered); the 271M Llama of optimizer_step.py has 54. Timing rows: ms for the whole
stack (CUDA events, median of 3 after a warm-up). Factors are sums of G G^T of gradients with a decaying spectrum
(1 to 1e-3) in a random basis, as a run accumulates them.

Accuracy rows: Shampoo's ``root_inverse="qr"`` tracks a stream of factors, one refresh per period of 10
accumulated G G^T, the basis starting from an exact eigendecomposition (as at the first preconditioned step); each
row gives, per period, the largest relative error of the preconditioned direction ``R G`` against the float64
eigendecomposition root with the same ridge, and of 20-iteration Newton for comparison. ``drift`` rotates the
gradients' basis a little more every period (0: a stationary basis).
"""

import argparse
import json
import math
import time

import torch

from hf_colossal.optim._precision import fp32_matmul_precision
from hf_colossal.optim.kfac import damped_inverses
from hf_colossal.optim.shampoo import (
    cholesky_qr, inverse_root, newton_inverse_root, qr_inverse_root, refresh_eigenbasis, root_from_eigenpairs)


DEVICE = "cuda"


def timed(fn, repeats=3):
    """Median ms of ``repeats`` calls after a warm-up (CUDA events on the GPU, the wall clock on the CPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if DEVICE == "cpu":
            started = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - started))
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def factor_stream(batch, dim, periods, drift, generator):
    """``periods`` increments (sums of 10 G G^T each) of factors whose gradients live in a slowly rotating basis."""
    scale = torch.logspace(0, -3, dim, device=DEVICE)
    basis = torch.linalg.qr(torch.randn(batch, dim, dim, device=DEVICE, generator=generator))[0]
    for period in range(periods):
        noise = torch.randn(batch, dim, dim, device=DEVICE, generator=generator) / math.sqrt(dim)
        rotated = torch.linalg.qr(basis + drift * period * noise)[0] if drift else basis
        increment = torch.zeros(batch, dim, dim, device=DEVICE)
        for _ in range(10):
            grads = rotated @ (torch.randn(batch, dim, dim, device=DEVICE, generator=generator) * scale[:, None])
            increment += grads @ grads.mT
        yield increment


def exact_root(factors):
    """float64 eigendecomposition root with the ridge of the Newton and QR paths (max(1e-12, 1e-6 ||A||_F))."""
    factors = factors.double()
    return root_from_eigenpairs(factors, *torch.linalg.eigh(factors), root=4, eps=1e-12)


def direction_error(roots, reference, generator):
    grads = torch.randn(reference.shape, device=DEVICE, dtype=torch.float64, generator=generator)
    ours, exact = (roots.double() @ grads).flatten(1), (reference @ grads).flatten(1)
    return float(((ours - exact).norm(dim=1) / exact.norm(dim=1)).max())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=27)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--periods", type=int, default=6)
    parser.add_argument("--device", default="cuda")
    ns = parser.parse_args()
    global DEVICE
    DEVICE = ns.device
    b, n = ns.batch, ns.dim
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    factors = next(factor_stream(b, n, 1, 0.0, generator))
    bases = torch.linalg.eigh(factors)[1].flip(-1).contiguous()
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(json.dumps({"device": name, "torch": torch.__version__, "batch": b, "dim": n}))

    def row(name, fn):
        ms = timed(fn)
        print(json.dumps({"name": name, "ms": round(ms, 2), "ms_per_matrix": round(ms / b, 3)}), flush=True)

    with fp32_matmul_precision("ieee"):
        row("eigh_fp32", lambda: torch.linalg.eigh(factors))
        row("shampoo_root_eigh", lambda: inverse_root(factors, root=4, eps=1e-12))
        row("shampoo_root_newton_20it", lambda: newton_inverse_root(factors, root=4, eps=1e-12))
        row("shampoo_root_qr (default)", lambda: qr_inverse_root(factors, bases, root=4, eps=1e-12))
        row("soap_refresh_eigenbasis", lambda: refresh_eigenbasis(factors, bases))
        row("cholesky_qr_fp64", lambda: cholesky_qr(factors))
        row("householder_qr_fp32", lambda: torch.linalg.qr(factors))
        row("kfac_cholesky_inverse", lambda: damped_inverses(factors, torch.full((b,), 1e-3, device=DEVICE)))
        row("bmm_fp32", lambda: torch.bmm(factors, factors))
    with fp32_matmul_precision("tf32"):
        row("bmm_tf32", lambda: torch.bmm(factors, factors))
    row("bmm_bf16", lambda: torch.bmm(factors.bfloat16(), factors.bfloat16()))
    row("bmm_fp64", lambda: torch.bmm(factors.double(), factors.double()))

    for drift in (0.0, 0.5):
        accumulated = torch.zeros(b, n, n, device=DEVICE)
        qr_errors, newton_errors = [], []
        for period, increment in enumerate(factor_stream(b, n, ns.periods + 1, drift, generator)):
            accumulated += increment
            if period == 0:
                bases = torch.linalg.eigh(accumulated)[1]
                continue
            reference = exact_root(accumulated)
            with fp32_matmul_precision("ieee"):
                roots, bases, ok = qr_inverse_root(accumulated, bases, root=4, eps=1e-12)
                newton, _ = newton_inverse_root(accumulated, root=4, eps=1e-12)
            qr_errors.append(round(direction_error(roots, reference, generator), 4) if ok.all() else None)
            newton_errors.append(round(direction_error(newton, reference, generator), 6))
        print(json.dumps({"accuracy": "direction error per period", "drift": drift, "qr": qr_errors,
                          "newton_20it": newton_errors}), flush=True)


if __name__ == "__main__":
    main()
