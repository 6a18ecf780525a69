"""``vidshift sweep``: train every run of a spec (``pipelines/sweep_spec.py``), K at a time, idempotently.

SWEEP_DIR holds ``sweep.json`` (the spec's plan: every run's record, what ``vidshift report`` reads) and
``runs/<name>/``: the trainer's run dir (``config.yaml``, ``metrics.json``, checkpoints, ``train.log``) plus

- ``run.json``: the run's sweep record (row, direction, seed, swept hyper-parameters, identity and its hash),
  written when it starts;
- ``done``: the config hash, written when it finished (DomainBed's marker; a ``done`` of another hash is stale);
- ``failed.json``: the error and traceback of its last failure; removed once it succeeds.

A rerun of the sweep skips every run whose ``done`` holds its hash, resumes a killed run from its last epoch
(``vidshift train --resume``), retries a failed one, and, where a directory holds a run of another config (the
demo names its directories, so this happens there), moves that run aside to ``<name>.replaced-<time>`` and trains
anew: nothing computed is ever deleted. A failing run is recorded and the sweep goes on; the exit code is then 2.

Runs execute where ``extract/cluster.py`` says, as :func:`execute_run`, always inside long-lived processes: this
one (one slot), K local worker processes, or dask workers. Each process shares the stores and features it loaded
between the runs it executes (``pipelines/feature_cache.py``), so a grid of short runs on cached features pays for
start-up and the store read once per worker, not once per run.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from extract.errors import describe_os_error
from extract.manifest import read_manifest
from extract.cluster import open_executor
from pipelines.diagnose import diagnose_run
from pipelines.feature_cache import PROCESS_CACHE
from pipelines.sweep_spec import PlannedRun
from pipelines.train import RunMismatch, train

RUN_FILE, DONE_FILE, FAILED_FILE, PLAN_FILE = "run.json", "done", "failed.json", "sweep.json"


def write_json(path: Path, value) -> None:
    """Write JSON atomically: a reader (the report, a rerun) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def run_state(run: PlannedRun) -> tuple[str, int]:
    """(state, epochs finished): done | resume (killed after some epochs) | retry (failed) | start | replace | new."""
    out = run.config.out
    done = out / DONE_FILE
    if done.is_file() and done.read_text().strip() == run.config_hash:
        return "done", 0
    recorded = read_json(out / RUN_FILE)
    if recorded is not None and recorded.get("config_hash") == run.config_hash:
        metrics = read_json(out / "metrics.json")
        epochs = metrics["final"]["epochs_run"] if metrics else 0
        if (out / FAILED_FILE).is_file():
            return "retry", epochs
        return ("resume" if epochs else "start"), epochs
    return ("replace" if out.exists() and any(out.iterdir()) else "new"), 0


def describe_error(error: BaseException) -> str:
    if isinstance(error, OSError) and (error.errno is not None or error.filename is not None):
        return describe_os_error(error)
    return f"{type(error).__name__}: {error}"


def execute_run(run: PlannedRun) -> dict:
    """Train (or resume) one run in this process and record the outcome in its directory; never raises for a
    failing run (its error goes to ``failed.json`` and the outcome), so the sweep goes on."""
    started, messages = time.perf_counter(), []
    out = run.config.out
    hits_before = PROCESS_CACHE.hits
    try:
        recorded = read_json(out / RUN_FILE)
        if recorded is not None and recorded.get("config_hash") != run.config_hash:
            messages.append(_move_aside(run, _first_difference(recorded.get("identity", {}), run.identity)))
        out.mkdir(parents=True, exist_ok=True)
        (out / DONE_FILE).unlink(missing_ok=True)     # a stale marker of another config
        wrote_record = not (out / RUN_FILE).is_file()
        write_json(out / RUN_FILE, run.record())
        try:
            report = train(run.config, resume=True, show_progress=False, cache=PROCESS_CACHE)
        except RunMismatch as mismatch:               # a directory from before sweeps holding another run
            if wrote_record:
                (out / RUN_FILE).unlink()             # the record belongs to the new run, not the one kept
            messages.append(_move_aside(run, mismatch.key))
            out.mkdir(parents=True)
            write_json(out / RUN_FILE, run.record())
            report = train(run.config, show_progress=False, cache=PROCESS_CACHE)
        if run.diagnose:
            diagnose_run(out, run.config.store, run.config.manifest, split=_target_split(run),
                         device=run.config.device, workers=run.config.workers, seed=run.seed)
        (out / FAILED_FILE).unlink(missing_ok=True)
        (out / DONE_FILE).write_text(run.config_hash + "\n")
        final = report["final"]
        return {"name": run.name, "status": "finished", "messages": messages, "pid": os.getpid(),
                "seconds": time.perf_counter() - started, "target_acc_selected": final.get("target_acc_selected"),
                "shared_feature_sets": PROCESS_CACHE.hits - hits_before}
    except Exception as error:      # recorded, never raised: one bad run must not stop the others
        return record_failure(run, error, messages, traceback.format_exc())


