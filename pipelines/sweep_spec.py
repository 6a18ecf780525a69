"""A sweep spec (YAML) and the runs it plans: DomainBed's sweep (harness.md §2.5, §9) on our trainer.

A spec names the data (a default ``store`` and ``manifest``; a direction may name its own), the ``directions``
(source -> target pairs: the columns of the papers' tables), the ``runs`` (groups of architectures x methods in one
setting, optionally with a preset, fixed hyper-parameters, a ``grid`` and seeded ``random`` draws: the rows) and the
training ``seeds``. The product is planned before anything trains, and every run is checked as ``vidshift train``
would check it (method, architecture, setting, preset, every hyper-parameter), so a typo is refused up front.

Run identity (DomainBed's ``Job``: an md5 of the sorted arguments): each run's directory is named by the sha256 of
its full config, i.e. everything that decides its numbers: architecture, method, domains, setting, seed, segments,
training sampling, eval split, skip-missing, streams, fusion, the *resolved* hyper-parameters (so a changed default
is a new run too), the store's feature identity and the manifest's sha256. Paths, devices, workers and how features
are held do not count. So a rerun of a spec skips what is finished, resumes what was killed, and a changed config
lands in a new directory while the old one stays.

Random draws (DomainBed ``hparams_registry``): value = draw of ``RandomState(seed_hash(seed, trial, name))``, one
stream per (trial, name), so adding a name to the search does not move the others' draws. Trials share their
draws across training seeds (the ablation convention: fixed hyper-parameters, varying seed), and every run records
its draws (``swept``). DomainBed's trial 0 is the default hyper-parameters; here every trial is drawn (put the
defaults in a second group to have them).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

import heads
from extract.manifest import file_sha256
from extract.store import FeatureStore
from heads.method import hparam_specs, lookup
from pipelines.runs import store_identity
from pipelines.train import TrainConfig, resolve_config

SPEC_KEYS = ("store", "manifest", "directions", "seeds", "set", "train", "diagnose", "runs")
GROUP_KEYS = ("head", "method", "setting", "label", "preset", "set", "grid", "random", "train")
# spec `train:` keys -> TrainConfig fields: the trainer options of `vidshift train`
TRAIN_KEYS = {"segments": "num_segments", "train_sampling": "train_sampling", "features": "features",
              "memory_budget_gb": "memory_budget_gb", "device": "device", "workers": "workers",
              "feature_cache": "feature_cache",
              "eval_split": "eval_split", "skip_missing": "skip_missing", "stream": "streams", "fusion": "fusion"}
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "choice")
HASH_LENGTH = 16


class SpecError(ValueError):
    """The sweep spec is not valid; the message names the file, the field and what to write instead."""


@dataclass(frozen=True)
class Direction:
    """One column of the table: train on ``source``, adapt to / evaluate on ``target``, in one store."""

    name: str
    source: str
    target: str
    store: str        # as the trainer opens it: a path resolved against the spec's folder, or a URL
    manifest: Path


@dataclass(frozen=True)
class Group:
    """One entry of ``runs``: architectures x methods in one setting, and their hyper-parameter search."""

    heads: tuple[str, ...]
    methods: tuple[str, ...]
    setting: str
    label: str | None
    preset: str | None
    hparams: dict
    grid: dict
    random: dict | None
    train: dict


@dataclass
class PlannedRun:
    """One run of a sweep: its identity (``config_hash``), where it goes and what the report groups it by."""

    name: str                  # its directory under SWEEP_DIR/runs (the hash; the demo names its runs)
    config_hash: str
    row: dict                  # head, method, setting, label: the table row
    direction: dict            # name, source, target
    seed: int
    swept: dict                # the hyper-parameters this sweep varies for the row (grid values, random draws)
    trial: int | None          # the random draw's trial index
    identity: dict             # what config_hash is the hash of
    config: TrainConfig        # ``out`` is the run dir
    diagnose: bool = False     # also `vidshift diagnose` the finished run (the report's MMD column)

    def describe(self) -> str:
        """'ta3n on trn (da)', as `vidshift demo` always said."""
        return f"{self.row['method']} on {self.row['head']} ({self.row['setting']})"

    def where(self) -> str:
        swept = "".join(f", {name}={value:.4g}" if isinstance(value, float) else f", {name}={value}"
                        for name, value in self.swept.items())
        return f" [{self.direction['name']}, seed {self.seed}{swept}]"

    def record(self) -> dict:
        return {"name": self.name, "config_hash": self.config_hash, "row": self.row, "direction": self.direction,
                "seed": self.seed, "swept": self.swept, "trial": self.trial, "identity": self.identity,
                "config": self.config.as_dict(), "diagnose": self.diagnose}


@dataclass
class SweepSpec:
    directions: list[Direction]
    groups: list[Group]
    seeds: list[int] = field(default_factory=lambda: [0])
    hparams: dict = field(default_factory=dict)     # `set:` for every run, where the pair declares the name
    train: dict = field(default_factory=dict)       # `train:` options for every run
    diagnose: bool = False
    source: str = "<spec>"                          # where it was read from, for messages


def seed_hash(*args) -> int:
    """DomainBed's ``misc.seed_hash``: an int in [0, 2^31) from the repr of the arguments, stable across runs."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2 ** 31)


