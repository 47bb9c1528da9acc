"""`cxrfm bench diffusion`: the table names its baseline, every variant runs the same weights, bad head
sizes are refused with the config key to change."""

import argparse

import pytest
import torch

from cxrfm.bench import diffusion as bench

SMALL = ["model.diffusion.image_size=16", "model.diffusion.block_out_channels=[16, 32]"]


def _args(*argv: str) -> argparse.Namespace:
    return bench.add_args(argparse.ArgumentParser()).parse_args(
        ["--steps", "1", "--warmup", "0", *[x for o in SMALL for x in ("--set", o)], *argv])


def test_table_has_the_baseline_first_and_every_head_size():
    out = bench.run(_args("--head-dims", "8,16"))
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["8", "16"]
    assert rows[0][1] == "2,4" and rows[1][1] == "1,2"  # heads per level of [16, 32]
    assert rows[0][-1] == "baseline" and rows[1][-1].endswith("x")
    assert all(float(r[2]) > 0 for r in rows)


def test_variants_share_the_baselines_weights():
    decs, _ = bench._decoders(_args(), [8, 16], torch.device("cpu"))
    a, b = decs[8].state_dict(), decs[16].state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # ... yet the head split changes the function: the bench compares two different attentions.
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1, 16, 16), dtype=torch.uint8, generator=g)
    cond, mask = torch.randn(1, 5, decs[8].cond_dim, generator=g), torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        l8, l16 = (decs[h](images, cond, mask, generator=torch.Generator().manual_seed(1)) for h in (8, 16))
    assert not torch.equal(l8, l16)


def test_a_head_size_that_does_not_divide_the_channels_names_the_key():
    with pytest.raises(ValueError, match="model.diffusion.attention_head_dim"):
        bench.run(_args("--head-dims", "8,12"))


def test_empty_head_dims_is_refused():
    with pytest.raises(SystemExit, match="--head-dims"):
        bench.run(_args("--head-dims", ","))
