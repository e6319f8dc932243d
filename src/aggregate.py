"""Seed-aggregated tables and figures from probe result files, in the paper's layout.

`python -m src.aggregate RESULTS_DIR [--out DIR]` reads every result file named as
the probe scripts name them (src.naming), groups them by dataset x anonymizer x
test-noise sigma and units, and reduces over seeds to mean and sample standard deviation
(ddof=1; a single seed has no std and is marked n=1). It writes, per metric, sigma and
noise units, a table with datasets as rows and anonymizers as columns (Markdown, CSV,
LaTeX; real-unit noise tables end in `-real`), a long-format summary.csv, report.md
(what it prints) and, when matplotlib is installed, AUC-vs-sigma (one panel per noise
unit) and privacy-utility plots. It warns when the results were made by more than one
version of the code.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from src.anonymizers import ANONYMIZERS, anonymizer_of_flag
from src.cli import ArgumentParser, UserError, run_cli
from src.io import atomic_path
from src.ledger import ADJACENCY, add_warn_epsilon, split_ledger
from src.metric_registry import KNOWN, METRICS as REGISTERED, PAPER, TIMING, table_metrics
from src.anonymizers.base import NUMBER
from src.naming import parse_result_name

TABLE_METRICS = table_metrics(PAPER)  # the paper's utility + privacy
KNOWN_METRICS = table_metrics(KNOWN)  # the metrics users of synthcity / SDMetrics know, in a table of their own
METRICS = tuple(metric.name for metric in REGISTERED)  # every metric summary.csv holds
DP_LABEL = re.compile(rf"^(?P<method>.+?)-dp(?P<epsilon>{NUMBER})$")  # a DP column: <method>-dp<epsilon>
CURVE_METRICS = ("auc", "accuracy")
TIME_METRICS = table_metrics(TIMING)  # seconds to make the release, and to train the probe on it
PRIVACY_AXES = ("average_mindistance", "mia_auc")  # y axes of the privacy-utility plot
STD_NOTE = "mean ± sample std (ddof=1) over seeds; n = number of seeds when not all cells have the same"


@dataclass(frozen=True)
class Result:
    """One probe result file: which cell of the grid it belongs to, and its metrics."""

    path: Path
    dataset: str
    anonymizer: str
    sigma: float
    units: str  # test-noise units, released or real ("released" at sigma 0, where there is no noise)
    seed: int
    metrics: dict[str, float]
    plain: bool  # written by the no-noise probe (file name without _sigma-)
    code_version: str
    dp: dict | None = None  # a DP release's accounting (src.ledger's format), None for the others


@dataclass(frozen=True)
class Cell:
    """One metric reduced over seeds for a dataset x anonymizer x sigma."""

    dataset: str
    anonymizer: str
    sigma: float
    units: str
    metric: str
    mean: float
    std: float  # NaN when n == 1
    n: int


def anonymizer_order(label: str) -> tuple:
    """Column order: registry order (identity, k-Same, CVAE, ...), then each anonymizer's own order."""
    anonymizer = anonymizer_of_flag(label)
    return (list(ANONYMIZERS.values()).index(anonymizer), anonymizer.column_order(label))


