"""The report's figures, PNG files written with matplotlib (Agg: no display needed on a cluster).

- ``curves-<row>-<direction>.png``: per run group (a table cell's runs: seeds and swept configurations), the
  training loss, the training domain's val accuracy and the target accuracy per epoch, from ``metrics.json``.
- ``hparam-<row>-<direction>-<name>.png``: target accuracy (selected on source val within each run) and source val
  accuracy against each swept hyper-parameter, every run a dot, the mean per value a line.
- ``tsne-<run>.png`` (``vidshift report --run NAME``): a t-SNE (scikit-learn) of the source and target video
  features z of the run's eval splits, before adaptation (the source-only run of the same architecture, direction
  and seed; without one in the sweep, the cached backbone features averaged over the segments) and after (the
  run): the papers' figure (TA3N Fig. 4, STDN Fig. 4).
- ``confusion-<run>.png``: the run's confusion matrix on the target's eval split (``vidshift eval``'s, copied).
"""
from __future__ import annotations

import re
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from extract.manifest import read_manifest
from pipelines.report import SOURCE_ONLY, choose, row_key
from pipelines.runs import select
from pipelines.sweep import read_json

DPI = 100
CURVES_SIZE = (12.0, 3.5)     # inches: 1200 x 350 px
HPARAM_SIZE = (5.0, 3.5)
TSNE_SIZE = (10.0, 4.5)
MAX_TSNE_POINTS = 1000        # per domain: t-SNE is quadratic; a uniform random subset beyond it


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def slug(*parts) -> str:
    text = "-".join(str(p) for p in parts).replace("->", "_to_")
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_")


def _groups(records: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        if record["status"] == "finished":
            groups.setdefault((*row_key(record), record["direction"]["name"]), []).append(record)
    return groups


def _run_label(record: dict) -> str:
    swept = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in record["swept"].items())
    return f"seed {record['seed']}" + (f", {swept}" if swept else "")


def training_curves(records: list[dict], out: Path) -> list[Path]:
    plt = _pyplot()
    written = []
    for (label, head, setting, direction), group in _groups(records).items():
        figure, axes = plt.subplots(1, 3, figsize=CURVES_SIZE)
        for record in group:
            epochs = [e["epoch"] for e in record["epochs"]]
            for axis, key in zip(axes, ("loss", "src_val_acc", "tgt_acc")):
                values = [e.get(key) for e in record["epochs"]]
                if any(v is not None for v in values):
                    axis.plot(epochs, [np.nan if v is None else v for v in values], marker=".",
                              label=_run_label(record))
        for axis, title in zip(axes, ("training loss", "training-domain val accuracy", "target accuracy")):
            axis.set_title(title, fontsize=10)
            axis.set_xlabel("epoch")
        axes[0].legend(fontsize=7)
        figure.suptitle(f"{label} on {head} ({setting}), {direction}", fontsize=10)
        written.append(_save(figure, out / f"curves-{slug(label, head, setting, direction)}.png"))
    return written


def hparam_plots(records: list[dict], out: Path) -> list[Path]:
    plt = _pyplot()
    written = []
    for (label, head, setting, direction), group in _groups(records).items():
        names = list(dict.fromkeys(name for record in group for name in record["swept"]))
        for name in names:
            points = [(record["swept"][name], choose([record], "source-val")[1]) for record in group
                      if name in record["swept"]]
            values = sorted({x for x, _ in points})
            if len(values) < 2 or not all(isinstance(x, (int, float)) for x in values):
                continue
            figure, axis = plt.subplots(figsize=HPARAM_SIZE)
            for key, colour, title in (("tgt_acc", "C0", "target (selected on val)"),
                                       ("src_val_acc", "C1", "training-domain val")):
                xs = [x for x, epoch in points if epoch.get(key) is not None]
                ys = [epoch[key] for _, epoch in points if epoch.get(key) is not None]
                axis.scatter(xs, ys, color=colour, s=12, alpha=0.6)
                means = [statistics.fmean(y for x, y in zip(xs, ys) if x == value) for value in values
                         if value in xs]
                axis.plot([v for v in values if v in xs], means, color=colour, label=title)
            if min(values) > 0 and max(values) / min(values) >= 20:
                axis.set_xscale("log")
            axis.set_xlabel(name)
            axis.set_ylabel("accuracy")
            axis.legend(fontsize=7)
            axis.set_title(f"{label} on {head} ({setting}), {direction}", fontsize=9)
            written.append(_save(figure, out / f"hparam-{slug(label, head, setting, direction, name)}.png"))
    return written


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout(rect=(0, 0, 1, 0.94))   # room for the suptitle
    figure.savefig(path, dpi=DPI)
    _pyplot().close(figure)
    return path


# --------------------------------------------------------------------------- figures that read the store (--run)

def find_run(records: list[dict], name: str) -> dict:
    """The finished run named ``name`` or by a unique prefix of its name."""
    matches = [r for r in records if r["name"] == name] or [r for r in records if r["name"].startswith(name)]
    if len(matches) != 1:
        raise ValueError(f"--run {name!r} matches {len(matches)} runs of the sweep; give more of its name "
                         f"(runs/<name>; `vidshift sweep --dry-run` lists them)")
    if matches[0]["status"] != "finished":
        raise ValueError(f"--run {name!r}: the run is {matches[0]['status']}; plot a finished run")
    return matches[0]


