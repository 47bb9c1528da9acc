"""Writers of tiny report corpora in their published layouts, with the awkward cases each one has.

Every writer returns a dict of what it wrote (ids, expected values) for the tests to check against.
Images: 8-bit PNG, 16-bit PNG, JPEG, DICOM MONOCHROME1 (pydicom), and unreadable bytes.
"""

from __future__ import annotations

import csv
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

# -- images -------------------------------------------------------------------------------------------


def ramp(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.add.outer(np.arange(h), np.arange(w)).astype(np.float32)
    return (base / base.max() * 200 + rng.integers(0, 40, (h, w))).astype(np.uint8)


def write_png(path: Path, h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = ramp(h, w, seed)
    Image.fromarray(img).save(path)
    return img


def write_png16(path: Path, h: int = 48, w: int = 40) -> None:
    """A 16-bit PNG using only 0..4095 (12-bit detector data): must be scaled to the full 8-bit range."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.add.outer(np.arange(h), np.arange(w)) * (4095 / (h + w - 2))).astype(np.uint16)
    Image.fromarray(arr).save(path)


@lru_cache(maxsize=1)
def _phantom_views() -> list[dict[str, np.ndarray]]:
    """Frontal + lateral pairs of synthetic phantoms (64 px): fixtures whose view is read from the pixels."""
    from cxrfm.data.synthetic import generate_phantoms

    return [p.images for p in generate_phantoms(40, 64, 3) if "lateral" in p.images][:6]


def write_view(path: Path, view: str, seed: int = 0, bits: int = 8) -> None:
    """A chest-like radiograph of the given view ("frontal" / "lateral"), 8-bit or 12-bit-in-16 PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = _phantom_views()[seed % len(_phantom_views())][view]
    if bits == 16:
        img = (img.astype(np.uint32) * 4095 // 255).astype(np.uint16)  # detector-style 12-bit data
    Image.fromarray(img).save(path)


def write_jpeg(path: Path, h: int = 48, w: int = 40, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ramp(h, w, seed)).save(path, format="JPEG", quality=95)


def write_dicom_monochrome1(path: Path, h: int = 48, w: int = 40) -> np.ndarray:
    """MONOCHROME1 (low = white), 12-bit, no stored window: decodes to 255 - full-range scaling."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "DX", h, w
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    arr = (np.add.outer(np.arange(h), np.zeros(w)) * (4095 / (h - 1))).astype(np.uint16)  # rows get brighter
    ds.PixelData = arr.tobytes()
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    return arr


def write_garbage(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff" + b"not really a jpeg" * 10)


def write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in header})


MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough  // eval for pneumonia

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 Mild cardiomegaly. No focal consolidation.  Possible trace edema.

 IMPRESSION:

 Mild cardiomegaly without acute process.
"""


# -- MIMIC-CXR-JPG ------------------------------------------------------------------------------------


def write_mimic(root: Path) -> dict:
    """Studies (p10 subjects):
    s50000001  subject 10000032, 2180-01-01: PA (300x200 JPEG, downsized) + LATERAL, full report, labels
    s50000002  subject 10000032, 2180-06-01: AP + LL + a second AP (three images) -> prior = s50000001's PA
    s50000003  subject 10000033: one DICOM MONOCHROME1 (no .jpg), impression-only report, split validate
    s50000004  subject 10000034: PA + an image with no ViewPosition (not used), split test
    s50000005  subject 10000034: only an unreadable JPEG -> skipped at load
    s50000006  subject 10000034: listed image missing on disk -> skipped at scan
    s50000007  subject 10000035: no report file -> skipped at scan
    s50000008  subject 10000035, later: its prior is s50000007's PA although s50000007 has no report
    and a metadata row reusing study 50000001 for another subject (duplicate study id).
    """
    meta, split, labels = [], [], []

    def image(subject, study, dicom, view, date, time="120000.000", kind="jpg", split_name="train", **kw):
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        if kind == "jpg":
            write_jpeg(folder / f"{dicom}.jpg", **kw)
        elif kind == "dcm":
            write_dicom_monochrome1(folder / f"{dicom}.dcm")
        elif kind == "garbage":
            write_garbage(folder / f"{dicom}.jpg")
        meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": view,
                     "StudyDate": date, "StudyTime": time, "Rows": "48", "Columns": "40"})
        split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": split_name})

    def text(subject, study, body):
        p = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(body)

    image("10000032", "50000001", "d1-pa", "PA", "21800101", h=200, w=300)
    image("10000032", "50000001", "d1-lat", "LATERAL", "21800101", seed=1)
    text("10000032", "50000001", MIMIC_REPORT)
    image("10000032", "50000002", "d2-ap", "AP", "21800601", "083000.5", seed=2)
    image("10000032", "50000002", "d2-ll", "LL", "21800601", "083000.5", seed=3)
    image("10000032", "50000002", "d2-ap2", "AP", "21800601", "083000.5", seed=4)
    text("10000032", "50000002", " FINAL REPORT\n FINDINGS: Stable cardiomegaly.\n IMPRESSION: No change.")
    image("10000033", "50000003", "d3-dcm", "PA", "21900101", kind="dcm", split_name="validate")
    text("10000033", "50000003", "FINAL REPORT\n IMPRESSION: No acute cardiopulmonary process.")
    image("10000034", "50000004", "d4-pa", "PA", "21900101", split_name="test", seed=5)
    image("10000034", "50000004", "d4-noview", "", "21900101", split_name="test", seed=6)
    text("10000034", "50000004", "FINDINGS: Clear lungs.\nIMPRESSION: Normal.")
    image("10000034", "50000005", "d5-bad", "PA", "21900301", kind="garbage", split_name="test")
    text("10000034", "50000005", "FINDINGS: Clear lungs.\nIMPRESSION: Normal.")
    image("10000034", "50000006", "d6-gone", "PA", "21900401", kind="none", split_name="test")
    text("10000034", "50000006", "FINDINGS: Clear lungs.\nIMPRESSION: Normal.")
    image("10000035", "50000007", "d7-pa", "PA", "21900101", seed=7)
    image("10000035", "50000008", "d8-pa", "PA", "21900202", seed=9)
    text("10000035", "50000008", "FINDINGS: Clear lungs.\nIMPRESSION: Normal.")
    image("10000099", "50000001", "d99-pa", "PA", "21800101", seed=8)  # study id reused by another subject

    labels = [{"subject_id": "10000032", "study_id": "50000001", "Cardiomegaly": "1.0", "Edema": "-1.0",
               "Pleural Effusion": "0.0"},
              {"subject_id": "10000032", "study_id": "50000002", "Cardiomegaly": "1.0", "No Finding": ""}]
    from cxrfm.data.schema import CHEXPERT_LABELS

    write_csv(root / "mimic-cxr-2.0.0-metadata.csv", ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
              "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime"], meta)
    write_csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], split)
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *CHEXPERT_LABELS], labels)
    return {"written": ["mimic-s50000001", "mimic-s50000002", "mimic-s50000003", "mimic-s50000004", "mimic-s50000008"]}


