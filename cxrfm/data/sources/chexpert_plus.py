"""CheXpert Plus (Stanford AIMI): the report table with sections, PNG (or DICOM) images, CheXbert labels.

Layout under data.root:

    df_chexpert_plus_240401.csv    one row per image: path_to_image, path_to_dcm, frontal_lateral, ap_pa,
                                   deid_patient_id, patient_report_date_order, report, section_clinical_history,
                                   section_history, section_comparison, section_findings, section_impression,
                                   section_summary, ..., split (train / valid)
    PNG/train/patient00001/study1/view1_frontal.png   (path_to_image with .png; the original CheXpert
                                                       .jpg under root/ or DICOM/<path_to_dcm> also work)
    labels: chexbert_labels/report_fixed.json (JSON lines: path_to_image + the 14 CheXpert columns), or the
            original CheXpert train.csv / valid.csv (Path + the 14 columns); the first one found is used

A study is patientNNNNN/studyN; its report is on every image row (the first row's is used). The official
split is used (train / valid; CheXpert Plus publishes no test split). Priors: the patient's previous study
by patient_report_date_order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cxrfm.data.schema import CHEXPERT_LABELS
from cxrfm.data.sources.base import (BuildReport, StudyRecord, choose_views, first_present, link_prior_views,
                                     map_to_chexpert, normalize_view, parse_report_sections, read_table)
from cxrfm.data.sources.base import Converter as BaseConverter

SPLITS = {"train": "train", "valid": "val", "val": "val", "validate": "val", "test": "test"}
IDENTITY = {name: name for name in CHEXPERT_LABELS}
_STUDY = re.compile(r"(patient\d+)/(study\d+)/")
LABEL_FILES = ("chexbert_labels/report_fixed.json", "chexbert_labels/findings_fixed.json",
               "chexbert_labels/impression_fixed.json", "train.csv", "valid.csv")


def study_key(path: str) -> tuple[str, str] | None:
    m = _STUDY.search(path.replace("\\", "/"))
    return (m.group(1), m.group(2)) if m else None


class Converter(BaseConverter):
    name = "chexpert_plus"
    license = "Stanford University Dataset Research Use Agreement (CheXpert Plus)"
    layouts = ("df_chexpert_plus_*.csv with PNG/ (or the CheXpert .jpg tree, or DICOM/), and labels from "
               "chexbert_labels/*.json or CheXpert's train.csv / valid.csv",)

    def _labels(self, root: Path, report: BuildReport) -> dict[tuple[str, str], dict]:
        """(patient, study) -> {label: value} from the first label file found (all rows of a study merged)."""
        out: dict[tuple[str, str], dict] = {}
        chexbert = [n for n in LABEL_FILES if n.endswith(".json") and (root / n).is_file()]
        used = chexbert[:1] or [n for n in LABEL_FILES if n.endswith(".csv") and (root / n).is_file()]
        for name in used:
            path = root / name
            if name.endswith(".json"):
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            else:
                rows = read_table(path)
            for row in rows:
                key = study_key(str(row.get("path_to_image") or row.get("Path") or ""))
                if key is None:
                    report.skip("label_row_without_study", str(row.get("path_to_image") or row.get("Path")), name)
                    continue
                merged = out.setdefault(key, {})
                for label in CHEXPERT_LABELS:
                    v = row.get(label)
                    if v not in (None, "") and str(v).lower() != "nan":
                        merged.setdefault(label, []).append(v)
        report.note("labels_files", used)
        return out

    def _image_path(self, root: Path, row: dict) -> Path | None:
        rel = row.get("path_to_image", "").strip()
        png = str(Path(rel).with_suffix(".png"))
        candidates = [root / "PNG" / png, root / png, root / rel, root / "CheXpert-v1.0" / rel]
        if row.get("path_to_dcm", "").strip():
            candidates += [root / "DICOM" / row["path_to_dcm"].strip(), root / row["path_to_dcm"].strip()]
        return next((p for p in candidates if p.is_file()), None)

    def scan(self, root: Path, report: BuildReport) -> list[StudyRecord]:
        tables = sorted(root.glob("df_chexpert_plus*.csv"))
        if not tables:
            hint = " (this looks like CheXpert v1.0: use --source chexpert)" if (root / "train.csv").is_file() or any(
                (root / d).is_dir() for d in ("CheXpert-v1.0-small", "CheXpert-v1.0")) else ""
            raise self.layout_error(root, f"no df_chexpert_plus_*.csv{hint}")
        report.note("report_table", tables[-1].name)  # the newest release if several
        labels_of = self._labels(root, report)
        studies: dict[tuple[str, str], dict] = {}
        for row in read_table(tables[-1]):
            rel = row.get("path_to_image", "").strip()
            key = study_key(rel)
            if key is None:
                report.skip("row_without_study_path", rel or "?", "path_to_image must contain patientN/studyN/")
                continue
            s = studies.setdefault(key, {"rows": [], "images": []})
            s["rows"].append(row)
            path = self._image_path(root, row)
            fl = row.get("frontal_lateral", "").strip().lower()
            view = normalize_view("LATERAL") if fl == "lateral" else normalize_view(row.get("ap_pa"))
            if path is None:
                report.skip("image_missing_file", rel, "not found as PNG/, .jpg or DICOM")
            elif view is None:
                report.skip("image_view_not_used", rel, f"frontal_lateral={fl!r} ap_pa={row.get('ap_pa')!r}")
            else:
                s["images"].append((str(path), view))
        records = []
        for (patient, study), s in studies.items():
            sid = f"chexpert_plus-{patient}-{study}"
            row = s["rows"][0]
            views = choose_views(sorted(s["images"]))
            if not views:
                report.skip("study_without_usable_image", sid, "no image with a known view was found")
                continue
            sections = {
                "indication": " ".join(x for x in (first_present(row, ["section_clinical_history"]),
                                                   first_present(row, ["section_history"])) if x),
                "comparison": first_present(row, ["section_comparison"]),
                "findings": first_present(row, ["section_findings"]),
                "impression": first_present(row, ["section_impression", "section_summary"]),
            }
            if not (sections["findings"] or sections["impression"]) and first_present(row, ["report"]):
                sections = parse_report_sections(first_present(row, ["report"]))
            if not (sections["findings"] or sections["impression"]):
                report.skip("report_without_findings_or_impression", sid, "no findings or impression section")
                continue
            if not sections["findings"]:
                report.flag("report_impression_only", sid, "kept; the target is the impression alone")
            split = SPLITS.get(row.get("split", "").strip().lower())
            if split is None:
                report.skip("unknown_split", sid, f"split {row.get('split')!r}; expected train/valid")
                continue
            raw = labels_of.get((patient, study), {})
            try:
                labels = map_to_chexpert_many(raw)
            except ValueError as e:
                report.skip("label_unreadable", sid, str(e))
                labels = {}
            order = first_present(row, ["patient_report_date_order"])
            source_labels = {k: ",".join(str(v) for v in vs) for k, vs in raw.items()}
            if first_present(row, ["deid_patient_id"]):
                source_labels["deid_patient_id"] = first_present(row, ["deid_patient_id"])
            # the patient folder is CheXpert's own patient id, the one its train/valid split separates
            records.append(StudyRecord(sid, patient, split, payload={
                "views": {role: list(pv) for role, pv in views.items()}, "sections": sections, "labels": labels,
                "source_labels": source_labels,
                "order": int(float(order)) if order else None}))
        link_prior_views(records, report, key=lambda r: r.payload["order"])
        return records


def map_to_chexpert_many(values: dict[str, list]) -> dict[str, int]:
    """Labels of a study's several image rows: per label, positive > uncertain > negative."""
    merged: dict[str, int] = {}
    for label, vs in values.items():
        for v in vs:
            one = map_to_chexpert({label: v}, IDENTITY)
            if label in one and (label not in merged or _rank(one[label]) > _rank(merged[label])):
                merged[label] = one[label]
    return merged


def _rank(v: int) -> int:
    return {1: 3, -1: 2, 0: 1}[v]
