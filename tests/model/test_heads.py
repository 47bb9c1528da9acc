"""The fused kernels inside the model give the unfused model's loss and gradients (interpreter on CPU)."""

import pytest
import torch

from cxrfm.config import load_config
from cxrfm.model.build import build_model
from cxrfm.model.heads import LMHead

from tests.model.test_multitask import batch  # noqa: F401  (fixture)

SMALL = ["model.language.hidden_size=64", "model.language.intermediate_size=128", "model.language.num_heads=1",
         "model.language.num_kv_heads=1", "model.language.num_layers=1"]


def _loss_and_grads(cfg, vocab, data, rows=2):
    torch.manual_seed(0)
    model = build_model(cfg, vocab)
    out = model(data["input_ids"][:rows], data["attention_mask"][:rows], data["images"][:rows],
                data["image_present"][:rows], labels=data["labels"][:rows], task=data["task"][:rows])
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("flag", ["fused_cross_entropy", "fused_rmsnorm"])
def test_fused_kernel_matches_unfused_model(batch, flag):  # noqa: F811
    data, vocab = batch
    ref_loss, ref_grads = _loss_and_grads(load_config(None, SMALL), vocab, data)
    loss, grads = _loss_and_grads(load_config(None, SMALL + [f"model.{flag}=true"]), vocab, data)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys()  # same parameter names: checkpoints stay interchangeable
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_lm_head_returns_logits_without_labels_and_a_sum_with():
    head = LMHead(8, 11)
    h = torch.randn(5, 8)
    assert head(h).shape == (5, 11)
    y = torch.tensor([1, 2, 3, 4, 5])
    expected = torch.nn.functional.cross_entropy(head(h), y, reduction="sum")
    torch.testing.assert_close(head(h, y), expected)
