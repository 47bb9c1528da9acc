"""The training loop's batch handling: right padding that no row uses is cut before the model runs."""

import numpy as np
import pytest
import torch

from cxrfm.config import load_config
from cxrfm.data.pipeline import StudyToExample
from cxrfm.data.samples import SampleSpec
from cxrfm.model.build import build_model
from cxrfm.train.loop import PAD_MULTIPLE, trim_padding
from tests.model.test_multitask import _raw_batch


@pytest.fixture(scope="module")
def examples(small_shards):
    spec = SampleSpec(max_seq_len=384, image_size=64, num_image_tokens=16)  # room past the longest report
    mapper = StudyToExample(str(small_shards / "tokenizer"), spec, {"report": 1, "vqa": 1, "grounding": 1}, seed=0)
    return mapper(_raw_batch(small_shards, n=8)), len(mapper.tokenizer)


def test_trim_keeps_every_used_position_and_rounds_up(examples):
    raw, _ = examples
    longest = int(raw["attention_mask"].sum(1).max())
    assert longest < 384 - PAD_MULTIPLE, "fixture rows fill max_seq_len: nothing to trim"
    out = trim_padding(raw)
    length = out["input_ids"].shape[1]
    assert length % PAD_MULTIPLE == 0 and longest <= length < longest + PAD_MULTIPLE
    assert (raw["attention_mask"][:, length:] == 0).all() and (raw["labels"][:, length:] == -100).all()
    for k in ("input_ids", "attention_mask", "labels"):
        np.testing.assert_array_equal(out[k], raw[k][:, :length])
    for k in ("images", "image_present", "task", "findings", "views"):
        assert out[k] is raw[k]


def test_trim_leaves_full_batches_alone():
    raw = {"input_ids": np.ones((2, 16), np.int64), "attention_mask": np.ones((2, 16), np.int64),
           "labels": np.ones((2, 16), np.int64), "task": np.zeros(2, np.int64)}
    assert trim_padding(raw) is raw


def test_trimmed_batch_gives_the_same_loss_and_gradients(examples):
    raw, vocab = examples
    torch.manual_seed(0)
    model = build_model(load_config(), vocab)
    results = []
    for b in (raw, trim_padding(raw)):
        t = {k: torch.as_tensor(v) for k, v in b.items()}
        model.zero_grad()
        out = model(t["input_ids"], t["attention_mask"], t["images"], t["image_present"], labels=t["labels"], task=t["task"])
        out["loss"].backward()
        results.append((out["loss"].detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (full, g_full), (cut, g_cut) = results
    assert torch.allclose(full, cut, rtol=1e-5, atol=1e-6)
    assert len(g_full) == len(g_cut) and all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g_full, g_cut))
