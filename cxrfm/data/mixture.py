"""Training on several built sources at once, drawn by weight (data.sources), without Ray in the loop.

    data:
      shards: runs/mix            # holds the mixture's joint tokenizer (built on first use)
      sources:
        - {name: mimic_cxr, weight: 0.6, shards: data/mimic}
        - {name: chexpert_plus, weight: 0.3, shards: data/chexpert}
        - {name: iu_xray, weight: 0.1, shards: data/iu}

How the weights act: one epoch of the training stream has as many samples as the sources hold together,
and source i fills weight_i / sum(weights) of it with whole shards of its own, its shards shuffled with
data.seed and cycled when the source is small (upsampling) or cut when it is large (downsampling). The
chosen shards are interleaved evenly, so every stretch of the stream has the mixture's proportions, and
the resulting file list feeds one `read_webdataset`. Shard-level (not row-level) sampling was chosen because
it keeps Ray Data's streaming read unchanged (one dataset, file shuffling, backpressure) and costs nothing
per row; with shards of ~100-1000 studies the proportions are exact to within one shard per source.
Evaluation splits are not weighted: every shard of every source is read once.
"""

from __future__ import annotations

import numpy as np

from cxrfm.data import store
from cxrfm.data.shards import load_manifest, shard_paths


def resolve_sources(data_cfg) -> list[tuple[str, float, str]]:
    """(name, weight, shard directory) for each source; the single data.source/data.shards is the one-source case."""
    if data_cfg.sources:
        return [(m.name, m.weight, m.shards) for m in data_cfg.sources]
    return [(data_cfg.source, 1.0, data_cfg.shards)]


def mixture_schedule(sources: list[tuple[str, float, list[tuple[str, int]]]], seed: int = 0,
                     total: int | None = None) -> list[str]:
    """Shard paths for one epoch: source i gets about total * w_i / sum(w) samples, interleaved evenly.

    `sources`: (name, weight, [(shard path, samples)]); `total` defaults to all samples of all sources.
    """
    if not sources:
        raise ValueError("a mixture needs at least one source")
    weights = np.array([w for _, w, _ in sources], dtype=float)
    if (weights <= 0).any():
        raise ValueError(f"mixture weights must be positive, got {dict((n, w) for n, w, _ in sources)}")
    for name, _, shards in sources:
        if not shards or sum(n for _, n in shards) <= 0:
            raise ValueError(f"mixture source {name!r} has no samples in this split; rebuild it or drop it")
    total = total if total is not None else sum(n for _, _, shards in sources for _, n in shards)
    placed: list[tuple[float, int, str]] = []
    for i, (name, w, shards) in enumerate(sources):
        quota = total * w / weights.sum()
        order = np.random.default_rng([seed, i]).permutation(len(shards))
        chosen, got, k = [], 0, 0
        while got < quota - 1e-9 or not chosen:
            path, n = shards[order[k % len(shards)]]
            # take the shard when that brings the count closer to the quota (at least one shard per source)
            if chosen and abs(got + n - quota) >= abs(got - quota):
                break
            chosen.append(path)
            got += n
            k += 1
        placed += [((j + 0.5) / len(chosen), i, p) for j, p in enumerate(chosen)]
    return [p for _, _, p in sorted(placed)]


def mixture_paths(data_cfg, split: str, verify: bool | None = None) -> tuple[list[str], dict[str, int]]:
    """Shard paths to read for `split` (weighted for train), and the samples excluded before reading.

    `verify` (default data.verify_shards): hash every shard here; the training pipeline passes False
    and checks each shard's sha256 as it streams it (data/pipeline.py), reading it once."""
    verify = data_cfg.verify_shards if verify is None else verify
    mix = resolve_sources(data_cfg)
    if len(mix) == 1:
        return shard_paths(mix[0][2], split, verify=verify)
    per_source, skipped = [], {}
    for name, weight, root in mix:
        paths, excluded = shard_paths(root, split, verify=verify)
        for reason, n in excluded.items():
            skipped[f"{name}/{reason}"] = skipped.get(f"{name}/{reason}", 0) + n
        samples = {store.join(root, sh["path"]): sh["samples"] for sh in load_manifest(root)["shards"]}
        per_source.append((name, weight, [(p, samples[p]) for p in paths]))
    if split != "train":
        return [p for _, _, shards in per_source for p, _ in shards], skipped
    return mixture_schedule(per_source, data_cfg.seed), skipped


def mixture_params(data_cfg) -> dict[str, str]:
    """MLflow params: each source's weight and its manifest's per-source counts per split."""
    params = {}
    for name, weight, root in resolve_sources(data_cfg):
        manifest = load_manifest(root)
        params[f"data.mixture.{name}.weight"] = str(weight)
        counts = manifest.get("source_counts") or {name: {s: v["studies"] for s, v in manifest["splits"].items()}}
        for source, per_split in counts.items():
            for split, n in per_split.items():
                params[f"data.mixture.{name}.counts.{source}.{split}"] = str(n)
        for source, lic in manifest.get("licenses", {}).items():
            params[f"data.mixture.{name}.license.{source}"] = lic[:250]
    return params
