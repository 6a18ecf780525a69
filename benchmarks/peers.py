"""vidshift side by side with its two public peers, on this machine: the official TA3N code (stage two) and
v-iashin/video_features (stage one, ResNet-50 on the CPU). Prints the measurements and a ratio table.

The peers are local checkouts (nothing is downloaded at run time): cmhungsteve/TA3N and v-iashin/video_features,
run unchanged through the small runners in benchmarks/peers/ (CPU and offline-weights shims). The packages only the
peers need (colorama, tensorboardX, protobuf, omegaconf, antlr4-python3-runtime) live in a separate folder given by
--peer-pythonpath, which goes on the peers' PYTHONPATH only. vidshift itself is the checkout this file lives in:
every vidshift command runs as ``python -c 'from pipelines.cli import main; ...'`` with this checkout first on
PYTHONPATH, so a rerun from another checkout measures that checkout's code. See benchmarks/README.md, "peers.py".

    python benchmarks/peers.py --ta3n /tmp/peers/TA3N --video-features /tmp/peers/video_features \\
        --peer-pythonpath /tmp/peers/pydeps [--only ta3n|extract] [--scale 1.0] [--keep-tree DIR] [--rounds 2]

TA3N (``--only ta3n``):
- a UCF-HMDB_full-sized TA3N feature tree: ``<video>/img_00001.t7`` (one torch.save'd 2048-d float32 tensor per
  frame, non-negative random values), 1438 + 840 train and 571 + 360 val videos of 80-120 frames (~320k files; times
  --scale), with TA3N's list files (``<folder> <num_frames> <class_id>``) and class file;
- ``vidshift store import ta3n`` of the tree, the whole command (the files were just written or read: page cache warm);
- per round (interleaved): the official main.py with script_train_val.sh's TA3N configuration for --epochs epochs
  (its own train() + validate() per epoch, timed by the runner, and its printed total training time), the official
  DataLoaders alone (``--data-only``: TSNDataSet, -j 4, the same batches, no model), and ``vidshift train --head trn
  --method ta3n --setting da`` with ``--features memory`` and ``--features stream`` (epoch seconds from train.log's
  ``epoch N (X.Xs)`` lines: training and evaluation of the epoch, as the official timing); finally one run with
  ``--features auto`` for its choice;
- whole-process wall clock, user/sys CPU, minor faults and peak RSS of each (os.wait4 of the child: the peak of the
  largest process of the tree, DataLoader workers included), and the bytes memory mode says it holds.

Extraction (``--only extract``):
- --videos H.264 test videos of --frames-per-video frames at 320x240 (benchmarks/extract.py's panning scene);
- one seeded random ResNet-50 (torch.manual_seed(0), torchvision's resnet50(weights=None)) saved as a state dict,
  which video_features loads through the runner and vidshift through ``--weights PATH``;
- per round: video_features (every frame, its default batch size 1, save_numpy) and ``vidshift extract --sampling
  all --device cpu`` with its defaults and with --tuned batch/workers; OMP_NUM_THREADS=MKL_NUM_THREADS=1 for all
  (video_features also torch.set_num_threads(1)); whole-process wall clock -> frames/s, user/sys CPU, minor faults,
  peak RSS;
- the equivalence check: video_features' [T, 2048] output against vidshift's ``pooled`` of the same frames (every
  frame on both sides): the smallest per-frame cosine and the largest absolute difference.

Medians over rounds (and over the epochs within a run); --rounds 1 for a quick look.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from children import (RUNNERS, Usage, checked, load_average, machine_line, measured_checkout, median, peer_commit,
                      peer_env, run_child, say, table, vidshift, vidshift_env)
from peers_extract import bench_extract

CLASSES = ["climb", "fencing", "golf", "kick_ball", "pullup", "punch", "pushup", "ride_bike", "ride_horse",
           "shoot_ball", "shoot_bow", "walk"]  # TA3N's data/classInd_hmdb_ucf.txt
# UCF-HMDB_full (TA3N): (vidshift domain, TA3N dataset name, split, videos)
TA3N_SETS = [("ucf", "ucf101", "train", 1438), ("hmdb", "hmdb51", "train", 840),
             ("ucf", "ucf101", "val", 571), ("hmdb", "hmdb51", "val", 360)]
FRAMES = (80, 120)  # frames per video, inclusive
CHANNELS = 2048
EPOCH_LINE = re.compile(r"epoch (\d+) \((\d+(?:\.\d+)?)s\)")
FEATURES_LINE = re.compile(r"features \d+ of \d+ sets[^\n]*")
MIB = re.compile(r"\((\d+(?:\.\d+)?) MiB")


# ----------------------------------------------------------------------------------------------------- TA3N tree

def tree_sizes(scale: float) -> list[tuple[str, str, str, int]]:
    return [(domain, name, split, max(2, round(count * scale))) for domain, name, split, count in TA3N_SETS]


def list_path(tree: Path, name: str, split: str) -> Path:
    return tree / name / f"list_{name}_{split}_hmdb_ucf-feature.txt"  # script_train_val.sh's naming


def build_tree(tree: Path, scale: float, seed: int, ta3n: Path | None) -> tuple[int, int, float]:
    """Write (or reuse) the feature tree, its lists and class file; returns (videos, files, seconds to build)."""
    sizes = tree_sizes(scale)
    description = {"sizes": sizes, "frames": FRAMES, "channels": CHANNELS, "seed": seed}
    marker = tree / "tree.json"
    if marker.is_file():
        built = json.loads(marker.read_text())
        if built.get("description") == json.loads(json.dumps(description)):
            say(f"reusing the TA3N tree in {tree}")
            return built["videos"], built["files"], 0.0
        raise SystemExit(f"--keep-tree {tree} holds a tree of other sizes ({built.get('description')}); remove it "
                         f"or give another folder")
    if tree.exists() and any(tree.iterdir()):
        raise SystemExit(f"--keep-tree {tree}: not empty and not a tree this script built; give an empty folder")
    rng = np.random.default_rng(seed)
    started, videos, files = time.perf_counter(), 0, 0
    official_classes = ta3n / "data" / "classInd_hmdb_ucf.txt" if ta3n else None
    tree.mkdir(parents=True, exist_ok=True)
    if official_classes and official_classes.is_file():
        shutil.copyfile(official_classes, tree / "classInd_hmdb_ucf.txt")
    else:
        (tree / "classInd_hmdb_ucf.txt").write_text("".join(f"{i} {name}\n" for i, name in enumerate(CLASSES)))
    for domain, name, split, count in sizes:
        say(f"writing {count} {name} {split} videos ...")
        lines = []
        for i in range(count):
            label = i % len(CLASSES)
            folder = tree / name / "RGB-feature" / f"v_{split}_{i:05d}_c{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            frames = int(rng.integers(FRAMES[0], FRAMES[1] + 1))
            vectors = np.abs(rng.standard_normal((frames, CHANNELS), dtype=np.float32))
            for t in range(frames):
                # one tensor of its own per file: a view would save the whole video's storage in every file
                torch.save(torch.tensor(vectors[t]), folder / f"img_{t + 1:05d}.t7")
            lines.append(f"{folder} {frames} {label}\n")
            files += frames
        list_path(tree, name, split).write_text("".join(lines))
        videos += count
    seconds = time.perf_counter() - started
    marker.write_text(json.dumps({"description": description, "videos": videos, "files": files,
                                  "build_seconds": seconds}))
    return videos, files, seconds


# ------------------------------------------------------------------------------------------------------- TA3N runs

@dataclass
class Case:
    label: str
    usages: list[Usage] = field(default_factory=list)
    epochs: list[float] = field(default_factory=list)   # every epoch of every round
    train: list[float] = field(default_factory=list)    # official: train() only
    val: list[float] = field(default_factory=list)      # official: validate() only
    printed: list[float] = field(default_factory=list)  # official: printed total training time / epochs
    notes: list[str] = field(default_factory=list)

    def usage(self) -> Usage:
        """The round with the median wall clock."""
        ordered = sorted(self.usages, key=lambda u: u.wall)
        return ordered[(len(ordered) - 1) // 2]


def batch_sizes(sizes) -> tuple[int, int]:
    n_source = next(c for d, _, s, c in sizes if d == "ucf" and s == "train")
    n_target = next(c for d, _, s, c in sizes if d == "hmdb" and s == "train")
    return 128, 128 * n_target // n_source  # script_train_val.sh: bS_2 = bS * num_target / num_source (bash ints)


def official_command(args, tree: Path, run: Path, data_only: bool) -> list[str]:
    """script_train_val.sh's training command (dataset hmdb_ucf, U->H hyper-parameters) for --epochs epochs."""
    b_source, b_target = batch_sizes(tree_sizes(args.scale))
    runner = [sys.executable, str(RUNNERS / "run_ta3n.py"), str(args.ta3n), str(run / "times.jsonl")]
    if data_only:
        runner.append("--data-only")
    return [*runner, "--",
            str(tree / "classInd_hmdb_ucf.txt"), "RGB", str(list_path(tree, "ucf101", "train")),
            str(list_path(tree, "hmdb51", "train")), str(list_path(tree, "hmdb51", "val")),
            "--exp_path", f"{run}/exp/", "--arch", "resnet101", "--pretrained", "none", "--baseline_type", "video",
            "--frame_aggregation", "trn-m", "--num_segments", "5", "--val_segments", "5", "--add_fc", "1",
            "--fc_dim", "512", "--dropout_i", "0.5", "--dropout_v", "0.5", "--use_target", "uSv",
            "--share_params", "Y", "--dis_DA", "none", "--alpha", "0", "--place_dis", "N", "Y", "N",
            "--adv_DA", "RevGrad", "--beta", "0.75", "0.75", "0.5", "--place_adv", "Y", "Y", "Y",
            "--use_bn", "none", "--add_loss_DA", "attentive_entropy", "--gamma", "0.003", "--ens_DA", "none",
            "--mu", "0", "--use_attn", "TransAttn", "--n_attn", "1", "--use_attn_frame", "none", "--gd", "20",
            "--lr", "3e-2", "--lr_decay", "10", "--lr_adaptive", "dann", "--lr_steps", "10", "20",
            "--epochs", str(args.epochs), "--optimizer", "SGD", "--n_rnn", "1", "--rnn_cell", "LSTM",
            "--n_directions", "1", "--n_ts", "5", "-b", "128", str(b_target), "128", "-j", str(args.ta3n_workers),
            "-ef", "1", "-pf", "50", "-sf", "50", "--copy_list", "N", "N", "--save_model",
            "--save_best_log", str(run / "best.log")]


