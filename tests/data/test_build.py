"""`cxrfm data build`: interrupted builds resume without rewriting finished shards; workers change nothing."""

import json
import os

import numpy as np
import pytest

from cxrfm.cli import main
from cxrfm.config import DataConfig
from cxrfm.data.build import BUILD_STATE, build_from_source
from cxrfm.data.schema import ImageRef, Study
from cxrfm.data.shards import MANIFEST, load_manifest, sha256_file, verify_shards
from cxrfm.data.sources.base import Converter, StudyRecord

from .sources.fixtures_reports import write_iu_xray


class Stop(Exception):
    pass


def _cfg(**kw) -> DataConfig:
    return DataConfig(**({"num_studies": 60, "shard_size": 10, "vocab_size": 300, "num_workers": 1} | kw))


def _stamp(path):
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, sha256_file(path)


def test_interrupted_build_resumes_without_rewriting_finished_shards(tmp_path):
    out = tmp_path / "shards"
    done = []

    def stop_after_two(name):
        done.append(name)
        if len(done) == 2:
            raise Stop(name)

    with pytest.raises(Stop):
        build_from_source(_cfg(), out, on_shard_done=stop_after_two)
    assert not (out / MANIFEST).exists()  # no manifest until every shard is there
    state = json.loads((out / BUILD_STATE).read_text())
    assert sorted(state["finished"]) == sorted(done)
    before = {name: _stamp(out / name) for name in done}
    # a worker killed mid-write leaves a temporary file; a shard damaged after it was recorded is redone
    (out / "val-000000.tar.tmp-12345").write_bytes(b"partial")

    resumed = []
    manifest = build_from_source(_cfg(), out, on_shard_done=resumed.append)
    assert not set(resumed) & set(done)  # finished shards were not built again...
    assert {name: _stamp(out / name) for name in done} == before  # ...nor rewritten (same inode, mtime, bytes)
    assert not list(out.glob("*.tmp-*"))
    assert len(manifest["shards"]) == len(done) + len(resumed) and verify_shards(out).ok

    clean = build_from_source(_cfg(), tmp_path / "clean")  # same bytes as one uninterrupted build
    assert [(s["path"], s["sha256"]) for s in clean["shards"]] == [(s["path"], s["sha256"]) for s in manifest["shards"]]

    rerun = []
    build_from_source(_cfg(), out, on_shard_done=rerun.append)  # a finished build has nothing left to do
    assert rerun == []


def test_damaged_shard_is_rebuilt_and_changed_settings_start_over(tmp_path):
    out = tmp_path / "shards"
    first = build_from_source(_cfg(), out)
    victim = out / first["shards"][0]["path"]
    victim.write_bytes(victim.read_bytes()[:100])
    redone = []
    build_from_source(_cfg(), out, on_shard_done=redone.append)
    assert redone == [victim.name] and verify_shards(out).ok

    second = build_from_source(_cfg(shard_size=30), out)  # new plan: the old 10-study shards are gone
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(s["path"] for s in second["shards"])
    assert sum(s["samples"] for s in second["shards"]) == 60


def test_parallel_workers_write_the_same_bytes(tmp_path):
    one = build_from_source(_cfg(num_studies=40), tmp_path / "one")
    two = build_from_source(_cfg(num_studies=40, num_workers=2), tmp_path / "two")
    assert one["shards"] == two["shards"] and one["splits"] == two["splits"]
    assert one["source_counts"] == {"synthetic": {k: v["studies"] for k, v in one["splits"].items() if v["studies"]}}
    assert (tmp_path / "one" / "tokenizer" / "tokenizer.json").read_bytes() == \
        (tmp_path / "two" / "tokenizer" / "tokenizer.json").read_bytes()


