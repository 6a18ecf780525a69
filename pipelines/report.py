"""``vidshift report``: a sweep's runs -> the papers' tables (DomainBed's ``collect_results``, harness.md §2.7-2.8, §9).

Records: one per planned run of ``sweep.json``, read from its directory (``run.json``, ``metrics.json`` with one
record per epoch, ``diagnose.json``). Only finished runs (``done`` holding their hash) enter the tables; failed and
unfinished ones are counted under each table and listed in the CSV.

Selection, per (row, direction, seed) over the row's swept configurations (a grid / random trials) and epochs:
- ``source-val``: the (configuration, epoch) with the best training-domain val accuracy (``src_val_acc``; the
  target's val in target-only; the last epoch where there is no val split), as ``vidshift train`` selects
  (``pipelines.train.selection_key``); ties keep the earlier configuration and epoch. DomainBed's
  "training-domain validation set". For one configuration it is ``metrics.json``'s ``target_acc_selected``.
- ``last``: each configuration's last epoch, the configuration chosen by its val accuracy there.
- ``oracle``: the best target accuracy over configurations and epochs: target labels choose, which is what TA3N's
  and APN's official code report (``metrics.json``'s ``oracle_target_acc``; DomainBed's oracle instead takes the
  last epoch of the configuration best on a held-out target split). Always labelled ORACLE, never a DG/DA result.

Statistics, stated under every table: cells are mean ± standard error over seeds (sample standard deviation / √n;
DomainBed prints the population deviation / √n, a little smaller), n shown; Δ is the mean over the *same* seeds of
the difference to the row's source-only run (ERM in ``dg`` on the same architecture and direction), ± its standard
error (paired: the seed's shared noise cancels); the average column averages a seed's directions first, over the
seeds that have every direction (DomainBed's "Averages"). Target-only rows (trained on the target's labels) are the
upper bound.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from pipelines.sweep import DONE_FILE, FAILED_FILE, PLAN_FILE, read_json
from pipelines.train import selection_key

SELECTIONS = ("source-val", "last", "oracle")
TITLES = {
    "source-val": "selected on the source's val split (the target's in target-only): the selection a DG/DA user "
                  "can make",
    "last": "last epoch of each run (no early stopping)",
    "oracle": "ORACLE: selected with the target's test labels (what TA3N's and APN's official code report); "
              "not a valid DG/DA result",
}
FORMATS = ("md", "tex", "csv")
SOURCE_ONLY = ("erm", "dg")
CSV_FIELDS = ("name", "status", "direction", "source", "target", "head", "method", "setting", "label", "seed",
              "trial", "swept", "selection", "uses_target_labels", "selected_epoch", "src_val_acc", "target_acc",
              "target_mca", "dynamic_score_target", "mmd2", "error")


class ReportError(ValueError):
    """A directory that is not a sweep, or an option the report cannot honour."""


# ------------------------------------------------------------------------------------------------------ records

def load_records(sweep_dir: Path) -> list[dict]:
    """Every planned run of the sweep with its status and, when finished, its epochs and measures."""
    sweep_dir = Path(sweep_dir)
    plan = read_json(sweep_dir / PLAN_FILE)
    if plan is None:
        raise ReportError(f"{sweep_dir}: no {PLAN_FILE}; pass the --out directory of a `vidshift sweep`")
    records = []
    for planned in plan["runs"]:
        run_dir = sweep_dir / "runs" / planned["name"]
        record = {**planned, "dir": str(run_dir), "status": "not started", "epochs": []}
        done = run_dir / DONE_FILE
        failure = read_json(run_dir / FAILED_FILE)
        if done.is_file() and done.read_text().strip() == planned["config_hash"]:
            metrics = read_json(run_dir / "metrics.json")
            record.update(status="finished", epochs=metrics["epochs"],
                          dynamic_score_target=_dynamic_score(metrics), mmd2=_mmd2(read_json(run_dir / "diagnose.json")))
        elif failure is not None:
            record.update(status="failed", error=failure["error"])
        elif (run_dir / "metrics.json").is_file():
            record["status"] = "unfinished"
        records.append(record)
    return records


def _dynamic_score(metrics: dict) -> float | None:
    """DRL's γ (eq. 2, the distilled spatial student) of the selected model on the target, when it was computed."""
    return ((metrics.get("dynamic_score") or {}).get("target") or {}).get("distill")


def _mmd2(diagnosis: dict | None) -> float | None:
    return diagnosis["mmd"]["mmd2"] if diagnosis else None


