"""Cost of the STDN architectures on ResNet-50 layer4 maps (7x7x2048, N=5 segments): parameters, time, memory.

    python benchmarks/stdn.py [--batch 8 32] [--steps 3] [--heads stdn tsn-maps ...] [--per-scale]
        [--device auto|cpu|cuda]

Each architecture is trained by ERM, i.e. on STDN's eq. 8 (``build(arch, "erm", ...)``). Each measurement runs
in a fresh process, so that its peak memory is its own: one warm-up update, then
``--steps`` timed updates on a random batch (CUDA synchronised), on the CPU with torch's default threads or on
the GPU. "peak" is the process's peak RSS on the CPU (``ru_maxrss``) and the peak allocated GPU memory on CUDA;
"over model" subtracts the value once the model and the batch exist, leaving the activations, gradients and
optimiser state of an update. An epoch is estimated for UCF101's DG train list (1,603 videos, STDN's
``ucf_train``) at the measured time per update.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

# Run as a script, Python puts this directory first on the path (where extract.py would shadow the package); the
# repository root takes its place, as in benchmarks/train.py.
sys.path[0] = str(Path(__file__).resolve().parents[1])

MAP_SHAPE, NUM_SEGMENTS, NUM_CLASSES = (7, 7, 2048), 5, 12
EPOCH_VIDEOS = 1603
HEADS = ["tsn-maps", "stdn-sgm", "stdn-trm", "stdn-strm", "stdn-mixstyle", "stdn"]


def peak_mib(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA; peak resident memory of the process on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # Linux reports KiB


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(name: str, spatial_modules: str, batch: int):
    """Architecture ``name`` trained by ERM (STDN's eq. 8)."""
    from heads import build as build_model

    return build_model(name, "erm", MAP_SHAPE, NUM_CLASSES, NUM_SEGMENTS, {"spatial_modules": spatial_modules,
                                                                          "batch_size": batch})


def measure(name: str, spatial_modules: str, batch: int, steps: int, device: torch.device) -> dict:
    """Time and memory of ``steps`` updates of one architecture, in this process."""
    from heads import LabelledBatch

    torch.manual_seed(0)
    model = build(name, spatial_modules, batch).to(device).train()
    maps = torch.rand(batch, NUM_SEGMENTS, *MAP_SHAPE, device=device)   # non-negative, like post-ReLU layer4 maps
    src = LabelledBatch(maps, torch.randint(NUM_CLASSES, (batch,), device=device))
    synchronize(device)
    before = peak_mib(device)
    model.update(src, None, 0.0)                             # warm-up: allocates gradients and momentum
    synchronize(device)
    started = time.perf_counter()
    for step in range(steps):
        model.update(src, None, step / steps)
    synchronize(device)
    per_update = (time.perf_counter() - started) / steps
    with torch.no_grad():
        started = time.perf_counter()
        model.eval().predict(maps)
        synchronize(device)
        per_eval = time.perf_counter() - started
    peak = peak_mib(device)
    return {"seconds_per_update": per_update, "seconds_per_eval_batch": per_eval, "peak_mib": peak,
            "over_model_mib": peak - before}


def parameters(name: str, spatial_modules: str) -> int:
    return sum(p.numel() for p in build(name, spatial_modules, 32).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--heads", nargs="+", default=HEADS, help="architectures to measure")
    parser.add_argument("--per-scale", action="store_true", help="also measure stdn with per-scale copies")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--measure", nargs=3, metavar=("HEAD", "MODULES", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # the child process: one measurement, as JSON on stdout, on the device the parent resolved
        name, modules, batch = args.measure
        print(json.dumps(measure(name, modules, int(batch), args.steps, torch.device(args.device))))
        return

    from pipelines.runs import resolve_device  # here, so that the children's peak RSS holds no pipeline imports

    device = resolve_device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"cpu, {torch.get_num_threads()} threads")
    memory = "peak GPU MiB" if device.type == "cuda" else "peak RSS MiB"
    configs = [(name, "shared") for name in args.heads] + ([("stdn", "per_scale")] if args.per_scale else [])
    print(f"maps {'x'.join(map(str, MAP_SHAPE))}, N={NUM_SEGMENTS}, {NUM_CLASSES} classes, {where}, "
          f"torch {torch.__version__}\n")
    print("| architecture | spatial modules | parameters | batch | s / update | s / epoch (1,603 videos) "
          f"| s / eval batch | {memory} | over model MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, modules in configs:
        count = parameters(name, modules)
        for batch in args.batch:
            child = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--device", str(device),
                                    "--measure", name, modules, str(batch)], capture_output=True, text=True,
                                   check=True)
            result = json.loads(child.stdout.strip().splitlines()[-1])
            epoch = math.ceil(EPOCH_VIDEOS / batch) * result["seconds_per_update"]
            print(f"| {name} | {modules} | {count / 1e6:.2f}M | {batch} | {result['seconds_per_update']:.2f} "
                  f"| {epoch:.0f} | {result['seconds_per_eval_batch']:.2f} | {result['peak_mib']:.0f} "
                  f"| {result['over_model_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
