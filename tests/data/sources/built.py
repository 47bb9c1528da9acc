"""Run a report converter through the real `cxrfm data build` path and read the shards back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cxrfm.config import DataConfig
from cxrfm.data.build import build_from_source
from cxrfm.data.schema import Study
from cxrfm.data.shards import verify_shards
from cxrfm.eval.ground_truth import iter_split


def build(source: str, root: Path, out: Path, **overrides) -> tuple[dict, dict[str, tuple[Study, dict[str, np.ndarray]]], dict]:
    """(manifest, {study_id: (Study, images)} read back from every split, build_report.json)."""
    settings = {"source": source, "root": str(root), "shard_size": 2, "num_workers": 1, "vocab_size": 300,
                "image_size": 128} | overrides
    manifest = build_from_source(DataConfig(**settings), out)
    check = verify_shards(out)
    assert check.ok, check.problems
    back = {}
    for split in ("train", "val", "test"):
        if any(sh["split"] == split for sh in manifest["shards"]):
            back.update({s.study_id: (s, imgs) for s, imgs in iter_split(out, split)})
    report = json.loads((out / "build_report.json").read_text())
    return manifest, back, report
