"""Generation with the KV cache through transformers `generate`, on an untrained tiny export."""

import contextlib

import numpy as np
import pytest
import torch

from cxrfm.config import load_config
from cxrfm.data.samples import prompt_ids
from cxrfm.model.build import build_model
from cxrfm.model.generate import GenerationOptions, ImageError, Predictor, draw_boxes, load_image
from cxrfm.text.tokenizer import EOS, NUM_LOC_BINS, load_tokenizer


@pytest.fixture(scope="module")
def predictor(small_shards, tmp_path_factory):
    tok = load_tokenizer(small_shards / "tokenizer")
    torch.manual_seed(0)
    cfg = load_config()
    model = build_model(cfg, len(tok))
    export = tmp_path_factory.mktemp("export")
    model.save_pretrained(export, full_config=cfg, tokenizer=tok)
    return Predictor(export)


def _images(seed):
    rng = np.random.default_rng(seed)
    return {"frontal": rng.integers(0, 255, (128, 128), dtype=np.uint8)}


def _next_logprobs(p: Predictor, images, task, text, sequences: list[list[int]]) -> torch.Tensor:
    """Reference step: a full forward pass over prompt + each continuation, no cache -> (n, vocab) log-probs."""
    ids = prompt_ids(p.tokenizer, list(images), task, text, p.num_image_tokens)
    stack = np.zeros((3, p.image_size, p.image_size), np.uint8)
    stack[0] = p._resize(images["frontal"])
    x = torch.tensor([ids + seq for seq in sequences])
    present = torch.tensor([[True, False, False]] * len(sequences))
    with torch.no_grad():
        logits = p.model(x, torch.ones_like(x), torch.as_tensor(stack)[None].expand(len(sequences), -1, -1, -1),
                         present)["logits"]
    return torch.log_softmax(logits[:, -1].double(), dim=-1)


def _greedy_ids_without_cache(p: Predictor, images, text, steps, task="vqa") -> list[int]:
    """Reference decoder: full forward pass per token, no cache, argmax, stop at EOS."""
    out: list[int] = []
    for _ in range(steps):
        nxt = int(_next_logprobs(p, images, task, text, [out])[0].argmax())
        if nxt == p.vocab[EOS]:
            break
        out.append(nxt)
    return out


def _greedy_without_cache(p: Predictor, images, text, steps, task="vqa"):
    return p.tokenizer.decode(_greedy_ids_without_cache(p, images, text, steps, task), skip_special_tokens=False).strip()


def _beam_without_cache(p: Predictor, images, task, text, beams, steps) -> list[int]:
    """Reference beam search: keep the `beams` best continuations by summed log-probability, no cache.

    Finished (EOS) hypotheses and length normalisation only matter once EOS is among the candidates a
    beam search looks at (the best 2 x beams per step); this reference refuses such inputs rather than
    re-implement that bookkeeping, so the comparison below is exact where it runs."""
    eos = p.vocab[EOS]
    running = [([], 0.0)]
    for _ in range(steps):
        lp = _next_logprobs(p, images, task, text, [seq for seq, _ in running])  # (n, vocab)
        total = torch.tensor([score for _, score in running], dtype=torch.float64)[:, None] + lp
        top = torch.topk(total.flatten(), 2 * beams)
        cands = [(divmod(int(i), lp.shape[1]), float(v)) for i, v in zip(top.indices, top.values)]
        assert all(tok != eos for (_, tok), _ in cands), "EOS among the candidates: pick other inputs"
        running = [(running[b][0] + [tok], v) for (b, tok), v in cands[:beams]]
    return max(running, key=lambda r: r[1])[0]


def test_cached_greedy_equals_uncached_reference(predictor):
    images = _images(0)
    got = predictor.vqa(images, "is there a pleural effusion?", GenerationOptions(max_new_tokens=6)).text
    assert got == _greedy_without_cache(predictor, images, "is there a pleural effusion?", 6)


def test_left_padded_batch_gives_the_same_answers_as_one_by_one(predictor):
    reqs = [{"task": "vqa", "images": _images(1), "text": "effusion?"},
            {"task": "vqa", "images": _images(2), "text": "is the heart size normal on this radiograph?"}]
    opts = GenerationOptions(max_new_tokens=5)
    batch = [a.text for a in predictor.generate_batch(reqs, opts)]
    single = [predictor.generate_batch([r], opts)[0].text for r in reqs]
    assert batch == single


def test_on_step_streams_each_rows_tokens_of_the_same_answers(predictor):
    reqs = [{"task": "vqa", "images": _images(1), "text": "effusion?"},
            {"task": "report", "images": _images(2), "text": "indication: cough"}]
    opts = GenerationOptions(max_new_tokens=6)
    steps = []
    answers = predictor.generate_batch(reqs, opts, on_step=steps.append)
    assert answers == predictor.generate_batch(reqs, opts) and 1 <= len(steps) <= 6
    eos, pad = predictor.vocab[EOS], predictor.vocab["<pad>"]
    for row, answer in enumerate(answers):
        tokens = [step[row] for step in steps]
        tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
        assert pad not in tokens and len(tokens) == answer.tokens
        assert predictor.tokenizer.decode(tokens, skip_special_tokens=False).strip() == answer.text
    with pytest.raises(ValueError, match="beam search"):
        predictor.generate_batch(reqs, GenerationOptions(max_new_tokens=2, num_beams=2), on_step=steps.append)


