"""Pattern tables of the rule-based CheXpert-style labeler (the engine is cxrfm.eval.labeler).

Everything is matched on lower-cased text with single spaces. The tables:

MENTIONS   what names an observation: (labels, regex, base value). The base value is 1 for a finding
           word ("effusion"), -1 for a sign that only suggests one (CheXpert treats "vascular
           congestion" and a "blunted costophrenic angle" as uncertain edema / effusion), and 0 for a
           statement of normality ("heart size is normal"), which scopes do not change. A regex may
           name a group "m", the anchor the scopes are measured to ("heart is not (enlarged)");
           otherwise the whole match is the anchor.
TRIGGERS   negation and uncertainty cues with a direction and a reach in words. Scopes never cross a
           CLAUSE boundary ("but", "however", ";", "which", "there is", ...) nor a sentence end, and a
           forward negation also stops at a verb, so "no pneumothorax is seen after chest tube
           placement" leaves the tube positive.
MASKS      phrases blanked before triggers are searched, because they contain a cue word that does not
           negate anything here: "no change in", "not seen on the prior" (= new), "tip is not seen".
ALTERNATIVE "X or Y", "X versus Y": both uncertain, as CheXpert reads them, unless negated.

Precedence for one mention: "cannot exclude"-type cues (PRE_UNCERTAIN) > negation > uncertainty >
base value, the order of CheXpert's pre-negation-uncertainty / negation / post-negation-uncertainty.
"""

from __future__ import annotations

from dataclasses import dataclass

NEG, UNC, PRE_UNC = "negation", "uncertain", "pre_uncertain"
FWD, BWD = "forward", "backward"

# ---------------------------------------------------------------- mentions

HEART = r"\b(?:heart|cardiac (?:silhouette|size|shadow|contours?))(?: size)?"
# "heart size and mediastinal contours are ...": the subject may be coordinated before its verb.
COORD = r"(?:(?: and|,) [a-z ,]{0,50}?)?"
COPULA = r"(?: (?:is|are|appears?|remains?|again appears|is again))?"
NORMAL = r"(?:normal|within normal limits|unremarkable)"
MEDIASTINUM = r"\bmediastin(?:um|al (?:silhouette|contours?|width|configuration))"
CARDIOMEDIASTINAL = r"\bcardiomediastinal (?:and hilar )?(?:silhouette|contours?|shadow|size)"

DEVICES = "|".join(
    [
        r"\b(?:endotracheal|tracheostomy|trach|nasogastric|orogastric|enteric|feeding|chest|gastric|nasoenteric"
        r"|dobhoff|ng|og|et|g|j)[- ]tubes?\b",
        r"\bett\b|\bdobhoff\b|\btracheostomy\b|\bpiccs?\b",
        r"\b(?:central|venous|jugular|ij|subclavian|femoral|arterial|dialysis|hemodialysis|midline)(?: venous)?"
        r" (?:lines?|catheters?)\b",
        r"\bcatheters?\b|\bswan[- ]ganz\b|\bport-a-cath\b|\bmediport\b|\b(?:chest|infusion|power) port\b",
        r"\bpacemakers?\b|\bpacers?\b|\ba?icd\b|\bdefibrillators?\b|\bpacing (?:leads?|wires?)\b",
        r"\b(?:lines?|tubes?) (?:and|or|and/or) (?:lines?|tubes?)\b|\b(?:support|monitoring|medical) devices?\b",
        r"\bdrains?\b|\bstents?\b|\bintra-aortic balloon pump\b|\biabp\b|\blvad\b|\bimpella\b|\becmo\b",
        r"\bcannulas?\b|\bprosthetic (?:aortic |mitral )?valves?\b|\bvalve replacements?\b",
        # everything else a report names as hardware in or on the patient
        r"\bvalve (?:prosthes[ie]s|repair)\b|\bannuloplasty ring\b|\btavr\b|\btavi\b",
        r"\b(?:surgical |vascular |cholecystectomy |embolization |aneurysm )?clips?\b",
        r"\b(?:ecg|ekg|monitor|monitoring|telemetry|pacer|pacing|pacemaker|icd|epicardial|atrial|ventricular"
        r"|transvenous|defibrillator) leads?\b|\bleads\b(?! to\b)",
        r"\b(?:sternotomy|sternal|cerclage|guide|epicardial pacing) ?wires?\b|\bwires?\b",
        r"\bdevices?\b|\bloop recorders?\b|\bneurostimulators?\b|\bspinal (?:cord )?stimulators?\b",
    ]
)

