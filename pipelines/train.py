"""Stage two: train an architecture with a method from cached features (``vidshift train``, DESIGN §6).

- ``dg``: the model sees the source domain's train split only; the checkpoint is selected on source val; the
  target is only evaluated.
- ``da``: labelled source train plus the *unlabelled* target train split (``UnlabelledBatch`` has no labels),
  target batches sized by the ratio of the two training sets.
- ``target-only``: the target's labelled train split, selected on target val (the upper bound of STCDA's tables).
Every epoch starts with the method's ``before_epoch`` hook (Volpi's ADA appends adversarial examples there; the
epoch then draws its batches from the training set and those examples together) and ends by evaluating the
training domain's val split and the target evaluation split, under a forked RNG so that evaluation (STDN's random
tuples) never shifts the training draws. ``metrics.json`` reports the target accuracy at the best val epoch (the
selection a real DG/DA user can make), at the last epoch, and the oracle (best target epoch; labelled as such: it
is what TA3N's and APN's official code report). After the last epoch it adds the selected model's dynamic score
(DRL §3, ``pipelines/dynamic_score.py``), computed under a forked RNG so that no training number moves.

A run dir holds ``config.yaml`` (everything needed to repeat it), ``metrics.json``, ``checkpoint.pt`` (last
epoch: model with the method's added examples, optimisers, CPU and CUDA RNG states; for ``--resume``),
``best.pt`` (model at the selected epoch) and ``train.log``. All checkpoints are plain state dicts, loadable with
``torch.load(weights_only=True)``. A resume must repeat what decides the numbers (``RESULT_FIELDS``, hparams,
classes, features, manifest); it may move the store or change how features are held.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
import yaml
from tqdm import tqdm

import heads
from extract.backbones import safe_load
from extract.manifest import file_sha256
from extract.provenance import software_versions
from heads.base import LabelledBatch, UnlabelledBatch, cat_inputs, map_inputs
from heads.method import Method, lookup, missing_parts, PART_NAMES
from pipelines.data import FUSIONS, TRAIN_SAMPLINGS, FeatureSet, iterate, place_features, target_batch_size
from pipelines.dynamic_score import run_dynamic_score
from pipelines.evaluate import accuracy_report, predict
from pipelines.runs import RunError, RunInputs, load_run_inputs, resolve_device, save_atomic, store_identity

if TYPE_CHECKING:
    from pipelines.feature_cache import FeatureCache

log = logging.getLogger("vidshift.train")
SETTINGS = ("dg", "da", "target-only")
# The TrainConfig fields that change a run's numbers; --resume must repeat them (with the resolved hparams, classes,
# features and manifest hashes). Paths, --features, --workers, --device, the memory budget and the feature cache may
# change.
RESULT_FIELDS = ("head", "method", "source", "target", "setting", "seed", "num_segments", "train_sampling",
                 "eval_split", "skip_missing", "streams", "fusion")
FALLBACK_BUDGET_GB = 2.0  # in-memory budget where the OS does not report free memory
BEFORE_EPOCH_SEED = 7_919_000  # offsets the seed of before_epoch's order from the epoch's batch plans


def default_feature_cache() -> Path:
    """Where streamed features get their disk copies: $VIDSHIFT_FEATURE_CACHE, else the user's cache directory."""
    if os.environ.get("VIDSHIFT_FEATURE_CACHE"):
        return Path(os.environ["VIDSHIFT_FEATURE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vidshift" / "features"


@dataclass
class TrainConfig:
    store: Path
    manifest: Path
    head: str                                     # the architecture (``vidshift train --head help``)
    source: str
    out: Path
    method: str = "erm"
    target: str | None = None
    setting: str = "dg"
    hparams: dict = field(default_factory=dict)   # overrides of the pair's defaults (--config / --set)
    preset: str | None = None                     # a named override set of the pair, applied before ``hparams``
    seed: int = 0
    num_segments: int = 5
    train_sampling: str | None = None             # random (TSN) or centre (TA3N's code); None: the preset's, else random
    features: str = "auto"                        # auto | memory | stream
    memory_budget_gb: float | None = None         # for "auto"; default: 3/4 of the available (GPU) memory
    device: str = "auto"
    workers: int = 2                              # DataLoader processes when streaming from the store
    feature_cache: Path | None = field(default_factory=default_feature_cache)  # streamed sets' disk copies; None: none
    eval_split: str | None = None                 # target split to report; default test, else val
    skip_missing: bool = False
    streams: tuple[str, ...] = ("rgb",)
    fusion: str = "late"                          # several streams: late (one architecture each) or early (concat)
    dynamic_score: bool = True                    # DRL's dynamic score after training (a post-hoc measure)

    def as_dict(self) -> dict:
        return {key: (str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value)
                for key, value in asdict(self).items()}


class RunMismatch(RunError):
    """``--resume`` of a run dir whose run was made with other settings (``key`` names the first difference)."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def memory_budget(device: torch.device, gigabytes: float | None) -> int:
    """Bytes ``--features auto`` may hold in memory: the given budget, else 3/4 of the available (GPU) memory.

    On the CPU "available" is the kernel's MemAvailable, which counts the page cache as reclaimable: free memory
    alone (SC_AVPHYS_PAGES) is a small fraction of it on any machine that has read files, and chose streaming for
    features that fit many times over.
    """
    if gigabytes is not None:
        return int(gigabytes * 2**30)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] * 3 // 4
    available = available_memory()
    if available is None:
        log.info("available memory unknown on this OS: in-memory budget %.0f GiB (--memory-budget-gb sets it)",
                 FALLBACK_BUDGET_GB)
        return int(FALLBACK_BUDGET_GB * 2**30)
    return available * 3 // 4


def available_memory() -> int | None:
    """The kernel's MemAvailable in bytes (Linux), else free physical memory where the OS reports it, else None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no os.sysconf (Windows) or no SC_AVPHYS_PAGES (macOS)
        return None


def resolve_config(config: TrainConfig) -> tuple[TrainConfig, dict]:
    """The config with the preset's trainer options filled in, and the model's overrides; errors before any I/O."""
    arch_cls, method_cls = lookup(config.head, config.method)
    if config.setting not in SETTINGS:
        raise RunError(f"--setting {config.setting!r}: use one of {', '.join(SETTINGS)}")
    protocol = "da" if config.setting == "da" else "dg"    # target-only trains without a target batch, as dg
    if protocol not in method_cls.settings:
        raise RunError(f"method {config.method!r} runs in {', '.join(sorted(method_cls.settings))}, not "
                       f"--setting {config.setting}")
    if config.setting in ("da", "target-only") and not config.target:
        raise RunError(f"--setting {config.setting} needs --target DOMAIN")
    if not config.streams or len(set(config.streams)) != len(config.streams):
        raise RunError(f"--stream {','.join(config.streams)}: name each stream once, e.g. --stream rgb,flow")
    if config.num_segments < 1 or config.workers < 0:
        raise RunError(f"--segments {config.num_segments} / --workers {config.workers}: segments must be at least 1 "
                       f"and workers at least 0")
    if config.memory_budget_gb is not None and config.memory_budget_gb < 0:
        raise RunError(f"--memory-budget-gb {config.memory_budget_gb}: must be at least 0")
    if config.fusion not in FUSIONS:
        raise RunError(f"--fusion {config.fusion!r}: use one of {', '.join(FUSIONS)}")
    chosen = heads.preset(config.preset, config.head, config.method) if config.preset else None
    overrides = {**(chosen.hparams if chosen else {}), **config.hparams}
    sampling = config.train_sampling or (chosen.trainer.get("train_sampling") if chosen else None) or "random"
    if sampling not in TRAIN_SAMPLINGS:
        raise RunError(f"--train-sampling {sampling!r}: use one of {', '.join(TRAIN_SAMPLINGS)}")
    hparams = heads.resolve_hparams(config.head, config.method, overrides)  # unknown/ill-typed/out of range: fail now
    missing = missing_parts(arch_cls, method_cls, hparams)
    if missing:
        raise RunError(f"method {config.method!r} needs {' and '.join(PART_NAMES[p] for p in missing)}, which "
                       f"architecture {config.head!r} does not have; `vidshift train --head help` shows the matrix")
    return replace(config, train_sampling=sampling, streams=tuple(config.streams)), overrides


def train(config: TrainConfig, resume: bool = False, show_progress: bool = True,
          cache: FeatureCache | None = None) -> dict:
    """Run (or resume) one training run; return the final report written to ``metrics.json``.

    ``cache``: features shared with the earlier runs of this process (a sweep's worker, ``pipelines/sweep.py``).
    """
    config, overrides = resolve_config(config)
    arch_cls, _ = lookup(config.head, config.method)
    out = Path(config.out)
    checkpoint_path = out / "checkpoint.pt"
    if checkpoint_path.exists() and not resume:
        raise RunError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    _log_to(out / "train.log")
    device = resolve_device(config.device)
    inputs = load_run_inputs(config, arch_cls.input, cache)
    run_record = {"config": config.as_dict(),
                  "hparams": heads.resolve_hparams(config.head, config.method, overrides),
                  "classes": inputs.classes, "store": store_identity(inputs.store, config.streams),
                  "manifest_sha256": file_sha256(config.manifest), "software": software_versions()}
    if resume and checkpoint_path.exists():
        _check_same_run(out / "config.yaml", run_record)
    # Rewritten on resume too: the paths and settings that may change are then those of the latest invocation.
    (out / "config.yaml").write_text(yaml.safe_dump(run_record, sort_keys=False))

    torch.manual_seed(config.seed)  # model initialisation
    model = heads.build(config.head, config.method, inputs.feat_shape, len(inputs.classes), config.num_segments,
                        overrides)
    model.to(device)
    hp = model.hparams
    where = (cache.place if cache else place_features)(inputs.steps_read(config.train_sampling, config.num_segments),
                                                       config.features, device,
                                                       memory_budget(device, config.memory_budget_gb),
                                                       config.feature_cache)
    log.info("%s on %s (%d parameters), %s, streams %s, features %s", config.method, config.head,
             sum(p.numel() for p in model.parameters()), config.setting, "+".join(config.streams), where)
    log.info("GRL/lr schedules and all hparams: %s", json.dumps(hp))

    history, start_epoch = [], 0
    if resume and checkpoint_path.exists():
        # RNG states must stay CPU tensors; load_state_dict moves weights and optimiser state to the model's device
        state = safe_load(checkpoint_path)
        model.load_state_dict(state["model"])
        for optimizer, saved in zip(model.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda":  # a run saved on another machine may have had more devices
            for index, cuda_state in enumerate(state.get("cuda_rng", [])[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, index)
        history, start_epoch = state["history"], state["epoch"] + 1
        log.info("resumed after epoch %d", state["epoch"])

    for epoch in range(start_epoch, hp["epochs"]):
        started = time.perf_counter()
        model.train()
        record = {"epoch": epoch + 1,
                  **model.before_epoch(lambda: _training_batches(inputs.source_train, config, epoch, hp, device),
                                       epoch / hp["epochs"])}
        record.update(_train_epoch(model, inputs, config, epoch, device, show_progress))
        record.update(_evaluate_epoch(model, inputs, config, device))
        history.append(record)  # no timings in it: metrics.json must be identical between identical runs
        log.info("epoch %d (%.2fs): %s", epoch + 1, time.perf_counter() - started,
                 ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"))
        if _is_best(history):
            save_atomic({"model": model.state_dict(), "epoch": epoch}, out / "best.pt")
        save_atomic({"model": model.state_dict(), "optimizers": [o.state_dict() for o in model.optimizers],
                     "torch_rng": torch.get_rng_state(), "cuda_rng": _cuda_rng_states(device), "history": history,
                     "epoch": epoch}, checkpoint_path)
        _write_metrics(out, history, config)
    # DRL's dynamic score of the selected model, after the last epoch and under a forked RNG, so no training draw
    # moves (a few forward passes and two small spatial students: seconds on cached features)
    if not config.dynamic_score:
        return _write_metrics(out, history, config)
    model.load_state_dict(safe_load(out / "best.pt")["model"])   # onto the CPU; the model stays on its device
    return _write_metrics(out, history, config, run_dynamic_score(model, inputs, config, device))


def _training_batches(features: FeatureSet, config: TrainConfig, epoch: int, hp: dict,
                      device: torch.device) -> Iterator[LabelledBatch]:
    """The training set once, at segment centres, in a seeded random order: what ``before_epoch`` sees (ADA's
    max phase), so a method that stops early (``ada_max_videos``) takes a uniform random subset, not a class."""
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(
        config.seed * 100_003 + epoch + BEFORE_EPOCH_SEED)).numpy()
    plans = features.eval_plans(config.num_segments, hp["batch_size"], order)
    for plan, x in iterate(features, plans, config.workers, device):
        yield LabelledBatch(x, features.labels[plan.videos].to(device))


def _train_epoch(model: Method, inputs: RunInputs, config: TrainConfig, epoch: int, device: torch.device,
                 show_progress: bool) -> dict[str, float]:
    """One pass over the training set (and the examples the method added), one ``update`` per batch."""
    hp = model.hparams
    extra = model.extra_examples()     # kept where the method holds them (CPU): only a batch's rows move
    n_extra = len(extra[1]) if extra is not None else 0
    source = inputs.source_train
    batches = math.ceil((len(source) + n_extra) / hp["batch_size"])
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)  # same plans on resume
    source_plans = source.epoch_plans(config.num_segments, hp["batch_size"], batches, config.train_sampling,
                                      generator, n_extra)
    target_batch = (target_batch_size(hp["batch_size"], len(source), len(inputs.target_train))
                    if inputs.target_train else 0)
    target_plans = (inputs.target_train.epoch_plans(config.num_segments, target_batch, batches,
                                                    config.train_sampling, generator)
                    if inputs.target_train else [None] * batches)
    target_stream = (iterate(inputs.target_train, target_plans, config.workers, device)
                     if inputs.target_train else iter(target_plans))
    sums: dict[str, float] = {}
    bar = tqdm(iterate(source, source_plans, config.workers, device), total=batches,
               desc=f"epoch {epoch + 1}/{hp['epochs']}", unit="batch", leave=False,
               disable=None if show_progress else True)
    for step, (plan, x_source) in enumerate(bar):
        target_item = next(target_stream)
        target = (UnlabelledBatch(target_item[1], torch.from_numpy(target_item[0].videos).to(device))
                  if target_item is not None else None)
        parts = [(x_source, source.labels[plan.videos].to(device))] if len(plan.videos) else []
        if len(plan.extra):
            index = torch.from_numpy(plan.extra)
            parts.append((map_inputs(lambda x: x[index.to(x.device)].to(device), extra[0]),
                          extra[1][index.to(extra[1].device)].to(device)))
        positions = torch.from_numpy(np.concatenate([plan.videos, len(source) + plan.extra])).to(device)
        batch = LabelledBatch(cat_inputs([x for x, _ in parts]), torch.cat([y for _, y in parts]), index=positions)
        progress = (epoch * batches + step) / (hp["epochs"] * batches)
        logs = model.update(batch, target, progress)
        for key, value in logs.items():
            sums[key] = sums.get(key, 0.0) + value
        bar.set_postfix(loss=f"{logs['loss']:.3f}")
    return {key: value / batches for key, value in sums.items()}


def _cuda_rng_states(device: torch.device) -> list[torch.Tensor]:
    """Every CUDA device's RNG state when training on CUDA (dropout on the GPU draws from it), else none.

    With the CPU generator these are all the RNGs training uses: nothing draws from numpy's or Python's.
    """
    return torch.cuda.get_rng_state_all() if device.type == "cuda" else []


def _evaluate_epoch(model: Method, inputs: RunInputs, config: TrainConfig, device: torch.device) -> dict:
    """Accuracy on the training domain's val split (``src_val``; the target's in target-only) and the target's.

    Under a forked RNG: an evaluation that draws (STDN's random tuples) must not move the training draws, or a
    DG run's later epochs would depend on the size of the target set.
    """
    results = {}
    train_domain = "target" if config.setting == "target-only" else "source"
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for prefix, feature_set, domain in (("src_val", inputs.source_val, train_domain),
                                            ("tgt", inputs.target_eval, "target")):
            if feature_set is None:
                continue
            model.set_eval_domain(domain)  # e.g. AdaBN's per-domain BN statistics
            logits = predict(model, feature_set, config.num_segments, config.workers, device)
            report = accuracy_report(logits, feature_set.labels, len(inputs.classes))
            results[f"{prefix}_acc"], results[f"{prefix}_mca"] = report["accuracy"], report["mean_class_accuracy"]
    return results


def selection_key(record: dict) -> float:
    """What selects an epoch: source val when there is one; without it (no val split) the last epoch is the only
    honest choice (``pipelines/report.py`` selects the same way)."""
    return record.get("src_val_acc", record["epoch"])


def _is_best(history: list[dict]) -> bool:
    """Whether the newest epoch is the selected one so far (ties keep the earlier epoch)."""
    return selection_key(history[-1]) > max((selection_key(r) for r in history[:-1]), default=-math.inf)


def _write_metrics(out: Path, history: list[dict], config: TrainConfig, dynamic_score: dict | None = None) -> dict:
    final = {"epochs_run": len(history)}
    if history:
        best = max(history, key=selection_key)  # max returns the first of ties, as _is_best
        val_of = "target" if config.setting == "target-only" else "source"
        final.update(selected_epoch=best["epoch"], selection=f"{val_of} val accuracy" if "src_val_acc" in best
                     else f"last epoch (no {val_of} val split apart from the reported one)",
                     src_val_acc_selected=best.get("src_val_acc"))
        if "tgt_acc" in best:
            oracle = max(history, key=lambda r: r["tgt_acc"])
            final.update(target_acc_selected=best["tgt_acc"], target_mca_selected=best["tgt_mca"],
                         target_acc_last=history[-1]["tgt_acc"],
                         oracle_target_acc=oracle["tgt_acc"], oracle_epoch=oracle["epoch"],
                         oracle_note="best target-test epoch: uses target labels for selection "
                                     "(what TA3N/APN's official code report); not a valid DG/DA result")
    report = {"head": config.head, "method": config.method, "streams": list(config.streams),
              "fusion": config.fusion, "setting": config.setting, "source": config.source, "target": config.target,
              "epochs": history, "final": final}
    if dynamic_score is not None:
        report["dynamic_score"] = dynamic_score
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out / "metrics.json")  # readers (dashboards, tests) never see half a file
    return report


def _result_identity(record: dict) -> dict:
    """What of a run record decides its numbers (so moving the store or streaming instead does not count)."""
    record = json.loads(json.dumps(record))  # tuples -> lists, as yaml reads them back
    return {"config": {name: record["config"][name] for name in RESULT_FIELDS},
            "hparams": record["hparams"], "classes": record["classes"],
            "features_sha256": record["store"]["features_sha256"], "manifest_sha256": record["manifest_sha256"]}


def _check_same_run(path: Path, run_record: dict) -> None:
    saved, now = _result_identity(yaml.safe_load(path.read_text())), _result_identity(run_record)
    for key in saved:
        if saved[key] != now[key]:
            raise RunMismatch(f"--resume: {key} differs from the run in {path.parent} (saved {saved[key]!r}, "
                              f"now {now[key]!r}); resume with the same arguments or start a new --out", key)


def _log_to(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for previous in log.handlers:  # the previous run's log file, when one process trains several runs
        previous.close()
    log.handlers = [handler]
    log.setLevel(logging.INFO)
