"""i3d-r50 (MMAction2's i3d_r50) and TSN's cross-modality init: the inflation identity on a constant clip, the
inflation rule by hand, MMAction2's key names and 3D checkpoints, the T/8 layer4 map, flow ResNets' conv1."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from conftest import gradient_frames
from extract.backbones import Preprocess, build_backbone, state_dict_sha256
from extract.inflate import ResNet3d50, cross_modality, inflate_2d_state_dict

SMALL = Preprocess(frame_size=64, resize=64)


@pytest.fixture(scope="module")
def resnet50_state_dict() -> dict[str, torch.Tensor]:
    """A random torchvision ResNet-50 whose BatchNorm layers are not the identity, so copying them shows."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = torchvision.models.resnet50()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.normal_(0, 0.1)
    return model.state_dict()


@pytest.fixture
def resnet50_file(tmp_path, resnet50_state_dict):
    path = tmp_path / "resnet50.pth"
    torch.save(resnet50_state_dict, path)
    return path


def test_a_constant_clip_through_the_inflated_model_equals_the_2d_model_per_frame(resnet50_file, resnet50_state_dict,
                                                                                   one_thread):
    backbone = build_backbone("i3d-r50", weights=str(resnet50_file), preprocess=Preprocess(32, 32), device="cpu")
    assert backbone.provenance()["weights"] == f"file:{resnet50_file.resolve()}+inflated"
    resnet = torchvision.models.resnet50().eval()
    resnet.load_state_dict(resnet50_state_dict)
    frame = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        per_frame = nn.Sequential(*list(resnet.children())[:-2])(frame)            # [1, 2048, 1, 1]
        clip = backbone.model(frame.unsqueeze(2).expand(1, 3, 128, 32, 32))         # a "boring" 128-frame video
    assert clip.shape == (1, 2048, 16, 1, 1)                                        # T/8
    # The central steps see no temporal padding: there the 3D model is the 2D one (values up to ~1e2).
    torch.testing.assert_close(clip[:, :, 7:9], per_frame.unsqueeze(2).expand(1, 2048, 2, 1, 1), rtol=1e-5,
                               atol=1e-3)
    # At the clip's ends the zero temporal padding takes part, as in MMAction2: not the 2D activations there.
    assert (clip[:, :, 0] - per_frame).abs().max() > 1


def test_kernels_are_repeated_over_time_and_divided_by_its_length(resnet50_state_dict):
    model = ResNet3d50()
    inflated = inflate_2d_state_dict(model, resnet50_state_dict, "test")
    stem, stem_2d = inflated["conv1.conv.weight"], resnet50_state_dict["conv1.weight"]
    assert stem.shape == (64, 3, 5, 7, 7)
    for t in range(5):
        torch.testing.assert_close(stem[:, :, t], stem_2d / 5)
    block = inflated["layer1.0.conv1.conv.weight"]                                  # inflated (3, 1, 1)
    assert block.shape == (64, 64, 3, 1, 1)
    torch.testing.assert_close(block[:, :, 1], resnet50_state_dict["layer1.0.conv1.weight"] / 3)
    torch.testing.assert_close(inflated["layer4.0.conv1.conv.weight"][:, :, 0],     # not inflated: (1, 1, 1)
                               resnet50_state_dict["layer4.0.conv1.weight"])
    assert inflated["layer4.1.conv1.conv.weight"].shape == (512, 2048, 3, 1, 1)     # layer4 inflates (0, 1, 0)
    assert torch.equal(inflated["layer2.0.downsample.bn.running_var"],
                       resnet50_state_dict["layer2.0.downsample.1.running_var"])
    assert torch.equal(inflated["layer3.5.conv3.bn.bias"], resnet50_state_dict["layer3.5.bn3.bias"])


def test_mmaction2_checkpoints_load_as_they_are(tmp_path, resnet50_file):
    inflated = build_backbone("i3d-r50", weights=str(resnet50_file), preprocess=SMALL, device="cpu", clip_length=16)
    assert inflated.map_shape() == (2, 2, 2048) and inflated.provenance()["clip"]["length"] == 16
    # An MMAction2 recognizer checkpoint: {"state_dict": {"backbone.*", "cls_head.*"}, "meta": ...}
    recognizer = {f"backbone.{key}": value for key, value in inflated.model.state_dict().items()}
    recognizer["cls_head.fc_cls.weight"] = torch.zeros(400, 2048)
    path = tmp_path / "i3d_r50_32x2x1_kinetics400.pth"
    torch.save({"state_dict": recognizer, "meta": {"epoch": 100}}, path)
    loaded = build_backbone("i3d-r50", weights=str(path), preprocess=SMALL, device="cpu", clip_length=16)
    assert loaded.weights_sha256 == inflated.weights_sha256 == state_dict_sha256(inflated.model.state_dict())
    assert loaded.provenance()["weights"] == f"file:{path.resolve()}"
    clips = gradient_frames(16, 48, 80, seed=3)[None]
    assert torch.equal(loaded(clips), inflated(clips))
    assert {"conv1.conv.weight", "conv1.bn.running_mean", "layer1.0.downsample.conv.weight",
            "layer4.2.conv3.bn.weight"} <= set(loaded.model.state_dict())
    broken = tmp_path / "broken.pth"
    torch.save({k: v for k, v in recognizer.items() if k != "backbone.layer1.0.conv2.bn.bias"}, broken)
    with pytest.raises(ValueError, match=r"do not fit MMAction2's i3d_r50.*1 missing \['layer1\.0\.conv2\.bn\.bias'\]"):
        build_backbone("i3d-r50", weights=str(broken), preprocess=SMALL, device="cpu")


def test_cross_modality_init_is_the_mean_of_the_rgb_kernels():
    rgb = torch.tensor([[[[1.0]], [[2.0]], [[6.0]]], [[[0.0]], [[-3.0]], [[3.0]]]])  # [2 out, 3 in, 1, 1]
    flow = cross_modality(rgb, 4)
    assert flow.shape == (2, 4, 1, 1) and flow[:, :, 0, 0].tolist() == [[3.0] * 4, [0.0] * 4]


def test_flow_resnet_stacks_2l_channels_with_tsns_init(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        rgb_state = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(rgb_state, path)
    backbone = build_backbone("resnet18", weights=str(path), preprocess=Preprocess(32, 32), device="cpu",
                              flow="tvl1", clip_length=5)
    conv1 = backbone.model.state_dict()["conv1.weight"]
    assert conv1.shape == (64, 10, 7, 7) and backbone.provenance()["weights"].endswith("+cross-modality")
    torch.testing.assert_close(conv1, rgb_state["conv1.weight"].mean(dim=1, keepdim=True).expand(64, 10, 7, 7))
    # A flow network's own state dict (2 L input channels) loads unchanged.
    flow_path = tmp_path / "resnet18_flow.pth"
    torch.save(backbone.model.state_dict(), flow_path)
    again = build_backbone("resnet18", weights=str(flow_path), preprocess=Preprocess(32, 32), device="cpu",
                           flow="tvl1", clip_length=5)
    assert again.weights_sha256 == backbone.weights_sha256 and not again.provenance()["weights"].endswith("modality")
    np.testing.assert_array_equal(backbone.map_shape(), (1, 1, 512))
