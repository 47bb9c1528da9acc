"""Sentences for the findings a phantom shows (positive or hedged), each written with the labels it implies.

Used by text.py, which adds negations, interval change, indication and impression. Templates and
synonyms vary the wording; every positive phrase is kept with the findings it names, for grounding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from cxrfm.data.synthetic.truth import Change, Finding, PhantomTruth

# Lobe names by (side, zone) on a frontal film; the left lung has no middle lobe, the lingula is there.
LOBES = {
    ("right", "upper"): "right upper lobe",
    ("right", "middle"): "right middle lobe",
    ("right", "lower"): "right lower lobe",
    ("left", "upper"): "left upper lobe",
    ("left", "middle"): "lingula",
    ("left", "lower"): "left lower lobe",
}
# Labels each finding kind turns positive (or uncertain); the first one is the grounding label.
KIND_LABELS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("Cardiomegaly",),
    "effusion": ("Pleural Effusion",),
    "pneumothorax": ("Pneumothorax",),
    "consolidation": ("Consolidation", "Lung Opacity"),
    "opacity": ("Lung Opacity",),
    "nodule": ("Lung Lesion",),
    "mass": ("Lung Lesion",),
    "edema": ("Edema",),
    "atelectasis": ("Atelectasis",),
    "ett": ("Support Devices",),
    "central_line": ("Support Devices",),
    "pacemaker": ("Support Devices",),
}
# Labels a negation sentence sets to 0 (beside the ones its wording adds, see _negations).
NEGATION_LABELS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("Cardiomegaly",),
    "effusion": ("Pleural Effusion",),
    "pneumothorax": ("Pneumothorax",),
    "consolidation": ("Consolidation",),
    "edema": ("Edema",),
    "nodule": ("Lung Lesion",),
    "lungs_clear": ("Lung Opacity",),
    "fracture": ("Fracture",),
}
_PRIORITY = {1: 3, -1: 2, 0: 1}  # a finding stated anywhere beats a hedge, which beats a negation
VEINS_SHORT = {"right internal jugular": "right IJ", "left internal jugular": "left IJ"}
LINE_TIPS = {
    "svc": ["SVC", "superior vena cava", "lower SVC"],
    "cavoatrial junction": ["cavoatrial junction"],
    "right atrium": ["right atrium"],
}
CHANGE_WORDS = {
    "new": ["new since the prior study", "new compared with the prior radiograph", "not seen on the prior study"],
    "increased": ["increased since the prior study", "larger than on the prior radiograph", "increased from prior"],
    "decreased": ["decreased since the prior study", "smaller than on the prior radiograph", "improved from prior"],
    "unchanged": [
        "unchanged from prior",
        "stable compared with the prior study",
        "not significantly changed from prior",
    ],
}


@dataclass
class Grounded:
    phrase: str  # appears verbatim in the findings text
    label: str
    findings: tuple[Finding, ...]


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def location(f: Finding, rng: random.Random) -> str:
    """'right lower zone' or its lobe name."""
    if rng.random() < 0.5:
        return LOBES[(f.side, f.zone)]
    return f"{f.side} {f.zone} zone"


class Writer:
    """Collects sentences with their labels, grounded phrases and impression items."""

    def __init__(self, truth: PhantomTruth, rng: random.Random):
        self.truth, self.rng = truth, rng
        self.sentences: list[str] = []
        self.impression: list[str] = []
        self.labels: dict[str, int] = {}
        self.grounded: list[Grounded] = []
        self.changes = {(c.kind, c.side, c.zone): c for c in truth.changes}

    def label(self, names, value: int) -> None:
        for name in names:
            old = self.labels.get(name)
            if old is None or _PRIORITY[value] > _PRIORITY[old]:
                self.labels[name] = value

    def say(self, sentence: str, labels=(), value: int = 1, phrase: str | None = None, findings=()) -> None:
        self.sentences.append(cap(sentence))
        self.label(labels, value)
        if phrase is not None:
            if phrase.lower() not in sentence.lower():  # grounding needs the phrase verbatim in the text
                raise ValueError(f"phrase {phrase!r} is not in {sentence!r}")
            self.grounded.append(Grounded(phrase, labels[0], tuple(findings)))

    def pick(self, options):
        return self.rng.choice(options)

    def change_of(self, f: Finding) -> Change | None:
        return self.changes.get(f.key)

    def with_change(self, sentence_core: str, f: Finding) -> str:
        """Append the interval change to a sentence, most of the time, when there is a prior."""
        c = self.change_of(f)
        if c is None or (c.status == "unchanged" and self.rng.random() < 0.5):
            return sentence_core + "."
        return f"{sentence_core}, {self.pick(CHANGE_WORDS[c.status])}."


# ---------------------------------------------------------------- positive and hedged findings


def effusions(w: Writer) -> None:
    found = w.truth.of_kind("effusion")
    sure = [f for f in found if not f.uncertain]
    for f in (f for f in found if f.uncertain):
        side = f.side
        w.say(
            w.pick(
                [
                    f"Possible small {side} pleural effusion.",
                    f"Blunting of the {side} costophrenic angle may represent a small effusion.",
                    f"A small {side} pleural effusion cannot be excluded.",
                ]
            ),
            ["Pleural Effusion"],
            -1,
        )
        w.impression.append(f"Possible small {side} pleural effusion.")
    if len(sure) == 2 and sure[0].severity == sure[1].severity and not w.changes:
        sev = sure[0].severity
        phrase = w.pick([f"{sev} bilateral pleural effusions", f"{sev} bilateral effusions"])
        w.say(w.pick([f"There are {phrase}.", f"{phrase}."]), ["Pleural Effusion"], phrase=phrase, findings=sure)
        w.impression.append(f"{cap(sev)} bilateral pleural effusions.")
        return
    for f in sure:
        sev = w.pick({"small": ["small"], "moderate": ["moderate", "moderate-sized"], "large": ["large"]}[f.severity])
        phrase = w.pick(
            [f"{sev} {f.side} pleural effusion", f"{sev} {f.side}-sided pleural effusion", f"{sev} {f.side} effusion"]
        )
        extra = (
            w.pick(["", " with blunting of the costophrenic angle", " layering at the base"])
            if f.severity == "small"
            else ""
        )
        core = w.pick([f"There is a {phrase}{extra}", f"{phrase}{extra}"])
        w.say(w.with_change(core, f), ["Pleural Effusion"], phrase=phrase, findings=[f])
        w.impression.append(_short(w, f"{f.severity} {f.side} pleural effusion", f))


def _short(w: Writer, text: str, f: Finding) -> str:
    """Impression item with its interval change, if any."""
    c = w.change_of(f)
    if c is not None and c.status in ("new", "increased", "decreased"):
        return f"{cap(text)}, {c.status}."
    return f"{cap(text)}."


def pneumothorax(w: Writer) -> None:
    for f in w.truth.of_kind("pneumothorax"):
        apical = " apical" if f.severity == "small" else ""
        phrase = w.pick([f"{f.severity} {f.side}{apical} pneumothorax", f"{f.severity} {f.side}-sided pneumothorax"])
        core = w.pick(
            [
                f"There is a {phrase} with a visible pleural line",
                f"{phrase}, measuring approximately {f.size_cm:.1f} cm from the chest wall",
                f"{phrase} is noted",
            ]
        )
        w.say(w.with_change(core, f), ["Pneumothorax"], phrase=phrase, findings=[f])
        w.impression.append(_short(w, f"{f.severity} {f.side} pneumothorax", f))


def airspace(w: Writer) -> None:
    for f in w.truth.of_kind("consolidation", "opacity"):
        loc = location(f, w.rng)
        labels = list(KIND_LABELS[f.kind])
        if f.uncertain:
            noun = "consolidation" if f.kind == "consolidation" else "opacity"
            w.say(
                w.pick(
                    [
                        f"Possible early {noun} in the {loc}.",
                        f"Questionable subtle {noun} in the {loc}.",
                        f"Early {noun} in the {loc} cannot be excluded.",
                    ]
                ),
                labels,
                -1,
            )
            w.impression.append(f"Possible early {noun} in the {loc}.")
            continue
        if f.kind == "consolidation":
            adj = w.pick(
                {"mild": ["patchy ", "mild "], "moderate": ["", "confluent "], "severe": ["extensive ", "dense "]}[
                    f.severity
                ]
            )
            phrase = w.pick([f"{adj}consolidation in the {loc}", f"{adj}airspace consolidation in the {loc}"])
        else:
            phrase = w.pick(
                [
                    f"patchy opacity in the {loc}",
                    f"hazy opacity in the {loc}",
                    f"ill-defined airspace opacity in the {loc}",
                ]
            )
        w.say(w.with_change(w.pick([f"There is {phrase}", f"{phrase}"]), f), labels, phrase=phrase, findings=[f])
        item = _short(w, phrase, f)
        if f.kind == "consolidation" and w.rng.random() < 0.5:
            item = item[:-1] + w.pick([", concerning for pneumonia.", ", which may represent pneumonia."])
            w.label(["Pneumonia"], -1)
        w.impression.append(item)


def lesions(w: Writer) -> None:
    for f in w.truth.of_kind("nodule", "mass"):
        loc, size = location(f, w.rng), f"{f.size_cm:.1f} cm"
        if f.uncertain:
            w.say(
                w.pick(
                    [
                        f"Possible {size} nodular density in the {loc}, which may represent a nipple shadow.",
                        f"Questionable {size} nodule in the {loc}.",
                    ]
                ),
                ["Lung Lesion"],
                -1,
            )
            w.impression.append(f"Possible {size} nodule in the {loc}; consider repeat imaging with nipple markers.")
            continue
        noun = w.pick(["nodule", "pulmonary nodule"] if f.kind == "nodule" else ["mass", "pulmonary mass"])
        phrase = w.pick([f"{size} {noun} in the {loc}", f"{noun} in the {loc} measuring {size}"])
        w.say(
            w.with_change(w.pick([f"There is a {phrase}", f"{phrase}"]), f),
            ["Lung Lesion"],
            phrase=phrase,
            findings=[f],
        )
        advice = "; recommend chest CT" if f.kind == "nodule" else ", concerning for malignancy"
        w.impression.append(_short(w, f"{size} {f.kind} in the {f.side} {f.zone} zone", f)[:-1] + advice + ".")


def edema(w: Writer) -> None:
    for f in w.truth.of_kind("edema"):
        if f.uncertain:
            w.say(
                w.pick(
                    [
                        "Mild perihilar haziness may represent early pulmonary edema.",
                        "Pulmonary vascular congestion; early interstitial edema cannot be excluded.",
                    ]
                ),
                ["Edema"],
                -1,
            )
            w.impression.append("Possible mild pulmonary edema.")
            continue
        adj = w.pick({"mild": ["mild"], "moderate": ["moderate"], "severe": ["severe", "marked"]}[f.severity])
        phrase = w.pick([f"{adj} pulmonary edema", f"{adj} interstitial pulmonary edema", f"{adj} perihilar edema"])
        core = w.pick(
            [
                f"There is {phrase}",
                f"{phrase} with perihilar haziness",
                f"bilateral perihilar opacities consistent with {phrase}",
            ]
        )
        labels = ["Edema", "Lung Opacity"] if "opacities" in core else ["Edema"]
        w.say(w.with_change(core, f), labels, phrase=phrase, findings=[f])
        w.impression.append(_short(w, f"{f.severity} pulmonary edema", f))


def atelectasis(w: Writer) -> None:
    for f in w.truth.of_kind("atelectasis"):
        if f.uncertain:
            w.say(
                w.pick(
                    [
                        f"Possible subsegmental atelectasis at the {f.side} base.",
                        f"Minimal {f.side} basilar atelectasis cannot be excluded.",
                    ]
                ),
                ["Atelectasis"],
                -1,
            )
            continue
        phrase = w.pick(
            [
                f"plate-like atelectasis at the {f.side} lung base",
                f"{f.side} basilar atelectasis",
                f"linear atelectasis in the {f.side} lower zone",
                f"subsegmental atelectasis at the {f.side} base",
            ]
        )
        w.say(
            w.with_change(w.pick([f"There is {phrase}", f"{phrase}"]), f), ["Atelectasis"], phrase=phrase, findings=[f]
        )
        w.impression.append(_short(w, f"{f.side} basilar atelectasis", f))


def heart(w: Writer) -> None:
    t = w.truth
    if t.cardiomegaly:
        f = t.of_kind("cardiomegaly")[0]
        ctr = f"{t.ctr:.2f}"
        options = [
            (
                f"{f.severity} cardiomegaly",
                f"There is {f.severity} cardiomegaly (cardiothoracic ratio {ctr})",
                ["Cardiomegaly"],
            ),
            (
                "enlarged cardiac silhouette",
                f"Enlarged cardiac silhouette, cardiothoracic ratio approximately {ctr}",
                ["Cardiomegaly"],
            ),
            ("heart is enlarged", "The heart is enlarged", ["Cardiomegaly"]),
            (
                "cardiomediastinal silhouette is enlarged",
                "The cardiomediastinal silhouette is enlarged",
                ["Cardiomegaly", "Enlarged Cardiomediastinum"],
            ),
        ]
        phrase, core, labels = w.pick(options)
        w.say(w.with_change(core, f), labels, phrase=phrase, findings=[f])
        w.impression.append(f"{cap(f.severity)} cardiomegaly.")
    elif ("cardiomegaly", None) in t.negated:
        sentence, labels = w.pick(
            [
                ("Heart size is normal.", ["Cardiomegaly"]),
                ("The cardiac silhouette is normal in size.", ["Cardiomegaly"]),
                (
                    "The cardiomediastinal silhouette is within normal limits.",
                    ["Cardiomegaly", "Enlarged Cardiomediastinum"],
                ),
                ("Normal heart size and mediastinal contours.", ["Cardiomegaly", "Enlarged Cardiomediastinum"]),
            ]
        )
        w.say(sentence, labels, 0)


def devices(w: Writer) -> None:
    for f in w.truth.devices():
        if f.kind == "ett":
            tube = w.pick(["endotracheal tube", "ET tube"])
            cm = f"{abs(f.tip_cm):.1f}".rstrip("0").rstrip(".")
            core, alarm = {
                "appropriate": (
                    w.pick(
                        [
                            f"{tube} terminates approximately {cm} cm above the carina",
                            f"{tube} tip is {cm} cm above the carina, in satisfactory position",
                        ]
                    ),
                    None,
                ),
                "low": (f"{tube} tip is {cm} cm above the carina, too low", "recommend withdrawal by 2 cm"),
                "high": (f"{tube} tip is high, {cm} cm above the carina", "consider advancing by 2 to 3 cm"),
                "right mainstem": (
                    f"{tube} tip extends into the right mainstem bronchus",
                    "recommend retraction by 3 cm",
                ),
            }[f.position]
            w.say(w.with_change(core, f), ["Support Devices"], phrase=tube, findings=[f])
            if alarm:
                w.impression.append(f"{cap(core)}; {alarm}.")
        elif f.kind == "central_line":
            vein = w.pick([f.position, VEINS_SHORT.get(f.position, f.position)])
            phrase = w.pick([f"{vein} central venous catheter", f"{vein} central line"])
            core = f"{phrase} terminates in the {w.pick(LINE_TIPS[f.tip])}"
            w.say(w.with_change(core, f), ["Support Devices"], phrase=phrase, findings=[f])
        else:
            chambers = {1: "single-chamber", 2: "dual-chamber", 3: "biventricular"}[f.leads]
            phrase = w.pick([f"{f.side}-sided pacemaker", f"{f.side} chest wall pacemaker", f"{chambers} pacemaker"])
            tips = ["right atrium", "right ventricle", "coronary sinus"][: f.leads]
            tips_text = tips[0] if len(tips) == 1 else ", ".join(tips[:-1]) + " and " + tips[-1]
            leads = "lead" if f.leads == 1 else "leads"
            w.say(
                w.with_change(f"{phrase} with {leads} in the {tips_text}", f),
                ["Support Devices"],
                phrase=phrase,
                findings=[f],
            )
        c = w.change_of(f)
        if c is not None and c.status == "new":
            w.impression.append(f"Interval placement of {_device_name(f)}.")


def _device_name(f: Finding) -> str:
    if f.kind == "ett":
        return "an endotracheal tube"
    if f.kind == "central_line":
        return f"a {f.position} central line"
    return "a pacemaker"
