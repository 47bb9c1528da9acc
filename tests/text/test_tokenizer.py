import re

import pytest

from cxrfm.text.tokenizer import (
    LOC_TOKENS, NUM_LOC_BINS, SPECIAL_TOKENS, box_to_loc_tokens, load_tokenizer, loc_tokens_to_boxes, train_tokenizer,
)

_LOC = re.compile(r"<loc_\d+>")
TEXTS = ["Small right pleural effusion.", "No pneumothorax.", "Heart size is normal.",
         "Endotracheal tube terminates 4 cm above the carina."] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t = train_tokenizer(TEXTS, vocab_size=300)
    path = tmp_path_factory.mktemp("tok")
    t.save_pretrained(str(path))
    return load_tokenizer(path)


def test_special_and_location_tokens_are_single_ids_in_fixed_order(tok):
    vocab = tok.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert len(LOC_TOKENS) == NUM_LOC_BINS
    ids = tok.encode("<loc_0><loc_1023>", add_special_tokens=False)
    assert ids == [vocab["<loc_0>"], vocab["<loc_1023>"]]


def test_round_trip_text_with_location_tokens(tok):
    text = "right pleural effusion" + box_to_loc_tokens((10, 64, 60, 120), 128, 128)
    ids = tok.encode(text, add_special_tokens=False)
    decoded = tok.decode(ids)
    assert decoded.replace(" ", "") == text.lower().replace(" ", "")
    assert ids[-4:] == [tok.get_vocab()[t] for t in _LOC.findall(text)]  # one id per location token
    boxes, problems = loc_tokens_to_boxes(decoded, 128, 128)
    # 128 px over 1024 bins: 8 bins per pixel, so pixel p is bin 8p and comes back as its centre 8p + 0.5.
    assert problems == [] and boxes == [tuple((8 * v + 0.5) / 8 for v in (10, 64, 60, 120))]


def _centre(i: int, side: int) -> float:
    return (i + 0.5) * side / NUM_LOC_BINS


@pytest.mark.parametrize("width, height", [(1024, 1024), (128, 128), (2500, 2048), (333, 517)])
def test_every_bin_centre_round_trips_exactly(width, height):
    """A box whose corners sit on bin centres maps to exactly those bins and parses back to exactly those
    centres, for every bin on both axes (a non-square image also catches swapped width and height)."""
    for i in range(NUM_LOC_BINS - 1):
        box = (_centre(i, width), _centre(i, height), _centre(i + 1, width), _centre(i + 1, height))
        tokens = box_to_loc_tokens(box, width, height)
        assert tokens == f"<loc_{i}><loc_{i}><loc_{i + 1}><loc_{i + 1}>", (i, box)
        boxes, problems = loc_tokens_to_boxes(tokens, width, height)
        assert problems == [] and len(boxes) == 1
        assert boxes[0] == pytest.approx(box, rel=0, abs=1e-9), i


@pytest.mark.parametrize("width, height", [(1024, 1024), (2500, 2048), (333, 517)])
def test_image_corners_and_edges_map_to_the_first_and_last_bins(width, height):
    # The whole image: its top-left corner is bin 0, its bottom-right corner (x = width, y = height) the last
    # bin, 1023, never a bin 1024 that no token exists for.
    whole = box_to_loc_tokens((0, 0, width, height), width, height)
    assert whole == "<loc_0><loc_0><loc_1023><loc_1023>"
    boxes, problems = loc_tokens_to_boxes(whole, width, height)
    assert problems == [] and boxes[0] == pytest.approx(
        (_centre(0, width), _centre(0, height), _centre(1023, width), _centre(1023, height)), rel=0, abs=1e-9)
    assert box_to_loc_tokens(boxes[0], width, height) == whole  # tokens -> box -> tokens is the identity
    # Each of the four corners as the end of a box that touches it.
    cx, cy = width / 2, height / 2
    corners = {
        (0, 0, cx, cy): "<loc_0><loc_0><loc_512><loc_512>",
        (cx, 0, width, cy): "<loc_0><loc_512><loc_512><loc_1023>",
        (0, cy, cx, height): "<loc_512><loc_0><loc_1023><loc_512>",
        (cx, cy, width, height): "<loc_512><loc_512><loc_1023><loc_1023>",
    }
    for box, want in corners.items():
        assert box_to_loc_tokens(box, width, height) == want, box
    # Boxes reaching past the image (a label slightly outside it) are clamped to the edge bins.
    assert box_to_loc_tokens((-3, -3, width + 3, height + 3), width, height) == whole


def test_pixel_to_bin_is_floor_on_a_1024_pixel_side():
    """On a 1024-pixel side each pixel is one bin: pixel p and p + 0.99 are bin p (floor, not rounding)."""
    for p in range(NUM_LOC_BINS - 1):
        assert box_to_loc_tokens((p, p, p + 1.99, p + 1), 1024, 1024) == f"<loc_{p}><loc_{p}><loc_{p + 1}><loc_{p + 1}>"


def test_every_emitted_location_token_is_one_vocabulary_id(tok):
    vocab = tok.get_vocab()
    for width, height in ((1024, 1024), (2500, 2048), (333, 517)):
        for i in range(0, NUM_LOC_BINS - 1, 7):
            bottom = height if i % 2 else _centre(i + 1, height)  # every other box touches the bottom edge
            box = (_centre(i, width), _centre(i, height), _centre(i + 1, width), bottom)
            tokens = box_to_loc_tokens(box, width, height)
            ids = tok.encode(tokens, add_special_tokens=False)
            assert len(ids) == 4, (tokens, ids)
            assert ids == [vocab[t] for t in _LOC.findall(tokens)], tokens
        edge = box_to_loc_tokens((0, 0, width, height), width, height)
        assert tok.encode(edge, add_special_tokens=False) == [vocab["<loc_0>"]] * 2 + [vocab["<loc_1023>"]] * 2


def test_malformed_location_sequences_are_reported_not_guessed():
    boxes, problems = loc_tokens_to_boxes("<loc_10><loc_10><loc_5><loc_20><loc_3>", 100, 100)
    assert boxes == []
    assert any("not a multiple of 4" in p for p in problems)
    assert any("non-positive size" in p for p in problems)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cxrfm data build"):
        load_tokenizer(tmp_path)
