"""ResNet-50 I3D as MMAction2's ``i3d_r50`` (``configs/_base_/models/i3d_r50.py``, ``ResNet3d`` in
``mmaction/models/backbones/resnet3d.py``), its 2D -> 3D weight inflation, and TSN's cross-modality init.

The network (research/extraction.md §3.2), with MMAction2's module names so its 3D checkpoints load after the
``backbone.`` prefix is stripped (``conv1.conv``, ``conv1.bn``, ``layer1.0.conv1.conv``, ``layer1.0.downsample.conv``):
- stem: conv (5, 7, 7), stride (2, 2, 2), padding (2, 3, 3); max-pool (1, 3, 3), stride (2, 2, 2), padding (0, 1, 1);
- bottlenecks in the "pytorch" style (the spatial stride on the 3x3 conv); an inflated block's conv1 is (3, 1, 1)
  ('3x1x1'), per block ``INFLATE = ((1,1,1), (1,0,1,0), (1,0,1,0,1,0), (0,1,0))``; temporal strides all 1;
- ``pool2``, a (2, 1, 1) max-pool after layer1, so time is downsampled by 2 * 2 * 2 = 8: a 32-frame clip gives
  layer4 maps [2048, 4, 7, 7] at 224 px. BatchNorm eps 1e-5 (PyTorch's default, as MMAction2's BN3d).

Inflation (``ResNet3d._inflate_weights``): each 2D kernel is repeated over the 3D kernel's time axis and divided
by its temporal size, ``w3d[:, :, t] = w2d / k_t``; BatchNorm parameters and statistics are copied. A video whose
frames are all equal therefore gives the 2D network's activations at every time step whose receptive field lies
inside the clip (the zero temporal padding at a clip's ends breaks the equality there). Deviation: MMAction2 logs
a 2D kernel of the wrong shape and leaves the 3D one at its random init; here that is an error naming the keys.

Cross-modality init (TSN, Wang et al. 2016 §3.2, ``models.py::_construct_flow_model``): a first convolution
taking C channels instead of RGB's 3 gets the mean of the RGB kernels over their input channels, repeated C
times; it serves the optical-flow networks (2 channels for I3D, 2 x L stacked for a 2D ResNet).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

INFLATE = ((1, 1, 1), (1, 0, 1, 0), (1, 0, 1, 0, 1, 0), (0, 1, 0))  # i3d_r50: which blocks get a (3, 1, 1) conv1
SPATIAL_STRIDES = (1, 2, 2, 2)
OUT_CHANNELS = 2048


class ConvBN3d(nn.Module):
    """MMAction2's ConvModule: Conv3d without bias, BatchNorm3d, ReLU unless ``relu=False``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int],
                 stride: tuple[int, int, int] = (1, 1, 1), padding: tuple[int, int, int] = (0, 0, 0),
                 relu: bool = True):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm3d(out_channels)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return torch.relu(x) if self.relu else x


class Bottleneck3d(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, spatial_stride: int, inflate: bool):
        super().__init__()
        kernel, padding = ((3, 1, 1), (1, 0, 0)) if inflate else ((1, 1, 1), (0, 0, 0))
        self.conv1 = ConvBN3d(in_channels, planes, kernel, padding=padding)
        self.conv2 = ConvBN3d(planes, planes, (1, 3, 3), (1, spatial_stride, spatial_stride), (0, 1, 1))
        self.conv3 = ConvBN3d(planes, planes * self.expansion, (1, 1, 1), relu=False)
        self.downsample = None
        if spatial_stride != 1 or in_channels != planes * self.expansion:
            self.downsample = ConvBN3d(in_channels, planes * self.expansion, (1, 1, 1),
                                       (1, spatial_stride, spatial_stride), relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class ResNet3d50(nn.Module):
    """I3D ResNet-50 up to layer4: [B, C, T, H, W] -> [B, 2048, ceil(T/8), H/32, W/32]."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.conv1 = ConvBN3d(in_channels, 64, (5, 7, 7), (2, 2, 2), (2, 3, 3))
        self.maxpool = nn.MaxPool3d((1, 3, 3), stride=(2, 2, 2), padding=(0, 1, 1))
        self.pool2 = nn.MaxPool3d((2, 1, 1), stride=(2, 1, 1))
        channels = 64
        for stage, (inflate, stride) in enumerate(zip(INFLATE, SPATIAL_STRIDES)):
            planes = 64 * 2 ** stage
            blocks = []
            for index, inflated in enumerate(inflate):
                blocks.append(Bottleneck3d(channels, planes, stride if index == 0 else 1, bool(inflated)))
                channels = planes * Bottleneck3d.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.maxpool(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.pool2(x))))


def cross_modality(rgb_kernel: torch.Tensor, in_channels: int) -> torch.Tensor:
    """TSN's init of a first conv on ``in_channels`` inputs from an RGB one: the mean over RGB, repeated."""
    mean = rgb_kernel.mean(dim=1, keepdim=True)
    return mean.expand(mean.shape[0], in_channels, *mean.shape[2:]).contiguous()


def inflate_2d_state_dict(model: ResNet3d50, state_dict_2d: Mapping[str, torch.Tensor],
                          source: str) -> dict[str, torch.Tensor]:
    """The 3D state dict of ``model`` made from a torchvision ResNet-50 state dict (MMAction2's name map:
    ``X.convN`` -> ``X.convN.conv`` and ``X.bnN`` -> ``X.convN.bn``, ``downsample.0/1`` -> ``downsample.conv/bn``).
    A first conv with other than 3 input channels (optical flow) gets TSN's cross-modality init."""
    inflated: dict[str, torch.Tensor] = {}
    missing, misshapen = [], []
    for name, module in model.named_modules():
        if not isinstance(module, ConvBN3d):
            continue
        if name.endswith("downsample"):
            conv_2d, bn_2d = f"{name}.0", f"{name}.1"
        else:
            conv_2d, bn_2d = name, name.replace("conv", "bn")  # conv1 -> bn1, layer1.0.conv2 -> layer1.0.bn2
        kernel_3d = module.conv.weight
        kernel_2d = state_dict_2d.get(f"{conv_2d}.weight")
        if kernel_2d is None:
            missing.append(f"{conv_2d}.weight")
            continue
        if kernel_2d.shape[1] != kernel_3d.shape[1] and name == "conv1" and kernel_2d.shape[1] == 3:
            kernel_2d = cross_modality(kernel_2d, kernel_3d.shape[1])
        if kernel_2d.shape != kernel_3d.shape[:2] + kernel_3d.shape[3:]:
            misshapen.append(f"{conv_2d}.weight {tuple(kernel_2d.shape)} for {name}.conv.weight "
                             f"{tuple(kernel_3d.shape)}")
            continue
        temporal = kernel_3d.shape[2]
        inflated[f"{name}.conv.weight"] = (kernel_2d.unsqueeze(2).expand_as(kernel_3d) / temporal).contiguous()
        for entry in ("weight", "bias", "running_mean", "running_var"):
            value = state_dict_2d.get(f"{bn_2d}.{entry}")
            if value is None:
                missing.append(f"{bn_2d}.{entry}")
            else:
                inflated[f"{name}.bn.{entry}"] = value.clone()
    if missing or misshapen:
        raise ValueError(f"weights {source} cannot be inflated into i3d-r50 (a torchvision ResNet-50 state dict "
                         f"is expected, keys like 'conv1.weight', 'layer1.0.bn1.running_mean'): {len(missing)} "
                         f"missing {missing[:10]}, {len(misshapen)} of the wrong shape {misshapen[:10]}")
    return inflated
