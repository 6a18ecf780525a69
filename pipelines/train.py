"""Stage two: train a head from cached features under the DG or DA protocol (``vidshift train``, DESIGN §6).

- ``dg``: the head sees the source domain's train split only; the checkpoint is selected on source val; the
  target is only evaluated.
- ``da``: labelled source train plus the *unlabelled* target train split (``UnlabelledBatch`` has no labels),
  target batches sized by the ratio of the two training sets.
Every epoch evaluates source val and the target evaluation split. ``metrics.json`` reports the target accuracy
at the best source-val epoch (the selection a real DG/DA user can make), at the last epoch, and the oracle
(best target epoch; labelled as such: it is what TA3N's and APN's official code report).

A run dir holds ``config.yaml`` (everything needed to repeat it), ``metrics.json``, ``checkpoint.pt`` (last
epoch: head, optimisers, CPU and CUDA RNG states; for ``--resume``), ``best.pt`` (head at the selected epoch) and
``train.log``. All checkpoints are plain state dicts, loadable with ``torch.load(weights_only=True)``. A resume
must repeat what decides the numbers (``RESULT_FIELDS``, hparams, classes, features, manifest); it may move the
store or change how features are held.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from extract.manifest import file_sha256
from extract.provenance import software_versions
from heads import base as heads
from heads.base import LabelledBatch, UnlabelledBatch
from pipelines.data import TRAIN_SAMPLINGS, iterate, place_features, target_batch_size
from pipelines.evaluate import accuracy_report, predict
from pipelines.runs import RunError, RunInputs, load_run_inputs, resolve_device, save_atomic, store_identity

log = logging.getLogger("vidshift.train")
SETTINGS = ("dg", "da")
# The TrainConfig fields that change a run's numbers; --resume must repeat them (with the resolved hparams, classes,
# features and manifest hashes). Paths, --features, --workers, --device and the memory budget may change.
RESULT_FIELDS = ("head", "source", "target", "setting", "seed", "num_segments", "train_sampling", "eval_split",
                 "skip_missing", "stream")
FALLBACK_BUDGET_GB = 2.0  # in-memory budget where the OS does not report free memory


@dataclass
class TrainConfig:
    store: Path
    manifest: Path
    head: str
    source: str
    out: Path
    target: str | None = None
    setting: str = "dg"
    hparams: dict = field(default_factory=dict)   # overrides of the head's defaults (--config / --set)
    preset: str | None = None                     # a head's named override set, applied before ``hparams``
    seed: int = 0
    num_segments: int = 5
    train_sampling: str = "random"                # TSN: random step per segment; "centre" as TA3N's code
    features: str = "auto"                        # auto | memory | stream
    memory_budget_gb: float | None = None         # for "auto"; default: half the free (GPU) memory
    device: str = "auto"
    workers: int = 2                              # DataLoader processes when streaming
    eval_split: str | None = None                 # target split to report; default test, else val
    skip_missing: bool = False
    stream: str = "rgb"

    def as_dict(self) -> dict:
        return {key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(self).items()}


class RunMismatch(RunError):
    """``--resume`` of a run dir whose run was made with other settings (``key`` names the first difference)."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def memory_budget(device: torch.device, gigabytes: float | None) -> int:
    """Bytes ``--features auto`` may hold in memory: the given budget, else half the free (GPU) memory."""
    if gigabytes is not None:
        return int(gigabytes * 2**30)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (AttributeError, ValueError, OSError):  # no os.sysconf (Windows) or no SC_AVPHYS_PAGES (macOS)
        log.info("free memory unknown on this OS: in-memory budget %.0f GiB (--memory-budget-gb sets it)",
                 FALLBACK_BUDGET_GB)
        return int(FALLBACK_BUDGET_GB * 2**30)


