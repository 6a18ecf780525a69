"""``vidshift demo``: synth -> extract -> train a grid of (method, architecture) runs -> a table of accuracies.

Everything runs on a laptop CPU in minutes: a random-init ResNet-18 at a small frame size extracts the built-in
synthetic dataset (classes defined by motion, a background colour that gives the class away in the source domain
only), then ``DEMO_RUNS`` train: every method on one architecture it runs on, every architecture with ERM, and
the two rows that frame the table, source-only (ERM, dg) and target-only (ERM trained on the target's labels), so
the gap a DG/DA method may close is visible and shown to be learnable. Re-running reuses the videos and the store
(the extraction resumes) and each run: a finished run as it is, a killed one resumed; a run made with other
settings (another --epochs, say) is moved aside (``<run>.replaced-<time>``) and retrained.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from extract.run import ExtractConfig, run_extract
from extract.synth import CLASSES, SynthConfig, describe, generate
import heads
from heads.method import hparam_specs, lookup, presets_for
from pipelines.train import RunMismatch, TrainConfig, train

# Small-data settings. The paper defaults assume thousands of pretrained-backbone features: on 72 source videos of
# random-init ResNet-18 features (mean ~0.9, small class-dependent variation) SGD at lr 0.03 blows up in the first
# updates and leaves dead units (loss stuck at ln 6); lr 0.003 with batches of 8 learns. init_std=0 replaces
# TA3N's N(0, 0.001) init, which barely moves in a few hundred updates. A (method, architecture) pair may refine
# these for the demo with a preset named "demo" (applied on top).
DEMO_OVERRIDES = {"epochs": 20, "batch_size": 8, "lr": 0.003, "init_std": 0.0}

# The demo's source and target. The source carries the colour cue (the first domain does). The direction matters:
# with random-init ResNet-18 features the studio domain's motion can be learned from its own labels (STDN
# target-only: 0.62 on studio test, 20 epochs), the outdoor domain's (stripes, camera shake, noise) cannot (0.17,
# chance, with STDN, TRN or TemPooling at up to 60 epochs), so only outdoor -> studio shows a gap that is real
# and learnable.
DEMO_DOMAINS = ("outdoor", "studio")

# (architecture, method, setting): ERM on every architecture, source-only and target-only to frame the table, and
# every other method on the architecture its paper's table pairs it with (DRL, which has no video DA/DG table, on
# STDN, whose maps show the motion, and on TRN).
DEMO_RUNS: tuple[tuple[str, str, str], ...] = (
    ("tempooling", "erm", "dg"), ("tempooling", "erm", "target-only"),
    ("trn", "erm", "dg"), ("trn", "erm", "target-only"),
    ("trn", "dann", "da"), ("trn", "jan", "da"), ("tempooling", "adabn", "da"), ("trn", "mcd", "da"),
    ("trn", "ta2n", "da"), ("trn", "ta3n", "da"), ("tempooling", "ta3n", "da"),
    ("trn", "mixup", "dg"), ("trn", "irm", "dg"), ("trn", "ada", "dg"), ("trn", "m-ada", "dg"), ("trn", "cop", "dg"),
    ("tsn-maps", "erm", "dg"), ("stdn-sgm", "erm", "dg"), ("stdn-trm", "erm", "dg"), ("stdn-strm", "erm", "dg"),
    ("stdn-mixstyle", "erm", "dg"), ("stdn", "erm", "dg"), ("stdn", "erm", "target-only"),
    ("apn", "erm", "dg"), ("apn", "video-ada", "dg"), ("trn-attn", "erm", "dg"),
    ("stdn", "drl-fast", "dg"), ("trn", "drl-aug", "dg"), ("trn", "drl-minmax", "dg"),
)


def demo_overrides(arch: str, method: str) -> dict:
    specs = hparam_specs(*lookup(arch, method))
    common = {name: value for name, value in DEMO_OVERRIDES.items() if name in specs}
    return {**common, **(heads.preset("demo", arch, method).hparams if "demo" in presets_for(arch, method) else {})}


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    seed: int = 0
    videos_per_class: int = SynthConfig.videos_per_class
    frame_size: int = 112
    sampling: str = "uniform:8"        # 8 steps per 16-frame clip: half the extraction cost, motion still visible
    backbone: str = "resnet18"
    heads: tuple[str, ...] = ()        # only the runs of these architectures (default: all)
    methods: tuple[str, ...] = ()      # only the runs of these methods (default: all)
    epochs: int = DEMO_OVERRIDES["epochs"]
    store_format: str = "zarr"


def demo_runs(arch_names: tuple[str, ...] = (), method_names: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """The (architecture, method, setting) runs of ``DEMO_RUNS`` for the given architectures and methods."""
    for names, registered, what in ((arch_names, heads.architectures(), "architecture"),
                                    (method_names, heads.methods(), "method")):
        unknown = sorted(set(names) - set(registered))
        if unknown:
            raise ValueError(f"unknown {what}(s) {unknown}; available: {', '.join(registered)}")
    return [run for run in DEMO_RUNS
            if (not arch_names or run[0] in arch_names) and (not method_names or run[1] in method_names)]


def prepare_store(config: DemoConfig, echo=print) -> tuple[Path, SynthConfig]:
    """The demo's synthetic videos and their store under ``config.out`` (made, or resumed and reused); the manifest."""
    out = Path(config.out)
    synth = SynthConfig(seed=config.seed, videos_per_class=config.videos_per_class, domains=DEMO_DOMAINS)
    manifest = out / "data" / "manifest.csv"
    if not manifest.is_file():
        generate(out / "data", synth)
    echo(describe(synth))
    summary = run_extract(ExtractConfig(manifest=manifest, root=manifest.parent, out=out / "store",
                                        format=config.store_format, backbone=config.backbone, weights="none",
                                        frame_size=config.frame_size, sampling=config.sampling, batch_size=16,
                                        seed=config.seed))
    for line in summary.lines():
        echo(line)
    return manifest, synth


