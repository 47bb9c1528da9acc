import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import webdataset as wds

from cxrfm.data.schema import Study
from cxrfm.data.shards import MANIFEST, ShardError, load_manifest, shard_paths, verify_shards


def _read_tar(path):
    members = {}
    with tarfile.open(path) as tar:
        for m in tar:
            members[m.name] = tar.extractfile(m).read()
    return members


def test_manifest_counts_and_checksums(small_shards):
    m = load_manifest(small_shards)
    assert sum(s["samples"] for s in m["shards"]) == sum(v["studies"] for v in m["splits"].values()) == 120
    assert set(m["splits"]) == {"train", "val", "test"}
    assert m["splits"]["train"]["tasks"]["report"] == m["splits"]["train"]["studies"]
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    # Patients per split: the distinct patient ids of the studies its shards hold (fewer than the studies:
    # the phantoms give some patients follow-up exams).
    for split, counts in m["splits"].items():
        studies = [Study.model_validate_json(data) for sh in m["shards"] if sh["split"] == split
                   for name, data in _read_tar(small_shards / sh["path"]).items() if name.endswith(".json")]
        assert counts["studies"] == len(studies)
        assert counts["patients"] == len({s.patient_id for s in studies}), split
    assert m["splits"]["train"]["patients"] < m["splits"]["train"]["studies"]
    assert (small_shards / "tokenizer" / "tokenizer.json").is_file()


def test_round_trip_keys_sorted_and_study_intact(small_shards):
    for sh in load_manifest(small_shards)["shards"]:
        members = _read_tar(small_shards / sh["path"])
        keys = [name.split(".", 1)[0] for name in members]
        assert keys == sorted(keys), "keys must be sorted within a shard (Ray Data groups consecutive keys)"
        for name, data in members.items():
            if name.endswith(".json"):
                study = Study.model_validate_json(data)
                assert study.split == sh["split"]
                for ref in study.images:
                    assert f"{study.study_id}.{ref.key}" in members


def _corrupt_one_png(src, dst):
    """Copy a shard dir and overwrite the bytes of one PNG with garbage (tar stays valid)."""
    shutil.copytree(src, dst)
    m = load_manifest(dst)
    first = dst / m["shards"][0]["path"]
    members = _read_tar(first)
    bad_key = sorted(members)[0].split(".", 1)[0]
    with wds.TarWriter(str(first)) as sink:
        samples = {}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = data
        for key in sorted(samples):
            s = samples[key]
            if key == bad_key:
                s["frontal.png"] = s["frontal.png"][:40] + b"\x00garbage"
            sink.write(s)
    return m["shards"][0]["path"], bad_key


def test_verify_reports_corrupt_sample_by_shard_and_key(small_shards, tmp_path):
    assert verify_shards(small_shards).ok
    shard, key = _corrupt_one_png(small_shards, tmp_path / "bad")
    report = verify_shards(tmp_path / "bad")
    assert not report.ok
    found = {(p["shard"], p["key"]) for p in report.problems}
    assert (shard, key) in found
    assert (shard, "*") in found  # the checksum no longer matches the manifest either


def test_missing_dir_empty_manifest_and_checksum_exclusion(small_shards, tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / MANIFEST).write_text(json.dumps({"schema_version": "1.0", "shards": []}))
    with pytest.raises(ShardError, match="empty dataset"):
        load_manifest(tmp_path / "empty")
    shard, _ = _corrupt_one_png(small_shards, tmp_path / "bad")
    paths, skipped = shard_paths(tmp_path / "bad", "train", verify=True)
    assert shard not in " ".join(paths) and skipped["checksum_mismatch"] > 0
    paths, skipped = shard_paths(tmp_path / "bad", "train", verify=False)
    assert any(p.endswith(shard) for p in paths) and not skipped


def test_verify_reports_a_shard_with_fewer_samples_than_its_manifest(small_shards, tmp_path):
    """A shard rewritten without its last sample (a valid tar, every remaining sample intact) is reported by
    its sample count, not only by its checksum."""
    shutil.copytree(small_shards, tmp_path / "short")
    entry = load_manifest(tmp_path / "short")["shards"][0]
    path = tmp_path / "short" / entry["path"]
    members = _read_tar(path)
    last = sorted({name.split(".", 1)[0] for name in members})[-1]
    samples = {}
    for name, data in members.items():
        key, ext = name.split(".", 1)
        if key != last:
            samples.setdefault(key, {"__key__": key})[ext] = data
    with wds.TarWriter(str(path)) as sink:
        for key in sorted(samples):
            sink.write(samples[key])
    problems = {(p["shard"], p["key"], p["problem"]) for p in verify_shards(tmp_path / "short").problems}
    want = f"{entry['samples'] - 1} samples, manifest says {entry['samples']}"
    assert (entry["path"], "*", want) in problems
