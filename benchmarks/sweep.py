"""A grid of short runs on cached features: ``vidshift sweep`` (long-lived workers that load the store once) against
the same runs as separate ``vidshift train`` processes (each paying Python and torch start-up, the store's opening
and the feature read again), on a UCF-HMDB_full-sized pooled store.

The goal grid (issue 17): 5 rows x 3 seeds x 2 directions, 30 epochs: source-only TemPooling and TemRelation, and
DANN, TA2N and TA3N on TemRelation (TA3N Table 3's rows), U->H (da: HMDB unlabelled) and H->U. The store is built
through the store API with random 2048-d pooled features of the real counts (UCF 1438 train / 571 val, HMDB 840 /
360; the TA3N manifests call HMDB's test split val): the numbers are meaningless, the work is the real one.

    .venv/bin/python benchmarks/sweep.py                                     # the goal grid (a GPU node)
    .venv/bin/python benchmarks/sweep.py --scale 0.25 --seeds 0 --epochs 5   # a 2-core CPU in a few minutes

Both modes run ``--slots`` runs at a time (the sweep: K worker processes; separate: K processes at once) with the
same settings, into fresh directories, and the script checks that both wrote the same per-epoch numbers. Times are
whole wall times (the sweep command's, and the separate processes' from the first start to the last exit). It
prints a table and asserts nothing.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

sys.path[0] = str(Path(__file__).resolve().parents[1])   # import the checkout, as benchmarks/train.py does

from benchmarks.extract import format_markdown, load_average, machine_line  # noqa: E402
from benchmarks.train import build_store  # noqa: E402
from extract.manifest import VideoEntry  # noqa: E402
from pipelines.sweep_spec import load_spec, plan  # noqa: E402

ROWS = [("tempooling", "erm", "dg"), ("trn", "erm", "dg"), ("trn", "dann", "da"), ("trn", "ta2n", "da"),
        ("trn", "ta3n", "da")]
COUNTS = {("ucf", "train"): 1438, ("ucf", "val"): 571, ("hmdb", "train"): 840, ("hmdb", "val"): 360}


def write_data(root: Path, scale: float, classes: int, steps: int) -> tuple[Path, Path, float]:
    entries = [VideoEntry(f"{domain}/{split}/{i:05d}", f"{domain}/{split}/{i:05d}.avi", f"class{i % classes:02d}",
                          domain, split)
               for (domain, split), count in COUNTS.items() for i in range(max(classes, round(count * scale)))]
    seconds = build_store(root / "store", "zarr", "pooled", entries, steps, (2048,))
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "domain", "split", "video_id"])
        writer.writerows([e.path, e.label, e.domain, e.split, e.video_id] for e in entries)
    return root / "store", manifest, seconds


def write_spec(root: Path, args: argparse.Namespace) -> Path:
    spec = {"store": "store", "manifest": "manifest.csv", "directions": ["ucf->hmdb", "hmdb->ucf"],
            "seeds": args.seeds, "set": {"epochs": args.epochs}, "train": {"device": args.device, "workers": 0},
            "runs": [{"head": head, "method": method, "setting": setting} for head, method, setting in ROWS]}
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def vidshift(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *arguments]


def run_sweep(spec: Path, out: Path, slots: int) -> float:
    started = time.perf_counter()
    subprocess.run(vidshift("sweep", str(spec), "--out", str(out), "--slots", str(slots)), check=True,
                   stdout=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])
    return time.perf_counter() - started


def run_separately(spec: Path, out: Path, slots: int) -> tuple[float, dict[str, Path]]:
    """Each planned run as its own `vidshift train` process, ``slots`` at a time."""
    runs = plan(load_spec(spec), out)

    def train(run) -> None:
        c = run.config
        command = vidshift("train", "--store", str(c.store), "--manifest", str(c.manifest), "--head", c.head,
                           "--method", c.method, "--source", c.source, "--target", c.target, "--setting", c.setting,
                           "--seed", str(c.seed), "--device", c.device, "--workers", "0", "--out", str(c.out),
                           *[a for name, value in c.hparams.items() for a in ("--set", f"{name}={value}")])
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       cwd=Path(__file__).resolve().parents[1])

    started = time.perf_counter()
    with ThreadPoolExecutor(slots) as pool:
        list(pool.map(train, runs))
    return time.perf_counter() - started, {run.name: run.config.out for run in runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every video count")
    parser.add_argument("--steps", type=int, default=25, help="pooled steps per video")
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--slots", type=int, default=1, help="runs at a time, in both modes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--modes", nargs="+", default=["sweep", "separate"], choices=["sweep", "separate"])
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    with tempfile.TemporaryDirectory(prefix="vidshift-sweep-bench-") as work:
        root = Path(work)
        store, _, build_seconds = write_data(root, args.scale, args.classes, args.steps)
        spec = write_spec(root, args)
        runs = plan(load_spec(spec), root / "sweep")
        times = {}
        if "sweep" in args.modes:
            times["sweep"] = run_sweep(spec, root / "sweep", args.slots)
        if "separate" in args.modes:
            times["separate"], separate_dirs = run_separately(spec, root / "separate", args.slots)
        identical = "-"
        if len(times) == 2:
            identical = "yes" if all(
                json.loads((root / "sweep" / "runs" / name / "metrics.json").read_text())["epochs"]
                == json.loads((path / "metrics.json").read_text())["epochs"]
                for name, path in separate_dirs.items()) else "NO"
    n = len(runs)
    cells = [["mode", "runs", "wall s", "s / run", "vs separate"]]
    for mode, seconds in times.items():
        ratio = f"{times['separate'] / seconds:.2f}x" if "separate" in times else "-"
        cells.append([mode, str(n), f"{seconds:.1f}", f"{seconds / n:.2f}", ratio])
    videos = sum(max(args.classes, round(c * args.scale)) for c in COUNTS.values())
    print(format_markdown(cells))
    print(f"\n{len(ROWS)} rows x {len(args.seeds)} seeds x 2 directions, {args.epochs} epochs, {args.slots} at a time; "
          f"pooled store of {videos} videos x {args.steps} steps x 2048 (scale {args.scale}; built in "
          f"{build_seconds:.0f} s); same per-epoch numbers in both modes: {identical}.")
    print(f"{machine_line(device)}; {load_average()}")


if __name__ == "__main__":
    main()
