"""Text-to-image diffusion decoder conditioned on the language model's hidden states (the `generate` task).

A diffusers denoiser (`UNet2DConditionModel`, or a PixArt-style DiT for `backbone: dit`) predicts the
noise added to a chest X-ray, cross-attending to the LM's last hidden states of the report text. It
works in pixel space for small configs and in the latent space of a frozen `AutoencoderKL` for large
ones. Training uses a DDPM schedule (epsilon prediction); sampling uses DDIM or DPM-Solver++ built from
the same schedule, with classifier-free guidance: a learned null condition replaces the text with
probability `cond_dropout` in training, and sampling mixes conditional and unconditional predictions.

Everything is built from config (no hub downloads); `vae_path` is a local directory only.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       PixArtTransformer2DModel, UNet2DConditionModel)
from torch import nn
from torch.nn import functional as F

from cxrfm.config import DiffusionConfig

_KEY = "model.diffusion"  # config path named in error messages

def pack_tokens(values: torch.Tensor, select: torch.Tensor, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-align the selected positions of each row, keeping the first `max_tokens` of them.

    values: (B, T, ...) e.g. token ids or hidden states; select: (B, T) bool.
    Returns (B, L, ...) and its (B, L) bool mask, L = min(max_tokens, most selected in a row) (>= 1).
    Differentiable in `values` (index_put into zeros), so LM hidden states keep their gradient.
    """
    rank = select.long().cumsum(1) - 1  # (B, T): slot of each selected position in its row
    keep = select & (rank < max_tokens)
    width = max(1, int(keep.sum(1).max()) if keep.numel() else 1)
    rows, cols = keep.nonzero(as_tuple=True)  # row-major, so each row's slots come in order
    out = values.new_zeros((values.shape[0], width) + values.shape[2:])
    out = out.index_put((rows, rank[rows, cols]), values[rows, cols])
    mask = torch.zeros(values.shape[0], width, dtype=torch.bool, device=values.device)
    mask[rows, rank[rows, cols]] = True
    return out, mask


