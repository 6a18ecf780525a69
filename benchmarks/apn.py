"""Cost of APN with and without its video ADA, and the calibration of the ADA step η on cached features.

    python benchmarks/apn.py [--videos 1603] [--batch 40] [--steps 3] [--heads apn trn-attn trn] [--device auto]
    python benchmarks/apn.py --calibrate [--videos 1603] [--epochs 10] [--etas 1 10 ... 100000] [--signal 0.05]
        [--probe 160] [--threads 1]

Features are synthetic, at the size of UCF-HMDB DG's source (UCF ``ucf_train``: 1,603 videos, M = 5 segments,
2048-d pooled ResNet-50 features, 12 classes): per class a random non-negative prototype, per video
ReLU(prototype + noise), so they are non-negative with ResNet-like means (~0.4).

Cost table: parameters, seconds per update (the mean of ``--steps`` updates after one warm-up) and per epoch
(ceil(videos / batch) updates) of each architecture trained by ``erm`` (ADA off) and by ``video-ada`` (ADA on,
its defaults: two copies, T_max = 5), and the measured factor. On the CPU with ``--threads`` (default 1, steady
on a shared machine), or CUDA.

Calibration (``--calibrate``): APN is trained by ERM for ``--epochs`` epochs with its recipe (SGD, lr 1e-3), then
for each η the video-ADA ascent of the defaults (fixed mode, γ = 0.01, T_max = 5) runs from the first ``--probe``
training videos and the table gives the median relative shift ‖X' - X‖ / ‖X‖ of the copies and the accuracy and
CE of the model's prediction (level III) on them, beside the clean videos'.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[0] = str(Path(__file__).resolve().parents[1])   # the repository root, as in benchmarks/train.py

import heads  # noqa: E402
from heads import LabelledBatch  # noqa: E402
from pipelines.runs import resolve_device  # noqa: E402

NUM_SEGMENTS, CHANNELS, NUM_CLASSES = 5, 2048, 12


def synthetic_features(videos: int, signal: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[videos, 5, 2048] non-negative features, labels [videos]: ReLU(base + class offset + noise), the offsets
    ``signal`` times N(0, 1) per class and channel, the noise 0.6 N(0, 1) per value (a class signal a model learns
    in a few epochs without saturating)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 1, CHANNELS, generator=g) * 0.8
    prototypes = base + signal * torch.randn(NUM_CLASSES, 1, CHANNELS, generator=g)
    labels = torch.randint(NUM_CLASSES, (videos,), generator=g)
    noise = 0.6 * torch.randn(videos, NUM_SEGMENTS, CHANNELS, generator=g)
    return torch.relu(prototypes[labels] + noise), labels


def build(arch: str, method: str, batch: int, device: torch.device, **overrides):
    torch.manual_seed(0)
    return heads.build(arch, method, (CHANNELS,), NUM_CLASSES, NUM_SEGMENTS,
                       {"batch_size": batch, **overrides}).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_update(model, batch: LabelledBatch, steps: int, device: torch.device) -> float:
    model.train()
    model.update(batch, None, 0.0)                         # warm-up: gradients and momentum buffers exist
    synchronize(device)
    started = time.perf_counter()
    for step in range(steps):
        model.update(batch, None, step / steps)
    synchronize(device)
    return (time.perf_counter() - started) / steps


def cost_table(args, device: torch.device) -> None:
    x, y = synthetic_features(args.batch)
    batch = LabelledBatch(x.to(device), y.to(device))
    updates = math.ceil(args.videos / args.batch)
    print(f"| architecture | parameters | s / update, ADA off (erm) | s / update, ADA on (video-ada) | factor "
          f"| s / epoch off | s / epoch on ({args.videos} videos, batch {args.batch}) |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.heads:
        off_model = build(arch, "erm", args.batch, device)
        count = sum(p.numel() for p in off_model.parameters())
        off = seconds_per_update(off_model, batch, args.steps, device)
        on = seconds_per_update(build(arch, "video-ada", args.batch, device), batch, args.steps, device)
        print(f"| {arch} | {count / 1e6:.2f}M | {off:.3f} | {on:.3f} | {on / off:.1f} | {off * updates:.0f} "
              f"| {on * updates:.0f} |", flush=True)


def calibrate(args, device: torch.device) -> None:
    x, y = synthetic_features(args.videos, args.signal)
    x, y = x.to(device), y.to(device)
    model = build("apn", "video-ada", args.batch, device)
    erm = build("apn", "erm", args.batch, device)
    erm.arch = model.arch                                  # train the same architecture by ERM first
    erm.setup_optimizers()
    batches = list(torch.arange(len(y), device=device).split(args.batch))
    probed = torch.arange(min(len(y), args.probe), device=device)
    for epoch in range(args.epochs):
        erm.train()
        order = torch.randperm(len(y), device=device)
        for step, index in enumerate(order.split(args.batch)):
            erm.update(LabelledBatch(x[index], y[index]), None, (epoch * len(batches) + step) /
                       (args.epochs * len(batches)))
    model.eval()
    with torch.no_grad():
        clean = model.predict(x[probed])
    print(f"APN after {args.epochs} ERM epochs on {args.videos} synthetic videos (signal {args.signal}); on the "
          f"{len(probed)} probed training videos: accuracy {(clean.argmax(1) == y[probed]).float().mean():.3f}, CE "
          f"{F.cross_entropy(clean, y[probed]):.3f}; mean x {x.mean():.3f}\n")
    print("| η | median ‖ΔX‖/‖X‖ level II | median ‖ΔX‖/‖X‖ level III | accuracy on copies II / III "
          "| CE (level III logits) on copies II / III |")
    print("|---|---|---|---|---|")
    for eta in args.etas:
        model.hparams["video_ada_step"] = eta
        shifts, logits = {level: [] for level in model.levels}, {level: [] for level in model.levels}
        model.train()                                      # as in training: the ascent sets its own mode
        for index in probed.split(args.batch):
            copies, _ = model.adversarial_copies(LabelledBatch(x[index], y[index]))
            for level, copy in zip(model.levels, copies):
                shifts[level].append(((copy - x[index]).flatten(1).norm(dim=1) / x[index].flatten(1).norm(dim=1)))
                with torch.no_grad():
                    logits[level].append(model.eval().predict(copy))
                model.train()
        row = [f"{torch.cat(shifts[level]).median():.4f}" for level in model.levels]
        accuracy = " / ".join(f"{(torch.cat(logits[level]).argmax(1) == y[probed]).float().mean():.3f}"
                              for level in model.levels)
        ce = " / ".join(f"{F.cross_entropy(torch.cat(logits[level]), y[probed]):.3f}" for level in model.levels)
        print(f"| {eta:g} | {' | '.join(row)} | {accuracy} | {ce} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=1603, help="source videos (UCF-HMDB DG: 1603)")
    parser.add_argument("--batch", type=int, default=40, help="videos per update (APN §5.1: 40)")
    parser.add_argument("--steps", type=int, default=3, help="timed updates per measurement")
    parser.add_argument("--heads", nargs="+", default=["apn", "trn-attn", "trn"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--calibrate", action="store_true", help="print the η calibration table instead")
    parser.add_argument("--epochs", type=int, default=10, help="ERM epochs before the calibration")
    parser.add_argument("--etas", type=float, nargs="+", default=[1, 10, 100, 1000, 10000, 100000])
    parser.add_argument("--signal", type=float, default=0.05, help="class signal of the synthetic features")
    parser.add_argument("--probe", type=int, default=160, help="training videos the calibration ascends from")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"pooled {CHANNELS}-d, M = {NUM_SEGMENTS}, {NUM_CLASSES} classes, {where}, torch {torch.__version__}\n")
    calibrate(args, device) if args.calibrate else cost_table(args, device)


if __name__ == "__main__":
    main()
