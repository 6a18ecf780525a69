"""``vidshift demo``: synth -> extract -> a sweep of (method, architecture) runs -> the report's tables.

Everything runs on a laptop CPU in minutes: a random-init ResNet-18 at a small frame size extracts the built-in
synthetic dataset (classes defined by motion, a background colour that gives the class away in the source domain
only), then ``DEMO_RUNS`` train: every method on one architecture it runs on, every architecture with ERM, and
the two rows that frame the table, source-only (ERM, dg) and target-only (ERM trained on the target's labels), so
the gap a DG/DA method may close is visible and shown to be learnable. The runs go through ``vidshift sweep``'s
machinery (``pipelines/sweep.py``, one slot: this process, features loaded once) into ``runs/<method>-<arch>-<setting>``
and the table is ``vidshift report``'s. Re-running reuses the videos and the store (the extraction resumes) and
each run: a finished run as it is, a killed one resumed; a run made with other settings (another --epochs, say)
is moved aside (``<run>.replaced-<time>``) and retrained.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from extract.run import ExtractConfig, run_extract
from extract.synth import CLASSES, SynthConfig, describe, generate
import heads
from heads.method import hparam_specs, lookup, presets_for
from pipelines.report import write_report
from pipelines.runs import RunError
from pipelines.sweep import run_sweep
from pipelines.sweep_spec import Direction, Group, PlannedRun, SweepSpec, plan

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
    ("stcda", "erm", "dg"), ("stcda", "stcda", "da"), ("stcda-maps", "erm", "dg"),
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


def demo_spec(config: DemoConfig, manifest: Path, synth: SynthConfig) -> SweepSpec:
    """The demo's runs as a sweep: one direction (source -> target), one seed, ``demo_runs`` as the rows."""
    source, target = synth.domains[0], synth.domains[1]
    direction = Direction(f"{source}->{target}", source, target, str(Path(config.out) / "store"), manifest)
    groups = [Group((arch,), (method,), setting, None, None, {**demo_overrides(arch, method), "epochs": config.epochs},
                    {}, None, {}) for arch, method, setting in demo_runs(config.heads, config.methods)]
    return SweepSpec([direction], groups, [config.seed], source="vidshift demo")


def demo_run_name(run: PlannedRun) -> str:
    """runs/<method>-<architecture>-<setting>, as before sweeps: the demo has one run per row."""
    return f"{run.row['method']}-{run.row['head']}-{run.row['setting']}"


def run_demo(config: DemoConfig, echo=print) -> list[dict]:
    """The demo's store, its runs through ``vidshift sweep`` (one slot, in this process) and the report's tables,
    written to OUT/results.md (and OUT/report/); returns the report's records."""
    out = Path(config.out)
    manifest, synth = prepare_store(config, echo)
    runs = plan(demo_spec(config, manifest, synth), out, namer=demo_run_name)
    summary = run_sweep(runs, out, "vidshift demo", echo=echo)
    if summary.failed:
        raise RunError("demo runs failed (each error is in runs/<run>/failed.json): "
                       + "; ".join(f"{name}: {error}" for name, error in summary.failed.items()))
    result = write_report(out)
    table = result["texts"]["md"] + (f"\nChance is {1 / len(CLASSES):.3f} ({len(CLASSES)} classes). Figures: "
                                     f"`vidshift report {out} --run ta3n-trn-da` (curves, t-SNE, confusion).")
    echo(table)
    (out / "results.md").write_text(table + "\n")
    return result["records"]
