"""Timing commands as child processes for the benchmark scripts: whole-process resource use from os.wait4, the
environments vidshift and its peers run in, the checkout and machine measured, and markdown tables.

Importing this module puts the repository root first on sys.path: run as a script, Python puts benchmarks/ there,
where benchmarks/extract.py would shadow the ``extract`` package. benchmarks/ stays on the path behind it.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RUNNERS = Path(__file__).resolve().parent / "peers"  # the peers' runners (benchmarks/peers/)
VIDSHIFT = "import sys; from pipelines.cli import main; sys.exit(main())"


@dataclass
class Usage:
    """What one child process (and the children it waited for) cost."""
    wall: float
    user: float
    sys: float
    minflt: int
    maxrss_mb: float
    rc: int

    def cells(self) -> list[str]:
        return [f"{self.wall:.1f}", f"{self.user:.1f}", f"{self.sys:.1f}", f"{self.minflt / 1e6:.2f}",
                f"{self.maxrss_mb:.0f}"]


def run_child(command: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> Usage:
    """Run ``command`` to completion with stdout and stderr to ``log``; its resource usage from wait4."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    return Usage(wall, usage.ru_utime, usage.ru_stime, usage.ru_minflt, usage.ru_maxrss / 1024, child.returncode)


def checked(usage: Usage, what: str, log: Path) -> Usage:
    if usage.rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{what} exited {usage.rc}; the end of {log}:\n{tail}")
    return usage


def vidshift_env(threads: int | None = None, checkout: Path = REPO) -> dict:
    """``checkout`` (default: this one) first on the path; the repository's venv is the interpreter running this
    script."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(checkout), *filter(None, [env.get("PYTHONPATH")])])
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def peer_env(args: argparse.Namespace, work: Path, threads: int | None = None) -> dict:
    """The peers' packages on PYTHONPATH (only theirs: never this repository's), bytecode kept out of the checkouts."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if args.peer_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in args.peer_pythonpath)
    env["PYTHONPYCACHEPREFIX"] = str(work / "peer-pycache")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def vidshift(*arguments: str) -> list[str]:
    # -P (Python 3.11+): `python -c` would put the working directory first on sys.path, ahead of PYTHONPATH, and
    # run the code of whichever checkout the benchmark was started in
    isolated = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *isolated, "-c", VIDSHIFT, *map(str, arguments)]


def measured_checkout() -> str:
    """The vidshift code the children import, and its git commit (with '+changes' for a dirty work tree)."""
    where = subprocess.run([sys.executable, "-c", "import pipelines, os; print(os.path.dirname(os.path.dirname("
                            "os.path.abspath(pipelines.__file__))))"], env=vidshift_env(), capture_output=True,
                           text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return f"{where} at {commit}{' +changes' if dirty else ''}"


def peer_commit(path: Path) -> str:
    commit = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return commit or "not a git checkout"


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    memory = ""
    if Path("/proc/meminfo").is_file():
        total = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
        memory = f", {total / 2**20:.0f} GiB RAM"
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} CPUs{memory}{gpu}; torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load_average()}] {message}", file=sys.stderr, flush=True)
