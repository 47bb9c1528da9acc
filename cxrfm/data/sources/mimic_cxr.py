"""MIMIC-CXR-JPG (v2.0.0/2.1.0) with the MIMIC-CXR free-text reports.

Layout under data.root (as downloaded from PhysioNet; the .csv files may also be .csv.gz):

    mimic-cxr-2.0.0-metadata.csv   dicom_id, subject_id, study_id, ViewPosition, StudyDate, StudyTime, ...
    mimic-cxr-2.0.0-split.csv      dicom_id, study_id, subject_id, split (train / validate / test)
    mimic-cxr-2.0.0-chexpert.csv   subject_id, study_id, the 14 CheXpert columns (1.0 / 0.0 / -1.0 / blank)
    files/p10/p10000032/s50414267/02aa804e-....jpg     (a .dcm from MIMIC-CXR is used when no .jpg exists)
    files/p10/p10000032/s50414267.txt                  the report (also found under reports/files/ or
                                                       mimic-cxr-reports/files/)

Per study: the frontal is a PA, else an AP; the lateral a LATERAL, else an LL; other views (and images
with no ViewPosition) are counted and not used. The patient's previous study (by StudyDate, StudyTime) is
linked as the prior and its frontal becomes the `prior` image. The official split is used.
"""

from __future__ import annotations

from pathlib import Path

from cxrfm.data.schema import CHEXPERT_LABELS
from cxrfm.data.sources.base import (BuildReport, StudyRecord, choose_views, find_file, link_priors,
                                     map_to_chexpert, normalize_view, parse_report_sections, patient_split,
                                     read_table)
from cxrfm.data.sources.base import Converter as BaseConverter

SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}
IDENTITY = {name: name for name in CHEXPERT_LABELS}


def _iso(date: str, time: str) -> str | None:
    """StudyDate 21800506 + StudyTime 213014.531 -> "2180-05-06T21:30:14" (MIMIC dates are shifted)."""
    date = (date or "").strip().split(".")[0]
    if len(date) != 8 or not date.isdigit():
        return None
    t = (time or "").strip().split(".")[0].zfill(6) if (time or "").strip() else "000000"
    t = t if t.isdigit() and len(t) == 6 else "000000"
    return f"{date[:4]}-{date[4:6]}-{date[6:]}T{t[:2]}:{t[2:4]}:{t[4:]}"


