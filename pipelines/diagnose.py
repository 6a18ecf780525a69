"""Domain discrepancy of a trained run (TA3N §5.3, Table 9): how far apart its source and target video features are.

``vidshift diagnose RUN_DIR --store S --manifest M [--source D --target D] [--split test]`` loads the run as
``vidshift eval`` does, computes each video's representation ``model.features(x)`` (the architecture's z) at its
segment centres, for the
``split`` videos of both domains, and writes ``diagnose.json`` into the run dir with:

1. ``mmd``: the biased MMD² between source and target features, one Gaussian kernel
   k(a, b) = exp(-‖a - b‖² / (2σ²)) with σ² the median squared distance between distinct videos of the pooled
   sample (median heuristic; the lower middle value when their number is even). Lower: closer domains.
2. ``domain_discriminator``: a small MLP (D -> 64 -> 2) trained post hoc on the frozen features: a seeded half
   of each domain's videos trains it (features standardised with that half's mean and std; 100 full-batch Adam
   steps, lr 1e-3, L2 weight decay 0.1, both short and strong so that it barely overfits; cross-entropy with
   each domain weighted equally), the other half scores it: held-out loss (nats; ln 2 at chance, a little
   above it when there is nothing to find) and balanced accuracy (0.5 at chance). Higher loss and accuracy
   nearer 0.5: closer domains. TA3N's Table 9 reports the domain loss of its own discriminators; a post-hoc
   discriminator compares heads with and without discriminators on equal terms.
3. ``dynamic_score`` (DRL §3, ``pipelines/dynamic_score.py``): per domain, input modulation (eq. 4: frozen at the
   first step, shuffled), the distillation score γ (eq. 2) and the dataset's static bias (eq. 5), with spatial
   students fitted on each domain's train split; ``spatial_transfer``, the source-label student on the target.
4. ``head_measures``: per domain, the method's and the architecture's own measures (``diagnostics(x)``) averaged
   over videos (over the batches where each is defined, i.e. not NaN).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from extract.manifest import ManifestError, read_manifest
from extract.store import StoreError
from heads.da_baselines import mmd2, squared_distances
from heads.base import batch_size
from heads.method import Method
from pipelines.data import FeatureSet, iterate
from pipelines.dynamic_score import diagnose_dynamic_score
from pipelines.evaluate import EVAL_BATCH, load_run
from pipelines.runs import RunError, select

DISCRIMINATOR_HIDDEN = 64
DISCRIMINATOR_STEPS = 100
DISCRIMINATOR_WEIGHT_DECAY = 0.1


def median_heuristic_mmd2(source: Tensor, target: Tensor) -> dict[str, float]:
    """Biased MMD² of two samples [n, D] and [m, D] with a Gaussian kernel of median-heuristic bandwidth."""
    pooled = torch.cat([source, target]).double()
    distances = squared_distances(pooled)
    off_diagonal = distances[~torch.eye(len(pooled), dtype=torch.bool)]
    sigma2 = off_diagonal.median().clamp(min=torch.finfo(torch.float64).tiny)   # identical features: MMD 0
    kernel = torch.exp(-distances / (2.0 * sigma2))
    return {"mmd2": mmd2(kernel, len(source)).item(), "sigma2": sigma2.item()}


def post_hoc_discriminator(source: Tensor, target: Tensor, seed: int = 0) -> dict[str, float]:
    """Train a domain discriminator on half of each domain's features, score it on the other half (module doc)."""
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y, test_x, test_y = [], [], [], []
    for domain, (role, features) in enumerate((("source", source), ("target", target))):
        if len(features) < 2:
            raise RunError(f"the post-hoc domain discriminator needs at least 2 videos per domain, "
                           f"got {len(features)} for the {role}")
        order = torch.randperm(len(features), generator=generator)
        cut = (len(features) + 1) // 2
        train_x.append(features[order[:cut]])
        test_x.append(features[order[cut:]])
        train_y.append(torch.full((cut,), domain))
        test_y.append(torch.full((len(features) - cut,), domain))
    x_train, y_train, x_test, y_test = map(torch.cat, (train_x, train_y, test_x, test_y))
    mean, std = x_train.mean(dim=0), x_train.std(dim=0).clamp(min=1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    balance = 1.0 / torch.bincount(y_train, minlength=2).float()                # each domain counts equally
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(x_train.shape[1], DISCRIMINATOR_HIDDEN), nn.ReLU(),
                              nn.Linear(DISCRIMINATOR_HIDDEN, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=DISCRIMINATOR_WEIGHT_DECAY)
    for _ in range(DISCRIMINATOR_STEPS):
        optimizer.zero_grad()
        F.cross_entropy(model(x_train), y_train, weight=balance).backward()
        optimizer.step()
    with torch.no_grad():
        logits = model(x_test)
    test_balance = 1.0 / torch.bincount(y_test, minlength=2).float()
    correct = (logits.argmax(dim=1) == y_test).float()
    accuracy = sum(correct[y_test == d].mean() for d in (0, 1)) / 2
    return {"loss": F.cross_entropy(logits, y_test, weight=test_balance).item(), "accuracy": accuracy.item(),
            "chance_loss": math.log(2.0), "train_videos": len(y_train), "held_out_videos": len(y_test)}


def mean_over_videos(batches: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Each measure's mean over videos, from ``(videos, measures)`` per batch, weighting each batch by its videos.

    A batch where a measure is NaN (undefined there, e.g. a Davies-Bouldin index without two clusters) is left
    out of that measure's mean; a measure that is NaN in every batch stays NaN.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for videos, measures in batches:
        for name, value in measures.items():
            defined = not math.isnan(value)
            sums[name] = sums.get(name, 0.0) + (value * videos if defined else 0.0)
            counts[name] = counts.get(name, 0) + (videos if defined else 0)
    return {name: sums[name] / counts[name] if counts[name] else math.nan for name in sums}


@torch.no_grad()
def video_features(model: Method, features: FeatureSet, num_segments: int, workers: int,
                   device: torch.device) -> tuple[Tensor, dict[str, float]]:
    """Video features [V, D] at segment centres, and the model's ``diagnostics`` averaged over the V videos."""
    model.eval()
    rows, measures = [], []
    for _, x in iterate(features, features.eval_plans(num_segments, EVAL_BATCH), workers, device):
        rows.append(model.features(x).float().cpu())
        measures.append((batch_size(x), model.diagnostics(x)))
    return torch.cat(rows), mean_over_videos(measures)


def diagnose_run(run_dir: Path, store_path: Path, manifest: Path, source: str | None = None,
                 target: str | None = None, split: str = "test", checkpoint: str = "best", device: str = "auto",
                 workers: int = 2, seed: int = 0) -> dict:
    """MMD, post-hoc domain discriminator and head measures of a run's video features; writes diagnose.json.

    ``source`` and ``target`` default to the run's own domains.
    """
    run = load_run(run_dir, store_path, checkpoint, device)
    config = run.config
    domains = {"source": source or config["source"], "target": target or config["target"]}
    if domains["target"] is None:
        raise RunError(f"{run_dir} was trained without a target domain; pass --target DOMAIN")
    entries = read_manifest(manifest)
    features, measures = {}, {}
    for role, domain in domains.items():
        feature_set = run.open_features(select(entries, domain, split), labelled=False)
        if feature_set is None:
            raise RunError(f"{manifest} has no videos of domain {domain!r} in split {split!r}")
        run.model.set_eval_domain(role)   # AdaBN: normalise each domain with its own statistics
        features[role], measures[role] = video_features(run.model, feature_set, config["num_segments"], workers,
                                                        run.device)
    report = {"run": str(run_dir), "head": config["head"], "method": config["method"], "checkpoint": checkpoint, "split": split, **domains,
              "videos": {role: len(f) for role, f in features.items()}, "feature_dim": features["source"].shape[1],
              "mmd": {**median_heuristic_mmd2(features["source"], features["target"]),
                      "kernel": "exp(-d^2 / (2 sigma2)), sigma2 = median squared distance (median heuristic)"},
              "domain_discriminator": post_hoc_discriminator(features["source"], features["target"], seed),
              "dynamic_score": diagnose_dynamic_score(run, entries, domains, split, workers, seed)}
    if any(measures.values()):
        report["head_measures"] = measures
    (Path(run_dir) / "diagnose.json").write_text(json.dumps(report, indent=1))
    return report


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--store", "store_path", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--manifest", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--source", default=None, help="Source domain [default: the run's].")
@click.option("--target", default=None, help="Target domain [default: the run's].")
@click.option("--split", default="test", show_default=True, help="Split of both domains to measure.")
@click.option("--checkpoint", type=click.Choice(["best", "checkpoint"]), default="best", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="DataLoader processes reading the store (0: none).")
@click.option("--seed", default=0, show_default=True, help="Seed of the post-hoc discriminator's split and init.")
def diagnose(run_dir: Path, store_path: Path, manifest: Path, source: str | None, target: str | None, split: str,
             checkpoint: str, device: str, workers: int, seed: int) -> None:
    """Domain discrepancy of a run's video features: MMD and a post-hoc domain discriminator (diagnose.json)."""
    try:
        report = diagnose_run(run_dir, store_path, manifest, source, target, split, checkpoint, device,
                              workers=workers, seed=seed)
    except (ManifestError, StoreError, ValueError, FileNotFoundError, KeyError) as error:
        raise click.ClickException(str(error)) from error
    discriminator = report["domain_discriminator"]
    click.echo(f"{report['source']} vs {report['target']} ({split}, {report['videos']['source']} + "
               f"{report['videos']['target']} videos): MMD² {report['mmd']['mmd2']:.4f}; post-hoc domain "
               f"discriminator loss {discriminator['loss']:.4f} (chance {discriminator['chance_loss']:.4f}), "
               f"accuracy {discriminator['accuracy']:.3f}")
    for role in ("source", "target"):
        score = report["dynamic_score"][role]
        bias = score.get("static_bias")
        click.echo(f"{report[role]} dynamic score (nats): freeze {score['freeze']:.4f}, shuffle {score['shuffle']:.4f}"
                   + (f", distill {score['distill']:.4f}" if "distill" in score else "")
                   + (f"; spatial model on labels: accuracy {bias['accuracy']:.3f}" if bias else ""))
    click.echo(f"wrote {run_dir}/diagnose.json")
