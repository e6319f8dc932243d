"""Tables and the log-log ROC figure of membership-inference results (python -m src.attack outputs),
written by the sweep beside the probe tables: one row per release and attack, mean ± std over seeds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from src.anonymizers import ANONYMIZERS, anonymizer_of_flag
from src.io import atomic_path
from src.mia import ATTACKS, FPR_LEVELS, MODEL_ATTACKS, roc_curve

COLUMNS = [("auc", "AUC")] + [(f"tpr_at_fpr_{level:g}", f"TPR@{100 * level:g}%FPR") for level in FPR_LEVELS]
ROC_GRID = np.logspace(-3, 0, 61)  # FPRs at which seeds' ROC curves are averaged


def load_results(paths: list[Path]) -> dict[str, list[dict]]:
    """Result records by release flag, in registry then column order."""
    by_flag: dict[str, list[dict]] = {}
    for path in paths:
        record = json.loads(Path(path).read_text())
        by_flag.setdefault(record["flag"], []).append(record)

    def order(flag: str) -> tuple:
        anonymizer = anonymizer_of_flag(flag)
        return (list(ANONYMIZERS).index(anonymizer.name), anonymizer.column_order(flag))

    return {flag: by_flag[flag] for flag in sorted(by_flag, key=order)}


def attacks_run(records: list[dict]) -> list[str]:
    """The attacks a release's results hold: on a released set, or on a released model (--online)."""
    return [attack for attack in ATTACKS + MODEL_ATTACKS if attack in records[0]["attacks"]]


def cell(values: list[float]) -> str:
    """mean ± sample std over seeds (the mean alone for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def attack_table(results: dict[str, list[dict]]) -> tuple[str, str]:
    """Markdown and CSV: every release and attack, all targets and the exposed ones."""
    header = ["release", "attack"] + [f"{label} {part}" for part in ("all", "exposed") for _, label in COLUMNS]
    rows, csv_rows = [], [",".join(["release", "attack", "part", "metric", "mean", "std", "n"])]
    for flag, records in results.items():
        for attack in attacks_run(records):
            row = [flag, attack]
            for part in ("all", "exposed"):
                for key, _ in COLUMNS:
                    values = [r["attacks"][attack][part][key] for r in records if part in r["attacks"][attack]]
                    row.append(cell(values) if values else "–")
                    if values:
                        std = np.std(values, ddof=1) if len(values) > 1 else float("nan")
                        csv_rows.append(f"{flag},{attack},{part},{key},{np.mean(values):.4f},{std:.4f},{len(values)}")
            rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n", "\n".join(csv_rows) + "\n"


def audit_table(results: dict[str, list[dict]]) -> str:
    """Markdown: the epsilon lower bound each seed's audit proves, and the epsilon the release spent."""
    lines = ["| release | epsilon lower bound (per seed) | attack chosen | spent epsilon |", "|---|---|---|---|"]
    for flag, records in results.items():
        bounds = ", ".join(f"{r['audit']['epsilon_lower_bound']:.2f}" for r in records)
        chosen = ", ".join(sorted({r["audit"]["attack"] for r in records}))
        spent = ", ".join(f"{r['spent_epsilon']:.2f}" for r in records if r["spent_epsilon"] is not None) or "∞ (no DP)"
        lines.append(f"| {flag} | {bounds} | {chosen} | {spent} |")
    return "\n".join(lines) + "\n"


def best_attack(records: list[dict]) -> str:
    """The attack with the highest mean TPR at 1 % FPR on all targets."""
    return max(attacks_run(records),
               key=lambda a: np.mean([r["attacks"][a]["all"]["tpr_at_fpr_0.01"] for r in records]))


def roc_figure(results: dict[str, list[dict]], path: Path) -> None:
    """Log-log ROC of each release's best attack, TPR averaged over seeds on a grid of FPRs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 5))
    for flag, records in results.items():
        attack = best_attack(records)
        curves = []
        for record in records:
            fpr, tpr = roc_curve(np.array(record["members"]), np.array(record["scores"][attack]))
            # the best TPR reachable at each grid FPR (a step function, as tpr_at_fpr)
            curves.append([tpr[fpr <= level].max() for level in ROC_GRID])
        axes.plot(ROC_GRID, np.maximum(np.mean(curves, axis=0), 1e-3), label=f"{flag} ({attack})")
    axes.plot(ROC_GRID, ROC_GRID, "k:", label="chance")
    axes.set(xscale="log", yscale="log", xlim=(1e-3, 1), ylim=(1e-3, 1.05), xlabel="false-positive rate",
             ylabel="true-positive rate", title="Membership inference, best attack per release")
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def write_attack_report(paths: list[Path], out_dir: Path) -> str:
    """attack.md, attack.csv and attack_roc.png in `out_dir`; returns the markdown."""
    results = load_results(paths)
    table, csv = attack_table(results)
    text = ("Membership inference (python -m src.attack): percent, mean ± std over seeds; exposed = the 5 % of "
            f"targets farthest from their real neighbours.\n\n{table}\nEmpirical epsilon lower bounds "
            f"(Clopper-Pearson, 95 %):\n\n{audit_table(results)}")
    for name, content in (("attack.md", text), ("attack.csv", csv)):
        with atomic_path(Path(out_dir) / name) as tmp:
            tmp.write_text(content)
    roc_figure(results, Path(out_dir) / "attack_roc.png")
    return text