# -- CheXpert Plus ------------------------------------------------------------------------------------

CHEXPERT_PLUS_COLUMNS = ["path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id",
                         "patient_report_date_order", "report", "section_narrative", "section_clinical_history",
                         "section_history", "section_comparison", "section_technique", "section_procedure_comments",
                         "section_findings", "section_impression", "section_end_of_impression", "section_summary",
                         "section_accession_number", "age", "sex", "race", "ethnicity", "interpreter_needed",
                         "insurance_type", "recent_bmi", "deceased", "split"]


def write_chexpert_plus(root: Path) -> dict:
    """patient00001: study1 (16-bit PNG frontal AP + lateral), study2 (frontal, prior = study1);
    patient00002 (valid): study1 with only a report column (sections parsed from it), frontal with blank ap_pa
    plus a PA; patient00003: study1 whose image file is missing; patient00004: study1 empty report."""
    rows = []

    def row(path, fl, ap_pa, patient, order, split="train", png="png", **sections):
        p = root / "PNG" / Path(path).with_suffix(".png")
        if png == "png16":
            write_png16(p)
        elif png == "png":
            write_png(p, seed=len(rows))
        rows.append({"path_to_image": path, "path_to_dcm": path.replace(".jpg", ".dcm"), "frontal_lateral": fl,
                     "ap_pa": ap_pa, "deid_patient_id": patient, "patient_report_date_order": order, "split": split,
                     **sections})

    s1 = {"section_clinical_history": "Shortness of breath.", "section_comparison": "None.",
          "section_findings": "Small left pleural effusion.", "section_impression": "Small left effusion."}
    row("train/patient00001/study1/view1_frontal.jpg", "Frontal", "AP", "PAT1", "1", png="png16", **s1)
    row("train/patient00001/study1/view2_lateral.jpg", "Lateral", "", "PAT1", "1", **s1)
    row("train/patient00001/study2/view1_frontal.jpg", "Frontal", "PA", "PAT1", "2",
        section_findings="Effusion resolved.", section_impression="Resolved.")
    row("valid/patient00002/study1/view1_frontal.jpg", "Frontal", "", "PAT2", "1", split="valid",
        report="HISTORY: fever. FINDINGS: Right lower lobe consolidation. IMPRESSION: Pneumonia.")
    row("valid/patient00002/study1/view2_frontal.jpg", "Frontal", "PA", "PAT2", "1", split="valid",
        report="HISTORY: fever. FINDINGS: Right lower lobe consolidation. IMPRESSION: Pneumonia.")
    row("train/patient00003/study1/view1_frontal.jpg", "Frontal", "PA", "PAT3", "1", png="none",
        section_findings="Normal.", section_impression="Normal.")
    row("train/patient00004/study1/view1_frontal.jpg", "Frontal", "PA", "PAT4", "1")
    write_csv(root / "df_chexpert_plus_240401.csv", CHEXPERT_PLUS_COLUMNS, rows)
    labels = [{"path_to_image": "train/patient00001/study1/view1_frontal.jpg", "Pleural Effusion": 1.0, "Edema": None},
              {"path_to_image": "train/patient00001/study1/view2_lateral.jpg", "Pleural Effusion": -1.0, "Cardiomegaly": 0.0},
              {"path_to_image": "valid/patient00002/study1/view1_frontal.jpg", "Pneumonia": -1.0, "Consolidation": 1.0}]
    (root / "chexbert_labels").mkdir(parents=True, exist_ok=True)
    (root / "chexbert_labels" / "report_fixed.json").write_text("\n".join(json.dumps(r) for r in labels))
    return {}