def draw(distribution: dict, seed: int, trial: int, name: str):
    """One value of ``{uniform|log_uniform|int_uniform: [low, high]}`` or ``{choice: [...]}`` for (trial, name)."""
    (kind, bounds), = distribution.items()
    rng = np.random.RandomState(seed_hash(seed, trial, name))
    if kind == "choice":
        return bounds[rng.randint(len(bounds))]
    low, high = bounds
    if kind == "uniform":
        return float(rng.uniform(low, high))
    if kind == "log_uniform":
        return float(10 ** rng.uniform(math.log10(low), math.log10(high)))
    return int(rng.randint(low, high + 1))          # int_uniform: both ends included


def config_hash(identity: dict) -> str:
    """The run directory's name: sha256 of the canonical JSON of what decides the run's numbers."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:HASH_LENGTH]


# ------------------------------------------------------------------------------------------------------- parsing

def load_spec(path: Path) -> SweepSpec:
    """Read and check a spec file; paths in it are relative to its folder."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_bytes())
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    return parse_spec(loaded, path.parent, str(path))


def parse_spec(loaded, base: Path, source: str = "<spec>") -> SweepSpec:
    def fail(where: str, message: str) -> SpecError:
        return SpecError(f"{source}: {where}: {message}")

    if not isinstance(loaded, dict):
        raise SpecError(f"{source}: expected a mapping with {', '.join(SPEC_KEYS)} (see README, Sweeps)")
    _check_keys(loaded, SPEC_KEYS, "the spec", fail)
    for required in ("directions", "runs"):
        if not loaded.get(required):
            raise fail(required, "missing or empty")
    directions = [_direction(entry, loaded, base, f"directions[{i}]", fail)
                  for i, entry in enumerate(_as_list(loaded["directions"]))]
    names = [d.name for d in directions]
    if len(set(names)) != len(names):
        raise fail("directions", f"two directions are named alike ({names}); give them distinct `name:`s")
    seeds = _as_list(loaded.get("seeds", [0]))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise fail("seeds", f"{loaded.get('seeds')!r}: expected a list of integers, e.g. [0, 1, 2]")
    groups = [_group(entry, f"runs[{i}]", fail) for i, entry in enumerate(_as_list(loaded["runs"]))]
    return SweepSpec(directions, groups, seeds, _mapping(loaded.get("set"), "set", fail),
                     _train_options(loaded.get("train"), "train", fail), bool(loaded.get("diagnose", False)), source)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _mapping(value, where: str, fail) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail(where, f"expected a mapping of names to values, got {value!r}")
    return dict(value)


def _check_keys(entry: dict, allowed, where: str, fail) -> None:
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise fail(where, f"unknown key(s) {unknown}; use {', '.join(allowed)}")


