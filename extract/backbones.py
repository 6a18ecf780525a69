"""Stage one's backbones: decoded frames in, channels-last spatial feature maps out.

A `Backbone` turns a batch of uint8 RGB frames into float32 maps [n_steps, h, w, C] and says exactly what
produced them (`provenance`), so a feature store can refuse to mix features of different models, weights or
preprocessing. The torchvision ResNets are cut after `layer4` (7x7 maps at 224 px, one time step per frame);
other models plug in through `register_backbone`: the clip backbones of `extract/video_backbones.py` (I3D,
whose time step is a window of frames; optical-flow stacks) register themselves that way.

Weights are torchvision's ImageNet weights (read from the torch hub cache; downloaded, with a timeout, only
when absent), a local state-dict file, or a seeded random init (`"none"`); see `extract/weights.py`.
"""
from __future__ import annotations

import contextlib
import copy
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import fx, nn
from torchvision import models
from torchvision.transforms.v2 import functional as TF

# The weights helpers live in extract/weights.py; these names are imported from here too (extract.backbones).
from .weights import (OFFLINE_ENV, WeightsUnavailable, load_weights, read_state_dict, safe_load,  # noqa: F401
                      seeded, state_dict_sha256, torchvision_state_dict)

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Preprocess:
    """Frames -> network input: resize the shorter side (bilinear, antialiased), centre-crop, /255, mean/std."""

    frame_size: int = 224  # centre-crop side
    resize: int = 256  # the shorter side is resized to this before the crop
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if not 0 < self.frame_size <= self.resize:
            raise ValueError(f"Preprocess: need 0 < frame_size <= resize so the crop fits in the resized frame, "
                             f"got frame_size={self.frame_size}, resize={self.resize}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"Preprocess: mean and std need one value per RGB channel and std > 0, "
                             f"got mean={self.mean}, std={self.std}")

    def as_dict(self) -> dict:
        # Lists rather than tuples, so the dict still compares equal after a JSON round trip (store attributes).
        return {"method": "resize shorter side (bilinear, antialias), centre crop, /255, (x - mean) / std",
                "frame_size": self.frame_size, "resize": self.resize,
                "mean": list(self.mean), "std": list(self.std)}


