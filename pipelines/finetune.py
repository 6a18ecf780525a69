"""End-to-end mode: fine-tune a backbone and an architecture together from raw video (``vidshift finetune``), on
one process or many (``torchrun --nproc_per_node N -m pipelines.finetune ...``; ``pipelines/distributed.py``).

The run is ``vidshift train``'s with frames for features: the same protocols (dg, da, target-only), the same
selection on the training domain's val split, the same ``--config`` / ``--set`` / ``--preset`` / ``--resume``
conventions and the same ``metrics.json`` schema (``pipelines/train.py``), so the two modes' reports compare. The
data are decoded frames (``pipelines/video_data.py``), the model a stage-one backbone in front of any architecture
(``pipelines/finetune_model.py``), trained by any registered method, except those that append examples to the
training set (``ada``, ``m-ada``: their copies of every source clip would be pixels).

A run dir holds what ``vidshift train`` writes (``config.yaml``, ``metrics.json``, ``checkpoint.pt`` for
``--resume``, ``best.pt``, ``train.log``) and ``videos.json`` (each video's frame count, as probed when the run
started: a resume trains on the same videos), ``failures.json`` (videos skipped: not decodable, with the reason) and,
at the end, ``backbone.pt``: the selected epoch's backbone as a torchvision-keyed state dict, which ``vidshift
extract --weights RUN/backbone.pt`` reads (the store's provenance then names the file, and its weights_sha256 is
``backbone.json``'s). Only rank 0 writes; every rank reads the checkpoint to resume, restoring its own RNG state.

Not computed here: the dynamic score ``vidshift train`` adds at the end (it fits spatial students on cached
features); extract a store with ``backbone.pt`` and score a cached-feature run there.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import yaml
from tqdm import tqdm

import heads
from extract.backbones import safe_load, state_dict_sha256
from extract.manifest import file_sha256, read_manifest
from extract.provenance import software_versions
from heads.base import LabelledBatch, UnlabelledBatch, resolve
from heads.method import Method
from pipelines.data import target_batch_size
from pipelines.distributed import GradientAverager, Processes, start_processes
from pipelines.evaluate import accuracy_report
from pipelines.finetune_model import FINETUNE_HPARAMS, BackboneFactory, backbone_state, end_to_end
from pipelines.runs import (RunError, check_domains, check_labels, open_run_splits, resolve_device, save_atomic,
                            select, source_classes)
from pipelines.train import RunMismatch, TrainConfig, _cuda_rng_states, _is_best, _log_to, _write_metrics, \
    resolve_config
from pipelines.video_data import ClipPlan, VideoSet, iterate_clips, normalise, probe_videos, shard

log = logging.getLogger("vidshift.train")      # train.log, as `vidshift train` writes it
# What decides a run's numbers besides the hparams, classes, manifest and initial weights: --resume repeats them.
RESULT_FIELDS = ("head", "method", "source", "target", "setting", "seed", "num_segments", "train_sampling",
                 "eval_split", "backbone", "weights", "frame_size", "precision")
TRAINING_SEED = 1_000_003       # each process's training RNG: seed * this + rank (dropout, MixStyle, tuple draws)


@dataclass
class FinetuneConfig:
    manifest: Path
    head: str                                     # the architecture (``vidshift train --head help``)
    source: str
    out: Path
    root: Path | None = None                      # the manifest's relative paths start here; default its folder
    method: str = "erm"
    target: str | None = None
    setting: str = "dg"
    backbone: str = "resnet50"
    weights: str = "imagenet"                     # imagenet | none (seeded random init) | a state-dict path
    frame_size: int = 224                         # S: the training crop and the test centre crop
    precision: str = "auto"                       # backbone autocast on CUDA: auto (bf16) | bf16 | fp32
    hparams: dict = field(default_factory=dict)   # overrides: the pair's and FINETUNE_HPARAMS (--config / --set)
    preset: str | None = None
    seed: int = 0
    num_segments: int = 5
    train_sampling: str | None = None
    eval_split: str | None = None
    device: str = "auto"
    workers: int = 2                              # DataLoader processes decoding per training process
    # frames are one RGB stream; metrics.json names streams and fusion as `vidshift train`'s does
    streams: ClassVar[tuple[str, ...]] = ("rgb",)
    fusion: ClassVar[str] = "late"

    def as_dict(self) -> dict:
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}


@dataclass
class Run:
    """What one training process holds: the model, the sets, where it runs and among which processes."""

    config: FinetuneConfig
    model: Method
    factory: BackboneFactory
    classes: list[str]
    sets: dict[str, VideoSet | None]        # source_train, source_val, target_train, target_eval
    device: torch.device
    processes: Processes
    failures: dict[str, str]                # video id -> reason, every video skipped so far

    @property
    def hparams(self) -> dict:
        return self.model.hparams


def resolve_finetune(config: FinetuneConfig) -> tuple[FinetuneConfig, dict, dict]:
    """The config with the preset's trainer options, the pair's overrides and the fine-tuning ones; checked as
    ``vidshift train`` checks its config (the same messages), before any video is opened."""
    tuning = {name: value for name, value in config.hparams.items() if name in FINETUNE_HPARAMS}
    pair = {name: value for name, value in config.hparams.items() if name not in FINETUNE_HPARAMS}
    as_train = TrainConfig(store=Path(), manifest=config.manifest, head=config.head, source=config.source,
                           out=config.out, method=config.method, target=config.target, setting=config.setting,
                           hparams=pair, preset=config.preset, seed=config.seed, num_segments=config.num_segments,
                           train_sampling=config.train_sampling, workers=config.workers,
                           eval_split=config.eval_split)
    resolved, overrides = resolve_config(as_train)
    _, method_cls = heads.method.lookup(config.head, config.method)
    if method_cls.extra_examples is not Method.extra_examples:
        raise RunError(f"method {config.method!r} appends adversarial copies of the source videos to the training "
                       f"set, which in end-to-end mode would be pixel clips held in memory; train it on cached "
                       f"features (`vidshift train`), or use video-ada (on-line copies per batch)")
    if config.frame_size < 1 or config.precision not in ("auto", "fp32", "bf16"):
        raise RunError(f"--frame-size {config.frame_size} / --precision {config.precision!r}: the size must be at "
                       f"least 1 px and the precision auto, bf16 or fp32")
    tuning = resolve(FINETUNE_HPARAMS, tuning, "vidshift finetune")
    config = FinetuneConfig(**{**asdict(config), "train_sampling": resolved.train_sampling})
    return config, overrides, tuning


def finetune(config: FinetuneConfig, resume: bool = False, show_progress: bool = True,
             stop_after: int | None = None) -> dict:
    """Run (or resume) a fine-tuning run; return the report written to ``metrics.json``.

    ``stop_after``: finish at most this many epochs in this call, then return (a cluster job's time limit;
    ``resume=True`` continues). Under torchrun, every process calls this.
    """
    config, overrides, tuning = resolve_finetune(config)
    processes = start_processes(config.device)
    out = Path(config.out)
    checkpoint_path = out / "checkpoint.pt"
    if checkpoint_path.exists() and not resume:
        raise RunError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    if processes.main:
        out.mkdir(parents=True, exist_ok=True)
        _log_to(out / "train.log")
    processes.barrier()
    run = _start(config, overrides, tuning, processes, resume and checkpoint_path.exists())
    history, start_epoch = _restore(run, checkpoint_path) if resume and checkpoint_path.exists() else ([], 0)
    epochs = run.hparams["epochs"]
    last = epochs if stop_after is None else min(epochs, start_epoch + stop_after)
    for epoch in range(start_epoch, last):
        started = time.perf_counter()
        record = {"epoch": epoch + 1, **_train_epoch(run, epoch, show_progress), **_evaluate_epoch(run)}
        history.append(record)
        _save_epoch(run, history, epoch, out)
        log.info("epoch %d (%.1fs): %s", epoch + 1, time.perf_counter() - started,
                 ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"))
    if last == epochs and processes.main:
        _export_backbone(run, out)
    processes.barrier()
    return json.loads((out / "metrics.json").read_text())


# ----------------------------------------------------------------------------------------------------------
# starting and resuming


def _start(config: FinetuneConfig, overrides: dict, tuning: dict, processes: Processes, resuming: bool) -> Run:
    """Probe the videos (or read the probe of the run being resumed), open the sets, build the model."""
    out, root = Path(config.out), config.root or config.manifest.parent
    entries = read_manifest(config.manifest)
    classes = source_classes(entries, check_domains(config, entries))
    frames, failures = _probe(entries, config, root, processes, out / "videos.json" if resuming else None)
    class_index = {name: i for i, name in enumerate(classes)}

    def open_split(domain: str, split: str, labelled: bool = True) -> VideoSet | None:
        chosen = select(entries, domain, split)
        if not chosen:
            return None
        if labelled:
            check_labels(chosen, classes)
        return VideoSet(chosen, root, frames, class_index, labelled)

    sets = dict(zip(("source_train", "source_val", "target_train", "target_eval"),
                    open_run_splits(config, entries, open_split)))
    hp = heads.resolve_hparams(config.head, config.method, overrides)
    if hp["batch_size"] % processes.world:
        raise RunError(f"batch_size {hp['batch_size']} (the global batch) must divide by the {processes.world} "
                       f"training processes; --set batch_size=N")
    factory = BackboneFactory(config.backbone, config.weights, config.frame_size, _precision(config), tuning,
                              config.seed)
    arch_cls, _ = heads.method.lookup(config.head, config.method)
    torch.manual_seed(config.seed)       # the architecture's initialisation, the same in every process
    backbone = factory.build()
    model = heads.build(config.head, config.method, factory.feature_shape(arch_cls.input), len(classes),
                        config.num_segments, overrides,
                        wrap=lambda arch: end_to_end(arch, backbone, factory.pixel_space(), config.frame_size))
    device = _device(config, processes)
    model.to(device)
    if device.type == "cuda":   # NHWC lets cuDNN use its fastest convolutions (the frames arrive channels last)
        backbone.net.to(memory_format=torch.channels_last)
    if processes.world > 1:
        GradientAverager(model, processes.world)
    torch.manual_seed(config.seed * TRAINING_SEED + processes.rank)
    run = Run(config, model, factory, classes, sets, device, processes, failures)
    record = {"config": config.as_dict(), "hparams": {**hp, **tuning}, "classes": classes,
              "backbone": {"name": config.backbone, "weights": factory.identity,
                           "weights_sha256": factory.weights_sha256, "processes": processes.world},
              "manifest_sha256": file_sha256(config.manifest), "software": software_versions()}
    if processes.main:
        if resuming:
            _check_same_run(out / "config.yaml", record)
        (out / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
        _write_failures(out, failures)
    log.info("%s on %s behind %s (%s; %d parameters), %s, %d process(es), %d videos skipped", config.method,
             config.head, config.backbone, factory.identity, sum(p.numel() for p in model.parameters()),
             config.setting, processes.world, len(failures))
    return run


def _precision(config: FinetuneConfig) -> str:
    return "bf16" if config.precision == "auto" else config.precision


def _device(config: FinetuneConfig, processes: Processes) -> torch.device:
    device = resolve_device(config.device)
    return torch.device("cuda", processes.local_rank) if device.type == "cuda" and processes.world > 1 else device


def _probe(entries, config: FinetuneConfig, root: Path, processes: Processes,
           saved: Path | None) -> tuple[dict[str, int], dict[str, str]]:
    """Frames per decodable video of the run's domains, and the reason of each that is not; each process opens
    its share. A resumed run reads what its first start probed."""
    if saved is not None:
        probed = json.loads(saved.read_text())
        return probed["frames"], probed["failures"]
    domains = {config.source, config.target}
    mine = [entry for entry in entries if entry.domain in domains][processes.rank::processes.world]
    frames, failures = {}, {}
    for part_frames, part_failures in processes.gather(probe_videos(mine, root, config.workers)):
        frames.update(part_frames)
        failures.update(part_failures)
    if processes.main:
        out = Path(config.out)
        (out / "videos.json").write_text(json.dumps({"frames": frames, "failures": failures}, indent=1))
    return frames, failures


def _check_same_run(path: Path, record: dict) -> None:
    def identity(saved: dict) -> dict:
        saved = json.loads(json.dumps(saved))   # tuples -> lists, as yaml reads them back
        return {"config": {name: saved["config"][name] for name in RESULT_FIELDS}, "hparams": saved["hparams"],
                "classes": saved["classes"], "weights_sha256": saved["backbone"]["weights_sha256"],
                "processes": saved["backbone"]["processes"], "manifest_sha256": saved["manifest_sha256"]}

    before, now = identity(yaml.safe_load(path.read_text())), identity(record)
    for key in before:
        if before[key] != now[key]:
            raise RunMismatch(f"--resume: {key} differs from the run in {path.parent} (saved {before[key]!r}, "
                              f"now {now[key]!r}); resume with the same arguments and number of processes, or "
                              f"start a new --out", key)


def _restore(run: Run, checkpoint_path: Path) -> tuple[list[dict], int]:
    state = safe_load(checkpoint_path)
    run.model.load_state_dict(state["model"])
    for optimizer, saved in zip(run.model.optimizers, state["optimizers"]):
        optimizer.load_state_dict(saved)
    torch.set_rng_state(state["torch_rng"][run.processes.rank])
    if run.device.type == "cuda":
        for index, cuda_state in enumerate(state["cuda_rng"][run.processes.rank][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    run.failures.update(state["failures"])
    log.info("resumed after epoch %d", state["epoch"] + 1)
    return state["history"], state["epoch"] + 1


# ----------------------------------------------------------------------------------------------------------
# an epoch


def _current(run: Run, role: str) -> VideoSet | None:
    """A set without the videos that failed while training."""
    videos = run.sets[role]
    return videos.without(set(run.failures)) if videos is not None else None


def _train_epoch(run: Run, epoch: int, show_progress: bool) -> dict[str, float]:
    """One pass over the training set: global batches planned alike in every process, each decoding its share."""
    hp, processes, device = run.hparams, run.processes, run.device
    source, target = _current(run, "source_train"), _current(run, "target_train")
    batches = math.ceil(len(source) / hp["batch_size"])
    generator = torch.Generator().manual_seed(run.config.seed * 100_003 + epoch)   # the same plans on resume
    sampling, segments = run.config.train_sampling, run.config.num_segments
    plans = source.training_plans(segments, hp["batch_size"], batches, sampling, generator)
    target_plans = (target.training_plans(segments, target_batch_size(hp["batch_size"], len(source), len(target)),
                                          batches, sampling, generator) if target else [])
    mine = [shard(plan, processes.rank, processes.world) for plan in plans]
    target_stream = (iterate_clips(target, [shard(p, processes.rank, processes.world) for p in target_plans],
                                   run.factory.preprocess, run.config.workers) if target else None)
    run.model.train()
    sums, updates = {}, 0
    bar = tqdm(iterate_clips(source, mine, run.factory.preprocess, run.config.workers), total=batches,
               desc=f"epoch {epoch + 1}/{hp['epochs']}", unit="batch", leave=False,
               disable=None if show_progress and processes.main else True)
    for step, (plan, clips) in enumerate(bar):
        run.failures.update(clips.failures)
        batch = LabelledBatch(normalise(clips.frames.to(device), run.factory.preprocess),
                              source.labels[plan.videos[clips.kept]].to(device))
        tgt = None
        if target_stream is not None:
            _, target_clips = next(target_stream)
            run.failures.update(target_clips.failures)
            tgt = UnlabelledBatch(normalise(target_clips.frames.to(device), run.factory.preprocess))
        sizes = [len(batch.y), *([len(tgt.x)] if tgt is not None else [])]
        if min(processes.gather(min(sizes))) == 0:     # every process skips a batch one of them lost entirely
            log.warning("epoch %d, batch %d skipped: no video of a process's share decoded", epoch + 1, step + 1)
            continue
        logs = run.model.update(batch, tgt, (epoch * batches + step) / (hp["epochs"] * batches))
        for key, value in logs.items():
            sums[key] = sums.get(key, 0.0) + value
        updates += 1
        bar.set_postfix(loss=f"{logs['loss']:.3f}")
    for failed in processes.gather(run.failures):
        run.failures.update(failed)
    # each process's mean over its share, averaged over the processes: the global batch's mean loss
    totals = processes.sum({**sums, "updates": float(updates)})
    count = max(totals.pop("updates"), 1.0)
    return {key: value / count for key, value in totals.items()}


@torch.no_grad()
def _predict(run: Run, videos: VideoSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every video that decodes, at the segment centres; each process predicts its share."""
    processes = run.processes
    positions = np.array_split(np.arange(len(videos)), processes.world)[processes.rank]
    batch = max(1, run.hparams["batch_size"] // processes.world)
    plans: list[ClipPlan] = videos.centre_plans(run.config.num_segments, batch, positions) if len(positions) else []
    run.model.eval()
    logits, labels = [], []
    for plan, clips in iterate_clips(videos, plans, run.factory.preprocess, run.config.workers):
        run.failures.update(clips.failures)
        if len(clips.kept):
            x = normalise(clips.frames.to(run.device), run.factory.preprocess)
            logits.append(run.model.predict(x).float().cpu())
            labels.append(videos.labels[plan.videos[clips.kept]])
    parts = processes.gather((torch.cat(logits) if logits else torch.zeros(0, len(run.classes)),
                              torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _evaluate_epoch(run: Run) -> dict[str, float]:
    """As ``vidshift train``: the training domain's val split (``src_val``) and the target's, under a forked RNG."""
    results = {}
    train_domain = "target" if run.config.setting == "target-only" else "source"
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        for prefix, role, domain in (("src_val", "source_val", train_domain), ("tgt", "target_eval", "target")):
            videos = _current(run, role)
            if videos is None:
                continue
            run.model.set_eval_domain(domain)
            logits, labels = _predict(run, videos)
            report = accuracy_report(logits, labels, len(run.classes))
            results[f"{prefix}_acc"], results[f"{prefix}_mca"] = report["accuracy"], report["mean_class_accuracy"]
    for failed in run.processes.gather(run.failures):
        run.failures.update(failed)
    return results


def _save_epoch(run: Run, history: list[dict], epoch: int, out: Path) -> None:
    """Rank 0 writes best.pt (when selected), checkpoint.pt with every process's RNG state, metrics, failures."""
    rng = run.processes.gather(torch.get_rng_state())
    cuda_rng = run.processes.gather(_cuda_rng_states(run.device))
    if run.processes.main:
        state = run.model.state_dict()
        if _is_best(history):
            save_atomic({"model": state, "epoch": epoch}, out / "best.pt")
        save_atomic({"model": state, "optimizers": [o.state_dict() for o in run.model.optimizers],
                     "torch_rng": rng, "cuda_rng": cuda_rng, "history": history, "epoch": epoch,
                     "failures": run.failures}, out / "checkpoint.pt")
        _write_metrics(out, history, run.config)
        _write_failures(out, run.failures)
    run.processes.barrier()


def _write_failures(out: Path, failures: dict[str, str]) -> None:
    (out / "failures.json").write_text(json.dumps(failures, indent=1, sort_keys=True))


# ----------------------------------------------------------------------------------------------------------
# the fine-tuned backbone


def _export_backbone(run: Run, out: Path) -> None:
    """backbone.pt: the selected epoch's backbone, for ``vidshift extract --weights``; backbone.json: its identity."""
    best = safe_load(out / "best.pt")
    run.model.load_state_dict(best["model"])
    weights = backbone_state(run.model)
    save_atomic(weights, out / "backbone.pt")
    (out / "backbone.json").write_text(json.dumps({
        "run": str(out.resolve()), "epoch": best["epoch"] + 1, "backbone": run.config.backbone,
        "fine_tuned_from": run.factory.identity, "weights_sha256": state_dict_sha256(weights),
        "use": f"vidshift extract MANIFEST --backbone {run.config.backbone} --weights {out / 'backbone.pt'} "
               f"--frame-size {run.config.frame_size} --out STORE"}, indent=1))


if __name__ == "__main__":      # torchrun --nproc_per_node N -m pipelines.finetune --manifest ... (as vidshift finetune)
    from pipelines.cli import main

    main(["finetune", *sys.argv[1:]])