def _direction(entry, spec: dict, base: Path, where: str, fail) -> Direction:
    if isinstance(entry, str):
        source, sep, target = entry.replace("→", "->").partition("->")
        if not sep or not source.strip() or not target.strip():
            raise fail(where, f"{entry!r}: write SOURCE->TARGET, e.g. ucf->hmdb")
        entry = {"source": source.strip(), "target": target.strip()}
    if not isinstance(entry, dict) or not {"source", "target"} <= set(entry):
        raise fail(where, f"{entry!r}: write SOURCE->TARGET or a mapping with source and target")
    _check_keys(entry, ("name", "source", "target", "store", "manifest"), where, fail)
    store, manifest = entry.get("store", spec.get("store")), entry.get("manifest", spec.get("manifest"))
    if store is None or manifest is None:
        raise fail(where, "no store or manifest: set `store:` and `manifest:` at the top or in the direction")
    name = str(entry.get("name", f"{entry['source']}->{entry['target']}"))
    return Direction(name, str(entry["source"]), str(entry["target"]), _resolve_store(str(store), base),
                     base / str(manifest))


def _resolve_store(store: str, base: Path) -> str:
    return store if "://" in store else str(base / store)


def _group(entry, where: str, fail) -> Group:
    if not isinstance(entry, dict) or "head" not in entry:
        raise fail(where, f"{entry!r}: expected a mapping with at least `head:` (and `method:`, `setting:`)")
    _check_keys(entry, GROUP_KEYS, where, fail)
    grid = _mapping(entry.get("grid"), f"{where}.grid", fail)
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise fail(f"{where}.grid.{name}", f"{values!r}: expected a non-empty list of values")
    random = _random(entry.get("random"), f"{where}.random", fail)
    clash = sorted(set(grid) & set(random["hparams"] if random else {}))
    if clash:
        raise fail(where, f"{clash} both in grid and random: sweep each name one way")
    return Group(tuple(map(str, _as_list(entry["head"]))), tuple(map(str, _as_list(entry.get("method", "erm")))),
                 str(entry.get("setting", "dg")), entry.get("label"), entry.get("preset"),
                 _mapping(entry.get("set"), f"{where}.set", fail), grid, random,
                 _train_options(entry.get("train"), f"{where}.train", fail))


def _random(value, where: str, fail) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("trials"), int) or value["trials"] < 1:
        raise fail(where, "expected {trials: N, seed: S, hparams: {name: {log_uniform: [low, high]}, ...}}")
    _check_keys(value, ("trials", "seed", "hparams"), where, fail)
    hparams = _mapping(value.get("hparams"), f"{where}.hparams", fail)
    for name, distribution in hparams.items():
        ok = isinstance(distribution, dict) and len(distribution) == 1 and next(iter(distribution)) in DISTRIBUTIONS
        bounds = next(iter(distribution.values())) if ok else None
        if not ok or not isinstance(bounds, list) or (next(iter(distribution)) != "choice" and len(bounds) != 2):
            raise fail(f"{where}.hparams.{name}", f"{distribution!r}: use one of {', '.join(DISTRIBUTIONS)}, e.g. "
                                                 f"{{log_uniform: [0.001, 0.1]}} or {{choice: [32, 64]}}")
        if next(iter(distribution)) == "log_uniform" and min(bounds) <= 0:
            raise fail(f"{where}.hparams.{name}", f"log_uniform needs positive bounds, got {bounds}")
    return {"trials": value["trials"], "seed": int(value.get("seed", 0)), "hparams": hparams}


def _train_options(value, where: str, fail) -> dict:
    options = _mapping(value, where, fail)
    _check_keys(options, TRAIN_KEYS, where, fail)
    converted = {TRAIN_KEYS[key]: value for key, value in options.items()}
    if "streams" in converted:
        streams = converted["streams"]
        converted["streams"] = tuple(s.strip() for s in (streams.split(",") if isinstance(streams, str) else streams))
    if "feature_cache" in converted:    # a directory, or none (null) for no disk copies
        cache = converted["feature_cache"]
        converted["feature_cache"] = None if cache is None or str(cache).lower() == "none" else Path(cache)
    return converted


# ------------------------------------------------------------------------------------------------------ planning

