"""Evaluation: predictions at segment centres, accuracy, mean class accuracy, confusion matrix (``vidshift eval``),
and ensembles of several runs (``vidshift eval --ensemble``: APN's γ ensemble)."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from extract.backbones import safe_load
from extract.manifest import read_manifest
from extract.store import FeatureStore
import heads
from heads.method import Method, lookup
from pipelines.data import FeatureSet, iterate
from pipelines.runs import (RunError, check_store_matches, feature_shape, open_feature_set, resolve_device,
                            select)

EVAL_BATCH = 256


@torch.no_grad()
def predict(model: Method, features: FeatureSet, num_segments: int, workers: int,
            device: torch.device) -> torch.Tensor:
    """Logits [V, classes] of every video of ``features``, in order, from its segment centres."""
    model.eval()
    plans = features.eval_plans(num_segments, EVAL_BATCH)
    return torch.cat([model.predict(x).float().cpu() for _, x in iterate(features, plans, workers, device)])


def accuracy_report(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Top-1 accuracy, mean class accuracy (over classes present) and confusion matrix [true, predicted]."""
    predicted = logits.argmax(dim=1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    per_class = confusion.diag() / confusion.sum(dim=1).clamp(min=1)
    present = confusion.sum(dim=1) > 0
    return {"accuracy": (predicted == labels).float().mean().item(),
            "mean_class_accuracy": per_class[present].mean().item(),
            "per_class_accuracy": per_class.tolist(), "confusion": confusion.tolist()}


@dataclass
class LoadedRun:
    """A trained run ready to evaluate: its ``config.yaml`` record, the store it reads and the restored model."""

    record: dict
    store: FeatureStore
    model: Method
    device: torch.device

    @property
    def config(self) -> dict:
        return self.record["config"]

    def open_features(self, entries: list, labelled: bool = True) -> FeatureSet | None:
        """The run's streams of ``entries`` in its store, combined as the run was trained."""
        config = self.config
        return open_feature_set(self.store, entries, self.model.arch.input, self.record["classes"],
                                tuple(config["streams"]), False, labelled, config["fusion"])


def load_run(run_dir: Path, store_path: Path, checkpoint: str = "best", device: str = "auto") -> LoadedRun:
    """Rebuild a run's head from ``config.yaml`` and load ``<checkpoint>.pt``; the store must match the run's."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise RunError(f"{run_dir}: not a run dir (no config.yaml); pass the --out of a `vidshift train` run")
    record = yaml.safe_load(config_path.read_text())
    config = record["config"]
    if "method" not in config:
        raise RunError(f"{run_dir} was trained by a vidshift from before the architecture/method split (head "
                       f"{config.get('head')!r}); evaluate it with that version, or retrain it")
    streams = tuple(config["streams"])
    store = FeatureStore.open(store_path)
    check_store_matches(record["store"], store, streams)
    try:
        arch_cls, _ = lookup(config["head"], config["method"])
    except heads.HeadError as error:
        raise RunError(f"{run_dir} was trained with {config['method']!r} on {config['head']!r}: {error}; evaluate "
                       f"it with the vidshift version that trained it") from None
    torch_device = resolve_device(device)
    model = heads.build(config["head"], config["method"], feature_shape(store, arch_cls.input, streams,
                                                                        config["fusion"]),
                        len(record["classes"]), config["num_segments"], record["hparams"]).to(torch_device)
    weights = run_dir / f"{checkpoint}.pt"
    if not weights.is_file():
        raise RunError(f"{weights} not found; use --checkpoint best or checkpoint (the last finished epoch)")
    # read onto the CPU: load_state_dict copies into the model's device, and a method's added examples stay there
    model.load_state_dict(safe_load(weights)["model"])
    return LoadedRun(record, store, model, torch_device)


def run_logits(run: LoadedRun, manifest: Path, domain: str, split: str, workers: int) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """A loaded run's logits [V, classes] on ``domain``/``split`` of ``manifest``, and the labels [V]."""
    entries = select(read_manifest(manifest), domain, split)
    features = run.open_features(entries)
    if features is None:
        raise RunError(f"{manifest} has no videos of domain {domain!r} in split {split!r}")
    config = run.config
    trained_on = config["target"] if config["setting"] == "target-only" else config["source"]
    run.model.set_eval_domain("source" if domain == trained_on else "target")  # AdaBN: whose BN statistics
    return predict(run.model, features, config["num_segments"], workers, run.device), features.labels


def evaluate_run(run_dir: Path, store_path: Path, manifest: Path, domain: str, split: str,
                 checkpoint: str = "best", device: str = "auto", workers: int = 2) -> dict:
    """Evaluate a trained run on ``domain``/``split`` of any compatible store; writes eval-<domain>-<split>.*"""
    run_dir = Path(run_dir)
    run = load_run(run_dir, store_path, checkpoint, device)
    classes = run.record["classes"]
    logits, labels = run_logits(run, manifest, domain, split, workers)
    report = accuracy_report(logits, labels, len(classes))
    report.update(domain=domain, split=split, videos=len(labels), checkpoint=checkpoint, classes=classes)
    stem = run_dir / f"eval-{domain}-{split}"
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1))
    _write_confusion(report["confusion"], classes, stem)
    return report


