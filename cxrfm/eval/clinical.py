"""Clinical efficacy (CE) of generated reports, and the per-label scores of the labeler itself.

`clinical_efficacy` labels generated and reference reports with cxrfm.eval.labeler and scores the
generated labels against the reference ones, the way R2Gen, M4CXR and Miura et al. (2021) report CE:
  - positive (1) is positive; negative (0), uncertain (-1) and not mentioned are all negative;
  - micro precision / recall / F1 pool true and false positives over labels and reports;
  - macro ones average the per-label scores;
  - over the 14 CheXpert observations (No Finding included) and over the 5 of the literature
    (atelectasis, cardiomegaly, consolidation, edema, pleural effusion).
A label with no positive in either list has undefined (0/0) scores; it is left out of the macro mean
(scikit-learn's zero_division=0 would count it as 0 and make identical lists score below 1). Where
nothing at all is positive, both lists agree completely and every score is 1.0. A label positive on
one side only scores 0 for the undefined side, as in scikit-learn.

`per_label_pr` scores the labeler's three-way output against hand-made truth: per label, a mention is
correct when its value (1 / 0 / -1) equals the truth's; precision = correct / mentions predicted,
recall = correct / mentions in the truth, support = mentions in the truth. Mentioning a label the
truth leaves out costs precision; missing one, or giving it the wrong value, costs recall (and
precision, when it was mentioned).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from cxrfm.data.schema import CHEXPERT_LABELS
from cxrfm.eval.labeler import label_report

CE5_LABELS: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0  # nothing positive on either side: complete agreement
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def ce_scores(
    predicted: Sequence[dict[str, int]], truth: Sequence[dict[str, int]], labels=CHEXPERT_LABELS
) -> dict[str, float]:
    """Micro and macro precision / recall / F1 of positive labels over `labels` (label dicts given)."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted label sets but {len(truth)} true ones")
    counts = {}
    for name in labels:
        pos_p = [p.get(name) == 1 for p in predicted]
        pos_t = [t.get(name) == 1 for t in truth]
        tp = sum(a and b for a, b in zip(pos_p, pos_t))
        counts[name] = (tp, sum(pos_p) - tp, sum(pos_t) - tp)
    micro = _prf(*(sum(c[i] for c in counts.values()) for i in range(3)))
    defined = [_prf(*c) for c in counts.values() if sum(c) > 0]
    macro = tuple(sum(s[i] for s in defined) / len(defined) for i in range(3)) if defined else (1.0, 1.0, 1.0)
    out = {}
    for kind, (p, r, f) in (("micro", micro), ("macro", macro)):
        out.update({f"{kind}_precision": p, f"{kind}_recall": r, f"{kind}_f1": f})
    return out


def clinical_efficacy(generated: list[str], references: list[str]) -> dict[str, float]:
    """CE of generated vs reference reports: keys ce14/{micro,macro}_{precision,recall,f1} and the
    same under ce5/. Positive = labeler value 1; 0, -1 and unmentioned count as negative."""
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generated reports but {len(references)} references")
    if not generated:
        raise ValueError("clinical_efficacy needs at least one report")
    predicted = [label_report(g) for g in generated]
    truth = [label_report(r) for r in references]
    out: dict[str, float] = {}
    for group, labels in (("ce14", CHEXPERT_LABELS), ("ce5", CE5_LABELS)):
        out.update({f"{group}/{k}": v for k, v in ce_scores(predicted, truth, labels).items()})
    return out


def per_label_pr(predicted: list[dict], truth: list[dict]) -> dict[str, tuple[float, float, int]]:
    """{label: (precision, recall, support)} of three-way labels; NaN where a ratio is 0/0. Only labels
    that the predictions or the truth mention appear."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted label sets but {len(truth)} true ones")
    out = {}
    for name in CHEXPERT_LABELS:
        n_pred = sum(name in p for p in predicted)
        n_true = sum(name in t for t in truth)
        if n_pred == 0 and n_true == 0:
            continue
        correct = sum(name in p and name in t and p[name] == t[name] for p, t in zip(predicted, truth))
        out[name] = (
            correct / n_pred if n_pred else math.nan,
            correct / n_true if n_true else math.nan,
            n_true,
        )
    return out


def format_pr_table(pr: dict[str, tuple[float, float, int]], title: str = "") -> str:
    """The per_label_pr result as a fixed-width text table (for test output and the bench)."""

    def num(x: float) -> str:
        return "   -  " if math.isnan(x) else f"{x:6.3f}"

    lines = [title] if title else []
    lines.append(f"{'label':28s} {'prec':>6s} {'recall':>6s} {'support':>7s}")
    for name, (p, r, n) in pr.items():
        lines.append(f"{name:28s} {num(p)} {num(r)} {n:7d}")
    return "\n".join(lines)