def find_results(results_dir: Path) -> list[Path]:
    """Every file under `results_dir` named like a probe result, sorted by path."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise UserError(f"results folder {results_dir} does not exist; give the folder the probes wrote to")
    paths = sorted(path for path in results_dir.rglob("*.json") if parse_result_name(path.name) is not None)
    if not paths:
        raise UserError(f"no result files (<dataset>_<flag>-s<seed>.json) under {results_dir}; run the probes first")
    return paths


def load_results(paths: Iterable[Path]) -> list[Result]:
    """Parse result files; a plain probe result wins over a sigma-0 noise result for the same seed."""
    chosen: dict[tuple, Result] = {}
    for path in map(Path, paths):
        name = parse_result_name(path.name)
        if name is None:
            raise UserError(f"{path}: not a result file name (<dataset>_<flag>-s<seed>[_sigma-<s>].json)")
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read result {path} ({err}); rerun the probe that writes it") from err
        if not isinstance(payload, dict) or not isinstance(payload.get("auc"), (int, float)):
            raise UserError(f"{path}: no numeric 'auc'; rerun the probe that writes it")
        metrics = {name: float(payload[name]) for name in METRICS
                   if isinstance(payload.get(name), (int, float)) and not isinstance(payload[name], bool)}
        units = payload.get("noise_units") or name["units"] or "released"
        dp = payload.get("dp")
        result = Result(path, name["dataset"], name["anonymizer"].column_label(name["flag"]), name["sigma"],
                        units if name["sigma"] > 0 else "released", name["seed"], metrics, plain=name["plain"],
                        code_version=str(payload.get("code_version", "unrecorded")),
                        dp=dp if isinstance(dp, dict) and "mechanisms" in dp else None)
        key = (result.dataset, result.anonymizer, result.sigma, result.units, result.seed)
        other = chosen.get(key)
        if other is not None and other.plain == result.plain:
            raise UserError(f"two results for the same run: {other.path} and {path}; remove one")
        if other is None or result.plain:
            chosen[key] = result
    return list(chosen.values())


def summarise(results: list[Result]) -> list[Cell]:
    """Mean and sample std over seeds of every metric, in order of first appearance of each group."""
    groups: dict[tuple[str, str, float, str], list[Result]] = {}
    for result in results:
        groups.setdefault((result.dataset, result.anonymizer, result.sigma, result.units), []).append(result)
    cells = []
    for (dataset, anonymizer, sigma, units), members in groups.items():
        for metric in METRICS:
            values = np.array([member.metrics[metric] for member in members if metric in member.metrics])
            if len(values):
                std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
                cells.append(Cell(dataset, anonymizer, sigma, units, metric, float(values.mean()), std, len(values)))
    return cells


UNITS_TEXT = {"released": "noise in each released set's z-units (the reference)",
              "real": "noise in real train units (the same for every release)"}


def grid(cells: list[Cell], metric: str, sigma: float,
         units: str = "released") -> tuple[list[str], list[str], dict[tuple[str, str], Cell]]:
    """Rows (datasets), columns (anonymizers in paper order) and cells of one metric at one sigma and units."""
    chosen = {(c.dataset, c.anonymizer): c for c in cells
              if c.metric == metric and c.sigma == sigma and c.units == units}
    datasets = list(dict.fromkeys(dataset for dataset, _ in chosen))
    anonymizers = sorted({anonymizer for _, anonymizer in chosen}, key=anonymizer_order)
    return datasets, anonymizers, chosen


def decimals(cells: Iterable[Cell]) -> int:
    """Two decimals for percent-scale numbers, three for small ones; one choice per table."""
    return 2 if max(abs(cell.mean) for cell in cells) >= 10 else 3


def cell_text(cell: Cell | None, places: int, full_n: int, latex: bool = False) -> str:
    if cell is None:
        return "–" if not latex else "--"
    plus_minus = r" \pm " if latex else " ± "
    text = f"{cell.mean:.{places}f}"
    if cell.n > 1:
        text += f"{plus_minus}{cell.std:.{places}f}"
    if latex:
        text = f"${text}$"
    if cell.n == 1 or cell.n != full_n:
        text += f" (n={cell.n})"
    return text


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    return text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def metric_tables(cells: list[Cell], metric: str, sigma: float, units: str = "released") -> tuple[str, str, str]:
    """One metric at one sigma and noise units in the paper's layout: (Markdown, CSV, LaTeX)."""
    datasets, anonymizers, chosen = grid(cells, metric, sigma, units)
    places = decimals(chosen.values())
    full_n = max(cell.n for cell in chosen.values())
    rows = [[dataset] + [cell_text(chosen.get((dataset, a)), places, full_n) for a in anonymizers]
            for dataset in datasets]
    markdown = markdown_table(["dataset"] + anonymizers, rows)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["dataset"] + [f"{a}_{field}" for a in anonymizers for field in ("mean", "std", "n")])
    for dataset in datasets:
        row = [dataset]
        for anonymizer in anonymizers:
            cell = chosen.get((dataset, anonymizer))
            row += ["", "", 0] if cell is None else [repr(cell.mean), "" if cell.n == 1 else repr(cell.std), cell.n]
        writer.writerow(row)

    latex_rows = [" & ".join([latex_escape(dataset)] + [cell_text(chosen.get((dataset, a)), places, full_n, latex=True)
                                                         for a in anonymizers]) + r" \\" for dataset in datasets]
    latex = "\n".join([
        f"% {metric}, test noise sigma = {sigma:g}" + (f" ({UNITS_TEXT[units]})" if sigma > 0 else "")
        + f"; {STD_NOTE}",
        r"\begin{tabular}{l" + "c" * len(anonymizers) + "}",
        r"\toprule",
        " & ".join(["Dataset"] + [latex_escape(a) for a in anonymizers]) + r" \\",
        r"\midrule",
        *latex_rows,
        r"\bottomrule",
        r"\end{tabular}",
    ]) + "\n"
    return markdown, buffer.getvalue(), latex