def check_config(config: TrainConfig) -> type[heads.Head]:
    registry = heads.available()
    if config.head not in registry:
        raise RunError(f"unknown head {config.head!r}; available: {', '.join(registry)} (`vidshift train --head help`)")
    head_cls = registry[config.head]
    if config.setting not in SETTINGS:
        raise RunError(f"--setting {config.setting!r}: use one of {', '.join(SETTINGS)}")
    if config.setting not in head_cls.settings:
        raise RunError(f"head {config.head!r} supports {', '.join(sorted(head_cls.settings))}, not {config.setting!r}")
    if config.setting == "da" and not config.target:
        raise RunError("--setting da needs --target DOMAIN (its train split is the unlabelled adaptation data)")
    if config.train_sampling not in TRAIN_SAMPLINGS:
        raise RunError(f"--train-sampling {config.train_sampling!r}: use one of {', '.join(TRAIN_SAMPLINGS)}")
    heads.resolve_hparams(head_cls, head_overrides(config, head_cls))  # unknown/ill-typed names fail early
    return head_cls


def head_overrides(config: TrainConfig, head_cls: type[heads.Head]) -> dict:
    """Preset first, then the config file and --set values (already merged into ``config.hparams``)."""
    return {**(heads.preset(head_cls, config.preset) if config.preset else {}), **config.hparams}


