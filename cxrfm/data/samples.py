"""From one Study to one training example of one task: token ids, loss labels, images.

Sequence layout (one row, padded to `max_seq_len`):

    <bos> <frontal> <image>*N [<lateral> <image>*N] [<prior> <image>*N] <task_x> prompt  | answer <eos> <pad>...
    labels: -100 .................................................................... | answer <eos>  -100...

A VQA or grounding example can carry more turns about the same images (`SampleSpec.max_turns`, as
multi-turn instruction data does): each further turn is `<task_x> prompt | answer <eos>`, labelled the same
way, in random order, as many whole turns as fit. The first turn is exactly the single-turn layout, which
is what generation and evaluation prompt with.

Images appear in the fixed role order frontal, lateral, prior; the model fills the `<image>`
positions with visual tokens in exactly that order (row-major over the batch).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cxrfm.data.schema import CHEXPERT_LABELS, Study
from cxrfm.text.tokenizer import BOS, EOS, IMAGE, PAD, ROLE_TOKENS, TASK_TOKENS, box_to_loc_tokens

ROLES: tuple[str, ...] = ("frontal", "lateral", "prior")
LM_TASKS: tuple[str, ...] = ("report", "vqa", "grounding")  # answers are text: the LM loss covers them
ALL_TASKS: tuple[str, ...] = LM_TASKS + ("generate",)  # generate: report text in, frontal image out
IGNORE = -100


@dataclass(frozen=True)
class SampleSpec:
    max_seq_len: int
    image_size: int  # side the vision encoder takes
    num_image_tokens: int  # visual tokens per image
    augment: bool = False
    max_turns: int = 1  # VQA / grounding: (prompt, answer) pairs of the study per example


def available_tasks(study: Study) -> list[str]:
    tasks = []
    if study.report:
        tasks.append("report")
    if study.vqa:
        tasks.append("vqa")
    if study.grounding and study.image("frontal") is not None:
        tasks.append("grounding")
    if study.report and study.image("frontal") is not None:
        tasks.append("generate")
    return tasks


def choose_task(study: Study, weights: dict[str, float], rng: np.random.Generator) -> tuple[str | None, bool]:
    """Draw a task from the mixture among those this study can serve. Returns (task, fell_back)."""
    wanted = [t for t in ALL_TASKS if weights.get(t, 0) > 0]
    p = np.array([weights[t] for t in wanted], dtype=np.float64)
    first = wanted[rng.choice(len(wanted), p=p / p.sum())]
    can = [t for t in wanted if t in available_tasks(study)]
    if first in can:
        return first, False
    if not can:
        return None, True
    p = np.array([weights[t] for t in can], dtype=np.float64)
    return can[rng.choice(len(can), p=p / p.sum())], True


def report_prompt(indication: str, has_prior: bool) -> str:
    prompt = f"indication: {indication}" if indication else "indication: none given"
    return prompt + (" comparison: prior study provided" if has_prior else "")


def turns(study: Study, task: str, rng: np.random.Generator, max_turns: int) -> list[tuple[str, str]]:
    """The (prompt, answer) pairs of one example. Report and generate have one; VQA and grounding draw up
    to `max_turns` of the study's pairs without repeats, in random order."""
    if task == "report":
        return [(report_prompt(study.indication, study.image("prior") is not None), study.report)]
    if task == "generate":
        return [(study.report, "")]  # the LM reads the report; the diffusion decoder draws the frontal image
    if task == "vqa":
        return [(qa.question, qa.answer) for qa in _draw(study.vqa, rng, max_turns)]
    if task == "grounding":
        out = []
        for gp in _draw(study.grounding, rng, max_turns):
            ref = study.image(gp.image_role)
            out.append((gp.phrase, "".join(box_to_loc_tokens((b.x1, b.y1, b.x2, b.y2), ref.width, ref.height)
                                           for b in gp.boxes)))
        return out
    raise ValueError(f"unknown task {task!r}; allowed: {list(ALL_TASKS)}")


def _draw(items: list, rng: np.random.Generator, k: int) -> list:
    if k <= 1:  # one draw, as before multi-turn examples existed: the same seed gives the same examples
        return [items[rng.integers(len(items))]]
    return [items[i] for i in rng.permutation(len(items))[:k]]


def prompt_ids(tokenizer, roles: list[str], task: str, prompt: str, num_image_tokens: int) -> list[int]:
    """<bos> <role> <image>*N ... <task_x> prompt — the same layout for training and generation."""
    # One lookup per special token: get_vocab() copies the whole vocabulary into a dict on every call,
    # which was a tenth of a serving replica's CPU time (one prompt per request).
    specials = [BOS, *(ROLE_TOKENS[r] for r in ROLES if r in roles), IMAGE, TASK_TOKENS[task]]
    found = dict(zip(specials, tokenizer.convert_tokens_to_ids(specials)))
    missing = [t for t in specials if found[t] is None or (found[t] == tokenizer.unk_token_id and t != tokenizer.unk_token)]
    if missing:
        raise KeyError(f"tokenizer has no special tokens {missing}; it was not built by cxrfm.text.tokenizer")
    ids = [found[BOS]]
    for role in ROLES:
        if role in roles:
            ids += [found[ROLE_TOKENS[role]]] + [found[IMAGE]] * num_image_tokens
    ids.append(found[TASK_TOKENS[task]])
    return ids + tokenizer.encode(prompt, add_special_tokens=False)


