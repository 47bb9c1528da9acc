"""The training pipeline's shard reader (no Ray needed): a shard read whole and checked against its manifest
sha256; a damaged, missing or unreadable shard becomes one placeholder row that the mapper turns into a skipped
example counting all the shard's samples."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest

from cxrfm.data.pipeline import MEMBERS, SKIP_REASONS, StudyToExample, read_shard
from cxrfm.data.samples import SampleSpec
from cxrfm.data.shards import load_manifest


@pytest.fixture()
def entry(small_shards, tmp_path):
    sh = next(s for s in load_manifest(small_shards)["shards"] if s["split"] == "train")
    path = tmp_path / sh["path"]
    shutil.copy(small_shards / sh["path"], path)
    return {"path": str(path), "sha256": sh["sha256"], "samples": sh["samples"]}


def _mapped(small_shards, rows: list[dict]) -> dict:
    batch = {"__key__": np.array([r["__key__"] for r in rows])}
    batch.update({c: np.array([r[c] for r in rows], dtype=object if c in MEMBERS else np.int64)
                  for c in ("shard_skip", "shard_samples", *MEMBERS)})
    mapper = StudyToExample(str(small_shards / "tokenizer"), SampleSpec(512, 64, 16), {"report": 1.0}, seed=0)
    return mapper(batch)


def test_a_good_shard_gives_its_samples_in_key_order(entry, small_shards):
    rows = read_shard(entry)
    assert len(rows) == entry["samples"] and [r["__key__"] for r in rows] == sorted(r["__key__"] for r in rows)
    assert all(r["shard_skip"] == 0 and r["json"] and r["frontal.png"].startswith(b"\x89PNG") for r in rows)
    out = _mapped(small_shards, rows)
    assert (out["skip_code"] == 0).all() and (out["skip_count"] == 1).all()


@pytest.mark.parametrize("damage, reason", [("bytes", "checksum_mismatch"), ("delete", "missing_shard"),
                                            ("not_a_tar", "unreadable_shard")])
def test_an_unusable_shard_is_one_counted_placeholder(entry, small_shards, damage, reason):
    path = entry["path"]
    if damage == "bytes":
        with open(path, "r+b") as f:
            f.seek(2000)
            f.write(b"\x00" * 16)
    elif damage == "delete":
        os.unlink(path)
    else:  # a shard whose manifest checksum matches but that is no tar (verify off, or a broken build)
        with open(path, "wb") as f:
            f.write(b"not a tar at all" * 100)
        entry = {**entry, "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    [row] = read_shard(entry)
    assert row["shard_skip"] == SKIP_REASONS.index(reason) and row["shard_samples"] == entry["samples"]
    out = _mapped(small_shards, [row])
    assert SKIP_REASONS[out["skip_code"][0]] == reason and out["skip_count"][0] == entry["samples"]
    assert (out["labels"] == -100).all()  # nothing of it is trained on


def test_unchecked_read_when_verify_is_off(entry):
    with open(entry["path"], "ab") as f:
        f.write(b"\x00" * 1024)  # trailing zero blocks: still a valid tar, no longer the manifest's bytes
    assert read_shard(entry)[0]["shard_skip"] == SKIP_REASONS.index("checksum_mismatch")
    assert len(read_shard({**entry, "sha256": ""})) == entry["samples"]
