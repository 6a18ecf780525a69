"""Optical flow: TV-L1 recovers a known translation, I3D's +-20 px scaling by hand, the flow stream's input (crop
after flow, frame-major stacking), RAFT with random weights (shapes, scaling, provenance; its accuracy needs the
released weights, which cannot be downloaded here), RAFT's weight loading, and a two-stream store that trains."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn
from torchvision.models import optical_flow
from torchvision.transforms.v2 import functional as TF

from conftest import write_video
from extract.backbones import OFFLINE_ENV, Preprocess, WeightsUnavailable, seeded, state_dict_sha256
from extract.clips import ClipWindows, FlowBackbone
from extract.flow import RaftFlow, TvL1Flow, scale_flow
from extract.store import FeatureStore
from pipelines.cli import main

CPU = torch.device("cpu")
MARGIN = 8  # px left out at the borders, where the shifted content enters and TV-L1's estimate is poor


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth grey texture (bicubically upsampled noise): enough gradient everywhere for flow to lock on."""
    coarse = np.random.default_rng(seed).integers(0, 255, (height // 4 + 2, width // 4 + 2)).astype(np.float32)
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(smooth, 0, 255).astype(np.uint8)


def translating(frames: int, dx: int, dy: int, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 RGB [frames, H, W, 3] of one texture moving (dx, dy) px per frame: frame t+1 at p is frame t at p - d."""
    pad = 2 * MARGIN + frames * max(abs(dx), abs(dy))
    canvas = texture(height + 2 * pad, width + 2 * pad, seed)
    out = [canvas[pad - t * dy:pad - t * dy + height, pad - t * dx:pad - t * dx + width] for t in range(frames)]
    return np.repeat(np.stack(out)[..., None], 3, axis=3)


def as_tensor(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).permute(0, 3, 1, 2)


@pytest.mark.parametrize("dx, dy", [(2, 1), (-3, 2)])
def test_tvl1_recovers_a_known_translation(dx, dy):
    frames = as_tensor(translating(2, dx, dy, height=64, width=96))
    flow = TvL1Flow(CPU)(frames[:1], frames[1:])
    assert flow.shape == (1, 2, 64, 96) and flow.dtype == torch.float32
    inner = flow[0, :, MARGIN:-MARGIN, MARGIN:-MARGIN].reshape(2, -1)
    error = (inner - torch.tensor([[dx], [dy]], dtype=torch.float32)).abs()
    # Stated tolerance: the median within 0.02 px, 90% of the interior pixels within 0.1 px (measured: ~0.002
    # and ~0.008 px on this texture).
    assert error.median(dim=1).values.max() < 0.02
    assert torch.quantile(error, 0.9, dim=1).max() < 0.1


def test_flow_is_clipped_at_20_px_and_scaled_to_minus_one_one():
    flow = torch.tensor([-30.0, -20.0, -5.0, 0.0, 10.0, 25.0])
    assert scale_flow(flow).tolist() == [-1.0, -1.0, -0.25, 0.0, 0.5, 1.0]


def identity_flow_stream(estimator, length: int, side: int, resize: int) -> FlowBackbone:
    """A flow backbone whose 'network' returns its stacked input: its maps are what a real network would see."""
    return FlowBackbone("identity", "input", nn.Identity(), ClipWindows(length, length), "none",
                        Preprocess(side, resize), CPU, "fp32", estimator, stacked=True)


def test_the_flow_stream_sees_scaled_flow_stacked_frame_by_frame():
    backbone = identity_flow_stream(TvL1Flow(CPU), length=2, side=32, resize=48)
    assert backbone.map_shape() == (32, 32, 4)                                  # x1, y1, x2, y2
    maps = backbone(translating(3, 2, -1)[None])[0]                              # 48x64 frames, no resizing
    inner = maps[MARGIN // 2:-MARGIN // 2, MARGIN // 2:-MARGIN // 2].reshape(-1, 4)
    np.testing.assert_allclose(inner.median(dim=0).values.numpy(), [0.1, -0.05, 0.1, -0.05], atol=2e-3)
    flow = backbone.provenance()["flow"]
    assert flow["method"] == "tvl1" and flow["bound_px"] == 20 and flow["parameters"]["tau"] == 0.25
    assert backbone.provenance()["input"] == "optical flow"


def test_raft_with_random_weights_shapes_scaling_and_provenance(one_thread):
    raft = RaftFlow("raft-small", "none", CPU, seed=0)
    expected_sha = state_dict_sha256(seeded(lambda: optical_flow.raft_small(weights=None), 0).state_dict())
    assert raft.provenance() == {"method": "raft-small", "weights": "none:seed=0", "weights_sha256": expected_sha,
                                 "iterations": 12, "precision": "fp32", "bound_px": 20.0}
    frames = as_tensor(translating(2, 2, 1, height=130, width=173))             # not multiples of 8: padded
    flow = raft(frames[:1], frames[1:])
    assert flow.shape == (1, 2, 130, 173) and torch.isfinite(flow).all()
    backbone = identity_flow_stream(raft, length=1, side=64, resize=130)
    maps = backbone(translating(2, 2, 1, height=130, width=173)[None])[0]        # [64, 64, 2]
    torch.testing.assert_close(maps.permute(2, 0, 1), scale_flow(TF.center_crop(flow[0], [64])))
    assert maps.abs().max() <= 1


def test_raft_weights_load_from_a_file_and_from_the_hub_cache(tmp_path, monkeypatch):
    state = seeded(lambda: optical_flow.raft_small(weights=None), 3).state_dict()
    path = tmp_path / "raft_small.pth"
    torch.save(state, path)
    from_file = RaftFlow("raft-small", str(path), CPU, seed=0)
    assert from_file.weights == f"file:{path.resolve()}" and from_file.weights_sha256 == state_dict_sha256(state)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    enum = optical_flow.Raft_Small_Weights.DEFAULT
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / Path(enum.url).name
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    default = RaftFlow("raft-small", "default", CPU, seed=0)
    assert default.weights == "torchvision:Raft_Small_Weights.C_T_V2"
    assert default.weights_sha256 == from_file.weights_sha256
    frames = as_tensor(translating(2, 1, 1, height=128, width=128))
    assert torch.equal(default(frames[:1], frames[1:]), from_file(frames[:1], frames[1:]))
    with pytest.raises(WeightsUnavailable, match=r"Raft_Large_Weights.*raft_large_C_T_SKHT_V2-ff5fadd5\.pth"):
        RaftFlow("raft-large", "default", CPU, seed=0)


def two_domain_dataset(root: Path) -> Path:
    """12 tiny videos: classes a and b (moving right or down) x domains src, tgt x splits train, val, test."""
    rows = []
    for domain in ("src", "tgt"):
        for split in ("train", "val", "test"):
            for label, (dx, dy) in (("a", (1, 0)), ("b", (0, 1))):
                path = f"{domain}/{split}/{label}.mp4"
                write_video(root / path, translating(10, dx, dy, 32, 64, seed=len(rows)), fps=10)
                rows.append({"path": path, "label": label, "domain": domain, "split": split})
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "label", "domain", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def test_a_two_stream_store_trains_with_rgb_and_flow(tmp_path, one_thread):
    manifest = two_domain_dataset(tmp_path / "data")
    store = tmp_path / "store"
    extract = ["extract", str(manifest), "--out", str(store), "--backbone", "i3d", "--weights", "none",
               "--frame-size", "32", "--resize", "32", "--clip-length", "4", "--workers", "1", "--device", "cpu"]
    for stream in ([], ["--stream", "flow", "--flow", "tvl1"]):
        result = CliRunner().invoke(main, [*extract, *stream])
        assert result.exit_code == 0, result.output
    info = CliRunner().invoke(main, ["store", "info", str(store), "--json"])
    streams = json.loads(info.output)["streams"]
    assert {name: s["videos"] for name, s in streams.items()} == {"rgb": 12, "flow": 12}
    rgb, flow = (streams[name]["provenance"]["features"] for name in ("rgb", "flow"))
    assert rgb["name"] == flow["name"] == "i3d" and "flow" not in rgb and flow["flow"]["method"] == "tvl1"
    assert rgb["stream"] == "rgb" and flow["stream"] == "flow" and flow["input"] == "optical flow"
    # 10 frames: RGB clips (0, 4), (4, 8), (6, 10); 9 flow fields: (0, 4), (4, 8), (5, 9), i.e. frames 0-4, 4-8, 5-9
    with FeatureStore.open(store) as reader:
        np.testing.assert_array_equal(reader.read("src/train/a", "steps"), [[0, 3], [4, 7], [6, 9]])
        np.testing.assert_array_equal(reader.read("src/train/a", "steps", stream="flow"), [[0, 4], [4, 8], [5, 9]])

    result = CliRunner().invoke(main, ["train", "--store", str(store), "--manifest", str(manifest), "--head", "trn",
                                       "--source", "src", "--target", "tgt", "--stream", "rgb,flow", "--set",
                                       "epochs=1", "--set", "batch_size=4", "--device", "cpu", "--workers", "0",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["store"]["streams"] == ["rgb", "flow"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["final"]["epochs_run"] == 1
