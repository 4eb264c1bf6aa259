"""Shared fixtures: tiny seeded models and inputs (fast on 2 CPU cores, no network)."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch
from torch import nn


def make_tiny_convnet(seed: int = 0) -> nn.Module:
    """conv(3->8, k3, p1) -> ReLU -> maxpool 2 -> conv(8->16, k3, p1) -> ReLU -> maxpool 2 -> linear head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    ).eval()


@pytest.fixture
def tiny_convnet():
    """Fresh tiny conv net (expects 3x16x16 input)."""
    return make_tiny_convnet(0)


@pytest.fixture
def tiny_images():
    """A seeded batch of 4 normalised 3x16x16 images."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 16, 16, generator=g)
