"""`cxrfm data build`: studies from a source -> shards + manifest + tokenizer trained on the train split."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cxrfm.config import DataConfig
from cxrfm.data.schema import Study
from cxrfm.data.shards import MANIFEST, write_shards


def study_texts(study: Study) -> list[str]:
    """Everything the LM reads or writes for a study: the tokenizer is trained on these."""
    texts = [study.indication, study.findings, study.impression]
    texts += [f"{qa.question} {qa.answer}" for qa in study.vqa]
    texts += [gp.phrase for gp in study.grounding]
    return [t for t in texts if t]


def _source(cfg: DataConfig) -> Iterator[tuple[Study, dict[str, np.ndarray]]]:
    if cfg.source == "synthetic":
        from cxrfm.data.synthetic import generate_studies

        return generate_studies(num_studies=cfg.num_studies, image_size=cfg.image_size, seed=cfg.seed)
    raise ValueError(f"data.source {cfg.source!r} has no converter yet; allowed: ['synthetic']")


def build(cfg: DataConfig, out: str | Path) -> dict:
    """Write shards and the tokenizer to `out`; returns the manifest."""
    from cxrfm.text.tokenizer import train_tokenizer

    out = Path(out)
    train_texts: list[str] = []

    def collect():
        for study, images in _source(cfg):
            if study.split == "train":
                train_texts.extend(study_texts(study))
            yield study, images

    manifest = write_shards(collect(), out, cfg.shard_size, cfg.source)
    if not train_texts:
        raise ValueError(f"no training studies in {out}; raise data.num_studies")
    tokenizer = train_tokenizer(train_texts, vocab_size=cfg.vocab_size)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    return manifest


def ensure_shards(cfg: DataConfig) -> Path:
    """Build synthetic shards when missing (the tiny default runs from nothing); never for real sources."""
    out = Path(cfg.shards)
    if (out / MANIFEST).is_file() and (out / "tokenizer" / "tokenizer.json").is_file():
        return out
    if cfg.source != "synthetic":
        raise FileNotFoundError(f"no shards at {out}; build them first: cxrfm data build --source {cfg.source} --out {out}")
    build(cfg, out)
    return out
