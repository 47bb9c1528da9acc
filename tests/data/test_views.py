"""Views from the pixels (measured on phantoms), and a study whose only image is a lateral end to end."""

from __future__ import annotations

import numpy as np

from cxrfm.data.samples import ROLES, SampleSpec, available_tasks, encode_example, prompt_ids
from cxrfm.data.schema import ImageRef, Study
from cxrfm.data.views import THRESHOLD, classify_view, midline_contrast, phantom_view_accuracy
from cxrfm.text.tokenizer import IMAGE, ROLE_TOKENS, TASK_TOKENS, train_tokenizer


def test_view_from_pixels_on_phantoms():
    """Held-out phantoms (a seed and size the threshold was not read from): every image right."""
    result = phantom_view_accuracy(num_studies=120, image_size=64, seed=77)
    print(result)
    assert result["frontal_images"] >= 100 and result["lateral_images"] >= 25
    assert result["accuracy"] == 1.0


def test_view_score_ignores_which_way_the_patient_faces_and_the_image_size():
    from cxrfm.data.synthetic import generate_phantoms

    phantom = next(p for p in generate_phantoms(20, 96, 5) if "lateral" in p.images)
    lateral = phantom.images["lateral"]
    assert classify_view(lateral)[0] == classify_view(lateral[:, ::-1].copy())[0] == "lateral"  # facing left or right
    frontal = phantom.images["frontal"]
    assert classify_view(frontal)[0] == "frontal"
    wide = np.pad(frontal, ((0, 0), (8, 8)), mode="edge")  # a wider film of the same chest
    assert midline_contrast(wide) > THRESHOLD


def test_a_lateral_only_study_trains_and_prompts():
    study = Study(study_id="s", patient_id="p", split="train", source="t", findings="No pleural effusion.",
                  images=[ImageRef(role="lateral", key="lateral.png", view="LATERAL", width=32, height=32)],
                  labels={"Pleural Effusion": 0})
    assert available_tasks(study) == ["report"]  # no frontal: no grounding or image generation target
    tok = train_tokenizer(["no pleural effusion", "indication: none given"] * 20, vocab_size=300)
    spec = SampleSpec(max_seq_len=64, image_size=32, num_image_tokens=4)
    images = {"lateral": np.full((32, 32), 90, np.uint8)}
    example, truncated = encode_example(study, "report", images, tok, spec, np.random.default_rng(0))
    assert not truncated
    assert example["image_present"].tolist() == [role == "lateral" for role in ROLES]
    assert (example["images"][ROLES.index("lateral")] == 90).all() and not example["images"][0].any()
    vocab = tok.get_vocab()
    ids = prompt_ids(tok, ["lateral"], "report", "indication: none given", 4)
    assert ids[1:7] == [vocab[ROLE_TOKENS["lateral"]]] + [vocab[IMAGE]] * 4 + [vocab[TASK_TOKENS["report"]]]
    assert vocab[ROLE_TOKENS["frontal"]] not in example["input_ids"].tolist()
