"""The data pipeline on rows that Ray Data reads from the shards (a local Ray instance, one CPU).

Every example is checked against the sequence written out by hand from its study: the prompt positions
carry exactly -100 (IGNORE) as labels, the answer positions carry the answer's token ids and EOS, and
nothing else is labelled. The same holds for the examples that come out of `build_dataset`, the
read_webdataset -> map_batches pipeline training uses.
"""

import io
import os
import tarfile

import numpy as np
import pytest

from cxrfm.data.pipeline import SKIP_REASONS, TASK_IDS, StudyToExample, build_dataset
from cxrfm.data.samples import ALL_TASKS, IGNORE, ROLES, SampleSpec, report_prompt
from cxrfm.data.schema import Study
from cxrfm.data.shards import load_manifest
from cxrfm.text.tokenizer import BOS, EOS, IMAGE, PAD, ROLE_TOKENS, TASK_TOKENS, box_to_loc_tokens, load_tokenizer

SEQ, SIDE, IMAGE_TOKENS = 512, 64, 16  # long enough that no phantom study is truncated
WEIGHTS = {"report": 0.5, "vqa": 0.3, "grounding": 0.2}


def _train_paths(shards) -> list[str]:
    return [str(shards / s["path"]) for s in load_manifest(shards)["shards"] if s["split"] == "train"]


