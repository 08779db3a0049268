"""Martens' deep autoencoder (Hinton & Salakhutdinov 2006; Martens 2010 Sec. 5), sized for 8x8 digits.

Logistic hidden units, a linear code layer, logistic outputs trained with binary cross-entropy against the input
pixels (in [0, 1]); Martens' sparse initialisation (Sec. 5: each unit gets ``sparse_inputs`` non-zero incoming
weights drawn from N(0, 1), biases 0). ``forward(pixel_values, labels=None)`` returns ``{"logits", "loss"}`` so
the transformers Trainer can train it; ``hessian_free_loss`` tells ``optim="hessian_free"`` the loss's form.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["DeepAutoencoder", "sparse_init_"]


def sparse_init_(linear: nn.Linear, inputs: int = 15, generator: torch.Generator | None = None) -> None:
    """Martens 2010 Sec. 5: ``inputs`` non-zero N(0, 1) weights per unit (all of them when fewer), zero bias."""
    with torch.no_grad():
        out_features, in_features = linear.weight.shape
        weight = torch.zeros(out_features, in_features)
        k = min(inputs, in_features)
        for row in range(out_features):
            columns = torch.randperm(in_features, generator=generator)[:k]
            weight[row, columns] = torch.randn(k, generator=generator)
        linear.weight.copy_(weight)
        if linear.bias is not None:
            linear.bias.zero_()


class DeepAutoencoder(nn.Module):
    """``sizes`` e.g. ``(64, 256, 128, 32, 128, 256, 64)``: logistic hidden layers, linear code layer (the middle
    size), outputs as logits of a sigmoid-BCE reconstruction loss (mean over pixels and examples)."""

    hessian_free_loss = "sigmoid_bce"

    def __init__(self, sizes: tuple[int, ...] = (64, 256, 128, 32, 128, 256, 64), *, init: str = "sparse",
                 seed: int = 0) -> None:
        super().__init__()
        if len(sizes) % 2 == 0 or sizes[0] != sizes[-1]:
            raise ValueError("sizes must be symmetric around a code layer, e.g. (64, 256, 32, 256, 64)")
        self.sizes = tuple(sizes)
        self.code_index = len(sizes) // 2 - 1  # the layer producing the code has a linear output
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        if init == "sparse":
            generator = torch.Generator().manual_seed(seed)
            for layer in self.layers:
                sparse_init_(layer, generator=generator)
        elif init != "default":
            raise ValueError("init must be 'sparse' (Martens 2010) or 'default' (torch's)")

    def reconstruct_logits(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index != self.code_index and index != len(self.layers) - 1:
                x = torch.sigmoid(x)
        return x

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        logits = self.reconstruct_logits(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.binary_cross_entropy_with_logits(logits, labels)
        return out

    @staticmethod
    def squared_error(logits: Tensor, pixels: Tensor) -> Tensor:
        """Martens' reported reconstruction error: squared error per example, summed over pixels, averaged."""
        return (torch.sigmoid(logits) - pixels).square().sum(dim=1).mean()
