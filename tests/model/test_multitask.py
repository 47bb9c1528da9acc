import tarfile

import numpy as np
import pytest
import torch

from cxrfm.config import load_config
from cxrfm.data.pipeline import StudyToExample
from cxrfm.data.samples import LM_TASKS, SampleSpec
from cxrfm.data.shards import load_manifest
from cxrfm.model.build import build_model
from cxrfm.model.multitask import MultitaskModel
from cxrfm.model.summary import count_parameters, summarize


def _raw_batch(shards, n=16):
    """The first n rows of the first shard as a map_batches batch (the Ray Data path is tested in
    tests/data/test_pipeline.py; the model tests only need examples)."""
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


@pytest.fixture(scope="module")
def batch(small_shards):
    spec = SampleSpec(max_seq_len=192, image_size=64, num_image_tokens=16)
    mapper = StudyToExample(str(small_shards / "tokenizer"), spec, {"report": 1, "vqa": 1, "grounding": 1}, seed=0)
    out = mapper(_raw_batch(small_shards, n=12))
    return {k: torch.as_tensor(v) for k, v in out.items()}, len(mapper.tokenizer)


@pytest.mark.parametrize("task", LM_TASKS)
def test_forward_backward_per_task(batch, task):
    data, vocab = batch
    sel = data["task"] == LM_TASKS.index(task)
    assert sel.any(), f"fixture batch has no {task} example"
    torch.manual_seed(0)
    model = build_model(load_config(), vocab)
    out = model(data["input_ids"][sel], data["attention_mask"][sel], data["images"][sel], data["image_present"][sel],
                labels=data["labels"][sel], task=data["task"][sel])
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert abs(out["loss"].item() - np.log(vocab)) < 1.5  # untrained: near uniform
    out["loss"].backward()
    for part in (model.vision, model.projector, model.language):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"{type(part).__name__} got no gradient"
    assert out[f"tokens/{task}"] == out["tokens"]


def test_visual_tokens_change_the_answer_distribution(batch):
    """Images reach the LM: the same prompt with different pixels gives different logits."""
    data, vocab = batch
    model = build_model(load_config(), vocab).eval()
    args = (data["input_ids"][:2], data["attention_mask"][:2])
    a = model(*args, data["images"][:2], data["image_present"][:2])["logits"]
    b = model(*args, 255 - data["images"][:2], data["image_present"][:2])["logits"]
    assert not torch.allclose(a, b)


def test_mismatched_placeholders_are_rejected(batch):
    data, vocab = batch
    model = build_model(load_config(), vocab)
    present = data["image_present"][:2].clone()
    present[0] = False
    with pytest.raises(ValueError, match="<image> positions"):
        model(data["input_ids"][:2], data["attention_mask"][:2], data["images"][:2], present)


@pytest.mark.parametrize("overrides", [[], ["model.projector.position_embedding=true"]])
def test_save_and_load_pretrained_round_trip(batch, tmp_path, overrides):
    data, vocab = batch
    cfg = load_config(None, overrides)
    model = build_model(cfg, vocab).eval()
    model.save_pretrained(tmp_path, full_config=cfg)
    loaded = MultitaskModel.from_pretrained(tmp_path).eval()
    args = (data["input_ids"][:3], data["attention_mask"][:3], data["images"][:3], data["image_present"][:3])
    torch.testing.assert_close(model(*args)["logits"], loaded(*args)["logits"])
    with pytest.raises(FileNotFoundError, match="not a cxrfm export"):
        MultitaskModel.from_pretrained(tmp_path / "nothing")


def _llama_params(vocab, hidden, inter, layers, heads, kv_heads, tied=False):
    """Llama parameter count by hand: embeddings, per-layer attention + SwiGLU MLP + 2 RMSNorms, final norm, head."""
    head_dim = hidden // heads
    attn = hidden * hidden * 2 + hidden * kv_heads * head_dim * 2  # q, o + k, v
    mlp = 3 * hidden * inter
    per_layer = attn + mlp + 2 * hidden
    return vocab * hidden + layers * per_layer + hidden + (0 if tied else vocab * hidden)


