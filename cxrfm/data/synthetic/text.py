"""Report text and CheXpert labels from a phantom's ground truth.

Every sentence is written together with the labels it implies, so the labels are, by construction, what
a labeler would read from the text: a stated finding is 1, a hedged one -1, an explicitly absent one 0,
and anything not mentioned is left out. Positive finding phrases are returned with the findings they
refer to; the caller turns those into boxes on the frontal image. Sentences for present findings come
from phrases.py; negations, interval change, indication and impression are written here.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from cxrfm.data.synthetic.phrases import (
    KIND_LABELS,
    NEGATION_LABELS,
    Grounded,
    Writer,
    airspace,
    atelectasis,
    cap,
    devices,
    edema,
    effusions,
    heart,
    lesions,
    pneumothorax,
)
from cxrfm.data.synthetic.truth import PhantomTruth


@dataclass
class ReportText:
    """The text fields of a Study, its labels, and the positive phrases to ground."""

    indication: str
    comparison: str
    findings: str
    impression: str
    labels: dict[str, int]
    grounded: list[Grounded] = field(default_factory=list)


# ---------------------------------------------------------------- negations and resolved findings


def _negations(w: Writer) -> None:
    """Explicitly absent findings: whole kinds ("No pleural effusion.") or one side ("No left effusion.")."""
    neg = [n for n in w.truth.negated if n[0] != "cardiomegaly"]
    whole = {k for k, s in neg if s is None}
    if {"consolidation", "effusion", "pneumothorax"} <= whole and w.rng.random() < 0.4:
        w.say(
            "No focal consolidation, pleural effusion, or pneumothorax.",
            ["Consolidation", "Pleural Effusion", "Pneumothorax"],
            0,
        )
        whole -= {"consolidation", "effusion", "pneumothorax"}
    if "lungs_clear" in whole:
        w.say(
            w.pick(
                ["The lungs are clear.", "Lungs are clear bilaterally.", "The lungs are clear without focal opacity."]
            ),
            NEGATION_LABELS["lungs_clear"],
            0,
        )
    if "consolidation" in whole:
        w.say(
            w.pick(["No focal consolidation.", "There is no focal consolidation.", "No consolidation is seen."]),
            ["Consolidation"],
            0,
        )
    if "nodule" in whole:
        w.say(
            w.pick(["No suspicious pulmonary nodules or masses.", "No pulmonary nodule or mass is identified."]),
            ["Lung Lesion"],
            0,
        )
    if "edema" in whole:
        w.say(
            w.pick(["No pulmonary edema.", "No evidence of pulmonary edema.", "There is no pulmonary edema."]),
            ["Edema"],
            0,
        )
    if {"effusion", "pneumothorax"} <= whole:
        w.say(
            w.pick(
                [
                    "No pleural effusion or pneumothorax.",
                    "There is no pleural effusion or pneumothorax.",
                    "No effusion or pneumothorax is seen.",
                ]
            ),
            ["Pleural Effusion", "Pneumothorax"],
            0,
        )
    elif "effusion" in whole:
        w.say(
            w.pick(["No pleural effusion.", "There is no pleural effusion.", "No effusion is seen."]),
            ["Pleural Effusion"],
            0,
        )
    elif "pneumothorax" in whole:
        w.say(
            w.pick(["No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is seen."]), ["Pneumothorax"], 0
        )
    for kind, side in neg:
        if side is not None:
            name = "pleural effusion" if kind == "effusion" else "pneumothorax"
            w.say(w.pick([f"No {side} {name}.", f"There is no {side} {name}."]), NEGATION_LABELS[kind], 0)


DEVICE_WORDS = {"ett": "endotracheal tube", "central_line": "central venous catheter", "pacemaker": "pacemaker"}
NAMES = {
    "effusion": "pleural effusion",
    "pneumothorax": "pneumothorax",
    "consolidation": "consolidation",
    "opacity": "opacity",
    "nodule": "nodule",
    "mass": "mass",
    "edema": "pulmonary edema",
    "atelectasis": "atelectasis",
}


def _resolved(w: Writer) -> None:
    for c in w.truth.changes:
        if c.status == "resolved" and c.kind in DEVICE_WORDS:
            w.say(f"Interval removal of the {DEVICE_WORDS[c.kind]}.")
            continue
        if c.status != "resolved" or c.kind not in NAMES:
            continue
        where = f" in the {c.side} {c.zone} zone" if c.zone else ""
        side = f"{c.side} " if c.side in ("right", "left") and not c.zone else ""
        name = f"{side}{NAMES[c.kind]}{where}"
        w.say(
            w.pick(
                [f"Interval resolution of the previously seen {name}.", f"The previously noted {name} has resolved."]
            ),
            KIND_LABELS[c.kind],
            0,
        )
        if w.rng.random() < 0.6:
            w.impression.append(f"Interval resolution of the {name}.")


def _bones(w: Writer) -> None:
    if ("fracture", None) in w.truth.negated:
        w.say(
            w.pick(
                ["No acute osseous abnormality.", "No displaced rib fracture.", "The osseous structures are intact."]
            ),
            ["Fracture"],
            0,
        )


def _compared(w: Writer) -> None:
    """With a prior, make sure the findings say what changed (hedged findings carry no change clause)."""
    if not w.truth.changes or any(COMPARISON_WORDS.search(s) for s in w.sentences):
        return
    c = next((c for c in w.truth.changes if c.status != "unchanged"), None)
    if c is None:
        w.say(w.pick(["No significant interval change since the prior study.", "Unchanged compared with the prior."]))
        return
    f = c.after or c.before
    name = DEVICE_WORDS.get(c.kind) or NAMES[c.kind]
    name = (
        f"{name} in the {c.side} {c.zone} zone"
        if c.zone
        else f"{c.side} {name}" if c.side in ("right", "left") else name
    )
    verb = {"new": "is new", "increased": "has increased", "decreased": "has decreased", "resolved": "has resolved"}[
        c.status
    ]
    hedge = "possible " if f.uncertain else ""
    w.say(f"Compared with the prior study, the {hedge}{name} {verb}.")


COMPARISON_WORDS = re.compile(r"\b(prior|previous|previously|interval)\b", re.I)


# ---------------------------------------------------------------- indication, comparison, assembly


def indication(truth: PhantomTruth, rng: random.Random, has_prior: bool) -> str:
    """Clinical question, loosely tied to what the exam shows (as real requests are)."""
    kinds = {f.kind for f in truth.findings}
    new = {c.kind for c in truth.changes if c.status == "new"}
    reasons = ["chest pain", "shortness of breath", "cough", "preoperative evaluation", "fever"]
    if "ett" in kinds:
        reasons += ["intubated patient, evaluate endotracheal tube position"] * 3
    if "central_line" in new or ("central_line" in kinds and not has_prior):
        reasons += ["line placement", "status post central line placement"] * 2
    if "pacemaker" in kinds:
        reasons += ["pacemaker check", "syncope, history of pacemaker"]
    if kinds & {"effusion", "edema", "cardiomegaly"}:
        reasons += ["shortness of breath", "dyspnea", "congestive heart failure", "leg swelling and dyspnea"]
    if kinds & {"consolidation", "opacity"}:
        reasons += ["fever and cough", "productive cough", "evaluate for pneumonia"]
    if "pneumothorax" in kinds:
        reasons += ["sudden onset chest pain", "acute shortness of breath"]
    if kinds & {"nodule", "mass"}:
        reasons += ["weight loss", "history of smoking"] + (["follow-up of pulmonary nodule"] if has_prior else [])
    if has_prior:
        reasons += ["follow-up", "interval change"]
    reason = rng.choice(reasons)
    person = "man" if truth.sex == "male" else "woman"
    return rng.choice(
        [
            f"{truth.age}-year-old {person} with {reason}.",
            f"{cap(reason)}.",
            f"History: {reason}.",
            f"{truth.age}-year-old {person}. {cap(reason)}.",
        ]
    )


def comparison(prior_date: str | None, rng: random.Random) -> str:
    if prior_date is None:
        return rng.choice(["None.", "None available.", ""])
    return rng.choice(
        [f"Chest radiograph from {prior_date}.", f"{prior_date}.", f"Prior chest radiograph dated {prior_date}."]
    )


NORMAL_IMPRESSIONS = [
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary abnormality.",
    "No acute intrathoracic process.",
]


def write_report(truth: PhantomTruth, rng: random.Random, prior_date: str | None = None) -> ReportText:
    """Indication, comparison, findings, impression, labels and grounded phrases of one exam."""
    w = Writer(truth, rng)
    heart_first = rng.random() < 0.3
    if heart_first:
        heart(w)
    for part in (devices, airspace, lesions, edema, atelectasis, effusions, pneumothorax, _resolved, _negations):
        part(w)
    if not heart_first:
        heart(w)
    _bones(w)
    _compared(w)
    sick = any(v in (1, -1) for k, v in w.labels.items() if k != "Support Devices")
    items = w.impression
    if not sick:
        normal = (
            "Normal chest radiograph." if not truth.findings and rng.random() < 0.3 else rng.choice(NORMAL_IMPRESSIONS)
        )
        items = [normal] + items
        w.label(["No Finding"], 1)
    if len(items) > 1 and rng.random() < 0.5:
        impression = " ".join(f"{i}. {item}" for i, item in enumerate(items, 1))
    else:
        impression = " ".join(items)
    return ReportText(
        indication=indication(truth, rng, prior_date is not None),
        comparison=comparison(prior_date, rng),
        findings=" ".join(w.sentences),
        impression=impression,
        labels=w.labels,
        grounded=w.grounded,
    )
