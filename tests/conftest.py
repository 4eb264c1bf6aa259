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


def write_png16(path, a):
    """Write a 16-bit PNG by hand (Pillow cannot write 16-bit RGB)."""
    import struct
    import zlib

    h, w = a.shape[:2]
    c = 1 if a.ndim == 2 else a.shape[2]
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
