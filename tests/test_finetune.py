"""`vidshift finetune` on real generated videos (tiny ResNet-18 at 64 px): training steps and evaluation, partial
BN, torchrun with 2 gloo processes against 1 process, resume, in-backbone MixStyle by hand, pixel-space ADA and
FGSM, and the exported backbone re-extracting a store."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import heads
from extract.backbones import build_backbone, safe_load, state_dict_sha256
from extract.run import ExtractConfig, run_extract
from extract.store import FeatureStore
from extract.synth import SynthConfig, generate
from heads.ada import ascend
from heads.apn import hold_local_draws, pyramid_levels, transport_cost
from heads.base import LabelledBatch
from heads.drl import kd_loss, pixel_fgsm
from heads.mixstyle import VideoMixStyle
from pipelines.cli import main
from pipelines.finetune import FinetuneConfig, finetune
from pipelines.finetune_model import FINETUNE_HPARAMS, BackboneFactory, TrainableBackbone, end_to_end
from pipelines.runs import RunError
from pipelines.video_data import eval_clip, eval_preprocess, normalise

REPO = Path(__file__).resolve().parent.parent
TINY = {"epochs": 2, "batch_size": 4}            # 6 source train videos: 2 updates per epoch
TUNING = {name: spec.default for name, spec in FINETUNE_HPARAMS.items()}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """The synthetic shift (6 classes, 3 videos per class and domain, 8 frames, 64 px) plus one corrupt video."""
    root = tmp_path_factory.mktemp("videos")
    manifest = generate(root, SynthConfig(videos_per_class=3, num_frames=8, frame_size=64))
    (root / "broken.mp4").write_bytes(b"\x00" * 500)
    with open(manifest, "a", newline="") as handle:
        csv.writer(handle).writerow(["broken.mp4", "left", "studio", "train", "studio/train/left/broken",
                                     12, 8, 64, 64, "red", "square"])
    return manifest


def config_for(manifest: Path, out: Path, **changes) -> FinetuneConfig:
    options = {"head": "tempooling", "source": "studio", "target": "outdoor", "backbone": "resnet18",
               "weights": "none", "frame_size": 64, "num_segments": 3, "workers": 0, "hparams": dict(TINY),
               **changes}
    return FinetuneConfig(manifest=manifest, out=out, **options)


@pytest.fixture(scope="module")
def cli_run(videos, tmp_path_factory):
    """Two epochs through the CLI, frames decoded by a worker process."""
    out = tmp_path_factory.mktemp("runs") / "run"
    arguments = ["finetune", "--manifest", str(videos), "--backbone", "resnet18", "--weights", "none",
                 "--frame-size", "64", "--head", "tempooling", "--source", "studio", "--target", "outdoor",
                 "--segments", "3", "--workers", "1", "--out", str(out)]
    arguments += [item for name, value in TINY.items() for item in ("--set", f"{name}={value}")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # module-scoped: set up before the one_thread fixture, and compared with its runs
    try:
        result = CliRunner().invoke(main, arguments)
    finally:
        torch.set_num_threads(threads)
    return out, result


def test_two_epochs_of_two_updates_evaluate_and_list_the_corrupt_video(cli_run):
    out, result = cli_run
    assert result.exit_code == 2, result.output                 # finished, one video skipped
    assert "SKIPPED studio/train/left/broken" in result.output
    assert list(json.loads((out / "failures.json").read_text())) == ["studio/train/left/broken"]
    report = json.loads((out / "metrics.json").read_text())
    # vidshift train's schema, so reports compare the two modes
    assert set(report) == {"head", "method", "streams", "fusion", "setting", "source", "target", "epochs", "final"}
    assert [record["epoch"] for record in report["epochs"]] == [1, 2]
    for record in report["epochs"]:
        assert {"loss", "loss_y", "lr", "grad_norm", "src_val_acc", "tgt_acc", "tgt_mca"} <= set(record)
        assert 0.0 <= record["tgt_acc"] <= 1.0 and record["loss"] > 0
    assert report["final"]["selected_epoch"] in (1, 2)
    assert json.loads((out / "videos.json").read_text())["frames"]["studio/train/left/studio_left_000"] == 8


def test_partial_bn_trains_the_first_batchnorm_only_and_the_backbone_moves(cli_run):
    out, _ = cli_run
    tuned = safe_load(out / "backbone.pt")
    initial = build_backbone("resnet18", "none", eval_preprocess(64), "cpu", "fp32", seed=0).model.state_dict()
    assert set(tuned) == set(initial) and "conv1.weight" in tuned          # torchvision keys
    changed = {name for name in tuned if not torch.equal(tuned[name], initial[name])}
    assert {"bn1.running_mean", "bn1.weight", "conv1.weight", "layer4.1.conv2.weight"} <= changed
    frozen = [name for name in tuned if ".bn" in name or "downsample.1" in name]
    assert frozen and not changed & set(frozen)                            # every later BatchNorm as it was


def test_backbone_params_get_their_own_lr_group():
    factory = BackboneFactory("resnet18", "none", 32, "fp32", {**TUNING, "backbone_lr_mult": 0.1}, seed=0)
    backbone = factory.build()
    model = heads.build("tempooling", "erm", factory.feature_shape("pooled"), 3, 2, {"lr": 0.01},
                        wrap=lambda arch: end_to_end(arch, backbone, factory.pixel_space(), 32))
    groups = model.optimizer.param_groups
    assert [group["lr"] for group in groups] == [0.01, pytest.approx(0.001)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in backbone.net.parameters()}


def test_resume_is_exact(videos, cli_run, tmp_path):
    whole, _ = cli_run
    config = config_for(videos, tmp_path / "run")
    first = finetune(config, stop_after=1, show_progress=False)
    assert len(first["epochs"]) == 1 and not (tmp_path / "run" / "backbone.pt").exists()
    resumed = finetune(config, resume=True, show_progress=False)
    assert resumed["epochs"] == json.loads((whole / "metrics.json").read_text())["epochs"]
    tuned, expected = safe_load(tmp_path / "run" / "backbone.pt"), safe_load(whole / "backbone.pt")
    assert all(torch.equal(tuned[name], expected[name]) for name in expected)
    with pytest.raises(RunError, match="hparams differs"):
        finetune(config_for(videos, tmp_path / "run", hparams={**TINY, "lr": 0.5}), resume=True)


def test_torchrun_with_two_gloo_processes_equals_one_process(videos, tmp_path):
    # no dropout, frozen BatchNorm: the batch's per-process shares then give the global batch's gradient exactly
    hparams = {**TINY, "epochs": 1, "dropout_frame": 0, "dropout_video": 0, "backbone_bn": "frozen"}
    one = finetune(config_for(videos, tmp_path / "one", hparams=hparams), show_progress=False)
    arguments = ["--manifest", str(videos), "--backbone", "resnet18", "--weights", "none", "--frame-size", "64",
                 "--head", "tempooling", "--source", "studio", "--target", "outdoor", "--segments", "3",
                 "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "two")]
    arguments += [item for name, value in hparams.items() for item in ("--set", f"{name}={value}")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "pipelines.finetune", *arguments], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("SKIPPED studio/train/left/broken") == 1          # the first process reports
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for key in ("loss", "grad_norm", "lr", "src_val_acc", "tgt_acc"):
        assert two["epochs"][0][key] == pytest.approx(one["epochs"][0][key], rel=1e-5, abs=1e-6), key
    tuned, single = safe_load(tmp_path / "two" / "backbone.pt"), safe_load(tmp_path / "one" / "backbone.pt")
    assert all(torch.allclose(tuned[name], single[name], atol=1e-6) for name in single)


def test_in_backbone_mixstyle_mixes_video_statistics_over_time_and_space_by_hand():
    backbone = TrainableBackbone(torch.nn.Sequential(), TUNING, None)
    backbone.mixstyle = VideoMixStyle(p=1.0, alpha=1e6, pairing="crosshalf")   # λ = 0.5 up to ~1e-3
    # 2 videos x 2 frames, 2 channels, 2 x 2 positions; every frame is flat, so only time varies
    video_a = torch.tensor([1.0, 3.0])[:, None, None, None] * torch.tensor([1.0, 2.0])[None, :, None, None]
    video_b = torch.tensor([10.0, 30.0])[:, None, None, None] * torch.tensor([1.0, 2.0])[None, :, None, None]
    frames = torch.cat([video_a, video_b]).expand(4, 2, 2, 2).contiguous()        # [B·N, C, H, W]
    mixed = backbone.train()._mix(frames, batch=2, split=None)
    # channel 0: a has mean 2, std sqrt(8/7) over its 8 values (T, H, W); b mean 20, std 10 sqrt(8/7); each is
    # re-styled with the mean of the two styles: mean 11, std 5.5 sqrt(8/7), so both become 11 -/+ 5.5 per frame
    expected = torch.tensor([5.5, 16.5, 5.5, 16.5])[:, None] * torch.tensor([1.0, 2.0])[None, :]
    assert torch.allclose(mixed[:, :, 0, 0], expected, atol=0.05)
    assert torch.equal(mixed, mixed[:, :, :1, :1].expand_as(mixed))               # flat frames stay flat
    # one video per domain of a DA batch: nothing to mix with, each domain mixes apart
    assert torch.equal(backbone._mix(frames, batch=2, split=1), frames)


def test_stdn_mixstyle_moves_into_the_backbone_and_mixes_in_training_only():
    # frozen BatchNorm: a training pass then changes nothing but what MixStyle mixes
    factory = BackboneFactory("resnet18", "none", 32, "fp32", {**TUNING, "backbone_bn": "frozen"}, seed=0)
    backbone = factory.build()
    model = heads.build("stdn", "erm", factory.feature_shape("maps"), 3, 2, {"mixstyle_p": 1.0},
                        wrap=lambda arch: end_to_end(arch, backbone, factory.pixel_space(), 32))
    assert model.arch.head.mixstyle is None and isinstance(backbone.mixstyle, VideoMixStyle)
    x = torch.randn(4, 2, 32, 32, 3)
    model.eval()
    plain = model.arch.step_features(x)
    assert plain.shape == (4, 2, 1, 1, 512)                       # the maps the architecture reads from a store
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model.arch.step_features(x), plain, atol=1e-3)
    model.eval()
    assert torch.equal(model.arch.step_features(x), plain)


def test_pixel_video_ada_step_increases_eq8():
    factory = BackboneFactory("resnet18", "none", 32, "fp32", TUNING, seed=0)
    backbone = factory.build()
    torch.manual_seed(0)
    model = heads.build("apn", "video-ada", factory.feature_shape("pooled"), 3, 4,
                        {"video_ada_levels": ["level2"], "video_ada_gamma": 1.0},
                        wrap=lambda arch: end_to_end(arch, backbone, factory.pixel_space(), 32)).eval()
    src = LabelledBatch(torch.randn(2, 4, 32, 32, 3), torch.tensor([0, 2]))
    arch = model.arch
    with hold_local_draws(arch):
        with torch.no_grad():
            anchor = pyramid_levels(arch, arch.encode(src.x).parts)["level2"]

        def eq8(x):
            with torch.no_grad():
                level2 = pyramid_levels(arch, arch.encode(x).parts)["level2"]
                return (F.cross_entropy(arch.classify(level2), src.y, reduction="sum")
                        - transport_cost(level2, anchor).sum()).item()

        moved = ascend(src.x, lambda x_adv: model.ascent_objective(x_adv, anchor, src.y, ("level2",)), 0.05)
        assert moved.shape == src.x.shape and not torch.equal(moved, src.x)    # the copy is frames
        assert eq8(moved) > eq8(src.x)


def test_pixel_fgsm_moves_each_pixel_by_at_most_epsilon_inside_the_image_and_raises_the_kd_loss():
    factory = BackboneFactory("resnet18", "none", 32, "fp32", TUNING, seed=0)
    pixels = factory.pixel_space()
    torch.manual_seed(0)
    student = heads.drl.PixelSpatialModel(pixels, 3, 16).eval()
    clean = pixels.clamp(torch.randn(2, 2, 32, 32, 3))
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    perturbed = pixel_fgsm(student, clean, teacher, pixels, epsilon=0.03, steps=5)
    moved = (perturbed - clean) / pixels.unit(clean)                       # in [0, 1] pixel units
    assert moved.abs().max() <= 0.03 + 1e-5 and moved.abs().max() > 0.02
    assert torch.equal(pixels.clamp(perturbed), perturbed)
    with torch.no_grad():
        assert kd_loss(student(perturbed), teacher).sum() > kd_loss(student(clean), teacher).sum()


def test_the_exported_backbone_re_extracts_the_features_the_architecture_saw(videos, cli_run, tmp_path):
    out, _ = cli_run
    rows = list(csv.DictReader(open(videos)))
    subset = tmp_path / "two.csv"
    with open(subset, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:2])
    summary = run_extract(ExtractConfig(manifest=subset, root=videos.parent, out=tmp_path / "store",
                                        backbone="resnet18", weights=str(out / "backbone.pt"), frame_size=64,
                                        device="cpu", dtype="float32", workers=1), show_progress=False)
    assert summary.exit_code == 0
    store = FeatureStore.open(tmp_path / "store")
    features = store.provenance()["features"]
    assert features["weights"] == f"file:{(out / 'backbone.pt').resolve()}"          # names the run
    assert features["weights_sha256"] == json.loads((out / "backbone.json").read_text())["weights_sha256"]
    assert features["weights_sha256"] == state_dict_sha256(safe_load(out / "backbone.pt"))
    # the store's pooled features are what the fine-tuned backbone gave the architecture at test time
    net = build_backbone("resnet18", str(out / "backbone.pt"), eval_preprocess(64), "cpu", "fp32").model
    from extract.decode import open_source
    frames = open_source(videos.parent / rows[0]["path"]).read(torch.arange(3).numpy())
    clip = eval_clip(torch.from_numpy(frames).permute(0, 3, 1, 2), eval_preprocess(64)).permute(0, 2, 3, 1)
    with torch.no_grad():
        seen = TrainableBackbone(net, TUNING, None).eval()(normalise(clip[None], eval_preprocess(64)))
    stored = store.read(rows[0]["video_id"], "pooled", steps=[0, 1, 2])
    assert torch.allclose(seen.mean(dim=(2, 3)), torch.from_numpy(stored), atol=1e-4)


def test_methods_that_append_pixel_copies_are_refused(videos, tmp_path):
    with pytest.raises(RunError, match="method 'ada' appends adversarial copies"):
        finetune(config_for(videos, tmp_path / "ada", method="ada"))
    with pytest.raises(ValueError, match="has no hyper-parameter 'backbone_lr'"):
        finetune(config_for(videos, tmp_path / "typo", hparams={"backbone_lr": 0.1}))
