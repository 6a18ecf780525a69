"""The ``vidshift`` command line (DESIGN §3). Exit codes: 0 ok, 1 usage/input error, 2 some videos failed."""
from __future__ import annotations

import csv
import json
import pickle
import sys
from pathlib import Path

import click
import yaml
from tqdm import tqdm

from extract.backbones import available_backbones
from extract.decode import VIDEO_DECODERS
from extract.errors import describe_os_error
from extract.flow import FLOW_METHODS
from extract.manifest import ManifestError
from extract.run import ExtractConfig, run_extract
from extract.store import FeatureStore, StoreError
from extract.store.card import store_card
from extract.store.summary import format_summary, store_summary
from extract.synth import SynthConfig, describe, generate
import heads
from heads.method import fallback_parts, missing_parts, registered_presets
from pipelines.cli_data import export, import_, manifest
from pipelines.cli_finetune import finetune
from pipelines.cli_options import run_options
from pipelines.cli_store import STORE, cache_option, diff, merge, pack, subset
from pipelines.cli_sweep import report, sweep
from pipelines.demo import DemoConfig, run_demo
from pipelines.diagnose import diagnose
from pipelines.evaluate import ENSEMBLE_RULES, evaluate_ensemble, evaluate_run
from pipelines.train import TrainConfig, default_feature_cache, train as run_training

# Expected failures: bad input (RunError, HeadError, ManifestError, JSON and UTF-8 errors are ValueErrors), a
# damaged or incompatible store, the operating system (disk full, read-only, missing files), and files that
# are not what they claim (YAML, CSV, pickles refused by weights_only). Anything else is a bug: traceback.
EXPECTED_ERRORS = (ManifestError, StoreError, ValueError, KeyError, OSError, yaml.YAMLError, csv.Error,
                   pickle.UnpicklingError)


class UserError(click.ClickException):
    """An input problem: printed without a traceback, exit code 1."""

    exit_code = 1


def describe_error(error: BaseException) -> str:
    """The message a user sees for an expected failure: what is wrong, where, and what to do."""
    if isinstance(error, OSError) and (error.errno is not None or error.filename is not None):
        return describe_os_error(error)
    if isinstance(error, pickle.UnpicklingError):  # torch's text would suggest weights_only=False: never do that
        return ("refused to load a file that is not a checkpoint or weights file written by vidshift or "
                "torchvision; it was not unpickled, since unpickling an untrusted file can run code from it")
    if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
        return error.args[0]  # str(KeyError) would quote it
    return str(error)


class VidshiftGroup(click.Group):
    """The one error boundary: every expected failure of any subcommand becomes a message naming the file or
    option and what to do, with exit code 1 (usage errors too: 2 means "finished, some videos failed").
    ``vidshift --debug`` shows the traceback instead."""

    def make_context(self, *args, **kwargs) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as error:  # `vidshift --unknown-option`
            error.exit_code = 1
            raise

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as error:  # a subcommand's bad option or value
            error.exit_code = 1
            raise
        except EXPECTED_ERRORS as error:
            if ctx.params.get("debug"):
                raise
            raise UserError(describe_error(error)) from error


@click.group(cls=VidshiftGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback of any error (for a bug report).")
def main(debug: bool) -> None:
    """vidshift: cached-feature pipeline for video domain adaptation and generalization."""


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=SynthConfig.seed, show_default=True, help="Same seed, same videos.")
@click.option("--videos-per-class", default=SynthConfig.videos_per_class, show_default=True,
              help="Videos per class and domain.")