def run_official(args, tree: Path, work: Path, case: Case, round_: int, data_only: bool) -> None:
    run = work / f"{'ta3n-loaders' if data_only else 'ta3n-official'}-r{round_}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    log = run / "stdout.log"
    usage = checked(run_child(official_command(args, tree, run, data_only), log, peer_env(args, work), cwd=run),
                    "the official TA3N main.py", log)
    calls = [json.loads(line) for line in (run / "times.jsonl").read_text().splitlines()]
    train = {c["epoch"]: c["seconds"] for c in calls if c["call"] == "train"}
    val = {c["epoch"]: c["seconds"] for c in calls if c["call"] == "validate"}
    case.usages.append(usage)
    case.train += list(train.values())
    case.val += list(val.values())
    case.epochs += [train[e] + val.get(e, 0.0) for e in sorted(train)]
    total = re.findall(r"total training time: (\d+(?:\.\d+)?)", log.read_text(errors="replace"))
    if total and train:
        case.printed.append(float(total[-1]) / len(train))


def run_vidshift_train(args, store: Path, work: Path, case: Case, round_: int, features: str, epochs: int,
                       sampling: str | None = None, disk_copies: bool = True) -> str:
    """One `vidshift train` run; returns its train.log line saying where the features are. Streamed sets get
    their disk copies in WORK/feature-cache (made by the first run that streams them, reused by the later ones),
    or, without ``disk_copies``, are read from the store by the workers."""
    out = work / f"vidshift-{features}{'-' + sampling if sampling else ''}{'' if disk_copies else '-store'}-r{round_}"
    shutil.rmtree(out, ignore_errors=True)
    command = vidshift("train", "--store", store, "--manifest", store / "manifest.csv", "--head", "trn",
                       "--method", "ta3n", "--source", "ucf", "--target", "hmdb", "--setting", "da",
                       "--features", features, "--set", f"epochs={epochs}", "--device", args.device,
                       "--workers", args.vidshift_workers, "--out", out,
                       "--feature-cache", work / "feature-cache" if disk_copies else "none",
                       *(["--train-sampling", sampling] if sampling else []),
                       *(["--no-dynamic-score"] if args.no_dynamic_score else []))
    log = work / f"{out.name}.stdout.log"
    usage = checked(run_child(command, log, vidshift_env()), f"vidshift train --features {features}", log)
    text = (out / "train.log").read_text(errors="replace")
    seconds = [float(s) for _, s in EPOCH_LINE.findall(text)]
    place = FEATURES_LINE.search(text)
    case.usages.append(usage)
    case.epochs += seconds
    case.notes.append(f"start-up and end {usage.wall - sum(seconds):.1f} s")
    return place.group(0) if place else "(no 'features ...' line in train.log)"