ENSEMBLE_RULES = ("mean", "confident")


def ensemble_probabilities(logits: list[torch.Tensor], rule: str = "mean") -> torch.Tensor:
    """Class probabilities [V, classes] of an ensemble from its members' logits (each [V, classes]).

    ``mean``: the mean of the members' softmax probabilities (APN §5.1's γ ensemble; the default).
    ``confident``: per video, the softmax of the member whose top probability is highest.
    """
    if rule not in ENSEMBLE_RULES:
        raise ValueError(f"ensemble rule {rule!r}: use one of {', '.join(ENSEMBLE_RULES)}")
    probabilities = torch.stack([member.softmax(dim=1) for member in logits])          # [R, V, classes]
    if rule == "mean":
        return probabilities.mean(dim=0)
    most_confident = probabilities.max(dim=2).values.argmax(dim=0)                      # [V]
    return probabilities[most_confident, torch.arange(probabilities.shape[1])]


def evaluate_ensemble(run_dirs: list[Path], store_path: Path, manifest: Path, domain: str, split: str, out: Path,
                      checkpoint: str = "best", device: str = "auto", workers: int = 2,
                      rule: str = "mean") -> dict:
    """Evaluate the ensemble of several runs (APN §5.1: one per γ); writes ensemble-<domain>-<split>.* in ``out``.

    The runs must share the class list (the same source labels); each predicts as it was trained (its own
    architecture, streams and segments). The report lists every member's own accuracy beside the ensemble's.
    """
    if len(run_dirs) < 2:
        raise RunError(f"an ensemble needs at least two runs, got {len(run_dirs)}")
    members, logits, labels, classes = [], [], None, None
    for run_dir in map(Path, run_dirs):
        run = load_run(run_dir, store_path, checkpoint, device)
        if classes is None:
            classes = run.record["classes"]
        elif run.record["classes"] != classes:
            raise RunError(f"{run_dir} was trained on classes {run.record['classes']}, the first run on {classes}; "
                           f"an ensemble needs runs with the same classes")
        member_logits, labels = run_logits(run, manifest, domain, split, workers)
        logits.append(member_logits)
        members.append({"run": str(run_dir), "method": run.config["method"], "head": run.config["head"],
                        "accuracy": accuracy_report(member_logits, labels, len(classes))["accuracy"]})
    report = accuracy_report(ensemble_probabilities(logits, rule), labels, len(classes))
    report.update(domain=domain, split=split, videos=len(labels), checkpoint=checkpoint, classes=classes,
                  rule=rule, members=members)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"ensemble-{domain}-{split}"
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1))
    _write_confusion(report["confusion"], classes, stem)
    return report


def _write_confusion(confusion: list[list[int]], classes: list[str], stem: Path) -> None:
    with open(f"{stem}-confusion.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *classes])
        writer.writerows([name, *row] for name, row in zip(classes, confusion))
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on clusters
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(1 + 0.6 * len(classes), 1 + 0.5 * len(classes)))
    axes.imshow(confusion, cmap="Blues")
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            axes.text(j, i, str(count), ha="center", va="center", fontsize=8)
    figure.tight_layout()
    figure.savefig(f"{stem}-confusion.png", dpi=120)
    plt.close(figure)
