"""Ray Data pipeline: read_webdataset -> decode / augment / tokenize in map_batches -> worker shards.

Streaming: Ray Data reads shards as blocks and backpressures, so memory does not grow with the
number of shards. Rows that cannot be decoded are not dropped silently: they stay in the stream
with `valid = 0` and a `skip_code`, and the training loop counts them and leaves them out of the loss.
"""

from __future__ import annotations

import functools
import math
import zlib
from pathlib import Path

import numpy as np

from cxrfm.config import Config
from cxrfm.data.samples import ALL_TASKS, ROLES, SampleSpec, choose_task, decode_image, encode_example
from cxrfm.data.schema import CHEXPERT_LABELS, Study
from cxrfm.data.mixture import mixture_paths

SKIP_REASONS = ("ok", "bad_json", "corrupt_image", "missing_image", "no_task")
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
        }, SKIP_REASONS.index(code)

    def _one(self, key: str, row: dict, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], int, int, bool]:
        try:
            study = Study.model_validate_json(row["json"])
        except Exception:  # noqa: BLE001 - counted as bad_json, never crashes the stream
            return (*self._blank("bad_json"), -1, False)
        images = {}
        for ref in study.images:
            data = row.get(ref.key)
            if not isinstance(data, (bytes, bytearray)):
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
        columns = {c: batch[c] for c in batch if not c.startswith("__")}
        out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "attention_mask", "images", "image_present", "findings")}
        skip, task, trunc = [], [], []
        for i, key in enumerate(keys):
            row = {c: v[i] for c, v in columns.items() if not (isinstance(v[i], float) and math.isnan(v[i]))}
            example, code, t, truncated = self._one(str(key), row, rng)
            for k in out:
                out[k].append(example[k])
            skip.append(code)
            task.append(t)
            trunc.append(truncated)
        result = {k: np.stack(v) for k, v in out.items()}
        result["skip_code"] = np.array(skip, np.int64)
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


def build_dataset(cfg: Config, split: str, num_image_tokens: int, augment: bool):
    """A streaming Ray Dataset of fixed-shape examples, and the samples excluded before reading."""
    import ray.data

    shards = Path(cfg.data.shards)  # with data.sources: where the mixture's joint tokenizer lives
    paths, skipped = mixture_paths(cfg.data, split)  # one source, or several drawn by weight (data/mixture.py)
    spec = SampleSpec(cfg.data.max_seq_len, cfg.model.vision.image_size, num_image_tokens, augment)
    ds = ray.data.read_webdataset(paths, decoder=None, shuffle="files" if augment and cfg.data.shuffle else None, num_cpus=0.25)
    ds = ds.map_batches(
        map_studies,
        fn_kwargs={"tokenizer_dir": str(shards / "tokenizer"), "spec": spec,
                   "weights": tuple(sorted(cfg.data.tasks.items())), "seed": cfg.data.seed},
        batch_size=32, batch_format="numpy", num_cpus=0.25,
    )
    return ds, skipped
