"""Backbones: exact agreement with torchvision's own forward, weight sources (seeded, file, offline ImageNet
cache), the weights hash, preprocessing by hand, and the float16 overflow the store has to guard against."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn
from torchvision.transforms import v2

from extract import backbones
from extract.backbones import (OFFLINE_ENV, Backbone, Preprocess, WeightsUnavailable, available_backbones,
                               build_backbone, state_dict_sha256)
from conftest import gradient_frames
from pipelines.cli import main

SMALL = Preprocess(frame_size=64, resize=72)
FLOAT16_MAX = 65504.0


def tiny_backbone(weights: str = "none", name: str = "resnet18", **kwargs):
    return build_backbone(name, weights=weights, preprocess=SMALL, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def resnet18_state_dict() -> dict[str, torch.Tensor]:
    """A random torchvision resnet18 whose BatchNorm statistics are not the identity, so skipping them shows."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        model = torchvision.models.resnet18()
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


@pytest.fixture
def resnet18_file(tmp_path, resnet18_state_dict) -> Path:
    path = tmp_path / "resnet18_random.pth"
    torch.save(resnet18_state_dict, path)
    return path


def trunk_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    return state_dict_sha256({k: v for k, v in state_dict.items() if not k.startswith("fc.")})


def torchvision_reference(state_dict, frames: np.ndarray) -> torch.Tensor:
    """torchvision's own preprocessing transforms and resnet18 forward up to layer4, permuted to channels last."""
    model = torchvision.models.resnet18()
    model.load_state_dict(state_dict)
    model.eval()
    transform = v2.Compose([v2.Resize(SMALL.resize, antialias=True), v2.CenterCrop(SMALL.frame_size),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(SMALL.mean, SMALL.std)])
    x = transform(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous())
    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return x.permute(0, 2, 3, 1)


def test_registry_lists_resnets_and_names_them_on_unknown_name():
    assert {"resnet18", "resnet34", "resnet50", "resnet101"} <= set(available_backbones())
    with pytest.raises(ValueError, match="unknown backbone 'resnet7'.*resnet18.*resnet50"):
        build_backbone("resnet7", weights="none", device="cpu")


@pytest.mark.parametrize("name, preprocess, shape", [("resnet18", SMALL, (2, 2, 512)),
                                                     ("resnet50", SMALL, (2, 2, 2048)),
                                                     ("resnet18", Preprocess(), (7, 7, 512))],
                         ids=["resnet18-64px", "resnet50-64px", "resnet18-224px"])
def test_map_shape_matches_the_output(name, preprocess, shape):
    backbone = build_backbone(name, weights="none", preprocess=preprocess, device="cpu")
    maps = backbone(gradient_frames(3, 40, 56))
    assert backbone.map_shape() == shape and backbone.out_channels == shape[2]
    assert maps.shape == (3, *shape) and maps.dtype == torch.float32 and maps.device.type == "cpu"
    assert maps.is_contiguous() and torch.isfinite(maps).all()
    assert not torch.equal(maps[0], maps[1])  # the frames differ, so must their maps


