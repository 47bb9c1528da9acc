"""BPE tokenizer trained on the training reports, saved as a transformers fast tokenizer.

Special tokens: padding/bos/eos/unk, image placeholders (one `<image>` per visual token, preceded
by a role marker), one token per task, and 1024 location bins `<loc_0>`..`<loc_1023>` used for
grounding boxes PaliGemma-style (y1 x1 y2 x2, each quantised to 1024 bins of the image side).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from cxrfm.data import store

NUM_LOC_BINS = 1024
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
IMAGE = "<image>"
ROLE_TOKENS = {"frontal": "<frontal>", "lateral": "<lateral>", "prior": "<prior>"}
TASK_TOKENS = {t: f"<task_{t}>" for t in ("report", "vqa", "grounding", "generate")}
LOC_TOKENS = [f"<loc_{i}>" for i in range(NUM_LOC_BINS)]
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IMAGE, *ROLE_TOKENS.values(), *TASK_TOKENS.values(), *LOC_TOKENS]
_LOC_RE = re.compile(r"<loc_(\d+)>")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts`; the special tokens come on top of `vocab_size`."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Reports mix case arbitrarily between sources; lower-casing halves the vocabulary we need.
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(SPECIAL_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=[IMAGE, *ROLE_TOKENS.values(), *TASK_TOKENS.values()],
    )
    return fast


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """From a local directory, or a store URI (s3://.../tokenizer) copied to a local cache first."""
    path = store.local_dir(str(path)) if store.is_remote(path) else Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer at {path} (expected tokenizer.json); build shards first: cxrfm data build")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def box_to_loc_tokens(box: tuple[float, float, float, float], width: int, height: int) -> str:
    """(x1, y1, x2, y2) in pixels -> '<loc_y1><loc_x1><loc_y2><loc_x2>' (PaliGemma order)."""
    x1, y1, x2, y2 = box

    def q(v: float, side: int) -> int:
        return min(NUM_LOC_BINS - 1, max(0, int(v / side * NUM_LOC_BINS)))

    return "".join(f"<loc_{q(v, s)}>" for v, s in ((y1, height), (x1, width), (y2, height), (x2, width)))


def loc_tokens_to_boxes(text: str, width: int, height: int) -> tuple[list[tuple[float, float, float, float]], list[str]]:
    """Parse location tokens back to pixel boxes (bin centres). Returns (boxes, problems).

    A sequence whose length is not a multiple of 4, or with y2 <= y1 / x2 <= x1, is reported in
    `problems` and not turned into a box: a malformed answer is never guessed into a box.
    """
    bins = [int(m) for m in _LOC_RE.findall(text)]
    problems: list[str] = []
    if len(bins) % 4:
        problems.append(f"{len(bins)} location tokens is not a multiple of 4; trailing {len(bins) % 4} ignored")
    boxes = []
    for i in range(0, len(bins) - len(bins) % 4, 4):
        y1, x1, y2, x2 = bins[i : i + 4]
        if y2 <= y1 or x2 <= x1:
            problems.append(f"box {i // 4} has non-positive size (bins y1={y1} x1={x1} y2={y2} x2={x2})")
            continue
        sx, sy = width / NUM_LOC_BINS, height / NUM_LOC_BINS
        boxes.append(((x1 + 0.5) * sx, (y1 + 0.5) * sy, (x2 + 0.5) * sx, (y2 + 0.5) * sy))
    return boxes, problems
