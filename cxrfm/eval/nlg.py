"""Natural-language generation metrics of generated reports: BLEU-1..4, ROUGE-L, CIDEr, METEOR, sacreBLEU.

The scores come from the libraries the report-generation literature uses (pycocoevalcap for BLEU,
ROUGE-L, CIDEr-D and METEOR, as in R2Gen and its successors; sacrebleu for a standardised corpus BLEU),
never from hand-written n-gram code. One generated report is scored against one reference report.

Tokenisation: pycocoevalcap's PTBTokenizer starts a Java process (Stanford CoreNLP) on every call and
then drops punctuation; `tokenize` below does the same job in Python (lower case, words and decimal
numbers, punctuation dropped), so BLEU/ROUGE/CIDEr need no Java and nothing is spawned per call. Only
METEOR needs Java (its scorer is a jar); without Java, or if the jar fails, METEOR is left out and
the reason is returned under "meteor_unavailable" (a string: callers that log numbers skip it).

All scores are in [0, 1] except CIDEr (pycocoevalcap's CIDEr-D, scaled by 10 as published). sacreBLEU is
divided by 100 to share the scale of the other BLEUs. CIDEr's idf comes from the reference set itself,
so it is only meaningful over many reports (with a single pair every n-gram has idf 0 and CIDEr is 0).
"""

from __future__ import annotations

import re
import shutil
import threading

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

# Words (hyphenated and apostrophe forms kept whole: "plate-like", "patient's") and numbers with their
# decimals ("1.5 cm" keeps "1.5"); everything else (punctuation, section colons) is dropped.
_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*(?:\.[0-9]+)?")
METEOR_TIMEOUT_S = 120.0


def tokenize(text: str) -> str:
    """Lower-cased tokens joined by single spaces (the form pycocoevalcap's scorers split on)."""
    return " ".join(_TOKEN.findall(text.lower()))


class _MeteorScorer:
    """One METEOR jar for the whole process: it takes tens of seconds to load its paraphrase table, so it
    is started on first use and kept. A jar that fails or hangs is killed and dropped (the next call
    starts a fresh one)."""

    _instance = None
    _guard = threading.Lock()

    @classmethod
    def score(cls, gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float | None, str]:
        """(score, "") or (None, reason)."""
        if shutil.which("java") is None:
            return None, "java is not on PATH (pycocoevalcap's METEOR is a Java jar)"
        with cls._guard:
            if cls._instance is None:
                try:
                    from pycocoevalcap.meteor.meteor import Meteor

                    cls._instance = Meteor()
                except Exception as e:  # a missing jar or a JVM that does not start: report, do not fail
                    return None, f"METEOR did not start: {type(e).__name__}: {e}"
            meteor = cls._instance
            out: dict[str, object] = {}

            def work() -> None:
                try:
                    out["score"] = meteor.compute_score(gts, res)[0]
                except Exception as e:  # noqa: BLE001 - reported to the caller as the reason
                    out["error"] = f"{type(e).__name__}: {e}"

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            thread.join(METEOR_TIMEOUT_S)
            if thread.is_alive():
                meteor.meteor_p.kill()  # unblocks the reader thread, which then fails on the closed pipe
                thread.join(5)
                out.setdefault("error", f"timed out after {METEOR_TIMEOUT_S:.0f} s")
            if "error" in out:
                # compute_score keeps its lock when it raises and Meteor.__del__ takes that lock: give it
                # a fresh one, or garbage collection of the broken scorer would block forever.
                meteor.lock = threading.Lock()
                cls._instance = None
                return None, f"METEOR failed: {out['error']}"
            return float(out["score"]), ""


def nlg_metrics(generated: list[str], references: list[str], meteor: bool = True) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L, CIDEr, METEOR (when Java works) and sacreBLEU of generated vs reference reports.

    Keys: bleu1, bleu2, bleu3, bleu4, rouge_l, cider, meteor (or meteor_unavailable: the reason, a str),
    sacrebleu. meteor=False skips METEOR (its jar takes tens of seconds to start once per process). The
    pycocoevalcap scores are corpus-level as that library defines them (BLEU over the
    pooled n-gram counts, ROUGE-L and METEOR averaged over reports, CIDEr-D with corpus idf).
    """
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generated reports but {len(references)} references")
    if not generated:
        raise ValueError("nlg_metrics needs at least one report")
    res = {i: [tokenize(g)] for i, g in enumerate(generated)}
    gts = {i: [tokenize(r)] for i, r in enumerate(references)}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    result: dict[str, float] = {f"bleu{n}": float(b) for n, b in enumerate(bleu, 1)}
    result["rouge_l"] = float(rouge)
    result["cider"] = float(cider)

    score, reason = _MeteorScorer.score(gts, res) if meteor else (None, "not requested (meteor=False)")
    if score is None:
        result["meteor_unavailable"] = reason  # type: ignore[assignment]  # a reason, not a score
    else:
        result["meteor"] = score

    import sacrebleu

    # sacreBLEU tokenises itself (13a); it gets the raw texts, case-folded like the other scores.
    result["sacrebleu"] = float(sacrebleu.corpus_bleu(generated, [references], lowercase=True).score) / 100.0
    return result