def bench_ta3n(args, work: Path) -> tuple[list[str], list[str]]:
    """Every TA3N measurement; returns (header lines, markdown blocks)."""
    if not (args.ta3n / "main.py").is_file():
        raise SystemExit(f"--ta3n {args.ta3n}: no main.py; give a checkout of cmhungsteve/TA3N")
    tree = args.keep_tree or work / "ta3n-tree"
    videos, files, build_seconds = build_tree(tree, args.scale, args.seed, args.ta3n)
    disk = sum(f.stat().st_blocks * 512 for f in tree.rglob("*.t7")) if args.du else 0
    sizes = tree_sizes(args.scale)

    store = work / "ta3n-store"
    lists = [f"--list={d}:{s}={list_path(tree, n, s)}" for d, n, s, _ in sizes]
    imports = []
    for r in range(args.import_rounds):
        shutil.rmtree(store, ignore_errors=True)
        say(f"vidshift store import ta3n ({files} files), round {r + 1} ...")
        log = work / f"import-r{r}.log"
        imports.append(checked(run_child(vidshift("store", "import", "ta3n", tree, *lists, "--classes",
                                                  tree / "classInd_hmdb_ucf.txt", "--out", store,
                                                  "--format", args.format), log, vidshift_env()),
                               "vidshift store import ta3n", log))
    imported = sum(1 for _ in csv.DictReader(open(store / "manifest.csv")))

    official, loaders = Case("official TA3N main.py"), Case("official loaders only (no model)")
    memory, stream = Case("vidshift --features memory"), Case("vidshift --features stream")
    from_store = Case("vidshift --features stream --feature-cache none")
    shutil.rmtree(work / "feature-cache", ignore_errors=True)   # the first streaming run writes the disk copies
    centre = Case("vidshift --features memory --train-sampling centre")
    places = {}
    for r in range(args.rounds):
        say(f"round {r + 1}/{args.rounds}: official TA3N, {args.epochs} epochs ...")
        run_official(args, tree, work, official, r, data_only=False)
        say(f"round {r + 1}/{args.rounds}: vidshift --features memory ...")
        places["memory"] = run_vidshift_train(args, store, work, memory, r, "memory", args.epochs)
        say(f"round {r + 1}/{args.rounds}: official loaders only ...")
        run_official(args, tree, work, loaders, r, data_only=True)
        say(f"round {r + 1}/{args.rounds}: vidshift --features stream ...")
        places["stream"] = run_vidshift_train(args, store, work, stream, r, "stream", args.epochs)
        say(f"round {r + 1}/{args.rounds}: vidshift --features stream --feature-cache none ...")
        places["stream from the store"] = run_vidshift_train(args, store, work, from_store, r, "stream", args.epochs,
                                                             disk_copies=False)
        if args.centre:
            say(f"round {r + 1}/{args.rounds}: vidshift --features memory --train-sampling centre ...")
            places["centre"] = run_vidshift_train(args, store, work, centre, r, "memory", args.epochs, "centre")
    say("vidshift --features auto, 1 epoch ...")
    auto = Case("vidshift --features auto")
    places["auto"] = run_vidshift_train(args, store, work, auto, 0, "auto", 1)

    b_source, b_target = batch_sizes(sizes)
    header = [f"TA3N tree: {' + '.join(str(c) for d, n, s, c in sizes if s == 'train')} train and "
              f"{' + '.join(str(c) for d, n, s, c in sizes if s == 'val')} val videos (ucf + hmdb), "
              f"{FRAMES[0]}-{FRAMES[1]} frames each, {files} .t7 files"
              + (f", {disk / 1e9:.2f} GB on disk" if args.du else "")
              + (f"; built in {build_seconds:.0f} s" if build_seconds else "; reused"),
              f"imported: {imported} videos into a {args.format} store; vidshift --workers {args.vidshift_workers}, "
              f"--device {args.device}; official -j {args.ta3n_workers}, batch 128/{b_target}, 5 segments, "
              f"its val list = hmdb val; {args.rounds} round(s) x {args.epochs} epoch(s)"]
    cols = ["what", "wall s", "user s", "sys s", "minor faults M", "max RSS MB"]
    import_rows = [["`vidshift store import ta3n`" + (f" (round {i + 1})" if len(imports) > 1 else ""),
                    *u.cells()] for i, u in enumerate(imports)]
    imp = median([u.wall for u in imports])
    import_rows.append([f"per file: {imp / files * 1e3:.2f} ms; {files / imp:.0f} files/s", "", "", "", "", ""])

    cases = [official, loaders, memory, stream, from_store] + ([centre] if args.centre else []) + [auto]
    epoch_rows = [["run", "epoch s (median)", "epoch s (all)", "train s", "val s", "videos/s (train)",
                   "wall s (run)", "user s", "sys s", "minor faults M", "max RSS MB"]]
    n_train = sum(c for d, _, s, c in sizes if s == "train")
    for case in cases:
        u = case.usage()
        med = median(case.epochs)
        epoch_rows.append([case.label, f"{med:.2f}", " ".join(f"{s:.1f}" for s in case.epochs),
                           f"{median(case.train):.2f}" if case.train else "",
                           f"{median(case.val):.2f}" if case.val else "",
                           f"{n_train / median(case.train):.0f}" if case.train else "", *u.cells()])
    printed = median(official.printed)
    ratio_rows = [["comparison", "official s", "vidshift s", "vidshift speed-up"]]
    for case in (memory, stream, from_store) + ((centre,) if args.centre else ()):
        ratio_rows.append([f"epoch: official main.py vs {case.label}", f"{median(official.epochs):.2f}",
                           f"{median(case.epochs):.2f}", f"{median(official.epochs) / median(case.epochs):.2f}x"])
    ratio_rows.append([f"epoch: official loaders alone vs {stream.label}", f"{median(loaders.epochs):.2f}",
                       f"{median(stream.epochs):.2f}", f"{median(loaders.epochs) / median(stream.epochs):.2f}x"])
    held = MIB.search(places.get("memory", ""))
    # The baseline without features held: the run reading the store (a disk copy's mapped pages count as RSS too)
    mem_rss, stream_rss = memory.usage().maxrss_mb, from_store.usage().maxrss_mb
    memory_lines = [
        f"- official per-epoch time: train() + validate() of each epoch, timed by benchmarks/peers/run_ta3n.py "
        f"(median {median(official.epochs):.2f} s); its own printed 'total training time' / epochs: "
        f"{printed:.2f} s (includes the loop's bookkeeping between epochs)",
        *[f"- {name}: {line}" for name, line in places.items()],
        f"- vidshift memory mode: peak RSS {mem_rss:.0f} MB"
        + (f" for {float(held.group(1)) * 2**20 / 1e6:.0f} MB held ({mem_rss / (float(held.group(1)) * 2**20 / 1e6):.2f}x;"
           f" the peak RSS when reading the store, holding nothing, {stream_rss:.0f} MB: memory mode's RSS over it "
           f"{(mem_rss - stream_rss) / (float(held.group(1)) * 2**20 / 1e6):.2f}x the bytes held)" if held else ""),
        "- vidshift runs: " + "; ".join(f"{c.label.removeprefix('vidshift ')}: {', '.join(c.notes[:1])}"
                                         for c in cases[2:] if c.notes)]
    blocks = [table([cols, *import_rows]), table(epoch_rows), table(ratio_rows), "\n".join(memory_lines)]
    return header, blocks