# -- ReXGradient-160K ---------------------------------------------------------------------------------


def write_rexgradient(root: Path) -> dict:
    """train: S1 (PA + LATERAL + a third PA -> extra image), S2 same patient later (prior = S1's PA);
    valid: S3 impression only, DICOM MONOCHROME1 frontal; test (CSV form, one row per image): S4 with an
    image whose view is "UNKNOWN" plus an AP; duplicate S1 entry in valid; S5 whose only image is missing."""
    img = root / "deid_png"
    write_png(img / "s1" / "a.png", seed=1)
    write_png(img / "s1" / "b.png", seed=2)
    write_png(img / "s1" / "c.png", seed=3)
    write_png(img / "s2" / "a.png", seed=4)
    write_dicom_monochrome1(img / "s3" / "a.dcm")
    write_png(img / "s4" / "a.png", seed=5)
    write_png(img / "s4" / "b.png", seed=6)

    def entry(uid, patient, date, paths, views, findings="", impression="", indication="", comparison=""):
        return {"id": f"id-{uid}", "PatientID": patient, "PatientSex": "F", "PatientAge": "061Y", "StudyInstanceUid": uid,
                "StudyDate": date, "ImagePath": paths, "ImageViewPosition": views, "Indication": indication,
                "Comparison": comparison, "Findings": findings, "Impression": impression}

    train = [entry("1.2.3.1", "P1", "20200101", ["deid_png/s1/a.png", "deid_png/s1/b.png", "deid_png/s1/c.png"],
                   ["PA", "LATERAL", "PA"], "Heart size normal.", "No acute disease.", "Cough.", "None."),
             entry("1.2.3.2", "P1", "20200301", ["deid_png/s2/a.png"], ["POSTERO_ANTERIOR"], "Unchanged.", "Stable."),
             entry("1.2.3.5", "P5", "20200301", ["deid_png/s5/gone.png"], ["PA"], "x", "y")]
    valid = [entry("1.2.3.3", "P3", "20210101", ["deid_png/s3/a.dcm"], ["PA"], impression="Normal chest."),
             entry("1.2.3.1", "P1", "20200101", ["deid_png/s1/a.png", "deid_png/s1/b.png"], ["PA", "LATERAL"], "dup", "dup")]
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    (root / "metadata" / "train_metadata.json").write_text(json.dumps(train))
    (root / "metadata" / "valid_metadata.json").write_text(json.dumps({e["id"]: e for e in valid}))
    header = ["id", "PatientID", "StudyInstanceUid", "StudyDate", "ImagePath", "ImageViewPosition", "Findings", "Impression"]
    write_csv(root / "metadata" / "test_metadata.csv", header, [
        {"id": "id-4", "PatientID": "P4", "StudyInstanceUid": "1.2.3.4", "StudyDate": "20220101",
         "ImagePath": "deid_png/s4/a.png", "ImageViewPosition": "UNKNOWN", "Findings": "Low volumes.", "Impression": "No acute."},
        {"id": "id-4", "PatientID": "P4", "StudyInstanceUid": "1.2.3.4", "StudyDate": "20220101",
         "ImagePath": "deid_png/s4/b.png", "ImageViewPosition": "AP", "Findings": "Low volumes.", "Impression": "No acute."}])
    return {}


# -- IU X-ray -----------------------------------------------------------------------------------------

