"""DRL on the built-in synthetic shift, DG protocol: target accuracy and dynamic score, mean ± s.e. over seeds.

    python benchmarks/drl_synthetic.py [--out demo_out] [--epochs 8] [--seeds 0 1 2]

Uses the demo's data and store under ``--out`` (made as ``vidshift demo`` makes them, random-init ResNet-18 at
112 px, 8 steps per clip, when they are not there yet; an existing store is only read) and trains, for every
architecture and method, one DG run per seed with the demo's small-data settings (``pipelines/demo.py``), as a
sweep (``pipelines/sweep.py``) into ``OUT/drl_sweep/runs/<method>-<architecture>-s<seed>``; finished runs are reused. Prints a markdown table and writes it to ``OUT/drl_synthetic.md``:
the source-val and target accuracy at the epoch selected on source val, the dynamic score of the selected model on
the target's test split (eq. 4 frozen / shuffled, eq. 2 distilled; nats), and, for drl-aug / drl-minmax, the
training accuracy of their spatial model in the last epoch. Below it, the datasets' static bias (eq. 5, from
``vidshift diagnose`` of the first run): how far a purely spatial model gets on each domain.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

# Run as a script, Python puts this directory first on the path (where extract.py would shadow the package); the
# repository root takes its place, as in benchmarks/train.py.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipelines.demo import DemoConfig, demo_overrides, prepare_store  # noqa: E402
from pipelines.diagnose import diagnose_run  # noqa: E402
from pipelines.sweep import run_sweep  # noqa: E402
from pipelines.sweep_spec import Direction, Group, SweepSpec, plan  # noqa: E402

HEADS = ("stdn", "trn", "tempooling")
METHODS = ("erm", "drl-fast", "drl-aug", "drl-minmax")


def mean_se(values: list[float], spec: str = ".3f") -> str:
    if not values:
        return "-"
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{spec}} ± {se:{spec}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--heads", nargs="+", default=list(HEADS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()
    manifest, synth = prepare_store(DemoConfig(out=args.out))
    source, target = synth.domains[0], synth.domains[1]
    groups = [Group((head,), (method,), "dg", None, None, {**demo_overrides(head, method), "epochs": args.epochs},
                    {}, None, {"workers": 0}) for head in args.heads for method in args.methods]
    spec = SweepSpec([Direction(f"{source}->{target}", source, target, str(args.out / "store"), manifest)], groups,
                     args.seeds, source="benchmarks/drl_synthetic.py")
    runs = plan(spec, args.out / "drl_sweep", namer=lambda run: f"{run.row['method']}-{run.row['head']}-s{run.seed}")
    run_sweep(runs, args.out / "drl_sweep", spec.source)
    rows = [(head, method, [json.loads((run.config.out / "metrics.json").read_text()) for run in runs
                            if (run.row["head"], run.row["method"]) == (head, method)])
            for head in args.heads for method in args.methods]
    first_run = runs[0].config.out
    lines = [f"| architecture | method | {source} val | {target} (selected on val) | γ freeze ({target}) | "
             f"γ shuffle ({target}) | γ distill ({target}) | γ freeze ({source}) | spatial model train acc |",
             "|" + "---|" * 9]
    for head, method, reports in rows:
        score = [r["dynamic_score"] for r in reports]
        spatial = [r["epochs"][-1]["spatial_acc"] for r in reports if "spatial_acc" in r["epochs"][-1]]
        cells = [mean_se([r["final"]["src_val_acc_selected"] for r in reports]),
                 mean_se([r["final"]["target_acc_selected"] for r in reports]),
                 *(mean_se([s["target"][key] for s in score], ".1e") for key in ("freeze", "shuffle", "distill")),
                 mean_se([s["source"]["freeze"] for s in score], ".1e"), mean_se(spatial)]
        lines.append(f"| {head} | {method} | " + " | ".join(cells) + " |")
    dynamic = diagnose_run(first_run, args.out / "store", manifest, workers=0)["dynamic_score"]
    bias = {role: dynamic[role]["static_bias"] for role in ("source", "target")}
    lines += ["", f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), {args.epochs} epochs, demo settings "
              f"{json.dumps(demo_overrides('trn', 'erm'))} (epochs overridden). Chance: {1 / 6:.3f}. γ in nats.",
              f"Static bias (eq. 5, spatial model fitted on each domain's train labels, test split): {source} accuracy "
              f"{bias['source']['accuracy']:.3f} (CE {bias['source']['ce']:.3f}), {target} accuracy "
              f"{bias['target']['accuracy']:.3f} (CE {bias['target']['ce']:.3f}, chance CE "
              f"{bias['target']['chance_ce']:.3f}); the {source}-label spatial model on {target}: accuracy "
              f"{dynamic['spatial_transfer']['accuracy']:.3f}."]
    table = "\n".join(lines)
    print(table)
    (args.out / "drl_synthetic.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