@click.option("--frames", "num_frames", default=SynthConfig.num_frames, show_default=True, help="Frames per video.")
@click.option("--frame-size", default=SynthConfig.frame_size, show_default=True, help="Base frame side in pixels.")
def synth(out_dir: Path, seed: int, videos_per_class: int, num_frames: int, frame_size: int) -> None:
    """Write the built-in synthetic domain-shift dataset (real videos + manifest.csv) to OUT_DIR."""
    config = SynthConfig(seed=seed, videos_per_class=videos_per_class, num_frames=num_frames, frame_size=frame_size)
    manifest = generate(out_dir, config)
    click.echo(describe(config))
    click.echo(f"wrote {manifest}")


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory the manifest's relative paths start from [default: the manifest's directory].")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Store directory.")
@click.option("--format", "store_format", type=click.Choice(["zarr", "hdf5"]), default="zarr", show_default=True)
@click.option("--backbone", default="resnet50", show_default=True,
              help=f"One of: {', '.join(available_backbones())}.")
@click.option("--weights", default="imagenet", show_default=True,
              help="imagenet (torchvision weights enum), none (seeded random init) or a state-dict path "
                   "(i3d: pytorch-i3d's rgb_imagenet.pt / flow_imagenet.pt).")
@click.option("--sampling", default="all", show_default=True, help="all | fps:F | uniform:N")
@click.option("--frame-size", default=224, show_default=True, help="Centre-crop side.")
@click.option("--resize", type=int, default=None, help="Shorter side before the crop [default: frame-size*256/224].")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Stored dtype of maps (pooled is always float32).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Autocast precision of the backbone (bf16/fp16 on CUDA only).")
@click.option("--batch-size", type=int, default=None,
              help="Frames per decode batch and backbone call (clips: batch-size // clip-length per call) "
                   "[default: 64 on a GPU, 8 on the CPU].")
@click.option("--workers", type=int, default=None,
              help="Background decode workers [default: 2 on a GPU, 1 on the CPU].")
@click.option("--videos-per-part", default=64, show_default=True, help="Videos per committed part.")
@click.option("--shard", default="0/1", show_default=True, help="K/N: this process extracts every N-th video.")
@click.option("--stream", default="rgb", show_default=True,
              help="Stream name the features are stored under (flow with --flow; a store holds several).")
@click.option("--keep-partial", is_flag=True, help="Keep the decodable prefix of videos that break part-way.")
@click.option("--seed", default=0, show_default=True, help="Seed of random-init weights (--weights none).")
@click.option("--fps", type=float, default=None, help="Frame rate of frame directories (videos carry their own).")
@click.option("--clip-length", type=int, default=None,
              help="Clip backbones (i3d, i3d-r50, --flow stacks): frames per time step [default: the backbone's].")
@click.option("--clip-stride", type=int, default=None,
              help="Hop between clips, in sampled frames [default: clip length].")
@click.option("--flow", type=click.Choice(FLOW_METHODS), default=None,
              help="Feed optical flow between consecutive sampled frames to the backbone (with --stream flow).")
@click.option("--flow-weights", default="default", show_default=True,
              help="RAFT's weights: default (torchvision's enum), none (seeded random init) or a state-dict path.")
@click.option("--decoder", type=click.Choice(list(VIDEO_DECODERS)), default="decord", show_default=True,
              help="Video decoder: decord, torchcodec (CPU) or torchcodec-cuda (NVDEC); recorded in provenance.")
@click.option("--compile", "compile", is_flag=True, help="torch.compile the backbone (recorded in provenance).")
@click.option("--writer-threads", type=int, default=None,
              help="Threads compressing store chunks [default: 4 on a GPU, 1 on the CPU].")
@click.option("--cluster", default=None,
              help="Run the parts as tasks on dask: local[:N] (N worker processes; default one per GPU, else per "
                   "core), tcp://HOST:PORT (a running scheduler) or slurm[:CONFIG.yaml].")
def extract(manifest: Path, root: Path | None, out: Path, store_format: str, **options) -> None:
    """Stage one: extract backbone features of MANIFEST's videos into the store --out (resumes if it exists)."""
    config = ExtractConfig(manifest=manifest, root=root or manifest.parent, out=out, format=store_format, **options)
    summary = run_extract(config)
    for line in summary.lines():
        click.echo(line)
    sys.exit(summary.exit_code)


