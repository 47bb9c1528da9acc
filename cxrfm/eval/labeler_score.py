"""The rule labeler scored against a user's own labeled reports (`cxrfm labeler score CSV`; the command: cli.py).

The CSV has one row per report: a report text column and the 14 CheXpert label columns, each 1
(positive), 0 (negative), -1 (uncertain) or blank (not mentioned), the way CheXpert's labeler writes its
output. The labeler reads every report and is scored per observation, the way the CheXpert paper scores
its labeler, one F1 per kind of mention:
  - positive: precision / recall / F1 of "labeled 1" (the truth's 1s are the positives);
  - negative and uncertain: F1 of "labeled 0" and of "labeled -1" the same way;
  - micro-F1 pools the positive counts of all observations (No Finding included).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from cxrfm.data.schema import CHEXPERT_LABELS

# Report text columns, in the order they are tried: CheXpert labeler input/output, MIMIC-style exports.
TEXT_COLUMNS = ("Report Impression", "Reports", "report", "Report", "text", "report_text", "impression", "findings")
VALUES = {1: "positive", 0: "negative", -1: "uncertain"}


class ScoreInputError(ValueError):
    """The CSV cannot be scored; the message names the file, the row or the column, and what to change."""


def _value(raw: str, where: str) -> int | None:
    text = (raw or "").strip().lower()
    if text in ("", "nan", "none"):
        return None
    try:
        number = float(text)
    except ValueError:
        number = None
    if number in (1.0, 0.0, -1.0):
        return int(number)
    raise ScoreInputError(f"{where}: label value {raw!r} is not 1, 0, -1 or blank")


def read_labeled_reports(path: str | Path, text_column: str | None = None) -> tuple[list[str], list[dict[str, int]]]:
    """(report texts, {observation: value} per report) from a labeled-report CSV."""
    path = Path(path)
    if not path.is_file():
        raise ScoreInputError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        if text_column is None:
            text_column = next((c for c in TEXT_COLUMNS if c in columns), None)
        if text_column is None or text_column not in columns:
            raise ScoreInputError(f"{path}: no report text column (looked for {text_column or list(TEXT_COLUMNS)}); "
                                  f"the columns are {columns}; name it with --text-column")
        missing = [c for c in CHEXPERT_LABELS if c not in columns]
        if missing:
            raise ScoreInputError(f"{path}: label column(s) {missing} missing; the CSV needs all 14 CheXpert columns "
                                  f"{list(CHEXPERT_LABELS)} (blank cells mean not mentioned)")
        texts, truth = [], []
        for i, row in enumerate(reader):
            texts.append(row[text_column] or "")
            labels = {}
            for name in CHEXPERT_LABELS:
                v = _value(row[name], f"{path} row {i + 2} column {name!r}")
                if v is not None:
                    labels[name] = v
            truth.append(labels)
    if not texts:
        raise ScoreInputError(f"{path}: no report rows under the header")
    return texts, truth


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else math.nan
    r = tp / (tp + fn) if tp + fn else math.nan
    f = 2 * p * r / (p + r) if tp else (0.0 if fp + fn else math.nan)
    return p, r, f


def score(predicted: list[dict[str, int]], truth: list[dict[str, int]]) -> dict:
    """{"labels": {observation: {positive: {precision, recall, f1, support}, negative_f1, uncertain_f1}},
    "micro": {precision, recall, f1}} (NaN where a ratio is 0/0)."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted label sets but {len(truth)} true ones")
    out, pooled = {}, [0, 0, 0]
    for name in CHEXPERT_LABELS:
        row = {}
        for value, kind in VALUES.items():
            tp = sum(p.get(name) == value and t.get(name) == value for p, t in zip(predicted, truth))
            fp = sum(p.get(name) == value for p in predicted) - tp
            fn = sum(t.get(name) == value for t in truth) - tp
            prec, rec, f1 = _prf(tp, fp, fn)
            row[kind] = {"precision": prec, "recall": rec, "f1": f1, "support": tp + fn}
            if value == 1:
                pooled = [pooled[0] + tp, pooled[1] + fp, pooled[2] + fn]
        out[name] = row
    p, r, f = _prf(*pooled)
    return {"labels": out, "micro": {"precision": p, "recall": r, "f1": f, "support": pooled[0] + pooled[2]},
            "reports": len(truth)}


def format_score(result: dict) -> str:
    def num(x: float) -> str:
        return "     -" if math.isnan(x) else f"{x:6.3f}"

    lines = [f"labeler vs {result['reports']} labeled reports (positive = 1; negative / uncertain: F1 of 0 / -1)",
             f"{'observation':28s} {'prec':>6s} {'recall':>6s} {'F1':>6s} {'n':>5s} {'neg F1':>6s} {'n':>5s} "
             f"{'unc F1':>6s} {'n':>5s}"]
    for name, row in result["labels"].items():
        pos, neg, unc = row["positive"], row["negative"], row["uncertain"]
        lines.append(f"{name:28s} {num(pos['precision'])} {num(pos['recall'])} {num(pos['f1'])} {pos['support']:5d} "
                     f"{num(neg['f1'])} {neg['support']:5d} {num(unc['f1'])} {unc['support']:5d}")
    m = result["micro"]
    lines.append(f"{'micro (positive, 14 labels)':28s} {num(m['precision'])} {num(m['recall'])} {num(m['f1'])} "
                 f"{m['support']:5d}")
    return "\n".join(lines)
