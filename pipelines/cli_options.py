"""The options that say which run it is, shared by ``vidshift train`` (cached features) and ``vidshift finetune``
(raw video): the two modes mean the same by each of them, so they are declared once."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import click


def run_options(config_help: str, step_noun: str) -> Callable[[Callable], Callable]:
    """Architecture, method, domains, setting, hyper-parameters, seed and TSN sampling, as click options.

    ``config_help``: what ``--config`` may set in this mode; ``step_noun``: what a segment samples (a cached
    time step, or a frame)."""
    options = [
        click.option("--head", required=True,
                     help="Architecture; `--head help` lists architectures, methods and the matrix."),
        click.option("--method", default="erm", show_default=True, help="Training method (DG/DA); see `--head help`."),
        click.option("--source", help="Labelled source domain."),
        click.option("--target", default=None, help="Target domain (unlabelled train split in da; evaluated in all)."),
        click.option("--setting", type=click.Choice(["dg", "da", "target-only"]), default="dg", show_default=True,
                     help="target-only: train on the target's labelled train split (the upper bound)."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help=config_help),
        click.option("--set", "assignments", multiple=True, help="name=value hyper-parameter override (repeatable)."),
        click.option("--preset", default=None,
                     help="A named set of hyper-parameters (and trainer options) of the pair."),
        click.option("--seed", default=0, show_default=True),
        click.option("--segments", "num_segments", default=5, show_default=True, type=click.IntRange(min=1),
                     help="TSN segments per video."),
        click.option("--train-sampling", type=click.Choice(["random", "centre"]), default=None,
                     help=f"{step_noun} per training segment [default: the preset's, else random]."),
    ]

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):   # click lists options in the order their decorators are written
            command = option(command)
        return command

    return decorate