def record_failure(run: PlannedRun, error: BaseException, messages: list[str], trace: str) -> dict:
    message = describe_error(error)
    try:
        run.config.out.mkdir(parents=True, exist_ok=True)
        write_json(run.config.out / FAILED_FILE, {"error": message, "type": type(error).__name__,
                                                  "traceback": trace, "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    except OSError:
        pass                        # the outcome still carries the error to the sweep's summary
    return {"name": run.name, "status": "failed", "error": message, "messages": messages, "pid": os.getpid()}


def _first_difference(saved: dict, now: dict) -> str:
    return next((key for key in now if saved.get(key) != now[key]), "config")


def _move_aside(run: PlannedRun, key: str) -> str:
    out = run.config.out
    kept = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    out.rename(kept)                # nothing already computed is lost
    return (f"retraining {run.describe()}: its {key} changed since the run in {out}; the old run is kept as "
            f"{kept}")


def _target_split(run: PlannedRun) -> str:
    """The split the run reported on the target (``vidshift train``'s default: test, else val)."""
    if run.config.eval_split:
        return run.config.eval_split
    entries = read_manifest(run.config.manifest)
    return "test" if any(e.domain == run.config.target and e.split == "test" for e in entries) else "val"


@dataclass
class SweepSummary:
    skipped: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)    # name -> error

    @property
    def exit_code(self) -> int:
        return 2 if self.failed else 0


def start_message(run: PlannedRun, state: str, epochs: int) -> str | None:
    if state == "resume":
        return f"resuming {run.describe()} after epoch {epochs}{run.where()} ..."
    if state == "retry":
        error = (read_json(run.config.out / FAILED_FILE) or {}).get("error", "")
        return f"retrying {run.describe()}{run.where()} (it failed before: {error}) ..."
    if state == "replace":
        return None                 # the run tells why when it is done (its messages)
    return f"training {run.describe()}{run.where()} ..."


def write_plan(runs: list[PlannedRun], out: Path, spec_source: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / PLAN_FILE, {"spec": spec_source, "runs": [run.record() for run in runs]})


def run_sweep(runs: list[PlannedRun], out: Path, spec_source: str, launcher: str = "local", slots: int = 1,
              cluster: str = "local", echo: Callable[[str], None] = print) -> SweepSummary:
    """Execute the planned runs not yet done; write ``sweep.json`` first. ``local``: at most ``slots`` in flight;
    ``dask``: all submitted at once (the scheduler spreads them over its workers; ``local`` clusters start
    ``slots`` workers unless the address says ``local:N``)."""
    write_plan(runs, Path(out), spec_source)
    summary = SweepSummary()
    pending = []
    for run in runs:
        state, epochs = run_state(run)
        if state == "done":
            summary.skipped.append(run.name)
        else:
            pending.append((run, state, epochs))
    if summary.skipped:
        echo(f"{len(summary.skipped)} of {len(runs)} runs already finished (skipped)")
    if not pending:
        return summary
    with open_executor(launcher, slots, cluster, echo) as executor, \
            tqdm(total=len(pending), desc="sweep", unit="run", disable=None) as bar:
        in_flight: dict[Future, PlannedRun] = {}
        queue = list(pending)
        limit = slots if launcher == "local" else len(pending)
        while queue or in_flight:
            while queue and len(in_flight) < limit:
                run, state, epochs = queue.pop(0)
                message = start_message(run, state, epochs)
                if message:
                    echo(message)
                in_flight[executor.submit(execute_run, run)] = run
            completed, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in completed:
                run = in_flight.pop(future)
                try:
                    outcome = future.result()
                except Exception as error:   # the worker itself died (a killed process, a lost dask worker)
                    outcome = record_failure(run, error, [], traceback.format_exc())
                _report_outcome(run, outcome, summary, echo)
                bar.update()
    return summary


def _report_outcome(run: PlannedRun, outcome: dict, summary: SweepSummary, echo) -> None:
    for message in outcome["messages"]:
        echo(message)
    if outcome["status"] == "finished":
        summary.finished.append(run.name)
        accuracy = outcome["target_acc_selected"]
        shared = outcome["shared_feature_sets"]
        echo(f"finished {run.describe()}{run.where()} in {outcome['seconds']:.1f}s"
             + (f": target accuracy {accuracy:.3f} (selected on val)" if accuracy is not None else "")
             + (f"; {shared} feature sets shared with earlier runs of its process" if shared else ""))
    else:
        summary.failed[run.name] = outcome["error"]
        echo(f"FAILED {run.describe()}{run.where()} ({run.config.out}): {outcome['error']}")
