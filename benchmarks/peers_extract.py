"""peers.py's extraction section: ``vidshift extract`` against v-iashin/video_features on the same videos and the
same seeded ResNet-50, on the CPU with one thread each, and the equivalence check of their pooled features."""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from children import REPO, RUNNERS, Usage, checked, median, peer_env, run_child, say, table, vidshift, vidshift_env


def load_extract_module():
    spec = importlib.util.spec_from_file_location("vidshift_bench_extract", REPO / "benchmarks" / "extract.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def seeded_resnet50(path: Path) -> str:
    import hashlib
    import torchvision
    torch.manual_seed(0)
    state = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(state, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def bench_extract(args, work: Path) -> tuple[list[str], list[str]]:
    if not (args.video_features / "main.py").is_file():
        raise SystemExit(f"--video-features {args.video_features}: no main.py; give a checkout of "
                         f"v-iashin/video_features")
    data = work / "videos"
    manifest = load_extract_module().write_test_videos(data, args.videos, args.frames_per_video, 320, 240)
    videos = sorted((data / "videos").glob("*.mp4"))
    frames = args.videos * args.frames_per_video
    (work / "video_paths.txt").write_text("".join(f"{v}\n" for v in videos))
    weights = work / "resnet50-seed0.pt"
    digest = seeded_resnet50(weights)
    batch, workers = args.tuned.split("/")
    configs = [("video_features (batch 1)", None), ("vidshift extract, defaults", []),
               (f"vidshift extract --batch-size {batch} --workers {workers}",
                ["--batch-size", batch, "--workers", workers])]
    from extract.backbones import cpu_has_native_bf16
    if cpu_has_native_bf16():   # AVX512-BF16 / AMX: bf16 convolutions are native, so offered (and measured)
        configs.append(("vidshift extract --precision bf16", ["--precision", "bf16"]))
    usages: dict[str, list[Usage]] = {label: [] for label, _ in configs}
    outputs = {}
    for r in range(args.rounds):
        for index, (label, extra) in enumerate(configs):
            say(f"round {r + 1}/{args.rounds}: {label} on {frames} frames ...")
            if extra is None:
                out = work / f"vf-out-r{r}"
                shutil.rmtree(out, ignore_errors=True)
                command = [sys.executable, str(RUNNERS / "run_video_features.py"), str(args.video_features),
                           str(weights), "--threads", "1", "--", "feature_type=resnet", "model_name=resnet50",
                           "device=cpu", "on_extraction=save_numpy", f"output_path={out}",
                           f"tmp_path={work / f'vf-tmp-r{r}'}", f"file_with_video_paths={work / 'video_paths.txt'}"]
                log = work / f"vf-r{r}.log"
                usage = checked(run_child(command, log, peer_env(args, work, threads=1)), "video_features", log)
                outputs["video_features"] = out / "resnet" / "resnet50"
                if not list(outputs["video_features"].glob("*_resnet.npy")):
                    raise SystemExit(f"video_features wrote no features; see {log}")
            else:
                store = work / f"vidshift-{index}-r{r}.zarr"
                shutil.rmtree(store, ignore_errors=True)
                log = work / f"{store.name}.log"
                command = vidshift("extract", manifest, "--out", store, "--backbone", "resnet50", "--weights",
                                   weights, "--sampling", "all", "--device", "cpu", *extra)
                usage = checked(run_child(command, log, vidshift_env(threads=1)), f"vidshift extract ({label})", log)
                outputs[label] = store
            usages[label].append(usage)

    rows = [["run", "frames/s", "wall s", "user s", "sys s", "minor faults M", "max RSS MB", "rounds (wall s)"]]
    for label, _ in configs:
        u = sorted(usages[label], key=lambda x: x.wall)[(len(usages[label]) - 1) // 2]
        walls = [x.wall for x in usages[label]]
        rate = frames / median(walls)
        rows.append([label, f"{rate:.2f}", *u.cells(), " ".join(f"{w:.1f}" for w in walls)])
    vf_rate = float(rows[1][1])
    ratio_rows = [["vidshift run", "frames/s", "vs video_features"]]
    for row in rows[2:]:
        ratio_rows.append([row[0], row[1], f"{float(row[1]) / vf_rate:.2f}x"])
    header = [f"extraction: {args.videos} H.264 videos x {args.frames_per_video} frames, 320x240 (benchmarks/extract.py's "
              f"panning scene), {frames} frames; ResNet-50 torch.manual_seed(0) state dict ({digest}...), CPU, "
              f"OMP_NUM_THREADS=MKL_NUM_THREADS=1; every frame; {args.rounds} round(s), median wall clock"]
    notes = "".join(
        f"- equivalence (video_features vs `pooled` of {label}, {frames} frames): smallest cosine {cosine:.6f}, "
        f"largest |difference| {max_diff:.2e} on values up to {peak:.1f}\n"
        for label, _ in configs[1:]
        for cosine, max_diff, peak in [equivalence(outputs["video_features"], outputs[label], videos)])
    notes += ("- vidshift also writes the 7x7x2048 maps (float16) besides the pooled vectors; video_features keeps "
              "only the [T, 2048] vectors (.npy)")
    return header, [table(rows), table(ratio_rows), notes]


def equivalence(vf_dir: Path, store_path: Path, videos: list[Path]) -> tuple[float, float, float]:
    from extract.store import FeatureStore
    store = FeatureStore.open(store_path)
    ids = {Path(record.video_id).name: vid for vid, record in store.videos().items()}
    cosines, diffs, peaks = [], [], []
    for video in videos:
        theirs = np.load(vf_dir / f"{video.stem}_resnet.npy").astype(np.float32)
        ours = np.asarray(store.read(ids[video.stem], "pooled"), dtype=np.float32)
        if theirs.shape != ours.shape:
            raise SystemExit(f"{video.name}: video_features gave {theirs.shape}, vidshift {ours.shape}: the frame "
                             f"sampling differs")
        dot = (theirs * ours).sum(1) / (np.linalg.norm(theirs, axis=1) * np.linalg.norm(ours, axis=1))
        cosines.append(float(dot.min()))
        diffs.append(float(np.abs(theirs - ours).max()))
        peaks.append(float(np.abs(theirs).max()))
    store.close()
    return min(cosines), max(diffs), max(peaks)
