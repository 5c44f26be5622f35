"""A tiny seeded CNN built from a config (transformers ResNet, so it saves and loads like any artifact)."""

import torch
from transformers import ResNetConfig, ResNetForImageClassification


def tiny_cnn(seed: int = 0) -> ResNetForImageClassification:
    """ResNet with two basic stages (8 and 16 channels), 10 classes, eval mode, weights seeded."""
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="basic", num_labels=10)
    torch.manual_seed(seed)
    return ResNetForImageClassification(config).eval()


def images(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}
