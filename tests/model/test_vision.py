"""Both vision encoders give the projector the same thing: a row-major square grid of patch features."""

import pytest
import torch

from cxrfm.config import VisionConfig, load_config
from cxrfm.model.build import build_model
from cxrfm.model.multitask import MultitaskModel
from cxrfm.model.vision import VisionEncoder

RESNET = dict(kind="resnet", image_size=64, patch_size=8, hidden_size=96, num_layers=1, resnet_widths=[48])


@pytest.mark.parametrize("cfg", [VisionConfig(), VisionConfig(**RESNET)], ids=["vit", "resnet"])
def test_patch_grid_shape_and_locality(cfg):
    torch.manual_seed(0)
    enc = VisionEncoder(cfg).eval()
    images = torch.full((2, 64, 64), 128, dtype=torch.uint8)
    with torch.no_grad():
        base = enc(images)
        assert base.shape == (2, (64 // cfg.patch_size) ** 2, cfg.hidden_size)
        # A bright square in the top-left corner changes the top-left patch most: the grid is row-major.
        images[1, :8, :8] = 255
        delta = (enc(images)[1] - base[1]).norm(dim=-1)  # (P,)
    if cfg.kind == "resnet":  # a ViT mixes all patches in every layer; a CNN stays local
        g = 64 // cfg.patch_size
        assert int(delta.argmax()) in (0, 1, g, g + 1) and delta[-1] < 1e-6  # near the corner; nothing far away


def test_resnet_stride_must_match_patch_size():
    with pytest.raises(ValueError, match="total stride"):
        VisionConfig(**{**RESNET, "patch_size": 16})
    assert VisionConfig(**{**RESNET, "patch_size": 16, "resnet_widths": [32, 64]}).patch_size == 16


def test_resnet_model_round_trips_with_its_batchnorm_statistics(tmp_path):
    cfg = load_config(None, ["model.vision.kind=resnet", "model.vision.num_layers=1"])
    model = build_model(cfg, 700)
    model.train()
    with torch.no_grad():
        model.vision(torch.randint(0, 255, (4, 64, 64), dtype=torch.uint8))  # moves the running statistics
    model.save_pretrained(tmp_path, full_config=cfg)
    loaded = MultitaskModel.from_pretrained(tmp_path).eval()
    model.eval()
    images = torch.randint(0, 255, (2, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.vision(images), model.vision(images))
    stats = [k for k in loaded.state_dict() if k.endswith("running_mean")]
    assert stats and not torch.equal(loaded.state_dict()[stats[0]], torch.zeros_like(loaded.state_dict()[stats[0]]))


def test_planner_refuses_the_cpu_encoder():
    from cxrfm.plan import activation_bytes

    cfg = load_config(None, ["model.vision.kind=resnet", "model.vision.num_layers=1"])
    with pytest.raises(ValueError, match="kind: vit"):
        activation_bytes(cfg, 1, False)
