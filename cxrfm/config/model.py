"""The model's config sections: vision encoder, projector, language model, diffusion decoder, and the
model-wide switches (attention backend, fused kernels, auxiliary losses). Part of `cxrfm.config`."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from .base import _Section


class VisionConfig(_Section):
    # vit: a ViT (Med-Gemini, M4CXR scale). resnet: a small transformers ResNet (basic blocks), a CNN encoder as
    # in R2Gen; its inductive bias learns findings from a few thousand images in minutes, where a ViT from
    # scratch does not (the tiny-learn config).
    kind: Literal["vit", "resnet"] = "vit"
    image_size: int = Field(64, ge=16)
    patch_size: int = Field(8, ge=1, description="vit: patch side; resnet: the total stride, 4 * 2**len(resnet_widths)")
    channels: int = 1
    hidden_size: int = Field(96, ge=8, description="feature width (resnet: the last stage's)")
    num_layers: int = Field(2, ge=1, description="vit: transformer layers; resnet: blocks per stage")
    num_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(256, ge=8)
    resnet_widths: list[int] = Field(default_factory=lambda: [48], description="resnet: widths of the stages before the last")

    @model_validator(mode="after")
    def _divisible(self) -> "VisionConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"model.vision.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.hidden_size % self.num_heads:
            raise ValueError("model.vision.hidden_size must be a multiple of model.vision.num_heads")
        if self.kind == "resnet":
            stride = 4 * 2 ** len(self.resnet_widths)  # stem /4, then /2 per stage after the first
            if self.patch_size != stride:
                raise ValueError(f"model.vision.patch_size ({self.patch_size}) must be the ResNet's total stride "
                                 f"4 * 2**len(resnet_widths) = {stride}; set patch_size: {stride} or change resnet_widths")
            if any(w < 1 for w in self.resnet_widths):
                raise ValueError(f"model.vision.resnet_widths ({self.resnet_widths}) must be positive")
        return self


class ProjectorConfig(_Section):
    num_tokens: int = Field(16, ge=1, description="visual tokens per image fed to the LM")
    hidden_size: int = Field(256, ge=8)
    # Learned embeddings added to every visual token: its cell of the pooled grid and its image's role
    # (frontal, lateral, prior). A CNN's features carry no absolute position and the LM's RoPE only
    # relative order, so without them "which side" and "which image" must be inferred from distances.
    position_embedding: bool = False


class LanguageConfig(_Section):
    vocab_size: int | None = Field(None, description="set from the tokenizer when None")
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(344, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    max_position_embeddings: int = Field(512, ge=16)
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    @model_validator(mode="after")
    def _heads(self) -> "LanguageConfig":
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("model.language: hidden_size % num_heads and num_heads % num_kv_heads must be 0")
        return self


_KEY = "model.diffusion"


class DiffusionConfig(_Section):
    """Text-to-CXR diffusion decoder (cxrfm/model/diffusion.py); off unless enabled."""

    enabled: bool = False
    backbone: Literal["unet", "dit"] = "unet"
    image_size: int = Field(32, ge=8, description="pixel side of generated images")
    # Latent diffusion: a frozen AutoencoderKL maps (S, S) pixels to (vae_channels, S/d, S/d) latents.
    latent: bool = False
    vae_channels: int = Field(4, ge=1)
    vae_downsample: int = Field(8, ge=2, description="pixel side / latent side; a power of 2")
    vae_block_out_channels: list[int] = Field(default_factory=lambda: [128, 256, 512, 512],
                                              description="VAE built from config: one entry per level")
    vae_path: str | None = Field(None, description="local diffusers AutoencoderKL directory (config + weights)")
    # UNet
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64])
    layers_per_block: int = Field(1, ge=1)
    # Heads of few channels are slow: attention kernels pay per head, so at the same FLOPs 4 heads of 8
    # channels cost ~4x one head of 32 on CPU (`cxrfm bench diffusion`); the tiny jobs set 32.
    attention_head_dim: int = Field(8, ge=1, description="channels per attention head (unet and dit)")
    # DiT (PixArt-style transformer: patchify, adaLN-single timestep, cross-attention to the text)
    dit_hidden_size: int = Field(64, ge=8)
    dit_layers: int = Field(2, ge=1)
    dit_patch_size: int = Field(2, ge=1)
    # Noise schedule and sampling
    num_train_timesteps: int = Field(1000, ge=10)
    # What the backbone predicts. v (Salimans & Ho 2022) stays well-conditioned at both ends of the cosine
    # schedule; epsilon-prediction's x0 estimate blows up at its nearly pure-noise end.
    prediction: Literal["epsilon", "v_prediction"] = "v_prediction"
    sampler: Literal["ddim", "dpm"] = "ddim"
    sample_steps: int = Field(25, ge=1)
    guidance_scale: float = Field(3.0, ge=0)
    cond_dropout: float = Field(0.1, ge=0, le=1)
    loss_weight: float = Field(1.0, ge=0)
    max_text_tokens: int = Field(64, ge=1, description="report tokens the decoder attends to")

    @property
    def sample_side(self) -> int:
        """Side of what the denoiser sees: pixels, or latents."""
        return self.image_size // self.vae_downsample if self.latent else self.image_size

    @property
    def smallest_image_size(self) -> int:
        """A small image (pixels) the denoiser accepts: 2 x 2 cells of the UNet's lowest level (GroupNorm needs
        more than one value per group in training), or 2 x 2 DiT patches."""
        cell = 2 ** (len(self.block_out_channels) - 1) if self.backbone == "unet" else self.dit_patch_size
        return min(self.image_size, 2 * cell * (self.vae_downsample if self.latent else 1))

    @property
    def sample_channels(self) -> int:
        return self.vae_channels if self.latent else 1

    @model_validator(mode="after")
    def _shapes(self) -> "DiffusionConfig":
        if self.latent:
            d = self.vae_downsample
            if d & (d - 1):
                raise ValueError(f"{_KEY}.vae_downsample ({d}) must be a power of 2")
            if self.image_size % d:
                raise ValueError(f"{_KEY}.image_size ({self.image_size}) must be a multiple of {_KEY}.vae_downsample ({d})")
            if self.vae_path is None and len(self.vae_block_out_channels) != int(math.log2(d)) + 1:
                raise ValueError(f"{_KEY}.vae_block_out_channels needs log2(vae_downsample) + 1 = {int(math.log2(d)) + 1} "
                                 f"entries (one per VAE level), got {len(self.vae_block_out_channels)}")
            if self.vae_path is None and any(c % 4 for c in self.vae_block_out_channels):
                raise ValueError(f"{_KEY}.vae_block_out_channels must be multiples of 4 (GroupNorm)")
        side, h = self.sample_side, self.attention_head_dim
        if self.backbone == "unet":
            ch = self.block_out_channels
            if not ch or any(c <= 0 for c in ch):
                raise ValueError(f"{_KEY}.block_out_channels needs at least one positive entry")
            down = 2 ** (len(ch) - 1)
            if side % down:
                what = f"latent side image_size/vae_downsample ({side})" if self.latent else f"image_size ({side})"
                raise ValueError(f"{_KEY}.image_size: the {what} must be divisible by 2**(len({_KEY}.block_out_channels)-1) = {down}")
            if any(c % h for c in ch):
                raise ValueError(f"{_KEY}.block_out_channels ({ch}) must be multiples of {_KEY}.attention_head_dim ({h})")
            if math.gcd(32, *ch) < 4:
                raise ValueError(f"{_KEY}.block_out_channels ({ch}) must share a factor of at least 4 (GroupNorm groups)")
        else:
            if self.dit_hidden_size % h:
                raise ValueError(f"{_KEY}.dit_hidden_size ({self.dit_hidden_size}) must be a multiple of {_KEY}.attention_head_dim ({h})")
            if side % self.dit_patch_size:
                raise ValueError(f"{_KEY}.dit_patch_size ({self.dit_patch_size}) must divide the denoised side ({side})")
        return self


class ModelConfig(_Section):
    vision: VisionConfig = Field(default_factory=VisionConfig)
    projector: ProjectorConfig = Field(default_factory=ProjectorConfig)
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    attention: Literal["auto", "sdpa", "eager", "triton", "flash_attn", "xformers"] = "sdpa"
    # Our Triton kernels in place of Llama's RMSNorm and of lm_head + cross-entropy (GPU, or the
    # Triton interpreter in tests).
    fused_rmsnorm: bool = False
    fused_cross_entropy: bool = False
    # Auxiliary multi-label loss on the vision encoder: the 14 CheXpert observations of the study, predicted
    # from each current (non-prior) image's mean patch feature. Gives the encoder a direct signal from the
    # first step, so the LM has findings to read in its visual tokens early. 0 turns it off.
    finding_loss_weight: float = Field(0.0, ge=0)
    # Auxiliary view loss: each image's view position (PA, AP, lateral; from the image's metadata, which every
    # source records or cxrfm.data.views infers) predicted from its mean patch feature. Without it the view
    # is a low-variance direction of the visual tokens that the LM's attention does not pick up (see the
    # README's VQA diagnosis). 0 turns it off.
    view_loss_weight: float = Field(0.0, ge=0)
    # How the answer-token loss of report, VQA and grounding rows is averaged. "token": one mean over every
    # answer token of the batch, so a 60-token report outweighs a 1-token "yes" 60 to 1 and short-answer tasks
    # get a sliver of the gradient. "task": each task's own token mean, weighted by its share of the batch's
    # rows, so the mixture weights (data.tasks) set each task's share of the gradient.
    lm_loss_average: Literal["token", "task"] = "token"
