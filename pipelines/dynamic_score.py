"""The dynamic score of a trained run (DRL §3; the maths in ``heads/drl.py``), for ``metrics.json`` and
``vidshift diagnose``.

Per domain, on its evaluated split (videos at their segment centres, the model in eval mode):

- ``freeze`` / ``shuffle`` (eq. 4): mean KL(f(x) ‖ f(x̃)) over videos, x̃ frozen at the *first* step (the official
  code's choice) or with each video's steps in a random order (a generator seeded by the run's seed);
- ``distill`` (eq. 2): a purely spatial student (eq. 1) fitted to the run's predictions on the domain's *train*
  split (its inputs only: no label is read), γ = its mean KL on the evaluated split. The target's train split is
  read for this in every setting: a post-hoc measure, it changes nothing in training or selection.
- in ``vidshift diagnose`` also ``static_bias`` (eq. 5): the same student fitted on the domain's train labels, its
  CE (nats; ln K at chance) and accuracy on the evaluated split; and ``spatial_transfer``: the source-label student
  on the target's split, i.e. how far the source's static cue carries to the target.

All nats. Every number is deterministic for a given checkpoint and seed; everything runs under a forked RNG, so
training draws are untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from extract.manifest import read_manifest
from heads.base import Inputs, cat_inputs, map_inputs
from heads.drl import fit_spatial_model, freeze_steps, kd_loss, shuffle_steps, summarize_steps
from heads.method import Method
from pipelines.data import FeatureSet, iterate
from pipelines.evaluate import EVAL_BATCH, LoadedRun
from pipelines.runs import RunError, RunInputs, open_feature_set, select

FROZEN_STEP = "first"


@dataclass
class SplitOutputs:
    """One split's teacher logits [V, K] on clean, frozen and shuffled clips, and the step vectors [V, N, C]
    (maps averaged over positions) a spatial student reads."""

    logits: Tensor
    frozen: Tensor
    shuffled: Tensor
    summaries: Inputs


@torch.no_grad()
def split_outputs(model: Method, features: FeatureSet, num_segments: int, workers: int, device: torch.device,
                  seed: int) -> SplitOutputs:
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    logits, frozen, shuffled, summaries = [], [], [], []
    for _, x in iterate(features, features.eval_plans(num_segments, EVAL_BATCH), workers, device):
        logits.append(model.predict(x).float().cpu())
        frozen.append(model.predict(freeze_steps(x, FROZEN_STEP)).float().cpu())
        shuffled.append(model.predict(shuffle_steps(x, generator)).float().cpu())
        summaries.append(map_inputs(lambda t: summarize_steps(t).float().cpu(), x))
    return SplitOutputs(torch.cat(logits), torch.cat(frozen), torch.cat(shuffled), cat_inputs(summaries))


def input_modulation(outputs: SplitOutputs) -> dict[str, float]:
    """Eq. 4 with frozen and with shuffled clips."""
    return {"freeze": kd_loss(outputs.frozen, outputs.logits).mean().item(),
            "shuffle": kd_loss(outputs.shuffled, outputs.logits).mean().item()}


def distillation_score(fit: SplitOutputs, scored: SplitOutputs, seed: int) -> dict[str, float]:
    """Eq. 2: the student fitted to ``fit``'s teacher logits, its KL and agreement (argmax) on ``scored``."""
    student = fit_spatial_model(fit.summaries, fit.logits, fit.logits.shape[1], seed=seed)
    with torch.no_grad():
        predicted = student.from_summaries(scored.summaries)
    return {"distill": kd_loss(predicted, scored.logits).mean().item(),
            "distill_agreement": (predicted.argmax(1) == scored.logits.argmax(1)).float().mean().item()}


def static_bias(fit: SplitOutputs, labels: Tensor, scored: dict[str, tuple[SplitOutputs, Tensor]],
                seed: int) -> dict[str, dict[str, float]]:
    """Eq. 5: the student fitted on ``labels``; its CE and accuracy on each ``scored`` split."""
    num_classes = fit.logits.shape[1]
    student = fit_spatial_model(fit.summaries, labels, num_classes, seed=seed)
    report = {}
    with torch.no_grad():
        for name, (outputs, truth) in scored.items():
            predicted = student.from_summaries(outputs.summaries)
            report[name] = {"ce": F.cross_entropy(predicted, truth).item(), "chance_ce": math.log(num_classes),
                            "accuracy": (predicted.argmax(1) == truth).float().mean().item()}
    return report


