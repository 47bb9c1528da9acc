"""The map_batches transform, run directly on raw rows (the Ray path is covered end to end in tests/train)."""

import tarfile

import numpy as np
import pytest

from cxrfm.data.pipeline import SKIP_REASONS, TASK_IDS, StudyToExample
from cxrfm.data.samples import IGNORE, SampleSpec
from cxrfm.data.shards import load_manifest
from cxrfm.text.tokenizer import EOS, IMAGE


def _raw_batch(shards, n=16):
    path = shards / load_manifest(shards)["shards"][0]["path"]
    rows = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            rows.setdefault(key, {})[ext] = tar.extractfile(m).read()
    keys = sorted(rows)[:n]
    cols = {c for k in keys for c in rows[k]}
    batch = {"__key__": np.array(keys, dtype=object)}
    for c in cols:
        batch[c] = np.array([rows[k].get(c, float("nan")) for k in keys], dtype=object)
    return batch


@pytest.fixture()
def mapper(small_shards):
    spec = SampleSpec(max_seq_len=192, image_size=64, num_image_tokens=16, augment=True)
    return StudyToExample(str(small_shards / "tokenizer"), spec, {"report": 0.5, "vqa": 0.3, "grounding": 0.2}, seed=0)


def test_examples_have_fixed_shapes_and_answer_only_labels(small_shards, mapper):
    out = mapper(_raw_batch(small_shards))
    B = len(out["task"])
    assert out["input_ids"].shape == (B, 192) and out["images"].shape == (B, 3, 64, 64)
    vocab = mapper.tokenizer.get_vocab()
    for i in range(B):
        ids, labels = out["input_ids"][i], out["labels"][i]
        assert (ids == vocab[IMAGE]).sum() == 16 * out["image_present"][i].sum()
        answer = labels != IGNORE
        assert answer.any() and not answer[: np.argmax(answer)].any()
        assert np.array_equal(ids[answer], labels[answer])  # labels are the answer tokens themselves
        last = np.nonzero(answer)[0][-1]
        assert labels[last] == vocab[EOS] or out["truncated"][i]
    assert set(out["task"]) <= set(TASK_IDS.values()) and (out["skip_code"] == 0).all()


def test_corrupt_rows_are_kept_flagged_and_counted(small_shards, mapper):
    batch = _raw_batch(small_shards, n=6)
    batch["frontal.png"][1] = b"\x89PNG\r\n\x1a\nbroken"
    batch["json"][2] = b"{not json"
    batch["frontal.png"][3] = float("nan")  # member missing from the tar
    out = mapper(batch)
    codes = [SKIP_REASONS[c] for c in out["skip_code"]]
    assert codes[1] == "corrupt_image" and codes[2] == "bad_json" and codes[3] == "missing_image"
    assert codes.count("ok") == 3
    for i in (1, 2, 3):
        assert (out["labels"][i] == IGNORE).all() and not out["image_present"][i].any()


def test_finding_targets_follow_the_chexpert_labels(small_shards, mapper):
    """findings: 1 positive, 0 negative or not mentioned, -1 uncertain; all -1 for studies without labels
    and for skipped rows (the auxiliary vision loss then ignores them)."""
    from cxrfm.data.samples import finding_targets
    from cxrfm.data.schema import CHEXPERT_LABELS, Study

    batch = _raw_batch(small_shards, n=6)
    batch["json"][2] = b"{not json"
    out = mapper(batch)
    assert out["findings"].shape == (6, len(CHEXPERT_LABELS)) and out["findings"].dtype == np.float32
    assert (out["findings"][2] == -1).all()
    for i in (0, 1, 3):
        study = Study.model_validate_json(batch["json"][i])
        want = [{1: 1.0, -1: -1.0}.get(study.labels.get(name, 0), 0.0) for name in CHEXPERT_LABELS]
        assert out["findings"][i].tolist() == want
    study = Study.model_validate_json(batch["json"][0])
    labeled = study.model_copy(update={"labels": {"Cardiomegaly": 1, "Edema": -1, "Pneumothorax": 0}})
    t = finding_targets(labeled)
    idx = CHEXPERT_LABELS.index
    assert t[idx("Cardiomegaly")] == 1 and t[idx("Edema")] == -1 and t[idx("Pneumothorax")] == 0
    assert t[idx("Fracture")] == 0  # not mentioned counts as negative
    assert (finding_targets(study.model_copy(update={"labels": {}})) == -1).all()