@main.group()
def store() -> None:
    """Inspect, check and share feature stores (a STORE is a directory, a packed .zip/.tar, or a URL)."""


main.add_command(manifest)
main.add_command(diagnose)
main.add_command(finetune)
main.add_command(sweep)
main.add_command(report)
store.add_command(import_, "import")
store.add_command(export)
for command in (merge, diff, subset, pack):
    store.add_command(command)


@store.command()
@click.argument("path", type=STORE)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--card", is_flag=True, help="Also write STORE/README.md: what the features are, how they were made, "
                                          "counts, failures, a licence line to fill, how to read them without vidshift.")
@cache_option
def info(path: str, as_json: bool, card: bool, cache: Path | None) -> None:
    """Provenance, counts, sizes, compression ratio and failures of a store."""
    with FeatureStore.open(path, cache=cache) as feature_store:
        summary = store_summary(feature_store)
        if card:
            if not feature_store.files.writable:
                raise StoreError(f"{path}: --card writes README.md into a store directory; this store is read-only "
                                 f"here (a URL or a packed store)")
            (feature_store.root / "README.md").write_text(store_card(feature_store))
    click.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))
    if card:
        click.echo(f"wrote {Path(path) / 'README.md'} (fill in its LICENCE line)", err=True)


@store.command()
@click.argument("path", type=STORE)
@cache_option
def verify(path: str, cache: Path | None) -> None:
    """Re-read every chunk and video hash; exit 1 naming every bad video."""
    with FeatureStore.open(path, check=False, cache=cache) as feature_store:  # it reports a damaged store.json
        with tqdm(desc="verify", unit="video") as bar:
            problems = feature_store.verify(progress=bar.update)
            checked = bar.n
    for problem in problems:
        click.echo(f"BAD {problem}")
    click.echo(f"{checked} videos checked, {len(problems)} problem(s)")
    sys.exit(1 if problems else 0)


def parse_overrides(config_file: Path | None, assignments: tuple[str, ...]) -> dict:
    """Hyper-parameter overrides: the YAML file's mapping, then each ``--set name=value`` (YAML-typed)."""
    overrides = {}
    if config_file is not None:
        # bytes: PyYAML detects the encoding and reports a non-UTF-8 byte as a YAML error with its position
        loaded = _load_yaml(config_file.read_bytes(), f"--config {config_file}") or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: expected a mapping of hyper-parameter names to values")
        overrides.update(loaded)
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or not name:
            raise ValueError(f"--set {assignment!r}: expected name=value, e.g. --set lr=0.01")
        overrides[name.strip()] = _load_yaml(value, f"--set {assignment!r}")
    return overrides


def _load_yaml(text: str | bytes, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None)
        detail = (f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if problem and mark
                  else " ".join(str(error).split()))
        raise ValueError(f"{where}: not valid YAML ({detail}); write a mapping such as `lr: 0.01` (one "
                         f"name: value per line) and quote values holding ':' '#' '[' or '{{'") from None


def parts_column(method_cls) -> str:
    """What a method needs, and what it uses where present: "encoder", "- (uses pyramid)"."""
    needs = "+".join(sorted(method_cls.needs)) or "-"
    return f"{needs} (uses {'+'.join(sorted(method_cls.uses))})" if method_cls.uses else needs


def matrix_cell(arch_cls, method_cls) -> str:
    """x: the pair runs; ~: it runs with a fallback for a part the method uses where present; .: refused."""
    if missing_parts(arch_cls, method_cls):
        return "."
    return "~" if fallback_parts(arch_cls, method_cls) else "x"


