import pytest

from cxrfm.text.tokenizer import (
    LOC_TOKENS, NUM_LOC_BINS, SPECIAL_TOKENS, box_to_loc_tokens, load_tokenizer, loc_tokens_to_boxes, train_tokenizer,
)

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
    boxes, problems = loc_tokens_to_boxes(decoded, 128, 128)
    assert not problems and len(boxes) == 1
    for got, want in zip(boxes[0], (10, 64, 60, 120)):
        assert abs(got - want) <= 128 / NUM_LOC_BINS


def test_malformed_location_sequences_are_reported_not_guessed():
    boxes, problems = loc_tokens_to_boxes("<loc_10><loc_10><loc_5><loc_20><loc_3>", 100, 100)
    assert boxes == []
    assert any("not a multiple of 4" in p for p in problems)
    assert any("non-positive size" in p for p in problems)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cxrfm data build"):
        load_tokenizer(tmp_path)