# Hardware whose own "fracture" is not a bone fracture.
_HARDWARE = ("catheter", "wire", "lead", "line", "tube", "stent", "device", "hardware", "clip", "port", "filter")

MENTIONS: list[tuple[tuple[str, ...], str, int]] = [
    # -- pleura. A pericardial effusion is not a pleural one.
    (("Pleural Effusion",), r"(?<!pericardial )\beffusions?\b|\bpleural fluid\b|\bhydrothorax\b", 1),
    (("Pleural Effusion", "Pneumothorax"), r"\bhydropneumothora(?:x|ces)\b", 1),
    # A blunted angle is how a small effusion looks, but also scarring: CheXpert calls it uncertain.
    (
        ("Pleural Effusion",),
        r"\bblunt(?:ing|ed)(?: of)?(?: the)?(?: \w+){0,2} costophrenic (?:angles?|sulci|sulcus)"
        r"|\bcostophrenic (?:angles?|sulci|sulcus)(?: (?:is|are|remains?))? blunted",
        -1,
    ),
    (
        ("Pleural Effusion",),
        r"\bcostophrenic (?:angles?|sulci)(?: (?:are|is|remain))?(?: \w+)? (?:sharp|clear|preserved)",
        0,
    ),
    (("Pneumothorax",), r"\bpneumothora(?:x|ces)\b|\bptx\b", 1),
    (
        ("Pleural Other",),
        r"\bpleural (?:thickening|plaques?|scar\w*|calcifications?)\b|\bfibrothorax\b"
        r"|\bpleur(?:al|o)-?parenchymal (?:scar\w*|thickening)\b|\bapical (?:pleural )?(?:thickening|capp?(?:ing)?)\b",
        1,
    ),
    # -- lung parenchyma. Consolidation is a kind of opacity: every statement about it is one about
    # Lung Opacity too (the phantom generator and CheXpert's label hierarchy agree).
    (("Consolidation", "Lung Opacity"), r"\bconsolidat\w*|\bair ?space disease\b", 1),
    (
        ("Lung Opacity",),
        r"\bopaci(?:ty|ties|fication|fications|fied)\b|\binfiltrat\w*|(?<!nodular )\bdensit(?:y|ies)\b"
        r"|\bground[- ]glass\b|\breticula\w*|\binterstitial (?:markings?|pattern)\b"
        r"|(?<!pleural )(?<!parenchymal )\bscarring\b",
        1,
    ),
    # "Lungs are clear" says there is no opacity; it is not read as a statement about consolidation or
    # edema, which reports name on their own when they mean them (and the phantom truth does the same).
    (("Lung Opacity",), r"\blungs?(?: (?:are|is|remain|appear))?(?: [a-z-]+){0,3}? clear\b|\bclear lungs\b", 0),
    (("Edema",), r"(?<!soft tissue )\bedema\b|\bedematous\b|\bchf\b|\b(?:congestive )?heart failure\b"
     r"|\bfluid overload\b|\bkerley b\b", 1),
    # Congestion and interstitial prominence come before (or without) edema: uncertain, as in CheXpert.
    (
        ("Edema",),
        r"(?:\b(?:(?:pulmonary )?(?:vascular|venous) )?(?:congestion|engorgement)\b|\bvascular prominence\b"
        r"|\bcephalization\b|\binterstitial prominence\b|\bvascular indistinctness\b)"
        # "... and pulmonary vascular engorgement within normal limits" states the vessels are normal
        r"(?!(?: (?:is|are|appears?|remains?))?(?: \w+)? (?:within normal limits|normal)\b)",
        -1,
    ),
    (("Atelectasis",), r"\batelecta\w*|\bcollapsed?\b|\bvolume loss\b", 1),
    (("Pneumonia",), r"\w*pneumonias?\b|\binfections?\b|\binfectious\b", 1),
    (
        ("Lung Lesion",),
        r"\bnodul(?:e|es|ar|arity)\b|\bmass(?:es)?\b(?! effect)|\btumou?rs?\b|\bneoplasm\w*|\bcarcinoma\b"
        r"|\bmalignan\w*|\bmetasta\w*|\bgranulomas?\b"
        r"|(?<!osseous )(?<!bony )(?<!bone )(?<!lytic )(?<!sclerotic )(?<!skin )\blesions?\b",
        1,
    ),
    # -- heart and mediastinum: these need a state word ("enlarged", "normal"), so the anchor is the state.
    (("Cardiomegaly",), r"\bcardiomegaly\b|\bcardiac enlargement\b|\benlarge(?:d|ment of the) (?:heart|cardiac)", 1),
    (("Cardiomegaly",), HEART + COORD + COPULA + r"(?: [a-z-]+){0,2}? (?P<m>enlarged|increased in size)\b", 1),
    (
        ("Cardiomegaly",),
        r"\bnormal(?:[- ]sized?)? (?:heart|cardiac)\b|" + HEART + COORD + COPULA + r"(?: \w+)? " + NORMAL,
        0,
    ),
    (
        ("Cardiomegaly",),
        HEART + COPULA + r"(?: \w+)? (?P<m>borderline|top[- ]normal|(?:at )?(?:the )?upper limits? of normal)",
        -1,
    ),
    (
        ("Cardiomegaly", "Enlarged Cardiomediastinum"),
        r"\benlarged cardiomediastinal\b|" + CARDIOMEDIASTINAL + COPULA + r"(?: \w+){0,2}? (?P<m>enlarged|widened)\b",
        1,
    ),
    (
        ("Cardiomegaly", "Enlarged Cardiomediastinum"),
        CARDIOMEDIASTINAL + COPULA + r"(?: \w+)? (?P<m>borderline|top[- ]normal|(?:at )?(?:the )?upper limits? of normal)",
        -1,
    ),
    (
        ("Cardiomegaly", "Enlarged Cardiomediastinum"),
        r"\bnormal cardiomediastinal\b|" + CARDIOMEDIASTINAL + COORD + COPULA + r"(?: \w+)? " + NORMAL,
        0,
    ),
    (
        ("Enlarged Cardiomediastinum",),
        r"\bwidened (?:superior )?mediastin\w*|\bmediastinal (?:widening|enlargement)\b"
        r"|\bwidening of the (?:superior )?mediastinum\b"
        r"|" + MEDIASTINUM + COPULA + r"(?: \w+){0,2}? (?P<m>widened|enlarged)\b",
        1,
    ),
    (
        ("Enlarged Cardiomediastinum",),
        r"\bnormal mediastin\w*|\bnormal (?:heart|cardiac) size(?:,| and) (?:the )?mediastin\w*|"
        + MEDIASTINUM + COORD + COPULA + r"(?: \w+)? " + NORMAL,
        0,
    ),
    # -- bones and devices
    # A broken device ("catheter fracture", "fractured sternal wire") is a device, not a bone fracture.
    (
        ("Fracture",),
        "".join(f"(?<!{d} )" for d in _HARDWARE) + r"\bfractur\w*\b(?!(?: of)?(?: the| a| an)?(?: [a-z-]+){0,3} "
        + f"(?:{'|'.join(_HARDWARE)})s?\\b)" + r"|\bfx\b",
        1,
    ),
    (
        ("Fracture",),
        r"\bno (?:acute |displaced |definite |focal )*(?:osseous|bony|skeletal|rib)"
        r" (?:abnormalit(?:y|ies)|injur(?:y|ies))"
        r"|\b(?:osseous|bony|skeletal) structures(?: (?:are|appear))?(?: \w+)? (?:intact|unremarkable|normal)"
        r"|\bbones(?: (?:are|appear))?(?: \w+)? (?:intact|unremarkable)",
        0,
    ),
    (("Support Devices",), DEVICES, 1),
]

