"""Ray Data pipeline: one map_batches task per shard reads it (checked) and decodes / augments / tokenizes
its samples -> worker shards.

Streaming: Ray Data runs one task per shard and backpressures, so memory does not grow with the number
of shards. Shards come from local disk or straight from an object store (s3://..., data/store.py).
Rows that cannot be used are not dropped silently: they stay in the stream with a `skip_code`, and the
training loop counts them and leaves them out of the loss. That covers a shard deleted after the run
started, a shard whose sha256 differs from the manifest (checked as it is read, so each byte is read once)
and samples that do not decode.

The reader is ours, not `read_webdataset`: that one cannot compare a shard with its manifest checksum and
fails the whole dataset when a file disappears mid-epoch. It reads a shard in one request and unpacks it
with `tarfile`; rows have the same columns as read_webdataset's (`__key__`, `json`, `<role>.png`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import tarfile
import zlib
from collections import defaultdict
from collections.abc import Iterator

import numpy as np

from cxrfm.config import Config
from cxrfm.data import store
from cxrfm.data.samples import ALL_TASKS, ROLES, SampleSpec, choose_task, decode_image, encode_example
from cxrfm.data.schema import CHEXPERT_LABELS, Study
from cxrfm.data.mixture import mixture_paths, resolve_sources
from cxrfm.data.shards import load_manifest

SKIP_REASONS = ("ok", "bad_json", "corrupt_image", "missing_image", "no_task", "missing_shard", "checksum_mismatch",
                "unreadable_shard")
MEMBERS = ("json",) + tuple(f"{role}.png" for role in ROLES)  # what a sample may hold; absent ones are b""
TASK_IDS = {t: i for i, t in enumerate(ALL_TASKS)}


class StudyToExample:
    """map_batches callable (one per Ray Data actor): raw shard rows -> fixed-shape numpy examples."""

    def __init__(self, tokenizer_dir: str, spec: SampleSpec, task_weights: dict[str, float], seed: int):
        from cxrfm.text.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.spec = spec
        self.weights = task_weights
        self.seed = seed
        self.calls = 0

    def _blank(self, code: str) -> tuple[dict[str, np.ndarray], int]:
        s, L = self.spec, self.spec.max_seq_len
        return {
            "input_ids": np.zeros(L, np.int64), "labels": np.full(L, -100, np.int64),
            "attention_mask": np.zeros(L, np.int64),
            "images": np.zeros((len(ROLES), s.image_size, s.image_size), np.uint8),
            "image_present": np.zeros(len(ROLES), bool),
            "findings": np.full(len(CHEXPERT_LABELS), -1.0, np.float32),
            "views": np.full(len(ROLES), -1, np.int64),
        }, SKIP_REASONS.index(code)

    def _one(self, key: str, row: dict, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], int, int, bool]:
        try:
            study = Study.model_validate_json(row["json"])
        except Exception:  # noqa: BLE001 - counted as bad_json, never crashes the stream
            return (*self._blank("bad_json"), -1, False)
        images = {}
        for ref in study.images:
            data = row.get(ref.key)
            if not isinstance(data, (bytes, bytearray)) or not data:
                return (*self._blank("missing_image"), -1, False)
            try:
                images[ref.role] = decode_image(data, self.spec.image_size)
            except Exception:  # noqa: BLE001
                return (*self._blank("corrupt_image"), -1, False)
        task, _ = choose_task(study, self.weights, rng)
        if task is None:
            return (*self._blank("no_task"), -1, False)
        example, truncated = encode_example(study, task, images, self.tokenizer, self.spec, rng)
        return example, 0, TASK_IDS[task], truncated

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = batch["__key__"]
        # A different draw every call (epoch), reproducible for the same seed and stream order.
        rng = np.random.default_rng([self.seed, self.calls, zlib.crc32("".join(map(str, keys)).encode())])
        self.calls += 1
        columns = {c: batch[c] for c in batch if not c.startswith("__") and c not in ("shard_skip", "shard_samples")}
        shard_skip = batch.get("shard_skip", np.zeros(len(keys), np.int64))
        out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "attention_mask", "images", "image_present", "findings",
                                                 "views")}
        skip, task, trunc = [], [], []
        for i, key in enumerate(keys):
            row = {c: v[i] for c, v in columns.items() if not (isinstance(v[i], float) and math.isnan(v[i]))}
            if shard_skip[i]:  # a placeholder for a sample of a shard that could not be used
                example, code, t, truncated = *self._blank(SKIP_REASONS[shard_skip[i]]), -1, False
            else:
                example, code, t, truncated = self._one(str(key), row, rng)
            for k in out:
                out[k].append(example[k])
            skip.append(code)
            task.append(t)
            trunc.append(truncated)
        result = {k: np.stack(v) for k, v in out.items()}
        result["skip_code"] = np.array(skip, np.int64)
        # how many samples a row stands for when skipped (a whole shard for a placeholder)
        result["skip_count"] = np.asarray(batch.get("shard_samples", np.ones(len(keys))), np.int64)
        result["task"] = np.array(task, np.int64)
        result["truncated"] = np.array(trunc, np.int64)
        return result


@functools.lru_cache(maxsize=4)
def _mapper(tokenizer_dir: str, spec: SampleSpec, weights: tuple, seed: int) -> StudyToExample:
    return StudyToExample(tokenizer_dir, spec, dict(weights), seed)


def map_studies(batch: dict[str, np.ndarray], tokenizer_dir: str, spec: SampleSpec, weights: tuple, seed: int) -> dict:
    """map_batches task. A task, not an actor pool: Ray reuses its worker processes across epochs, where a
    new actor per epoch costs a process start and the torch/transformers imports every time. The mapper
    (tokenizer loaded once) is cached per worker process."""
    return _mapper(tokenizer_dir, spec, weights, seed)(batch)


def _placeholders(entry: dict, reason: str) -> list[dict]:
    """One row standing for all of a shard's samples: the loop counts `shard_samples` of them as skipped. One,
    not one per sample: a batch made only of placeholders would give the model no image to encode."""
    return [{"__key__": f"{entry['path']}#skipped", "shard_skip": SKIP_REASONS.index(reason),
             "shard_samples": entry["samples"], **{m: b"" for m in MEMBERS}}]


def read_shard(entry: dict) -> list[dict]:
    """flat_map: one manifest entry {path, sha256 (empty: unchecked), samples} -> the shard's samples in key
    order. A shard gone since the listing, one whose sha256 differs from the manifest, or an unreadable tar
    gives a placeholder row carrying the reason and the shard's sample count, which the training loop counts."""
    try:
        data = store.read_bytes(entry["path"])
    except FileNotFoundError:
        return _placeholders(entry, "missing_shard")
    if entry["sha256"] and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return _placeholders(entry, "checksum_mismatch")
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                if member.isfile():
                    key, _, ext = member.name.partition(".")
                    samples[key][ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError):
        return _placeholders(entry, "unreadable_shard")
    return [{"__key__": key, "shard_skip": 0, "shard_samples": 1, **{m: samples[key].get(m, b"") for m in MEMBERS}}
            for key in sorted(samples)]


