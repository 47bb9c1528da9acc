"""`cxrfm labeler score CSV` through the real CLI on a small labeled-report CSV."""

from __future__ import annotations

import csv
import json
import math

import pytest

from cxrfm.cli import main
from cxrfm.data.schema import CHEXPERT_LABELS


def write_labeled(path, rows):
    """rows: (report text, {observation: value}); other observations blank."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Report Impression", *CHEXPERT_LABELS])
        for text, labels in rows:
            w.writerow([text, *(labels.get(name, "") for name in CHEXPERT_LABELS)])


def test_score_prints_per_class_and_micro_f1(tmp_path, capsys):
    rows = [
        ("Small left pleural effusion.", {"Pleural Effusion": 1}),  # labeler: effusion 1 -> TP
        ("No pleural effusion.", {"Pleural Effusion": 1}),  # truth says 1, labeler 0 -> FN (and a negative FP)
        ("Mild cardiomegaly.", {"Cardiomegaly": 1}),  # TP
        ("Possible pneumothorax.", {"Pneumothorax": 0}),  # labeler -1: not a positive either way
    ]
    write_labeled(tmp_path / "labeled.csv", rows)
    assert main(["labeler", "score", str(tmp_path / "labeled.csv"), "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "micro (positive, 14 labels)" in out and "Pleural Effusion" in out
    result = json.loads((tmp_path / "s.json").read_text())
    pe = result["labels"]["Pleural Effusion"]["positive"]
    assert (pe["precision"], pe["recall"], pe["support"]) == (1.0, 0.5, 2)
    assert math.isclose(pe["f1"], 2 / 3)
    assert result["labels"]["Pleural Effusion"]["negative"]["f1"] == 0.0  # a 0 the truth does not have
    # positives pooled over the 14: TP effusion, cardiomegaly; FN effusion; No Finding is 1 for the
    # "No pleural effusion." report but blank in the truth -> FP
    assert (result["micro"]["precision"], result["micro"]["recall"]) == (2 / 3, 2 / 3)
    assert result["reports"] == 4


def test_bad_csv_names_the_column_and_row(tmp_path, capsys):
    (tmp_path / "nolabels.csv").write_text("report,Edema\nNo edema.,0\n")
    assert main(["labeler", "score", str(tmp_path / "nolabels.csv")]) == 2
    assert "label column(s)" in capsys.readouterr().err
    write_labeled(tmp_path / "bad.csv", [("Edema.", {"Edema": "yes please"})])
    assert main(["labeler", "score", str(tmp_path / "bad.csv")]) == 2
    err = capsys.readouterr().err
    assert "row 2 column 'Edema'" in err and "'yes please'" in err
    (tmp_path / "notext.csv").write_text(",".join(["id", *CHEXPERT_LABELS]) + "\n")
    assert main(["labeler", "score", str(tmp_path / "notext.csv")]) == 2
    assert "--text-column" in capsys.readouterr().err


@pytest.mark.parametrize("column", ["Reports", "report"])
def test_text_column_is_found_or_named(tmp_path, column, capsys):
    path = tmp_path / "r.csv"
    path.write_text(",".join([column, *CHEXPERT_LABELS]) + "\nMild cardiomegaly.,,,1" + "," * 11 + "\n")
    assert main(["labeler", "score", str(path)]) == 0
    assert "Cardiomegaly" in capsys.readouterr().out