def list_models() -> str:
    """The architectures, the methods and the matrix of which method runs on which architecture."""
    archs, registered = heads.architectures(), heads.methods()
    lines = ["architectures (--head; name, input, summary):"]
    lines += [f"  {name:14} {cls.input:6} {cls.summary}" for name, cls in archs.items()]
    lines.append("methods (--method; name, settings, needs, summary):")
    lines += [f"  {name:9} {'/'.join(sorted(cls.settings)):5} {parts_column(cls):16} {cls.summary}"
              for name, cls in registered.items()]
    width = max(map(len, archs))
    lines.append("which method runs on which architecture (x: yes; ~: yes, without a part it uses where present "
                 "(see the method); .: lacks a part the method needs):")
    lines.append(" " * (width + 2) + " ".join(f"{name:>6}" for name in registered))
    for arch_name, arch_cls in archs.items():
        cells = [f"{matrix_cell(arch_cls, method_cls):>6}" for method_cls in registered.values()]
        lines.append(f"  {arch_name:{width}} " + " ".join(cells))
    lines.append("presets (--preset NAME; which methods on which architectures):")
    for entry in registered_presets():
        applies = (f"{'/'.join(entry.methods) or 'any method'} on {'/'.join(entry.architectures) or 'any architecture'}")
        trainer = f"; sets {', '.join(f'{k}={v}' for k, v in entry.trainer.items())}" if entry.trainer else ""
        lines.append(f"  {entry.name:18} {applies}: {entry.help}{trainer}")
    return "\n".join(lines)


def feature_cache_dir(_ctx, _param, value: str | None) -> Path | None:
    if value is None:
        return default_feature_cache()
    return None if value.lower() == "none" else Path(value)


def split_streams(_ctx, _param, value: str) -> tuple[str, ...]:
    return tuple(stream.strip() for stream in value.split(",") if stream.strip())


@main.command()
@click.option("--store", "store_path", type=STORE,
              help="Feature store: a directory, a packed .zip/.tar or a URL ($VIDSHIFT_STORE_CACHE: local copies).")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), help="Manifest of the store's videos.")
@run_options(config_help="YAML mapping of hyper-parameter overrides.", step_noun="Step")
@click.option("--features", type=click.Choice(["auto", "memory", "stream"]), default="auto", show_default=True,
              help="Hold features in (GPU) memory, stream them from the store, or decide from their size.")
@click.option("--memory-budget-gb", type=click.FloatRange(min=0), default=None, help="Budget for --features auto.")
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="DataLoader processes when streaming from the store.")
@click.option("--feature-cache", callback=feature_cache_dir, metavar="DIR|none",
              help="Where streamed features get memory-mapped disk copies, reused by later runs [default: "
                   "$VIDSHIFT_FEATURE_CACHE, else ~/.cache/vidshift/features]; none: read every batch from the store.")
@click.option("--eval-split", default=None, help="Target split to report [default: test, else val].")
@click.option("--skip-missing", is_flag=True, help="Train without manifest videos the store lacks.")
@click.option("--stream", "streams", default="rgb", show_default=True, callback=split_streams,
              help="Stream(s) of the store to read, comma-separated: rgb,flow trains on both.")
@click.option("--fusion", type=click.Choice(["late", "early"]), default="late", show_default=True,
              help="Several streams: late (one architecture per stream, logits averaged) or early (features "
                   "concatenated per step).")
@click.option("--dynamic-score/--no-dynamic-score", default=True, show_default=True,
              help="DRL's dynamic score of the selected model in metrics.json (fits two small students: at "
                   "UCF-HMDB size it costs more CPU time than a 30-epoch run of a small head).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last finished epoch.")
def train(store_path, manifest, head, config_file, assignments, out, resume, **options) -> None:
    """Stage two: train an architecture with a method on cached features and evaluate it every epoch."""
    if head == "help":
        click.echo(list_models())
        return
    for name, value in (("--store", store_path), ("--manifest", manifest), ("--source", options["source"]),
                        ("--out", out)):
        if value is None:
            raise click.UsageError(f"missing option {name}")
    config = TrainConfig(store=store_path, manifest=manifest, head=head, out=out,
                         hparams=parse_overrides(config_file, assignments), **options)
    report = run_training(config, resume=resume)
    final = report["final"]
    click.echo(json.dumps(final, indent=1))