# ---------------------------------------------------------------- triggers


@dataclass(frozen=True)
class Trigger:
    kind: str  # NEG, UNC or PRE_UNC
    pattern: str
    direction: str  # FWD: covers what follows it; BWD: what precedes it
    reach: int = 8  # words allowed between the cue and the mention's anchor


# Lookbehinds: after an auxiliary or an adverb, "resolved" is the backward form ("X has resolved").
_AFTER_VERB = ("has", "have", "had", "is", "are", "was", "were", "been", "since", "now", "completely", "entirely")
_NOT_AFTER_VERB = "".join(f"(?<!{w} )" for w in _AFTER_VERB)

TRIGGERS: list[Trigger] = [
    # "cannot exclude X" / "X cannot be excluded": uncertain even though the words are negative.
    Trigger(
        PRE_UNC,
        r"\bcan ?not (?:exclude|rule out)\b|\bcan't (?:exclude|rule out)\b"
        r"|\b(?:difficult|impossible|hard) to (?:exclude|rule out)\b",
        FWD,
    ),
    Trigger(
        PRE_UNC,
        r"\b(?:can ?not|can't|could not|may not) (?:be )?(?:entirely |completely |definitely )?(?:excluded|ruled out)\b"
        r"|\b(?:is |are )?not (?:been |be )?(?:entirely |completely |definitely )?(?:excluded|ruled out)\b"
        r"|\b(?:is|are) (?:difficult|hard) to (?:exclude|rule out)\b",
        BWD,
        10,
    ),
    # -- negation that follows its target's lead: "no X", "without X", "resolution of X"
    Trigger(NEG, r"\bno\b|\bneither\b|\bnor\b|\bnegative for\b|\b(?:free|clear) of\b|\babsence of\b", FWD, 10),
    Trigger(NEG, r"\bwithout\b", FWD, 8),
    # "resolved X" as an adjective only: in "X has resolved and a small Y persists" Y is still there.
    Trigger(NEG, r"\bresolution of\b|\bremoval of\b|" + _NOT_AFTER_VERB + r"\b(?:resolved|removed)\b", FWD, 5),
    Trigger(NEG, r"\bnot\b", FWD, 2),
    # -- a past process is not active disease: "old healed rib fractures", "remote clavicle fracture",
    # "changes of prior infection", "sequelae of old granulomatous disease" (value 0, like a negation).
    Trigger(NEG, r"\b(?:old|healed|remote)\b|\bsequelae? of\b", FWD, 3),
    Trigger(NEG, r"\b(?:of|from|related to|due to|secondary to) (?:a |an |the )?(?:prior|previous|past)\b", FWD, 3),  # "heart is not enlarged", "mediastinum is not widened"
    # -- negation after its target: "X is not seen", "X has resolved", "X has been removed" (not
    # "withdrawn" / "pulled back": a line pulled back by 2 cm is still there)
    Trigger(
        NEG,
        r"\b(?:(?:is|are|was|were) )?(?:not|no longer) (?:seen|visualized|visualised|identified|present|evident"
        r"|appreciated|demonstrated|visible|detected|apparent|noted)\b",
        BWD,
        10,
    ),
    Trigger(
        NEG,
        r"\b(?:(?:has|have|had) )?(?:since |now |completely |entirely |nearly completely )?"
        r"(?:resolved|cleared|disappeared)\b"
        r"|\b(?:(?:has|have) been|was|were) (?:removed|discontinued)\b|\bremoved\b"
        r"|\b(?:(?:is|are) )?absent\b|\b(?:(?:has|have) been )?ruled out\b",
        BWD,
        10,
    ),
    # -- uncertainty
    Trigger(
        UNC,
        r"\bpossibl[ey]\b|\bprobabl[ey]\b|\b(?:un)?likely\b|\bquestionabl[ey]\b|\bquestion of\b|\bmay\b|\bmight\b"
        r"|\bcould\b|\bsuspicious for\b|\bsuspicion (?:of|for)\b|\bsuspect(?:ed|s)?\b|\bsuggest(?:s|ing|ive(?: of)?)?\b"
        r"|\bconcern(?:ing)? for\b|\bworrisome for\b|\bdifferential\b|\bborderline\b|\bequivocal\b|\bindeterminate\b"
        r"|\bpresum(?:ed|ably|ptive)\b|\bfavou?red over\b|\bpotential(?:ly)?\b"
        r"|\b(?:evaluate|evaluation|assess|eval) for\b"
        r"|\brule out\b|\br/o\b|\bmaybe\b|\bperhaps\b|\bcorrelat\w* (?:clinically )?for\b",
        FWD,
    ),
    Trigger(UNC, r"\bconsider(?:ed)?\b", FWD, 2),
    # "resolving pneumonia", "the pneumonia is resolving": on its way out; whether it is still there is
    # not stated, so uncertain.
    Trigger(UNC, r"\bresolving\b", FWD, 4),
    Trigger(UNC, r"\b(?:is|are) (?:\w+ )?resolving\b", BWD, 10),  # "consider pneumonia", not "consider CT of the nodule"
    Trigger(
        UNC,
        r"\b(?:is|are) (?:\w+ )?(?:suspected|questioned|favou?red)\b"
        r"|\b(?:may|might|could|can) (?:also )?be (?:present|seen)\b"
        # an adjective only hedges its subject at the end of the clause: "effusion is likely", but in
        # "opacity is likely atelectasis" the opacity is certain and "likely" governs what follows.
        r"|\b(?:is|are) (?:\w+ )?(?:possible|likely|unlikely|probable|presumed|a possibility|a consideration)"
        r"(?=\s*(?:$|[,;]|\bbut\b|\bhowever\b))",
        BWD,
        10,
    ),
]

