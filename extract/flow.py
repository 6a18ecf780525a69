"""Optical flow between consecutive sampled frames, the input of stage one's ``flow`` stream.

Two estimators, one interface: ``estimator(first, second)`` takes uint8 RGB frames [n, 3, H, W] on the backbone's
device and returns float32 flow [n, 2, H, W] in pixels (channel 0: x, to the right; channel 1: y, downwards),
such that ``first[p] ~ second[p + flow[p]]``.

- ``tvl1``: TV-L1 (Zach, Pock & Bischof 2007) from OpenCV's contrib ``optflow`` module with its default
  parameters on grayscale frames, as I3D (Carreira & Zisserman 2017 §3) and TSN's ``dense_flow`` compute flow.
  CPU only: the frames are copied to the host, one pair at a time.
- ``raft-small``, ``raft-large``: RAFT (Teed & Deng 2020) from ``torchvision.models.optical_flow``, on the
  backbone's device, a whole decode batch of pairs per call, 12 refinement iterations (torchvision's default;
  the paper evaluates with 32 on Sintel). Frames are mapped to [-1, 1] (torchvision's ``OpticalFlow``
  transform) and replicate-padded to a multiple of 8 on both sides, as RAFT's ``InputPadder``. It runs in
  float32 whatever ``--precision`` says: its correlation volume loses accuracy in bf16. Weights: ``default``
  (the weights enum's DEFAULT, from the torch hub cache), ``none`` (seeded random init) or a state-dict path.

I3D's convention then maps flow to the network's input range: clipped to +-20 px and divided by 20
(``scale_flow``), so that [-1, 1] matches the RGB stream's range.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torchvision.models import optical_flow

from .weights import load_weights, read_state_dict, seeded, state_dict_sha256, torchvision_state_dict

BOUND_PX = 20.0
RAFT_ITERATIONS = 12
RAFT_MIN_SIDE = 128  # torchvision's RAFT: its correlation pyramid needs feature maps of at least 16 x 16 at 1/8
RAFT_MODELS = {"raft-small": (optical_flow.raft_small, optical_flow.Raft_Small_Weights),
               "raft-large": (optical_flow.raft_large, optical_flow.Raft_Large_Weights)}
FLOW_METHODS = (*RAFT_MODELS, "tvl1")


def scale_flow(flow_px: torch.Tensor) -> torch.Tensor:
    """Flow in pixels -> I3D's input: clipped to [-20, 20] px, then divided by 20, so in [-1, 1]."""
    return flow_px.clamp(-BOUND_PX, BOUND_PX) / BOUND_PX


class RaftFlow:
    min_side = RAFT_MIN_SIDE

    def __init__(self, method: str, weights: str, device: torch.device, seed: int,
                 iterations: int = RAFT_ITERATIONS):
        build_model, weights_enum = RAFT_MODELS[method]
        model = seeded(partial(build_model, weights=None), seed)
        if weights == "none":
            identity = f"none:seed={seed}"
        elif weights == "default":
            default = weights_enum.DEFAULT
            identity = f"torchvision:{type(default).__name__}.{default.name}"
            load_weights(model, torchvision_state_dict(default), f"torchvision's {method}", identity, classifier=())
        else:
            path = Path(weights).expanduser().resolve()
            identity = f"file:{path}"
            load_weights(model, read_state_dict(path), f"torchvision's {method}", identity, classifier=())
        self.method, self.iterations, self.device, self.weights = method, iterations, device, identity
        self.weights_sha256 = state_dict_sha256(model.state_dict())
        self.model = model.eval().to(device)

    @torch.inference_mode()
    def __call__(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        height, width = first.shape[-2:]
        pad_h, pad_w = -height % 8, -width % 8
        padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)

        def normalised(frames: torch.Tensor) -> torch.Tensor:
            return F.pad(frames.float() / 127.5 - 1.0, padding, mode="replicate")

        flow = self.model(normalised(first), normalised(second), num_flow_updates=self.iterations)[-1]
        return flow[:, :, padding[2]:padding[2] + height, padding[0]:padding[0] + width].float()

    def provenance(self) -> dict:
        return {"method": self.method, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "iterations": self.iterations, "precision": "fp32", "bound_px": BOUND_PX}


class TvL1Flow:
    min_side = 1

    def __init__(self, device: torch.device):
        import cv2  # here, not at the top: OpenCV costs ~17 MB of memory, which a run without TV-L1 need not pay

        self.device = device
        self._tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()  # OpenCV's defaults, the I3D/TSN setting

    def __call__(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        import cv2  # already loaded by __init__: a dictionary lookup

        def grey(frames: torch.Tensor) -> list[np.ndarray]:
            rgb = frames.permute(0, 2, 3, 1).cpu().numpy()
            return [cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY) for frame in rgb]

        flows = [self._tvl1.calc(a, b, None) for a, b in zip(grey(first), grey(second))]
        return torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).to(self.device)

    def provenance(self) -> dict:
        t = self._tvl1
        parameters = {"tau": t.getTau(), "lambda": t.getLambda(), "theta": t.getTheta(),
                      "scales": t.getScalesNumber(), "warps": t.getWarpingsNumber(), "epsilon": t.getEpsilon(),
                      "inner_iterations": t.getInnerIterations(), "outer_iterations": t.getOuterIterations(),
                      "scale_step": t.getScaleStep(), "gamma": t.getGamma(),
                      "median_filtering": t.getMedianFiltering()}
        return {"method": "tvl1", "implementation": "cv2.optflow.DualTVL1OpticalFlow on grayscale frames",
                "parameters": parameters, "bound_px": BOUND_PX}


FlowEstimator = RaftFlow | TvL1Flow


def build_flow(method: str, weights: str, device: torch.device, seed: int) -> FlowEstimator:
    """``method`` one of FLOW_METHODS; ``weights`` (RAFT only) "default", "none" or a state-dict path."""
    if method == "tvl1":
        if weights != "default":
            raise ValueError(f"--flow-weights {weights!r}: TV-L1 is an optimisation method, it has no weights; "
                             f"drop --flow-weights or use --flow raft-small|raft-large")
        return TvL1Flow(device)
    if method not in RAFT_MODELS:
        raise ValueError(f"--flow {method!r}: use one of {', '.join(FLOW_METHODS)}")
    return RaftFlow(method, weights, device, seed)
