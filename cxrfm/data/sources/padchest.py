"""PadChest (BIMCV, Hospital San Juan de Alicante): 160K radiographs with Spanish reports and 174 findings.

Layout under --root:

    PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv   (any PADCHEST_chest_x_ray_images_labels_160K*.csv,
        optionally .gz) one row per image: ImageID, ImageDir, StudyDate_DICOM, StudyID, PatientID,
        Projection, ..., Report, MethodLabel, Labels ("['cardiomegaly', 'pleural effusion']"), ...
    <ImageDir>/<ImageID>        the 16-bit PNGs, in the numbered folders of the release (0/, 1/, ... 54/);
                                images found elsewhere below root are matched by name

The view of each image comes from the CSV's Projection: PA -> PA, AP / AP_horizontal -> AP, L -> LATERAL;
COSTAL (rib views), EXCLUDE and unknown projections are not used (counted). A study (StudyID) keeps its
first PA (else AP) as frontal and first lateral; a study with only a lateral keeps it as a lateral. The
report is the release's preprocessed Spanish text, kept as the findings (no impression section exists).
Labels are the release's findings mapped to the 14 CheXpert observations where one matches (MAPPING);
PadChest lists what is present, so mapped findings are 1, "normal" is No Finding 1, and findings that are
not listed are not mentioned (never 0). Every raw label is kept in source_labels["padchest_labels"].
Splits: patient_split on PatientID (PadChest publishes none); priors: the patient's previous study by date.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from cxrfm.data.sources.base import (BuildReport, StudyRecord, choose_views, link_prior_views, map_to_chexpert,
                                     patient_split, read_table, safe_key)
from cxrfm.data.sources.base import Converter as BaseConverter

TABLE_GLOB = "PADCHEST_chest_x_ray_images_labels_160K*.csv*"
LAYOUTS = ("PADCHEST_chest_x_ray_images_labels_160K*.csv (ImageID, ImageDir, StudyID, PatientID, Projection, Report, "
           "Labels) with the PNGs in its numbered ImageDir folders")
PROJECTIONS = {"PA": "PA", "AP": "AP", "AP_HORIZONTAL": "AP", "L": "LATERAL"}
# PadChest finding -> CheXpert observation (None: no counterpart, kept in source_labels only).
MAPPING: dict[str, str | None] = {
    "normal": "No Finding",
    "cardiomegaly": "Cardiomegaly",
    "mediastinal enlargement": "Enlarged Cardiomediastinum", "mediastinic lipomatosis": "Enlarged Cardiomediastinum",
    "superior mediastinal enlargement": "Enlarged Cardiomediastinum",
    "infiltrates": "Lung Opacity", "alveolar pattern": "Lung Opacity", "interstitial pattern": "Lung Opacity",
    "reticular interstitial pattern": "Lung Opacity", "ground glass pattern": "Lung Opacity",
    "reticulonodular interstitial pattern": "Lung Opacity", "increased density": "Lung Opacity",
    "nodule": "Lung Lesion", "multiple nodules": "Lung Lesion", "mass": "Lung Lesion", "pulmonary mass": "Lung Lesion",
    "lung metastasis": "Lung Lesion", "cavitation": "Lung Lesion",
    "pulmonary edema": "Edema", "vascular redistribution": None,
    "consolidation": "Consolidation",
    "pneumonia": "Pneumonia", "atypical pneumonia": "Pneumonia",
    "atelectasis": "Atelectasis", "laminar atelectasis": "Atelectasis", "lobar atelectasis": "Atelectasis",
    "segmental atelectasis": "Atelectasis", "total atelectasis": "Atelectasis", "round atelectasis": "Atelectasis",
    "pneumothorax": "Pneumothorax", "hydropneumothorax": "Pneumothorax",
    "pleural effusion": "Pleural Effusion", "loculated pleural effusion": "Pleural Effusion",
    "pleural thickening": "Pleural Other", "apical pleural thickening": "Pleural Other",
    "calcified pleural thickening": "Pleural Other", "pleural plaques": "Pleural Other",
    "calcified pleural plaques": "Pleural Other",
    "rib fracture": "Fracture", "clavicle fracture": "Fracture", "humeral fracture": "Fracture",
    "vertebral fracture": "Fracture", "callus rib fracture": "Fracture",
    "pacemaker": "Support Devices", "dual chamber device": "Support Devices", "single chamber device": "Support Devices",
    "electrical device": "Support Devices", "nsg tube": "Support Devices", "endotracheal tube": "Support Devices",
    "tracheostomy tube": "Support Devices", "central venous catheter": "Support Devices",
    "central venous catheter via jugular vein": "Support Devices",
    "central venous catheter via subclavian vein": "Support Devices",
    "reservoir central venous catheter": "Support Devices", "chest drain tube": "Support Devices",
    "heart valve present": "Support Devices", "artificial heart valve": "Support Devices",
    "sternotomy": "Support Devices", "surgery heart": "Support Devices", "aortic endoprosthesis": "Support Devices",
}


def parse_labels(text: str) -> list[str]:
    """"['normal', 'pleural effusion']" -> ["normal", "pleural effusion"] (lower case, stripped). ValueError if
    the cell is not a list literal."""
    text = (text or "").strip()
    if not text or text.lower() == "nan":
        return []
    value = ast.literal_eval(text)  # the release writes Python list literals; literal_eval runs no code
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"Labels cell {text[:60]!r} is not a list")
    return [str(v).strip().lower() for v in value if str(v).strip()]


class Converter(BaseConverter):
    name = "padchest"
    license = "PadChest Dataset Research Use Agreement (BIMCV)"
    layouts = LAYOUTS

    def scan(self, root: Path, report: BuildReport) -> list[StudyRecord]:
        root = Path(root)
        tables = sorted(root.glob(TABLE_GLOB))
        if not tables:
            raise FileNotFoundError(f"{root}: no PadChest label table; accepted layout: {LAYOUTS}")
        report.note("padchest_table", tables[-1].name)
        rows = read_table(tables[-1])
        by_name: dict[str, Path] | None = None
        studies: dict[str, dict] = {}
        for i, row in enumerate(rows):
            image, study = (row.get("ImageID") or "").strip(), (row.get("StudyID") or "").strip()
            if not image or not study:
                report.skip("bad_row", f"{tables[-1].name} row {i + 2}", "no ImageID or StudyID")
                continue
            s = studies.setdefault(study, {"row": row, "images": []})
            projection = (row.get("Projection") or "").strip().upper()
            view = PROJECTIONS.get(projection)
            if view is None:
                report.skip("image_projection_not_used", image, f"Projection {projection!r} is not PA, AP or L")
                continue
            path = root / (row.get("ImageDir") or "").strip() / image
            if not path.is_file():
                if by_name is None:  # the release's folders may have been flattened or renamed
                    by_name = {p.name: p for p in root.rglob("*.png")}
                path = by_name.get(image)
            if path is None:
                report.skip("image_missing_file", image, f"not found in {row.get('ImageDir')!r} or below {root}")
                continue
            s["images"].append((str(path), view))
        records = []
        for study, s in sorted(studies.items()):
            row, sid = s["row"], safe_key(self.name, study)
            views = choose_views(s["images"])
            if not views:
                report.skip("study_without_usable_image", sid, f"{len(s['images'])} usable images")
                continue
            if "frontal" not in views:
                report.flag("study_lateral_only", sid, "kept with its lateral view only")
            report_text = " ".join((row.get("Report") or "").split())
            if not report_text:
                report.skip("report_without_findings_or_impression", sid, "empty Report")
                continue
            try:
                raw = parse_labels(row.get("Labels", ""))
            except (ValueError, SyntaxError) as e:
                report.skip("label_unreadable", sid, str(e))
                continue
            unmapped = sorted({x for x in raw if x not in MAPPING})
            if unmapped:
                report.flag("label_without_chexpert_counterpart", sid, f"{unmapped} kept in source_labels only")
            labels = map_to_chexpert({x: 1 for x in raw}, MAPPING)
            date = (row.get("StudyDate_DICOM") or "").strip()
            iso = f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 and date.isdigit() else None
            patient = (row.get("PatientID") or "").strip() or study
            records.append(StudyRecord(sid, patient, patient_split(f"padchest-{patient}"), study_date=iso, payload={
                "views": {role: list(pv) for role, pv in views.items()}, "findings": report_text, "labels": labels,
                "source_labels": {"padchest_labels": "; ".join(raw),
                                  "method_label": (row.get("MethodLabel") or "").strip()}}))
        link_prior_views(records, report)
        return records

    def study_fields(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"findings": payload["findings"], "labels": payload["labels"], "source_labels": payload["source_labels"]}