def source_only_partner(records: list[dict], run: dict) -> dict | None:
    """The source-only run (erm, dg) of the same architecture, direction and seed: 'before adaptation'."""
    if (run["row"]["method"], run["row"]["setting"]) == SOURCE_ONLY:
        return None
    return next((r for r in records if r["status"] == "finished" and r["row"]["head"] == run["row"]["head"]
                 and (r["row"]["method"], r["row"]["setting"]) == SOURCE_ONLY
                 and r["direction"] == run["direction"] and r["seed"] == run["seed"]), None)


def _eval_split(entries, domain: str) -> str:
    return "test" if select(entries, domain, "test") else "val"


def _per_domain(run_dir: Path, config: dict, device: str,
                features_of: Callable) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each domain's eval split (test, else val): (``features_of(run, feature_set, role)``, its labels)."""
    from pipelines.evaluate import load_run

    run = load_run(run_dir, config["store"], "best", device)
    entries = read_manifest(config["manifest"])
    result = {}
    for role in ("source", "target"):
        domain = config[role]
        feature_set = run.open_features(select(entries, domain, _eval_split(entries, domain)))
        result[role] = (features_of(run, feature_set, role), feature_set.labels)
    return result


def _domain_features(run_dir: Path, config: dict, device: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The run's video features z and labels on each domain's eval split (test, else val)."""
    from pipelines.diagnose import video_features

    def video_z(run, feature_set, role: str) -> torch.Tensor:
        run.model.set_eval_domain(role)
        return video_features(run.model, feature_set, config["num_segments"], 0, run.device)[0]

    return _per_domain(run_dir, config, device, video_z)


def _backbone_features(run_dir: Path, config: dict, device: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The cached input features of each domain's eval split, averaged over segments (and positions)."""
    from pipelines.data import iterate

    def mean_inputs(_run, feature_set, _role: str) -> torch.Tensor:
        plans = feature_set.eval_plans(config["num_segments"], 256)
        rows = []
        for _, x in iterate(feature_set, plans, 0, torch.device("cpu")):
            tensors = x.values() if isinstance(x, dict) else [x]
            rows.append(torch.cat([t.flatten(1, -2).mean(dim=1) for t in tensors], dim=1))
        return torch.cat(rows)

    return _per_domain(run_dir, config, device, mean_inputs)


def _tsne_panel(axis, features: dict, title: str, seed: int) -> None:
    from sklearn.manifold import TSNE

    generator = np.random.default_rng(seed)
    picked = {}
    for role, (z, labels) in features.items():
        keep = np.sort(generator.permutation(len(z))[:MAX_TSNE_POINTS])
        picked[role] = (z[keep].numpy(), labels[keep].numpy())
    points = np.concatenate([z for z, _ in picked.values()])
    embedded = TSNE(n_components=2, perplexity=max(2.0, min(30.0, (len(points) - 1) / 3)), init="pca",
                    random_state=seed).fit_transform(points)
    start = 0
    for role, marker in (("source", "o"), ("target", "x")):
        _, labels = picked[role]
        end = start + len(labels)
        axis.scatter(embedded[start:end, 0], embedded[start:end, 1], c=labels, cmap="tab20", marker=marker, s=14,
                     vmin=0, vmax=19, label=f"{role} (marker), class (colour)" if role == "source" else role)
        start = end
    axis.set_title(title, fontsize=9)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.legend(fontsize=7)


def tsne_plot(records: list[dict], run: dict, out: Path, device: str = "cpu") -> Path:
    plt = _pyplot()
    config = read_json(Path(run["dir"]) / "run.json")["config"]
    partner = source_only_partner(records, run)
    if partner is not None:
        before = _domain_features(Path(partner["dir"]), read_json(Path(partner["dir"]) / "run.json")["config"], device)
        before_title = f"before: source-only ({partner['row']['method']} on {partner['row']['head']}, dg)"
    else:
        before = _backbone_features(Path(run["dir"]), config, device)
        before_title = "before: cached backbone features (mean over segments)"
    after = _domain_features(Path(run["dir"]), config, device)
    figure, axes = plt.subplots(1, 2, figsize=TSNE_SIZE)
    _tsne_panel(axes[0], before, before_title, run["seed"])
    _tsne_panel(axes[1], after, f"after: {run['row']['label']} on {run['row']['head']} ({run['row']['setting']})",
                run["seed"])
    figure.suptitle(f"t-SNE of video features, {run['direction']['name']}, seed {run['seed']}", fontsize=10)
    return _save(figure, out / f"tsne-{run['name']}.png")


def confusion_plot(run: dict, out: Path, device: str = "cpu") -> Path:
    from pipelines.evaluate import evaluate_run

    config = read_json(Path(run["dir"]) / "run.json")["config"]
    entries = read_manifest(config["manifest"])
    split = config["eval_split"] or _eval_split(entries, config["target"])
    evaluate_run(Path(run["dir"]), config["store"], config["manifest"], config["target"], split, "best", device, 0)
    path = out / f"confusion-{run['name']}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(run["dir"]) / f"eval-{config['target']}-{split}-confusion.png", path)
    return path
