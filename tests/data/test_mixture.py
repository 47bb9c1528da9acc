"""data.sources: weighted mixture of built sources (shard schedule, config, MLflow params, Ray Data read)."""

from collections import Counter

import pytest

from cxrfm.config import ConfigError, DataConfig, SourceMix, load_config
from cxrfm.data.build import build_from_source, ensure_shards
from cxrfm.data.mixture import mixture_params, mixture_paths, mixture_schedule
from cxrfm.data.shards import load_manifest

from .sources.fixtures_reports import write_iu_xray


def _source(name, shards, size):
    return [(f"{name}/{i}.tar", size) for i in range(shards)]


def test_schedule_follows_weights_up_and_down_sampling_and_interleaves():
    srcs = [("a", 0.6, _source("a", 10, 100)), ("b", 0.3, _source("b", 2, 100)), ("c", 0.1, _source("c", 50, 10))]
    total = 1000 + 200 + 500
    sched = mixture_schedule(srcs, seed=0)
    size = {p: n for _, _, shards in srcs for p, n in shards}
    got = Counter()
    for p in sched:
        got[p.split("/")[0]] += size[p]
    for name, w, shards in srcs:
        assert abs(got[name] - w * total) <= max(n for _, n in shards) / 2 + 1e-9, (name, got)
    assert Counter(sched)["b/0.tar"] >= 2  # b is small: its shards are cycled (upsampled)
    assert len({p for p in sched if p.startswith("c/")}) < 50  # c is large for its weight: cut (downsampled)
    first_half = Counter(p.split("/")[0] for p in sched[: len(sched) // 2])
    whole = Counter(p.split("/")[0] for p in sched)
    assert all(abs(first_half[k] - whole[k] / 2) <= 1 for k in whole)  # spread evenly, not in blocks
    assert sched == mixture_schedule(srcs, seed=0) and sched != mixture_schedule(srcs, seed=1)


def test_schedule_errors_name_the_source():
    with pytest.raises(ValueError, match="'b' has no samples"):
        mixture_schedule([("a", 1.0, _source("a", 1, 5)), ("b", 1.0, [])])
    with pytest.raises(ValueError, match="positive"):
        mixture_schedule([("a", 0.0, _source("a", 1, 5))])


def test_config_validates_sources():
    ok = DataConfig(sources=[{"name": "mimic_cxr", "weight": 0.6, "shards": "m"}, {"name": "iu_xray", "weight": 1, "shards": "i"}])
    assert [m.name for m in ok.sources] == ["mimic_cxr", "iu_xray"]
    for bad, msg in (([{"name": "mimic", "weight": 1, "shards": "m"}], "allowed"),
                     ([{"name": "iu_xray", "weight": 0, "shards": "m"}], "greater than 0"),
                     ([{"name": "iu_xray", "weight": 1, "shards": "a"}, {"name": "iu_xray", "weight": 1, "shards": "b"}], "once")):
        with pytest.raises(ValueError, match=msg):
            DataConfig(sources=bad)
    with pytest.raises(ConfigError, match="unknown data source 'foo'"):
        load_config(None, ["data.source=foo"])


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """s1: 40 synthetic studies in shards of 4; s2: the IU X-ray fixture (2 train studies) in shards of 1."""
    base = tmp_path_factory.mktemp("mix")
    build_from_source(DataConfig(num_studies=40, shard_size=4, seed=1, vocab_size=300, num_workers=1), base / "s1")
    write_iu_xray(base / "iu")
    build_from_source(DataConfig(source="iu_xray", root=str(base / "iu"), shard_size=1, vocab_size=300,
                                 num_workers=1), base / "s2")
    return base


def _mix(base, w1=3.0, w2=1.0) -> DataConfig:
    return DataConfig(shards=str(base / "mix"), vocab_size=300, sources=[
        SourceMix(name="synthetic", weight=w1, shards=str(base / "s1")),
        SourceMix(name="iu_xray", weight=w2, shards=str(base / "s2"))])


def _samples_per_source(paths, base) -> Counter:
    sizes = {}
    for name in ("s1", "s2"):
        sizes |= {str(base / name / sh["path"]): sh["samples"] for sh in load_manifest(base / name)["shards"]}
    got = Counter()
    for p in paths:
        got["synthetic" if "/s1/" in p else "iu_xray"] += sizes[p]
    return got


def test_mixture_paths_params_and_joint_tokenizer(two_sources):
    cfg = _mix(two_sources)
    ensure_shards(cfg)
    tok = two_sources / "mix" / "tokenizer" / "tokenizer.json"
    stamp = tok.stat().st_mtime_ns
    ensure_shards(cfg)  # same sources: not retrained
    assert tok.stat().st_mtime_ns == stamp

    paths, skipped = mixture_paths(cfg, "train")
    assert skipped == {}
    got = _samples_per_source(paths, two_sources)
    assert 2.5 <= got["synthetic"] / got["iu_xray"] <= 3.5  # 3:1 by weight; IU's 3 training studies are cycled
    assert len([p for p in paths if "/s2/" in p]) > 2
    val, _ = mixture_paths(cfg, "val")  # evaluation splits: every shard once
    assert len(val) == len(set(val))

    params = mixture_params(cfg)
    assert params["data.mixture.synthetic.weight"] == "3.0"
    assert params["data.mixture.iu_xray.counts.iu_xray.train"] == "3"
    assert params["data.mixture.synthetic.license.synthetic"] == "CC0-1.0"
    assert "CC BY-NC-ND" in params["data.mixture.iu_xray.license.iu_xray"]

    swapped = _mix(two_sources).model_copy(update={"sources": [
        SourceMix(name="iu_xray", weight=1, shards=str(two_sources / "s1"))]})
    with pytest.raises(ValueError, match="holds shards of \\['synthetic'\\]"):
        ensure_shards(swapped)
    missing = cfg.model_copy(update={"sources": [SourceMix(name="mimic_cxr", weight=1, shards=str(two_sources / "nope"))]})
    with pytest.raises(FileNotFoundError, match="cxrfm data build --source mimic_cxr"):
        ensure_shards(missing)


@pytest.mark.slow
def test_ray_data_reads_the_weighted_stream(two_sources):
    """The schedule through Ray Data's read_webdataset: studies arrive in the weighted proportion,
    repeated (upsampled) shards included."""
    import ray

    paths, _ = mixture_paths(_mix(two_sources), "train")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        keys = [row["__key__"] for row in ray.data.read_webdataset(paths, decoder=None).select_columns(["__key__"]).iter_rows()]
    finally:
        ray.shutdown()
    got = Counter("iu_xray" if k.startswith("iu-") else "synthetic" for k in keys)
    assert got == _samples_per_source(paths, two_sources)
    assert 2.5 <= got["synthetic"] / got["iu_xray"] <= 3.5