def train(config: TrainConfig, resume: bool = False, show_progress: bool = True) -> dict:
    """Run (or resume) one training run; return the final report written to ``metrics.json``."""
    head_cls = check_config(config)
    out = Path(config.out)
    checkpoint_path = out / "checkpoint.pt"
    if checkpoint_path.exists() and not resume:
        raise RunError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    _log_to(out / "train.log")
    device = resolve_device(config.device)
    inputs = load_run_inputs(config, head_cls.input)
    overrides = head_overrides(config, head_cls)
    run_record = {"config": config.as_dict(), "head_hparams": heads.resolve_hparams(head_cls, overrides),
                  "classes": inputs.classes, "store": store_identity(inputs.store, config.stream),
                  "manifest_sha256": file_sha256(config.manifest), "software": software_versions()}
    if resume and checkpoint_path.exists():
        _check_same_run(out / "config.yaml", run_record)
    # Rewritten on resume too: the paths and settings that may change are then those of the latest invocation.
    (out / "config.yaml").write_text(yaml.safe_dump(run_record, sort_keys=False))

    torch.manual_seed(config.seed)  # head initialisation
    head = heads.build(config.head, inputs.feat_shape, len(inputs.classes), config.num_segments, overrides)
    head.to(device)
    hp = head.hparams
    where = place_features(inputs.feature_sets(), config.features, device,
                           memory_budget(device, config.memory_budget_gb))
    log.info("head %s (%d parameters), %s, features %s", config.head,
             sum(p.numel() for p in head.parameters()), config.setting, where)
    log.info("GRL/lr schedules and all hparams: %s", json.dumps(hp))

    batches_per_epoch = math.ceil(len(inputs.source_train) / hp["batch_size"])
    target_batch = (target_batch_size(hp["batch_size"], len(inputs.source_train), len(inputs.target_train))
                    if inputs.target_train else 0)
    history, start_epoch = [], 0
    if resume and checkpoint_path.exists():
        # RNG states must stay CPU tensors; load_state_dict moves weights and optimiser state to the head's device
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        head.load_state_dict(state["head"])
        for optimizer, saved in zip(head.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda":  # a run saved on another machine may have had more devices
            for index, cuda_state in enumerate(state.get("cuda_rng", [])[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, index)
        history, start_epoch = state["history"], state["epoch"] + 1
        log.info("resumed after epoch %d", state["epoch"])

    for epoch in range(start_epoch, hp["epochs"]):
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)  # same plans on resume
        source_plans = inputs.source_train.epoch_plans(config.num_segments, hp["batch_size"], batches_per_epoch,
                                                       config.train_sampling, generator)
        target_plans = (inputs.target_train.epoch_plans(config.num_segments, target_batch, batches_per_epoch,
                                                        config.train_sampling, generator)
                        if inputs.target_train else [None] * batches_per_epoch)
        target_stream = (iterate(inputs.target_train, target_plans, config.workers, device)
                         if inputs.target_train else iter(target_plans))
        sums: dict[str, float] = {}
        head.train()
        bar = tqdm(iterate(inputs.source_train, source_plans, config.workers, device), total=batches_per_epoch,
                   desc=f"epoch {epoch + 1}/{hp['epochs']}", unit="batch", leave=False,
                   disable=None if show_progress else True)
        for step, (plan, x_source) in enumerate(bar):
            target_item = next(target_stream)
            target = UnlabelledBatch(target_item[1]) if target_item is not None else None
            labels = inputs.source_train.labels[plan.videos].to(device)
            progress = (epoch * batches_per_epoch + step) / (hp["epochs"] * batches_per_epoch)
            logs = head.update(LabelledBatch(x_source, labels), target, progress)
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + value
            bar.set_postfix(loss=f"{logs['loss']:.3f}")
        record = {"epoch": epoch + 1, **{key: value / batches_per_epoch for key, value in sums.items()}}
        record.update(_evaluate_epoch(head, inputs, config, device))
        history.append(record)  # no timings in it: metrics.json must be identical between identical runs
        log.info("epoch %d (%.1fs): %s", epoch + 1, time.perf_counter() - started,
                 ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"))
        if _is_best(history):
            save_atomic({"head": head.state_dict(), "epoch": epoch}, out / "best.pt")
        save_atomic({"head": head.state_dict(), "optimizers": [o.state_dict() for o in head.optimizers],
                     "torch_rng": torch.get_rng_state(), "cuda_rng": _cuda_rng_states(device), "history": history,
                     "epoch": epoch}, checkpoint_path)
        _write_metrics(out, history, config)
    return _write_metrics(out, history, config)


def _cuda_rng_states(device: torch.device) -> list[torch.Tensor]:
    """Every CUDA device's RNG state when training on CUDA (dropout on the GPU draws from it), else none.

    With the CPU generator these are all the RNGs training uses: nothing draws from numpy's or Python's.
    """
    return torch.cuda.get_rng_state_all() if device.type == "cuda" else []


def _evaluate_epoch(head, inputs: RunInputs, config: TrainConfig, device: torch.device) -> dict:
    results = {}
    for prefix, feature_set in (("src_val", inputs.source_val), ("tgt", inputs.target_eval)):
        if feature_set is None:
            continue
        head.set_eval_domain("source" if prefix == "src_val" else "target")  # e.g. AdaBN's per-domain BN stats
        logits = predict(head, feature_set, config.num_segments, config.workers, device)
        report = accuracy_report(logits, feature_set.labels, len(inputs.classes))
        results[f"{prefix}_acc"], results[f"{prefix}_mca"] = report["accuracy"], report["mean_class_accuracy"]
    return results


def _selection_key(record: dict) -> float:
    # Source val when there is one; without it (no val split) the last epoch is the only honest choice.
    return record.get("src_val_acc", record["epoch"])


def _is_best(history: list[dict]) -> bool:
    """Whether the newest epoch is the selected one so far (ties keep the earlier epoch)."""
    return _selection_key(history[-1]) > max((_selection_key(r) for r in history[:-1]), default=-math.inf)


def _write_metrics(out: Path, history: list[dict], config: TrainConfig) -> dict:
    final = {"epochs_run": len(history)}
    if history:
        best = max(history, key=_selection_key)  # max returns the first of ties, as _is_best
        final.update(selected_epoch=best["epoch"], selection="source val accuracy" if "src_val_acc" in best
                     else "last epoch (no source val split)", src_val_acc_selected=best.get("src_val_acc"))
        if "tgt_acc" in best:
            oracle = max(history, key=lambda r: r["tgt_acc"])
            final.update(target_acc_selected=best["tgt_acc"], target_mca_selected=best["tgt_mca"],
                         target_acc_last=history[-1]["tgt_acc"],
                         oracle_target_acc=oracle["tgt_acc"], oracle_epoch=oracle["epoch"],
                         oracle_note="best target-test epoch: uses target labels for selection "
                                     "(what TA3N/APN's official code report); not a valid DG/DA result")
    report = {"head": config.head, "setting": config.setting, "source": config.source, "target": config.target,
              "epochs": history, "final": final}
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out / "metrics.json")  # readers (dashboards, tests) never see half a file
    return report


def _result_identity(record: dict) -> dict:
    """What of a run record decides its numbers (so moving the store or streaming instead does not count)."""
    record = json.loads(json.dumps(record))  # tuples -> lists, as yaml reads them back
    return {"config": {name: record["config"][name] for name in RESULT_FIELDS},
            "head_hparams": record["head_hparams"], "classes": record["classes"],
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
