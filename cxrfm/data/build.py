"""`cxrfm data build`: a source -> shards + manifest + build report + tokenizer trained on the train split.

    scan (metadata, main process) -> records sorted by (split, study_id) -> shards of data.shard_size per
    split -> shards loaded and written in parallel worker processes -> manifest.json, build_report.json,
    tokenizer/

Resumable: build_state.json records a digest of the records and build settings plus every finished shard
(its sha256, size and mtime; details in build_state/). A rerun into the same directory skips finished shards
whose file is unchanged, so an interrupted (even killed) build continues where it stopped; a changed source
or setting starts over.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from cxrfm.config import DataConfig
from cxrfm.data import store
from cxrfm.data.schema import SCHEMA_VERSION, Study
from cxrfm.data.shards import MANIFEST, SPLITS, shard_name, write_manifest, write_shard
from cxrfm.data.sources import get_converter
from cxrfm.data.sources.base import BuildReport, StudyRecord, count_duplicates, records_digest, resize_study

log = logging.getLogger(__name__)
BUILD_STATE = "build_state.json"
STATE_DIR = "build_state"


def study_texts(study: Study) -> list[str]:
    """Everything the LM reads or writes for a study: the tokenizer is trained on these."""
    texts = [study.indication, study.findings, study.impression]
    texts += [f"{qa.question} {qa.answer}" for qa in study.vqa]
    texts += [gp.phrase for gp in study.grounding]
    return [t for t in texts if t]


def num_workers(cfg: DataConfig) -> int:
    return cfg.num_workers if cfg.num_workers is not None else min(4, os.cpu_count() or 1)


def _exit_with_parent(parent: int) -> None:
    """Pool initializer: leave when the build process is gone (killed builds must not leave workers behind;
    a pool worker holds both ends of its task queue, so it never sees the parent's death by itself)."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _check_root(cfg: DataConfig) -> Path | None:
    if cfg.source == "synthetic":
        return None
    if not cfg.root:
        raise ValueError(f"data.source {cfg.source!r} reads a downloaded dataset: set data.root (or pass --root) "
                         "to the folder that holds it")
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} is not a directory; point it at the {cfg.source} download")
    return root


