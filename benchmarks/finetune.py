"""The end-to-end mode's speed on this machine: videos/s of fine-tuning a backbone with an architecture from raw
video (``vidshift finetune``), beside the cached-feature path on the same videos (``vidshift extract`` once, then
``vidshift train``'s epochs), and their ratio.

It writes synthetic videos (``extract/synth.py``: --videos-per-class per class, the studio domain's train split,
--frames frames at --video-size px), then times, with the same architecture and ERM:

- **fine-tune**: an epoch as ``vidshift finetune`` runs it (evaluation and checkpoints left out): TSN plans with
  the multi-scale crop and flip, frames decoded by --workers DataLoader processes, ``model.update`` through the
  backbone (partial BN, SGD), after one warm-up update;
- **extract**: ``run_extract`` of the same videos at the same frame size, every frame (the store the cached path
  reads: done once, whatever the number of epochs);
- **cached epoch**: an epoch of ``vidshift train`` on that store, features in memory (fastest of 3).

    .venv/bin/python benchmarks/finetune.py                        # ResNet-50, 224 px, 5 segments
    .venv/bin/python benchmarks/finetune.py --backbone resnet18 --frame-size 112   # a quick look
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])

import heads  # noqa: E402
from benchmarks.extract import format_markdown, load_average, machine_line  # noqa: E402
from extract.manifest import read_manifest  # noqa: E402
from extract.run import ExtractConfig, run_extract  # noqa: E402
from extract.store import FeatureStore  # noqa: E402
from extract.synth import SynthConfig, generate  # noqa: E402
from heads import LabelledBatch  # noqa: E402
from pipelines.data import FeatureSet, iterate  # noqa: E402
from pipelines.finetune_model import FINETUNE_HPARAMS, BackboneFactory, end_to_end  # noqa: E402
from pipelines.runs import resolve_device  # noqa: E402
from pipelines.video_data import VideoSet, iterate_clips, normalise, probe_videos  # noqa: E402

DOMAIN = "studio"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--frame-size", type=int, default=224)
    parser.add_argument("--segments", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4, help="videos per update")
    parser.add_argument("--videos-per-class", type=int, default=5, help="the 6 classes' train split gets 3/5 of them")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--video-size", type=int, default=128, help="synthetic frames' side (studio: square)")
    parser.add_argument("--heads", nargs="+", default=["tempooling", "stdn"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--workers", type=int, default=2)
    return parser.parse_args(argv)


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def finetune_epoch(args, videos: VideoSet, head: str, device: torch.device, classes: int) -> float:
    """Seconds of one fine-tuning epoch (after a warm-up update) at the trainer's settings."""
    tuning = {name: spec.default for name, spec in FINETUNE_HPARAMS.items()}
    precision = "bf16" if args.precision == "auto" else args.precision
    factory = BackboneFactory(args.backbone, "none", args.frame_size, precision, tuning, seed=0)
    backbone = factory.build()
    arch_cls = heads.architectures()[head]
    model = heads.build(head, "erm", factory.feature_shape(arch_cls.input), classes, args.segments,
                        {"batch_size": args.batch_size},
                        wrap=lambda arch: end_to_end(arch, backbone, factory.pixel_space(), args.frame_size))
    model.to(device).train()
    batches = math.ceil(len(videos) / args.batch_size)
    plans = videos.training_plans(args.segments, args.batch_size, batches + 1, "random",
                                  torch.Generator().manual_seed(0))
    started = None
    for step, (plan, clips) in enumerate(iterate_clips(videos, plans, factory.preprocess, args.workers)):
        if step == 1:                      # after the warm-up update
            synchronise(device)
            started = time.perf_counter()
        x = normalise(clips.frames.to(device), factory.preprocess)
        model.update(LabelledBatch(x, videos.labels[plan.videos[clips.kept]].to(device)), None, 0.0)
    synchronise(device)
    return time.perf_counter() - started


def cached_epoch(args, store_path: Path, entries, head: str, device: torch.device, classes: list[str]) -> float:
    """Seconds of one ``vidshift train`` epoch on the store, features in memory (fastest of 3)."""
    arch_cls = heads.architectures()[head]
    features = FeatureSet(FeatureStore.open(store_path), entries, arch_cls.input,
                          {name: i for i, name in enumerate(classes)})
    features.load(device)
    row = features.read(0, [0])
    shape = tuple(row.shape[1:])
    model = heads.build(head, "erm", shape, len(classes), args.segments, {"batch_size": args.batch_size}).to(device)
    model.train()
    batches = math.ceil(len(features) / args.batch_size)
    times = []
    for epoch in range(3):
        plans = features.epoch_plans(args.segments, args.batch_size, batches, "random",
                                     torch.Generator().manual_seed(epoch))
        synchronise(device)
        started = time.perf_counter()
        for plan, x in iterate(features, plans, 0, device):
            model.update(LabelledBatch(x, features.labels[plan.videos].to(device)), None, 0.0)
        synchronise(device)
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    started, load_before = time.strftime("%Y-%m-%d %H:%M %Z"), load_average()
    work = Path(tempfile.mkdtemp(prefix="vidshift-bench-finetune-"))
    try:
        manifest = generate(work / "videos", SynthConfig(videos_per_class=args.videos_per_class,
                                                         num_frames=args.frames, frame_size=args.video_size,
                                                         domains=(DOMAIN,)))
        entries = [e for e in read_manifest(manifest) if e.split == "train"]
        classes = sorted({entry.label for entry in entries})
        frames, failures = probe_videos(entries, manifest.parent, args.workers)
        videos = VideoSet(entries, manifest.parent, frames, {name: i for i, name in enumerate(classes)})
        subset = work / "train.csv"
        subset.write_text("path,label,domain,split,video_id\n" + "".join(
            f"{e.path},{e.label},{e.domain},{e.split},{e.video_id}\n" for e in entries))
        print(f"{len(videos)} videos, {args.backbone} at {args.frame_size} px on {device} ...", file=sys.stderr)
        extract_started = time.perf_counter()
        run_extract(ExtractConfig(manifest=subset, root=manifest.parent, out=work / "store", backbone=args.backbone,
                                  weights="none", frame_size=args.frame_size, device=args.device,
                                  precision=args.precision if device.type == "cuda" else "auto",
                                  dtype="float32", workers=max(args.workers, 1)), show_progress=False)
        extract_s = time.perf_counter() - extract_started
        cells = [["architecture", "fine-tune epoch s", "fine-tune videos/s", "cached epoch s", "cached videos/s",
                  "fine-tune / cached epoch", "fine-tune / (extract + 1 cached epoch)"]]
        for head in args.heads:
            tuned = finetune_epoch(args, videos, head, device, len(classes))
            cached = cached_epoch(args, work / "store", entries, head, device, classes)
            cells.append([head, f"{tuned:.1f}", f"{len(videos) / tuned:.2f}", f"{cached:.3f}",
                          f"{len(videos) / cached:.0f}", f"{tuned / cached:.0f}x", f"{tuned / (extract_s + cached):.2f}x"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{machine_line(device)}; {started}, load {load_before} -> {load_average()}")
    print(f"{len(videos)} videos of {args.frames} frames ({args.video_size} px), {args.backbone} at "
          f"{args.frame_size} px, {args.segments} segments, batch {args.batch_size}, ERM, SGD, partial BN, "
          f"{args.workers} decode workers; extract (every frame, once): {extract_s:.1f} s "
          f"({len(videos) / extract_s:.2f} videos/s)\n")
    print(format_markdown(cells))


if __name__ == "__main__":
    main()
