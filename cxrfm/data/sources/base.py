"""What every converter shares: the record/load contract, the build report, and the common helpers.

A converter works in two passes so that building can be parallel and resumable:

    scan(root, report) -> [StudyRecord]   metadata only (CSV/JSON/XML): validate, count problems, assign splits
    load(record, report) -> (Study, {role: (H, W) uint8}) | None   pixels for one study; None after report.skip()

`scan` runs once in the main process; `load` runs in worker processes, shard by shard, so a record's
payload must be picklable and small (paths, report text, labels). Bad data never raises out of `load`:
it is counted in the BuildReport under a short reason with a few examples, and written as
build_report.json next to manifest.json.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxrfm.data.images import ImageDecodeError, read_image
from cxrfm.data.schema import CHEXPERT_LABELS, ImageRef, Study
from cxrfm.data.views import classify_view

__all__ = [
    "BuildReport", "Converter", "ImageDecodeError", "StudyRecord", "link_priors", "map_to_chexpert",
    "parse_report_sections", "patient_split", "read_image", "resize_study", "safe_key",
]

BUILD_REPORT = "build_report.json"
FLAG = "kept:"  # prefix of flagged (kept) reasons inside the counter and the examples


class BuildReport:
    """Counts of skipped items per reason (with the first examples of each) and free-form notes."""

    MAX_EXAMPLES = 20

    def __init__(self) -> None:
        self._counts: Counter = Counter()
        self.examples: dict[str, list[dict[str, str]]] = defaultdict(list)
        self.notes: dict[str, Any] = {}

    def skip(self, reason: str, item: str, detail: str = "") -> None:
        """Count one skipped item (a study, an image, a box, a row...) under `reason`."""
        self._counts[reason] += 1
        if len(self.examples[reason]) < self.MAX_EXAMPLES:
            self.examples[reason].append({"item": str(item), "detail": str(detail)})

    def flag(self, reason: str, item: str, detail: str = "") -> None:
        """Count an item that was kept but is worth knowing about (e.g. a report with only an impression)."""
        self.skip(f"{FLAG}{reason}", item, detail)

    def note(self, key: str, value: Any) -> None:
        """Record a fact about the build (e.g. how many rows a CSV had); must be JSON-serialisable."""
        self.notes[key] = value

    @property
    def counts(self) -> dict[str, int]:
        """Skipped items per reason (flagged, kept items are in `flagged`)."""
        return {r: n for r, n in sorted(self._counts.items()) if not r.startswith(FLAG)}

    @property
    def flagged(self) -> dict[str, int]:
        return {r[len(FLAG):]: n for r, n in sorted(self._counts.items()) if r.startswith(FLAG)}

    def merge(self, other: "BuildReport | dict") -> None:
        """Add another report (a worker's, or one saved in build_state.json) to this one."""
        other = other if isinstance(other, BuildReport) else BuildReport.from_json(other)
        self._counts.update(other._counts)
        for reason, examples in other.examples.items():
            room = self.MAX_EXAMPLES - len(self.examples[reason])
            self.examples[reason].extend(examples[:max(room, 0)])
        self.notes.update(other.notes)

    def to_json(self) -> dict:
        return {"skipped": self.counts, "skipped_total": sum(self.counts.values()), "flagged": self.flagged,
                "examples": {r: self.examples[r] for r in sorted(self.examples) if self.examples[r]},
                "notes": self.notes}

    @classmethod
    def from_json(cls, data: dict) -> "BuildReport":
        report = cls()
        report._counts.update(data.get("skipped", {}))
        report._counts.update({f"{FLAG}{r}": n for r, n in data.get("flagged", {}).items()})
        for reason, examples in data.get("examples", {}).items():
            report.examples[reason] = list(examples)
        report.notes.update(data.get("notes", {}))
        return report

    def write(self, out_dir: str | Path) -> Path:
        path = Path(out_dir) / BUILD_REPORT
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path


@dataclass
class StudyRecord:
    """One study's metadata, enough for `load` to read its pixels; no pixels here."""

    study_id: str
    patient_id: str
    split: str
    payload: dict  # converter-specific and picklable: paths, report text, labels...
    study_date: str | None = None  # ISO date (optionally "YYYY-MM-DDTHH:MM:SS"); orders a patient's studies
    prior_study_id: str | None = None  # set by link_priors


class Converter:
    """Base class of every source converter; subclasses set `name`, `license` and implement scan/load."""

    name: str = ""
    license: str = "unknown"
    layouts: tuple[str, ...] = ()  # the download layouts scan() accepts, in words (errors and the README list them)

    def __init__(self, cfg=None) -> None:
        from cxrfm.config import DataConfig  # here: cxrfm.config imports this package (source names)

        self.cfg = cfg if cfg is not None else DataConfig()

    def scan(self, root: Path, report: BuildReport) -> list[StudyRecord]:
        # The interface every converter implements (metadata only, no pixels); the base class has no source.
        raise NotImplementedError(f"{type(self).__name__} must implement scan(root, report)")

    def load(self, record: StudyRecord, report: BuildReport) -> tuple[Study, dict[str, np.ndarray]] | None:
        """Pixels for one record. This default serves converters whose scan() puts {role: (path, view)} in
        payload["views"]: it reads those images and fills the Study with study_fields(payload)."""
        p = record.payload
        if not isinstance(p, dict) or "views" not in p:
            raise NotImplementedError(f"{type(self).__name__} must implement load(record, report): its records "
                                      "carry no payload['views'] for the default one")
        return self.assemble(record, report, {role: tuple(pv) for role, pv in p["views"].items()},
                             **self.study_fields(p))

    def study_fields(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The Study's fields from a record's payload, for the default load(): report sections and labels as
        the radiology-report corpora store them; converters with other fields override this."""
        return {"labels": payload["labels"], "source_labels": payload["source_labels"], **payload["sections"]}

    def load_batch(self, records: list[StudyRecord], report: BuildReport) -> Iterator[tuple[Study, dict[str, np.ndarray]]]:
        """Studies of one shard; override when loading several at once is cheaper (synthetic phantoms)."""
        for record in records:
            try:
                result = self.load(record, report)
            except Exception as e:  # noqa: BLE001 - a converter bug on one study is counted, not fatal to a long build
                report.skip("converter_error", record.study_id, f"{type(e).__name__}: {e}")
                continue
            if result is not None:
                yield result

    def layout_error(self, root: Path | str | None, missing: str) -> FileNotFoundError:
        """The error for a root that holds none of the accepted layouts: what is missing, then every layout."""
        accepted = "; ".join(f"({i + 1}) {x}" for i, x in enumerate(self.layouts))
        return FileNotFoundError(f"{root}: {missing}. Accepted {self.name} layouts under --root: {accepted}")

    # -- small helpers for subclasses --
    def read(self, path: str | Path, item: str, report: BuildReport) -> np.ndarray | None:
        """read_image, turning a failure into a counted skip: "image_missing_file", "image_corrupt_image"..."""
        try:
            return read_image(path)
        except ImageDecodeError as e:
            report.skip(f"image_{e.code}", item, e.message)
            return None

    def read_one(self, path: str | Path, record: StudyRecord, report: BuildReport, role: str = "frontal",
                 view: str = "PA") -> tuple[np.ndarray, ImageRef] | None:
        """The image of a single-image study and its ImageRef; None (counted by `read`) when unreadable."""
        img = self.read(path, record.study_id, report)
        if img is None:
            return None
        return img, ImageRef(role=role, key=f"{role}.png", view=view, width=img.shape[1], height=img.shape[0])

    def read_any_view(self, path: str | Path, record: StudyRecord, report: BuildReport,
                      view: str | None = None) -> tuple[np.ndarray, ImageRef] | None:
        """A single-image study whose view the corpus may not state: `view` when given, else read from the
        pixels (cxrfm.data.views; frontal stored as PA), flagged "view_from_pixels_unsure" near the threshold."""
        img = self.read(path, record.study_id, report)
        if img is None:
            return None
        if view is None:
            role, score, sure = classify_view(img)
            view = "PA" if role == "frontal" else "LATERAL"
            report.flag("view_from_pixels", record.study_id, f"midline contrast {score:.2f}: {role}")
            if not sure:
                report.flag("view_from_pixels_unsure", record.study_id, f"midline contrast {score:.2f}; taken as {role}")
        role = "lateral" if view in ("LATERAL", "LL") else "frontal"
        return img, ImageRef(role=role, key=f"{role}.png", view=view, width=img.shape[1], height=img.shape[0])

    def assemble(self, record: StudyRecord, report: BuildReport, views: dict[str, tuple[str | Path, str]],
                 **fields: Any) -> tuple[Study, dict[str, np.ndarray]] | None:
        """Read the images of `views` ({role: (path, view)}) and build the Study with `fields`.

        An unreadable image is counted and left out; the study is kept while a frontal or a lateral
        remains, else it is skipped as "study_without_readable_image".
        """
        images, refs = {}, []
        for role in ("frontal", "lateral", "prior"):
            if role not in views:
                continue
            path, view = views[role]
            img = self.read(path, f"{record.study_id}:{role}", report)
            if img is None:
                continue
            images[role] = img
            refs.append(ImageRef(role=role, key=f"{role}.png", view=view, width=img.shape[1], height=img.shape[0]))
        if "frontal" not in images and "lateral" not in images:
            report.skip("study_without_readable_image", record.study_id, f"images tried: {sorted(views)}")
            return None
        study = Study(study_id=record.study_id, patient_id=record.patient_id, split=record.split, source=self.name,
                      license=self.license, images=refs, study_date=(record.study_date or "")[:10] or None,
                      prior_study_id=record.prior_study_id if "prior" in images else None, **fields)
        return study, images


_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(*parts: str) -> str:
    """A shard key from id parts: webdataset splits member names at the first '.', and '/' makes folders."""
    return "-".join(_SAFE.sub("_", str(p)).strip("_") for p in parts if str(p))


def patient_split(patient_id: str, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> str:
    """Patient-level split from sha256(seed:patient_id): stable across runs, machines and study order.

    The same function the synthetic phantoms use, so a patient never lands in two splits.
    """
    total = float(sum(fractions))
    if total <= 0 or any(f < 0 for f in fractions):
        raise ValueError(f"split fractions must be non-negative and sum above 0, got {fractions}")
    h = int.from_bytes(hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()[:8], "big") / 2.0**64
    cut_train, cut_val = fractions[0] / total, (fractions[0] + fractions[1]) / total
    return "train" if h < cut_train else "val" if h < cut_val else "test"


def link_priors(records: Iterable[StudyRecord], report: BuildReport | None = None,
                key: Callable[[StudyRecord], Any] = lambda r: r.study_date) -> dict[str, StudyRecord]:
    """Set each record's prior_study_id to the same patient's previous study; returns the records by id.

    Studies are ordered by `key` (default: study_date; CheXpert Plus orders by its report order column).
    Records whose key is None are not linked (counted as "prior_unknown_date" when a report is given); two
    studies of one patient with the same key are ordered by study id, which keeps the result stable.
    """
    by_id: dict[str, StudyRecord] = {}
    per_patient: dict[str, list[StudyRecord]] = defaultdict(list)
    for rec in records:
        by_id[rec.study_id] = rec
        if key(rec) is not None:
            per_patient[rec.patient_id].append(rec)
        elif report is not None:
            report.skip("prior_unknown_date", rec.study_id, "no study date; no prior linked")
    for recs in per_patient.values():
        recs.sort(key=lambda r: (key(r), r.study_id))
        for previous, current in zip(recs, recs[1:]):
            current.prior_study_id = previous.study_id
    return by_id


def link_prior_views(records: list[StudyRecord], report: BuildReport | None = None,
                     key: Callable[[StudyRecord], Any] = lambda r: r.study_date) -> None:
    """link_priors, then give each record whose prior has a frontal that frontal as payload["views"]["prior"]."""
    by_id = link_priors(records, report, key=key)
    for rec in records:
        prior = by_id.get(rec.prior_study_id) if rec.prior_study_id else None
        if prior is not None and "frontal" in prior.payload["views"]:
            rec.payload["views"]["prior"] = prior.payload["views"]["frontal"]


_NUMERIC = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1, "true": 1, "false": 0,
            "positive": 1, "negative": 0, "uncertain": -1, "yes": 1, "no": 0}
_RANK = {1: 3, -1: 2, 0: 1}  # several source labels for one CheXpert label: positive > uncertain > negative


def label_value(value: Any) -> int | None:
    """1/0/-1 from the ways corpora write a label; None for blank (not mentioned); ValueError otherwise."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        if value in (1, 0, -1):
            return int(value)
        raise ValueError(f"label value {value!r} is not 1, 0, -1 or blank")
    text = str(value).strip().lower()
    if text in ("", "nan", "none"):
        return None
    if text in _NUMERIC:
        return _NUMERIC[text]
    raise ValueError(f"label value {value!r} is not 1, 0, -1 or blank")


def map_to_chexpert(source_labels: dict, mapping: dict) -> dict[str, int]:
    """Map {source label: value} to the 14 CheXpert labels through {source label: CheXpert label or None}.

    Source labels missing from `mapping` (or mapped to None) have no CheXpert counterpart and are left out
    of the result (callers keep them in Study.source_labels). Blank values mean "not mentioned".
    """
    out: dict[str, int] = {}
    for name, value in source_labels.items():
        target = mapping.get(name)
        if target is None:
            continue
        if target not in CHEXPERT_LABELS:
            raise ValueError(f"mapping sends {name!r} to {target!r}, which is not a CheXpert label; "
                             f"allowed: {list(CHEXPERT_LABELS)}")
        v = label_value(value)
        if v is None:
            continue
        if target not in out or _RANK[v] > _RANK[out[target]]:
            out[target] = v
    return out


# Section headers of radiology reports, case-insensitive. Unknown ALL-CAPS headers ("EXAMINATION:",
# "TECHNIQUE:", "WET READ:") end the section before them and are not kept.
_HEADERS = {
    "indication": ("INDICATION", "INDICATIONS", "HISTORY", "CLINICAL HISTORY", "CLINICAL INFORMATION",
                   "CLINICAL INDICATION", "REASON FOR EXAM", "REASON FOR EXAMINATION", "CLINICAL DATA"),
    "comparison": ("COMPARISON", "COMPARISONS", "PRIOR", "PRIOR STUDIES"),
    "findings": ("FINDINGS", "FINDING", "REPORT"),
    "impression": ("IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS", "SUMMARY"),
}
# Headers whose text is not report content; other unknown headers' text counts as findings when the
# report has no FINDINGS section (older MIMIC reports: "PA AND LATERAL CHEST RADIOGRAPHS: lungs are clear").
_DROPPED = {"EXAMINATION", "EXAM", "TECHNIQUE", "WET READ", "NOTIFICATION", "RECOMMENDATION", "RECOMMENDATIONS",
            "PROCEDURE", "DATE", "TIME", "ATTENDING", "REFERRING PHYSICIAN", "ADDENDUM", "DICTATED BY"}
_CANON = {h: section for section, names in _HEADERS.items() for h in names}
_KNOWN = "|".join(sorted((re.escape(h).replace(r"\ ", r"\s+") for h in _CANON), key=len, reverse=True))
_HEADER_RE = re.compile(
    rf"(?:^|(?<=\n)|(?<=\.\s)|(?<=\.))\s*(?P<known>(?i:{_KNOWN}))\s*:"  # known header, any case
    r"|(?:^|(?<=\n))[ \t]*(?P<other>[A-Z][A-Z /&()-]{2,40}):",  # other ALL-CAPS header at a line start
)


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def parse_report_sections(text: str) -> dict[str, str]:
    """Free-text report -> {"indication", "comparison", "findings", "impression"} (missing ones are "").

    Handles MIMIC style (a "FINAL REPORT" banner, "EXAMINATION:"/"TECHNIQUE:" headers that are dropped),
    headers in any case, and repeated headers (joined). Text before the first header is kept as findings
    only when the report has no headers at all (some corpora store bare findings).
    """
    text = (text or "").replace("\r\n", "\n").replace("FINAL REPORT", "\n")
    parts: dict[str, list[str]] = defaultdict(list)
    matches = list(_HEADER_RE.finditer(text))
    if not matches:
        body = _clean(text)
        return {"indication": "", "comparison": "", "findings": body, "impression": ""}
    for m, nxt in zip(matches, matches[1:] + [None]):
        header = re.sub(r"\s+", " ", (m.group("known") or m.group("other")).strip().upper())
        section = _CANON.get(header) or ("unlabelled" if header not in _DROPPED else None)
        body = _clean(text[m.end(): nxt.start() if nxt else len(text)])
        if section and body:
            parts[section].append(body)
    if not parts.get("findings") and parts.get("unlabelled"):
        parts["findings"] = parts["unlabelled"]
    return {s: " ".join(parts.get(s, [])) for s in ("indication", "comparison", "findings", "impression")}


def resize_study(study: Study, images: dict[str, np.ndarray], max_side: int) -> tuple[Study, dict[str, np.ndarray]]:
    """Downsize images so their longer side is at most `max_side`; ImageRef sizes and boxes follow.

    Boxes are given in the frame the converter declared in ImageRef width/height; after this they are in
    the stored image's pixels and every ImageRef's width/height equals its image's shape.
    """
    new_images, sizes = {}, {}
    for ref in study.images:
        img = images[ref.role]
        h, w = img.shape[:2]
        scale = min(1.0, max_side / max(h, w))
        if scale < 1.0:
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0))
        new_images[ref.role] = img
        sizes[ref.role] = (ref.width, ref.height, img.shape[1], img.shape[0])
    data = study.model_dump()
    for ref in data["images"]:
        ref["width"], ref["height"] = sizes[ref["role"]][2:]
    for phrase in data["grounding"]:
        ow, oh, nw, nh = sizes.get(phrase["image_role"], (1, 1, 1, 1))
        for box in phrase["boxes"]:
            box["x1"], box["x2"] = box["x1"] * nw / ow, box["x2"] * nw / ow
            box["y1"], box["y2"] = box["y1"] * nh / oh, box["y2"] * nh / oh
    return Study.model_validate(data), new_images