# ---------------------------------------------------------------------------------------------------- the run

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--only", choices=("ta3n", "extract"), help="one section (default: both)")
    parser.add_argument("--ta3n", type=Path, default=Path("/tmp/peers/TA3N"), help="checkout of cmhungsteve/TA3N")
    parser.add_argument("--video-features", type=Path, default=Path("/tmp/peers/video_features"),
                        help="checkout of v-iashin/video_features")
    parser.add_argument("--peer-pythonpath", type=Path, nargs="*", default=[Path("/tmp/peers/pydeps")],
                        help="folders with the packages only the peers need (pip install --target), put on their "
                             "PYTHONPATH only")
    parser.add_argument("--work", type=Path, help="keep runs, logs and stores here (default: a temporary folder, "
                                                  "removed afterwards)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians are reported")
    parser.add_argument("--seed", type=int, default=0)
    # TA3N
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the TA3N tree's video counts")
    parser.add_argument("--keep-tree", type=Path, help="build the TA3N tree here and reuse it on later runs")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per TA3N training run")
    parser.add_argument("--import-rounds", type=int, default=1, help="times `vidshift store import ta3n` is run")
    parser.add_argument("--format", default="zarr", choices=("zarr", "hdf5"), help="store of the import")
    parser.add_argument("--device", default="auto", help="vidshift train --device (the official code uses CUDA "
                                                         "when there is one)")
    parser.add_argument("--vidshift-workers", type=int, default=2, help="vidshift train --workers")
    parser.add_argument("--ta3n-workers", type=int, default=4, help="official -j (script_train_val.sh: 4)")
    parser.add_argument("--centre", action="store_true",
                        help="also time vidshift memory mode with --train-sampling centre (the official loaders "
                             "read the segment centres)")
    parser.add_argument("--du", action="store_true", help="sum the tree's disk usage (a walk over every file)")
    # extraction
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--frames-per-video", type=int, default=64)
    parser.add_argument("--tuned", default="16/1", help="BATCH/WORKERS of the tuned vidshift extract run")
    args = parser.parse_args(argv)
    args.no_dynamic_score = "--no-dynamic-score" in subprocess.run(
        vidshift("train", "--help"), env=vidshift_env(), capture_output=True, text=True).stdout
    if min(args.rounds, args.epochs, args.import_rounds, args.videos, args.frames_per_video) < 1 or args.scale <= 0:
        parser.error("--rounds, --epochs, --import-rounds, --videos, --frames-per-video must be >= 1, --scale > 0")
    if not re.fullmatch(r"\d+/\d+", args.tuned):
        parser.error(f"--tuned {args.tuned!r}: expected BATCH/WORKERS, e.g. 16/1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started, load_before = time.strftime("%Y-%m-%d %H:%M %Z"), load_average()
    work = args.work or Path(tempfile.mkdtemp(prefix="vidshift-bench-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    sections = []
    try:
        if args.only in (None, "ta3n"):
            sections.append(bench_ta3n(args, work))
        if args.only in (None, "extract"):
            sections.append(bench_extract(args, work))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"vidshift vs peers, {started}")
    print(f"machine: {machine_line()}")
    print(f"vidshift measured: {measured_checkout()}")
    peers = [f"TA3N {peer_commit(args.ta3n)}" if args.only != "extract" else "",
             f"video_features {peer_commit(args.video_features)}" if args.only != "ta3n" else ""]
    print(f"peers: {', '.join(filter(None, peers))}")
    print(f"load average (1, 5, 15 min): {load_before} at start, {load_average()} at end")
    for header, blocks in sections:
        print()
        for line in header:
            print(line)
        for block in blocks:
            print()
            print(block)


if __name__ == "__main__":
    main()
