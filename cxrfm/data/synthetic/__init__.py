"""Synthetic chest X-ray studies: parametric phantoms with reports, CheXpert labels, boxes and VQA pairs.

    from cxrfm.data.synthetic import generate_studies
    for study, images in generate_studies(num_studies=600, image_size=128, seed=0):
        images["frontal"]  # uint8 (H, W); also "lateral" and "prior" when study.images lists them

The parts, in the order data flows through them for one exam:

    studies.plan_studies    who is imaged when, with which views (all studies decided up front)
      -> sampling           random ground truth (truth.PhantomTruth): a patient's anatomy, the first
                            exam's findings, a follow-up's interval change (truth.py holds the types)
      -> render, lateral    the frontal and lateral radiographs of that truth (geometry.py: the
                            closed-form lungs, heart, zones and device paths both views draw)
      -> text, vqa          report + CheXpert labels (sentences from phrases.py) and VQA pairs,
                            written from the same truth
      -> studies.generate_studies   one (Study, images) per exam, boxes measured on the rendered masks

Image, report, labels, boxes and answers agree because all come from one truth. A patient keeps their
anatomy across exams; a follow-up evolves the previous exam's findings, and its prior.png is that exam's
frontal image byte for byte. The split is per patient. Same seed, same bytes.
"""

from cxrfm.data.synthetic.studies import (
    LICENSE,
    SOURCE,
    Change,
    Finding,
    Phantom,
    PhantomTruth,
    StudyPlan,
    finding_mask,
    generate_phantoms,
    generate_studies,
    measure_ctr,
    plan_studies,
    render_frontal,
    render_lateral,
    split_of,
)

__all__ = [
    "LICENSE",
    "SOURCE",
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