OPENI_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
  <meta type="rr"/>
  <uId id="CXR{n}"/>
  <IUXRId id="{n}"/>
  <licenseType>open-access</licenseType>
  <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
    <Article PubModel="Electronic">
      <ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>
      <Abstract>
        <AbstractText Label="COMPARISON">{comparison}</AbstractText>
        <AbstractText Label="INDICATION">{indication}</AbstractText>
        <AbstractText Label="FINDINGS">{findings}</AbstractText>
        <AbstractText Label="IMPRESSION">{impression}</AbstractText>
      </Abstract>
    </Article>
  </MedlineCitation>
  <MeSH>
{mesh}
  </MeSH>
{images}
</eCitation>
"""


def _xml(n, images, findings="", impression="", indication="", comparison="", major=(), automatic=()):
    mesh = "\n".join([f"    <major>{m}</major>" for m in major] + [f"    <automatic>{a}</automatic>" for a in automatic])
    imgs = "\n".join(f'  <parentImage id="{i}">\n    <figureId>F1</figureId>\n    <caption>Xray Chest PA and Lateral</caption>\n  </parentImage>' for i in images)
    return OPENI_XML.format(n=n, findings=findings, impression=impression, indication=indication,
                            comparison=comparison, mesh=mesh, images=imgs)


def write_iu_xray(root: Path, r2gen: bool = True) -> dict:
    """Reports 1 (two PNGs listed lateral first, MeSH Cardiomegaly + Pulmonary Artery), 2 (impression only,
    16-bit PNG, normal), 3 (second image missing), 4 (empty findings and impression), 5 (a lateral only),
    plus a duplicate of 1 in test."""
    xml_dir = root / "ecgen-radiology"
    xml_dir.mkdir(parents=True, exist_ok=True)
    (xml_dir / "1.xml").write_text(_xml(1, ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"], "Borderline cardiomegaly.",
                                        "No acute pulmonary findings.", "Preop.", "None.",
                                        major=["Cardiomegaly/borderline", "Pulmonary Artery/enlarged"],
                                        automatic=["Cardiomegaly"]))
    (xml_dir / "2.xml").write_text(_xml(2, ["CXR2_IM-0652-1001"], impression="Normal chest x-XXXX.", major=["normal"]))
    (xml_dir / "3.xml").write_text(_xml(3, ["CXR3_IM-1384-1001", "CXR3_IM-1384-2001"], "Clear lungs.", "Normal."))
    (xml_dir / "4.xml").write_text(_xml(4, ["CXR4_IM-2050-1001"]))
    (xml_dir / "5.xml").write_text(_xml(5, ["CXR5_IM-2117-2001"], "No pleural effusion.", "Normal lateral view."))
    if r2gen:
        images = root / "images"
        write_view(images / "CXR1_1_IM-0001" / "0.png", "lateral", seed=1)  # the lateral is listed first
        write_view(images / "CXR1_1_IM-0001" / "1.png", "frontal", seed=1)
        write_view(images / "CXR2_IM-0652" / "0.png", "frontal", seed=2, bits=16)
        write_view(images / "CXR3_IM-1384" / "0.png", "frontal", seed=3)
        write_view(images / "CXR4_IM-2050" / "0.png", "frontal", seed=4)
        write_view(images / "CXR5_IM-2117" / "0.png", "lateral", seed=5)

        def item(i, paths, split, report="raw r2gen text."):
            return {"id": i, "report": report, "image_path": paths, "split": split}

        ann = {"train": [item("CXR1_1_IM-0001", ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png"], "train"),
                         item("CXR3_IM-1384", ["CXR3_IM-1384/0.png", "CXR3_IM-1384/1.png"], "train"),
                         item("CXR4_IM-2050", ["CXR4_IM-2050/0.png"], "train"),
                         item("CXR5_IM-2117", ["CXR5_IM-2117/0.png"], "train")],
               "val": [item("CXR2_IM-0652", ["CXR2_IM-0652/0.png"], "val")],
               "test": [item("CXR1_1_IM-0001", ["CXR1_1_IM-0001/0.png"], "test")]}
        (root / "annotation.json").write_text(json.dumps(ann))
    else:
        png = root / "NLMCXR_png"
        write_view(png / "CXR1_1_IM-0001-3001.png", "lateral", seed=1)  # listed (and sorted) first
        write_view(png / "CXR1_1_IM-0001-4001.png", "frontal", seed=1)
        write_view(png / "CXR2_IM-0652-1001.png", "frontal", seed=2, bits=16)
        write_view(png / "CXR3_IM-1384-1001.png", "frontal", seed=3)
        write_view(png / "CXR4_IM-2050-1001.png", "frontal", seed=4)
        write_view(png / "CXR5_IM-2117-2001.png", "lateral", seed=5)
    return {}