def plan_shards(records: list[StudyRecord], shard_size: int) -> list[tuple[str, list[StudyRecord]]]:
    """Records sorted by (split, study_id), cut into shards of `shard_size` within each split."""
    plan = []
    for split in SPLITS:
        recs = sorted((r for r in records if r.split == split), key=lambda r: r.study_id)
        for start in range(0, len(recs), shard_size):
            plan.append((shard_name(split, start // shard_size), recs[start: start + shard_size]))
    return plan


def _checked(converter, records: list[StudyRecord], report: BuildReport) -> Iterator[tuple[Study, dict]]:
    """The converter's studies, checked against their records and downsized to data.image_size."""
    split_of = {r.study_id: r.split for r in records}
    for study, images in converter.load_batch(records, report):
        if split_of.get(study.study_id) != study.split:
            report.skip("converter_error", study.study_id,
                        f"study split {study.split!r} differs from its record's {split_of.get(study.study_id)!r}")
            continue
        missing = [ref.role for ref in study.images if ref.role not in images]
        bad = [r for r, im in images.items() if getattr(im, "ndim", 0) != 2 or str(im.dtype) != "uint8"]
        if missing or bad:
            report.skip("converter_error", study.study_id, f"images missing {missing} or not (H, W) uint8 {bad}")
            continue
        yield resize_study(study, images, converter.cfg.image_size)


def build_one_shard(source: str, cfg_data: dict, records: list[StudyRecord], path: str) -> dict:
    """Worker: load one shard's studies and write it atomically; returns its entry plus its build report."""
    cfg = DataConfig.model_validate(cfg_data)
    converter = get_converter(source)(cfg)
    report = BuildReport()
    entry = write_shard(_checked(converter, records, report), Path(path))
    entry["split"] = entry["split"] or records[0].split
    entry["records"] = len(records)
    entry["report"] = report.to_json()
    return entry


def _load_state(out: Path, digest: str) -> dict:
    """build_state.json: {"digest", "finished": {shard: {"sha256", "size", "mtime_ns"}}}; the per-shard details
    (patients, task counts, build report) live in build_state/<shard>.json, so recording one more finished
    shard rewrites a small index, not everything built so far."""
    path = out / BUILD_STATE
    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError:
            state = {}
        if state.get("digest") == digest:
            shards = {}
            for name in state.get("finished", {}):
                detail = out / STATE_DIR / f"{name}.json"
                if detail.is_file():
                    shards[name] = json.loads(detail.read_text())
            return {"digest": digest, "finished": state.get("finished", {}), "shards": shards}
        log.info("%s: records or settings changed since the last build; starting over", path)
        for old in state.get("finished", {}):  # the old build's shards must not linger next to the new ones
            (out / old).unlink(missing_ok=True)
            (out / STATE_DIR / f"{old}.json").unlink(missing_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
    return {"digest": digest, "finished": {}, "shards": {}}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _record_finished(out: Path, state: dict, entry: dict) -> None:
    name = entry["path"]
    (out / STATE_DIR).mkdir(exist_ok=True)
    _atomic_write(out / STATE_DIR / f"{name}.json", json.dumps(entry))
    shard = out / name
    st = shard.stat() if entry["samples"] else None
    state["shards"][name] = entry
    state["finished"][name] = {"sha256": entry["sha256"], "samples": entry["samples"],
                               "size": st.st_size if st else 0, "mtime_ns": st.st_mtime_ns if st else 0}
    _atomic_write(out / BUILD_STATE, json.dumps({"digest": state["digest"], "finished": state["finished"]}))


def _finished(out: Path, state: dict, name: str) -> bool:
    """Recorded as finished and the file is still the one written (size and mtime; `cxrfm data verify`
    checks every sha256 — hashing every shard on each resume would cost as much as reading the dataset)."""
    done, entry = state["finished"].get(name), state["shards"].get(name)
    if done is None or entry is None:
        return False
    if done["samples"] == 0:
        return True  # every study of the shard was skipped; nothing on disk to check
    path = out / name
    if not path.is_file():
        return False
    st = path.stat()
    return (st.st_size, st.st_mtime_ns) == (done["size"], done["mtime_ns"])


def _train_texts(out: Path, entries: list[dict]) -> list[str]:
    """Texts of the training studies, read back from the train shards (json members only)."""
    texts: list[str] = []
    for entry in entries:
        if entry["split"] != "train" or not entry["samples"]:
            continue
        with tarfile.open(fileobj=io.BytesIO(store.read_bytes(store.join(out, entry["path"])))) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    texts.extend(study_texts(Study.model_validate_json(tar.extractfile(member).read())))
    return texts


def build_from_source(cfg: DataConfig, out: str | Path, on_shard_done: Callable[[str], None] | None = None) -> dict:
    """Convert cfg.source into shards under `out`; returns the manifest. `on_shard_done(name)` is called
    after each shard is recorded as finished (progress display; tests use it to interrupt a build)."""
    from cxrfm.text.tokenizer import train_tokenizer

    out = Path(out)
    root = _check_root(cfg)
    converter = get_converter(cfg.source)(cfg)
    report = BuildReport()
    records = converter.scan(root, report)
    for r in records:
        if r.split not in SPLITS:
            raise ValueError(f"{cfg.source} converter gave study {r.study_id} the split {r.split!r}; allowed: {SPLITS}")
    records = count_duplicates(records, report)
    report.note("studies_scanned", len(records))
    if not records:
        out.mkdir(parents=True, exist_ok=True)
        path = report.write(out)  # the counts and examples say why; write them before failing
        raise ValueError(f"no usable studies found for source {cfg.source!r} under {root}; "
                         f"skipped: {report.counts}; examples of each in {path}")
    plan = plan_shards(records, cfg.shard_size)
    settings = {"source": cfg.source, "shard_size": cfg.shard_size, "image_size": cfg.image_size,
                "schema": SCHEMA_VERSION, "seed": cfg.seed, "num_studies": cfg.num_studies}
    out.mkdir(parents=True, exist_ok=True)
    state = _load_state(out, records_digest([r for _, recs in plan for r in recs], settings))
    for stale in out.glob("*.tar.tmp-*"):  # a worker killed mid-write
        stale.unlink()
    todo = [(name, recs) for name, recs in plan if not _finished(out, state, name)]
    log.info("%s: %d shards planned, %d already built", out, len(plan), len(plan) - len(todo))
    cfg_data = cfg.model_dump()

    def finish(entry: dict) -> None:
        if entry["samples"] == 0:
            (out / entry["path"]).unlink(missing_ok=True)
        _record_finished(out, state, entry)
        if on_shard_done is not None:
            on_shard_done(entry["path"])

    workers = num_workers(cfg)
    if workers <= 1 or len(todo) <= 1:
        for name, recs in todo:
            finish(build_one_shard(cfg.source, cfg_data, recs, str(out / name)))
    else:
        # spawn, not fork: the caller may already run Ray or torch threads, which do not survive a fork
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
            pending = {pool.submit(build_one_shard, cfg.source, cfg_data, recs, str(out / name)) for name, recs in todo}
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        finish(fut.result())
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise

    entries = [state["shards"][name] for name, _ in plan]
    for entry in entries:
        report.merge(entry["report"])
    report.note("studies_written", sum(e["samples"] for e in entries))
    report_path = report.write(out)
    train_texts = _train_texts(out, entries)
    if not train_texts:
        raise ValueError(f"no training studies with text in {out} (skipped: {report.counts}; examples of each in "
                         f"{report_path}); raise data.num_studies or check the source's split assignment")
    tokenizer = train_tokenizer(train_texts, vocab_size=cfg.vocab_size)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    return write_manifest(out, [{k: v for k, v in e.items() if k not in ("report", "records")} for e in entries])


def build(cfg: DataConfig, out: str | Path) -> dict:
    """Write shards and the tokenizer to `out`; returns the manifest.

    `out` may be a store URI (s3://bucket/prefix): the build runs in a local staging directory (resumable,
    like a local build) and is then uploaded, manifest.json last, so a reader that finds the manifest finds
    every shard it lists. The staging copy is removed after the upload."""
    if not store.is_remote(out):
        return build_from_source(cfg, out)
    store.check_access(out)  # bad credentials fail here, before any shard is converted
    base = Path(os.environ.get(store.TOKENIZER_CACHE_ENV) or Path.home() / ".cache" / "cxrfm")
    staging = base / "staging" / hashlib.sha256(str(out).encode()).hexdigest()[:16]
    manifest = build_from_source(cfg, staging)
    store.upload_dir(staging, str(out), last=(MANIFEST,))
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


def ensure_mixture_tokenizer(cfg: DataConfig) -> Path:
    """With data.sources: check every source is built and train one tokenizer on all their train texts.

    It is saved in data.shards/tokenizer with mixture.json naming the manifests it was trained on, and
    retrained when the mixture's sources or their manifests change.
    """
    from cxrfm.text.tokenizer import train_tokenizer

    out = Path(cfg.shards)  # the joint tokenizer is written locally (a remote data.shards is not supported here)
    wanted, manifests = [], {}
    for m in cfg.sources:  # each source local or in a store (s3://...)
        store.check_access(m.shards)
        try:
            raw = store.read_bytes(store.join(m.shards, MANIFEST))
        except FileNotFoundError:
            raise FileNotFoundError(f"data.sources: {m.name} has no shards at {m.shards}; build them first: "
                                    f"cxrfm data build --source {m.name} --root DATASET_DIR --out {m.shards}") from None
        manifests[m.name] = json.loads(raw)
        built_from = manifests[m.name].get("sources", [])
        if m.name not in built_from:
            raise ValueError(f"data.sources: the entry named {m.name!r} points at {m.shards}, which holds shards of "
                             f"{built_from}; fix the name or the path")
        wanted.append({"name": m.name, "shards": store.absolute(m.shards), "manifest_sha256": hashlib.sha256(raw).hexdigest()})
    record = out / "mixture.json"
    if (out / "tokenizer" / "tokenizer.json").is_file() and record.is_file() and \
            json.loads(record.read_text()).get("sources") == wanted:
        return out
    texts: list[str] = []
    for m in cfg.sources:
        texts += _train_texts(m.shards, manifests[m.name]["shards"])
    if not texts:
        raise ValueError(f"data.sources: no training texts in {[m.shards for m in cfg.sources]}")
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(texts, vocab_size=cfg.vocab_size).save_pretrained(str(out / "tokenizer"))
    record.write_text(json.dumps({"sources": wanted}, indent=2))
    return out


def ensure_shards(cfg: DataConfig) -> Path:
    """Build synthetic shards when missing (the tiny default runs from nothing); never for real sources.

    With data.sources (a mixture) every source must be built; the joint tokenizer is made here."""
    if cfg.sources:
        return ensure_mixture_tokenizer(cfg)
    if store.is_remote(cfg.shards):
        store.check_access(cfg.shards)
        if store.exists(store.join(cfg.shards, MANIFEST)):
            return cfg.shards
        if cfg.source != "synthetic":
            raise FileNotFoundError(f"no shards at {cfg.shards}; build them first: cxrfm data build --source "
                                    f"{cfg.source} --root DATASET_DIR --out {cfg.shards}")
        build(cfg, cfg.shards)
        return cfg.shards
    out = Path(cfg.shards)
    if (out / MANIFEST).is_file() and (out / "tokenizer" / "tokenizer.json").is_file():
        return out
    if cfg.source != "synthetic":
        raise FileNotFoundError(f"no shards at {out}; build them first: cxrfm data build --source {cfg.source} "
                                f"--root DATASET_DIR --out {out}")
    build(cfg, out)
    return out
