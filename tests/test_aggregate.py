"""The aggregator: seed means and sample stds against hand computations, layout, bad input."""
import csv
import json
import math
import sys
from pathlib import Path

import pytest

from src.aggregate import aggregate, find_results, load_results, main, summarise
from src.cli import UserError, run_cli


def write_result(folder: Path, name: str, auc: float, **metrics: float) -> Path:
    """A result file as the probe scripts write it: metrics at top level plus settings and inputs."""
    path = folder / name.split("_")[0] / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auc": auc, **metrics, "settings": {"seed": 0}, "inputs": {}}))
    return path


@pytest.fixture
def results(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    for seed, auc, distance in [(0, 90.0, 1.0), (1, 92.0, 2.0), (2, 97.0, 6.0)]:
        write_result(folder, f"digits_identity-s{seed}", auc, average_mindistance=distance, mia_auc=0.5)
        write_result(folder, f"digits_ksame-5-s{seed}", auc - 10, average_mindistance=distance + 1)
        write_result(folder, f"digits_identity-s{seed}_sigma-2", auc - 20)
    write_result(folder, "breastmnist_cvae-s42", 70.0, average_mindistance=3.5)
    write_result(folder, "breastmnist_cvae-online-v1-s42_sigma-0", 71.0)
    write_result(folder, "breastmnist_cvae-online-v0.5-s42_sigma-0", 72.0)
    return folder


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_means_and_sample_stds_match_hand_computation(results: Path, tmp_path: Path):
    out = tmp_path / "tables"
    aggregate(find_results(results), out)
    # identity AUC 90, 92, 97: mean 93, deviations -3, -1, 4, sample variance (9 + 1 + 16) / 2 = 13
    summary = {(r["dataset"], r["anonymizer"], r["sigma"], r["metric"]): r for r in read_csv(out / "summary.csv")}
    row = summary[("digits", "identity", "0", "auc")]
    assert float(row["mean"]) == pytest.approx(93.0) and float(row["std"]) == pytest.approx(math.sqrt(13))
    assert row["n"] == "3"
    # distances 1, 2, 6: mean 3, sample variance (4 + 1 + 9) / 2 = 7
    row = summary[("digits", "identity", "0", "average_mindistance")]
    assert float(row["mean"]) == pytest.approx(3.0) and float(row["std"]) == pytest.approx(math.sqrt(7))
    assert float(summary[("digits", "ksame-5", "0", "auc")]["mean"]) == pytest.approx(83.0)
    assert float(summary[("digits", "identity", "2", "auc")]["mean"]) == pytest.approx(73.0)
    single = summary[("breastmnist", "cvae", "0", "auc")]
    assert (single["mean"], single["std"], single["n"]) == ("70.0", "", "1")

    markdown = (out / "auc_sigma-0.md").read_text().splitlines()
    assert markdown[0] == "| dataset | identity | ksame-5 | cvae | cvae-online-v0.5 | cvae-online |"
    # rows in order of the (sorted) result paths
    assert markdown[2] == "| breastmnist | – | – | 70.00 (n=1) | 72.00 (n=1) | 71.00 (n=1) |"
    assert markdown[3] == "| digits | 93.00 ± 3.61 | 83.00 ± 3.61 | – | – | – |"
    wide = read_csv(out / "auc_sigma-0.csv")
    assert wide[1]["dataset"] == "digits" and float(wide[1]["identity_std"]) == pytest.approx(math.sqrt(13))
    assert wide[0]["cvae_n"] == "1" and wide[0]["identity_n"] == "0"
    latex = (out / "auc_sigma-0.tex").read_text()
    assert r"digits & $93.00 \pm 3.61$ & $83.00 \pm 3.61$ & -- & -- & -- \\" in latex
    assert (out / "average_mindistance_sigma-0.md").read_text().splitlines()[3].startswith("| digits | 3.000 ± 2.646 |")
    assert (out / "auc_sigma-2.md").is_file() and not (out / "mia_auc_sigma-2.md").exists()


def test_one_dataset_prints_anonymizers_as_rows(tmp_path: Path):
    folder = tmp_path / "results"
    for seed, auc in [(0, 80.0), (1, 84.0)]:
        write_result(folder, f"digits_identity-s{seed}", auc, average_mindistance=0.0, mia_auc=0.6)
        write_result(folder, f"digits_cvae-s{seed}", auc - 4, average_mindistance=2.0, mia_auc=0.5)
    text = aggregate(find_results(folder), tmp_path / "tables")
    assert "| anonymizer | auc | average_mindistance | mia_auc |" in text
    # 80 and 84: mean 82, sample std sqrt(8)
    assert f"| identity | 82.00 ± {math.sqrt(8):.2f} | 0.000 ± 0.000 | 0.600 ± 0.000 |" in text
    assert (tmp_path / "tables" / "report.md").read_text() == text


def test_plain_probe_wins_over_sigma_zero_and_true_duplicates_are_refused(tmp_path: Path):
    plain = write_result(tmp_path / "a", "digits_identity-s0", 90.0)
    noisy = write_result(tmp_path / "a", "digits_identity-s0_sigma-0", 80.0)
    chosen = load_results([noisy, plain])
    assert [result.path for result in chosen] == [plain]
    assert summarise(chosen)[0].mean == 90.0
    copy = write_result(tmp_path / "b", "digits_identity-s0", 91.0)
    with pytest.raises(UserError, match="two results for the same run"):
        load_results([plain, copy])


def test_names_with_unreadable_numbers_are_not_results(tmp_path: Path):
    kept = write_result(tmp_path, "digits_cvae-online-v0.5-s0_sigma-1e-05", 90.0)
    write_result(tmp_path, "digits_cvae-online-vx-s0", 90.0)
    write_result(tmp_path, "digits_identity-s0_sigma-abc", 90.0)
    assert find_results(tmp_path) == [kept]
    (result,) = load_results([kept])
    assert (result.anonymizer, result.sigma) == ("cvae-online-v0.5", 1e-05)


def test_figures_are_png_files(results: Path, tmp_path: Path):
    pytest.importorskip("matplotlib")
    aggregate(find_results(results), tmp_path / "tables")
    for name in ("auc_vs_sigma_digits.png", "privacy_utility.png"):
        assert (tmp_path / "tables" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "tables" / "auc_vs_sigma_breastmnist.png").exists()  # one sigma: no curve


@pytest.mark.parametrize("content, message", [
    (None, "no result files"),
    ("{not json", "cannot read result"),
    ('{"accuracy": 0.5}', "no numeric 'auc'"),
])
def test_bad_results_exit_2_with_one_line(tmp_path: Path, monkeypatch, capsys, content, message):
    if content is not None:
        (tmp_path / "digits").mkdir()
        (tmp_path / "digits" / "digits_identity-s0.json").write_text(content)
    monkeypatch.setattr(sys, "argv", ["aggregate", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1


def test_unwritable_output_folder_exits_2(results: Path, tmp_path: Path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(sys, "argv", ["aggregate", str(results), "--out", str(blocker / "tables")])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    assert exit_info.value.code == 2 and "cannot write to" in capsys.readouterr().err


def test_tables_mixing_code_versions_carry_a_warning(tmp_path: Path, capsys):
    folder = tmp_path / "results"
    for seed, version in [(0, "git:aaaaaaaaaaaa"), (1, "git:aaaaaaaaaaaa"), (2, "git:bbbbbbbbbbbb-dirty")]:
        path = write_result(folder, f"digits_identity-s{seed}", 90.0 + seed)
        path.write_text(json.dumps({**json.loads(path.read_text()), "code_version": version}))
    text = aggregate(find_results(folder), tmp_path / "tables")
    assert "mix results of 2 code versions" in text and "git:aaaaaaaaaaaa (2 files)" in text
    assert "--rerun-other-code" in capsys.readouterr().err
    (folder / "digits" / "digits_identity-s2.json").unlink()
    assert "code versions" not in aggregate(find_results(folder), tmp_path / "tables")


def test_noise_units_get_tables_of_their_own(tmp_path: Path):
    folder = tmp_path / "results"
    for seed in (0, 1):
        write_result(folder, f"digits_cvae-s{seed}", 95.0)
        write_result(folder, f"digits_cvae-s{seed}_sigma-4", 88.0 + seed)
        real = write_result(folder, f"digits_cvae-s{seed}_sigma-4-real", 80.0 + seed)
        real.write_text(json.dumps({**json.loads(real.read_text()), "noise_units": "real"}))
    text = aggregate(find_results(folder), tmp_path / "tables")
    assert "auc against test noise, noise in each released set's z-units" in text
    assert "| cvae | 95.00 ± 0.00 | 88.50 ± 0.71 |" in text and "| cvae | 95.00 ± 0.00 | 80.50 ± 0.71 |" in text
    assert (tmp_path / "tables" / "auc_sigma-4-real.md").read_text().splitlines()[2] == "| digits | 80.50 ± 0.71 |"


def test_dp_curve_has_a_row_per_method_and_a_column_per_epsilon(tmp_path: Path):
    folder = tmp_path / "results"
    for seed in (0, 1):
        write_result(folder, f"fm_identity-s{seed}", 98.0 + seed, accuracy=86.0)
        write_result(folder, f"fm_lsq-s{seed}", 97.0, accuracy=84.0, probe_train_s=0.5)
        for epsilon, auc in ((1, 90.0), (8, 95.0)):
            write_result(folder, f"fm_lsq-dp{epsilon}-s{seed}", auc + seed, accuracy=auc - 10, probe_train_s=0.25)
            write_result(folder, f"fm_gauss-dp{epsilon}-s{seed}", auc - 2, accuracy=auc - 12, release_s=1.0)
    write_result(folder, "fm_ksame-5-s0", 80.0)  # no DP version: not on the curve
    out = tmp_path / "tables"
    report = aggregate(find_results(folder), out)
    table = (out / "dp_curve.md").read_text()
    assert "### fm: auc against epsilon" in report
    auc = table.split("### fm: accuracy")[0].splitlines()
    assert auc[2] == "| method | eps=1 | eps=8 | no DP |"
    assert auc[4:7] == ["| identity | – | – | 98.50 ± 0.71 |", "| gauss | 88.00 ± 0.00 | 93.00 ± 0.00 | – |",
                        "| lsq | 90.50 ± 0.71 | 95.50 ± 0.71 | 97.00 ± 0.00 |"]
    assert "ksame" not in table and "### fm: probe_train_s against epsilon" in table
    if "matplotlib" in sys.modules or __import__("importlib").util.find_spec("matplotlib"):
        assert (out / "dp_curve_fm.png").is_file()
