"""CheXpert v1.0 and CheXpert-v1.0-small (Stanford ML Group): 224,316 radiographs, 14 labels, no report text.

Layouts accepted under --root (either the dataset folder or the folder holding it):

    CheXpert-v1.0-small/train.csv   Path, Sex, Age, Frontal/Lateral, AP/PA, No Finding, ..., Support Devices
    CheXpert-v1.0-small/valid.csv   the same columns (200 studies labelled by radiologists)
    CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg
    (CheXpert-v1.0/ is the full-resolution release with the same files)

Path starts with the release folder's name ("CheXpert-v1.0-small/train/..."), so images are looked up
relative to the folder that holds it. A study is patientNNNNN/studyN; its frontal is the first PA (else
AP) image and its lateral the first lateral, per the Frontal/Lateral and AP/PA columns; a study whose
only images are laterals keeps them as laterals. A frontal whose AP/PA is blank is taken as PA and
flagged "frontal_projection_unknown".

Labels are per image (the labeler ran on the study's report, so the views of a study agree; where they do
not, positive > uncertain > negative). 1 / 0 / -1 are kept as they are (uncertain stays uncertain);
blank is not mentioned. There is no text, so each certain label also becomes a closed question
(cxrfm.data.sources.derived). Splits: train.csv is train, valid.csv is val (the official test set is
not part of these releases). Patients are CheXpert's own patient folders, disjoint between the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxrfm.data.schema import CHEXPERT_LABELS
from cxrfm.data.sources.base import (BuildReport, StudyRecord, choose_views, normalize_view, read_table, safe_key)
from cxrfm.data.sources.base import Converter as BaseConverter
from cxrfm.data.sources.chexpert_plus import map_to_chexpert_many, study_key
from cxrfm.data.sources.derived import label_questions

RELEASES = ("CheXpert-v1.0-small", "CheXpert-v1.0")
LAYOUTS = ("CheXpert-v1.0-small/ or CheXpert-v1.0/ holding train.csv and valid.csv (Path, Frontal/Lateral, "
           "AP/PA and the 14 label columns) and the train/ and valid/ image folders; --root may be that folder "
           "or the one above it")
TABLES = {"train.csv": "train", "valid.csv": "val"}


def find_release(root: Path) -> Path | None:
    """The folder holding train.csv/valid.csv: root itself or one of the release folders below it."""
    for d in (root, *(root / name for name in RELEASES)):
        if any((d / t).is_file() for t in TABLES):
            return d
    return None


class Converter(BaseConverter):
    name = "chexpert"
    license = "Stanford University School of Medicine CheXpert Dataset Research Use Agreement"
    layouts = LAYOUTS

    def _image(self, release: Path, rel: str) -> Path:
        rel_path = Path(rel.replace("\\", "/"))
        if rel_path.parts and rel_path.parts[0] in RELEASES:  # "CheXpert-v1.0-small/train/..."
            return release.parent / rel_path
        return release / rel_path

    def scan(self, root: Path, report: BuildReport) -> list[StudyRecord]:
        release = find_release(Path(root))
        if release is None:
            raise FileNotFoundError(f"{root}: no CheXpert train.csv / valid.csv found; accepted layouts: {LAYOUTS}")
        report.note("chexpert_release", release.name)
        studies: dict[tuple[str, str], dict] = {}
        for table, split in TABLES.items():
            if not (release / table).is_file():
                report.note(f"chexpert_{table}", "missing")
                continue
            rows = read_table(release / table)
            missing = [c for c in ("Path", "Frontal/Lateral", *CHEXPERT_LABELS) if rows and c not in rows[0]]
            if missing:
                raise ValueError(f"{release / table}: columns {missing} missing; expected CheXpert's Path, Sex, Age, "
                                 f"Frontal/Lateral, AP/PA and the 14 label columns")
            for row in rows:
                rel = (row.get("Path") or "").strip()
                key = study_key(rel)
                if key is None:
                    report.skip("row_without_study_path", rel or "?", "Path must contain patientN/studyN/")
                    continue
                s = studies.setdefault(key, {"split": split, "images": [], "labels": {}})
                for name in CHEXPERT_LABELS:
                    v = row.get(name)
                    if v not in (None, "") and str(v).lower() != "nan":
                        s["labels"].setdefault(name, []).append(v)
                path = self._image(release, rel)
                if not path.is_file():
                    report.skip("image_missing_file", rel, f"{path} not found")
                    continue
                if row.get("Frontal/Lateral", "").strip().lower() == "lateral":
                    view = "LATERAL"
                else:
                    view = normalize_view(row.get("AP/PA"))
                    if view not in ("PA", "AP"):
                        report.flag("frontal_projection_unknown", rel, f"AP/PA={row.get('AP/PA')!r}; taken as PA")
                        view = "PA"
                s["images"].append((str(path), view))
        records = []
        for (patient, study), s in sorted(studies.items()):
            sid = safe_key(self.name, patient, study)
            views = choose_views(sorted(s["images"]))
            if not views:
                report.skip("study_without_usable_image", sid, "none of its images was found")
                continue
            if "frontal" not in views:
                report.flag("study_lateral_only", sid, "kept with its lateral view only")
            try:
                labels = map_to_chexpert_many(s["labels"])
            except ValueError as e:
                report.skip("label_unreadable", sid, str(e))
                continue
            records.append(StudyRecord(sid, patient, s["split"], payload={
                "views": {role: list(pv) for role, pv in views.items()}, "labels": labels}))
        return records

    def study_fields(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"labels": payload["labels"], "vqa": label_questions(payload["labels"]),
                "source_labels": {k: str(v) for k, v in payload["labels"].items()}}
