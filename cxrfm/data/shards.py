"""WebDataset shards + manifest.json: write, verify.

Layout of a shard directory:
    train-000000.tar ...  val-000000.tar ...  test-000000.tar ...
    manifest.json         schema version, counts per split and task, sha256 + samples per shard
    tokenizer/            the BPE tokenizer trained on this directory's training reports

One sample per study, key = study_id, members: `json` (the Study) and one PNG per image role
(`frontal.png`, `lateral.png`, `prior.png`). Keys are written sorted within each shard: Ray Data's
webdataset reader groups members by consecutive key (ray-project/ray#44068).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from cxrfm.data import store
from cxrfm.data.schema import SCHEMA_VERSION, Study

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
TAR_MTIME = 946684800.0  # fixed member time (2000-01-01): the same studies give byte-identical shards


class ShardError(RuntimeError):
    """A shard directory cannot be used; the message says what to do."""


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def task_counts(study: Study) -> Counter:
    """How many training examples of each task one study can give."""
    c: Counter = Counter()
    if study.report:
        c["report"] += 1
        c["generate"] += 1  # text-to-image trains on the same report/image pairs
    c["vqa"] += len(study.vqa)
    c["grounding"] += len(study.grounding)
    return c


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def write_shard(studies: Iterable[tuple[Study, dict[str, np.ndarray]]], path: Path) -> dict:
    """Write one shard atomically (a temporary name, then a rename); returns its manifest entry and stats.

    Keys are written sorted. A reader never sees a half-written shard under its final name, so an
    interrupted build leaves only whole shards behind.
    """
    path = Path(path)
    items = sorted(studies, key=lambda it: it[0].study_id)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    counts: Counter = Counter()
    sources: Counter = Counter()
    licenses: dict[str, str] = {}
    splits = {study.split for study, _ in items}
    if len(splits) > 1:
        raise ValueError(f"shard {path.name} would mix splits {sorted(splits)}; one split per shard")
    try:
        with wds.TarWriter(str(tmp), mtime=TAR_MTIME) as sink:
            for study, images in items:
                sample = {"__key__": study.study_id, "json": study.model_dump_json().encode()}
                for ref in study.images:
                    sample[ref.key] = encode_png(images[ref.role])
                sink.write(sample)
                counts.update(task_counts(study))
                sources[study.source] += 1
                licenses[study.source] = study.license
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": path.name, "split": next(iter(splits), None), "samples": len(items), "sha256": sha256_file(path),
            "patients": sorted({s.patient_id for s, _ in items}), "tasks": dict(counts),
            "sources": dict(sources), "licenses": licenses}


def write_manifest(out: Path, shards: list[dict]) -> dict:
    """manifest.json from the entries write_shard returned (empty shards are left out of the list)."""
    splits, source_counts, licenses = {}, defaultdict(dict), {}
    for split in SPLITS:
        entries = [sh for sh in shards if sh["split"] == split and sh["samples"]]
        tasks: Counter = Counter()
        patients: set[str] = set()
        for sh in entries:
            tasks.update(sh["tasks"])
            patients.update(sh["patients"])
            for source, n in sh["sources"].items():
                source_counts[source][split] = source_counts[source].get(split, 0) + n
            licenses.update(sh["licenses"])
        splits[split] = {"studies": sum(sh["samples"] for sh in entries), "patients": len(patients), "tasks": dict(tasks)}
    listed = [{k: sh[k] for k in ("path", "split", "samples", "sha256")} | {"sources": sh["sources"]}
              for sh in shards if sh["samples"]]
    manifest = {"schema_version": SCHEMA_VERSION, "sources": sorted(source_counts), "splits": splits,
                "source_counts": {s: dict(c) for s, c in sorted(source_counts.items())},
                "licenses": dict(sorted(licenses.items())), "shards": listed}
    tmp = out / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)
    return manifest


def write_shards(studies: Iterable[tuple[Study, dict[str, np.ndarray]]], out: Path, shard_size: int,
                 source: str | None = None) -> dict:
    """Write studies to per-split shards under `out` in one process; returns the manifest (also saved).

    `cxrfm data build` goes through cxrfm.data.build.build_from_source (parallel, resumable); this is the
    simple path for studies already in memory. `source` is kept for compatibility: the manifest counts
    each study's own Study.source.
    """
    out.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[tuple[Study, dict[str, np.ndarray]]]] = defaultdict(list)
    for study, images in studies:
        by_split[study.split].append((study, images))
    shards = []
    for split in SPLITS:
        items = sorted(by_split.get(split, []), key=lambda it: it[0].study_id)
        for start in range(0, len(items), shard_size):
            shards.append(write_shard(items[start: start + shard_size], out / shard_name(split, start // shard_size)))
    return write_manifest(out, shards)


def load_manifest(root: str | Path) -> dict:
    """The manifest of a local shard directory or of a store URI (s3://bucket/prefix, see data/store.py)."""
    if store.is_remote(root):
        store.check_access(root)
        path = store.join(root, MANIFEST)
        try:
            text = store.read_bytes(path).decode()
        except FileNotFoundError:
            raise ShardError(f"{root} has no {MANIFEST}; build it with: cxrfm data build --out {root}") from None
    else:
        root = Path(root)
        if not root.is_dir():
            raise ShardError(f"shard directory {root} does not exist; build it with: cxrfm data build --out {root}")
        path = root / MANIFEST
        if not path.is_file():
            raise ShardError(f"{root} has no {MANIFEST}; rebuild it with: cxrfm data build --out {root}")
        text = path.read_text()
    manifest = json.loads(text)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{path}: schema version {manifest.get('schema_version')} != {SCHEMA_VERSION}; rebuild the shards")
    if not manifest.get("shards"):
        raise ShardError(f"{path} lists no shards (empty dataset); rebuild with more studies")
    return manifest


def shard_paths(root: str | Path, split: str, verify: bool = True) -> tuple[list[str], dict[str, int]]:
    """Shards of one split to read, and what was excluded: {"missing_shard": n_samples, ...}.

    With `verify`, a shard whose sha256 differs from the manifest is left out and its samples counted
    as skipped, so a damaged file never stops a run half-way and is never silently used.
    """
    manifest = load_manifest(root)
    present = store.listing(str(root))  # one listing, not a request per shard
    paths, skipped = [], Counter()
    for sh in manifest["shards"]:
        if sh["split"] != split:
            continue
        p = store.join(root, sh["path"])
        if sh["path"] not in present:
            skipped["missing_shard"] += sh["samples"]
        elif verify and store.sha256_of(p) != sh["sha256"]:
            skipped["checksum_mismatch"] += sh["samples"]
        else:
            paths.append(p)
    if not paths:
        raise ShardError(f"{root}: no readable {split!r} shards (skipped: {dict(skipped)}); run: cxrfm data verify {root}")
    return paths, dict(skipped)


@dataclass
class VerifyReport:
    samples_ok: int = 0
    problems: list[dict] = field(default_factory=list)  # {"shard", "key", "problem"}

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_sample(key: str, members: dict[str, bytes]) -> list[str]:
    problems = []
    if "json" not in members:
        return ["missing json member"]
    try:
        study = Study.model_validate_json(members["json"])
    except Exception as e:  # noqa: BLE001 - any decode failure is a reported problem, not a crash
        return [f"bad json: {str(e).splitlines()[0]}"]
    if study.study_id != key:
        problems.append(f"json study_id {study.study_id!r} != key")
    for ref in study.images:
        if ref.key not in members:
            problems.append(f"missing image {ref.key}")
            continue
        try:
            with Image.open(io.BytesIO(members[ref.key])) as im:
                im.load()
        except Exception as e:  # noqa: BLE001
            problems.append(f"corrupt image {ref.key}: {e}")
    return problems


def verify_shards(root: str | Path) -> VerifyReport:
    """Decode every sample of every shard in the manifest; report problems by shard and key."""
    manifest = load_manifest(root)
    present = store.listing(str(root))
    report = VerifyReport()
    for sh in manifest["shards"]:
        path = store.join(root, sh["path"])
        if sh["path"] not in present:
            report.problems.append({"shard": sh["path"], "key": "*", "problem": "shard file missing"})
            continue
        data = store.read_bytes(path)  # one read per shard: hashed and unpacked from memory
        if hashlib.sha256(data).hexdigest() != sh["sha256"]:
            report.problems.append({"shard": sh["path"], "key": "*", "problem": "sha256 differs from manifest"})
        samples: dict[str, dict[str, bytes]] = defaultdict(dict)
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.partition(".")
                    samples[key][ext] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            report.problems.append({"shard": sh["path"], "key": "*", "problem": f"unreadable tar: {e}"})
        for key, members in samples.items():
            found = _check_sample(key, members)
            report.problems += [{"shard": sh["path"], "key": key, "problem": p} for p in found]
            report.samples_ok += not found
        if len(samples) != sh["samples"]:
            report.problems.append({"shard": sh["path"], "key": "*",
                                    "problem": f"{len(samples)} samples, manifest says {sh['samples']}"})
    return report
