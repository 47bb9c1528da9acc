"""IU X-ray (Indiana University / Open-i): R2Gen's annotation.json + images/, and/or the Open-i XML reports.

Layouts under data.root (either or both):

    annotation.json          R2Gen: {"train": [{"id": "CXR2384_IM-0942", "report": "...",
                             "image_path": ["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"], "split": "train"}],
                             "val": [...], "test": [...]}
    images/CXR2384_IM-0942/0.png ...

    ecgen-radiology/2384.xml Open-i: AbstractText Label=INDICATION/COMPARISON/FINDINGS/IMPRESSION, MeSH
                             <major>/<automatic> terms, <parentImage id="CXR2384_IM-0942-1001"> per image
    NLMCXR_png/CXR2384_IM-0942-1001.png   (the Open-i PNGs; .dcm from NLMCXR_dcm/ also work)

With both, R2Gen gives the split and images and the XML gives the sections and MeSH terms (joined on the
report number, CXR<n>_...). Without annotation.json the split is a patient hash. IU X-ray has one report
per patient, so the report number is the patient id. Neither source states a view per image, and the
listing order is not reliable (some studies list the lateral first, some hold only a lateral), so each
image's view is read from its pixels (cxrfm.data.views): the study's frontal is the first image classed
frontal (stored as PA, the Indiana protocol's view), its lateral the first classed lateral, and a study
whose only images are laterals keeps them as laterals. source_labels["view_from"] = "pixels"; images
classed near the threshold are flagged "view_from_pixels_unsure", further images "extra_images_not_used".
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from cxrfm.data.schema import ImageRef, Study
from cxrfm.data.sources.base import (BuildReport, StudyRecord, map_to_chexpert, parse_report_sections,
                                     patient_split, safe_key)
from cxrfm.data.sources.base import Converter as BaseConverter
from cxrfm.data.views import classify_view

SPLITS = {"train": "train", "val": "val", "valid": "val", "test": "test"}
_REPORT_NO = re.compile(r"CXR(\d+)_")
# MeSH major heading (the part before the first "/") -> CheXpert label, where the meaning is clear.
MESH_TO_CHEXPERT = {
    "normal": "No Finding",
    "Cardiomegaly": "Cardiomegaly",
    "Pulmonary Atelectasis": "Atelectasis", "Atelectasis": "Atelectasis",
    "Opacity": "Lung Opacity", "Infiltrate": "Lung Opacity", "Airspace Disease": "Lung Opacity",
    "Nodule": "Lung Lesion", "Mass": "Lung Lesion", "Lung Neoplasms": "Lung Lesion",
    "Pulmonary Edema": "Edema", "Edema": "Edema",
    "Consolidation": "Consolidation",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Pleural Effusion": "Pleural Effusion",
    "Pleural Thickening": "Pleural Other",
    "Fractures, Bone": "Fracture",
    "Catheters, Indwelling": "Support Devices", "Medical Device": "Support Devices",
    "Implanted Medical Device": "Support Devices", "Tube, Inserted": "Support Devices",
    "Pacemaker, Artificial": "Support Devices", "Surgical Instruments": "Support Devices",
}


def mesh_labels(terms: list[str]) -> dict[str, int]:
    """CheXpert labels from MeSH major terms (present = positive); "No Finding" only when "normal" is alone."""
    heads = {t.split("/")[0].strip() for t in terms if t.strip()}
    labels = map_to_chexpert({h: 1 for h in heads}, MESH_TO_CHEXPERT)
    if "No Finding" in labels and len(heads) > 1:
        labels.pop("No Finding")
    return labels


def parse_openi_xml(path: Path) -> dict:
    """One ecgen-radiology XML -> {"number", "sections", "mesh_major", "mesh_automatic", "images"}."""
    tree = ET.parse(path)
    sections = {"indication": "", "comparison": "", "findings": "", "impression": ""}
    for node in tree.iter("AbstractText"):
        label = (node.get("Label") or "").strip().lower()
        if label in sections:
            sections[label] = " ".join((node.text or "").split())
    number = tree.find(".//IUXRId")
    uid = tree.find(".//uId")  # "CXR1": older dumps lack IUXRId
    if number is not None and number.get("id"):
        number = number.get("id")
    elif uid is not None and (uid.get("id") or "").startswith("CXR"):
        number = uid.get("id")[3:]
    else:
        number = path.stem
    return {
        "number": number,
        "sections": sections,
        "mesh_major": [(n.text or "").strip() for n in tree.iter("major") if (n.text or "").strip()],
        "mesh_automatic": [(n.text or "").strip() for n in tree.iter("automatic") if (n.text or "").strip()],
        "images": [n.get("id") for n in tree.iter("parentImage") if n.get("id")],
    }


class Converter(BaseConverter):
    name = "iu_xray"
    license = "CC BY-NC-ND 4.0 (Open-i, Indiana University)"
    layouts = ("R2Gen: annotation.json with images/<id>/0.png, 1.png",
               "Open-i: ecgen-radiology/*.xml with NLMCXR_png/*.png (or NLMCXR_dcm/*.dcm)")

    def _xml_reports(self, root: Path, report: BuildReport) -> dict[str, dict]:
        folder = root / "ecgen-radiology"
        out: dict[str, dict] = {}
        for path in sorted(folder.glob("*.xml")) if folder.is_dir() else []:
            try:
                parsed = parse_openi_xml(path)
            except ET.ParseError as e:
                report.skip("report_xml_unreadable", path.name, str(e))
                continue
            out[parsed["number"]] = parsed
        report.note("openi_xml_reports", len(out))
        return out

    def _openi_image(self, root: Path, image_id: str) -> Path:
        for p in (root / "NLMCXR_png" / f"{image_id}.png", root / "NLMCXR_dcm" / f"{image_id}.dcm"):
            if p.is_file():
                return p
        return root / "NLMCXR_png" / f"{image_id}.png"

    def scan(self, root: Path, report: BuildReport) -> list[StudyRecord]:
        xml = self._xml_reports(root, report)
        annotation = root / "annotation.json"
        entries: list[dict] = []
        if annotation.is_file():
            data = json.loads(annotation.read_text())
            for split_name, items in data.items():
                for item in items:
                    entries.append({"id": item["id"], "split": SPLITS.get(str(item.get("split", split_name)).lower()),
                                     "report": item.get("report", ""),
                                     "images": [root / "images" / p for p in item.get("image_path", [])]})
            report.note("r2gen_entries", len(entries))
        elif xml:
            for number, x in sorted(xml.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else kv[0]):
                entries.append({"id": f"CXR{number}", "split": None, "report": "",
                                "images": [self._openi_image(root, i) for i in sorted(x["images"])]})
        else:
            raise self.layout_error(root, "neither annotation.json (R2Gen) nor ecgen-radiology/*.xml (Open-i) found")
        records, seen = [], set()
        for e in entries:
            m = _REPORT_NO.match(e["id"] + "_")
            number = m.group(1) if m else e["id"]
            sid = safe_key("iu", e["id"])
            if sid in seen:
                report.skip("duplicate_study_id", sid, "listed twice; the first is kept")
                continue
            seen.add(sid)
            x = xml.get(number)
            sections = dict(x["sections"]) if x else parse_report_sections(e["report"])
            if not (sections["findings"] or sections["impression"]):
                report.skip("report_without_findings_or_impression", sid, "empty FINDINGS and IMPRESSION")
                continue
            if not sections["findings"]:
                report.flag("report_impression_only", sid, "kept; the target is the impression alone")
            present = []
            for path in e["images"]:
                if path.is_file():
                    present.append(str(path))
                else:
                    report.skip("image_missing_file", f"{sid}:{path.name}", str(path.relative_to(root)))
            if not present:
                report.skip("study_without_usable_image", sid, f"{len(e['images'])} images listed, none on disk")
                continue
            split = e["split"] or patient_split(f"iu-{number}")
            source_labels = {"view_from": "pixels"}
            labels = {}
            if x:
                labels = mesh_labels(x["mesh_major"])
                source_labels |= {k: "; ".join(x[k]) for k in ("mesh_major", "mesh_automatic") if x[k]}
            elif xml:
                report.flag("no_openi_xml_for_study", sid, "sections from annotation.json; no MeSH labels")
            records.append(StudyRecord(sid, f"iu-{number}", split, payload={
                "images": present, "sections": sections, "labels": labels, "source_labels": source_labels}))
        return records

    def load(self, record: StudyRecord, report: BuildReport) -> tuple[Study, dict[str, np.ndarray]] | None:
        p = record.payload
        images: dict[str, np.ndarray] = {}
        refs, extra = [], 0
        for path in p["images"]:
            img = self.read(path, f"{record.study_id}:{Path(path).name}", report)
            if img is None:
                continue
            role, score, sure = classify_view(img)
            if not sure:
                report.flag("view_from_pixels_unsure", f"{record.study_id}:{Path(path).name}",
                            f"midline contrast {score:.2f}; taken as {role}")
            if role in images:
                extra += 1
                continue
            images[role] = img
            refs.append(ImageRef(role=role, key=f"{role}.png", view="PA" if role == "frontal" else "LATERAL",
                                 width=img.shape[1], height=img.shape[0]))
        if extra:
            report.flag("extra_images_not_used", record.study_id, f"{extra} more images of a view already kept")
        if not images:
            report.skip("study_without_readable_image", record.study_id, f"{len(p['images'])} images tried")
            return None
        if "frontal" not in images:
            report.flag("study_lateral_only", record.study_id, "every readable image is a lateral; kept as lateral")
        refs.sort(key=lambda r: r.role != "frontal")  # frontal first, as every converter lists them
        study = Study(study_id=record.study_id, patient_id=record.patient_id, split=record.split, source=self.name,
                      license=self.license, images=refs, labels=p["labels"], source_labels=p["source_labels"],
                      **p["sections"])
        return study, images