def test_7b_language_model_on_meta_matches_hand_count():
    cfg = load_config(None, [
        "model.language.hidden_size=4096", "model.language.intermediate_size=11008", "model.language.num_layers=32",
        "model.language.num_heads=32", "model.language.num_kv_heads=32", "model.language.vocab_size=32000",
    ])
    model = build_model(cfg, 32000, device="meta")
    assert next(model.parameters()).device.type == "meta"
    counts = count_parameters(model)
    expected = _llama_params(32000, 4096, 11008, 32, 32, 32)
    assert expected == 6_738_415_616  # LLaMA-7B as published
    assert abs(counts["language"] - expected) / expected < 0.02
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")  # every component counted


def test_summary_of_tiny_config_is_consistent():
    counts = summarize(load_config())
    assert 0 < counts["projector"] < counts["language"] and counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_activation_checkpointing_gives_the_same_gradients(batch):
    data, vocab = batch
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(load_config(), vocab)
        if ckpt:
            model.enable_activation_checkpointing()
        model.train()
        out = model(data["input_ids"][:4], data["attention_mask"][:4], data["images"][:4], data["image_present"][:4],
                    labels=data["labels"][:4])
        out["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_generate_task_trains_the_decoder_and_the_language_model(small_shards, tmp_path):
    """Diffusion rows: text-only prompts condition the decoder; its loss reaches the LM; export + sample works."""
    from cxrfm.model.generate import Predictor
    from cxrfm.text.tokenizer import load_tokenizer

    spec = SampleSpec(max_seq_len=192, image_size=64, num_image_tokens=16)
    weights = {"report": 1, "generate": 1}
    mapper = StudyToExample(str(small_shards / "tokenizer"), spec, weights, seed=1)
    data = {k: torch.as_tensor(v) for k, v in mapper(_raw_batch(small_shards, n=8)).items()}
    gen = data["task"] == 3
    assert gen.any() and not data["image_present"][gen].any()  # the LM never sees the target image
    assert (data["labels"][gen] == -100).all()
    cfg = load_config(None, ["model.diffusion.enabled=true", "model.diffusion.image_size=16",
                             "data.tasks={report: 1, generate: 1}"])
    tok = load_tokenizer(small_shards / "tokenizer")
    torch.manual_seed(0)
    model = build_model(cfg, len(tok))
    out = model(data["input_ids"], data["attention_mask"], data["images"], data["image_present"],
                labels=data["labels"], task=data["task"])
    assert out["tokens/generate"] == gen.sum() and out["loss_sum/generate"] > 0
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.diffusion.parameters())
    emb = model.language.get_input_embeddings().weight.grad
    assert emb is not None and emb.abs().sum() > 0

    model.save_pretrained(tmp_path, full_config=cfg, tokenizer=tok)
    image = Predictor(tmp_path).generate_image("moderate right pleural effusion.", seed=0, steps=2)
    again = Predictor(tmp_path).generate_image("moderate right pleural effusion.", seed=0, steps=2)
    assert image.shape == (16, 16) and image.dtype == np.uint8 and (image == again).all()
    # A batch right-pads the shorter report; the decoder's condition must not see the pads.
    predictor = Predictor(tmp_path)
    short, long = "moderate right pleural effusion.", "large left pneumothorax. heart size is normal. no effusion."
    batch = predictor.generate_images([short, long], seed=0, steps=2)
    assert batch.shape == (2, 16, 16) and (batch == predictor.generate_images([short, long], seed=0, steps=2)).all()
    assert (batch[0] == predictor.generate_images([short, short], seed=0, steps=2)[0]).all()


def test_finding_loss_trains_the_vision_encoder_on_current_images_only(batch, small_shards):
    """The auxiliary head sees frontal/lateral images with labeled observations; priors and -1 entries
    do not count, and its gradient reaches the vision encoder."""
    _, vocab = batch
    spec = SampleSpec(max_seq_len=192, image_size=64, num_image_tokens=16)
    mapper = StudyToExample(str(small_shards / "tokenizer"), spec, {"report": 1}, seed=0)
    every = {k: torch.as_tensor(v) for k, v in mapper(_raw_batch(small_shards, n=20)).items()}
    with_prior = every["image_present"][:, 2].nonzero().flatten()[:3].tolist()
    without = (~every["image_present"][:, 2]).nonzero().flatten()[:3].tolist()
    data = {k: v[with_prior + without] for k, v in every.items()}  # studies with and without a prior image
    cfg = load_config(None, ["model.finding_loss_weight=0.5"])
    torch.manual_seed(0)
    model = build_model(cfg, vocab)
    present, findings = data["image_present"], data["findings"]
    out = model(data["input_ids"], data["attention_mask"], data["images"], present,
                labels=data["labels"], task=data["task"], findings=findings)
    rows, roles = present.nonzero(as_tuple=True)
    labeled = findings[rows] >= 0  # (n images, 14)
    expected = int((labeled & (roles != 2).unsqueeze(1)).sum())
    assert int((labeled & (roles == 2).unsqueeze(1)).sum()) > 0, "the batch needs labeled studies with a prior"
    assert expected > 0 and int(out["tokens/findings"]) == expected
    # untrained logits near 0: BCE near log 2 per counted entry
    assert abs(float(out["loss_sum/findings"]) / expected - np.log(2)) < 0.3
    model.zero_grad()
    (out["loss_sum/findings"].new_tensor(0) + model._finding_loss(
        model.vision(data["images"][present]), present, findings, {})).backward()
    assert model.finding_head.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.language.parameters())


