"""Convert a fixture corpus the way `cxrfm data build` does (scan, then load per record), write the
studies to real shards and read them back: what the tests compare is what training would read."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxrfm.data.schema import Study
from cxrfm.data.shards import verify_shards, write_shards
from cxrfm.data.sources.base import BuildReport
from cxrfm.eval.evaluate import iter_split


def convert(converter, root: Path) -> tuple[dict[str, tuple[Study, dict[str, np.ndarray]]], BuildReport]:
    report = BuildReport()
    records = converter.scan(root, report)
    loaded = {}
    for record in records:
        result = converter.load(record, report)
        if result is not None:
            loaded[result[0].study_id] = result
    return loaded, report


def roundtrip(converter, root: Path, out: Path) -> tuple[dict, dict, BuildReport]:
    """(loaded studies by id, studies read back from the shards by id, report)."""
    loaded, report = convert(converter, root)
    write_shards(loaded.values(), out, shard_size=2, source=converter.name)
    assert verify_shards(out).ok, verify_shards(out).problems
    back = {}
    for split in ("train", "val", "test"):
        if any(s.split == split for s, _ in loaded.values()):
            back.update({s.study_id: (s, imgs) for s, imgs in iter_split(out, split)})
    assert set(back) == set(loaded)
    for sid, (study, images) in loaded.items():
        assert back[sid][0] == study  # every field survives the shard round trip
        for role, img in images.items():
            np.testing.assert_array_equal(back[sid][1][role], img)  # PNG members are lossless
    return loaded, back, report