def test_cli_builds_a_real_source_and_names_a_missing_root(tmp_path, capsys):
    root = tmp_path / "iu"
    write_iu_xray(root)
    out = tmp_path / "out"
    rc = main(["data", "build", "--source", "iu_xray", "--root", str(root), "--out", str(out), "--workers", "1",
               "--set", "data.vocab_size=300"])
    printed = capsys.readouterr().out
    assert rc == 0 and "skipped      1 duplicate_study_id" in printed and "build_report.json" in printed
    assert load_manifest(out)["sources"] == ["iu_xray"]
    with pytest.raises(ValueError, match="set data.root"):
        build_from_source(DataConfig(source="mimic_cxr"), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-metadata.csv"):
        build_from_source(DataConfig(source="mimic_cxr", root=str(root)), tmp_path / "x")
    assert os.path.isdir(out / "tokenizer")


KILL_AFTER_TWO = """
import os, signal, sys
from cxrfm.config import DataConfig
from cxrfm.data.build import build_from_source
done = []
def hook(name):
    done.append(name)
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: like a lost machine
build_from_source(DataConfig(num_studies=60, shard_size=10, vocab_size=300, num_workers=2), sys.argv[1], on_shard_done=hook)
"""


def test_killed_build_with_workers_resumes(tmp_path):
    import signal
    import subprocess
    import sys

    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, "-c", KILL_AFTER_TWO, str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    finished = json.loads((out / BUILD_STATE).read_text())["finished"]
    assert len(finished) == 2 and not (out / MANIFEST).exists()
    before = {name: _stamp(out / name) for name in finished}
    manifest = build_from_source(_cfg(num_workers=2), out)
    assert {name: _stamp(out / name) for name in finished} == before
    assert verify_shards(out).ok and sum(s["samples"] for s in manifest["shards"]) == 60


class FlakyConverter(Converter):
    """A converter with a bug on one study and bad data on another: neither may stop the build."""

    name, license = "flaky", "CC0-1.0"

    def scan(self, root, report):
        return [StudyRecord(f"f{i}", f"p{i}", "train", {"i": i}) for i in range(4)]

    def load(self, record, report):
        i = record.payload["i"]
        if i == 1:
            raise KeyError("bug in the converter")
        if i == 2:
            report.skip("image_corrupt_image", record.study_id, "bad bytes")
            return None
        split = "test" if i == 3 else "train"  # study 3 disagrees with its record
        study = Study(study_id=record.study_id, patient_id=record.patient_id, split=split, source=self.name,
                      license=self.license, findings="Clear lungs.",
                      images=[ImageRef(role="frontal", key="frontal.png", view="PA", width=40, height=40)])
        return study, {"frontal": np.full((40, 40), 100, np.uint8)}


def test_converter_errors_are_counted_not_fatal(tmp_path, monkeypatch):
    from cxrfm.data.sources import SOURCES, get_converter

    monkeypatch.setitem(SOURCES, "flaky", f"{__name__}:FlakyConverter")
    monkeypatch.setitem(SOURCES, "ghost", "cxrfm.data.sources.ghost:Converter")
    with pytest.raises(ValueError, match="'ghost' is registered but its converter module .* is not installed"):
        get_converter("ghost")
    manifest = build_from_source(DataConfig(source="flaky", root=str(tmp_path), vocab_size=300, num_workers=1), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["skipped"] == {"converter_error": 2, "image_corrupt_image": 1}
    assert "KeyError" in report["examples"]["converter_error"][0]["detail"]
    assert manifest["splits"]["train"]["studies"] == 1


def test_a_build_that_skips_everything_still_writes_its_report(tmp_path, capsys):
    from .sources.fixtures_labels import write_chexpert, write_rsna

    # every image missing: nothing survives the scan
    write_chexpert(tmp_path / "cx")
    for jpg in (tmp_path / "cx").rglob("*.jpg"):
        jpg.unlink()
    out = tmp_path / "out_cx"
    rc = main(["data", "build", "--source", "chexpert", "--root", str(tmp_path / "cx"), "--out", str(out),
               "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and str(out / "build_report.json") in err
    report = json.loads((out / "build_report.json").read_text())
    assert report["skipped"] == {"image_missing_file": 5, "study_without_usable_image": 4}
    assert report["examples"]["image_missing_file"][0]["item"].endswith(".jpg")

    # every image unreadable: the scan keeps the studies, loading skips them all
    write_rsna(tmp_path / "rsna")
    for dcm in (tmp_path / "rsna").rglob("*.dcm"):
        dcm.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00truncated")
    out = tmp_path / "out_rsna"
    with pytest.raises(ValueError, match="examples of each in .*build_report.json"):
        build_from_source(DataConfig(source="rsna_pneumonia", root=str(tmp_path / "rsna"), num_workers=1,
                                     vocab_size=300), out)
    report = json.loads((out / "build_report.json").read_text())
    assert report["skipped"]["image_corrupt_dicom"] == 3 and report["notes"]["studies_written"] == 0
