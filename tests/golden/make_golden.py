"""Writes pre_redesign.json: per-epoch numbers of every pre-redesign head, from the code before the architecture x
method split. Run it from a checkout of commit 6f64a0c (the last commit with ``heads.base.Head``):

    git worktree add --detach /tmp/old 6f64a0c
    cd /tmp/old && PYTHONPATH=/tmp/old:<repo>/tests python <repo>/tests/golden/make_golden.py <repo>/tests/golden

``tests/test_golden.py`` trains the same runs as (architecture, method) pairs and compares.
"""
import json
import sys
import tempfile
from pathlib import Path

import torch

from conftest import make_feature_store
from pipelines.train import TrainConfig, train

# old head name, its overrides, setting -> the new (architecture, method) pair with the same maths
RUNS = [
    ("tempooling", {}, "dg", "tempooling", "erm"),
    ("trn", {}, "dg", "trn", "erm"),
    ("ta2n", {}, "da", "trn", "ta2n"),
    ("ta2n", {"temporal": "pooling"}, "da", "tempooling", "ta2n"),
    ("ta3n", {"entropy_unit": "nats"}, "da", "trn", "ta3n"),
    ("ta3n", {"entropy_unit": "nats", "temporal": "pooling"}, "da", "tempooling", "ta3n"),
    ("dann", {}, "da", "trn", "dann"),
    ("dann", {"temporal": "pooling"}, "da", "tempooling", "dann"),
    ("mcd", {}, "da", "trn", "mcd"),
    ("tsn-maps", {}, "dg", "tsn-maps", "erm"),
    ("stdn-sgm", {}, "dg", "stdn-sgm", "erm"),
    ("stdn-trm", {}, "dg", "stdn-trm", "erm"),
    ("stdn-strm", {}, "dg", "stdn-strm", "erm"),
    ("stdn-mixstyle", {}, "dg", "stdn-mixstyle", "erm"),
    ("stdn", {}, "dg", "stdn", "erm"),
]
COMMON = {"epochs": 2, "batch_size": 4}
SMALL_TA3N = {"init_std": 0.0}
SMALL_STDN = {"anchor_hidden": 8, "spatial_dim": 8, "temporal_dim": 8, "se_hidden": 4, "relation_hidden": 8}


def overrides_for(old_head: str) -> dict:
    return {**COMMON, **(SMALL_STDN if old_head.startswith(("stdn", "tsn")) else SMALL_TA3N)}


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp())
    store, manifest = make_feature_store(root, per_class=4, target_shift=0.6)
    results = []
    for old_head, extra, setting, arch, method in RUNS:
        hparams = {**overrides_for(old_head), **extra}
        config = TrainConfig(store=store, manifest=manifest, head=old_head, source="src", target="tgt",
                             setting=setting, hparams=hparams, out=root / f"{old_head}-{len(results)}")
        history = train(config, show_progress=False)["epochs"]
        results.append({"old_head": old_head, "architecture": arch, "method": method, "setting": setting,
                        "hparams": {k: v for k, v in hparams.items() if k != "temporal"},
                        "epochs": [{k: r[k] for k in ("loss", "src_val_acc", "tgt_acc")} for r in history]})
        print(old_head, extra, results[-1]["epochs"])
    (out_dir / "pre_redesign.json").write_text(json.dumps({"commit": "6f64a0c", "runs": results}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
