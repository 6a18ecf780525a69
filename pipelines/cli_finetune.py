"""``vidshift finetune`` (and ``torchrun --nproc_per_node N -m pipelines.finetune``, the same options): fine-tune a
backbone and an architecture together from raw video (``pipelines/finetune.py``). Attached to the main CLI with
``main.add_command(finetune)``; errors are reported by its boundary."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from extract.backbones import available_backbones
from pipelines.cli_options import run_options
from pipelines.finetune import FinetuneConfig, finetune as run_finetune

PATH = click.Path(path_type=Path)


@click.command()
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), help="Manifest of the videos.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory the manifest's relative paths start from [default: the manifest's directory].")
@click.option("--backbone", default="resnet50", show_default=True,
              help=f"One of: {', '.join(available_backbones())}.")
@click.option("--weights", default="imagenet", show_default=True,
              help="imagenet (torchvision weights enum), none (seeded random init) or a state-dict path.")
@click.option("--frame-size", default=224, show_default=True, type=click.IntRange(min=1),
              help="Training crop and test centre crop S (the test resizes the shorter side to S*256/224).")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="Autocast of the backbone on CUDA (auto: bf16); the CPU always runs fp32.")
@run_options(config_help="YAML mapping of hyper-parameter overrides (the pair's and backbone_lr_mult, backbone_bn, "
                         "mixstyle_layers, gradient_checkpointing).", step_noun="Frame")
@click.option("--eval-split", default=None, help="Target split to report [default: test, else val].")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda (torchrun: one GPU each).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="DataLoader processes decoding frames, per training process.")
@click.option("--out", type=PATH, help="Run directory.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last finished epoch.")
@click.option("--stop-after", type=click.IntRange(min=1), default=None,
              help="Finish at most N epochs in this call, then exit (a job's time limit; --resume continues).")
def finetune(manifest, head, config_file, assignments, out, resume, stop_after, **options) -> None:
    """End-to-end mode: fine-tune a backbone with an architecture and a method from raw video, as the papers do
    (one process, or one per GPU under torchrun); exit 2 when some videos were skipped (listed; under
    torchrun the exit is 0)."""
    from pipelines.cli import list_models, parse_overrides   # the main CLI imports this module

    if head == "help":
        click.echo(list_models())
        return
    for name, value in (("--manifest", manifest), ("--source", options["source"]), ("--out", out)):
        if value is None:
            raise click.UsageError(f"missing option {name}")
    config = FinetuneConfig(manifest=manifest, head=head, out=out, hparams=parse_overrides(config_file, assignments),
                            **options)
    report = run_finetune(config, resume=resume, stop_after=stop_after)
    failures = json.loads((out / "failures.json").read_text())
    # under torchrun the first process reports, and every process exits 0: its agent reads any other code as a crash
    under_torchrun = "WORLD_SIZE" in os.environ
    if os.environ.get("RANK", "0") == "0":
        click.echo(json.dumps(report["final"], indent=1))
        for video_id, reason in sorted(failures.items()):
            click.echo(f"  SKIPPED {video_id}: {reason}")
    sys.exit(2 if failures and not under_torchrun else 0)
