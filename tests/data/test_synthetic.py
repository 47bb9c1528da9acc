"""Synthetic phantoms: image, report, labels, boxes and VQA must all tell the same story."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from cxrfm.data.schema import CHEXPERT_LABELS, Study
from cxrfm.data.synthetic import generate_phantoms, generate_studies, plan_studies
from cxrfm.data.synthetic.geometry import grid, lung_mask, zone_v
from cxrfm.data.synthetic.lateral import render_lateral
from cxrfm.data.synthetic.render import FrontalScene, dilate4, measure_ctr, render_frontal
from cxrfm.data.synthetic.truth import CHANGE_STATUS, DEVICE_KINDS, FINDING_KINDS, NEGATABLE, NEGATION_COVERS, Finding

SIZE = 128

# Which drawn kinds can make a label positive or uncertain ...
LABEL_SOURCES = {
    "Cardiomegaly": {"cardiomegaly"},
    "Enlarged Cardiomediastinum": {"cardiomegaly"},
    "Pleural Effusion": {"effusion"},
    "Pneumothorax": {"pneumothorax"},
    "Consolidation": {"consolidation"},
    "Lung Opacity": {"consolidation", "opacity", "edema"},
    "Lung Lesion": {"nodule", "mass"},
    "Edema": {"edema"},
    "Atelectasis": {"atelectasis"},
    "Support Devices": set(DEVICE_KINDS),
    "Pneumonia": {"consolidation"},
}
# The label a drawn kind must carry (1, or -1 when hedged).
KIND_LABEL = {
    "cardiomegaly": "Cardiomegaly",
    "effusion": "Pleural Effusion",
    "pneumothorax": "Pneumothorax",
    "consolidation": "Consolidation",
    "opacity": "Lung Opacity",
    "nodule": "Lung Lesion",
    "mass": "Lung Lesion",
    "edema": "Edema",
    "atelectasis": "Atelectasis",
    **{k: "Support Devices" for k in DEVICE_KINDS},
}
# Kinds that must be absent from the image when a label is 0 ("lungs are clear" is checked via truth.negated).
LABEL_ABSENT = dict(
    LABEL_SOURCES, **{"Lung Opacity": {"consolidation", "opacity"}, "Fracture": set(), "Pneumonia": set()}
)
# How the report names each label when it states it.
MENTION = {
    "Cardiomegaly": r"cardiomegaly|heart is enlarged|silhouette is enlarged|enlarged cardiac silhouette",
    "Enlarged Cardiomediastinum": r"cardiomediastinal silhouette is enlarged",
    "Pleural Effusion": r"effusion",
    "Pneumothorax": r"pneumothorax",
    "Consolidation": r"consolidation",
    "Lung Opacity": r"opacit|consolidation",
    "Lung Lesion": r"nodul|mass",
    "Edema": r"edema",
    "Atelectasis": r"atelectasis",
    "Support Devices": r"tube|central line|catheter|pacemaker",
    "Pneumonia": r"pneumonia",
    "Fracture": r"osseous|fracture",
}
NEGATION_MENTION = dict(
    MENTION,
    **{
        "Cardiomegaly": r"heart|cardiac|cardiomediastinal",
        "Enlarged Cardiomediastinum": r"mediastinal",
        "Lung Opacity": r"lungs are clear|opacit|consolidation",
    },
)
NEGATED = r"^(no |there is no )|has resolved|resolution of|removal of|lungs are clear|normal|intact"
HEDGED = r"possible|may represent|cannot be excluded|questionable|concerning for"
GROUNDED_BY = {
    "Lung Opacity": {"Lung Opacity", "Consolidation", "Edema"},
    "Enlarged Cardiomediastinum": {"Cardiomegaly"},
}
ZONE_WORDS = {
    "upper": "upper",
    "middle lobe": "middle",
    "lingula": "middle",
    "middle zone": "middle",
    "lower": "lower",
    "base": "lower",
}


@pytest.fixture(scope="module")
def phantoms():
    return list(generate_phantoms(num_studies=120, image_size=SIZE, seed=3))


def _sentences(study: Study) -> list[str]:
    text = f"{study.findings} {study.impression}"
    return [s.strip().lower() for s in re.split(r"(?<=\.)\s+(?=[A-Z0-9])", text) if s.strip()]


def _without(truth, finding: Finding):
    return replace(truth, findings=tuple(f for f in truth.findings if f is not finding))


def _render(truth, seed: int = 7) -> np.ndarray:
    return render_frontal(truth, SIZE, np.random.default_rng(seed)).astype(int)


def test_same_seed_same_bytes_and_json():
    a = list(generate_studies(num_studies=10, image_size=64, seed=5))
    b = list(generate_studies(num_studies=10, image_size=64, seed=5))
    c = list(generate_studies(num_studies=10, image_size=64, seed=6))
    for (sa, ia), (sb, ib) in zip(a, b):
        assert sa.model_dump_json() == sb.model_dump_json()
        assert ia.keys() == ib.keys() and all(ia[k].tobytes() == ib[k].tobytes() for k in ia)
    assert [s.model_dump_json() for s, _ in a] != [s.model_dump_json() for s, _ in c]
    assert not any(np.array_equal(ia["frontal"], ic["frontal"]) for (_, ia), (_, ic) in zip(a, c))


def test_studies_validate_and_images_match_refs(phantoms):
    for p in phantoms:
        s = p.study
        assert Study.model_validate_json(s.model_dump_json()) == s
        assert re.fullmatch(r"syn-3-\d{6}", s.study_id) and re.fullmatch(r"synp-3-\d{5}", s.patient_id)
        assert (s.source, s.license) == ("synthetic", "CC0-1.0")
        assert {im.role for im in s.images} == set(p.images)
        for ref in s.images:
            assert ref.key == f"{ref.role}.png" and (ref.width, ref.height) == (SIZE, SIZE)
            assert p.images[ref.role].dtype == np.uint8 and p.images[ref.role].shape == (SIZE, SIZE)
        assert s.image("frontal").view == p.truth.view in ("PA", "AP")
        assert {f.kind for f in p.truth.findings} <= set(FINDING_KINDS)
        assert {kind for kind, _ in p.truth.negated} <= set(NEGATABLE)
        assert {c.status for c in p.truth.changes} <= set(CHANGE_STATUS)
        assert set(s.labels) <= set(CHEXPERT_LABELS)


def test_labels_agree_with_truth_and_text(phantoms):
    for p in phantoms:
        s, t, sentences = p.study, p.truth, _sentences(p.study)
        for f in t.pathologies() + t.devices():
            value = s.labels.get(KIND_LABEL[f.kind])
            assert (value in (1, -1)) if f.uncertain else (value == 1), (s.study_id, f)
        for label, value in s.labels.items():
            if label == "No Finding":
                assert value == 1 and not t.pathologies()
                continue
            if value in (1, -1):
                assert any(f.kind in LABEL_SOURCES[label] for f in t.findings), (s.study_id, label)
            mentioned = [x for x in sentences if re.search((NEGATION_MENTION if value == 0 else MENTION)[label], x)]
            if value == 1:
                assert any(not re.search(NEGATED + "|" + HEDGED, x) for x in mentioned), (s.study_id, label)
            elif value == -1:
                assert any(re.search(HEDGED, x) for x in mentioned), (s.study_id, label)
            else:
                assert any(re.search(NEGATED, x) for x in mentioned), (s.study_id, label, sentences)
        if not t.pathologies():
            assert s.labels.get("No Finding") == 1
        for sentence in sentences:  # and the other way round: a plain statement of a finding sets its label
            if not re.search(NEGATED + "|" + HEDGED, sentence):
                for label, pattern in MENTION.items():
                    if re.search(pattern, sentence):
                        assert s.labels.get(label) == 1, (s.study_id, label, sentence)


def _hemithorax(truth, side: str) -> tuple[int, int, int, int]:
    u, v = grid(SIZE)
    ys, xs = np.nonzero(lung_mask(truth.anatomy, side, u, v))
    return xs.min() - 2, ys.min() - 2, xs.max() + 3, ys.max() + 3


def test_positive_labels_have_boxes_on_the_right_side_and_zone(phantoms):
    n_checked = 0
    for p in phantoms:
        s, t = p.study, p.truth
        for label, value in s.labels.items():
            if value == 1 and label not in ("No Finding", "Pneumonia"):
                assert any(g.label in GROUNDED_BY.get(label, {label}) for g in s.grounding), (s.study_id, label)
        mid = t.anatomy.mid * SIZE
        for g in s.grounding:
            assert s.labels.get(g.label) == 1 and g.phrase.lower() in s.findings.lower()
            assert g.boxes and all(b.clipped_inside(SIZE, SIZE) for b in g.boxes)
            if g.label in ("Support Devices", "Cardiomegaly"):
                continue
            words = set(re.findall(r"[a-z]+", g.phrase.lower()))
            sides = words & {"right", "left"} | ({"left"} if "lingula" in words else set())
            if "bilateral" in words or g.label == "Edema":
                sides = {"right", "left"}
            assert len(sides) >= 1 and len(g.boxes) == len(sides), (g.phrase, g.boxes)
            for box in g.boxes:
                side = "right" if (box.x1 + box.x2) / 2 < mid else "left"  # patient right = image left
                assert side in sides, (s.study_id, g.phrase, box)
                x0, y0, x1, y1 = _hemithorax(t, side)
                assert x0 <= box.x1 and box.x2 <= x1 and y0 <= box.y1 and box.y2 <= y1, (g.phrase, box)
                zone = next((z for w, z in ZONE_WORDS.items() if w in g.phrase.lower()), None)
                if zone is not None:
                    z0, z1 = (SIZE * z for z in zone_v(t.anatomy, zone))
                    assert z0 - 1 <= (box.y1 + box.y2) / 2 <= z1 + 1, (s.study_id, g.phrase, box, zone)
                n_checked += 1
    assert n_checked > 40


def test_drawn_findings_are_visible_and_stay_inside_their_mask(phantoms):
    """Removing a finding changes the image only within (1-2 px of) its mask, and clearly within it."""
    checked = Counter()
    for p in phantoms[:60]:
        t = p.truth
        scene, base = FrontalScene(t, SIZE), _render(t)
        for f in t.findings:
            if f.kind == "cardiomegaly":
                continue
            diff = np.abs(base - _render(_without(t, f)))
            mask = scene.finding_mask(f)
            assert mask.any(), f
            assert not (diff[~dilate4(dilate4(mask))] > 8).any(), (p.study.study_id, f.kind)
            assert diff[mask].mean() > (4 if f.uncertain else 8), (p.study.study_id, f.kind, diff[mask].mean())
            checked[f.kind] += 1
    assert len(checked) >= 8, checked


def test_negated_findings_are_not_drawn(phantoms):
    """A label of 0 (or a side the report says is clear) means nothing of that kind is on the image."""
    n_negations = 0
    for i, p in enumerate(phantoms):
        s, t = p.study, p.truth
        scene = FrontalScene(t, SIZE)
        absent = set()
        for label, value in s.labels.items():
            if value == 0:
                absent |= LABEL_ABSENT[label]
        for kind, side in t.negated:
            kinds = NEGATION_COVERS[kind]
            absent |= set(kinds) if side is None else set()
            for k in kinds:
                assert not scene.kind_mask(k, side).any(), (s.study_id, kind, side)
            n_negations += 1
        for kind in absent:
            assert not t.of_kind(kind) and not scene.kind_mask(kind).any(), (s.study_id, kind)
        if "cardiomegaly" in absent:
            assert t.ctr <= 0.5 and measure_ctr(t, SIZE) <= 0.5
        if absent and i < 30:  # and the pixels say the same
            assert np.array_equal(_render(t), _render(t.without(*absent)))
    assert n_negations > 100


def test_negation_check_can_fail(phantoms):
    """The mask test above would catch a report that negates a drawn finding."""
    p = next(p for p in phantoms if p.truth.of_kind("effusion"))
    scene = FrontalScene(p.truth, SIZE)
    assert scene.kind_mask("effusion").any()
    assert not np.array_equal(_render(p.truth), _render(p.truth.without("effusion")))


def test_ctr_above_half_iff_cardiomegaly(phantoms):
    seen = Counter()
    for p in phantoms:
        t, s = p.truth, p.study
        measured = measure_ctr(t, SIZE)
        assert abs(measured - t.ctr) < 0.03, (s.study_id, measured, t.ctr)
        assert (
            (measured > 0.5) == (t.ctr > 0.5) == (s.labels.get("Cardiomegaly") == 1) == bool(t.of_kind("cardiomegaly"))
        )
        assert float(s.source_labels["ctr"]) == pytest.approx(t.ctr, abs=1e-3)
        seen[measured > 0.5] += 1
        # bright = dense: the heart is much brighter than aerated lung
        scene, img = FrontalScene(t, SIZE), p.images["frontal"].astype(float)
        lungs = scene.visible["right"] | scene.visible["left"]
        assert img[scene.heart & ~lungs].mean() > img[lungs].mean() + 30
    assert seen[True] >= 5 and seen[False] >= 50


def test_patient_right_is_image_left(phantoms):
    t = phantoms[0].truth
    for side in ("right", "left"):
        truth = replace(t, findings=(Finding("effusion", side=side, severity="moderate"),))
        mask = FrontalScene(truth, SIZE).finding_mask(truth.findings[0])
        cols = np.nonzero(mask.any(axis=0))[0]
        assert (cols < t.anatomy.mid * SIZE).all() if side == "right" else (cols > t.anatomy.mid * SIZE).all()
        rows = np.nonzero(mask.any(axis=1))[0]
        assert rows.min() > (t.anatomy.apex + 0.5 * t.anatomy.lung_height) * SIZE  # at the base


def test_lateral_shows_effusion_posteriorly(phantoms):
    t = replace(phantoms[0].truth, findings=(Finding("effusion", side="right", severity="moderate"),))
    with_fluid = render_lateral(t, SIZE, np.random.default_rng(0)).astype(int)
    without = render_lateral(t.without("effusion"), SIZE, np.random.default_rng(0)).astype(int)
    diff = with_fluid - without
    half = SIZE // 2
    assert diff[half:, half:].mean() > 3 * max(diff[half:, :half].mean(), 0.5)  # posterior (image right), low


def test_patient_level_split_and_fractions():
    plans = plan_studies(4000, seed=2)
    split_of = {}
    for p in plans:
        assert split_of.setdefault(p.patient_id, p.split) == p.split
    counts = Counter(p.split for p in plans)
    for split, want in zip(("train", "val", "test"), (0.8, 0.1, 0.1)):
        assert abs(counts[split] / len(plans) - want) < 0.03, counts
    assert len(split_of) < len(plans)  # some patients have several studies
    uneven = Counter(p.split for p in plan_studies(4000, seed=2, split_fractions=(0.5, 0.25, 0.25)))
    assert abs(uneven["val"] / 4000 - 0.25) < 0.04
    assert sum(p.with_prior for p in plans) == round(0.3 * 4000)
    assert abs(sum(p.with_lateral for p in plans) - 0.3 * 4000) <= 1


def test_priors_are_the_same_patients_earlier_frontal(phantoms):
    by_id = {p.study.study_id: p for p in phantoms}
    n_prior = 0
    for p in phantoms:
        s = p.study
        text = f"{s.findings} {s.impression}"
        if s.prior_study_id is None:
            assert "prior" not in p.images and not p.truth.changes
            assert not re.search(r"\b(prior|previous|previously|interval)\b", text, re.I)
            assert all(q.qtype != "change" for q in s.vqa)
            continue
        n_prior += 1
        before = by_id[s.prior_study_id]
        assert before.study.patient_id == s.patient_id and before.study.split == s.split
        assert before.study.study_date < s.study_date
        assert np.array_equal(p.images["prior"], before.images["frontal"])
        assert s.image("prior").view == before.study.image("frontal").view
        assert re.search(r"\b(prior|previous|previously|interval)\b", text, re.I), text
        assert s.comparison and any(c.status != "unchanged" for c in p.truth.changes)
        assert any(q.qtype == "change" for q in s.vqa)
    assert n_prior >= 20


def test_vqa_pairs(phantoms):
    qtypes = Counter()
    for p in phantoms:
        s = p.study
        assert 5 <= len(s.vqa) <= 10
        for q in s.vqa:
            assert q.answer and q.answer == q.answer.lower() and q.question.endswith("?")
            assert q.qtype in {"presence", "laterality", "location", "size", "count", "view", "device", "change"}
            assert (q.answer in ("yes", "no")) == q.closed
            if q.qtype == "view" and not q.closed:
                assert q.answer == p.truth.view.lower()
        qtypes.update(q.qtype for q in s.vqa)
        assert "view" in {q.qtype for q in s.vqa} and "presence" in {q.qtype for q in s.vqa}
    assert len(qtypes) == 8, qtypes
    closed = [q.closed for p in phantoms for q in p.study.vqa]
    assert 0.2 < np.mean(closed) < 0.8


def test_text_is_varied(phantoms):
    studies = [p.study for p in phantoms]
    assert len({s.impression for s in studies}) > 40
    assert len({s.indication for s in studies}) > 30
    normal = {s.impression for s in studies if s.labels.get("No Finding") == 1 and not s.grounding}
    assert len(normal) >= 2
    effusion_phrases = {
        g.phrase.split(" ", 1)[-1] for s in studies for g in s.grounding if g.label == "Pleural Effusion"
    }
    assert len(effusion_phrases) >= 3
