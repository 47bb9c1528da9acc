"""RSNA Pneumonia Detection Challenge (2018): 26,684 frontal DICOMs from ChestX-ray14, opacity boxes.

Layout under --root (the challenge's stage 2 files):

    stage_2_train_labels.csv          patientId, x, y, width, height, Target (one row per box; Target 0 rows
                                      have no box)
    stage_2_detailed_class_info.csv   patientId, class: "Lung Opacity" | "No Lung Opacity / Not Normal" | "Normal"
                                      (optional)
    stage_2_train_images/<patientId>.dcm   (stage_2_test_images has no labels and is not used)

Boxes (x, y, width, height in the DICOM's pixels) are "lung opacities suspicious for pneumonia": each becomes
a grounding box of the phrase "lung opacity". Labels: Target 1 -> Lung Opacity 1 and Pneumonia -1 (the
readers marked opacities that may be pneumonia, not a diagnosis); Target 0 -> Lung Opacity 0 and Pneumonia 0;
class "Normal" -> No Finding 1, "No Lung Opacity / Not Normal" -> No Finding 0 (another abnormality is seen).
Each certain label is also asked as a closed question (cxrfm.data.sources.derived). The view (PA / AP) is
read from each DICOM's ViewPosition; an image without one is taken as frontal PA and flagged. One image per
patientId; patient_split 0.8/0.1/0.1 on patientId.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from cxrfm.data.schema import GroundedPhrase, ImageRef, Study
from cxrfm.data.sources.base import BuildReport, StudyRecord, patient_split, read_table, safe_key
from cxrfm.data.sources.base import Converter as BaseConverter
from cxrfm.data.sources.boxes import fit_box
from cxrfm.data.sources.derived import dicom_header, label_questions

LAYOUTS = ("stage_2_train_labels.csv (patientId, x, y, width, height, Target) with stage_2_train_images/<patientId>.dcm "
           "(stage_1_train_labels.csv with stage_1_train_images/ also works)")
STAGES = (("stage_2_train_labels.csv", "stage_2_train_images", "stage_2_detailed_class_info.csv"),
          ("stage_1_train_labels.csv", "stage_1_train_images", "stage_1_detailed_class_info.csv"))
PHRASE = "lung opacity"


class Converter(BaseConverter):
    name = "rsna_pneumonia"
    license = "RSNA Pneumonia Detection Challenge data: non-commercial research use (NIH ChestX-ray14 images)"
    layouts = LAYOUTS

    def scan(self, root: Path, report: BuildReport) -> list[StudyRecord]:
        root = Path(root)
        stage = next((s for s in STAGES if (root / s[0]).is_file()), None)
        if stage is None:
            raise FileNotFoundError(f"{root}: no RSNA Pneumonia label file; accepted layouts: {LAYOUTS}")
        labels_csv, image_dir, detail_csv = stage
        report.note("rsna_label_file", labels_csv)
        detail = {r.get("patientId", "").strip(): r.get("class", "").strip()
                  for r in (read_table(root / detail_csv) if (root / detail_csv).is_file() else [])}
        boxes: dict[str, list] = defaultdict(list)
        target: dict[str, int] = {}
        for i, row in enumerate(read_table(root / labels_csv)):
            pid = (row.get("patientId") or "").strip()
            try:
                t = int(float(row.get("Target") or "nan"))
            except ValueError:
                report.skip("bad_row", f"{labels_csv} row {i + 2}", f"Target {row.get('Target')!r} is not 0 or 1")
                continue
            target[pid] = max(target.get(pid, 0), t)
            if t == 1:
                try:
                    x, y, w, h = (float(row[k]) for k in ("x", "y", "width", "height"))
                except (KeyError, TypeError, ValueError):
                    report.skip("bad_row", f"{labels_csv} row {i + 2}", "Target 1 without numeric x, y, width, height")
                    continue
                boxes[pid].append([x, y, x + w, y + h])
        records = []
        for pid in sorted(target):
            path = root / image_dir / f"{pid}.dcm"
            if not path.is_file():
                report.skip("image_missing_file", pid, f"{path} not found")
                continue
            header = dicom_header(path)
            view = header.get("view") or ""
            if view not in ("PA", "AP"):
                report.flag("view_not_in_dicom", pid, f"ViewPosition {view or 'absent'}; taken as frontal PA")
                view = "PA"
            labels = {"Lung Opacity": target[pid], "Pneumonia": -1 if target[pid] else 0}
            if detail.get(pid) == "Normal":
                labels["No Finding"] = 1
            elif detail.get(pid):
                labels["No Finding"] = 0
            records.append(StudyRecord(safe_key(self.name, pid), pid, patient_split(f"rsna-{pid}", (0.8, 0.1, 0.1)),
                                       payload={"path": str(path), "view": view, "boxes": boxes.get(pid, []),
                                                "labels": labels, "class": detail.get(pid, "")}))
        return records

    def load(self, record: StudyRecord, report: BuildReport) -> tuple[Study, dict[str, np.ndarray]] | None:
        p = record.payload
        img = self.read(p["path"], record.study_id, report)
        if img is None:
            return None
        height, width = img.shape
        fitted = [b for b in (fit_box(*xyxy, width, height, report, record.study_id) for xyxy in p["boxes"]) if b]
        if p["boxes"] and not fitted:
            report.skip("phrase_without_boxes", record.study_id, "every opacity box was outside the image")
        grounding = [GroundedPhrase(phrase=PHRASE, label="Lung Opacity", boxes=fitted)] if fitted else []
        study = Study(study_id=record.study_id, patient_id=record.patient_id, split=record.split, source=self.name,
                      license=self.license, images=[ImageRef(role="frontal", key="frontal.png", view=p["view"],
                                                             width=width, height=height)],
                      labels=p["labels"], source_labels={"class": p["class"]} if p["class"] else {},
                      grounding=grounding, vqa=label_questions(p["labels"]))
        return study, {"frontal": img}
