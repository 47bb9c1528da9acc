"""Baselines that `cxrfm eval` scores in the same run, on the same split, with the same metric code.

A model is only worth its numbers if it beats what needs no model at all:
  report     most-frequent training report (every test study gets it), and nearest-neighbour retrieval
             (the report of the training study whose frontal image is most similar, cosine on 32x32
             pixels standardised per image);
  vqa        the majority training answer ("majority"), and the majority answer per question text seen in
             training ("question_prior"; global majority for unseen questions) — the strongest answer a
             model can give without looking at the image;
  grounding  prior box per finding: the mean training box of the phrase's label (relative coordinates,
             scaled to each test image), and the mean of all boxes for labels never seen in training;
  generate   real test images chosen at random (chance), and random test images with the same scored
             labels as the prompt (what a perfect generator of this data would reach).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from cxrfm.data.schema import Study
from cxrfm.eval.ground_truth import normalize_answer

RETRIEVAL_SIDE = 32  # pixels per side of the retrieval feature: enough for the heart and the lung fields


def retrieval_feature(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (RETRIEVAL_SIDE**2,) float32, zero mean and unit norm (brightness/contrast invariant)."""
    small = np.asarray(Image.fromarray(image).resize((RETRIEVAL_SIDE, RETRIEVAL_SIDE), Image.BILINEAR), np.float32)
    v = small.ravel() - small.mean()
    return v / (np.linalg.norm(v) + 1e-6)


def _norm(text: str) -> str:
    return normalize_answer(text)


@dataclass
class Baselines:
    """Everything the baselines learn from the training split."""

    most_frequent_report: str
    retrieval_features: np.ndarray  # (n_train, RETRIEVAL_SIDE**2)
    retrieval_reports: list[str]
    answer_by_question: dict[str, str]
    global_answer: str
    mean_box_by_label: dict[str, tuple[float, float, float, float]]  # relative (x1, y1, x2, y2) in [0, 1]
    mean_box_all: tuple[float, float, float, float]
    counts: dict[str, int] = field(default_factory=dict)

    def retrieve_report(self, frontal: np.ndarray) -> str:
        sims = self.retrieval_features @ retrieval_feature(frontal)  # (n_train,)
        return self.retrieval_reports[int(np.argmax(sims))]

    def answer(self, question: str) -> str:
        return self.answer_by_question.get(_norm(question), self.global_answer)

    def prior_box(self, label: str, width: int, height: int) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = self.mean_box_by_label.get(label, self.mean_box_all)
        return x1 * width, y1 * height, x2 * width, y2 * height


def fit_baselines(train: list[tuple[Study, dict[str, np.ndarray]]]) -> Baselines:
    """Fit every baseline on the training studies (Study, role -> image)."""
    reports = [s.report for s, _ in train if s.report]
    if not reports:
        raise ValueError("the training split has no reports: the report baselines need some")
    most_frequent = Counter(reports).most_common(1)[0][0]

    with_frontal = [(s, ims["frontal"]) for s, ims in train if s.report and "frontal" in ims]
    features = np.stack([retrieval_feature(im) for _, im in with_frontal]) if with_frontal else np.zeros((0, RETRIEVAL_SIDE**2))

    by_question: dict[str, Counter] = defaultdict(Counter)
    all_answers: Counter = Counter()
    for s, _ in train:
        for qa in s.vqa:
            by_question[_norm(qa.question)][_norm(qa.answer)] += 1
            all_answers[_norm(qa.answer)] += 1

    rel_boxes: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    for s, _ in train:
        for gp in s.grounding:
            ref = s.image(gp.image_role)
            if ref is None:
                continue
            for b in gp.boxes:
                rel_boxes[gp.label].append((b.x1 / ref.width, b.y1 / ref.height, b.x2 / ref.width, b.y2 / ref.height))
    every_box = [b for boxes in rel_boxes.values() for b in boxes]
    return Baselines(
        most_frequent_report=most_frequent,
        retrieval_features=features.astype(np.float32),
        retrieval_reports=[s.report for s, _ in with_frontal],
        answer_by_question={q: c.most_common(1)[0][0] for q, c in by_question.items()},
        global_answer=all_answers.most_common(1)[0][0] if all_answers else "",
        mean_box_by_label={k: tuple(np.mean(v, axis=0)) for k, v in rel_boxes.items()},
        mean_box_all=tuple(np.mean(every_box, axis=0)) if every_box else (0.25, 0.25, 0.75, 0.75),
        counts={"train_reports": len(reports), "train_questions": sum(all_answers.values()), "train_boxes": len(every_box)},
    )


def pick_random_images(label_vectors: np.ndarray, seed: int = 0) -> tuple[list[int], list[int | None]]:
    """For item i: a random other item (chance), and a random other item with the same label vector (None
    when no other test image has exactly those labels; the caller counts and reports those)."""
    rng = np.random.default_rng(seed)
    n = len(label_vectors)
    if n < 2:
        raise ValueError("the image baselines need at least 2 test images")
    random_idx, same_idx = [], []
    groups: dict[bytes, list[int]] = defaultdict(list)
    for i, v in enumerate(label_vectors):
        groups[v.tobytes()].append(i)
    for i, v in enumerate(label_vectors):
        others = [j for j in range(n) if j != i]
        random_idx.append(int(rng.choice(others)))
        same = [j for j in groups[v.tobytes()] if j != i]
        same_idx.append(int(rng.choice(same)) if same else None)
    return random_idx, same_idx