class NullCondition(nn.Module):
    """The learned "no text" condition for classifier-free guidance.

    A module (not a bare parameter of the decoder) so that its weight is used inside its own forward:
    ZeRO-3 gathers a partitioned parameter only around the forward of the module that owns it.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 1, dim) * 0.02)  # (1, 1, D)

    def forward(self, n: int, length: int) -> torch.Tensor:
        # Repeating one vector L times attends exactly like a single null token (identical keys and values).
        return self.weight.expand(n, length, -1)  # (n, L, D)


def _is_meta_context() -> bool:
    return torch.empty(()).device.type == "meta"


def _build_vae(cfg: DiffusionConfig) -> AutoencoderKL:
    if cfg.vae_path is not None:
        path = Path(cfg.vae_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{_KEY}.vae_path: {path} is not a local diffusers AutoencoderKL directory "
                                    "(needs config.json and the weights); hub names are not fetched")
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(path)))
        down = 2 ** (len(vae.config.block_out_channels) - 1)
        if vae.config.latent_channels != cfg.vae_channels or down != cfg.vae_downsample:
            raise ValueError(f"{_KEY}.vae_path: that VAE has {vae.config.latent_channels} latent channels and downsamples "
                             f"by {down}; set {_KEY}.vae_channels={vae.config.latent_channels} and {_KEY}.vae_downsample={down}")
        return vae
    levels = len(cfg.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=cfg.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.vae_block_out_channels), layers_per_block=2,
        norm_num_groups=math.gcd(32, *cfg.vae_block_out_channels), sample_size=cfg.image_size,
    )


def _build_backbone(cfg: DiffusionConfig, cond_dim: int) -> nn.Module:
    c, side = cfg.sample_channels, cfg.sample_side
    if cfg.backbone == "dit":
        return PixArtTransformer2DModel(
            num_attention_heads=cfg.dit_hidden_size // cfg.attention_head_dim,
            attention_head_dim=cfg.attention_head_dim, in_channels=c, out_channels=c, num_layers=cfg.dit_layers,
            sample_size=side, patch_size=cfg.dit_patch_size,
            # The caption projection maps the LM width to the DiT width; cross-attention then runs at that width.
            caption_channels=cond_dim, cross_attention_dim=cfg.dit_hidden_size,
            use_additional_conditions=False,  # no resolution / aspect-ratio embeddings: one fixed square size
            num_embeds_ada_norm=cfg.num_train_timesteps,
        )
    ch = cfg.block_out_channels
    n = len(ch)
    # Stable-Diffusion layout: cross-attention at every level but the lowest, plus in the mid block.
    # One level: that level carries cross-attention itself.
    down = ("CrossAttnDownBlock2D",) * max(n - 1, 1) + ("DownBlock2D",) * (n > 1)
    up = ("UpBlock2D",) * (n > 1) + ("CrossAttnUpBlock2D",) * max(n - 1, 1)
    return UNet2DConditionModel(
        sample_size=side, in_channels=c, out_channels=c, block_out_channels=tuple(ch),
        down_block_types=down, up_block_types=up, layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cond_dim, norm_num_groups=math.gcd(32, *ch),
        # diffusers' UNet reads `attention_head_dim` as the number of heads (a historical misnomer, see
        # diffusers#2011); our key means channels per head, so convert per level.
        attention_head_dim=tuple(x // cfg.attention_head_dim for x in ch),
    )


class DiffusionDecoder(nn.Module):
    """Report hidden states -> chest X-ray. `forward`/`loss` trains; `sample` generates."""

    def __init__(self, cfg: DiffusionConfig, cond_dim: int):
        super().__init__()
        self.cfg = cfg
        self.cond_dim = cond_dim
        self.backbone = _build_backbone(cfg, cond_dim)
        self.null_cond = NullCondition(cond_dim)
        self.vae = _build_vae(cfg) if cfg.latent else None
        if self.vae is not None:
            self.vae.requires_grad_(False)  # frozen: the decoder learns in its fixed latent space
            self.vae.eval()
            if cfg.vae_path is not None and not _is_meta_context():
                self.load_vae(cfg.vae_path)
        # Pixel space favours the cosine schedule (improved DDPM); latents the SD "scaled_linear" one.
        schedule = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012) if cfg.latent \
            else dict(beta_schedule="squaredcos_cap_v2")
        with torch.device("cpu"):  # schedule tables stay real CPU tensors even when built on `meta`
            self.scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, prediction_type=cfg.prediction,
                                           clip_sample=False, **schedule)

    # ---- setup ------------------------------------------------------------------------------------
    def load_vae(self, path: str | Path) -> None:
        """Copy AutoencoderKL weights from a local directory into the frozen VAE."""
        src = AutoencoderKL.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False).state_dict()
        params = list(self.vae.parameters())
        if params and hasattr(params[0], "ds_id"):  # built under deepspeed.zero.Init: partitioned
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                self.vae.load_state_dict(src)
        else:
            self.vae.load_state_dict(src)

    def train(self, mode: bool = True) -> "DiffusionDecoder":
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()  # frozen, never in training mode
        return self

    def enable_activation_checkpointing(self) -> None:
        self.backbone.enable_gradient_checkpointing()

    # ---- pieces -----------------------------------------------------------------------------------
    def _param(self) -> torch.Tensor:
        return self.null_cond.weight

    def _to_sample_space(self, images_uint8: torch.Tensor, generator: torch.Generator | None,
                         size: int | None = None) -> torch.Tensor:
        """(n, S_in, S_in) uint8 -> (n, C, s, s) fp32 clean sample x0 (pixels in [-1, 1], or scaled latents),
        resized to `size` pixels (default: model.diffusion.image_size)."""
        x = images_uint8.float().unsqueeze(1) / 127.5 - 1.0  # (n, 1, S_in, S_in)
        size = size or self.cfg.image_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if self.vae is None:
            return x
        vc = self.vae.config
        with torch.no_grad():
            pix = x.repeat(1, vc.in_channels, 1, 1) if vc.in_channels != 1 else x  # grey into an RGB VAE
            z = self.vae.encode(pix.to(self.vae.dtype)).latent_dist.sample(generator=generator).float()
        return (z - (vc.shift_factor or 0.0)) * vc.scaling_factor  # (n, vae_channels, S/d, S/d)

    def _from_sample_space(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C, s, s) -> (n, S, S) uint8."""
        if self.vae is not None:
            vc = self.vae.config
            z = x / vc.scaling_factor + (vc.shift_factor or 0.0)
            x = self.vae.decode(z.to(self.vae.dtype)).sample.float().mean(1, keepdim=True)  # RGB VAE -> grey
        return ((x[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (n, C, s, s); t: (n,) long; cond: (n, L, D); mask: (n, L) bool -> predicted noise (n, C, s, s).

        The mask goes to diffusers as `encoder_attention_mask`: in 0.42 UNet2DConditionModel and PixArt turn
        it into a -10000 bias on padded keys of every cross-attention (Transformer2DModel -> attn2)."""
        dtype = self._param().dtype
        out = self.backbone(x.to(dtype), timestep=t, encoder_hidden_states=cond.to(dtype),
                            encoder_attention_mask=mask.to(dtype), return_dict=False)[0]
        return out.float()

    def _clip_text(self, cond: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cond.shape[:2] != mask.shape:
            raise ValueError(f"cond {tuple(cond.shape)} and cond_mask {tuple(mask.shape)} disagree; expected (n, L, D) and (n, L)")
        if cond.shape[-1] != self.cond_dim:
            raise ValueError(f"cond width {cond.shape[-1]} != the decoder's cond_dim {self.cond_dim} (LM hidden size)")
        m = self.cfg.max_text_tokens
        return cond[:, :m], mask[:, :m].bool()

    @staticmethod
    def _draw(fn, *args, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """fn(*args) (torch.randn / rand / randint) drawn on the generator's device, then moved:
        a CPU generator can then drive CUDA training reproducibly."""
        gdev = generator.device if generator is not None else device
        return fn(*args, generator=generator, device=gdev).to(device)

    # ---- training ---------------------------------------------------------------------------------
    def forward(self, images_uint8: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Diffusion MSE on the noise or v target (`cfg.prediction`), fp32 scalar. images_uint8: (n, S_in, S_in); cond: (n, L, D); cond_mask: (n, L).

        n may be 0 (no report row on this rank in this micro-batch): then one small blank image
        (`smallest_image_size`) with the null condition runs and the result is multiplied by 0, so every
        trainable parameter still takes part in forward and backward on every rank (ZeRO-3 gathers and
        ZeRO-2 gradient buckets must match)."""
        device = self._param().device
        empty = images_uint8.shape[0] == 0
        size = self.cfg.image_size
        if empty:
            # A small image: the same modules run in the same order (what ZeRO needs), at a fraction of the
            # cost (at 32 px the full-size stand-in's self-attention was ~1/6 of a tiny-learn step).
            size = self.cfg.smallest_image_size
            images_uint8 = torch.zeros(1, size, size, dtype=torch.uint8, device=device)
            cond = self.null_cond(1, 1).detach()
            cond_mask = torch.ones(1, 1, dtype=torch.bool, device=device)
        cond, cond_mask = self._clip_text(cond, cond_mask)
        n, length = cond.shape[:2]
        x0 = self._to_sample_space(images_uint8.to(device), generator, size)  # (n, C, s, s)
        noise = self._draw(torch.randn, x0.shape, generator=generator, device=device)
        t = self._draw(torch.randint, 0, self.scheduler.config.num_train_timesteps, (n,), generator=generator, device=device)
        xt = self.scheduler.add_noise(x0, noise, t)

        # Classifier-free guidance training: a per-sample coin replaces the text with the null condition.
        null = self.null_cond(n, length)  # (n, L, D)
        p = self.cfg.cond_dropout if self.training else 0.0
        drop = self._draw(torch.rand, (n,), generator=generator, device=device) < p  # (n,)
        cond = torch.where(drop[:, None, None], null.to(cond.dtype), cond)
        cond_mask = cond_mask | drop[:, None]  # the null condition attends to all L (identical) slots

        pred = self._denoise(xt, t, cond, cond_mask)
        target = noise if self.cfg.prediction == "epsilon" else self.scheduler.get_velocity(x0, noise, t)
        loss = F.mse_loss(pred, target)
        # Keeps the null embedding in the graph when no sample was dropped (same reason as the n == 0 case).
        loss = loss + 0.0 * null.sum()
        return loss * 0.0 if empty else loss

    def loss(self, images_uint8: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Same as calling the module (goes through `__call__` so ZeRO-3 hooks run)."""
        return self(images_uint8, cond, cond_mask, generator=generator)

    # ---- sampling ---------------------------------------------------------------------------------
    def sampling_scheduler(self):
        """DDIM or DPM-Solver++ over the training schedule; 'trailing' spacing starts from the noisiest step."""
        kind = DDIMScheduler if self.cfg.sampler == "ddim" else DPMSolverMultistepScheduler
        extra = {}
        if self.vae is None:
            # Pixel space: x0 lies in [-1, 1], so clip its estimate. Under the cosine schedule's last alpha_bar
            # (~1e-9) an epsilon model's x0 estimate divides its error by ~5e-5 and saturates every pixel.
            extra = ({"clip_sample": True, "clip_sample_range": 1.0} if kind is DDIMScheduler
                     else {"thresholding": True, "sample_max_value": 1.0})
        return kind.from_config(self.scheduler.config, timestep_spacing="trailing", **extra)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, cond_mask: torch.Tensor, num_steps: int | None = None,
               guidance_scale: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """cond: (n, L, D) report hidden states; cond_mask: (n, L) -> (n, S, S) uint8 images.

        Guidance: out = out_uncond + w * (out_cond - out_uncond) on the backbone's prediction (noise or v);
        both passes run as one batch of 2n."""
        cond, cond_mask = self._clip_text(cond, cond_mask)
        n, length = cond.shape[:2]
        device = self._param().device
        w = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        sched = self.sampling_scheduler()
        sched.set_timesteps(num_steps or self.cfg.sample_steps, device=device)
        c, s = self.cfg.sample_channels, self.cfg.sample_side
        x = self._draw(torch.randn, (n, c, s, s), generator=generator, device=device) * sched.init_noise_sigma  # (n, C, s, s)
        guided = w != 1.0
        if guided:
            cond_in = torch.cat([self.null_cond(n, length).to(cond.dtype), cond])  # (2n, L, D)
            mask_in = torch.cat([torch.ones_like(cond_mask), cond_mask])  # (2n, L)
        else:
            cond_in, mask_in = cond, cond_mask
        for t in sched.timesteps:
            x_in = sched.scale_model_input(torch.cat([x, x]) if guided else x, t)
            tt = t.to(device=device, dtype=torch.long).expand(x_in.shape[0])  # (2n,) or (n,)
            out = self._denoise(x_in, tt, cond_in, mask_in)
            if guided:
                out_u, out_c = out.chunk(2)
                out = out_u + w * (out_c - out_u)
            x = sched.step(out, t, x, generator=generator, return_dict=False)[0]
        return self._from_sample_space(x)