def domain_score(model: Method, fit_set: FeatureSet | None, scored_set: FeatureSet, role: str, num_segments: int,
                 workers: int, device: torch.device, seed: int) -> tuple[dict, SplitOutputs, SplitOutputs | None]:
    """Eq. 4 on ``scored_set`` and, when the domain has a train split (``fit_set``), eq. 2; with the outputs."""
    model.set_eval_domain(role)   # AdaBN: the domain's own batch-norm statistics
    scored = split_outputs(model, scored_set, num_segments, workers, device, seed)
    report = {"videos": len(scored_set), **input_modulation(scored)}
    fit = None
    if fit_set is not None:
        fit = split_outputs(model, fit_set, num_segments, workers, device, seed)
        report.update(distill_fit_videos=len(fit_set), **distillation_score(fit, scored, seed))
    return report, scored, fit


def describe(frozen_step: str = FROZEN_STEP) -> str:
    return (f"nats. freeze/shuffle: eq. 4, KL(f(x) || f(x~)) with x~ frozen at the {frozen_step} step or its steps "
            f"shuffled (seeded); distill: eq. 2, a spatial student fitted to the run's predictions on the domain's "
            f"train split, KL on the evaluated split. 0: the model is purely spatial.")


def run_dynamic_score(model: Method, inputs: RunInputs, config, device: torch.device) -> dict:
    """The dynamic score of a training run's model (``config`` a TrainConfig) on the splits the trainer evaluates:
    ``source`` = the training domain's val split (the target's in target-only, as ``src_val_acc``), ``target`` =
    the target's evaluated split; the students are fitted on each domain's train split."""
    report: dict = {"definition": describe(), "seed": config.seed}
    train_role = "target" if config.setting == "target-only" else "source"
    target_fit = inputs.target_train
    if config.target and target_fit is None:
        target_fit = (inputs.source_train if config.setting == "target-only" else
                      open_feature_set(inputs.store, select(read_manifest(config.manifest), config.target, "train"),
                                       model.arch.input, inputs.classes, config.streams, config.skip_missing,
                                       labelled=False, fusion=config.fusion))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for key, fit_set, scored_set, role in (("source", inputs.source_train, inputs.source_val, train_role),
                                               ("target", target_fit, inputs.target_eval, "target")):
            if scored_set is not None:
                report[key] = domain_score(model, fit_set, scored_set, role, config.num_segments, config.workers,
                                           device, config.seed)[0]
    return report


def _open_labelled(run: LoadedRun, entries: list, domain: str, split: str) -> tuple[FeatureSet | None, bool]:
    """The run's features of ``domain``/``split`` with labels when every row has one, else without; None if empty."""
    chosen = select(entries, domain, split)
    try:
        return run.open_features(chosen, labelled=True), True
    except RunError:    # rows labelled 'unlabelled' (EPIC-100 target train): eq. 2 and 4 need no labels
        return run.open_features(chosen, labelled=False), False


def diagnose_dynamic_score(run: LoadedRun, entries: list, domains: dict[str, str], split: str, workers: int,
                           seed: int) -> dict:
    """Eq. 2, 4 and 5 per domain on ``split`` (students fitted on the domain's train split), and the source-label
    student's accuracy on the target (``spatial_transfer``)."""
    num_segments = run.config["num_segments"]
    report: dict = {"definition": describe() + " static_bias: eq. 5, a spatial student fitted on the domain's train "
                    "labels, CE and accuracy on the split; spatial_transfer: the source's on the target's split.",
                    "split": split, "seed": seed}
    scored_outputs, bias_fits = {}, {}
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        for role, domain in domains.items():
            scored_set, scored_labelled = _open_labelled(run, entries, domain, split)
            fit_set, fit_labelled = _open_labelled(run, entries, domain, "train")
            report[role], scored, fit = domain_score(run.model, fit_set, scored_set, role, num_segments, workers,
                                                     run.device, seed)
            if scored_labelled:
                scored_outputs[role] = (scored, scored_set.labels)
            if fit is not None and fit_labelled:
                bias_fits[role] = (fit, fit_set.labels)
        for role, (fit, labels) in bias_fits.items():
            scored = {name: scored_outputs[name] for name in (role, "target") if name in scored_outputs}
            bias = static_bias(fit, labels, scored, seed)
            if role in bias:
                report[role]["static_bias"] = bias[role]
            if role == "source" and "target" in bias:
                report["spatial_transfer"] = bias["target"]
    return report