def choose(records: list[dict], selection: str) -> tuple[dict, dict] | None:
    """The (record, epoch) a selection picks among the finished ``records`` of one (row, direction, seed)."""
    candidates = [(record, epoch) for record in records for epoch in record["epochs"]]
    if not candidates:
        return None
    if selection == "source-val":
        return max(candidates, key=lambda pair: selection_key(pair[1]))   # max keeps the first of ties
    if selection == "last":
        return max(((record, record["epochs"][-1]) for record in records if record["epochs"]),
                   key=lambda pair: selection_key(pair[1]))
    if selection == "oracle":
        return max(candidates, key=lambda pair: pair[1]["tgt_acc"])
    raise ReportError(f"--selection {selection!r}: use one of {', '.join(SELECTIONS)}")


def row_key(record: dict) -> tuple:
    row = record["row"]
    return row["label"], row["head"], row["setting"]


# --------------------------------------------------------------------------------------------------- statistics

def mean_se(values: list[float]) -> tuple[float, float | None, int]:
    """Mean, standard error of the mean (sample std / √n; None for one value) and n."""
    n = len(values)
    return statistics.fmean(values), (statistics.stdev(values) / math.sqrt(n) if n > 1 else None), n


@dataclass
class Row:
    label: str
    head: str
    setting: str
    cells: dict[str, dict[int, float]]          # direction -> seed -> selected target accuracy
    source_only: "Row | None"

    @property
    def is_source_only(self) -> bool:
        return (self.label, self.setting) == SOURCE_ONLY


def build_rows(records: list[dict], selection: str, value: str = "target") -> list[Row]:
    """The table's rows in plan order; ``value``: target (the selected epoch's target accuracy), or a measure of
    the source-val selected model (``dynamic_score_target``, ``mmd2``), which does not depend on the selection."""
    groups: dict[tuple, dict[tuple, list[dict]]] = {}
    for record in records:
        if record["status"] == "finished":
            groups.setdefault(row_key(record), {}).setdefault((record["direction"]["name"], record["seed"]),
                                                             []).append(record)
    rows = {}
    for key, by_cell in groups.items():
        cells: dict[str, dict[int, float]] = {}
        for (direction, seed), candidates in by_cell.items():
            chosen = choose(candidates, selection)
            number = chosen[1]["tgt_acc"] if value == "target" else chosen[0].get(value)
            if number is not None:
                cells.setdefault(direction, {})[seed] = number
        rows[key] = Row(*key, cells, None)
    for (label, head, setting), row in rows.items():
        row.source_only = rows.get((SOURCE_ONLY[0], head, SOURCE_ONLY[1]))
    return [row for row in rows.values() if row.cells]


def directions_of(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(record["direction"]["name"] for record in records))


def per_seed(row: Row, directions: list[str], column: str | None) -> dict[int, float]:
    """A row's values per seed in one direction, or (``column`` None) averaged over every direction."""
    if column is not None:
        return row.cells.get(column, {})
    seeds = set.intersection(*(set(row.cells.get(d, {})) for d in directions)) if directions else set()
    return {seed: statistics.fmean(row.cells[d][seed] for d in directions) for seed in sorted(seeds)}


def gain(row: Row, directions: list[str], column: str | None) -> list[float]:
    """Paired differences to the source-only row over the seeds both have."""
    if row.source_only is None or row.is_source_only:
        return []
    mine, theirs = per_seed(row, directions, column), per_seed(row.source_only, directions, column)
    return [mine[seed] - theirs[seed] for seed in sorted(set(mine) & set(theirs))]


# ------------------------------------------------------------------------------------------------------- tables

def format_cell(values: list[float], scale: float, digits: int, pm: str, signed: bool = False) -> str:
    if not values:
        return "-"
    mean, se, n = mean_se(values)
    number = f"{scale * mean:+.{digits}f}" if signed else f"{scale * mean:.{digits}f}"
    return f"{number} {pm} {scale * se:.{digits}f} (n={n})" if se is not None else f"{number} (n={n})"


def format_measure(values: list[float], pm: str) -> str:
    if not values:
        return "-"
    mean, se, n = mean_se(values)
    return f"{mean:.2e} {pm} {se:.1e} (n={n})" if se is not None else f"{mean:.2e} (n={n})"


def table_lines(records: list[dict], selection: str, pm: str) -> tuple[list[str], list[list[str]]]:
    """Header and body cells of one selection's accuracy table (accuracies in %)."""
    directions = directions_of(records)
    columns = [(d, d) for d in directions] + ([("average", None)] if len(directions) > 1 else [])
    header = ["method", "architecture", "setting"] + [name for title, _ in columns for name in (title, "Δ")]
    body = []
    for row in build_rows(records, selection):
        cells = [row.label, row.head, row.setting]
        for _, column in columns:
            cells.append(format_cell(list(per_seed(row, directions, column).values()), 100, 1, pm))
            cells.append(format_cell(gain(row, directions, column), 100, 1, pm, signed=True))
        body.append(cells)
    return header, body


