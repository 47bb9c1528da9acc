"""Vision encoder built from config, no hub weights: a ViT (transformers `ViTModel`) or a small ResNet
(transformers `ResNetModel`). Either way: uint8 images in, a square grid of patch features out."""

from __future__ import annotations

import torch
from torch import nn
from transformers import ResNetConfig, ResNetModel, ViTConfig, ViTModel

from cxrfm.config import VisionConfig


def vit_config(cfg: VisionConfig, attn_implementation: str) -> ViTConfig:
    return ViTConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=cfg.channels,
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, attn_implementation=attn_implementation,
    )


def resnet_config(cfg: VisionConfig) -> ResNetConfig:
    widths = [*cfg.resnet_widths, cfg.hidden_size]
    return ResNetConfig(num_channels=cfg.channels, embedding_size=widths[0], hidden_sizes=widths,
                        depths=[cfg.num_layers] * len(widths), layer_type="basic")


class VisionEncoder(nn.Module):
    """uint8 grayscale images -> patch features, row-major over the grid (a ViT's CLS is dropped: the
    projector pools patches spatially)."""

    def __init__(self, cfg: VisionConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "resnet":
            self.resnet = ResNetModel(resnet_config(cfg))
        else:
            self.vit = ViTModel(vit_config(cfg, attn_implementation), add_pooling_layer=False)
        self.grid = cfg.image_size // cfg.patch_size

    @property
    def backbone(self) -> nn.Module:
        return self.resnet if self.cfg.kind == "resnet" else self.vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (n, S, S) uint8 -> (n, 1, S, S) roughly zero-mean, unit-variance
        dtype = next(self.backbone.parameters()).dtype
        x = (images.to(dtype).unsqueeze(1) / 255.0 - 0.5) / 0.25
        if self.cfg.kind == "resnet":
            h = self.resnet(pixel_values=x).last_hidden_state  # (n, Dv, g, g)
            return h.flatten(2).transpose(1, 2)  # (n, P, Dv)
        h = self.vit(pixel_values=x).last_hidden_state  # (n, 1 + P, Dv)
        return h[:, 1:]  # (n, P, Dv)