def test_finding_loss_is_zero_without_labels(batch):
    data, vocab = batch
    model = build_model(load_config(None, ["model.finding_loss_weight=1.0"]), vocab)
    unlabeled = torch.full_like(data["findings"], -1.0)
    base = build_model(load_config(), vocab)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("finding_head")})
    args = (data["input_ids"], data["attention_mask"], data["images"], data["image_present"])
    with torch.no_grad():
        out = model(*args, labels=data["labels"], task=data["task"], findings=unlabeled)
        ref = base(*args, labels=data["labels"], task=data["task"])
    assert int(out["tokens/findings"]) == 0
    torch.testing.assert_close(out["loss"], ref["loss"])


@pytest.mark.parametrize("average", ["token", "task"])
def test_lm_loss_average(batch, average):
    """token: one mean over all answer tokens. task: each task's token mean weighted by its share of the rows,
    so a 1-token answer row counts as much as a long report row."""
    data, vocab = batch
    torch.manual_seed(0)
    model = build_model(load_config(None, [f"model.lm_loss_average={average}"]), vocab)
    with torch.no_grad():
        out = model(data["input_ids"], data["attention_mask"], data["images"], data["image_present"],
                    labels=data["labels"], task=data["task"])
    rows = {t: int((data["task"] == i).sum()) for i, t in enumerate(LM_TASKS)}
    assert all(rows.values()), f"the fixture batch needs every LM task, has {rows}"
    means = {t: float(out[f"loss_sum/{t}"]) / int(out[f"tokens/{t}"]) for t in LM_TASKS}
    assert len({int(out[f"tokens/{t}"]) // rows[t] for t in LM_TASKS}) > 1, "tasks need different answer lengths"
    if average == "token":
        expected = sum(float(out[f"loss_sum/{t}"]) for t in LM_TASKS) / int(out["tokens"])
    else:
        expected = sum(means[t] * rows[t] for t in LM_TASKS) / sum(rows.values())
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-5)


def test_view_loss_counts_shown_images_with_a_known_view(batch):
    """The view head sees every shown image (priors too: a view is a property of the image), targets come from
    each image's metadata, unknown views (-1) do not count, and its gradient reaches the vision encoder."""
    from cxrfm.data.samples import VIEW_CLASSES

    data, vocab = batch
    model = build_model(load_config(None, ["model.view_loss_weight=1.0"]), vocab)
    present, views = data["image_present"], data["views"]
    assert ((views >= 0) == present).all(), "every shown phantom image has a known view"
    assert set(views[present].tolist()) <= set(range(len(VIEW_CLASSES)))
    unknown = views.clone()
    unknown[0] = -1
    args = (data["input_ids"], data["attention_mask"], data["images"], present)
    out = model(*args, labels=data["labels"], task=data["task"], views=unknown)
    assert int(out["tokens/views"]) == int(present.sum()) - int(present[0].sum())
    assert abs(float(out["loss_sum/views"]) / int(out["tokens/views"]) - np.log(len(VIEW_CLASSES))) < 0.5
    out["loss"].backward()
    assert model.view_head.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision.parameters())
    with torch.no_grad():  # no view known: nothing counted, the loss is the plain model's
        none = model(*args, labels=data["labels"], task=data["task"], views=torch.full_like(views, -1))
        base = model(*args, labels=data["labels"], task=data["task"], views=None)
    assert int(none["tokens/views"]) == 0
    torch.testing.assert_close(none["loss"], base["loss"])
