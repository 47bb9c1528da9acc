"""Split rules shared by converters whose official split is per question or per row, not per patient."""

from __future__ import annotations

from cxrfm.data.sources.base import BuildReport, StudyRecord

# How held out a split is: when one item is listed in several, it goes to the most held-out one, so
# evaluation data never leaks into training.
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


def most_held_out(splits) -> str:
    return max(splits, key=SPLIT_ORDER.__getitem__)


def keep_patients_in_one_split(records: list[StudyRecord], report: BuildReport) -> list[StudyRecord]:
    """Where a corpus's official split puts one patient in several splits, move all of them to the most
    held-out one (test > val > train) so no patient crosses splits; each moved study is counted."""
    worst: dict[str, str] = {}
    for r in records:
        if r.patient_id not in worst or SPLIT_ORDER[r.split] > SPLIT_ORDER[worst[r.patient_id]]:
            worst[r.patient_id] = r.split
    for r in records:
        target = worst[r.patient_id]
        if r.split != target:
            report.flag("patient_in_several_splits_moved", r.study_id,
                        f"patient {r.patient_id} also has studies in {target!r}; moved from {r.split!r} (kept)")
            r.split = target
    return records
