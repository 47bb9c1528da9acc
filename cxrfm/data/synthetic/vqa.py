"""Visual question answering pairs from a phantom's ground truth.

Questions are asked about what the image shows, so hedged (uncertain) findings are never asked about:
their answer is not clear from the image either. Answers are short lower-case strings; closed
questions are answered "yes" or "no". qtypes: presence, laterality, location, size, count, view,
device, change (the last only when the study has a prior).
"""

from __future__ import annotations

import random

from cxrfm.data.schema import VQAPair
from cxrfm.data.synthetic.truth import PhantomTruth

# name in a question, with its article for "Is there ...?"
NAMES = {
    "cardiomegaly": ("cardiomegaly", ""),
    "effusion": ("pleural effusion", "a "),
    "pneumothorax": ("pneumothorax", "a "),
    "consolidation": ("consolidation", ""),
    "opacity": ("lung opacity", "a "),
    "nodule": ("lung nodule", "a "),
    "mass": ("lung mass", "a "),
    "edema": ("pulmonary edema", ""),
    "atelectasis": ("atelectasis", ""),
}
DEVICE_NAMES = {"ett": "endotracheal tube", "central_line": "central venous catheter", "pacemaker": "pacemaker"}
TIP_ANSWERS = {
    "svc": "superior vena cava",
    "cavoatrial junction": "cavoatrial junction",
    "right atrium": "right atrium",
}


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


class _Asker:
    def __init__(self, truth: PhantomTruth, rng: random.Random):
        self.truth, self.rng = truth, rng
        self.sure = [f for f in truth.pathologies() if not f.uncertain]
        self.hedged = {f.kind for f in truth.pathologies() if f.uncertain}
        self.pairs: dict[str, list[VQAPair]] = {}

    def ask(self, qtype: str, question: str, answer: str, closed: bool) -> None:
        self.pairs.setdefault(qtype, []).append(
            VQAPair(question=question, answer=answer.lower(), qtype=qtype, closed=closed)
        )

    def pick(self, options):
        return self.rng.choice(options)

    def of_kind(self, kind: str):
        return [f for f in self.sure if f.kind == kind]


def _presence(q: _Asker) -> None:
    present = sorted({f.kind for f in q.sure})
    absent = sorted(k for k in NAMES if k not in present and k not in q.hedged)
    absent = q.rng.sample(absent, min(2, len(absent)))  # a few "no" answers, not one per absent finding
    for kind, flag in [(k, True) for k in present] + [(k, False) for k in absent]:
        name, art = NAMES[kind]
        q.ask(
            "presence",
            q.pick([f"Is there {art}{name}?", f"Is {name} present?", f"Does this radiograph show {art}{name}?"]),
            _yn(flag),
            True,
        )
    if not q.hedged:
        answer = ", ".join(NAMES[k][0] for k in present) or "none"
        q.ask(
            "presence",
            q.pick(["What abnormalities are seen?", "What are the findings?", "Which abnormalities are present?"]),
            answer,
            False,
        )
    for f in q.sure:
        if f.zone and len([g for g in q.sure if (g.side, g.zone) == (f.side, f.zone)]) == 1:
            q.ask("presence", f"What abnormality is seen in the {f.side} {f.zone} zone?", NAMES[f.kind][0], False)


def _laterality(q: _Asker) -> None:
    for kind in ("effusion", "pneumothorax", "consolidation", "opacity", "nodule", "mass", "atelectasis"):
        sides = {f.side for f in q.of_kind(kind)}
        if not sides:
            continue
        name = NAMES[kind][0]
        answer = "bilateral" if len(sides) == 2 else sides.pop()
        q.ask(
            "laterality",
            q.pick(
                [
                    f"Which side is the {name} on?",
                    f"On which side is the {name}?",
                    f"Is the {name} right-sided, left-sided or bilateral?",
                ]
            ),
            answer,
            False,
        )
        side = q.pick(["right", "left"])
        q.ask(
            "laterality",
            f"Is there {NAMES[kind][1]}{name} on the {side}?",
            _yn(side == answer or answer == "bilateral"),
            True,
        )


def _location(q: _Asker) -> None:
    for kind in ("consolidation", "opacity", "nodule", "mass", "atelectasis"):
        found = q.of_kind(kind)
        if len(found) == 1:
            f = found[0]
            name = NAMES[kind][0]
            q.ask(
                "location",
                q.pick([f"Where is the {name} located?", f"In which lung zone is the {name}?"]),
                f"{f.side} {f.zone} zone",
                False,
            )
            zone = q.pick(["upper", "middle", "lower"])
            q.ask("location", f"Is the {name} in the {zone} zone?", _yn(zone == f.zone), True)


