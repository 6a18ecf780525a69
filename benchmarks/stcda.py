"""STCDA's seconds per epoch at UCF-HMDB_full size on two streams (RGB + flow), per training stage of §4.2.

    .venv/bin/python benchmarks/stcda.py                       # 1438 + 840 videos, 1024-d, batch 64: minutes on CPU
    .venv/bin/python benchmarks/stcda.py --scale 0.25 --epochs 1   # a quick look

A store of random pooled features with the real counts (UCF train 1438 labelled, HMDB train 840 unlabelled, 12
classes; ``benchmarks/train.py``'s ``build_store``, once per stream: ``rgb`` and ``flow``, ``--channels`` wide,
as BN-Inception's and I3D's 1024-d features) is loaded into memory as ``vidshift train --stream rgb,flow`` holds
it, and one epoch of each stage is timed on the trainer's data path (``FeatureSet.epoch_plans``, ``iterate``)
with ``model.update``: batches of 64 source videos (§4.2) and the trainer's target share (37), paper defaults
otherwise (k = 4096 memory negatives, τ = 0.07, GRU 512). Stage 1 is STCL alone, stage 2 adds L_CE, stage 3 adds
VCA; its ``before_epoch`` (K-means of the target from the memory bank) is timed apart. Two settings: the I3D rows
(one cached step per clip: 3 segments, ``clip_steps=1``) and the BN-Inception rows (per-frame features, a clip of
``--clip-steps`` steps: 3 x L segments, temporal negatives on). ERM on the same network and data is the
reference. Evaluation, checkpoints and logging are left out. The fastest of ``--epochs`` epochs per stage.
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

# Run as a script, Python puts this directory first on the path; the repository root takes its place.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import heads  # noqa: E402
from benchmarks.extract import format_markdown, load_average, machine_line  # noqa: E402
from benchmarks.train import build_store, video_entries  # noqa: E402
from extract.store import FeatureStore  # noqa: E402
from heads import LabelledBatch, UnlabelledBatch  # noqa: E402
from pipelines.data import FeatureSet, iterate, place_features, target_batch_size  # noqa: E402
from pipelines.runs import resolve_device  # noqa: E402

STREAMS = ("rgb", "flow")


def time_stages(source: FeatureSet, target: FeatureSet, channels: int, classes: int, method: str, segments: int,
                overrides: dict, epochs: int, device: torch.device) -> dict[str, float]:
    """Seconds of the fastest epoch of each stage (and of stage 3's K-means) of ``method`` on the stcda network."""
    torch.manual_seed(0)
    stages = {"stcl_epochs": epochs, "ce_epochs": epochs} if method == "stcda" else {}
    model = heads.build("stcda", method, {s: (channels,) for s in STREAMS}, classes, segments,
                        {**overrides, "epochs": 3 * epochs, **stages})
    model.to(device).train()
    hp = model.hparams
    batches = math.ceil(len(source) / hp["batch_size"])
    target_batch = target_batch_size(hp["batch_size"], len(source), len(target))
    fastest: dict[str, float] = {}
    for epoch in range(3 * epochs):
        generator = torch.Generator().manual_seed(epoch)
        source_plans = source.epoch_plans(segments, hp["batch_size"], batches, "random", generator)
        target_plans = target.epoch_plans(segments, target_batch, batches, "random", generator)
        stage = f"stage {epoch // epochs + 1}" if method == "stcda" else "erm"
        started = time.perf_counter()
        model.before_epoch(None, epoch / (3 * epochs))
        clustered = time.perf_counter()
        for step, ((plan, x_source), (target_plan, x_target)) in enumerate(
                zip(iterate(source, source_plans, 0, device), iterate(target, target_plans, 0, device))):
            index = torch.from_numpy(plan.videos).to(device)
            model.update(LabelledBatch(x_source, source.labels[plan.videos].to(device), index=index),
                         UnlabelledBatch(x_target, torch.from_numpy(target_plan.videos).to(device)),
                         (epoch * batches + step) / (3 * epochs * batches))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        done = time.perf_counter()
        fastest[stage] = min(fastest.get(stage, math.inf), done - clustered)
        if stage == "stage 3":
            fastest["k-means"] = min(fastest.get("k-means", math.inf), clustered - started)
    return fastest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source-videos", type=int, default=1438, help="UCF-HMDB_full: UCF train")
    parser.add_argument("--target-videos", type=int, default=840, help="UCF-HMDB_full: HMDB train")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies both video counts")
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--channels", type=int, default=1024, help="feature width of each stream")
    parser.add_argument("--steps", type=int, default=25, help="cached steps per video")
    parser.add_argument("--clip-steps", type=int, default=4, help="steps per clip of the BN-Inception setting")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed per stage (the fastest is reported)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    counts = (max(1, round(args.source_videos * args.scale)), max(1, round(args.target_videos * args.scale)))
    started, load_before = time.strftime("%Y-%m-%d %H:%M %Z"), load_average()
    work = Path(tempfile.mkdtemp(prefix="vidshift-bench-stcda-"))
    rows = []
    try:
        source_entries, target_entries = video_entries(*counts, args.classes)
        for stream in STREAMS:
            build_store(work / "store", "hdf5", "pooled", source_entries + target_entries, args.steps,
                        (args.channels,), stream)
        store = FeatureStore.open(work / "store")
        classes = {label: i for i, label in enumerate(sorted({e.label for e in source_entries}))}
        source = FeatureSet(store, source_entries, "pooled", classes, streams=STREAMS)
        target = FeatureSet(store, target_entries, "pooled", classes, labelled=False, streams=STREAMS)
        place_features([(source, None), (target, None)], "memory", device, budget_bytes=0)
        settings = [("I3D rows: a step is a clip", 3, {"clip_steps": 1}),
                    (f"BN-Inception rows: {args.clip_steps} steps a clip", 3 * args.clip_steps,
                     {"clip_steps": args.clip_steps})]
        for label, segments, overrides in settings:
            for method in ("erm", "stcda"):
                print(f"timing {method}, {label} ...", file=sys.stderr)
                timings = time_stages(source, target, args.channels, len(classes), method, segments, overrides,
                                      args.epochs, device)
                rows.append([label, method, str(segments), *(f"{timings[key]:.2f}" if key in timings else "-"
                                                            for key in ("erm", "stage 1", "stage 2", "stage 3",
                                                                        "k-means"))])
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"vidshift STCDA benchmark, {started}")
    print(f"machine: {machine_line(device)}")
    print(f"setup: {counts[0]} source + {counts[1]} target videos, streams rgb + flow ({args.channels}-d pooled), "
          f"{args.classes} classes, batch 64 + {target_batch_size(64, *counts)}, features in memory, device {device}, "
          f"fastest of {args.epochs} epoch(s) per stage")
    print(f"load average (1, 5, 15 min): {load_before} at start, {load_average()} at end")
    print(format_markdown([["setting", "method", "segments", "erm s/epoch", "stage 1 s/epoch", "stage 2 s/epoch",
                            "stage 3 s/epoch", "k-means s"], *rows]))


if __name__ == "__main__":
    main()
