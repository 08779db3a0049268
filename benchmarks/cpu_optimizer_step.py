"""Optimizer-step cost on the CPU: LAMB / LARS against torch AdamW / SGD (foreach) and pytorch-optimizer.

Parameters and gradients of a BERT-base-shaped model (110M parameters, fp32) with fixed random gradients;
only `optimizer.step()` is timed (median of 7 after 2 warm-up steps), all optimizers in one process, one after
another, with the thread count fixed.

    python benchmarks/cpu_optimizer_step.py [--threads 2]
"""

import argparse
import statistics
import time

import torch

import hf_colossal


def builders():
    import pytorch_optimizer as po

    return {
        "adamw_foreach": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.01, foreach=True),
        "adamw_fused": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.01, fused=True),
        "lamb": lambda m: hf_colossal.build_optimizer("lamb", m, lr=1e-4, weight_decay=0.01),
        "po_lamb": lambda m: po.Lamb(m.parameters(), lr=1e-4, weight_decay=0.01),
        "sgd_foreach": lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4,
                                                 foreach=True),
        "lars": lambda m: hf_colossal.build_optimizer("lars", m, lr=1e-3, weight_decay=1e-4),
        "po_lars": lambda m: po.LARS(m.parameters(), lr=1e-3, weight_decay=1e-4),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig())
    n_params = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"torch {torch.__version__}, {ns.threads} threads, {n_params / 1e6:.1f}M params")
    times = {}
    for name, build in builders().items():
        model.load_state_dict(initial)
        optimizer = build(model)
        samples = []
        for i in range(9):
            start = time.perf_counter()
            optimizer.step()
            if i >= 2:
                samples.append(time.perf_counter() - start)
        times[name] = statistics.median(samples) * 1e3
        del optimizer
    print("\n| optimizer | step ms (median) | vs AdamW foreach | vs SGD foreach |")
    print("|---|---|---|---|")
    for name, ms in times.items():
        print(f"| {name} | {ms:.1f} | {ms / times['adamw_foreach']:.2f} | {ms / times['sgd_foreach']:.2f} |")


if __name__ == "__main__":
    main()