def report(cells: list[Cell]) -> str:
    """What the sweep prints: the no-noise tables, and AUC against test noise per dataset.

    One dataset: a single table with anonymizers as rows and metrics as columns.
    Several: one paper-layout table per metric (datasets as rows).
    """
    base_sigma = min(cell.sigma for cell in cells)
    datasets = list(dict.fromkeys(cell.dataset for cell in cells))
    at_base = [c for c in cells if c.sigma == base_sigma and c.units == "released"]
    parts = [f"Results: {STD_NOTE}.\n"]
    for title, group in (("", TABLE_METRICS), (", privacy and fidelity metrics users know", KNOWN_METRICS)):
        metrics = [m for m in group if any(c.metric == m for c in at_base)]
        if not metrics:
            continue
        if len(datasets) == 1:
            lookup = {(c.anonymizer, c.metric): c for c in at_base if c.metric in metrics}
            anonymizers = sorted({a for a, _ in lookup}, key=anonymizer_order)
            places = {m: decimals([c for (_, cm), c in lookup.items() if cm == m]) for m in metrics}
            full_n = max(c.n for c in lookup.values())
            rows = [[a] + [cell_text(lookup.get((a, m)), places[m], full_n) for m in metrics] for a in anonymizers]
            parts.append(f"### {datasets[0]}, sigma = {base_sigma:g}{title}\n\n"
                         + markdown_table(["anonymizer"] + metrics, rows))
        else:
            for metric in metrics:
                parts.append(f"### {metric}, sigma = {base_sigma:g}\n\n" + metric_tables(cells, metric, base_sigma)[0])
    for dataset in datasets:
        for units in noise_units(cells):
            auc = noise_curve(cells, dataset, units)
            sigmas = sorted({sigma for _, sigma in auc})
            if len(sigmas) > 1:
                anonymizers = sorted({a for a, _ in auc}, key=anonymizer_order)
                places, full_n = decimals(auc.values()), max(c.n for c in auc.values())
                rows = [[a] + [cell_text(auc.get((a, s)), places, full_n) for s in sigmas] for a in anonymizers]
                parts.append(f"### {dataset}: auc against test noise, {UNITS_TEXT[units]}\n\n"
                             + markdown_table(["anonymizer"] + [f"sigma={s:g}" for s in sigmas], rows))
    return "\n".join(parts)


def versions_warning(results: list[Result]) -> str | None:
    """A warning when the results were made by more than one version of the code, else None."""
    versions = Counter(result.code_version for result in results)
    if len(versions) < 2:
        return None
    listing = ", ".join(f"{version} ({count} files)" for version, count in versions.most_common())
    return (f"warning: these tables mix results of {len(versions)} code versions: {listing}; "
            "rerun with `python -m src.sweep CONFIG --rerun-other-code`")


def noise_units(cells: list[Cell]) -> list[str]:
    """The noise units present among noisy cells, released first."""
    return [units for units in UNITS_TEXT if any(c.units == units and c.sigma > 0 for c in cells)]


def noise_curve(cells: list[Cell], dataset: str, units: str) -> dict[tuple[str, float], Cell]:
    """AUC cells of one dataset by (anonymizer, sigma) in one noise units; sigma 0 (no noise) belongs to every curve."""
    return {(c.anonymizer, c.sigma): c for c in cells
            if c.dataset == dataset and c.metric == "auc" and (c.units == units or c.sigma == 0)}


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def summary_csv(cells: list[Cell]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["dataset", "anonymizer", "sigma", "noise_units", "metric", "mean", "std", "n"])
    for cell in cells:
        writer.writerow([cell.dataset, cell.anonymizer, f"{cell.sigma:g}", cell.units, cell.metric, repr(cell.mean),
                         "" if cell.n == 1 else repr(cell.std), cell.n])
    return buffer.getvalue()