class Backbone:
    """A frozen feature extractor: uint8 RGB frames -> float32 channels-last maps on the CPU, one per time step.

    `model` (eval mode, on `device`) maps normalised frames [n, 3, s, s] to maps [n, C, h, w]; its state dict
    keeps the original (torchvision) parameter names, which is what `weights_sha256` hashes. Here a time step is
    one frame; `extract.clips.ClipBackbone` makes it a window of frames (3D networks, optical-flow stacks).
    """

    MEMORY_FORMAT = torch.channels_last  # of the network's weights and inputs (3D networks: channels_last_3d)

    def __init__(self, name: str, layer: str, model: nn.Module, frames_per_step: int, weights: str,
                 preprocess: Preprocess, device: torch.device, precision: str):
        self.name = name
        self.layer = layer
        self.frames_per_step = frames_per_step
        self.weights = weights
        self.weights_sha256 = state_dict_sha256(model.state_dict())
        self.preprocess = preprocess
        self.device = device
        self.precision = precision
        # ``model`` keeps its parameter names (what a weights file holds), NHWC, the layout cuDNN's and oneDNN's
        # fastest kernels use. Inference runs ``network``: until ``fold_batchnorm`` (which build_backbone calls)
        # the model itself, after it the model with each batch norm folded into the convolution before it.
        self.channels_last = True
        self._memory_format = self.MEMORY_FORMAT
        self.model: nn.Module | None = model.eval().to(device, memory_format=self._memory_format)
        self.network, self.fused_batchnorm = self.model, False
        # One probe forward gives the exact map size for this crop, whatever the architecture's padding does
        # (folding the batch norms changes no shape).
        with torch.inference_mode():
            probe = self._network(self._probe_input())
        _, self.out_channels, height, width = probe.shape
        self._map_shape = (height, width, self.out_channels)

    def fold_batchnorm(self, keep_model: bool = True) -> None:
        """Fold each batch norm into the convolution before it: one pass less over every activation, and with NHWC
        1.29x on ResNet-50, one CPU thread, batch 8 (benchmarks/README.md). The values move by float rounding only
        (5e-5 on maps peaking at 112). ``keep_model``: fold a copy, so that ``model`` stays trainable; otherwise
        fold the model's own weights and drop ``model``, so the weights are held once, not twice (ResNet-50:
        94 MB), which is what extraction wants (it never trains)."""
        self.network, self.fused_batchnorm = _fold_batchnorm(self.model, in_place=not keep_model)
        if not keep_model:
            self.model = None  # its convolutions now hold folded weights, its batch norms would apply twice

    def compile(self) -> None:
        """``torch.compile`` the network (``vidshift extract --compile``): kernels fused for this device, paid for
        by a compilation on the first batch of each new size (the last, shorter batch of a video compiles a
        dynamic-shape kernel once). Values move by float rounding only, like batch-norm folding."""
        self.network = torch.compile(self.network)

    def map_shape(self) -> tuple[int, int, int]:
        """(h, w, C) of one time step's map for the configured preprocessing, e.g. (7, 7, 2048)."""
        return self._map_shape

    def provenance(self) -> dict:
        """What produced the features. The device is deliberately absent: CPU and GPU runs of one model mix."""
        return {"name": self.name, "layer": self.layer, "weights": self.weights,
                "weights_sha256": self.weights_sha256, "preprocess": self.preprocess.as_dict(),
                "precision": self.precision, "channels_last": self.channels_last,
                "fused_batchnorm": self.fused_batchnorm,
                "torch": torch.__version__, "torchvision": torchvision.__version__}

    def prepare(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 RGB frames [n, H, W, 3] (any H, W) -> normalised float32 network input [n, 3, s, s] on the device."""
        # Frames are 4-D whatever the network: NHWC; a clip network lays its 5-D clips out itself (_network).
        return self._normalised(self._resized(frames)).contiguous(memory_format=torch.channels_last)

    def _resized(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames [n, H, W, 3] -> uint8 [n, 3, H', W'] on the device, the shorter side at ``resize``."""
        if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4
                and frames.shape[3] == 3):
            got = f"{frames.dtype} array of shape {frames.shape}" if isinstance(frames, np.ndarray) else type(frames)
            raise ValueError(f"{self.name}: expected uint8 RGB frames shaped [n, H, W, 3], got {got}")
        # Resize and crop the uint8 frames on the device (the GPU when there is one): the upload is 4x smaller
        # than float, and the permuted NHWC view is the layout uint8 resizing is fastest on.
        x = torch.from_numpy(np.ascontiguousarray(frames))
        if self.device.type == "cuda":  # a copy into page-locked memory (torch caches those blocks), so the upload
            x = x.pin_memory().to(self.device, non_blocking=True)  # is one DMA that runs while this thread goes on
        x = x.to(self.device).permute(0, 3, 1, 2)
        return TF.resize(x, [self.preprocess.resize], antialias=True)

    def _normalised(self, resized: torch.Tensor) -> torch.Tensor:
        p = self.preprocess
        x = TF.center_crop(resized, [p.frame_size])
        return TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(p.mean), list(p.std))

    def _probe_input(self) -> torch.Tensor:
        side = self.preprocess.frame_size
        return torch.zeros(1, 3, side, side, device=self.device)

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        """Network input -> maps [n, C, h, w]."""
        return self.network(x)

    def run_network(self, x: torch.Tensor) -> torch.Tensor:
        """Network input on the device -> float32 maps [n, h, w, C] on the CPU, under the configured autocast."""
        autocast_dtype = AUTOCAST_DTYPES[self.precision]
        autocast = (torch.autocast(self.device.type, dtype=autocast_dtype) if autocast_dtype
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            maps = self._network(x)
        if autocast_dtype is torch.float16 and not torch.isfinite(maps).all():
            # No store dtype can help here: the overflow happened inside the network.
            raise ValueError(f"{self.name} produced inf/NaN under --precision fp16 (an activation inside the "
                             f"network exceeded float16's range); use --precision bf16 (float32's range at "
                             f"fp16's speed) or fp32")
        # Back to float32 (autocast returns bf16/fp16) before the maps leave the device.
        return maps.float().permute(0, 2, 3, 1).contiguous().cpu()

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 RGB frames [n, H, W, 3] -> float32 maps [n, h, w, C] on the CPU (n steps: one per frame here)."""
        return self.run_network(self.prepare(frames))

    def steps(self, frame_indices: np.ndarray) -> np.ndarray:
        """int32 [n_steps, 2]: first and last source frame of each step (consecutive windows of frames_per_step)."""
        indices = np.asarray(frame_indices, dtype=np.int32)
        if indices.ndim != 1 or len(indices) % self.frames_per_step:
            raise ValueError(f"{self.name}: frame indices must be 1-D with a multiple of {self.frames_per_step} "
                             f"entries, got shape {indices.shape}")
        windows = indices.reshape(-1, self.frames_per_step)
        return np.stack([windows[:, 0], windows[:, -1]], axis=1)

    def video_steps(self, batches: Iterable[tuple[np.ndarray, np.ndarray]], indices: np.ndarray,
                    batch_size: int) -> Iterator[StepBatch]:
        """One video's (frame indices, uint8 frames) decode batches -> its time steps, in order, as computed.

        ``indices``: every frame index the video's batches will bring (the sampling plan); ``batch_size``: frames
        per network call. Here each decode batch is one call, and a step is one frame.
        """
        del indices, batch_size  # one step per frame: each decode batch is a ready network call
        for frame_indices, frames in batches:
            yield StepBatch(self.steps(frame_indices), self(frames), padded=0)


@dataclass(frozen=True)
class StepBatch:
    """Consecutive time steps of one video: ``steps`` int32 [k, 2] (first and last source frame of each), ``maps``
    float32 [k, h, w, C] on the CPU, and how many repeated frames padded them (a clip longer than the video)."""

    steps: np.ndarray
    maps: torch.Tensor
    padded: int


_CONV_BATCHNORM = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def _fold_batchnorm(model: nn.Module, in_place: bool = False) -> tuple[nn.Module, bool]:
    """The eval-mode model with every conv -> batch-norm pair folded into one conv, and whether it could be done (a
    model torch.fx cannot trace, e.g. one with shape-dependent Python control flow, runs as it is).

    The pairs and the arithmetic are those of torch.fx's ``fuse`` (``fuse_conv_bn_weights``), bit for bit, but the
    weights are scaled where they are instead of into new tensors: ``fuse`` deep-copies the model and then every
    convolution again, three copies of the weights in all, whose freed blocks the allocator keeps (~110 MB of
    resident memory for ResNet-50). ``in_place`` folds ``model``'s own convolutions, which then no longer match
    its batch norms (the caller drops it); otherwise a copy is folded.
    """
    try:
        traced = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - tracing fails in many ways (TraceError, TypeError of math on proxies, ...)
        return model, False
    if not in_place:
        traced = copy.deepcopy(traced)
    modules = dict(traced.named_modules())
    calls = Counter(node.target for node in traced.graph.nodes if node.op == "call_module")
    for node in list(traced.graph.nodes):
        conv_node = node.args[0] if node.op == "call_module" and node.args else None
        if not (isinstance(conv_node, fx.Node) and conv_node.op == "call_module" and len(conv_node.users) == 1
                and calls[conv_node.target] == 1):  # a convolution whose output only this node reads, called once
            continue
        conv, batchnorm = modules[conv_node.target], modules[node.target]
        if _CONV_BATCHNORM.get(type(conv)) is type(batchnorm) and batchnorm.track_running_stats:
            _fold_into(conv, batchnorm)
            node.replace_all_uses_with(conv_node)
            traced.graph.erase_node(node)
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced, True


@torch.no_grad()
def _fold_into(conv: nn.Module, batchnorm: nn.Module) -> None:
    """w' = w * gamma / sqrt(var + eps), b' = (b - mean) / sqrt(var + eps) * gamma + beta, in fuse_conv_bn_weights'
    order of operations (so the same floats), w' written over w."""
    zeros = torch.zeros_like(batchnorm.running_mean)
    gamma = batchnorm.weight if batchnorm.weight is not None else torch.ones_like(zeros)
    beta = batchnorm.bias if batchnorm.bias is not None else zeros
    bias = conv.bias if conv.bias is not None else zeros
    rsqrt = torch.rsqrt(batchnorm.running_var + batchnorm.eps)
    conv.weight.mul_((gamma * rsqrt).reshape([-1, 1] + [1] * (conv.weight.dim() - 2)))
    conv.bias = nn.Parameter((bias - batchnorm.running_mean) * rsqrt * gamma + beta, bias.requires_grad)


# A factory builds one backbone: factory(weights=, preprocess=, device=torch.device, precision=, seed=,
# clip_length=, clip_stride=, flow=, flow_weights=) -> Backbone. `device` and `precision` arrive already resolved
# and validated by build_backbone; the clip and flow options are None (and flow_weights "default") when not given.
BackboneFactory = Callable[..., Backbone]
_FACTORIES: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: make `factory` buildable as `build_backbone(name, ...)`."""
    def register(factory: BackboneFactory) -> BackboneFactory:
        if name in _FACTORIES:
            raise ValueError(f"backbone {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory
    return register


def _registry() -> dict[str, BackboneFactory]:
    """The registered factories. The clip backbones build on this module, so they are imported on first use
    rather than at the top (which would be circular); an import already done costs a dictionary lookup."""
    from . import video_backbones  # noqa: F401
    return _FACTORIES


def available_backbones() -> list[str]:
    return sorted(_registry())


def build_backbone(name: str, weights: str = "imagenet", preprocess: Preprocess = Preprocess(),
                   device: str = "auto", precision: str = "auto", seed: int = 0, clip_length: int | None = None,
                   clip_stride: int | None = None, flow: str | None = None,
                   flow_weights: str = "default", keep_model: bool = True) -> Backbone:
    """Build a registered backbone.

    weights: "imagenet" (torchvision's default ImageNet weights), "none" (random init from `seed`, identical
    for the same seed whatever the global RNG state), or the path of a state dict (torchvision-keyed for ResNets).
    device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
    precision: autocast dtype, "auto" (bf16 on CUDA, fp32 on CPU), "fp32", "bf16" or "fp16" (CUDA only).
    clip_length, clip_stride: frames per time step and hop for clip backbones (default: the backbone's own).
    flow: None (RGB input) or an optical-flow method of `extract.flow.FLOW_METHODS`, computed from the frames and
    fed to the network instead of them; flow_weights: that method's weights ("default", "none" or a path).
    keep_model: keep the trainable ``model`` beside the inference ``network``, or (False) fold the batch norms into
    its own weights and drop it: the weights are then held once (``Backbone.fold_batchnorm``).
    """
    if name not in _registry():
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    resolved_device = _resolve_device(device)
    backbone = _FACTORIES[name](weights=weights, preprocess=preprocess, device=resolved_device,
                                precision=_resolve_precision(precision, resolved_device), seed=seed,
                                clip_length=clip_length, clip_stride=clip_stride, flow=flow, flow_weights=flow_weights)
    backbone.fold_batchnorm(keep_model)
    return backbone


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not valid; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from error
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but this torch ({torch.__version__}) sees no CUDA GPU; "
                         f"use 'cpu' or 'auto'")
    return resolved


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions natively on this CPU (AVX512-BF16 or AMX): only then is bf16 faster
    than fp32 there (measured 1.5-2x for ResNet-50 on one AVX512-BF16 core); elsewhere it is emulated, slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):   # a torch built without oneDNN
        return False


def _resolve_precision(precision: str, device: torch.device) -> str:
    # auto is fp32 on the CPU even where bf16 is fast: bf16 changes the features (~1% of their largest value),
    # so it has to be asked for.
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision {precision!r} is not one of: auto, {', '.join(AUTOCAST_DTYPES)}")
    if device.type == "cpu" and precision != "fp32" and not (precision == "bf16" and cpu_has_native_bf16()):
        raise ValueError(f"precision {precision!r} is not offered on this CPU: it has no native {precision} "
                         f"convolutions (bf16 needs AVX512-BF16 or AMX), so it would be slower than fp32 and less "
                         f"accurate. Use 'fp32' or 'auto' (the store's --dtype decides how features are saved, "
                         f"independently of this)")
    return precision


# ----------------------------------------------------------------------------- torchvision ResNets

RESNETS = {
    "resnet18": (models.resnet18, models.ResNet18_Weights),
    "resnet34": (models.resnet34, models.ResNet34_Weights),
    "resnet50": (models.resnet50, models.ResNet50_Weights),
    "resnet101": (models.resnet101, models.ResNet101_Weights),
}


def cut_after(model: nn.Module, layer: str) -> nn.Sequential:
    """The model's top-level children up to and including `layer`, under their original names.

    Valid for torchvision ResNets, whose children are declared in the order forward() runs them.
    """
    kept = OrderedDict()
    for child_name, child in model.named_children():
        kept[child_name] = child
        if child_name == layer:
            return nn.Sequential(kept)
    raise ValueError(f"{type(model).__name__} has no layer {layer!r}")


def _build_resnet(name: str, weights: str, preprocess: Preprocess, device: torch.device, precision: str,
                  seed: int, clip_length: int | None, clip_stride: int | None, flow: str | None,
                  flow_weights: str) -> Backbone:
    if flow is not None:
        # Imported here, not at the top: the clip machinery builds on this module (see _registry).
        from .video_backbones import build_flow_resnet
        return build_flow_resnet(name, weights, preprocess, device, precision, seed, clip_length, clip_stride,
                                 flow, flow_weights)
    if clip_length is not None or clip_stride is not None:
        raise ValueError(f"--clip-length/--clip-stride: {name} on RGB frames is a per-frame backbone (one time step "
                         f"per frame); clips apply to i3d, i3d-r50 and to optical-flow stacks (--flow)")
    model = seeded(RESNETS[name][0], seed)
    state_dict = resnet_weights(name, weights)
    if state_dict is not None:
        load_weights(model, state_dict, f"torchvision's {name}", resnet_identity(name, weights, seed))
        del state_dict  # freed before the Backbone converts the weights to NHWC: else three copies at once
    return Backbone(name, "layer4", cut_after(model, "layer4"), frames_per_step=1,
                    weights=resnet_identity(name, weights, seed), preprocess=preprocess, device=device,
                    precision=precision)


def resnet_identity(name: str, weights: str, seed: int) -> str:
    """How provenance names a torchvision ResNet's weights: none:seed=S, imagenet:ENUM or file:PATH."""
    if weights == "none":
        return f"none:seed={seed}"
    if weights == "imagenet":
        return f"imagenet:{RESNETS[name][1].DEFAULT.name}"
    return f"file:{Path(weights).expanduser().resolve()}"


def resnet_weights(name: str, weights: str) -> dict[str, torch.Tensor] | None:
    """The state dict that ``weights`` ("imagenet" or a path) names for torchvision's ``name``; None for "none"."""
    if weights == "none":
        return None
    if weights == "imagenet":
        return torchvision_state_dict(RESNETS[name][1].DEFAULT)
    return read_state_dict(Path(weights).expanduser().resolve())


for _name in RESNETS:
    register_backbone(_name)(partial(_build_resnet, _name))