def measure_lines(records: list[dict], pm: str) -> tuple[list[str], list[list[str]]] | None:
    """The dynamic score and MMD² of the source-val selected models, when some run has them."""
    measures = [(name, title) for name, title in (("dynamic_score_target", "γ distill (target, nats)"),
                                                   ("mmd2", "MMD² (z)"))
                if any(record.get(name) is not None for record in records)]
    if not measures:
        return None
    directions = directions_of(records)
    header = ["method", "architecture", "setting"] + [f"{d}: {title}" for d in directions for _, title in measures]
    rows = {name: {row_key_of(r): r for r in build_rows(records, "source-val", name)} for name, _ in measures}
    keys = list(dict.fromkeys(key for by_key in rows.values() for key in by_key))
    body = []
    for key in keys:
        cells = list(key)
        for direction in directions:
            for name, _ in measures:
                row = rows[name].get(key)
                cells.append(format_measure(list(row.cells.get(direction, {}).values()) if row else [], pm))
        body.append(cells)
    return header, body


def row_key_of(row: Row) -> tuple:
    return row.label, row.head, row.setting


def footnote(records: list[dict]) -> str:
    counts = {status: sum(r["status"] == status for r in records)
              for status in ("finished", "failed", "unfinished", "not started")}
    return ("Accuracy in %, mean ± standard error over seeds (sample std / √n), n = seeds. Δ: mean ± s.e. over the "
            "same seeds of the difference to the source-only row (erm, dg) of the same architecture. target-only "
            "rows: trained on the target's labels (the upper bound). Runs: "
            + ", ".join(f"{count} {status}" for status, count in counts.items()) + ".")


def markdown(records: list[dict], selections: tuple[str, ...]) -> str:
    parts = []
    for selection in selections:
        header, body = table_lines(records, selection, "±")
        parts += [f"### {selection}: {TITLES[selection]}", "", _md_table(header, body), "", footnote(records), ""]
    measures = measure_lines(records, "±")
    if measures:
        parts += ["### measures of the source-val selected model (best.pt), mean ± s.e. over seeds", "",
                  _md_table(*measures), ""]
    return "\n".join(parts)


def _md_table(header: list[str], body: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(cells) + " |" for cells in body])


def latex(records: list[dict], selections: tuple[str, ...]) -> str:
    """One booktabs table per selection (``\\usepackage{booktabs}``)."""
    parts = []
    for selection in selections:
        header, body = table_lines(records, selection, r"$\pm$")
        parts += [r"\begin{table}[t]", r"\centering",
                  r"\caption{" + _tex(f"{selection}: {TITLES[selection]}. {footnote(records)}") + "}",
                  r"\begin{tabular}{lll" + "c" * (len(header) - 3) + "}", r"\toprule",
                  " & ".join(map(_tex, header)) + r" \\", r"\midrule"]
        parts += [" & ".join(_tex(cell) if "$" not in cell else cell.replace("%", r"\%") for cell in cells) + r" \\"
                  for cells in body]
        parts += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(parts)


def _tex(text: str) -> str:
    for plain, escaped in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                           ("->", r"$\to$"), ("±", r"$\pm$"), ("Δ", r"$\Delta$"), ("√", r"$\sqrt{}$"),
                           ("γ", r"$\gamma$"), ("²", r"$^2$")):
        text = text.replace(plain, escaped)
    return text


def long_form(records: list[dict]) -> list[dict]:
    """The CSV: one line per (finished run, selection within that run), one per failed or unfinished run."""
    lines = []
    for record in records:
        base = {"name": record["name"], "status": record["status"], **{k: record["direction"][k] for k in
                ("source", "target")}, "direction": record["direction"]["name"], **record["row"],
                "seed": record["seed"], "trial": record["trial"], "swept": json.dumps(record["swept"]),
                "dynamic_score_target": record.get("dynamic_score_target"), "mmd2": record.get("mmd2"),
                "error": record.get("error")}
        if record["status"] != "finished":
            lines.append(base)
            continue
        for selection in SELECTIONS:
            chosen_record, epoch = choose([record], selection)
            lines.append({**base, "selection": selection, "uses_target_labels": selection == "oracle",
                          "selected_epoch": epoch["epoch"], "src_val_acc": epoch.get("src_val_acc"),
                          "target_acc": epoch["tgt_acc"], "target_mca": epoch.get("tgt_mca")})
    return lines


def write_report(sweep_dir: Path, selections: tuple[str, ...] = SELECTIONS, out: Path | None = None) -> dict:
    """Write report.md, report.tex and records.csv into ``out`` (default SWEEP_DIR/report); return the texts."""
    records = load_records(sweep_dir)
    out = Path(out) if out is not None else Path(sweep_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    texts = {"md": markdown(records, selections), "tex": latex(records, selections)}
    (out / "report.md").write_text(texts["md"])
    (out / "report.tex").write_text(texts["tex"])
    with open(out / "records.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(long_form(records))
    texts["csv"] = (out / "records.csv").read_text()
    return {"records": records, "texts": texts, "out": out}
