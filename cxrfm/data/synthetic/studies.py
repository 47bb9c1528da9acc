"""Studies from phantoms: plan who is imaged when, then draw, render and describe each exam.

Same seed, same bytes; the split is per patient (see the package docstring for how the parts fit).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from cxrfm.data.schema import Box, GroundedPhrase, ImageRef, Study
from cxrfm.data.synthetic.lateral import render_lateral
from cxrfm.data.synthetic.render import FrontalScene, finding_mask, measure_ctr, render_frontal
from cxrfm.data.synthetic.sampling import Patient, evolve_truth, sample_patient, sample_truth
from cxrfm.data.synthetic.text import write_report
from cxrfm.data.synthetic.truth import Change, Finding, PhantomTruth, diff_findings
from cxrfm.data.synthetic.vqa import write_vqa

__all__ = [
    "Change",
    "Finding",
    "Phantom",
    "PhantomTruth",
    "StudyPlan",
    "finding_mask",
    "generate_phantoms",
    "generate_studies",
    "measure_ctr",
    "plan_studies",
    "render_frontal",
    "render_lateral",
    "split_of",
]

SOURCE = "synthetic"
LICENSE = "CC0-1.0"
# Independent random streams per study, so e.g. the text never shifts the image noise.
_TRUTH, _FRONTAL, _LATERAL, _TEXT = 1, 2, 3, 4


@dataclass(frozen=True)
class StudyPlan:
    """Who, when and what images, decided for all studies before anything is drawn."""

    index: int
    study_id: str
    patient_id: str
    split: str
    sequence: int  # 0 for the patient's first exam
    date: str  # ISO date; a patient's exams are in index order
    previous_index: int | None  # the patient's previous exam
    with_prior: bool
    with_lateral: bool


@dataclass
class Phantom:
    """A study with its images and the ground truth both were made from."""

    study: Study
    images: dict[str, np.ndarray]
    truth: PhantomTruth
    prior_truth: PhantomTruth | None = None


def split_of(patient_id: str, seed: int, fractions=(0.8, 0.1, 0.1)) -> str:
    """Patient-level split from a hash of (seed, patient id): stable, and independent of study order."""
    total = float(sum(fractions))
    h = int.from_bytes(hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()[:8], "big") / 2.0**64
    cut_train, cut_val = fractions[0] / total, (fractions[0] + fractions[1]) / total
    return "train" if h < cut_train else "val" if h < cut_val else "test"


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**63, index, stream])


def plan_studies(
    num_studies: int,
    seed: int = 0,
    num_patients: int | None = None,
    split_fractions=(0.8, 0.1, 0.1),
    prior_fraction: float = 0.3,
    lateral_fraction: float = 0.3,
) -> list[StudyPlan]:
    """Assign studies to patients, dates, splits, priors and laterals.

    By default there are about 0.75 x num_studies patients, fewer when prior_fraction asks for more
    follow-up exams than that leaves (only a follow-up can carry a prior).
    """
    if num_studies <= 0:
        return []
    rng = _rng(seed, 0, 0)
    if num_patients is None:
        num_patients = round(num_studies * min(0.75, 1.0 - prior_fraction))
    num_patients = int(min(max(num_patients, 1), num_studies))
    # every patient gets one exam, the rest go to random patients; shuffled so exams interleave
    owners = np.concatenate([np.arange(num_patients), rng.integers(0, num_patients, num_studies - num_patients)])
    rng.shuffle(owners)
    last_date: dict[int, dt.date] = {}
    last_index: dict[int, int] = {}
    seq: dict[int, int] = {}
    rows = []
    for index, n in enumerate(owners.tolist()):
        if n in last_date:
            date = last_date[n] + dt.timedelta(days=int(rng.integers(2, 400)))
        else:
            date = dt.date(2012, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3650)))
        rows.append((index, n, seq.get(n, 0), date, last_index.get(n)))
        last_date[n], last_index[n], seq[n] = date, index, seq.get(n, 0) + 1
    follow_ups = [r[0] for r in rows if r[2] > 0]
    n_prior = min(round(prior_fraction * num_studies), len(follow_ups))
    with_prior = set(rng.choice(follow_ups, n_prior, replace=False).tolist()) if n_prior else set()
    n_lateral = min(round(lateral_fraction * num_studies), num_studies)
    with_lateral = set(rng.choice(num_studies, n_lateral, replace=False).tolist()) if n_lateral else set()
    plans = []
    for index, n, sequence, date, previous in rows:
        patient_id = f"synp-{seed}-{n:05d}"
        plans.append(
            StudyPlan(
                index=index,
                study_id=f"syn-{seed}-{index:06d}",
                patient_id=patient_id,
                split=split_of(patient_id, seed, split_fractions),
                sequence=sequence,
                date=date.isoformat(),
                previous_index=previous,
                with_prior=index in with_prior,
                with_lateral=index in with_lateral,
            )
        )
    return plans


def _bbox(mask: np.ndarray) -> Box:
    ys, xs = np.nonzero(mask)
    return Box(x1=float(xs.min()), y1=float(ys.min()), x2=float(xs.max() + 1), y2=float(ys.max() + 1))


def finding_boxes(scene: FrontalScene, findings) -> list[Box]:
    """Boxes (pixel edges) around where the findings are drawn; a bilateral finding gets one box per side."""
    boxes = []
    for f in findings:
        mask = scene.finding_mask(f)
        parts = [mask & scene.half("right"), mask & scene.half("left")] if f.side == "bilateral" else [mask]
        parts = [p for p in parts if p.any()]
        if not parts:
            raise RuntimeError(f"grounded finding {f} is not visible on the image; placement is broken")
        boxes += [_bbox(p) for p in parts]
    return boxes


def _image_refs(plan: StudyPlan, truth: PhantomTruth, prior: PhantomTruth | None, size: int) -> list[ImageRef]:
    refs = [ImageRef(role="frontal", key="frontal.png", view=truth.view, width=size, height=size)]
    if plan.with_lateral:
        refs.append(ImageRef(role="lateral", key="lateral.png", view="LATERAL", width=size, height=size))
    if prior is not None:
        refs.append(ImageRef(role="prior", key="prior.png", view=prior.view, width=size, height=size))
    return refs


def generate_phantoms(
    num_studies: int = 600,
    image_size: int = 128,
    seed: int = 0,
    num_patients: int | None = None,
    split_fractions=(0.8, 0.1, 0.1),
    prior_fraction: float = 0.3,
    lateral_fraction: float = 0.3,
    only: set[int] | None = None,
) -> Iterator[Phantom]:
    """Like generate_studies, but also yields each study's ground truth (and its prior's).

    `only` (study indices) yields just those studies, byte for byte as in the full run: the cheap truth
    draws still run for every earlier study (a patient's findings evolve exam by exam), but only the
    studies asked for, and the prior frontals they show, are rendered. The shard builder uses it to
    generate shards in parallel.
    """
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 (nodules and lines are sub-pixel below), got {image_size}")
    plans = plan_studies(num_studies, seed, num_patients, split_fractions, prior_fraction, lateral_fraction)
    last: dict[str, tuple[Patient, PhantomTruth, StudyPlan]] = {}  # patient id -> their previous exam
    wanted_as_prior = {p.previous_index for p in plans if p.with_prior}
    kept_frontals: dict[int, np.ndarray] = {}  # frontal images a later study shows as its prior
    if only is not None:
        last_wanted = max(only, default=-1)
        plans = plans[: last_wanted + 1]
    for plan in plans:
        rng = _rng(seed, plan.index, _TRUTH)
        previous = last.get(plan.patient_id)
        if previous is None:
            patient = sample_patient(rng)
            truth = sample_truth(rng, patient)
        else:
            patient = previous[0]
            truth = evolve_truth(rng, patient, previous[1])
        prior = previous[1] if plan.with_prior and previous is not None else None
        if prior is not None:
            truth = replace(truth, changes=diff_findings(prior, truth))
        last[plan.patient_id] = (patient, truth, plan)
        if only is not None and plan.index not in only:
            continue

        scene = FrontalScene(truth, image_size)
        images = {"frontal": scene.render(_rng(seed, plan.index, _FRONTAL))}
        if plan.with_lateral:
            images["lateral"] = render_lateral(truth, image_size, _rng(seed, plan.index, _LATERAL))
        if prior is not None and only is not None and previous[2].index not in kept_frontals:
            # the previous exam was not rendered in this subset: render its frontal the same way
            kept_frontals[previous[2].index] = FrontalScene(prior, image_size).render(_rng(seed, previous[2].index, _FRONTAL))
        if prior is not None:  # the previous exam's frontal.png, byte for byte
            images["prior"] = kept_frontals.pop(previous[2].index)
        if plan.index in wanted_as_prior:
            kept_frontals[plan.index] = images["frontal"].copy()  # callers may modify theirs

        text_rng = random.Random(int(_rng(seed, plan.index, _TEXT).integers(2**62)))
        report = write_report(truth, text_rng, prior_date=previous[2].date if prior is not None else None)
        study = Study(
            study_id=plan.study_id,
            patient_id=plan.patient_id,
            split=plan.split,
            source=SOURCE,
            license=LICENSE,
            images=_image_refs(plan, truth, prior, image_size),
            indication=report.indication,
            comparison=report.comparison,
            findings=report.findings,
            impression=report.impression,
            labels=report.labels,
            source_labels={"ctr": f"{truth.ctr:.3f}", "pixel_spacing_cm": f"{truth.pixel_spacing_cm(image_size):.4f}"},
            grounding=[
                GroundedPhrase(phrase=g.phrase, label=g.label, boxes=finding_boxes(scene, g.findings))
                for g in report.grounded
            ],
            vqa=write_vqa(truth, text_rng),
            prior_study_id=previous[2].study_id if prior is not None else None,
            study_date=plan.date,
        )
        yield Phantom(study, images, truth, prior)


def generate_studies(
    num_studies: int = 600,
    image_size: int = 128,
    seed: int = 0,
    num_patients: int | None = None,
    split_fractions=(0.8, 0.1, 0.1),
    prior_fraction: float = 0.3,
    lateral_fraction: float = 0.3,
) -> Iterator[tuple[Study, dict[str, np.ndarray]]]:
    """(Study, images) pairs; images maps each role in study.images to a uint8 (H, W) grayscale array."""
    for p in generate_phantoms(
        num_studies, image_size, seed, num_patients, split_fractions, prior_fraction, lateral_fraction
    ):
        yield p.study, p.images