@main.command(name="eval")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--store", "store_path", required=True, type=STORE, help="A directory, a packed .zip/.tar or a URL.")
@click.option("--manifest", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--domain", required=True)
@click.option("--split", default="test", show_default=True)
@click.option("--checkpoint", type=click.Choice(["best", "checkpoint"]), default="best", show_default=True,
              help="best: the source-val selected epoch; checkpoint: the last finished epoch.")
@click.option("--ensemble", is_flag=True, help="Combine the predictions of several runs (APN's gamma ensemble).")
@click.option("--rule", type=click.Choice(ENSEMBLE_RULES), default="mean", show_default=True,
              help="Ensemble: mean of the softmax probabilities, or per video the most confident run's.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Ensemble: directory for ensemble-<domain>-<split>.* (required with --ensemble).")
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="DataLoader processes streaming the features.")
def evaluate(run_dirs, store_path, manifest, domain, split, checkpoint, ensemble, rule, out, device,
             workers) -> None:
    """Accuracy, mean class accuracy and confusion matrix (CSV + PNG in RUN_DIR) of a trained run, or with
    --ensemble of several runs combined (in --out)."""
    if ensemble:
        if out is None:
            raise click.UsageError("--ensemble writes its report to --out DIR; give one")
        report = evaluate_ensemble(list(run_dirs), store_path, manifest, domain, split, out, checkpoint, device,
                                   workers, rule)
        for member in report["members"]:
            click.echo(f"  {member['run']}: top-1 {member['accuracy']:.4f}")
        click.echo(f"{domain}/{split}: ensemble of {len(run_dirs)} runs ({rule}), {report['videos']} videos, top-1 "
                   f"{report['accuracy']:.4f}, mean class accuracy {report['mean_class_accuracy']:.4f}; wrote "
                   f"{out}/ensemble-{domain}-{split}.*")
        return
    if len(run_dirs) != 1:
        raise click.UsageError(f"got {len(run_dirs)} run dirs: evaluate one, or combine several with --ensemble")
    (run_dir,) = run_dirs
    report = evaluate_run(run_dir, store_path, manifest, domain, split, checkpoint, device, workers)
    click.echo(f"{domain}/{split}: {report['videos']} videos, top-1 {report['accuracy']:.4f}, "
               f"mean class accuracy {report['mean_class_accuracy']:.4f}; wrote {run_dir}/eval-{domain}-{split}.*")


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_out"), show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--videos-per-class", default=DemoConfig.videos_per_class, show_default=True)
@click.option("--frame-size", default=DemoConfig.frame_size, show_default=True)
@click.option("--head", "head_names", multiple=True, help="Only the runs of these architectures (repeatable).")
@click.option("--method", "method_names", multiple=True, help="Only the runs of these methods (repeatable).")
@click.option("--epochs", default=DemoConfig.epochs, show_default=True, type=click.IntRange(min=1),
              help="Training epochs per run.")
@click.option("--format", "store_format", type=click.Choice(["zarr", "hdf5"]), default="zarr", show_default=True)
def demo(out: Path, seed: int, videos_per_class: int, frame_size: int, head_names: tuple[str, ...],
         method_names: tuple[str, ...], epochs: int, store_format: str) -> None:
    """Synth -> extract -> train a grid of methods x architectures -> table of accuracies (minutes on a CPU)."""
    run_demo(DemoConfig(out=out, seed=seed, videos_per_class=videos_per_class, frame_size=frame_size,
                        heads=head_names, methods=method_names, epochs=epochs, store_format=store_format),
             echo=click.echo)


if __name__ == "__main__":
    main()
