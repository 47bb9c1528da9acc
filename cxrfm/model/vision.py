"""Vision encoder: a ViT built from config (transformers `ViTModel`, no hub weights)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import ViTConfig, ViTModel

from cxrfm.config import VisionConfig


def vit_config(cfg: VisionConfig, attn_implementation: str) -> ViTConfig:
    return ViTConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=cfg.channels,
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, attn_implementation=attn_implementation,
    )


class VisionEncoder(nn.Module):
    """uint8 grayscale images -> patch features (CLS dropped: the projector pools patches spatially)."""

    def __init__(self, cfg: VisionConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.vit = ViTModel(vit_config(cfg, attn_implementation), add_pooling_layer=False)
        self.grid = cfg.image_size // cfg.patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (n, S, S) uint8 -> (n, 1, S, S) roughly zero-mean, unit-variance
        dtype = self.vit.embeddings.patch_embeddings.projection.weight.dtype
        x = (images.to(dtype).unsqueeze(1) / 255.0 - 0.5) / 0.25
        h = self.vit(pixel_values=x).last_hidden_state  # (n, 1 + P, Dv)
        return h[:, 1:]  # (n, P, Dv)