def test_one_beam_is_greedy_and_beam_search_equals_a_reference(predictor):
    from cxrfm.data.samples import report_prompt

    images = _images(3)
    greedy = _greedy_ids_without_cache(predictor, images, report_prompt("cough", False), 6, task="report")
    one = predictor.report(images, "cough", GenerationOptions(num_beams=1, max_new_tokens=6))
    assert one.text == predictor.tokenizer.decode(greedy, skip_special_tokens=False).strip()
    assert one.tokens == len(greedy)
    want = _beam_without_cache(predictor, images, "report", report_prompt("cough", False), 3, 6)
    beam = predictor.report(images, "cough", GenerationOptions(num_beams=3, max_new_tokens=6))
    assert beam.text == predictor.tokenizer.decode(want, skip_special_tokens=False).strip()
    assert beam.tokens == len(want) == 6
    assert want != greedy  # on these inputs beam search finds a different (more probable) continuation


def test_sampling_is_seeded(predictor):
    images = _images(3)
    a = predictor.report(images, "cough", GenerationOptions(do_sample=True, seed=5, max_new_tokens=8, temperature=1.5))
    b = predictor.report(images, "cough", GenerationOptions(do_sample=True, seed=5, max_new_tokens=8, temperature=1.5))
    assert a.text == b.text  # seeded sampling is reproducible


@contextlib.contextmanager
def _lm_head_zeroed(p: Predictor, rows: list[int]):
    """Zero some output rows of the LM head (their logits become 0) for the duration; restored after."""
    head = p.model.language.get_output_embeddings().weight  # (vocab, hidden)
    saved = head.detach().clone()
    try:
        with torch.no_grad():
            head[rows] = 0.0
        yield
    finally:
        with torch.no_grad():
            head.copy_(saved)


def _loc_ids(p: Predictor) -> list[int]:
    return [p.vocab[f"<loc_{i}>"] for i in range(NUM_LOC_BINS)]


def test_grounding_answer_without_locations_is_reported_not_guessed(predictor, tmp_path):
    # A model that never says a location token (their logits are 0, below the best of the other tokens).
    with _lm_head_zeroed(predictor, _loc_ids(predictor)):
        ans = predictor.grounding(_images(4), "right pleural effusion", GenerationOptions(max_new_tokens=4))
        want = _greedy_ids_without_cache(predictor, _images(4), "right pleural effusion", 4, task="grounding")
    assert ans.text == predictor.tokenizer.decode(want, skip_special_tokens=False).strip()
    assert ans.boxes == [] and ans.problems == ["the answer holds no location tokens"]
    draw_boxes(_images(4)["frontal"], [(10, 10, 50, 60)], tmp_path / "boxes.png")
    drawn = load_image(tmp_path / "boxes.png")
    assert drawn.shape == (128, 128)


def test_grounding_boxes_are_the_location_bins_in_original_pixels(predictor):
    """A model that can only say location tokens (every other output row of the LM head zeroed): the answer's
    boxes are exactly the bin centres of the tokens the reference decoder picks, scaled to the uploaded image
    (96 x 160, not the model's square input), and a box of non-positive size is a stated problem."""
    rng = np.random.default_rng(7)
    images = {"frontal": rng.integers(0, 255, (96, 160), dtype=np.uint8)}  # (height, width)
    loc_ids = _loc_ids(predictor)
    rows = predictor.model.language.get_output_embeddings().weight.shape[0]
    others = sorted(set(range(rows)) - set(loc_ids))
    # logit 0 for every other token; the best of 1024 random logits is above it
    with _lm_head_zeroed(predictor, others):
        ans = predictor.grounding(images, "left pleural effusion", GenerationOptions(max_new_tokens=8))
        ids = _greedy_ids_without_cache(predictor, images, "left pleural effusion", 8, task="grounding")
    bins = [loc_ids.index(i) for i in ids]  # every generated token is a location token
    assert len(bins) == 8 and ans.tokens == 8
    want_boxes, want_problems = [], []
    for n in range(2):
        y1, x1, y2, x2 = bins[4 * n : 4 * n + 4]
        if y2 > y1 and x2 > x1:
            want_boxes.append(((x1 + 0.5) * 160 / 1024, (y1 + 0.5) * 96 / 1024, (x2 + 0.5) * 160 / 1024,
                               (y2 + 0.5) * 96 / 1024))
        else:
            want_problems.append(f"box {n} has non-positive size (bins y1={y1} x1={x1} y2={y2} x2={x2})")
    assert ans.text.replace(" ", "") == "".join(f"<loc_{b}>" for b in bins)
    assert ans.boxes == pytest.approx(want_boxes, rel=0, abs=1e-9) and ans.problems == want_problems


def test_bad_images_are_clear_errors(predictor, tmp_path):
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="not a PNG, JPEG or DICOM file"):
        load_image(tmp_path / "x.png")
    with pytest.raises(ValueError, match="needs a question"):
        predictor.vqa(_images(0), "  ")
