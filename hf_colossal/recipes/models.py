"""Small models that recipes build from config (no download): a BatchNorm CNN for square grey-scale images."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x2, max-pool, Conv-BN-ReLU, global average pool, linear head.

    Takes ``pixel_values`` as flat rows (batch, image_size**2) or images (batch, 1, H, W), returns
    ``{"loss", "logits"}`` the way Trainer expects. BatchNorm layers make it a model for ghost batch norm.
    """

    def __init__(self, image_size: int = 8, channels: int = 32, num_labels: int = 10) -> None:
        super().__init__()
        self.image_size = image_size

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(1, channels), block(channels, channels), nn.MaxPool2d(2),
                                      block(channels, 2 * channels))
        self.head = nn.Linear(2 * channels, num_labels)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        images = pixel_values.view(-1, 1, self.image_size, self.image_size)
        logits = self.head(self.features(images).mean(dim=(2, 3)))
        output = {"logits": logits}
        if labels is not None:
            output["loss"] = F.cross_entropy(logits, labels)
        return output


#: Models a recipe can name in ``model.from_config.model_type`` for task image_classification.
IMAGE_MODELS = {"small_cnn": SmallCNN}
