"""``vidshift sweep`` and ``vidshift report`` (README, *Sweeps and reports*)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from extract.cluster import LAUNCHERS
from pipelines.plots import confusion_plot, find_run, hparam_plots, training_curves, tsne_plot
from pipelines.report import FORMATS, SELECTIONS, write_report
from pipelines.sweep import run_state, run_sweep
from pipelines.sweep_spec import load_spec, plan


@click.command()
@click.argument("spec_path", metavar="SPEC.yaml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Sweep directory.")
@click.option("--launcher", type=click.Choice(LAUNCHERS), default="local", show_default=True,
              help="local: --slots worker processes on this machine; dask: a dask.distributed cluster (--cluster).")
@click.option("--slots", default=1, show_default=True, type=click.IntRange(min=1),
              help="local: runs in flight, one worker process each (1: this process); dask --cluster local: its workers.")
@click.option("--cluster", default="local", show_default=True,
              help="With --launcher dask: local[:N], tcp://HOST:PORT (a running scheduler) or slurm[:CONFIG.yaml].")
@click.option("--dry-run", is_flag=True, help="List the planned runs and their state; train nothing, write nothing.")
def sweep(spec_path: Path, out: Path, launcher: str, slots: int, cluster: str, dry_run: bool) -> None:
    """Train every run of SPEC.yaml into --out: finished runs are skipped, killed ones resume, failures recorded."""
    runs = plan(load_spec(spec_path), out)
    if dry_run:
        for run in runs:
            state, epochs = run_state(run)
            click.echo(f"{run.name}  {state + (f' after epoch {epochs}' if epochs else ''):22} "
                       f"{run.describe()}{run.where()}")
        click.echo(f"{len(runs)} runs planned in {out}/runs")
        return
    summary = run_sweep(runs, out, str(spec_path), launcher, slots, cluster, echo=click.echo)
    click.echo(f"{len(summary.finished)} trained, {len(summary.skipped)} skipped, {len(summary.failed)} failed "
               f"(errors in {out}/runs/<name>/failed.json); tables: vidshift report {out}")
    sys.exit(summary.exit_code)


@click.command()
@click.argument("sweep_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--selection", "selections", multiple=True, type=click.Choice(SELECTIONS),
              help="Model selection of the tables (repeatable) [default: all three; oracle is always labelled].")
@click.option("--format", "shown", type=click.Choice(FORMATS), default="md", show_default=True,
              help="What to print; report.md, report.tex and records.csv are all written.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of the report's files [default: SWEEP_DIR/report].")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Training curves and accuracy against each swept hyper-parameter.")
@click.option("--run", "chosen", multiple=True,
              help="Also a t-SNE (before/after adaptation) and the confusion matrix of this run (name or prefix).")
@click.option("--device", default="cpu", show_default=True, help="Device of the --run figures' forward passes.")
def report(sweep_dir: Path, selections: tuple[str, ...], shown: str, out: Path | None, plots: bool,
           chosen: tuple[str, ...], device: str) -> None:
    """Tables of a sweep (one per selection method), long-form CSV and plots, written into SWEEP_DIR/report."""
    result = write_report(sweep_dir, selections or SELECTIONS, out)
    click.echo(result["texts"][shown])
    figures = []
    if plots:
        figures += training_curves(result["records"], result["out"] / "plots")
        figures += hparam_plots(result["records"], result["out"] / "plots")
    for name in chosen:
        run = find_run(result["records"], name)
        figures += [tsne_plot(result["records"], run, result["out"] / "plots", device),
                    confusion_plot(run, result["out"] / "plots", device)]
    click.echo(f"wrote {result['out']}/report.md, report.tex, records.csv and {len(figures)} figures in "
               f"{result['out']}/plots", err=True)