class Converter(BaseConverter):
    name = "mimic_cxr"
    license = "PhysioNet Credentialed Health Data License 1.5.0"
    layouts = ("MIMIC-CXR-JPG: mimic-cxr-2.0.0-metadata.csv(.gz), -split.csv, -chexpert.csv, files/p1X/p<subject>/"
               "s<study>/<dicom_id>.jpg (or .dcm) and the report files/p1X/p<subject>/s<study>.txt",)

    def _report_dirs(self, root: Path) -> list[Path]:
        return [d for d in (root / "files", root / "reports" / "files", root / "mimic-cxr-reports" / "files") if d.is_dir()]

    def scan(self, root: Path, report: BuildReport) -> list[StudyRecord]:
        meta_path = find_file(root, "mimic-cxr-2.0.0-metadata.csv")
        if meta_path is None:
            raise self.layout_error(root, "mimic-cxr-2.0.0-metadata.csv(.gz) not found")
        split_path = find_file(root, "mimic-cxr-2.0.0-split.csv")
        label_path = find_file(root, "mimic-cxr-2.0.0-chexpert.csv")
        report.note("official_split", split_path is not None)
        report.note("labels_file", label_path.name if label_path else None)
        split_of = {r["dicom_id"]: r["split"].strip() for r in read_table(split_path)} if split_path else {}
        labels_of = {}
        if label_path:
            for r in read_table(label_path):
                labels_of[r["study_id"].strip()] = {k: v for k, v in r.items() if k in IDENTITY}

        studies: dict[str, dict] = {}
        rows = read_table(meta_path)
        report.note("metadata_rows", len(rows))
        for r in rows:
            subject, study, dicom = r.get("subject_id", "").strip(), r.get("study_id", "").strip(), r.get("dicom_id", "").strip()
            if not (subject and study and dicom):
                report.skip("metadata_row_incomplete", dicom or study or "?", "dicom_id, subject_id and study_id are needed")
                continue
            s = studies.setdefault(study, {"subject": subject, "images": [], "date": None, "splits": set()})
            if s["subject"] != subject:
                report.skip("duplicate_study_id", study, f"listed for subjects {s['subject']} and {subject}")
                continue
            folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
            path = next((p for p in (folder / f"{dicom}.jpg", folder / f"{dicom}.dcm") if p.is_file()), None)
            view = normalize_view(r.get("ViewPosition"))
            if path is None:
                report.skip("image_missing_file", f"s{study}/{dicom}", f"neither {dicom}.jpg nor .dcm in {folder}")
            elif view is None:
                report.skip("image_view_not_used", f"s{study}/{dicom}",
                            f"ViewPosition {r.get('ViewPosition')!r} is not PA/AP/LATERAL/LL")
            else:
                s["images"].append((dicom, str(path), view))
            iso = _iso(r.get("StudyDate", ""), r.get("StudyTime", ""))
            if iso and (s["date"] is None or iso < s["date"]):
                s["date"] = iso
            if dicom in split_of:
                s["splits"].add(split_of[dicom])

        # Priors are linked over every imaged study, before report filtering: the previous exam's frontal is
        # the right prior even when that exam's own report is missing or empty.
        imaged = {}
        for study, s in studies.items():
            views = choose_views((p, v) for _, p, v in sorted(s["images"]))
            if views:
                imaged[study] = StudyRecord(f"mimic-s{study}", f"p{s['subject']}", "", {"views": views}, s["date"])
            else:
                report.skip("study_without_usable_image", f"mimic-s{study}", "no PA/AP/LATERAL/LL image on disk")
        by_id = link_priors(imaged.values(), report)
        dirs = self._report_dirs(root)
        records = []
        for study, s in studies.items():
            if study not in imaged:
                continue
            sid, subject, views = f"mimic-s{study}", s["subject"], dict(imaged[study].payload["views"])
            prior = by_id.get(imaged[study].prior_study_id or "")
            if prior is not None and "frontal" in prior.payload["views"]:
                views["prior"] = prior.payload["views"]["frontal"]
            text_path = next((d / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt" for d in dirs
                              if (d / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt").is_file()), None)
            if text_path is None:
                report.skip("missing_report", sid, f"s{study}.txt not found under files/p{subject[:2]}/p{subject}/")
                continue
            sections = parse_report_sections(text_path.read_text(errors="replace"))
            if not (sections["findings"] or sections["impression"]):
                report.skip("report_without_findings_or_impression", sid, str(text_path.name))
                continue
            if not sections["findings"]:
                report.flag("report_impression_only", sid, "kept; the target is the impression alone")
            splits = {SPLITS.get(x) for x in s["splits"]}
            if len(splits) > 1 or None in splits:
                report.skip("split_inconsistent", sid, f"split.csv gives {sorted(s['splits'])}; patient hash used")
            split = splits.pop() if len(splits) == 1 and None not in splits else patient_split(f"p{subject}")
            try:
                labels = map_to_chexpert(labels_of.get(study, {}), IDENTITY)
            except ValueError as e:
                report.skip("label_unreadable", sid, str(e))
                labels = {}
            source_labels = {k: v.strip() for k, v in labels_of.get(study, {}).items() if v and v.strip()}
            records.append(StudyRecord(sid, f"p{subject}", split, study_date=s["date"],
                                       prior_study_id=prior.study_id if "prior" in views else None, payload={
                "views": {role: list(pv) for role, pv in views.items()}, "sections": sections,
                "labels": labels, "source_labels": source_labels}))
        report.note("studies_with_prior_image", sum("prior" in r.payload["views"] for r in records))
        return records