def _size(q: _Asker) -> None:
    t = q.truth
    q.ask(
        "size",
        q.pick(["What is the cardiothoracic ratio?", "What is the approximate cardiothoracic ratio?"]),
        f"{t.ctr:.2f}",
        False,
    )
    q.ask("size", q.pick(["Is the heart enlarged?", "Is the cardiac silhouette enlarged?"]), _yn(t.cardiomegaly), True)
    for kind in ("nodule", "mass"):
        found = q.of_kind(kind)
        if len(found) == 1:
            q.ask(
                "size",
                q.pick([f"What is the size of the {NAMES[kind][0]}?", f"How large is the {NAMES[kind][0]}?"]),
                f"{found[0].size_cm:.1f} cm",
                False,
            )
    for f in q.of_kind("effusion") + q.of_kind("pneumothorax"):
        name = f"{f.side} {NAMES[f.kind][0]}"
        q.ask("size", q.pick([f"How large is the {name}?", f"What is the size of the {name}?"]), f.severity, False)
        q.ask("size", f"Is the {name} large?", _yn(f.severity == "large"), True)


def _count(q: _Asker) -> None:
    t = q.truth
    nodules = q.of_kind("nodule")
    if nodules or (q.rng.random() < 0.3 and "nodule" not in q.hedged):
        q.ask(
            "count",
            q.pick(["How many lung nodules are seen?", "How many nodules are there?"]),
            str(len(nodules)),
            False,
        )
    q.ask(
        "count",
        q.pick(["How many support devices are present?", "How many lines, tubes or devices are seen?"]),
        str(len(t.devices())),
        False,
    )
    for f in t.of_kind("pacemaker"):
        q.ask("count", "How many pacemaker leads are there?", str(f.leads), False)


def _view(q: _Asker) -> None:
    view = q.truth.view.lower()
    q.ask(
        "view",
        q.pick(["What is the view of this radiograph?", "What projection is this image?", "Is this a PA or AP view?"]),
        view,
        False,
    )
    other = q.pick(["pa", "ap"])
    q.ask(
        "view", f"Is this an {other.upper()} view?" if other == "ap" else "Is this a PA view?", _yn(other == view), True
    )


def _device(q: _Asker) -> None:
    t = q.truth
    kinds = {f.kind for f in t.devices()}
    missing = [k for k in DEVICE_NAMES if k not in kinds]
    for kind in sorted(kinds) + q.rng.sample(missing, min(1, len(missing))):
        name = DEVICE_NAMES[kind]
        art = "an" if name[0] in "aeiou" else "a"
        q.ask("device", q.pick([f"Is there {art} {name}?", f"Is {art} {name} present?"]), _yn(kind in kinds), True)
    q.ask(
        "device",
        "What support devices are present?",
        ", ".join(DEVICE_NAMES[f.kind] for f in t.devices()) or "none",
        False,
    )
    for f in t.devices():
        if f.kind == "ett":
            where = (
                "right mainstem bronchus"
                if f.position == "right mainstem"
                else f"{abs(f.tip_cm):g} cm above the carina"
            )
            q.ask("device", "Where is the tip of the endotracheal tube?", where, False)
            q.ask(
                "device", "Is the endotracheal tube appropriately positioned?", _yn(f.position == "appropriate"), True
            )
        elif f.kind == "central_line":
            q.ask("device", "Where does the central venous catheter terminate?", TIP_ANSWERS[f.tip], False)
            q.ask("device", "Through which vein is the central line inserted?", f.position, False)
        elif f.kind == "pacemaker":
            q.ask("device", f"Which device is in the {f.side} upper chest?", "pacemaker", False)
            q.ask("device", "On which side is the pacemaker generator?", f.side, False)


def _change(q: _Asker) -> None:
    changes = [c for c in q.truth.changes if c.kind in NAMES or c.kind in DEVICE_NAMES]
    if not changes:
        return
    sure = [c for c in changes if not (c.after or c.before).uncertain]
    q.ask(
        "change",
        "Is there a new finding compared with the prior study?",
        _yn(any(c.status == "new" for c in sure)),
        True,
    )
    for c in sure:
        name = DEVICE_NAMES.get(c.kind) or NAMES[c.kind][0]
        if c.zone:
            name = f"{name} in the {c.side} {c.zone} zone"
        elif c.side in ("right", "left"):
            name = f"{c.side} {name}"
        q.ask(
            "change",
            q.pick(
                [f"How has the {name} changed since the prior study?", f"What is the interval change of the {name}?"]
            ),
            c.status,
            False,
        )
        if c.status in ("resolved", "increased", "decreased"):
            status = q.pick(["resolved", "increased", "decreased"])
            q.ask("change", f"Has the {name} {status}?", _yn(status == c.status), True)


def write_vqa(truth: PhantomTruth, rng: random.Random, max_pairs: int = 10) -> list[VQAPair]:
    """Up to max_pairs pairs: one of each applicable qtype first (change only with a prior), then more at random."""
    q = _Asker(truth, rng)
    for part in (_presence, _laterality, _location, _size, _count, _view, _device, _change):
        part(q)
    chosen: list[VQAPair] = []
    pools = {k: rng.sample(v, len(v)) for k, v in q.pairs.items()}
    for qtype in pools:  # one of each qtype, the closed/open mix comes from the shuffle
        chosen.append(pools[qtype].pop())
    rest = [p for pool in pools.values() for p in pool]
    rng.shuffle(rest)
    chosen += rest[: max(0, max_pairs - len(chosen))]
    return chosen[:max_pairs]
