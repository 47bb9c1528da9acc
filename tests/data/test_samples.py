"""Per-example targets built by cxrfm.data.samples."""

import numpy as np

from cxrfm.data.samples import VIEW_CLASSES, view_targets
from cxrfm.data.schema import ImageRef, Study


def test_view_targets_follow_each_shown_images_metadata():
    study = Study(study_id="s", patient_id="p", split="train", source="synthetic", images=[
        ImageRef(role="frontal", key="f.png", view="AP", width=8, height=8),
        ImageRef(role="lateral", key="l.png", view="LL", width=8, height=8)])
    got = view_targets(study, np.array([True, True, False]))
    assert got.tolist() == [VIEW_CLASSES.index("AP"), VIEW_CLASSES.index("LATERAL"), -1]
    # an image that is not shown (a generate row's target, or a dropped view) gets no target
    assert view_targets(study, np.array([False, True, False])).tolist() == [-1, VIEW_CLASSES.index("LATERAL"), -1]


def _vqa_study(n: int):
    from cxrfm.data.schema import VQAPair

    qas = [VQAPair(question=f"question {i}", answer=f"answer {i}", qtype="presence", closed=False) for i in range(n)]
    return Study(study_id="s", patient_id="p", split="train", source="synthetic", vqa=qas,
                 images=[ImageRef(role="frontal", key="f.png", view="PA", width=8, height=8)])


def _tokenizer():
    from cxrfm.text.tokenizer import train_tokenizer

    words = [f"question {i} answer {i}" for i in range(10)]
    return train_tokenizer(words * 20, vocab_size=300)


def test_multi_turn_vqa_labels_every_answer_and_only_whole_turns():
    from cxrfm.data.samples import IGNORE, SampleSpec, encode_example
    from cxrfm.text.tokenizer import EOS, TASK_TOKENS

    tok, study = _tokenizer(), _vqa_study(6)
    vocab = tok.get_vocab()
    images = {"frontal": np.zeros((16, 16), np.uint8)}
    spec = SampleSpec(max_seq_len=64, image_size=16, num_image_tokens=4, max_turns=4)
    ex, truncated = encode_example(study, "vqa", images, tok, spec, np.random.default_rng(0))
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    assert not truncated and ids.count(vocab[TASK_TOKENS["vqa"]]) == 4 and labels.count(vocab[EOS]) == 4
    # every labelled token is an answer token or its <eos>, and the labels are the tokens at those positions
    answered = tok.decode([t for t in labels if t != IGNORE and t != vocab[EOS]])
    assert sorted(answered.split()[1::2]) == sorted(set(answered.split()[1::2]))  # four different answers
    assert all(w in ("answer",) or w.isdigit() for w in answered.split())
    assert all(lab in (IGNORE, tok_id) for lab, tok_id in zip(labels, ids))
    # the questions' answers match them: "question k" is followed by "answer k"
    text = " ".join(tok.decode(ids[:sum(ex["attention_mask"])], skip_special_tokens=True).split())
    asked = [k for k in range(6) if f"question {k} " in text]
    assert len(asked) == 4 and all(f"question {k} answer {k}" in text for k in asked)
    # a shorter budget keeps fewer turns, each whole (every question has its answer and <eos>)
    short = SampleSpec(max_seq_len=24, image_size=16, num_image_tokens=4, max_turns=4)
    ex2, _ = encode_example(study, "vqa", images, tok, short, np.random.default_rng(0))
    n_q = ex2["input_ids"].tolist().count(vocab[TASK_TOKENS["vqa"]])
    assert 1 <= n_q < 4 and ex2["labels"].tolist().count(vocab[EOS]) == n_q


def test_one_turn_is_the_single_question_layout():
    from cxrfm.data.samples import SampleSpec, encode_example

    tok, study = _tokenizer(), _vqa_study(6)
    images = {"frontal": np.zeros((16, 16), np.uint8)}
    one = SampleSpec(max_seq_len=64, image_size=16, num_image_tokens=4)
    many = SampleSpec(max_seq_len=64, image_size=16, num_image_tokens=4, max_turns=3)
    a, _ = encode_example(study.model_copy(update={"vqa": study.vqa[:1]}), "vqa", images, tok, one, np.random.default_rng(0))
    b, _ = encode_example(study.model_copy(update={"vqa": study.vqa[:1]}), "vqa", images, tok, many, np.random.default_rng(0))
    assert (a["input_ids"] == b["input_ids"]).all() and (a["labels"] == b["labels"]).all()
