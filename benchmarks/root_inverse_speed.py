"""GPU time of the preconditioner kernels of Shampoo / SOAP / K-FAC on stacks of 1024 x 1024 factors.

    python benchmarks/root_inverse_speed.py [--batch 54] [--dim 1024]

54 factors is what a 271M Llama due at every step of Shampoo with precondition_frequency=10 (staggered). Each row:
ms for the whole stack (CUDA events, median of 3 after a warm-up) and ms per matrix. Factors are sums of G G^T of
random gradients with a decaying spectrum, as a run accumulates them.
"""

import argparse
import json

import torch

from hf_colossal.optim._precision import fp32_matmul_precision
from hf_colossal.optim.kfac import damped_inverses
from hf_colossal.optim.shampoo import inverse_root, newton_inverse_root, refresh_eigenbasis


def timed(fn, repeats=3):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=54)
    parser.add_argument("--dim", type=int, default=1024)
    ns = parser.parse_args()
    b, n = ns.batch, ns.dim
    torch.manual_seed(0)
    scale = torch.logspace(0, -3, n, device="cuda")
    factors = torch.zeros(b, n, n, device="cuda")
    for _ in range(4):
        g = torch.randn(b, n, n, device="cuda") * scale[:, None]
        factors += g @ g.mT
    reference, _ = inverse_root(factors.double(), root=4, eps=1e-12)
    rows = []

    def row(name, fn, check=None):
        ms = timed(fn)
        entry = {"name": name, "ms": round(ms, 2), "ms_per_matrix": round(ms / b, 3)}
        if check is not None:
            out = check()
            entry["rel_err_vs_fp64_eigh"] = float(
                (torch.linalg.matrix_norm(out.double() - reference) / torch.linalg.matrix_norm(reference)).max())
        rows.append(entry)
        print(json.dumps(entry), flush=True)

    with fp32_matmul_precision("ieee"):
        row("eigh_fp32_cusolver(default)", lambda: torch.linalg.eigh(factors))
        row("inverse_root_eigh_fp32", lambda: inverse_root(factors, root=4, eps=1e-12),
            lambda: inverse_root(factors, root=4, eps=1e-12)[0])
        for iterations in (15, 20):
            row(f"newton_fp32_{iterations}it", lambda: newton_inverse_root(factors, root=4, eps=1e-12,
                                                                             iterations=iterations),
                lambda: newton_inverse_root(factors, root=4, eps=1e-12, iterations=iterations)[0])
        row("newton_fp64_20it", lambda: newton_inverse_root(factors.double(), root=4, eps=1e-12),
            lambda: newton_inverse_root(factors.double(), root=4, eps=1e-12)[0])
        bases = torch.linalg.eigh(factors)[1].flip(-1)
        row("soap_refresh_qr(matmul+argsort+qr)", lambda: refresh_eigenbasis(factors, bases))
        row("qr_only", lambda: torch.linalg.qr(factors))
        row("kfac_cholesky_inverse", lambda: damped_inverses(factors, torch.full((b,), 1e-3, device="cuda")))
        row("bmm_fp32_x10", lambda: [torch.bmm(factors, factors) for _ in range(10)])
    with fp32_matmul_precision("tf32"):
        row("newton_tf32_20it(not used)", lambda: newton_inverse_root(factors, root=4, eps=1e-12),
            lambda: newton_inverse_root(factors, root=4, eps=1e-12)[0])
        row("bmm_tf32_x10", lambda: [torch.bmm(factors, factors) for _ in range(10)])
    row("bmm_bf16_x10", lambda: [torch.bmm(factors.bfloat16(), factors.bfloat16()) for _ in range(10)])
    try:
        torch.backends.cuda.preferred_linalg_library("magma")
        row("eigh_fp32_magma", lambda: torch.linalg.eigh(factors))
        row("qr_magma", lambda: torch.linalg.qr(factors))
    except RuntimeError as err:
        print("magma:", err)
    finally:
        torch.backends.cuda.preferred_linalg_library("default")


if __name__ == "__main__":
    main()