def plot_figures(cells: list[Cell], out_dir: Path) -> list[Path]:
    """AUC against sigma per dataset, and privacy against AUC (no noise); skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("notice: matplotlib is not installed; skipping figures (pip install matplotlib)")
        return []
    written = []
    datasets = list(dict.fromkeys(cell.dataset for cell in cells))
    for dataset in datasets:
        curves = {units: noise_curve(cells, dataset, units) for units in noise_units(cells)}
        curves = {units: curve for units, curve in curves.items() if len({s for _, s in curve}) > 1}
        if not curves:
            continue
        figure, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False, sharey=True)
        for axis, (units, curve) in zip(axes[0], curves.items()):
            for anonymizer in sorted({a for a, _ in curve}, key=anonymizer_order):
                line = sorted((c for (a, _), c in curve.items() if a == anonymizer), key=lambda c: c.sigma)
                axis.errorbar([c.sigma for c in line], [c.mean for c in line],
                              yerr=[0.0 if c.n == 1 else c.std for c in line], marker="o", capsize=3,
                              label=anonymizer)
            axis.set(xlabel=f"test noise sigma ({units} units)", ylabel="AUC (%)", title=dataset)
        axes[0][-1].legend(fontsize="small")
        written.append(save_figure(figure, out_dir / f"auc_vs_sigma_{dataset}.png"))
        plt.close(figure)

    base_sigma = min(cell.sigma for cell in cells)
    at_base = {(c.dataset, c.anonymizer, c.metric): c for c in cells if c.sigma == base_sigma and c.units == "released"}
    axes_metrics = [m for m in PRIVACY_AXES if any(metric == m for _, _, metric in at_base)]
    if axes_metrics:
        figure, axes = plt.subplots(1, len(axes_metrics), figsize=(5 * len(axes_metrics), 4), squeeze=False)
        anonymizers = sorted({a for _, a, _ in at_base}, key=anonymizer_order)
        colours = {a: f"C{i}" for i, a in enumerate(anonymizers)}
        markers = {d: "osD^v<>ph*"[i % 10] for i, d in enumerate(datasets)}
        for axis, metric in zip(axes[0], axes_metrics):
            for (dataset, anonymizer, name), cell in at_base.items():
                utility = at_base.get((dataset, anonymizer, "auc"))
                if name == metric and utility is not None:
                    axis.scatter(utility.mean, cell.mean, color=colours[anonymizer], marker=markers[dataset])
            axis.set(xlabel="AUC (%)", ylabel=metric)
        handles = [plt.Line2D([], [], color=colours[a], marker="o", linestyle="", label=a) for a in anonymizers]
        if len(datasets) > 1:
            handles += [plt.Line2D([], [], color="grey", marker=markers[d], linestyle="", label=d) for d in datasets]
        axes[0][-1].legend(handles=handles, fontsize="small", loc="best")
        written.append(save_figure(figure, out_dir / "privacy_utility.png"))
        plt.close(figure)
    return written + plot_dp_curve(cells, out_dir, plt)


def dp_curve(cells: list[Cell]) -> dict[tuple[str, str, str], dict[float, Cell]]:
    """Cells of the privacy-utility curve at sigma 0, by (dataset, method, metric) and epsilon (inf: no DP).

    A method is a column label without its `-dp<epsilon>`; its non-DP column is the point at inf.
    Empty when no column is a DP one."""
    base = [c for c in cells if c.sigma == 0 and c.units == "released"]
    methods = {DP_LABEL.match(c.anonymizer)["method"] for c in base if DP_LABEL.match(c.anonymizer)}
    curve: dict[tuple[str, str, str], dict[float, Cell]] = {}
    for cell in base:
        match = DP_LABEL.match(cell.anonymizer)
        method, epsilon = (match["method"], float(match["epsilon"])) if match else (cell.anonymizer, math.inf)
        if methods and (method in methods or method == "identity"):
            curve.setdefault((cell.dataset, method, cell.metric), {})[epsilon] = cell
    return curve


def dp_curve_table(cells: list[Cell]) -> str:
    """Markdown: per dataset and metric (AUC, accuracy, seconds), a row per method, a column per epsilon."""
    curve = dp_curve(cells)
    parts = []
    for dataset in dict.fromkeys(d for d, _, _ in curve):
        for metric in (*CURVE_METRICS, *TIME_METRICS):
            rows = {m: points for (d, m, name), points in curve.items() if d == dataset and name == metric}
            if not rows:
                continue
            epsilons = sorted({e for points in rows.values() for e in points})
            places = decimals([c for points in rows.values() for c in points.values()])
            full_n = max(c.n for points in rows.values() for c in points.values())
            table = [[method] + [cell_text(points.get(e), places, full_n) for e in epsilons]
                     for method, points in sorted(rows.items(), key=lambda item: anonymizer_order(item[0]))]
            header = ["method"] + [f"eps={e:g}" if math.isfinite(e) else "no DP" for e in epsilons]
            parts.append(f"### {dataset}: {metric} against epsilon\n\n" + markdown_table(header, table))
    return "\n".join(parts)


def plot_dp_curve(cells: list[Cell], out_dir: Path, plt) -> list[Path]:
    """AUC and accuracy against epsilon per dataset, a line per method (no DP drawn as a dashed line)."""
    curve, written = dp_curve(cells), []
    for dataset in dict.fromkeys(d for d, _, _ in curve):
        figure, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(5 * len(CURVE_METRICS), 3.8), squeeze=False)
        for axis, metric in zip(axes[0], CURVE_METRICS):
            rows = {m: points for (d, m, name), points in curve.items() if d == dataset and name == metric}
            for index, (method, points) in enumerate(sorted(rows.items(), key=lambda i: anonymizer_order(i[0]))):
                finite = sorted(e for e in points if math.isfinite(e))
                if finite:
                    axis.errorbar(finite, [points[e].mean for e in finite], marker="o", capsize=3, color=f"C{index}",
                                  yerr=[0.0 if points[e].n == 1 else points[e].std for e in finite], label=method)
                if math.inf in points:
                    axis.axhline(points[math.inf].mean, color=f"C{index}", linestyle="--",
                                 label=f"{method} (no DP)")
            axis.set(xscale="log", xlabel="epsilon (delta 1e-5)", ylabel=f"{metric} (%)", title=dataset)
            ticks = sorted({e for points in rows.values() for e in points if math.isfinite(e)})
            axis.set_xticks(ticks, [f"{e:g}" for e in ticks])  # the sweep's epsilons, not log decades
            axis.minorticks_off()
        axes[0][-1].legend(fontsize="small")
        written.append(save_figure(figure, out_dir / f"dp_curve_{dataset}.png"))
        plt.close(figure)
    return written


def save_figure(figure, path: Path) -> Path:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return path


def privacy_ledger(results: list[Result], warn_epsilon: float | None) -> tuple[str, list[str]]:
    """The report's ledger: the DP releases of each dataset's train split (each release once, however many
    probes read it), composed by src.ledger; and a warning line for each split past `warn_epsilon`."""
    releases: dict[str, dict[tuple[str, int], dict]] = {}
    for result in results:
        if result.dp is not None:
            releases.setdefault(f"{result.dataset} train", {})[(result.anonymizer, result.seed)] = result.dp
    if not releases:
        return "", []
    table, warnings_ = split_ledger({split: [(f"{label}-s{seed}", dp) for (label, seed), dp in named.items()]
                                     for split, named in releases.items()}, warn_epsilon)
    text = f"### Privacy ledger: DP releases composed per private split\n\nRelation: {ADJACENCY}.\n\n{table}\n"
    if any("NOT PRIVATE" in dp.get("noise", "") for named in releases.values() for dp in named.values()):
        text += ("\nSome DP releases here seeded their noise from --seed (--dp_seeded_noise_not_private): they are "
                 "reproducible but NOT private. A real release leaves that flag out.\n")
    return text, warnings_


def aggregate(paths: Iterable[Path], out_dir: Path, warn_epsilon: float | None = None) -> str:
    """Tables, summary, report and figures for the given result files; returns the report. `warn_epsilon`:
    warn when one split's DP releases compose past it."""
    results = load_results(paths)
    cells = summarise(results)
    if not cells:
        raise UserError("no results to aggregate; run the probes first")
    warning = versions_warning(results)
    out_dir = Path(out_dir)
    for metric in (*TABLE_METRICS, *KNOWN_METRICS):
        for sigma, units in sorted({(c.sigma, c.units) for c in cells if c.metric == metric}):
            name = f"{metric}_sigma-{sigma:g}" + ("-real" if units == "real" else "")
            for text, suffix in zip(metric_tables(cells, metric, sigma, units), ("md", "csv", "tex")):
                write_text(out_dir / f"{name}.{suffix}", text)
    write_text(out_dir / "summary.csv", summary_csv(cells))
    curve = dp_curve_table(cells)
    if curve:
        write_text(out_dir / "dp_curve.md", curve)
    ledger, ledger_warnings = privacy_ledger(results, warn_epsilon)
    text = (report(cells) + (f"\n{curve}\n" if curve else "") + (f"\n{ledger}" if ledger else "")
            + "".join(f"\n{line}\n" for line in [warning, *ledger_warnings] if line))
    for line in [warning, *ledger_warnings]:
        if line:
            print(line, file=sys.stderr)
    write_text(out_dir / "report.md", text)
    plot_figures(cells, out_dir)
    return text


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path, help="folder the probe scripts wrote their JSON files to")
    parser.add_argument("--out", type=Path, default=None,
                        help="where tables and figures go (default RESULTS_DIR/tables)")
    add_warn_epsilon(parser)
    args = parser.parse_args()
    out_dir = args.out if args.out is not None else args.results_dir / "tables"
    print(aggregate(find_results(args.results_dir), out_dir, args.warn_epsilon))
    print(f"tables and figures in {out_dir}")


if __name__ == "__main__":
    run_cli(main)