def finding_targets(study: Study) -> np.ndarray:
    """(14,) float32 in CHEXPERT_LABELS order: 1 positive, 0 negative or not mentioned, -1 ignored (uncertain;
    or every entry when the study has no labels at all, e.g. a VQA-only corpus)."""
    if not study.labels:
        return np.full(len(CHEXPERT_LABELS), -1.0, np.float32)
    values = [study.labels.get(name, 0) for name in CHEXPERT_LABELS]
    return np.array([1.0 if v == 1 else (-1.0 if v == -1 else 0.0) for v in values], np.float32)


VIEW_CLASSES: tuple[str, ...] = ("PA", "AP", "LATERAL")  # the auxiliary view loss's classes; "LL" counts as LATERAL


def view_targets(study: Study, present: np.ndarray) -> np.ndarray:
    """(3,) int64 per role slot: the index of its image's view in VIEW_CLASSES, -1 where no image is shown."""
    out = np.full(len(ROLES), -1, np.int64)
    for i, role in enumerate(ROLES):
        ref = study.image(role)
        if present[i] and ref is not None:
            out[i] = VIEW_CLASSES.index("LATERAL" if ref.view == "LL" else ref.view)
    return out


def decode_image(data: bytes, size: int) -> np.ndarray:
    """PNG/JPEG bytes -> (size, size) uint8 grayscale. Raises on corrupt data."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photometric jitter only: flips or crops would break laterality words and box targets."""
    x = image.astype(np.float32) / 255.0
    x = x ** rng.uniform(0.8, 1.25)  # exposure / gamma
    x = (x - 0.5) * rng.uniform(0.85, 1.15) + 0.5 + rng.uniform(-0.05, 0.05)
    x += rng.normal(0, 0.01, x.shape).astype(np.float32)
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def encode_example(study: Study, task: str, images: dict[str, np.ndarray], tokenizer, spec: SampleSpec,
                   rng: np.random.Generator) -> tuple[dict[str, np.ndarray], bool]:
    """Token ids, labels and the (3, S, S) image stack for one example. Returns (example, truncated)."""
    (prompt, answer), *more = turns(study, task, rng, spec.max_turns)
    vocab = tokenizer.get_vocab()
    present = np.zeros(len(ROLES), dtype=bool)
    stack = np.zeros((len(ROLES), spec.image_size, spec.image_size), dtype=np.uint8)
    if task == "generate":
        # The target image rides in slot 0 with image_present all False: the LM sees text only.
        stack[0] = images["frontal"]
        roles, answer_ids = [], []
    else:
        for i, role in enumerate(ROLES):
            if role in images:
                present[i] = True
                stack[i] = augment(images[role], rng) if spec.augment else images[role]
        roles = list(images)
        answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [vocab[EOS]]
    prefix = prompt_ids(tokenizer, roles, task, prompt, spec.num_image_tokens)
    head_len = len(prefix) - len(tokenizer.encode(prompt, add_special_tokens=False))

    # Keep every image token and the answer's start; cut the prompt text first, then the answer's tail.
    budget = spec.max_seq_len
    truncated = len(prefix) + len(answer_ids) > budget
    if truncated:
        room_prompt = max(head_len, budget - len(answer_ids))
        prefix = prefix[:room_prompt]
        answer_ids = answer_ids[: budget - len(prefix)]
    ids = prefix + answer_ids
    labels = [IGNORE] * len(prefix) + answer_ids
    for more_prompt, more_answer in more:  # further turns: whole ones only, while they fit
        head = [vocab[TASK_TOKENS[task]]] + tokenizer.encode(more_prompt, add_special_tokens=False)
        tail = tokenizer.encode(more_answer, add_special_tokens=False) + [vocab[EOS]]
        if truncated or len(ids) + len(head) + len(tail) > budget:
            break
        ids, labels = ids + head + tail, labels + [IGNORE] * len(head) + tail
    pad = budget - len(ids)
    example = {
        "input_ids": np.array(ids + [vocab[PAD]] * pad, dtype=np.int64),
        "labels": np.array(labels + [IGNORE] * pad, dtype=np.int64),
        "attention_mask": np.array([1] * len(ids) + [0] * pad, dtype=np.int64),
        "images": stack,
        "image_present": present,
        "findings": finding_targets(study),
        "views": view_targets(study, present),
    }
    return example, truncated
