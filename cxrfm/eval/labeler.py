"""A rule-based CheXpert-style labeler: 14 observations, positive (1) / negative (0) / uncertain (-1).

Reads a free-text chest X-ray report the way the CheXpert labeler (Irvin et al. 2019) does, with regular
expressions instead of a dependency parser:

1. normalise (lower case, one space) and split into sentences (". ", "?", "!", ":", new lines; a
   decimal point like "1.5 cm" does not end one);
2. find MENTIONS of each observation (cxrfm.eval.labeler_rules holds the tables);
3. classify each mention by the cues around it in its clause: "cannot exclude"-type cues make it
   uncertain, then a negation makes it 0, then any other uncertainty cue (or an "X or Y" / "X versus Y"
   alternative) makes it -1; otherwise it keeps its base value (1 for a finding word);
4. aggregate per observation: positive beats uncertain beats negative (CheXpert's aggregation), and
   "No Finding" is 1 when no pathology (all but Support Devices and No Finding) is 1 or -1.

Unmentioned observations are absent from the result. `explain` lists every mention with its value
and the cue that decided it, for debugging the rules.

Conventions (each a choice; tests/eval/labeler_sentences.py pins them):
- "lungs are clear" -> Lung Opacity 0 only (not Consolidation / Edema, which reports negate by name);
- consolidation statements also label Lung Opacity, with the same value (a consolidation is an opacity);
- vascular congestion / cephalization and a blunted costophrenic angle are uncertain edema / effusion,
  and "X or Y", "X versus Y" make both uncertain, as in CheXpert;
- "interval resolution of X", "X has resolved", "X has been removed" are negative; a line "withdrawn"
  (pulled back) is still present; "no new X" is negative (CheXpert: uncertain);
- "stable cardiomediastinal silhouette" is not a mention (CheXpert: uncertain), it says nothing of size;
- an empty text is "No Finding" 1, as in CheXpert.
- "no A, large B, or C" and "differential includes A, B, or C": a list closed by "or"/"nor" is one
  phrase, so the cue before it governs every item (CheXpert's negation and uncertainty follow the
  conjuncts of the word they attach to); a list without "or" ("no pneumothorax, small effusion") ends
  the scope at the described item;
- a past process is not active disease: "old" / "healed" / "remote" fractures, "sequela of", "changes
  of / scarring from prior infection" are 0; "resolving X" is -1 (still there or not is not said);
  "residual X" is a present finding (1);
- a broken device ("catheter fracture", "fractured sternal wire") is Support Devices, not Fracture;
- Support Devices is any hardware in or on the patient: tubes, lines, catheters, pacers and leads,
  valve prostheses, clips, wires (sternotomy), closure devices, a bare "device";
- "upper limits of normal (or mildly enlarged)" heart or cardiomediastinal silhouette is -1, as
  CheXpert reads "borderline"; "pulmonary vascularity within normal limits" is not an edema mention.
These conventions are the truth of tests/eval/labeler_sentences.py (REAL_PROSE: one group per
failure class found on real reports). `cxrfm labeler score CSV` scores the rules on your own reports.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass
from functools import lru_cache

from cxrfm.data.schema import CHEXPERT_LABELS
from cxrfm.eval import labeler_rules as R

NON_PATHOLOGY = ("No Finding", "Support Devices")
_PRIORITY = {1: 3, -1: 2, 0: 1}  # positive > uncertain > negative when mentions of one label disagree
_WORD = re.compile(r"[a-z0-9]+")
_OR_LIST = re.compile(R.OR_LIST)
_STOPS = {R.NEG: re.compile(R.FWD_NEG_STOP), R.UNC: re.compile(R.FWD_UNC_STOP), R.BWD: re.compile(R.BWD_STOP)}


@dataclass(frozen=True)
class Mention:
    labels: tuple[str, ...]
    text: str
    start: int  # anchor span in the sentence
    end: int
    base: int


@dataclass(frozen=True)
class Labeled:
    sentence: str
    mention: Mention
    value: int
    reason: str  # the cue that decided the value, or "base"


@lru_cache(maxsize=None)
def _compiled():
    mentions = [(labels, re.compile(p), base) for labels, p, base in R.MENTIONS]
    triggers = [(t, re.compile(t.pattern)) for t in R.TRIGGERS]
    return mentions, triggers, [re.compile(m) for m in R.MASKS]


def sentences(text: str) -> list[str]:
    """Lower-cased sentences. "vs." is not a sentence end; neither is the point of "1.5"."""
    text = re.sub(r"\bvs\.", "vs", text.lower())
    parts = re.split(r"(?<=[.!?])\s+|\n+|:\s*", text)
    out = []
    for p in parts:
        p = re.sub(r"\s+", " ", p).strip(" .!?")
        if p:
            out.append(p)
    return out


def _mask(sentence: str, masks) -> str:
    """Blank masked phrases (same length, so offsets stay valid) before triggers are searched."""
    chars = list(sentence)
    for rx in masks:
        for m in rx.finditer(sentence):
            s, e = m.span("m") if "m" in rx.groupindex and m.group("m") else m.span()
            chars[s:e] = " " * (e - s)
    return "".join(chars)


class _Sentence:
    """A sentence with its word starts and clause boundaries, so that the reach and clause checks of
    every (cue, mention) pair are two bisections, not a scan (a long run-on generation stays fast)."""

    def __init__(self, text: str):
        self.text = text
        self.word_starts = [m.start() for m in _WORD.finditer(text)]
        self.boundaries = [m.start() for m in re.finditer(R.CLAUSE_BOUNDARY, text)]
        self._lists: list[tuple[int, int, int]] | None = None

    def or_list(self, mention: Mention) -> tuple[int, int, int] | None:
        """(start, end, end of the first item) of an "A, B, or C" list holding the mention, else None."""
        if self._lists is None:
            self._lists = [(m.start(), m.end(), m.start("sep")) for m in _OR_LIST.finditer(self.text)
                           if re.search(r"\b(?:or|nor|and/or)\b", m.group(0))]
        return next(((s, e, f) for s, e, f in self._lists if s <= mention.start and mention.end <= e), None)

    def words(self, lo: int, hi: int) -> int:
        return bisect_left(self.word_starts, hi) - bisect_left(self.word_starts, lo)

    def crosses_boundary(self, lo: int, hi: int) -> bool:
        i = bisect_left(self.boundaries, lo)
        return i < len(self.boundaries) and self.boundaries[i] < hi


def find_mentions(sentence: str) -> list[Mention]:
    mentions, _, _ = _compiled()
    found = []
    for labels, rx, base in mentions:
        for m in rx.finditer(sentence):
            s, e = m.span("m") if "m" in rx.groupindex and m.group("m") else m.span()
            found.append(Mention(labels, m.group(0), s, e, base))
    return found


def _in_scope(trigger, span: tuple[int, int], mention: Mention, sent: _Sentence) -> bool:
    """Whether the cue at `span` governs the mention: right direction, same clause, within reach, no stop."""
    t0, t1 = span
    if trigger.direction == R.FWD:
        if t1 > mention.start:
            return False
        lo, hi = t1, mention.start
        stop = _STOPS[R.NEG if trigger.kind == R.NEG else R.UNC]
    else:
        if t0 < mention.end:
            return False
        lo, hi = mention.end, t0
        stop = _STOPS[R.BWD]
    if sent.crosses_boundary(lo, hi):
        return False
    if trigger.direction == R.FWD and trigger.kind in (R.NEG, R.UNC):
        listed = sent.or_list(mention)
        if listed is not None and t1 <= listed[2]:  # the cue governs the list's first item, so all of it
            lo, hi = min(t1, listed[0]), listed[0]
            return sent.words(lo, hi) <= trigger.reach and stop.search(sent.text, lo, hi) is None
    if sent.words(lo, hi) > trigger.reach:
        return False
    return stop.search(sent.text, lo, hi) is None


def _alternatives(sent: _Sentence, mentions: list[Mention]) -> set[int]:
    """Indices of mentions joined by "or"/"versus" to a mention of another observation ("atelectasis or
    pneumonia"): CheXpert reads both as uncertain. A comma between breaks the pair (lists)."""
    hit: set[int] = set()
    text, reach = sent.text, R.ALTERNATIVE_REACH
    for m in re.finditer(R.ALTERNATIVE, text):
        before = [i for i, x in enumerate(mentions) if x.end <= m.start() and sent.words(x.end, m.start()) <= reach
                  and "," not in text[x.end : m.start()]]
        after = [i for i, x in enumerate(mentions) if x.start >= m.end() and sent.words(m.end(), x.start) <= reach
                 and "," not in text[m.end() : x.start]]
        for i in before:
            for j in after:
                if set(mentions[i].labels) != set(mentions[j].labels):
                    hit.update((i, j))
    return hit


def label_sentence(sentence: str) -> list[Labeled]:
    """Every mention in one (lower-cased) sentence with its value and the reason for it."""
    _, triggers, masks = _compiled()
    mentions = find_mentions(sentence)
    if not mentions:
        return []
    sent = _Sentence(sentence)
    masked = _mask(sentence, masks)
    cues = [(t, m.span(), m.group(0)) for t, rx in triggers for m in rx.finditer(masked)]
    alternatives = _alternatives(sent, mentions)
    out = []
    for i, mention in enumerate(mentions):
        if mention.base == 0:  # a statement of normality: the cues around it do not change it
            out.append(Labeled(sentence, mention, 0, "normal statement"))
            continue
        governing = {t.kind: text for t, span, text in cues if _in_scope(t, span, mention, sent)}
        if R.PRE_UNC in governing:
            value, reason = -1, governing[R.PRE_UNC]
        elif R.NEG in governing:
            value, reason = 0, governing[R.NEG]
        elif R.UNC in governing:
            value, reason = -1, governing[R.UNC]
        elif i in alternatives:
            value, reason = -1, "alternative (or/versus)"
        else:
            value, reason = mention.base, "base"
        out.append(Labeled(sentence, mention, value, reason.strip()))
    return out


def explain(text: str) -> list[Labeled]:
    """All labelled mentions of a report, sentence by sentence (for debugging and the bench)."""
    return [x for s in sentences(text) for x in label_sentence(s)]


def label_report(text: str) -> dict[str, int]:
    """{observation: 1 | 0 | -1} for each observation of CHEXPERT_LABELS the report mentions, plus
    "No Finding": 1 when no pathology is positive or uncertain (else absent), the CheXpert rule."""
    labels: dict[str, int] = {}
    for x in explain(text):
        for name in x.mention.labels:
            old = labels.get(name)
            if old is None or _PRIORITY[x.value] > _PRIORITY[old]:
                labels[name] = x.value
    if not any(v in (1, -1) for k, v in labels.items() if k not in NON_PATHOLOGY):
        labels["No Finding"] = 1
    return {k: labels[k] for k in CHEXPERT_LABELS if k in labels}
