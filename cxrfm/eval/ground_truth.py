"""A split's ground truth as the scorers read it: the studies straight from the shards, and answers normalised
for exact match. evaluate.py, baselines.py and image_classifier.py all import it, so imports flow one way."""

from __future__ import annotations

import io
import re
import tarfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cxrfm.data import store
from cxrfm.data.schema import Study
from cxrfm.data.shards import load_manifest
from cxrfm.model.generate import load_image


def iter_split(shards: str | Path, split: str, limit: int | None = None) -> Iterator[tuple[Study, dict[str, np.ndarray]]]:
    """Studies of one split straight from the tar shards, local or in a store (s3://...); each study once, in order."""
    n = 0
    for sh in load_manifest(shards)["shards"]:
        if sh["split"] != split:
            continue
        members: dict[str, dict[str, bytes]] = defaultdict(dict)
        with tarfile.open(fileobj=io.BytesIO(store.read_bytes(store.join(shards, sh["path"])))) as tar:
            for m in tar:
                if m.isfile():
                    key, _, ext = m.name.partition(".")
                    members[key][ext] = tar.extractfile(m).read()
        for key in sorted(members):
            study = Study.model_validate_json(members[key]["json"])
            yield study, {ref.role: load_image(members[key][ref.key], f"{sh['path']}:{key}") for ref in study.images}
            n += 1
            if limit and n >= limit:
                return


def normalize_answer(text: str) -> str:
    return re.sub(r"[^a-z0-9. ]+", "", text.lower()).strip(" .")