def plan(spec: SweepSpec, out: Path, namer: Callable[[PlannedRun], str] | None = None) -> list[PlannedRun]:
    """Every run of the spec, checked, in spec order (group, architecture, method, direction, trial, seed).

    ``namer`` names the run directories (default: the config hash); the demo names them after the row.
    """
    _check_global_hparams(spec)
    identities: dict[tuple, str] = {}   # features sha256 per (store, streams) and manifest sha256, read once

    def content(kind: str, key, compute) -> str:
        if (kind, key) not in identities:
            identities[(kind, key)] = compute()
        return identities[(kind, key)]

    runs = []
    for index, group in enumerate(spec.groups):
        for head, method in itertools.product(group.heads, group.methods):
            where = f"{spec.source}: runs[{index}] ({method} on {head}, {group.setting})"
            try:
                specs = hparam_specs(*lookup(head, method))
            except heads.HeadError as error:
                raise SpecError(f"{where}: {error}") from None
            fixed = {**{k: v for k, v in spec.hparams.items() if k in specs}, **group.hparams}
            for direction, (swept, trial), seed in itertools.product(spec.directions, _search(group), spec.seeds):
                config = TrainConfig(store=direction.store, manifest=direction.manifest, head=head, method=method,
                                     source=direction.source, target=direction.target, setting=group.setting,
                                     hparams={**fixed, **swept}, preset=group.preset, seed=seed, out=Path(out),
                                     **{**spec.train, **group.train})
                try:
                    resolved, overrides = resolve_config(config)
                    hparams = heads.resolve_hparams(head, method, overrides)
                except ValueError as error:
                    raise SpecError(f"{where}: {error}") from None
                identity = _identity(resolved, hparams, content)
                row = {"head": head, "method": method, "setting": group.setting,
                       "label": group.label or (f"{method} ({group.preset})" if group.preset else method)}
                run = PlannedRun("", config_hash(identity), row,
                                 {"name": direction.name, "source": direction.source, "target": direction.target},
                                 seed, swept, trial, identity, resolved, spec.diagnose)
                run.name = namer(run) if namer else run.config_hash
                run.config = replace(resolved, out=Path(out) / "runs" / run.name)
                runs.append(run)
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise SpecError(f"{spec.source}: runs {twice} are planned more than once (the same config in two groups); "
                        f"remove the duplicate")
    return runs


def _check_global_hparams(spec: SweepSpec) -> None:
    """A name in the top-level ``set:`` applies where a pair declares it; one that no pair declares is a typo."""
    declared = set()
    for group in spec.groups:
        for head, method in itertools.product(group.heads, group.methods):
            try:
                declared |= set(hparam_specs(*lookup(head, method)))
            except heads.HeadError as error:
                raise SpecError(f"{spec.source}: runs: {error}") from None
    unknown = sorted(set(spec.hparams) - declared)
    if unknown:
        raise SpecError(f"{spec.source}: set: {unknown} is declared by none of the spec's (method, architecture) "
                        f"pairs; `vidshift train --head help` lists them")


def _search(group: Group) -> list[tuple[dict, int | None]]:
    """The group's hyper-parameter configurations: the grid's product x the random trials; [({}, None)] if none."""
    names = list(group.grid)
    grid = [dict(zip(names, values)) for values in itertools.product(*(group.grid[n] for n in names))]
    if group.random is None:
        return [(point, None) for point in grid]
    random = group.random
    return [({**point, **{name: draw(distribution, random["seed"], trial, name)
                          for name, distribution in random["hparams"].items()}}, trial)
            for point in grid for trial in range(random["trials"])]


def _identity(config: TrainConfig, hparams: dict, content) -> dict:
    """What decides a run's numbers (the trainer's resume check, plus the preset's name for readability)."""
    streams = tuple(config.streams)

    def features() -> str:
        with FeatureStore.open(config.store) as store:
            return store_identity(store, streams)["features_sha256"]

    return {"head": config.head, "method": config.method, "source": config.source, "target": config.target,
            "setting": config.setting, "seed": config.seed, "preset": config.preset, "hparams": hparams,
            "num_segments": config.num_segments, "train_sampling": config.train_sampling,
            "eval_split": config.eval_split, "skip_missing": config.skip_missing, "streams": list(streams),
            "fusion": config.fusion,
            "features_sha256": content("features", (config.store, streams), features),
            "manifest_sha256": content("manifest", str(config.manifest), lambda: file_sha256(config.manifest))}