# Phrases whose cue word negates nothing; blanked before triggers are searched. A group "m" limits the
# blanking to that part.
MASKS: list[str] = [
    r"\bno (?:significant |appreciable |substantial |definite |interval |other |real )*change\w*",
    r"\bwithout (?:significant |appreciable |interval )*change\w*",
    r"\bnot (?:\w+ )?(?:seen|present|visualized|identified|evident|apparent|noted)"
    r" (?:on|in) (?:the )?(?:prior|previous|earlier|last)\b",
    r"\bnot (?:significantly |substantially |appreciably )?(?:changed|increased|decreased|improved|worsened)\b",
    # the tip of a tube or line is often out of view; the device is still there
    r"\btips?\b[^.;]{0,40}?"
    r"(?P<m>\b(?:is |are )?not (?:well |clearly )?(?:seen|visualized|visualised|identified|included))",
]

# Clause ends: no scope crosses one. "there is/are" starts a new statement ("no pneumothorax, there is a
# small effusion"), as do contrastive conjunctions and relative clauses.
CLAUSE_BOUNDARY = (
    r";|\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bwhich\b|\bwhereas\b|\bwhile\b|\bexcept\b|\botherwise\b"
    r"|\bapart from\b|\baside from\b|\bwith the exception of\b|\bthere (?:is|are|has been|have been)\b|\band the\b"
)
# A comma followed by a new described finding ends a list that "no"/"possible" governs:
# "no pneumothorax, small left effusion" negates only the pneumothorax.
NEW_ITEM = (
    r",\s*(?:with )?(?:a |an |the )?(?:small|moderate|large|mild|minimal|trace|severe|marked|new|stable|unchanged"
    r"|persistent|increas\w*|decreas\w*|improv\w*|worsen\w*|again|there|the|a|an|bilateral|left|right)\b"
)
# Forward negation stops at a verb or at "with"/"after": "no X is seen" and "no X after chest tube
# placement" are about X, not about what comes after.
FWD_NEG_STOP = (
    r"\b(?:is|are|was|were|has|have|had|remains?|terminates?|projects?|extends?|measures?|courses?|overlies|that"
    r"|with|following|after|post|s/p)\b|" + NEW_ITEM
)
FWD_UNC_STOP = r"\b(?:ct|imaging|follow-?up|recommend\w*|radiograph)\b|" + NEW_ITEM
# Backward scope stops at a verb too: in "the heart is enlarged and the effusion has resolved" only the
# effusion resolved.
BWD_STOP = r"\b(?:is|are|was|were|has|have|had)\b|,\s*and\b"

# "no A, large B, or C" / "differential includes A, early B, or C": a list closed by "or" (or "nor") is
# governed as a whole by a cue that governs its first item, although a comma and an adjective would
# otherwise end the scope (NEW_ITEM) and a long list outruns a cue's reach. Items are up to four words
# and hold no verb, so a new statement after the list is not swallowed.
_ITEM = (r"(?:(?!(?:is|are|was|were|be|been|has|have|had|there|with|but|however|and|which|includ\w*|represents?"
         r"|reflects?|may|might|could|would|can)\b)[a-z/-]+)")
_ITEMS = rf"{_ITEM}(?: {_ITEM}){{0,3}}"
OR_LIST = rf"(?<![a-z/-]){_ITEMS}(?P<sep> ?,| or| nor| and/or)(?: ?{_ITEMS} ?,)*(?: or| nor| and/or)? {_ITEMS}\b"

ALTERNATIVE = r"\b(?:or|and/or|versus|vs)\b"
ALTERNATIVE_REACH = 1  # words between an alternative word and the mentions on each side
