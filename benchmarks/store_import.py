"""``vidshift store import ta3n`` in one process and with N workers, and against an earlier checkout's import:
whole-process seconds, CPU, peak RSS and time per file, the speed-ups, and whether every run wrote the same features.

The TA3N tree is peers.py's (``<video>/img_00001.t7``, one torch.save'd 2048-d tensor per frame, UCF-HMDB_full's
video counts times --scale, with TA3N's list and class files): built in --tree, or reused from there. Each run
imports into a new store; the tree's files stay in the page cache after the first run, so the first round's first
run is the only cold one (interleaved rounds, medians). --baseline DIR runs that checkout's import the same way
(e.g. ``git worktree add /tmp/vidshift-before dcae8a6^``, the one-process import issue 20 measured; it has no --jobs).

    python benchmarks/store_import.py --tree /tmp/peers-tree-0.25 --scale 0.25 [--formats zarr hdf5]
        [--jobs 1 2] [--baseline DIR] [--rounds 2] [--work DIR]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import children  # first: it puts the repository root ahead of benchmarks/ on sys.path
import peers  # benchmarks/peers.py: the TA3N tree
from extract.importers import DEFAULT_JOBS
from extract.store import FeatureStore
from pipelines.runs import store_identity


def import_command(tree: Path, store: Path, store_format: str, jobs: int | None) -> list[str]:
    lists = [f"--list={domain}:{split}={peers.list_path(tree, name, split)}"
             for domain, name, split, _ in peers.tree_sizes(1.0)]
    return children.vidshift("store", "import", "ta3n", tree, *lists, "--classes", tree / "classInd_hmdb_ucf.txt",
                          "--out", store, "--format", store_format, *(["--jobs", str(jobs)] if jobs else []))


def features_sha256(store: Path) -> str:
    with FeatureStore.open(store) as opened:
        return store_identity(opened, ("rgb",))["features_sha256"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, required=True, help="TA3N tree folder (built here if empty)")
    parser.add_argument("--scale", type=float, default=0.25, help="the tree's video counts x this (peers.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", nargs="+", default=["zarr", "hdf5"], choices=("zarr", "hdf5"))
    parser.add_argument("--jobs", type=int, nargs="+", default=sorted({1, DEFAULT_JOBS}),
                        help=f"--jobs values to run (default: 1 and the default, {DEFAULT_JOBS} here)")
    parser.add_argument("--baseline", type=Path, help="an earlier vidshift checkout to run the same import with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, help="keep the stores and logs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.baseline and not (args.baseline / "pipelines" / "cli.py").is_file():
        parser.error(f"--baseline {args.baseline}: not a vidshift checkout (no pipelines/cli.py)")
    if args.rounds < 1 or min(args.jobs) < 1:
        parser.error("--rounds and --jobs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started, load_before = time.strftime("%Y-%m-%d %H:%M %Z"), children.load_average()
    videos, files, _ = peers.build_tree(args.tree, args.scale, args.seed, None)
    work = args.work or Path(tempfile.mkdtemp(prefix="vidshift-bench-import-"))
    work.mkdir(parents=True, exist_ok=True)
    cases = ([("baseline", None)] if args.baseline else []) + [("this checkout", jobs) for jobs in args.jobs]
    usages: dict[tuple, list[children.Usage]] = {}
    digests: dict[str, set[str]] = {fmt: set() for fmt in args.formats}
    try:
        for r in range(args.rounds):
            for fmt in args.formats:
                for code, jobs in cases:
                    store, log = work / f"store-{fmt}", work / f"import-{fmt}-{code.replace(' ', '-')}-{jobs}-r{r}.log"
                    shutil.rmtree(store, ignore_errors=True)
                    children.say(f"round {r + 1}/{args.rounds}: {fmt}, {code}" + (f", --jobs {jobs}" if jobs else ""))
                    env = children.vidshift_env(checkout=args.baseline if code == "baseline" else children.REPO)
                    usage = children.checked(children.run_child(import_command(args.tree, store, fmt, jobs), log, env),
                                             f"store import ({fmt}, {code})", log)
                    usages.setdefault((fmt, code, jobs), []).append(usage)
                    digests[fmt].add(features_sha256(store))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    rows = [["store", "code", "--jobs", "wall s (median)", "wall s (all)", "user s", "sys s", "max RSS MB",
             "ms per file", "vs --jobs 1", "vs baseline"]]
    for fmt in args.formats:
        wall = {case: children.median([u.wall for u in usages[(fmt, *case)]]) for case in cases}
        for code, jobs in cases:
            runs = usages[(fmt, code, jobs)]
            median_run = min(runs, key=lambda u: abs(u.wall - wall[(code, jobs)]))
            one = wall.get(("this checkout", 1))
            rows.append([fmt, code if code == "this checkout" else f"baseline ({args.baseline.name})",
                         str(jobs or "-"), f"{wall[(code, jobs)]:.2f}", " ".join(f"{u.wall:.1f}" for u in runs),
                         f"{median_run.user:.1f}", f"{median_run.sys:.1f}", f"{median_run.maxrss_mb:.0f}",
                         f"{wall[(code, jobs)] / files * 1e3:.3f}",
                         f"{one / wall[(code, jobs)]:.2f}x" if one and code != "baseline" else "",
                         f"{wall[('baseline', None)] / wall[(code, jobs)]:.2f}x" if args.baseline else ""])
    print(f"vidshift store import ta3n, {started}")
    print(f"machine: {children.machine_line()}")
    print(f"vidshift measured: {children.measured_checkout()}"
          + (f"; baseline: {args.baseline} at {children.peer_commit(args.baseline)}" if args.baseline else ""))
    print(f"load average (1, 5, 15 min): {load_before} at start, {children.load_average()} at end")
    print(f"tree: {args.tree}, {videos} videos, {files} .t7 files; {args.rounds} round(s), interleaved")
    print()
    print(children.table(rows))
    print()
    for fmt, seen in digests.items():
        print(f"- {fmt}: every run wrote the same features (features_sha256 {next(iter(seen))[:12]})" if len(seen) == 1
              else f"- {fmt}: the runs wrote DIFFERENT features: {sorted(seen)}")
    if any(len(seen) != 1 for seen in digests.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
