"""ReXGradient-160K: multi-image chest X-ray studies with findings and impression (no labels published).

Layout under data.root (metadata may sit in root/ or root/metadata/, as .json or .csv):

    metadata/train_metadata.json   one entry per study (a JSON list, or an object keyed by study id):
    metadata/valid_metadata.json     id, PatientID, StudyInstanceUid, StudyDate, ImagePath (list of paths),
    metadata/test_metadata.json      ImageViewPosition (list, same order), Indication, Comparison,
                                     Findings, Impression
    deid_png/...                   the images, at the paths ImagePath lists (relative to root)

In the CSV form a list column is a JSON/Python list literal, or there is one row per image and rows are
grouped by study. The split is the file's (train / valid / test). A study keeps one frontal (PA over AP)
and one lateral; further images are counted as "extra_images_not_used". Priors: previous study by StudyDate.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

from cxrfm.data.sources.base import (BuildReport, StudyRecord, choose_views, first_present, link_prior_views,
                                     normalize_view, read_table, safe_key)
from cxrfm.data.sources.base import Converter as BaseConverter

SPLIT_FILES = {"train": "train", "valid": "val", "val": "val", "test": "test"}


def _as_list(value) -> list[str]:
    """ImagePath / ImageViewPosition: a list, a JSON or Python list literal, or one value."""
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        try:
            return [str(v) for v in json.loads(text)]
        except json.JSONDecodeError:
            return [str(v) for v in ast.literal_eval(text)]
    return [text] if text else []


def _iso_date(value: str) -> str | None:
    v = (value or "").strip().replace("-", "")[:8]
    return f"{v[:4]}-{v[4:6]}-{v[6:8]}" if len(v) == 8 and v.isdigit() else None


class Converter(BaseConverter):
    name = "rexgradient"
    license = "ReXGradient-160K Data Use Agreement (non-commercial research)"
    layouts = ("metadata/{train,valid,test}_metadata.json or .csv (or in root) with the images at their ImagePath "
               "(deid_png/...)",)

    def _metadata_files(self, root: Path) -> list[tuple[str, Path]]:
        found = []
        for folder in (root / "metadata", root):
            for prefix, split in SPLIT_FILES.items():
                for ext in ("json", "csv"):
                    path = folder / f"{prefix}_metadata.{ext}"
                    if path.is_file() and split not in {s for s, _ in found}:
                        found.append((split, path))
        return found

    def _entries(self, path: Path) -> list[dict]:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            return [dict(v, id=v.get("id", k)) for k, v in data.items()] if isinstance(data, dict) else list(data)
        return read_table(path)

    def scan(self, root: Path, report: BuildReport) -> list[StudyRecord]:
        files = self._metadata_files(root)
        if not files:
            raise self.layout_error(root, "no train/valid/test_metadata.json or .csv (in metadata/ or the root)")
        report.note("metadata_files", [str(p.relative_to(root)) for _, p in files])
        studies: dict[str, dict] = {}
        for split, path in files:
            for e in self._entries(path):
                uid = first_present(e, ["StudyInstanceUid", "StudyInstanceUID", "id"])
                if not uid:
                    report.skip("metadata_row_incomplete", str(path.name), "no StudyInstanceUid or id")
                    continue
                s = studies.get(uid)
                if s is None:
                    s = studies[uid] = {"split": split, "entry": e, "images": []}
                elif s["split"] != split or len(_as_list(e.get("ImagePath"))) != 1:
                    # one row per image is fine; a second full study entry under the same id is not
                    report.skip("duplicate_study_id", uid, f"listed again in {path.name}")
                    continue
                paths, views = _as_list(e.get("ImagePath")), _as_list(e.get("ImageViewPosition"))
                if views and len(views) != len(paths):
                    report.skip("view_list_mismatch", uid, f"{len(paths)} paths but {len(views)} view positions")
                    views = []
                for i, rel in enumerate(paths):
                    s["images"].append((rel, views[i] if views else None))
        records = []
        for uid, s in studies.items():
            e, sid = s["entry"], safe_key("rexgradient", uid)
            usable = []
            for rel, raw_view in s["images"]:
                view = normalize_view(raw_view)
                if not (root / rel).is_file():
                    report.skip("image_missing_file", f"{uid}:{rel}", "listed in ImagePath but not on disk")
                elif view is None:
                    report.skip("image_view_not_used", f"{uid}:{rel}", f"ImageViewPosition {raw_view!r}")
                else:
                    usable.append((str(root / rel), view))
            views = choose_views(usable)
            if not views:
                report.skip("study_without_usable_image", sid, f"{len(s['images'])} images listed, none usable")
                continue
            if len(usable) > len(views):
                report.flag("extra_images_not_used", sid, f"{len(usable) - len(views)} more usable images")
            sections = {"indication": first_present(e, ["Indication"]), "comparison": first_present(e, ["Comparison"]),
                        "findings": first_present(e, ["Findings"]), "impression": first_present(e, ["Impression"])}
            if not (sections["findings"] or sections["impression"]):
                report.skip("report_without_findings_or_impression", sid, "Findings and Impression are empty")
                continue
            if not sections["findings"]:
                report.flag("report_impression_only", sid, "kept; the target is the impression alone")
            patient = first_present(e, ["PatientID", "PatientId"])
            if not patient:
                report.flag("patient_id_missing", sid, "the study id stands in for the patient")
            records.append(StudyRecord(sid, patient or uid, s["split"], study_date=_iso_date(first_present(e, ["StudyDate"])),
                                       payload={"views": {r: list(pv) for r, pv in views.items()}, "sections": sections,
                                                "source_labels": {k: first_present(e, [k]) for k in ("PatientSex", "PatientAge")
                                                                  if first_present(e, [k])}}))
        link_prior_views(records, report)
        return records

    def study_fields(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"source_labels": payload["source_labels"], **payload["sections"]}