@pytest.mark.parametrize("height, width", [(40, 56), (33, 47)])  # odd sizes too
def test_output_equals_torchvision_forward(resnet18_file, resnet18_state_dict, height, width):
    backbone = tiny_backbone(str(resnet18_file))
    frames = gradient_frames(3, height, width, seed=1)
    expected = torchvision_reference(resnet18_state_dict, frames)
    # Batch norm folded into the convolutions: equal up to float rounding, relative to the maps' range
    torch.testing.assert_close(backbone(frames), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert backbone.provenance()["fused_batchnorm"] and backbone.provenance()["channels_last"]
    assert backbone.provenance()["weights"] == f"file:{resnet18_file.resolve()}"
    assert backbone.weights_sha256 == trunk_sha256(resnet18_state_dict)


def test_state_dict_file_without_fc_or_wrapped_gives_the_same_weights(tmp_path, resnet18_file, resnet18_state_dict):
    no_fc = tmp_path / "no_fc.pth"
    torch.save({k: v for k, v in resnet18_state_dict.items() if not k.startswith("fc.")}, no_fc)
    wrapped = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": resnet18_state_dict, "epoch": 3}, wrapped)
    frames = gradient_frames(2, 40, 56)
    reference = tiny_backbone(str(resnet18_file))
    for path in (no_fc, wrapped):
        backbone = tiny_backbone(str(path))
        assert backbone.weights_sha256 == reference.weights_sha256
        assert torch.equal(backbone(frames), reference(frames))


def test_mismatched_keys_are_listed(tmp_path, resnet18_state_dict):
    broken = {k: v for k, v in resnet18_state_dict.items() if k != "layer1.0.conv1.weight"}
    broken["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    listing = r"1 missing \['layer1.0.conv1.weight'\], 1 unexpected \['extra.weight'\], 0 of the wrong shape"
    with pytest.raises(ValueError, match=listing):
        tiny_backbone(str(path))


def test_weights_of_another_architecture_are_refused(resnet18_file):
    listing = r"of the wrong shape \['layer1.0.conv1.weight \(64, 64, 3, 3\) instead of \(64, 64, 1, 1\)'"
    with pytest.raises(ValueError, match=r"do not fit torchvision's resnet50.*" + listing):
        tiny_backbone(str(resnet18_file), name="resnet50")


class RunsCode:
    """Unpickling this would create `marker`: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_non_state_dict_files_are_refused_without_running_code(tmp_path):
    marker = tmp_path / "code_ran"
    pickled = tmp_path / "object.pth"
    torch.save({"conv1.weight": RunsCode(marker)}, pickled)
    with pytest.raises(ValueError, match="not a plain state dict"):
        tiny_backbone(str(pickled))
    assert not marker.exists()
    torch.load(pickled, weights_only=False)  # the file really does run code when fully unpickled
    assert marker.exists()

    not_tensors = tmp_path / "lists.pth"
    torch.save({"conv1.weight": [1.0, 2.0]}, not_tensors)
    with pytest.raises(ValueError, match="not a state dict of named tensors"):
        tiny_backbone(str(not_tensors))
    with pytest.raises(FileNotFoundError, match="does_not_exist.pth"):
        tiny_backbone(str(tmp_path / "does_not_exist.pth"))


def test_seeded_random_init_is_deterministic_whatever_the_global_rng():
    frames = gradient_frames(2, 40, 56)
    first = tiny_backbone(seed=0)
    torch.rand(10)  # moving the global RNG must not change the weights
    second = tiny_backbone(seed=0)
    other = tiny_backbone(seed=1)
    assert first.weights_sha256 == second.weights_sha256 != other.weights_sha256
    assert torch.equal(first(frames), second(frames))
    assert not torch.allclose(first(frames), other(frames))
    assert first.provenance()["weights"] == "none:seed=0"


def test_construction_does_not_consume_global_rng():
    before = torch.get_rng_state()
    tiny_backbone(seed=5)
    assert torch.equal(before, torch.get_rng_state())


def test_imagenet_weights_load_offline_from_the_hub_cache(tmp_path, monkeypatch, resnet18_file, resnet18_state_dict):
    # The real enum decides the file name; the offline switch proves the cached path never tries the network.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    enum = torchvision.models.ResNet18_Weights.DEFAULT
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / Path(enum.url).name
    cached.parent.mkdir(parents=True)
    # The legacy (pre-zip) serialisation, which older checkpoints use, must load with weights_only too.
    torch.save(resnet18_state_dict, cached, _use_new_zipfile_serialization=False)

    backbone = tiny_backbone("imagenet")
    assert backbone.provenance()["weights"] == f"imagenet:{enum.name}" == "imagenet:IMAGENET1K_V1"
    assert backbone.weights_sha256 == trunk_sha256(resnet18_state_dict)
    frames = gradient_frames(2, 40, 56)
    assert torch.equal(backbone(frames), tiny_backbone(str(resnet18_file))(frames))


def test_missing_imagenet_cache_says_which_file_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    expected = tmp_path / "empty_home" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    with pytest.raises(WeightsUnavailable) as error:
        build_backbone("resnet50", weights="imagenet", preprocess=SMALL, device="cpu")
    message = str(error.value)
    assert str(expected) in message and "TORCH_HOME" in message
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in message
    assert not expected.exists()


def test_missing_imagenet_cache_is_a_one_line_cli_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,domain,split\nv.mp4,a,d,train\n")
    result = CliRunner().invoke(main, ["extract", str(manifest), "--out", str(tmp_path / "store"),
                                       "--backbone", "resnet18", "--weights", "imagenet"])
    expected = tmp_path / "empty_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert result.exit_code == 1 and str(expected) in result.output and OFFLINE_ENV in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_weights_hash_follows_its_documented_definition():
    state = {"b.weight": torch.tensor([1.0, 2.0]), "a.bias": torch.tensor([[3]], dtype=torch.int64),
             "bn.num_batches_tracked": torch.tensor(7)}
    digest = hashlib.sha256()
    digest.update(b"a.bias torch.int64 (1, 1)\n" + np.array([[3]], dtype="<i8").tobytes())
    digest.update(b"b.weight torch.float32 (2,)\n" + np.array([1.0, 2.0], dtype="<f4").tobytes())
    assert state_dict_sha256(state) == digest.hexdigest()
    state["bn.num_batches_tracked"] = torch.tensor(8)  # counters do not change the identity ...
    assert state_dict_sha256(state) == digest.hexdigest()
    state["b.weight"] = state["b.weight"].double()  # ... the dtype does
    assert state_dict_sha256(state) != digest.hexdigest()


def test_constant_colour_normalises_to_hand_computed_values():
    backbone = tiny_backbone()
    colour = np.array([200, 100, 30], dtype=np.uint8)
    expected = (colour / 255 - np.array(SMALL.mean)) / np.array(SMALL.std)
    # 72x100: already at the resize side, so only the centre crop (rows 4..67, columns 18..81) acts; the
    # differently coloured border must be cropped away.
    framed = np.zeros((1, 72, 100, 3), dtype=np.uint8)
    framed[:, 4:68, 18:82] = colour
    # 144x200 of one colour: resized to 72x100 first, which keeps a constant colour exact.
    plain = np.broadcast_to(colour, (1, 144, 200, 3))
    for frames in (framed, plain):
        x = backbone.prepare(frames)
        assert x.shape == (1, 3, 64, 64)
        torch.testing.assert_close(x, torch.tensor(expected, dtype=torch.float32).view(1, 3, 1, 1).expand_as(x))


def test_steps_are_one_frame_each():
    steps = tiny_backbone().steps(np.array([0, 5, 10, 11]))
    assert steps.dtype == np.int32
    np.testing.assert_array_equal(steps, [[0, 0], [5, 5], [10, 10], [11, 11]])


def test_random_resnet101_overflows_float16():
    # Why the store checks finiteness before down-casting: a random-init ResNet-101 at the default 224 px crop
    # (here from a 64 px frame) produces activations beyond float16's range. They must reach the caller intact.
    backbone = build_backbone("resnet101", weights="none", device="cpu")
    maps = backbone(gradient_frames(1, 64, 64))
    assert torch.isfinite(maps).all() and maps.abs().max() > FLOAT16_MAX
    assert torch.isinf(maps.half()).any()


def test_an_fp16_overflow_inside_the_network_suggests_another_precision():
    # A real convolution whose output exceeds float16's range under fp16 autocast. CPU autocast runs fp16 too,
    # which build_backbone does not offer on CPU (slow), so the Backbone is made directly.
    conv = nn.Conv2d(3, 4, kernel_size=1, bias=False)
    nn.init.constant_(conv.weight, 1e5)
    backbone = Backbone("huge-conv", "conv", nn.Sequential(conv), frames_per_step=1, weights="constant",
                        preprocess=Preprocess(frame_size=8, resize=8), device=torch.device("cpu"), precision="fp16")
    frames = np.full((1, 8, 8, 3), 255, dtype=np.uint8)
    with pytest.raises(ValueError, match=r"huge-conv produced inf/NaN under --precision fp16.*--precision bf16.*fp32"):
        backbone(frames)
    backbone.precision = "fp32"  # the same model in float32 is finite: the check is about fp16 only
    assert torch.isfinite(backbone(frames)).all()


@pytest.mark.skipif(not backbones.cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 / AMX)")
def test_bf16_on_a_cpu_with_native_bf16_gives_the_fp32_maps_to_bf16_rounding():
    frames = gradient_frames(4, 64, 64)
    exact, rounded = (tiny_backbone(precision=precision) for precision in ("fp32", "bf16"))
    assert rounded.precision == rounded.provenance()["precision"] == "bf16"
    reference, maps = exact(frames), rounded(frames)
    assert maps.dtype == torch.float32                                   # back to float32 before leaving the device
    error = (maps - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.05                                              # bf16 keeps 8 bits of mantissa: ~1% here


def test_device_precision_and_input_errors_are_explained(monkeypatch):
    with pytest.raises(ValueError, match="'fp16' is not offered on this CPU.*'fp32'"):
        build_backbone("resnet18", weights="none", device="cpu", precision="fp16")
    monkeypatch.setattr(backbones, "cpu_has_native_bf16", lambda: False)   # a CPU without AVX512-BF16 / AMX
    with pytest.raises(ValueError, match="'bf16' is not offered on this CPU.*AVX512-BF16 or AMX"):
        build_backbone("resnet18", weights="none", device="cpu", precision="bf16")
    with pytest.raises(ValueError, match="'fp64' is not one of: auto, fp32, bf16, fp16"):
        build_backbone("resnet18", weights="none", device="cpu", precision="fp64")
    with pytest.raises(ValueError, match="device 'tpu'"):
        build_backbone("resnet18", weights="none", device="tpu")
    with pytest.raises(ValueError, match="frame_size <= resize"):
        Preprocess(frame_size=64, resize=32)
    with pytest.raises(ValueError, match=r"expected uint8 RGB frames shaped \[n, H, W, 3\], got float32"):
        tiny_backbone()(np.zeros((1, 32, 32, 3), dtype=np.float32))


def test_provenance_is_json_stable_and_device_free():
    backbone = build_backbone("resnet18", weights="none", preprocess=SMALL, device="auto")
    provenance = backbone.provenance()
    assert json.loads(json.dumps(provenance)) == provenance
    assert "device" not in provenance
    assert provenance["name"] == "resnet18" and provenance["layer"] == "layer4"
    assert provenance["preprocess"]["frame_size"] == 64 and provenance["preprocess"]["mean"] == list(SMALL.mean)
    expected_precision = "bf16" if torch.cuda.is_available() else "fp32"
    assert backbone.precision == provenance["precision"] == expected_precision
    assert provenance["torch"] == torch.__version__ and provenance["torchvision"] == torchvision.__version__


def test_batch_norm_is_folded_into_its_convolution_and_untraceable_models_run_as_they_are():
    from extract.backbones import _fold_batchnorm
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    net[1].weight.data.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    folded, done = _fold_batchnorm(net)
    assert done and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    # w' = w * gamma / sqrt(var + eps), b' = beta - gamma * mean / sqrt(var + eps): the same function
    bn = net[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv = next(m for m in folded.modules() if isinstance(m, torch.nn.Conv2d))
    torch.testing.assert_close(conv.weight, net[0].weight * scale[:, None, None, None])
    torch.testing.assert_close(conv.bias, bn.bias - bn.running_mean * scale)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-6)

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x   # Python control flow on values: torch.fx cannot trace it

    model = DataDependent()
    assert _fold_batchnorm(model) == (model, False)


def test_folding_matches_torch_fx_fuse_bit_for_bit_and_in_place_keeps_one_copy_of_the_weights(one_thread):
    from torch.fx.experimental.optimization import fuse
    from extract.backbones import _fold_batchnorm
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 2, 1, bias=False), torch.nn.BatchNorm2d(2)).eval()
    for bn in (net[1], net[4]):   # statistics and affine parameters far from the identity
        for values, low, high in ((bn.running_mean, -1, 1), (bn.running_var, 0.5, 2), (bn.weight.data, 0.5, 2),
                                  (bn.bias.data, -1, 1)):
            values.uniform_(low, high)
    reference, copied = fuse(net), _fold_batchnorm(net)[0]
    expected = {name: value.clone() for name, value in reference.named_parameters()}
    assert {name: value for name, value in copied.named_parameters()}.keys() == expected.keys()
    assert all(torch.equal(value, expected[name]) for name, value in copied.named_parameters())
    weight = net[0].weight
    folded, done = _fold_batchnorm(net, in_place=True)
    assert done and folded.get_submodule("0").weight is weight   # scaled where it is: no second copy
    assert all(torch.equal(value, expected[name]) for name, value in folded.named_parameters())
    backbone = tiny_backbone(keep_model=False)                     # what extraction builds
    assert backbone.model is None and backbone.fused_batchnorm
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.network.modules())
    torch.testing.assert_close(backbone(gradient_frames(2, 40, 56)), tiny_backbone()(gradient_frames(2, 40, 56)),
                               rtol=0, atol=0)