def records_digest(records: list[StudyRecord], extra: Any = None) -> str:
    """sha256 over the records (and build settings): a resumed build must be building the same thing."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for r in records:
        h.update(json.dumps([r.study_id, r.patient_id, r.split, r.study_date, r.prior_study_id, r.payload],
                            sort_keys=True, default=str).encode())
    return h.hexdigest()


_VIEWS = {
    "PA": "PA", "POSTERO_ANTERIOR": "PA", "POSTEROANTERIOR": "PA", "POSTERIOR-ANTERIOR": "PA",
    "AP": "AP", "ANTERO_POSTERIOR": "AP", "ANTEROPOSTERIOR": "AP", "AP AXIAL": "AP", "AP SUPINE": "AP",
    "LATERAL": "LATERAL", "LAT": "LATERAL", "RL": "LATERAL", "RIGHT LATERAL": "LATERAL",
    "LL": "LL", "LEFT LATERAL": "LL",
}


def normalize_view(value: Any) -> str | None:
    """A corpus' view position ("PA", "POSTERO_ANTERIOR", "LL"...) as a schema ViewPosition, or None."""
    if value is None:
        return None
    return _VIEWS.get(re.sub(r"\s+", " ", str(value).strip().upper()))


def choose_views(images: Iterable[tuple[str, str | None]]) -> dict[str, tuple[str, str]]:
    """{"frontal": (path, view), "lateral": (path, view)} from (path, normalized view) in listing order.

    The frontal is the first PA, else the first AP (PA is the standard upright view, AP the bedside one);
    the lateral is the first LATERAL, else the first LL. Images without a known view are not chosen.
    """
    images = list(images)
    out: dict[str, tuple[str, str]] = {}
    for role, preferred in (("frontal", ("PA", "AP")), ("lateral", ("LATERAL", "LL"))):
        for view in preferred:
            hit = next((p for p, v in images if v == view), None)
            if hit is not None:
                out[role] = (hit, view)
                break
    return out


def read_table(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV (optionally .gz) as dicts of strings; a missing file is the caller's error to name."""
    import csv
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def find_file(root: Path, *names: str) -> Path | None:
    """The first of `names` (relative to root, optionally also as .gz) that exists."""
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def first_present(row: dict, names: Iterable[str], default: str = "") -> str:
    """The first non-blank value among several possible column names (corpora rename columns between releases)."""
    for n in names:
        v = row.get(n)
        if v is not None and str(v).strip() and str(v).strip().lower() != "nan":
            return str(v).strip()
    return default


def count_duplicates(records: list[StudyRecord], report: BuildReport,
                     key: Callable[[StudyRecord], str] = lambda r: r.study_id) -> list[StudyRecord]:
    """Keep the first record of each study id; count the others as "duplicate_study_id"."""
    seen, kept = set(), []
    for r in records:
        k = key(r)
        if k in seen:
            report.skip("duplicate_study_id", k, "a study with this id was already listed; the first is kept")
            continue
        seen.add(k)
        kept.append(r)
    return kept