READ_TASK_CPUS = 0.25  # what one shard's read-and-decode task asks of Ray
DECODE_ROWS = 32  # samples decoded per mapper call (and per yielded batch) inside a shard's task


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    columns = {}
    for name in rows[0]:
        column = np.empty(len(rows), dtype=np.int64 if name in ("shard_skip", "shard_samples") else object)
        column[:] = [r[name] for r in rows]  # bytes stay one object each (np.array would make them fixed-width)
        columns[name] = column
    return columns


def read_and_map(entries: dict[str, np.ndarray], tokenizer_files: dict[str, bytes], spec: SampleSpec, weights: tuple,
                 seed: int) -> Iterator[dict[str, np.ndarray]]:
    """map_batches task over manifest entries (one per call): read and check the shard (read_shard), then
    decode its samples DECODE_ROWS at a time (map_studies), yielding each batch.

    The tokenizer comes as its files (read once by the driver), copied to a local cache once per machine:
    a task needs no store access for it (from an object store, each new Ray worker process listing and
    fetching it cost ~0.5 s of CPU).

    One operator, one task per shard: the raw tar bytes never pass through Ray's object store. As two
    operators, a flat_map reader stays apart from the decode (one more task and object-store round trip per
    shard), and a map_batches reader is fused with a batch_size=32 decode into tasks that take 32 shards
    each (Ray bundles the fused operator's input to the larger batch size), serialising the reads."""
    tokenizer_dir = str(store.local_copy(tokenizer_files, label="tokenizer"))
    for path, sha, n in zip(entries["path"], entries["sha256"], entries["samples"]):
        rows = read_shard({"path": str(path), "sha256": str(sha), "samples": int(n)})
        for start in range(0, len(rows), DECODE_ROWS):
            yield map_studies(_columns(rows[start:start + DECODE_ROWS]), tokenizer_dir, spec, weights, seed)


def shard_entries(cfg: Config, split: str) -> tuple[list[dict], dict[str, int]]:
    """What read_shard reads for `split` (mixture order for train), and the samples excluded up front
    (shards missing from the listing). Checksums come from each source's manifest."""
    paths, skipped = mixture_paths(cfg.data, split, verify=False)  # one listing per source, nothing hashed here
    known = {store.join(root, sh["path"]): sh for _, _, root in resolve_sources(cfg.data)
             for sh in load_manifest(root)["shards"]}
    return [{"path": p, "sha256": known[p]["sha256"] if cfg.data.verify_shards else "", "samples": known[p]["samples"]}
            for p in paths], skipped


def build_dataset(cfg: Config, split: str, num_image_tokens: int, augment: bool, epochs: int = 1):
    """A streaming Ray Dataset of fixed-shape examples, and the samples excluded before reading.

    `epochs`: passes over the shards in one dataset. Ray Data starts a new execution for every iteration, and
    on a small machine the first batches of a new execution keep the step waiting (about a second per epoch
    on 2 cores, `cxrfm bench data`); holding several epochs in one execution streams across their boundaries."""
    import ray.data
    from ray.data._internal.random_config import RandomSeedConfig

    entries, skipped = shard_entries(cfg, split)  # one source, or several drawn by weight (data/mixture.py)
    spec = SampleSpec(cfg.data.max_seq_len, cfg.model.vision.image_size, num_image_tokens, augment,
                      cfg.data.max_turns)
    entries = entries * epochs
    ds = ray.data.from_items(entries, override_num_blocks=len(entries))  # one block per shard
    if augment and cfg.data.shuffle:  # a new shard order every epoch, reproducible from data.seed
        ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=cfg.data.seed, reseed_after_execution=True))
    ds = ds.map_batches(
        read_and_map,
        # with data.sources: data.shards is where the mixture's joint tokenizer lives
        fn_kwargs={"tokenizer_files": store.read_dir(store.join(cfg.data.shards, "tokenizer")), "spec": spec,
                   "weights": tuple(sorted(cfg.data.tasks.items())), "seed": cfg.data.seed},
        batch_size=1, batch_format="numpy", num_cpus=READ_TASK_CPUS,  # one shard per task
    )
    return ds, skipped