def run_demo(config: DemoConfig, echo=print) -> list[dict]:
    out = Path(config.out)
    manifest, synth = prepare_store(config, echo)
    source, target = synth.domains[0], synth.domains[1]
    rows = []
    for arch, method, setting in demo_runs(config.heads, config.methods):
        overrides = {**demo_overrides(arch, method), "epochs": config.epochs}
        report = train_or_reuse(TrainConfig(store=out / "store", manifest=manifest, head=arch, method=method,
                                            source=source, target=target, setting=setting, hparams=overrides,
                                            seed=config.seed, out=out / "runs" / f"{method}-{arch}-{setting}"), echo)
        rows.append({"method": method, "head": arch, "setting": setting, "input": heads.architectures()[arch].input,
                     **report["final"]})
    table = format_table(rows, source, target)
    echo(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


def train_or_reuse(config: TrainConfig, echo=print) -> dict:
    """Train one demo run; a finished run returns at once, a killed one resumes, one with other settings retrains."""
    label = f"{config.method} on {config.head} ({config.setting})"
    metrics = Path(config.out) / "metrics.json"
    done = json.loads(metrics.read_text())["final"]["epochs_run"] if metrics.is_file() else 0
    if done < config.hparams["epochs"]:
        echo(f"resuming {label} after epoch {done} ..." if done else f"training {label} ...")
    try:
        return train(config, resume=True)
    except RunMismatch as mismatch:  # the trainer refuses to resume a run made with other settings
        kept = Path(config.out).with_name(f"{Path(config.out).name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        echo(f"retraining {label}: its {mismatch.key} changed since the run in {config.out}; "
             f"the old run is kept as {kept}")
        Path(config.out).rename(kept)  # nothing already computed is lost
        return train(config)


def format_table(rows: list[dict], source: str, target: str) -> str:
    header = (f"| method | architecture | setting | input | train-domain val | {target} (selected on val) "
              f"| {target} (last) | {target} oracle* |")
    lines = [header, "|" + "---|" * 8]
    for row in rows:
        cells = [row["method"], row["head"], row["setting"], row["input"]] + [
            f"{row[key]:.3f}" if row.get(key) is not None else "-"
            for key in ("src_val_acc_selected", "target_acc_selected", "target_acc_last", "oracle_target_acc")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nTrain domain: {source} (val: {source} val), except target-only: {target} train (val: {target} "
                 f"val). erm in dg is the source-only row, erm in target-only the upper bound.")
    lines.append(f"*oracle: best {target} epoch, chosen with target labels (what TA3N/APN's official code report); "
                 f"not a valid DG/DA result. Chance is {1 / len(CLASSES):.3f} ({len(CLASSES)} classes).")
    return "\n".join(lines)