def _damaged_shard(shards, out) -> str:
    """The first 6 samples of a real shard, rewritten with a broken PNG (1), bad JSON (2) and no frontal.png
    member at all (3)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(_train_paths(shards)[0]) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    keys = sorted(samples)[:6]
    samples[keys[1]]["frontal.png"] = b"\x89PNG\r\n\x1a\nbroken"
    samples[keys[2]]["json"] = b"{not json"
    del samples[keys[3]]["frontal.png"]
    path = out / "damaged-000000.tar"
    with tarfile.open(path, "w") as tar:
        for key in keys:
            for ext, data in sorted(samples[key].items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="module")
def ray_read(small_shards, tmp_path_factory):
    """Everything this module needs from Ray Data, read in one local Ray session: the raw rows of the train
    split, the rows of a damaged shard, and 48 mapped examples from `build_dataset`."""
    import ray

    from cxrfm.config import load_config

    if ray.is_initialized():
        pytest.fail("Ray is already initialised in this process; this module starts and stops its own instance")
    saved = os.environ.get("RAY_ADDRESS")
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        rows = ray.data.read_webdataset(_train_paths(small_shards), decoder=None).take_batch(10_000, batch_format="numpy")
        damaged = ray.data.read_webdataset([_damaged_shard(small_shards, tmp_path_factory.mktemp("damaged"))],
                                           decoder=None).take_batch(100, batch_format="numpy")
        cfg = load_config(None, [f"data.shards={small_shards}", f"data.max_seq_len={SEQ}",
                                 f"model.vision.image_size={SIDE}", "data.shuffle=false",
                                 *(f"data.tasks.{t}={w}" for t, w in WEIGHTS.items()), "data.tasks.generate=0"])
        ds, skipped = build_dataset(cfg, "train", IMAGE_TOKENS, augment=False)
        mapped = ds.take_batch(48, batch_format="numpy")
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
    return {"rows": rows, "damaged": damaged, "mapped": mapped, "skipped": skipped}


def _slice(batch: dict, idx) -> dict:
    return {k: v[idx] for k, v in batch.items()}


@pytest.fixture()
def mapper(small_shards):
    spec = SampleSpec(max_seq_len=SEQ, image_size=SIDE, num_image_tokens=IMAGE_TOKENS, augment=True)
    return StudyToExample(str(small_shards / "tokenizer"), spec, WEIGHTS, seed=0)


def _candidates(study: Study, task: str, tok) -> list[tuple[list[int], list[int]]]:
    """Every (input_ids, labels) the study can give for `task`, unpadded, written out by hand:
    <bos> (<role> <image>*16 per image, role order) <task_x> prompt | answer <eos>; labels -100 up to the bar."""
    vocab = tok.get_vocab()
    head = [vocab[BOS]]
    for role in ROLES:
        if study.image(role) is not None:
            head += [vocab[ROLE_TOKENS[role]]] + [vocab[IMAGE]] * IMAGE_TOKENS
    head.append(vocab[TASK_TOKENS[task]])
    if task == "report":
        pairs = [(report_prompt(study.indication, study.image("prior") is not None), study.report)]
    elif task == "vqa":
        pairs = [(qa.question, qa.answer) for qa in study.vqa]
    else:
        pairs = []
        for gp in study.grounding:
            ref = study.image(gp.image_role)
            pairs.append((gp.phrase, "".join(box_to_loc_tokens((b.x1, b.y1, b.x2, b.y2), ref.width, ref.height)
                                             for b in gp.boxes)))
    out = []
    for prompt, answer in pairs:
        prefix = head + tok.encode(prompt, add_special_tokens=False)
        answer_ids = tok.encode(answer, add_special_tokens=False) + [vocab[EOS]]
        out.append((prefix + answer_ids, [IGNORE] * len(prefix) + answer_ids))
    return out


def _padded(ids: list[int], labels: list[int], pad_id: int) -> tuple[list[int], list[int]]:
    return ids + [pad_id] * (SEQ - len(ids)), labels + [IGNORE] * (SEQ - len(labels))


def _check_exact(out: dict, i: int, candidates: list, pad_id: int) -> None:
    ids, labels = out["input_ids"][i].tolist(), out["labels"][i].tolist()
    want = [_padded(c_ids, c_labels, pad_id) for c_ids, c_labels in candidates]
    assert (ids, labels) in want, f"example {i}: no prompt/answer of its study gives these ids and labels"
    n = sum(1 for t in ids if t != pad_id)
    assert out["attention_mask"][i].tolist() == [1] * n + [0] * (SEQ - n)


def test_examples_are_the_hand_written_sequences_with_answer_only_labels(ray_read, mapper):
    rows = ray_read["rows"]
    out = mapper(_slice(rows, slice(0, 24)))
    B = len(out["task"])
    assert out["input_ids"].shape == (B, SEQ) and out["images"].shape == (B, 3, SIDE, SIDE)
    assert (out["skip_code"] == 0).all() and not out["truncated"].any()
    pad = mapper.tokenizer.get_vocab()[PAD]
    for i in range(B):
        study = Study.model_validate_json(rows["json"][i])
        task = ALL_TASKS[out["task"][i]]
        assert task in WEIGHTS
        _check_exact(out, i, _candidates(study, task, mapper.tokenizer), pad)
        assert out["image_present"][i].tolist() == [study.image(r) is not None for r in ROLES]
    assert set(out["task"]) == {TASK_IDS[t] for t in WEIGHTS}  # 24 draws see every task


def test_truncation_keeps_images_and_the_answer_start(ray_read, small_shards):
    """A sequence budget below prompt + answer: the prompt text is cut first, then the answer's tail; every
    image token stays, the kept answer tokens are labelled and nothing before them is."""
    spec = SampleSpec(max_seq_len=60, image_size=SIDE, num_image_tokens=IMAGE_TOKENS)
    short = StudyToExample(str(small_shards / "tokenizer"), spec, {"report": 1.0}, seed=0)
    rows = ray_read["rows"]
    out = short(_slice(rows, slice(0, 12)))
    vocab = short.tokenizer.get_vocab()
    assert out["truncated"].all()
    for i in range(12):
        study = Study.model_validate_json(rows["json"][i])
        ((ids, labels),) = _candidates(study, "report", short.tokenizer)
        got_ids, got_labels = out["input_ids"][i].tolist(), out["labels"][i].tolist()
        head = ids.index(vocab[TASK_TOKENS["report"]]) + 1  # <bos>, the images and the task token
        start = labels.index(next(t for t in labels if t != IGNORE))
        kept_prompt = max(head, 60 - (len(ids) - start))
        assert got_ids == (ids[:kept_prompt] + ids[start:])[:60]
        assert got_labels == ([IGNORE] * kept_prompt + ids[start:])[:60]
        assert got_ids.count(vocab[IMAGE]) == IMAGE_TOKENS * len(study.images)


def test_build_dataset_examples_are_exact_too(ray_read, small_shards):
    """48 examples out of read_webdataset -> map_batches: each one is a hand-written sequence of some train
    study (Ray Data does not hand the key through, so every study is a candidate)."""
    tok = load_tokenizer(small_shards / "tokenizer")
    pad = tok.get_vocab()[PAD]
    rows = ray_read["rows"]
    studies = [Study.model_validate_json(j) for j in rows["json"]]
    out = ray_read["mapped"]
    assert len(out["task"]) == 48 and (out["skip_code"] == 0).all() and ray_read["skipped"] == {}
    by_task = {t: [c for s in studies for c in _candidates(s, t, tok)] for t in WEIGHTS}
    for i in range(48):
        _check_exact(out, i, by_task[ALL_TASKS[out["task"][i]]], pad)


def test_corrupt_rows_are_kept_flagged_and_counted(ray_read, mapper):
    batch = ray_read["damaged"]
    assert len(batch["__key__"]) == 6
    assert isinstance(batch["frontal.png"][3], float)  # how Ray Data hands over a member the tar lacks
    out = mapper(batch)
    codes = [SKIP_REASONS[c] for c in out["skip_code"]]
    assert codes == ["ok", "corrupt_image", "bad_json", "missing_image", "ok", "ok"]
    for i in (1, 2, 3):
        assert (out["labels"][i] == IGNORE).all() and not out["image_present"][i].any()
        assert (out["attention_mask"][i] == 0).all() and (out["findings"][i] == -1).all()


def test_finding_targets_follow_the_chexpert_labels(ray_read, mapper):
    """findings: 1 positive, 0 negative or not mentioned, -1 uncertain; all -1 for studies without labels
    and for skipped rows (the auxiliary vision loss then ignores them)."""
    from cxrfm.data.samples import finding_targets
    from cxrfm.data.schema import CHEXPERT_LABELS

    batch = ray_read["damaged"]
    out = mapper(batch)
    assert out["findings"].shape == (6, len(CHEXPERT_LABELS)) and out["findings"].dtype == np.float32
    assert (out["findings"][2] == -1).all()
    for i in (0, 4, 5):
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
